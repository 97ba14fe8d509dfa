//! Structured logs to stderr and to `<dir>/<prefix>_YYYYMMDD.log` (local date), with retention,
//! as text or one JSON object per line (`logging.format`); `chat` keeps chat names out of the
//! lines when `logging.redact_chat_names` is on.
//!
//! tracing-appender cannot name files `name_YYYYMMDD.log` nor rotate on the local date, so a
//! small writer here reopens the file when the local date changes and prunes old files.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{Local, NaiveDate};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogFormat, LoggingConfig};

/// Lines the log file's writer thread may have queued. The queue's slots are allocated up
/// front (tracing-appender's default of 128,000 lines is 4 MB, a sixth of the whole process at
/// 10 instances); the file is never lossy, so a longer burst makes the logging task wait for
/// the disk instead of dropping lines.
const FILE_LOG_BUFFERED_LINES: usize = 8_192;

/// Whether `chat` hashes chat names (`logging.redact_chat_names`); read live, set on load and
/// on every reload.
static REDACT_CHAT_NAMES: AtomicBool = AtomicBool::new(false);

/// Turns chat-name redaction in log lines on or off.
pub fn set_redact_chat_names(on: bool) {
    REDACT_CHAT_NAMES.store(on, Ordering::Relaxed);
}

/// A chat name for a log line: the name itself, or `chat-` and 8 hex digits of a stable hash
/// (FNV-1a, the same on every run and machine) when `logging.redact_chat_names` is on. The hash
/// lets lines about one chat be correlated; it is not a secret (a known name can be hashed and
/// compared), so it hides names from readers of the logs, not from someone guessing them.
pub fn chat(name: &str) -> ChatName<'_> {
    ChatName(name)
}

/// See [`chat`].
#[derive(Debug, Clone, Copy)]
pub struct ChatName<'a>(&'a str);

impl ChatName<'_> {
    /// The redacted form, whatever the setting.
    pub fn redacted(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.0.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("chat-{:08x}", hash >> 32)
    }
}

impl fmt::Display for ChatName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if REDACT_CHAT_NAMES.load(Ordering::Relaxed) {
            f.write_str(&self.redacted())
        } else {
            f.write_str(self.0)
        }
    }
}

type BoxedLayer = Box<
    dyn Layer<tracing_subscriber::layer::Layered<reload::Layer<EnvFilter, Registry>, Registry>>
        + Send
        + Sync,
>;

/// A formatting layer writing to `writer` in `format`.
fn fmt_layer<W>(writer: W, format: LogFormat, ansi: bool) -> BoxedLayer
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Text => layer.with_ansi(ansi).boxed(),
        // One object per line; the event's fields at the top level next to `message`.
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
    }
}

/// Swaps the log filter live (on a config reload of `logging.level`).
pub type LevelHandle = reload::Handle<EnvFilter, Registry>;

/// Keeps the file writer alive; dropping it flushes buffered lines.
pub struct LogGuard {
    _file: Option<WorkerGuard>,
    /// The live filter handle.
    pub level: LevelHandle,
}

/// A writer to the day's log file; reopens on a local date change and prunes old files.
pub struct DailyFile {
    dir: PathBuf,
    prefix: String,
    retention_days: u32,
    date: Option<NaiveDate>,
    file: Option<File>,
}

impl DailyFile {
    /// Creates the directory and opens today's file.
    #[allow(
        clippy::disallowed_methods,
        reason = "log files are set up at start, before the runtime serves anything"
    )]
    pub fn new(dir: &Path, prefix: &str, retention_days: u32) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let mut daily = Self {
            dir: dir.to_owned(),
            prefix: prefix.to_owned(),
            retention_days,
            date: None,
            file: None,
        };
        daily.roll(Local::now().date_naive())?;
        Ok(daily)
    }

    /// The file name for a date: `<prefix>_YYYYMMDD.log`.
    pub fn file_name(prefix: &str, date: NaiveDate) -> String {
        format!("{prefix}_{}.log", date.format("%Y%m%d"))
    }

    fn roll(&mut self, today: NaiveDate) -> io::Result<()> {
        let path = self.dir.join(Self::file_name(&self.prefix, today));
        self.file = Some(OpenOptions::new().create(true).append(true).open(path)?);
        self.date = Some(today);
        prune(&self.dir, &self.prefix, today, self.retention_days);
        Ok(())
    }
}

