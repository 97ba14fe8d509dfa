//! Media messages at delivery time: fetch the file of an image, file, video or voice message
//! through its instance's actor (`POST /api/file/download`), keep it under `media.dir`, record
//! the outcome in the store (so a retry never downloads again), count it in
//! `wxauto_media_downloads_total`, log it to `file_processing.log`, and hand the platforms
//! `Attachment`s. A failed download never holds a message back: it is delivered without data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Local, NaiveDate};
use regex::Regex;

use crate::config::{Config, DeliveryConfig, MediaConfig};
use crate::message::{Download, DownloadError, InboundMessage};
use crate::wxauto::DOWNLOAD_TIMEOUT;

use super::Inner;
use super::store::{Job, MediaRow, StoreError};

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

// === files ===

/// The last component of a Windows (or POSIX) path, made safe as a local file name.
pub(crate) fn file_name(file_path: &str) -> String {
    let base = file_path
        .rsplit(['\\', '/'])
        .next()
        .unwrap_or_default()
        .trim();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '|' | '?' | '*') {
                '_'
            } else {
                c
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches(['.', ' ']).to_owned();
    if cleaned.is_empty() {
        "file".to_owned()
    } else {
        cleaned
    }
}

/// The MIME type of a file name's extension.
pub(crate) fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, ext)| ext.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "svg" => "image/svg+xml",
        "mp4" => "video/mp4",
        "mov" => "video/quicktime",
        "avi" => "video/x-msvideo",
        "mp3" => "audio/mpeg",
        "wav" => "audio/wav",
        "m4a" => "audio/mp4",
        "amr" => "audio/amr",
        "silk" | "slk" => "audio/silk",
        "pdf" => "application/pdf",
        "txt" => "text/plain",
        "csv" => "text/csv",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "ppt" => "application/vnd.ms-powerpoint",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "zip" => "application/zip",
        _ => "application/octet-stream",
    }
}

/// Writes `bytes` to `dir/name`, or `dir/<stem>_1.<ext>`, `_2`, ... when the name is taken;
/// returns the path and the hex SHA-256.
#[allow(clippy::disallowed_methods, reason = "runs on tokio's blocking pool")]
pub(crate) fn save(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<(PathBuf, String)> {
    fs::create_dir_all(dir)?;
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    };
    for n in 0u32.. {
        let candidate = match (n, ext) {
            (0, _) => name.to_owned(),
            (n, Some(ext)) => format!("{stem}_{n}.{ext}"),
            (n, None) => format!("{stem}_{n}"),
        };
        let path = dir.join(candidate);
        // `create_new` makes the check and the creation one step, so two workers saving the
        // same name cannot overwrite each other.
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(bytes)?;
                file.sync_all()?;
                return Ok((path, sha256_hex(bytes)));
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Err(io::Error::other("no free file name"))
}

/// Hex SHA-256.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Deletes the files in `dir` last modified more than `retention_days` before `now`; returns
/// how many. Subdirectories and other entries are left alone.
#[allow(clippy::disallowed_methods, reason = "runs on tokio's blocking pool")]
pub(crate) fn prune_dir(dir: &Path, retention_days: u32, now: SystemTime) -> io::Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err),
    };
    let keep = Duration::from_secs(u64::from(retention_days) * DAY_SECS);
    let Some(cutoff) = now.checked_sub(keep) else {
        return Ok(0);
    };
    let mut pruned = 0;
    for entry in entries.flatten() {
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        if metadata.modified().is_ok_and(|modified| modified < cutoff)
            && fs::remove_file(entry.path()).is_ok()
        {
            pruned += 1;
        }
    }
    Ok(pruned)
}

