//! The validated `processes:` entries: external programs the sidecar starts and supervises.

use std::path::PathBuf;
use std::time::Duration;

use super::BackoffConfig;

/// One supervised process (`processes[]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// `[a-z0-9_-]{1,64}`, unique; the `process` metric label.
    pub name: String,
    /// The program: a bare name is looked up on `PATH` when the process starts.
    pub command: String,
    /// Arguments, passed as they are (no shell).
    pub args: Vec<String>,
    /// Working directory; the sidecar's when absent.
    pub cwd: Option<PathBuf>,
    /// Variables added to (or replacing in) the sidecar's environment, in file order.
    pub env: Vec<(String, String)>,
    /// When an exited process is started again.
    pub restart: RestartPolicy,
    /// Exit codes that count as success for `restart: on-failure` (default `[0]`).
    pub success_exit_codes: Vec<i32>,
    /// Delay before a restart: `initial`, doubled per consecutive restart up to `max`; reset
    /// once a run lasted 60 s.
    pub backoff: BackoffConfig,
    /// More than `max_starts` starts within `window` make the process fatal.
    pub crash_loop: CrashLoopConfig,
    /// The signal a stop sends to the process group (unix; Windows sends CTRL_BREAK).
    pub stop_signal: StopSignal,
    /// How long a stop waits before killing the whole group.
    pub stop_timeout: Duration,
    /// The wxauto instance this process serves, if any (validated to exist).
    pub instance: Option<String>,
}

impl ProcessConfig {
    /// Whether a change from `self` to `other` needs the running process to be restarted:
    /// what the process is built from (command, args, cwd, env) differs.
    pub fn needs_restart_for(&self, other: &Self) -> bool {
        self.command != other.command
            || self.args != other.args
            || self.cwd != other.cwd
            || self.env != other.env
    }
}

/// `restart:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Never restart; an exit leaves the process `exited`.
    Never,
    /// Restart unless the exit code is in `success_exit_codes`.
    OnFailure,
    /// Restart after every exit.
    Always,
}

impl RestartPolicy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::OnFailure => "on-failure",
            Self::Always => "always",
        }
    }
}

/// `crash_loop:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashLoopConfig {
    /// Starts allowed within `window` (at least 1).
    pub max_starts: u32,
    /// The sliding window.
    pub window: Duration,
}

/// `stop_signal:` (accepted with or without the `SIG` prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM (the default).
    Term,
    /// SIGINT.
    Int,
    /// SIGHUP.
    Hup,
    /// SIGQUIT.
    Quit,
    /// SIGKILL (no grace at all).
    Kill,
    /// SIGUSR1.
    Usr1,
    /// SIGUSR2.
    Usr2,
}

impl StopSignal {
    /// Every signal with its name, for parsing and messages.
    pub const ALL: [(Self, &'static str); 7] = [
        (Self::Term, "TERM"),
        (Self::Int, "INT"),
        (Self::Hup, "HUP"),
        (Self::Quit, "QUIT"),
        (Self::Kill, "KILL"),
        (Self::Usr1, "USR1"),
        (Self::Usr2, "USR2"),
    ];

    /// `TERM`, `INT`, ... or the same with a `SIG` prefix, any case.
    pub fn parse(text: &str) -> Option<Self> {
        let upper = text.trim().to_ascii_uppercase();
        let name = upper.strip_prefix("SIG").unwrap_or(&upper);
        Self::ALL
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(signal, _)| *signal)
    }

    /// The name without `SIG`.
    pub fn as_str(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(signal, _)| *signal == self)
            .map_or("TERM", |(_, name)| name)
    }
}
