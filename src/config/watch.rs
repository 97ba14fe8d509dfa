//! STUB (to be replaced by the real watcher): the config file watcher.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Watcher tuning.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Trailing debounce.
    pub debounce: Duration,
    /// Safety-net poll.
    pub poll_interval: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(500),
            poll_interval: Duration::from_secs(30),
        }
    }
}

/// Handle to re-target the watch.
#[derive(Debug, Clone)]
pub struct WatchHandle;

impl WatchHandle {
    /// Sets the watched files.
    pub fn set_files(&self, files: Vec<PathBuf>) {
        let _ = files;
    }
}

/// Starts watching.
pub fn spawn(
    files: Vec<PathBuf>,
    options: WatchOptions,
    on_change: Arc<dyn Fn() + Send + Sync>,
    cancel: CancellationToken,
) -> WatchHandle {
    let _ = (files, options, on_change, cancel);
    WatchHandle
}
