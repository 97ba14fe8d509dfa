//! The config file watcher: it only *signals* (`on_change`) that the config or a key file may
//! have changed; the caller reloads, and compares `Config.source.hash` to skip no-op reloads.
//!
//! Watches each file's parent directory (never the inode; canonicalized, so a relative path
//! matches the absolute paths events carry), debounces bursts, and runs a content
//! hash poll as a safety net for filesystems and mounts that deliver no events (conventions §7).

#[cfg(test)]
mod tests;

use std::ffi::OsStr;
use std::future::pending;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{Event, EventKind, PollWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::fnv1a64;

/// A trailing debounce never holds a signal back longer than this many debounce periods, so a
/// file rewritten continuously still gets reloaded.
const MAX_DEBOUNCE_FACTOR: u32 = 10;

/// The hash poll never runs more often than this, whatever `WatchOptions::poll_interval` says.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A watcher failing again within this long counts as the same trouble: the recreate delay
/// keeps doubling (up to 64 times `recreate_delay`) instead of starting over.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// Knobs of the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// Quiet time after the last relevant event before `on_change` is called (default 500ms).
    pub debounce: Duration,
    /// Period of the content-hash poll that catches changes without events (default 30s).
    pub poll_interval: Duration,
    /// Scan the directory instead of using the platform's events (`--watch poll`): for network
    /// drives, WSL paths and filesystems that deliver no events.
    pub poll_only: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(500),
            poll_interval: Duration::from_secs(30),
            poll_only: false,
        }
    }
}

/// Controls a running watcher; dropping it keeps the watcher running on its last file list
/// (cancel the token to stop it).
#[derive(Debug)]
pub struct WatchHandle {
    files: watch::Sender<Vec<PathBuf>>,
}

// === impl WatchHandle ===

impl WatchHandle {
    /// Re-targets the watch, e.g. after a reload: the config file plus its referenced key files.
    /// The content hash restarts from these files, so setting them does not signal by itself.
    pub fn set_files(&self, files: Vec<PathBuf>) {
        self.files.send_replace(files);
    }
}

/// Starts watching `files` on the current tokio runtime (panics outside one, like
/// `tokio::spawn`). `on_change` is called from a tokio task, so it must not block (send on a
/// channel): after each debounced burst of relevant events, each time the hash poll sees
/// different content, and once after the watcher had to be recreated. It may be called when
/// nothing changed (spurious events, touch): the caller compares `Config.source.hash`.
///
/// The files are hashed once (on tokio's blocking pool) before this returns, so any change
/// after it is caught.
pub async fn spawn(
    files: Vec<PathBuf>,
    options: WatchOptions,
    on_change: Arc<dyn Fn() + Send + Sync>,
    cancel: CancellationToken,
) -> WatchHandle {
    tracing::info!(
        mode = if options.poll_only { "poll" } else { "native" },
        files = files.len(),
        "Watching the configuration."
    );
    let tuning = Tuning {
        backend: if options.poll_only {
            Backend::Poll
        } else {
            Backend::Native
        },
        ..Tuning::default()
    };
    spawn_with(files, options, tuning, on_change, cancel)
        .await
        .0
}

/// Where filesystem events come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    /// The platform watcher (inotify, FSEvents, ...), falling back to `Poll` when it cannot be
    /// created or runs out of watches.
    Native,
    /// notify's `PollWatcher` only.
    Poll,
    /// No event source at all: only the hash poll (tests of the poll fallback).
    #[cfg_attr(not(test), allow(dead_code))]
    Off,
}

/// Internal knobs, fixed in production and shortened in tests.
#[derive(Debug, Clone, Copy)]
struct Tuning {
    backend: Backend,
    /// Wait before recreating a failed watcher.
    recreate_delay: Duration,
    /// Scan period of the `PollWatcher` fallback (directories only, so cheap).
    poll_watcher_interval: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            backend: Backend::Native,
            recreate_delay: Duration::from_secs(5),
            poll_watcher_interval: Duration::from_secs(2),
        }
    }
}

