//! The Windows service mode (`service install|uninstall|run`): what the Service Control
//! Manager's requests mean for the sidecar, and the command line a service is installed with.
//!
//! The platform-neutral part lives here so it is compiled and tested everywhere; `scm` (Windows
//! only) talks to the Service Control Manager through the `windows-service` crate. The service
//! runs the normal sidecar: an SCM stop or system shutdown cancels the same token a first
//! Ctrl-C would, so it takes the graceful shutdown path (finish calls in flight, flush the
//! store, close HTTP) within the grace period.

#[cfg(windows)]
mod scm;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

#[cfg(windows)]
pub use scm::{install, run_dispatcher, uninstall};

/// The default service name (`--name`).
pub const DEFAULT_NAME: &str = "wxauto-sidecar";

/// How long the SCM is told a stop may take: the shutdown grace plus time to flush and exit.
pub const STOP_WAIT_HINT: Duration = Duration::from_secs(crate::app::DEFAULT_GRACE.as_secs() + 10);

/// What the service runs: the sidecar with this config, until the token fires; returns the
/// process exit code (0, 1 invalid config, 2 runtime failure).
pub type ServiceBody = Box<dyn FnOnce(PathBuf, CancellationToken) -> u8 + Send>;

/// A request from the Service Control Manager, as far as the sidecar cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `sc stop`, the Services console's Stop, `net stop`.
    Stop,
    /// The system is shutting down.
    Shutdown,
    /// The SCM asks for the current status.
    Interrogate,
    /// Anything else (pause, parameter change, ...): not supported.
    Other,
}

/// How the control handler answers a `Request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// The graceful shutdown has begun; report `StopPending`.
    Stopping,
    /// Nothing to do beyond answering.
    Handled,
    /// Not supported (the SCM is told `ERROR_CALL_NOT_IMPLEMENTED`).
    NotImplemented,
}

/// Maps an SCM request onto the sidecar: stop and shutdown start the graceful shutdown by
/// cancelling `shutdown` (the token `app::run` waits on). Repeated stops are harmless.
pub fn respond(request: Request, shutdown: &CancellationToken) -> Response {
    match request {
        Request::Stop | Request::Shutdown => {
            shutdown.cancel();
            Response::Stopping
        }
        Request::Interrogate => Response::Handled,
        Request::Other => Response::NotImplemented,
    }
}

/// The arguments the SCM starts the executable with: `service run --config <abs> --name <name>`.
pub fn launch_arguments(name: &str, config: &Path) -> Vec<OsString> {
    vec![
        "service".into(),
        "run".into(),
        "--config".into(),
        config.as_os_str().to_owned(),
        "--name".into(),
        name.into(),
    ]
}

/// The config path to store at install time: absolute (a service starts in
/// `C:\Windows\System32`), and the file must exist.
#[allow(
    clippy::disallowed_methods,
    reason = "the `service install` command, no runtime"
)]
pub fn absolute_config(config: &Path) -> Result<PathBuf, ServiceError> {
    let absolute = std::path::absolute(config).map_err(|source| ServiceError::Config {
        path: config.to_path_buf(),
        source,
    })?;
    match std::fs::metadata(&absolute) {
        Ok(meta) if meta.is_file() => Ok(absolute),
        Ok(_) => Err(ServiceError::Config {
            path: absolute,
            source: std::io::Error::other("not a file"),
        }),
        Err(source) => Err(ServiceError::Config {
            path: absolute,
            source,
        }),
    }
}

/// The working directory of the running service: the config file's directory, so the default
/// relative paths (`data/wxauto-sidecar.db`, `data/logs`) land beside the config, e.g. in
/// `%ProgramData%\wxauto-sidecar\data`, instead of `C:\Windows\System32\data`.
pub fn working_dir(config: &Path) -> Option<&Path> {
    config.parent().filter(|dir| !dir.as_os_str().is_empty())
}

/// The file, beside the config, where the service writes why the sidecar could not start or
/// stopped with a failure (a service has no console for the errors `run` prints): every panic
/// as it happens, then the exit code and the text `run` would print. Removed at the next start,
/// so it only ever describes the last run.
pub const FAILURE_FILE: &str = "service-error.log";