/// Deletes `<prefix>_YYYYMMDD.log` files older than `retention_days` before `today`.
#[allow(
    clippy::disallowed_methods,
    reason = "runs from the log writer (a blocking writer by nature), once a day"
)]
pub fn prune(dir: &Path, prefix: &str, today: NaiveDate, retention_days: u32) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let oldest_kept = today - chrono::Days::new(u64::from(retention_days.saturating_sub(1)));
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(date) = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('_'))
            .and_then(|rest| rest.strip_suffix(".log"))
            .and_then(|digits| NaiveDate::parse_from_str(digits, "%Y%m%d").ok())
        else {
            continue;
        };
        if date < oldest_kept {
            let _ = fs::remove_file(entry.path());
        }
    }
}

impl Write for DailyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let today = Local::now().date_naive();
        if self.date != Some(today) {
            self.roll(today)?;
        }
        match &mut self.file {
            Some(file) => file.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(file) => file.flush(),
            None => Ok(()),
        }
    }
}

/// Installs the global subscriber: stderr always, the daily file when `file` is given, both in
/// `file`'s `logging.format` (text without a config). Also applies `logging.redact_chat_names`.
pub fn init(level: &str, file: Option<&LoggingConfig>) -> io::Result<LogGuard> {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let format = file.map_or(LogFormat::Text, |logging| logging.format);
    set_redact_chat_names(file.is_some_and(|logging| logging.redact_chat_names));
    // Colours only for a terminal: redirected stderr (systemd, files, CI) stays plain text.
    let stderr = fmt_layer(
        || crate::secret::RedactingWriter(io::stderr()),
        format,
        io::IsTerminal::is_terminal(&io::stderr()),
    );
    let (file_layer, guard) = match file {
        Some(logging) => {
            let daily = DailyFile::new(&logging.dir, &logging.file_prefix, logging.retention_days)?;
            let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(false)
                .buffered_lines_limit(FILE_LOG_BUFFERED_LINES)
                .finish(daily);
            let writer = move || crate::secret::RedactingWriter(writer.clone());
            (Some(fmt_layer(writer, format, false)), Some(guard))
        }
        None => (None, None),
    };
    let layers: Vec<BoxedLayer> = std::iter::once(stderr).chain(file_layer).collect();
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(layers)
        .try_init();
    Ok(LogGuard {
        _file: guard,
        level: handle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_chat_names_are_short_stable_hashes() {
        let name = chat("测试群");
        let redacted = name.redacted();
        assert_eq!(redacted, chat("测试群").redacted());
        assert_ne!(redacted, chat("测试群2").redacted());
        assert_eq!(redacted.len(), "chat-".len() + 8);
        assert!(!redacted.contains("测试群"));
    }

    #[test]
    fn file_names_use_the_contract_format() {
        let date = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        assert_eq!(
            DailyFile::file_name("wxauto_mgt", date),
            "wxauto_mgt_20261129.log"
        );
    }

    #[test]
    fn prune_keeps_retention_days_and_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let today = NaiveDate::from_ymd_opt(2026, 11, 29).unwrap();
        for days_ago in 0..10u64 {
            let date = today - chrono::Days::new(days_ago);
            fs::write(dir.path().join(DailyFile::file_name("wx", date)), "x").unwrap();
        }
        fs::write(dir.path().join("health_report.json"), "{}").unwrap();
        fs::write(dir.path().join("other_20200101.log"), "x").unwrap();
        prune(dir.path(), "wx", today, 7);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left.len(), 7 + 2, "{left:?}");
        assert!(left.contains(&"wx_20261123.log".to_owned()));
        assert!(!left.contains(&"wx_20261122.log".to_owned()));
        assert!(left.contains(&"other_20200101.log".to_owned()));
    }

    #[test]
    fn daily_file_appends_to_todays_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut daily = DailyFile::new(dir.path(), "wx", 7).unwrap();
        daily.write_all(b"line one\n").unwrap();
        daily.flush().unwrap();
        let name = DailyFile::file_name("wx", Local::now().date_naive());
        let text = fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(text, "line one\n");
    }
}
