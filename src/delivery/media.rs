//! Media messages at delivery time: fetch the file of an image, file, video or voice message
//! through its instance's actor (`POST /api/file/download`), keep it under `media.dir`, record
//! the outcome in the store (so a retry never downloads again), count it in
//! `wxauto_media_downloads_total`, log it to `file_processing.log`, and hand the platforms
//! `Attachment`s. A failed download never holds a message back: it is delivered without data.

mod files;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Local, NaiveDate};
use regex::Regex;

use crate::config::{Config, DeliveryConfig, MediaConfig};
use crate::message::{Download, DownloadError, InboundMessage};
use crate::wxauto::DOWNLOAD_TIMEOUT;

use super::Inner;
use super::store::{Job, MediaRow, StoreError};
#[cfg(test)]
pub(crate) use files::sha256_hex;
pub(crate) use files::{base64, content_type, file_name, prune_dir, save};

/// The `outcome` values of `wxauto_media_downloads_total`.
pub(crate) const OUTCOMES: [&str; 5] = ["success", "error", "too_large", "disabled", "unavailable"];
/// How often a delivery waits for a down instance before sending the message without its file.
const MAX_WAITS: u32 = 10;
/// The name of the download log in `logging.dir`; earlier days become
/// `file_processing_YYYYMMDD.log`.
const FILE_LOG_PREFIX: &str = "file_processing";
/// Seconds in a day.
const DAY_SECS: u64 = 86_400;

/// The `media:` settings plus where the download log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaSettings {
    /// `media:`.
    pub config: MediaConfig,
    /// `logging.dir`, home of `file_processing.log`.
    pub log_dir: PathBuf,
    /// `logging.retention_days`, applied to the download log's earlier days.
    pub log_retention_days: u32,
}

impl MediaSettings {
    /// The settings of a config.
    pub fn from_config(config: &Config) -> Self {
        Self {
            config: config.media.clone(),
            log_dir: config.logging.dir.clone(),
            log_retention_days: config.logging.retention_days,
        }
    }
}

/// A media file as the platforms see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Attachment {
    /// `image`, `file`, `video` or `voice`.
    pub kind: &'static str,
    pub name: String,
    pub content_type: String,
    /// Known once downloaded (or announced by a too-large answer).
    pub size: Option<u64>,
    /// Hex SHA-256 of the downloaded bytes.
    pub sha256: Option<String>,
    /// The kept file, when the download succeeded.
    pub local_path: Option<PathBuf>,
}

/// What delivery does with a claimed row after looking at its media.
#[derive(Debug)]
pub(crate) enum Prepared {
    /// Call the platform with these attachments (empty for a text message).
    Ready(Vec<Attachment>),
    /// The instance holding the file is down: put the row back without spending an attempt.
    Wait {
        file_path: String,
        next_attempt_ms: i64,
        note: String,
    },
    /// The store could not answer.
    Store(StoreError),
}

/// `file_processing.log`: one line per download, sizes and outcomes, never content.
pub(crate) struct FileLog {
    dir: PathBuf,
    retention_days: u32,
    state: Mutex<Option<(NaiveDate, File)>>,
}

// === impl Attachment ===

impl Attachment {
    /// The kept bytes, or `None` when there are none (not downloaded, or pruned meanwhile).
    pub(crate) async fn data(&self) -> Option<Vec<u8>> {
        let path = self.local_path.clone()?;
        tokio::fs::read(path).await.ok()
    }

    /// The placeholder text that names the attachment, e.g. `[image: photo.png]`.
    pub(crate) fn placeholder(&self) -> String {
        format!("[{}: {}]", self.kind, self.name)
    }

    fn from_row(kind: &'static str, row: &MediaRow) -> Self {
        Self {
            kind,
            name: row.name.clone(),
            content_type: row.content_type.clone(),
            size: row.size,
            sha256: row.sha256.clone(),
            local_path: row
                .local_path
                .as_deref()
                .filter(|_| row.outcome.as_deref() == Some("success"))
                .map(PathBuf::from),
        }
    }
}

// === impl FileLog ===

impl FileLog {
    pub(crate) fn new(dir: &Path, retention_days: u32) -> Self {
        Self {
            dir: dir.to_owned(),
            retention_days,
            state: Mutex::new(None),
        }
    }