/// Base64 (standard alphabet, padded).
pub(crate) fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_collide_into_numbered_files() {
        let dir = tempfile::tempdir().unwrap();
        let (first, hash) = save(dir.path(), "微信图片_1.png", b"one").unwrap();
        let (second, _) = save(dir.path(), "微信图片_1.png", b"two").unwrap();
        let (third, _) = save(dir.path(), "微信图片_1.png", b"three").unwrap();
        let (bare, _) = save(dir.path(), "README", b"x").unwrap();
        let (bare2, _) = save(dir.path(), "README", b"y").unwrap();
        let names: Vec<String> = [&first, &second, &third, &bare, &bare2]
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "微信图片_1.png",
                "微信图片_1_1.png",
                "微信图片_1_2.png",
                "README",
                "README_1"
            ]
        );
        assert_eq!(fs::read(&second).unwrap(), b"two");
        assert_eq!(
            hash,
            "7692c3ad3540bb803c020b3aee66cd8887123234ea0c6e7143c0add73ff431ed"
        );
    }

    #[test]
    fn windows_paths_become_safe_names() {
        assert_eq!(
            file_name(r"C:\Users\me\Documents\wxauto文件\微信图片_20261201.png"),
            "微信图片_20261201.png"
        );
        assert_eq!(file_name(r"C:\x\a:b?.txt"), "a_b_.txt");
        assert_eq!(file_name(r"C:\x\.."), "file");
        assert_eq!(file_name(""), "file");
    }

    #[test]
    fn paths_are_found_in_content_and_media_text_is_empty() {
        assert_eq!(
            windows_path("图片 D:\\wx\\a b.jpg\n"),
            Some("D:\\wx\\a b.jpg")
        );
        assert_eq!(windows_path("no path here"), None);
        let mut msg = InboundMessage {
            instance_id: "wx".to_owned(),
            chat: "alice".to_owned(),
            message_id: "1".to_owned(),
            synthetic_id: false,
            msg_type: "friend".to_owned(),
            sender: "alice".to_owned(),
            sender_remark: None,
            content: r"C:\wx\a.png".to_owned(),
            mtype: Some("image".to_owned()),
            file_path: None,
            received_at: chrono::Utc::now(),
            epoch: 0,
        };
        assert_eq!(text_of(&msg), "");
        msg.mtype = None;
        assert_eq!(text_of(&msg), r"C:\wx\a.png");
        msg.mtype = Some("voice".to_owned());
        msg.content = "明天见".to_owned();
        assert_eq!(text_of(&msg), "明天见");
    }

    #[test]
    fn content_types_follow_the_extension() {
        assert_eq!(content_type("a.PNG"), "image/png");
        assert_eq!(content_type("a.jpeg"), "image/jpeg");
        assert_eq!(content_type("report.pdf"), "application/pdf");
        assert_eq!(content_type("noext"), "application/octet-stream");
    }

    #[test]
    fn prune_removes_only_files_older_than_retention() {
        let dir = tempfile::tempdir().unwrap();
        let now = SystemTime::now();
        let old = dir.path().join("old.png");
        let fresh = dir.path().join("fresh.png");
        let edge = dir.path().join("six_days.png");
        for path in [&old, &fresh, &edge] {
            fs::write(path, b"x").unwrap();
        }
        let set_age = |path: &Path, days: u64| {
            let file = File::options().write(true).open(path).unwrap();
            file.set_modified(now - Duration::from_secs(days * DAY_SECS))
                .unwrap();
        };
        set_age(&old, 8);
        set_age(&edge, 6);
        fs::create_dir(dir.path().join("sub")).unwrap();
        assert_eq!(prune_dir(dir.path(), 7, now).unwrap(), 1);
        assert!(!old.exists());
        assert!(fresh.exists() && edge.exists());
        assert!(dir.path().join("sub").exists());
        assert_eq!(prune_dir(&dir.path().join("missing"), 7, now).unwrap(), 0);
    }

    #[test]
    fn file_log_moves_an_earlier_day_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file_processing.log");
        fs::write(&path, "old line\n").unwrap();
        let two_days_ago = SystemTime::now() - Duration::from_secs(2 * DAY_SECS);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
        let log = FileLog::new(dir.path(), 7);
        log.write("new line");
        assert_eq!(fs::read_to_string(&path).unwrap(), "new line\n");
        let date = DateTime::<Local>::from(two_days_ago).date_naive();
        let dated = dir
            .path()
            .join(crate::logging::DailyFile::file_name(FILE_LOG_PREFIX, date));
        assert_eq!(fs::read_to_string(dated).unwrap(), "old line\n");
    }
}