/// What notify's callback thread forwards into the watcher task.
type EventSender = mpsc::UnboundedSender<notify::Result<Event>>;

/// `spawn`, with internal knobs; also returns the event sender so tests can inject events.
async fn spawn_with(
    files: Vec<PathBuf>,
    options: WatchOptions,
    tuning: Tuning,
    on_change: Arc<dyn Fn() + Send + Sync>,
    cancel: CancellationToken,
) -> (WatchHandle, EventSender) {
    let (files_tx, files_rx) = watch::channel(files.clone());
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    // Hashed before returning, not in the task, so that a change made right after `spawn`
    // returns is a change. Should the blocking pool fail, 0 makes the first check signal: a
    // reload of unchanged files is a no-op.
    let last_hash = hash_files(&files).await.unwrap_or(0);
    let task = Task {
        targets: Targets::new(&files),
        files,
        options,
        tuning,
        on_change,
        events_tx: events_tx.clone(),
        watcher: None,
        armed: false,
        warned_unarmed: false,
        failures: 0,
        last_failure: None,
        last_hash,
    };
    tokio::spawn(task.run(events_rx, files_rx, cancel));
    (WatchHandle { files: files_tx }, events_tx)
}

/// The watcher task's state.
struct Task {
    files: Vec<PathBuf>,
    targets: Targets,
    options: WatchOptions,
    tuning: Tuning,
    on_change: Arc<dyn Fn() + Send + Sync>,
    events_tx: EventSender,
    watcher: Option<Box<dyn Watcher + Send>>,
    /// Every target directory is watched.
    armed: bool,
    /// "Cannot watch" was logged at WARN; repeats go to DEBUG until the watch is armed again.
    warned_unarmed: bool,
    /// Recent watcher failures, for the recreate backoff: a `PollWatcher` whose directory is
    /// gone reports an error on every scan, and each recreation signals speculatively.
    failures: u32,
    last_failure: Option<Instant>,
    /// Content hash at the last signal (or at the last `set_files`).
    last_hash: u64,
}

/// A burst of relevant events waiting for quiet.
#[derive(Debug, Clone, Copy)]
struct Burst {
    first: Instant,
    due: Instant,
}

// === impl Task ===

