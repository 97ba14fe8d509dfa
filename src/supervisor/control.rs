//! The supervisor's vocabulary: the closed set of `Control` events, who asked for a reload
//! and what it reports, the config loader and the config subscribers.

use std::sync::Arc;

use tokio::sync::oneshot;

use crate::config::{Config, ConfigDiff, ConfigErrors, Loaded};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSource {
    /// The file watcher or its periodic poll.
    Watcher,
    /// SIGHUP.
    Signal,
    /// `POST /-/reload` or `POST /api/v1/reload`.
    Http,
}

impl ReloadSource {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Watcher => "watcher",
            Self::Signal => "signal",
            Self::Http => "http",
        }
    }
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// False when the content hash was unchanged and nothing was applied.
    pub changed: bool,
    /// One line saying what changed (never secrets).
    pub summary: String,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Every event the supervisor reacts to.
#[derive(Debug)]
pub enum Control {
    /// Load the config again and apply the difference.
    Reload {
        /// Who asked.
        source: ReloadSource,
        /// Where the answer goes, if anyone waits.
        respond: Option<oneshot::Sender<Result<ReloadReport, Vec<String>>>>,
    },
    /// Stop and start the listener service.
    Restart {
        /// Where the answer goes, if anyone waits.
        respond: Option<oneshot::Sender<()>>,
    },
    /// An instance task ended without being asked to.
    TaskExited {
        /// The instance.
        instance_id: String,
        /// Which incarnation ended (stale events are ignored).
        generation: u64,
        /// What happened.
        reason: String,
    },
    /// The backoff after a crash elapsed: start the task again.
    RestartTask {
        /// The instance.
        instance_id: String,
        /// The incarnation that crashed.
        generation: u64,
    },
}

/// Loads the config (from its file, or a built-in one).
pub type ConfigLoader = Box<dyn Fn() -> Result<Loaded, ConfigErrors> + Send + Sync>;

/// Called after every applied config (startup included) with the new config and the diff.
pub type ConfigSubscriber = Box<dyn Fn(&Arc<Config>, &ConfigDiff) + Send + Sync>;