/// Where `FAILURE_FILE` goes for this config.
pub fn failure_file(config: &Path) -> PathBuf {
    working_dir(config).map_or_else(|| PathBuf::from(FAILURE_FILE), |dir| dir.join(FAILURE_FILE))
}

/// Removes a failure file left by an earlier run; a missing file is fine.
#[allow(
    clippy::disallowed_methods,
    reason = "the service thread, before the sidecar's runtime starts"
)]
pub fn clear_failure(config: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(failure_file(config)) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Appends why the sidecar ended with `code`: a first line with the time and the code, then
/// `message` as `run` would print it (config errors name file, line and field; no secrets).
/// Appended, so the panics `record_panics` wrote during the run stay above it.
pub fn record_failure(config: &Path, code: u8, message: &str) -> std::io::Result<PathBuf> {
    let path = failure_file(config);
    let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S%:z");
    let meaning = match code {
        1 => "invalid configuration",
        _ => "runtime failure",
    };
    append(
        &path,
        &format!(
            "{now} the service stopped with exit code {code} ({meaning})\n{}\n",
            message.trim_end()
        ),
    )?;
    Ok(path)
}

/// From now on, every panic in this process (any thread) is also appended to the failure file
/// for `config`: the time, the thread's name, where it happened and its message, passed
/// through `secret::redact`. The hook installed before runs after it (the default one prints
/// to stderr, which a service does not have). A panic the sidecar recovers from (an instance
/// actor it restarts) is recorded too: each is a bug worth reporting.
pub fn record_panics(config: &Path) {
    let path = failure_file(config);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Best effort: a panic hook has nowhere to report its own failure.
        let _ = append(&path, &panic_entry(info));
        previous(info);
    }));
}

/// One panic as the failure file shows it: `<time> panic in thread '<name>' at <file:line:col>`,
/// then the message; secrets redacted.
fn panic_entry(info: &std::panic::PanicHookInfo<'_>) -> String {
    let now = chrono::Local::now().format("%Y-%m-%d %H:%M:%S%:z");
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let location = info
        .location()
        .map_or_else(|| "an unknown location".to_owned(), ToString::to_string);
    let message = info
        .payload_as_str()
        .unwrap_or("(the panic's payload is not text)");
    crate::secret::redact(&format!(
        "{now} panic in thread '{name}' at {location}\n{}\n",
        message.trim_end()
    ))
}

/// Appends `text` to `path`, creating it. Blocking, and called where that is fine: the service
/// thread once the runtime ended, and the panic hook (a panic on a runtime worker has stopped
/// that task already).
fn append(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Why a `service` command failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The config path given to `install` or `run` is unusable.
    #[error("config file {}: {source}", path.display())]
    Config {
        /// The path as resolved.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A Service Control Manager call failed.
    #[cfg(windows)]
    #[error("cannot {action}: {source}")]
    Scm {
        /// What was attempted, e.g. "create the service".
        action: &'static str,
        /// The Windows error.
        #[source]
        source: windows_service::Error,
    },
    /// `service run` was not started by the Service Control Manager.
    #[cfg(windows)]
    #[error(
        "`service run` is started by the Service Control Manager (`sc start NAME`); to run in a console use `run --config FILE`"
    )]
    NotAService,
    /// The sidecar inside the service ended with a failure exit code.
    #[error("the sidecar stopped with exit code {0}")]
    Exited(u8),
}