impl Task {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<notify::Result<Event>>,
        mut files: watch::Receiver<Vec<PathBuf>>,
        cancel: CancellationToken,
    ) {
        self.rearm().await;
        // `spawn` hashed the files before the watch was armed; a change in between made no
        // event (conventions §6, startup race).
        if hash_files(&self.files)
            .await
            .is_some_and(|hash| hash != self.last_hash)
        {
            self.signal("changed while arming").await;
        }
        // `interval` panics on a zero period.
        let period = self.options.poll_interval.max(MIN_POLL_INTERVAL);
        let mut poll = tokio::time::interval_at(Instant::now() + period, period);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut burst: Option<Burst> = None;
        let mut recreate_at: Option<Instant> = None;
        let mut files_open = true;

        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                // Never `None`: the task holds a sender for the watchers it creates.
                Some(event) = events.recv() => match event {
                    Ok(event) => {
                        if self.targets.lost_dir(&event) {
                            // The directory itself went away: its watch is dead.
                            debug!(paths = ?event.paths, "Watched config directory moved or removed.");
                            recreate_at.get_or_insert(Instant::now() + self.tuning.recreate_delay);
                        }
                        if self.targets.relevant(&event) {
                            debug!(kind = ?event.kind, paths = ?event.paths, "Config file event.");
                            burst = Some(self.extend(burst));
                        }
                    }
                    Err(err) if recreate_at.is_none() => {
                        let delay = self.failure_delay();
                        warn!(error = %err, retry_in = ?delay, "Config file watcher failed; recreating it.");
                        discard(self.watcher.take());
                        self.armed = false;
                        recreate_at = Some(Instant::now() + delay);
                    }
                    Err(err) => {
                        // Stragglers from the watcher already being replaced.
                        debug!(error = %err, "Config file watcher error while recreating it.");
                    }
                },
                () = sleep_until(burst.map(|burst| burst.due)) => {
                    burst = None;
                    self.signal("file event").await;
                }
                () = sleep_until(recreate_at) => {
                    recreate_at = None;
                    self.rearm().await;
                    // Events may have been lost while the watcher was down.
                    self.signal("watcher recreated").await;
                }
                _ = poll.tick() => {
                    if !self.armed {
                        // A directory that did not exist may exist now.
                        self.rearm().await;
                    }
                    // A pending burst signals soon anyway; polling now would signal twice.
                    if burst.is_none() {
                        let hash = hash_files(&self.files).await;
                        if hash.is_some_and(|hash| hash != self.last_hash) {
                            self.signal("content hash poll").await;
                        }
                    }
                }
                changed = files.changed(), if files_open => {
                    if changed.is_err() {
                        // The handle was dropped: keep watching the current files.
                        files_open = false;
                        continue;
                    }
                    let new_files = files.borrow_and_update().clone();
                    self.retarget(new_files).await;
                }
            }
        }
        discard(self.watcher.take());
        debug!("Config file watcher stopped.");
    }

    /// Adds an event to the current burst (or starts one): due after `debounce` of quiet, but
    /// no later than `MAX_DEBOUNCE_FACTOR` debounce periods after the burst began.
    fn extend(&self, burst: Option<Burst>) -> Burst {
        let now = Instant::now();
        let first = burst.map_or(now, |burst| burst.first);
        let latest = first + self.options.debounce * MAX_DEBOUNCE_FACTOR;
        Burst {
            first,
            due: (now + self.options.debounce).min(latest),
        }
    }

    /// How long to wait before recreating a failed watcher: doubling while failures repeat.
    fn failure_delay(&mut self) -> Duration {
        let now = Instant::now();
        if self
            .last_failure
            .is_some_and(|at| now.duration_since(at) > FAILURE_MEMORY)
        {
            self.failures = 0;
        }
        self.last_failure = Some(now);
        let delay = self.tuning.recreate_delay * 2u32.pow(self.failures.min(6));
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Calls `on_change`, remembering the content it was called for.
    async fn signal(&mut self, reason: &str) {
        if let Some(hash) = hash_files(&self.files).await {
            self.last_hash = hash;
        }
        debug!(reason, "Config files may have changed.");
        (self.on_change)();
    }

    async fn retarget(&mut self, files: Vec<PathBuf>) {
        let targets = Targets::new(&files);
        let same_dirs = targets.dirs() == self.targets.dirs();
        self.files = files;
        self.targets = targets;
        if let Some(hash) = hash_files(&self.files).await {
            self.last_hash = hash;
        }
        if !same_dirs || !self.armed {
            self.rearm().await;
        }
    }

    /// (Re)creates the watcher on the current directories, off the runtime's threads: creating
    /// one spawns a thread, and `PollWatcher` scans each directory once up front.
    async fn rearm(&mut self) {
        // Stop the old watcher before arming the new one, so they rarely overlap; an overlap
        // only adds duplicate events to a burst.
        discard(self.watcher.take());
        if !self.armed {
            // A directory that was missing may exist now, under its canonical name.
            self.targets = Targets::new(&self.files);
        }
        let dirs = self.targets.dirs();
        let events = self.events_tx.clone();
        let tuning = self.tuning;
        let built =
            tokio::task::spawn_blocking(move || build_watcher(tuning, &dirs, &events)).await;
        match built {
            Ok((watcher, failures)) => {
                self.armed = failures.is_empty();
                for (dir, err) in failures {
                    let dir = dir.display();
                    if self.warned_unarmed {
                        debug!(%dir, error = %err, "Still cannot watch config directory.");
                    } else {
                        warn!(
                            %dir,
                            error = %err,
                            "Cannot watch config directory; relying on the content hash poll."
                        );
                    }
                }
                self.warned_unarmed = !self.armed;
                self.watcher = watcher;
            }
            Err(err) => {
                warn!(error = %err, "Config watcher setup panicked; relying on the content hash poll.");
                self.armed = false;
            }
        }
    }
}