    /// Appends one line; a failure to write is logged, never propagated.
    pub(crate) fn write(&self, line: &str) {
        if let Err(err) = self.write_inner(line) {
            tracing::warn!(error = %err, dir = %self.dir.display(),
                "Could not write file_processing.log.");
        }
    }

    #[allow(
        clippy::disallowed_methods,
        reason = "one line appended to a local log file per media outcome"
    )]
    fn write_inner(&self, line: &str) -> io::Result<()> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| io::Error::other("file log lock poisoned"))?;
        let today = Local::now().date_naive();
        if state.as_ref().is_none_or(|(date, _)| *date != today) {
            *state = None;
            fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("{FILE_LOG_PREFIX}.log"));
            // Yesterday's (or older) file moves aside under its date; the logging pruner's
            // rule then applies to it.
            if let Some(date) = modified_date(&path)
                && date < today
            {
                let dated = self
                    .dir
                    .join(crate::logging::DailyFile::file_name(FILE_LOG_PREFIX, date));
                fs::rename(&path, dated)?;
            }
            crate::logging::prune(&self.dir, FILE_LOG_PREFIX, today, self.retention_days);
            let file = OpenOptions::new().create(true).append(true).open(&path)?;
            *state = Some((today, file));
        }
        if let Some((_, file)) = state.as_mut() {
            file.write_all(line.as_bytes())?;
            file.write_all(b"\n")?;
        }
        Ok(())
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "from `write_inner`, at a day change"
)]
fn modified_date(path: &Path) -> Option<NaiveDate> {
    let modified = fs::metadata(path).ok()?.modified().ok()?;
    Some(DateTime::<Local>::from(modified).date_naive())
}

// === the download step ===

/// The media kind of an `mtype`, for the types that carry a file.
pub(crate) fn kind_of(mtype: Option<&str>) -> Option<&'static str> {
    match mtype? {
        "image" => Some("image"),
        "file" => Some("file"),
        "video" => Some("video"),
        "voice" => Some("voice"),
        _ => None,
    }
}