impl ServiceError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config { .. } => 1,
            Self::Exited(code) => *code,
            #[cfg(windows)]
            Self::Scm { .. } | Self::NotAService => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::REDACTED;

    #[test]
    fn stop_and_shutdown_start_the_graceful_shutdown() {
        for request in [Request::Stop, Request::Shutdown] {
            let token = CancellationToken::new();
            assert_eq!(respond(request, &token), Response::Stopping);
            assert!(token.is_cancelled(), "{request:?} must cancel");
            // A second stop while stopping is answered the same way.
            assert_eq!(respond(request, &token), Response::Stopping);
        }
    }

    #[test]
    fn other_requests_leave_the_sidecar_running() {
        let token = CancellationToken::new();
        assert_eq!(respond(Request::Interrogate, &token), Response::Handled);
        assert_eq!(respond(Request::Other, &token), Response::NotImplemented);
        assert!(!token.is_cancelled());
    }

    #[tokio::test]
    async fn a_stop_ends_a_sidecar_waiting_on_the_token() {
        // The token is the one `app::run` waits on: a stop wakes the waiter at once.
        let token = CancellationToken::new();
        let waiter = tokio::spawn({
            let token = token.clone();
            async move { token.cancelled().await }
        });
        assert_eq!(respond(Request::Stop, &token), Response::Stopping);
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken")
            .expect("joined");
    }

    #[test]
    fn the_installed_command_line_runs_the_service_with_an_absolute_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, "instances: []\n").expect("write");
        let absolute = absolute_config(&config).expect("absolute");
        assert!(absolute.is_absolute());
        let args = launch_arguments("wx", &absolute);
        assert_eq!(
            args,
            [
                OsString::from("service"),
                "run".into(),
                "--config".into(),
                absolute.clone().into_os_string(),
                "--name".into(),
                "wx".into(),
            ]
        );
        assert_eq!(working_dir(&absolute), Some(dir.path()));
    }

    #[test]
    fn a_missing_or_non_file_config_is_refused_at_install() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = absolute_config(&dir.path().join("nope.yaml")).expect_err("missing");
        assert_eq!(missing.exit_code(), 1);
        assert!(missing.to_string().contains("nope.yaml"), "{missing}");
        let not_file = absolute_config(dir.path()).expect_err("a directory");
        assert!(not_file.to_string().contains("not a file"), "{not_file}");
    }

    #[test]
    fn a_failure_is_recorded_beside_the_config_and_cleared_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, "instances: []\n").unwrap();
        clear_failure(&config).expect("nothing to clear is fine");
        let message = "config.yaml:3:18: listener.poll_interval: invalid duration \"fast\"\n";
        let path = record_failure(&config, 1, message).unwrap();
        assert_eq!(path, dir.path().join(FAILURE_FILE));
        let text = std::fs::read_to_string(&path).unwrap();
        let (first, rest) = text.split_once('\n').unwrap();
        assert!(
            first.ends_with("the service stopped with exit code 1 (invalid configuration)"),
            "{first}"
        );
        assert_eq!(rest, message);
        clear_failure(&config).unwrap();
        assert!(!path.exists(), "a new start removes the last run's failure");
    }

    #[test]
    fn a_panic_in_any_thread_is_recorded_before_the_exit_line_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        let key = crate::secret::Secret::new("service-panic-test-key-7f3a");
        // The hook is process-wide: keep the one the harness had and put it back afterwards.
        // A panic of another test meanwhile may land in this file too; only ours is asserted.
        let harness = std::panic::take_hook();
        record_panics(&config);
        let line = line!() + 3;
        let panicked = std::thread::Builder::new()
            .name("sidecar".to_owned())
            .spawn(move || panic!("cannot reach wxauto with {}", key.expose()))
            .unwrap()
            .join();
        drop(std::panic::take_hook());
        std::panic::set_hook(harness);
        assert!(panicked.is_err(), "the thread panicked");
        record_failure(&config, 2, "wxauto-sidecar: the sidecar panicked").unwrap();

        let text = std::fs::read_to_string(failure_file(&config)).unwrap();
        let at = format!("panic in thread 'sidecar' at {}:{line}:", file!());
        let panic = text
            .find(&at)
            .unwrap_or_else(|| panic!("{at:?} in:\n{text}"));
        assert!(
            text[panic..].contains(&format!("\ncannot reach wxauto with {REDACTED}\n")),
            "the message, redacted:\n{text}"
        );
        assert!(!text.contains("service-panic-test-key-7f3a"), "{text}");
        let exit = text
            .find("the service stopped with exit code 2 (runtime failure)\nwxauto-sidecar: the sidecar panicked\n")
            .unwrap_or_else(|| panic!("the exit line in:\n{text}"));
        assert!(panic < exit, "the panic stays above the exit line:\n{text}");
    }

    #[test]
    fn the_stop_wait_hint_covers_the_grace_period() {
        assert!(STOP_WAIT_HINT > crate::app::DEFAULT_GRACE);
    }
}