/// A new watcher (if any could be created) and the directories it could not watch.
type Built = (
    Option<Box<dyn Watcher + Send>>,
    Vec<(PathBuf, notify::Error)>,
);

/// Creates a watcher for `dirs` and returns it with the directories it could not watch.
fn build_watcher(tuning: Tuning, dirs: &[PathBuf], events: &EventSender) -> Built {
    let poll_watcher = || -> notify::Result<Box<dyn Watcher + Send>> {
        // PollWatcher compares mtimes in whole seconds: two saves within one second (an editor's
        // write then rename) would look unchanged. Comparing contents fixes that; it only scans
        // the config's directory, and only when the native watcher is unavailable.
        let config = notify::Config::default()
            .with_poll_interval(tuning.poll_watcher_interval)
            .with_compare_contents(true);
        Ok(Box::new(PollWatcher::new(forward(events), config)?))
    };
    let watcher = match tuning.backend {
        Backend::Off => return (None, Vec::new()),
        Backend::Poll => poll_watcher(),
        Backend::Native => match notify::recommended_watcher(forward(events)) {
            Ok(watcher) => Ok(Box::new(watcher) as Box<dyn Watcher + Send>),
            Err(err) => {
                warn!(error = %err, "Cannot create the native file watcher; polling instead.");
                poll_watcher()
            }
        },
    };
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(err) => {
            let failures = dirs
                .iter()
                .map(|dir| (dir.clone(), clone_error(&err)))
                .collect();
            return (None, failures);
        }
    };
    let mut failures = watch_dirs(watcher.as_mut(), dirs);
    let out_of_watches = failures
        .iter()
        .any(|(_, err)| matches!(err.kind, notify::ErrorKind::MaxFilesWatch));
    if tuning.backend == Backend::Native && out_of_watches {
        // inotify watches are a per-user budget shared by every container on the host.
        warn!("Out of native file watches; polling the config directories instead.");
        match poll_watcher() {
            Ok(mut poll) => {
                failures = watch_dirs(poll.as_mut(), dirs);
                watcher = poll;
            }
            Err(err) => warn!(error = %err, "Cannot create the polling file watcher."),
        }
    }
    (Some(watcher), failures)
}

fn watch_dirs(watcher: &mut dyn Watcher, dirs: &[PathBuf]) -> Vec<(PathBuf, notify::Error)> {
    dirs.iter()
        .filter_map(|dir| {
            let res = watcher.watch(dir, RecursiveMode::NonRecursive);
            res.err().map(|err| (dir.clone(), err))
        })
        .collect()
}

/// Drops a watcher on the blocking pool: notify's inotify watcher panics in `drop` if its event
/// thread has died, and that must not take the watcher task down with it.
fn discard(watcher: Option<Box<dyn Watcher + Send>>) {
    if let Some(watcher) = watcher {
        drop(tokio::task::spawn_blocking(move || drop(watcher)));
    }
}

/// notify's callback runs on notify's own thread: hand each event to the task without blocking.
fn forward(events: &EventSender) -> impl FnMut(notify::Result<Event>) + Send + 'static {
    let events = events.clone();
    move |event| {
        // Fails only once the task is gone, when nobody needs the event.
        let _ = events.send(event);
    }
}

/// `notify::Error` is not `Clone`; keep what a log line needs.
fn clone_error(err: &notify::Error) -> notify::Error {
    notify::Error::generic(&err.to_string())
}

/// Sleeps until `at`, or forever when there is nothing to wait for.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => pending().await,
    }
}