/// The first Windows path (`X:\...`) in a text.
pub(crate) fn windows_path(text: &str) -> Option<&str> {
    static PATH: OnceLock<Option<Regex>> = OnceLock::new();
    let regex = PATH
        .get_or_init(|| Regex::new(r#"[A-Za-z]:\\[^\r\n"<>|?*]+"#).ok())
        .as_ref()?;
    regex.find(text).map(|found| found.as_str().trim_end())
}

/// The text of a message for platforms that read text: empty for an image, file or video
/// whose content is only its file's path (wxauto puts the path there).
pub(crate) fn text_of(msg: &InboundMessage) -> &str {
    let content = msg.content.trim();
    let only_path = matches!(msg.mtype.as_deref(), Some("image" | "file" | "video"))
        && (windows_path(content) == Some(content) || msg.file_path.as_deref() == Some(content));
    if only_path { "" } else { &msg.content }
}

/// Looks at a claimed row's media and downloads its file once.
pub(crate) async fn prepare(inner: &Inner, job: &mut Job, delivery: &DeliveryConfig) -> Prepared {
    let Some(kind) = kind_of(job.message.mtype.as_deref()) else {
        return Prepared::Ready(Vec::new());
    };
    let stored = match inner.store.media(job.id).await {
        Ok(stored) => stored,
        Err(err) => return Prepared::Store(err),
    };
    let file_path = stored
        .as_ref()
        .map(|row| row.file_path.clone())
        .or_else(|| job.message.file_path.clone())
        .or_else(|| windows_path(&job.message.content).map(str::to_owned));
    let Some(file_path) = file_path else {
        // e.g. a voice message that only carries its transcription.
        return Prepared::Ready(Vec::new());
    };
    job.message.file_path = Some(file_path.clone());
    if let Some(row) = stored.as_ref().filter(|row| row.outcome.is_some()) {
        return Prepared::Ready(vec![Attachment::from_row(kind, row)]);
    }
    let settings = inner.media();
    let msg = &job.message;
    let name = file_name(&file_path);
    let mut row = MediaRow {
        file_path: file_path.clone(),
        name: name.clone(),
        content_type: content_type(&name).to_owned(),
        waits: stored.as_ref().map_or(0, |row| row.waits),
        ..MediaRow::default()
    };
    let mut error_text: Option<String> = None;
    let outcome: &'static str = if settings.config.download {
        // The client gives up first; this only bounds a stuck actor.
        let answer = tokio::time::timeout(
            DOWNLOAD_TIMEOUT + Duration::from_secs(5),
            inner
                .replies
                .download_file(&msg.instance_id, &file_path, settings.config.max_bytes),
        )
        .await
        .unwrap_or_else(|_| Err(DownloadError::Upstream("no answer in time".to_owned())));
        match answer {
            Ok(Download::Bytes(bytes)) => {
                row.size = Some(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
                let dir = settings.config.dir.clone();
                let saved = tokio::task::spawn_blocking(move || save(&dir, &name, &bytes))
                    .await
                    .map_err(|err| io::Error::other(err.to_string()))
                    .and_then(|saved| saved);
                match saved {
                    Ok((path, sha256)) => {
                        row.local_path = Some(path.display().to_string());
                        row.sha256 = Some(sha256);
                        "success"
                    }
                    Err(err) => {
                        tracing::warn!(instance_id = %msg.instance_id,
                            message_id = %msg.message_id, error = %err,
                            dir = %settings.config.dir.display(),
                            "Could not keep a downloaded file; delivering without it.");
                        error_text = Some(format!("could not keep the file: {err}"));
                        "error"
                    }
                }
            }
            Ok(Download::TooLarge { size }) => {
                row.size = size;
                "too_large"
            }
            Err(DownloadError::InstanceDown(instance)) if row.waits < MAX_WAITS => {
                let wait = super::worker::delay(&delivery.backoff, row.waits + 1);
                tracing::debug!(instance_id = %instance,
                    "Media download waits for its instance to come back.");
                return Prepared::Wait {
                    file_path,
                    next_attempt_ms: inner.now_ms()
                        + i64::try_from(wait.as_millis()).unwrap_or(1000),
                    note: format!("waiting for instance {instance} to download a file"),
                };
            }
            Err(DownloadError::InstanceDown(_) | DownloadError::NoInstance(_)) => "unavailable",
            Err(err) => {
                tracing::warn!(instance_id = %msg.instance_id, message_id = %msg.message_id,
                    error = %err, "Media download failed; delivering without the file.");
                error_text = Some(err.to_string());
                "error"
            }
        }
    } else {
        "disabled"
    };
    row.outcome = Some(outcome.to_owned());
    inner.metrics.media_download(&msg.instance_id, outcome);
    if outcome == "success" {
        tracing::info!(instance_id = %msg.instance_id, message_id = %msg.message_id, kind,
            size = row.size, "Media file downloaded.");
    }
    log_line(inner, msg, kind, &row, outcome, error_text.as_deref());
    if let Err(err) = inner.store.set_media(job.id, row.clone()).await {
        // The message still goes out; a retry may then download once more.
        inner.storage_error(&err);
    }
    Prepared::Ready(vec![Attachment::from_row(kind, &row)])
}

fn log_line(
    inner: &Inner,
    msg: &InboundMessage,
    kind: &str,
    row: &MediaRow,
    outcome: &str,
    error: Option<&str>,
) {
    let mut line = format!(
        "{} instance_id={} chat={:?} message_id={} kind={kind} outcome={outcome} name={:?} \
         file_path={:?}",
        Local::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
        msg.instance_id,
        // Hashed when `logging.redact_chat_names` is on, like every other log line.
        crate::logging::chat(&msg.chat).to_string(),
        msg.message_id,
        row.name,
        row.file_path,
    );
    if let Some(size) = row.size {
        line.push_str(&format!(" size={size}"));
    }
    if let Some(sha256) = &row.sha256 {
        line.push_str(&format!(" sha256={sha256}"));
    }
    if let Some(path) = &row.local_path {
        line.push_str(&format!(" local_path={path:?}"));
    }
    if let Some(error) = error {
        line.push_str(&format!(" error={error:?}"));
    }
    // Like the other log writers: nothing that looks like a registered secret goes to disk.
    inner.file_log.write(&crate::secret::redact(&line));
}

#[cfg(test)]
mod tests;