/// A content hash of `files`, read on tokio's blocking pool; `None` only if that panicked.
async fn hash_files(files: &[PathBuf]) -> Option<u64> {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || hash_files_now(&files))
        .await
        .ok()
}

/// A content hash of `files`: paths, and each file's bytes or "absent". Symlinks are followed,
/// so a ConfigMap `..data` swap changes it.
#[allow(
    clippy::disallowed_methods,
    reason = "runs on tokio's blocking pool (`hash_files`)"
)]
fn hash_files_now(files: &[PathBuf]) -> u64 {
    let mut parts: Vec<Vec<u8>> = Vec::with_capacity(files.len() * 3);
    for file in files {
        parts.push(file.as_os_str().as_encoded_bytes().to_vec());
        match std::fs::read(file) {
            Ok(bytes) => {
                parts.push(b"present".to_vec());
                parts.push(bytes);
            }
            Err(_) => parts.push(b"absent".to_vec()),
        }
    }
    let parts: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    fnv1a64(&parts)
}

/// The watched directories and, per directory, the file names that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Targets {
    dirs: Vec<(PathBuf, Vec<PathBuf>)>,
}

// === impl Targets ===

impl Targets {
    fn new(files: &[PathBuf]) -> Self {
        let mut dirs: Vec<(PathBuf, Vec<PathBuf>)> = Vec::new();
        for file in files {
            let Some(name) = file.file_name() else {
                warn!(path = %file.display(), "Not a file path; not watching it.");
                continue;
            };
            // `config.yaml` has the empty parent: the working directory.
            let dir = match file.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => parent,
                _ => Path::new("."),
            };
            let dir = canonical_dir(dir);
            match dirs.iter_mut().find(|(known, _)| *known == dir) {
                Some((_, names)) => names.push(PathBuf::from(name)),
                None => dirs.push((dir, vec![PathBuf::from(name)])),
            }
        }
        Self { dirs }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(dir, _)| dir.clone()).collect()
    }

    /// Whether `event` may mean a watched file changed: it names a watched file, any `..*`
    /// entry of a watched directory (the ConfigMap `..data` symlink swap never names the file
    /// itself), or the directory itself; or it carries no path / asks for a rescan (overflow).
    fn relevant(&self, event: &Event) -> bool {
        if let EventKind::Access(access) = event.kind {
            // Opening and reading (our own hashing, the reload itself) change nothing; only a
            // writer closing the file does.
            return matches!(access, AccessKind::Close(AccessMode::Write))
                && event.paths.iter().any(|path| self.names(path));
        }
        if event.need_rescan() || event.paths.is_empty() {
            return true;
        }
        event.paths.iter().any(|path| self.names(path))
    }

    fn names(&self, path: &Path) -> bool {
        self.dirs.iter().any(|(dir, names)| {
            if path == dir {
                return true;
            }
            if path.parent() != Some(dir.as_path()) {
                return false;
            }
            path.file_name().is_some_and(|name| {
                names.iter().any(|known| known.as_os_str() == name) || is_dot_dot_entry(name)
            })
        })
    }

    /// Whether `event` says a watched directory itself was removed or renamed.
    fn lost_dir(&self, event: &Event) -> bool {
        matches!(
            event.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        ) && event
            .paths
            .iter()
            .any(|path| self.dirs.iter().any(|(dir, _)| path == dir))
    }
}

/// `dir` as the platform watcher reports paths under it: canonical (absolute, symlinks and `..`
/// resolved), because notify joins event names onto the absolute form of the watched path (and
/// FSEvents reports resolved paths), so a relative `--config my-config.yaml` would otherwise
/// never match an event. A directory that does not exist (yet) is made absolute against the
/// working directory; `Task::rearm` canonicalizes again once it can be watched.
fn canonical_dir(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf())
}

/// `..data`, `..2026_11_29_14_00_00.123`: the entries Kubernetes swaps in a ConfigMap volume.
fn is_dot_dot_entry(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b"..") && name != ".."
}
