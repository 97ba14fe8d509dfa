//! Supervised external processes (`processes:`): the wxauto HTTP API server and other helpers
//! the sidecar starts, restarts, stops and measures, the way supervisord, pm2 and systemd do.
//!
//! - `Processes` is the handle: config changes (`apply`), API commands (`command`), the JSON
//!   views and `shutdown`. A manager task owns one actor per process (`child.rs`).
//! - `ProcessTable` is the shared, read-mostly state behind metrics, the API, the health
//!   document and the listener's "expected down" check; the monitor owns it.
//! - `policy.rs` decides restarts (backoff, crash loop); `unix.rs`/`windows.rs` own the process
//!   group or job; `output.rs` turns stdout/stderr into log lines; `collector.rs` the metrics.
//!
//! Invariant: every process runs in its own group (unix) or job (Windows), and every stop, kill
//! and exit is applied to the whole group, so no grandchild outlives its supervisor entry.

mod child;
pub mod collector;
mod output;
pub mod policy;
#[cfg(unix)]
mod unix;
#[cfg(windows)]
mod windows;

#[cfg(unix)]
use self::unix as sys;
#[cfg(windows)]
use self::windows as sys;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::clock::{format_uptime, rfc3339, unix_seconds};
use crate::config::{ProcessChange, ProcessConfig, process_changes};
use crate::metrics::process::ProcessCollector;

/// After a linked process (re)started, its instance may be down this long without recording a
/// new outage error.
pub const STARTUP_GRACE: Duration = Duration::from_secs(30);

/// A process's lifecycle state (the `state` label of `wxauto_process_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    /// Spawned less than a second ago.
    Starting,
    /// Up for at least a second.
    Running,
    /// Ended; waiting for the backoff delay before the next start.
    Backoff,
    /// Stopped on request (API, shutdown), or never started.
    Stopped,
    /// Ended, and the restart policy says not to start it again.
    Exited,
    /// Too many starts within the crash-loop window: given up until started by hand or its
    /// command changes.
    Fatal,
}

impl ProcessState {
    /// Every state, in label order.
    pub const ALL: [Self; 6] = [
        Self::Starting,
        Self::Running,
        Self::Backoff,
        Self::Stopped,
        Self::Exited,
        Self::Fatal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Backoff => "backoff",
            Self::Stopped => "stopped",
            Self::Exited => "exited",
            Self::Fatal => "fatal",
        }
    }
}

/// What `POST /api/v1/processes/{name}/{action}` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Start a stopped, exited or fatal process (history reset); a no-op when it runs.
    Start,
    /// Stop the whole group; no restart until started again.
    Stop,
    /// Stop (if running) and start again at once, history reset.
    Restart,
}

impl Action {
    /// `start`, `stop` or `restart`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "start" => Some(Self::Start),
            "stop" => Some(Self::Stop),
            "restart" => Some(Self::Restart),
            _ => None,
        }
    }
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcessError {
    /// No process of that name is configured.
    #[error("no process named {0:?}")]
    NotFound(String),
    /// The supervisor is shutting down.
    #[error("process supervision is shutting down")]
    Stopped,
}

/// The mutable part of one process's state, written by its actor.
#[derive(Debug, Clone)]
pub struct Status {
    /// Current state.
    pub state: ProcessState,
    /// The leader's pid while it runs.
    pub pid: Option<u32>,
    /// Starts after the first (automatic, manual and reload restarts).
    pub restarts: u64,
    /// The last exit code; a negative number is the signal that killed it (unix).
    pub last_exit_code: Option<i32>,
    /// When the current (or last) run started.
    pub start_time: Option<SystemTime>,
    /// Monotonic start of the current run, for uptime.
    pub started: Option<Instant>,
    /// The last spawn or stop failure, if any (no secrets: the command name and the OS error).
    pub last_error: Option<String>,
    /// `command` as configured.
    pub command: String,
    /// The linked instance.
    pub instance: Option<String>,
}

/// One supervised process in the table.
#[derive(Debug)]
pub struct Entry {
    name: String,
    status: Mutex<Status>,
    stdout_lines: AtomicU64,
    stderr_lines: AtomicU64,
    members: Mutex<Option<sys::Members>>,
}

impl Entry {
    fn new(config: &ProcessConfig) -> Self {
        Self {
            name: config.name.clone(),
            status: Mutex::new(Status {
                state: ProcessState::Stopped,
                pid: None,
                restarts: 0,
                last_exit_code: None,
                start_time: None,
                started: None,
                last_error: None,
                command: config.command.clone(),
                instance: config.instance.clone(),
            }),
            stdout_lines: AtomicU64::new(0),
            stderr_lines: AtomicU64::new(0),
            members: Mutex::new(None),
        }
    }

    /// The name (the `process` label).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A copy of the status.
    pub fn status(&self) -> Status {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, Status> {
        match self.status.lock() {
            Ok(status) => status,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Lines logged from stdout and stderr.
    pub fn log_lines(&self) -> (u64, u64) {
        (
            self.stdout_lines.load(Ordering::Relaxed),
            self.stderr_lines.load(Ordering::Relaxed),
        )
    }

    fn set_members(&self, members: Option<sys::Members>) {
        match self.members.lock() {
            Ok(mut slot) => *slot = members,
            Err(poisoned) => *poisoned.into_inner() = members,
        }
    }

    /// The live pids of the process group (empty when nothing runs).
    pub fn group_pids(&self) -> Vec<u32> {
        let members = match self.members.lock() {
            Ok(members) => members.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        members.map(|members| members.pids()).unwrap_or_default()
    }
}

/// Until when an instance's down time is expected (`None`: while its process restarts).
#[derive(Debug, Default)]
struct ExpectedDown {
    until: HashMap<String, Option<Instant>>,
}

/// The shared state of every supervised process, in config order; owned by the monitor.
#[derive(Debug, Default)]
pub struct ProcessTable {
    entries: RwLock<Vec<Arc<Entry>>>,
    expected_down: Mutex<ExpectedDown>,
}

impl ProcessTable {
    /// Every entry, in config order.
    pub fn entries(&self) -> Vec<Arc<Entry>> {
        match self.entries.read() {
            Ok(entries) => entries.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set_entries(&self, entries: Vec<Arc<Entry>>) {
        match self.entries.write() {
            Ok(mut slot) => *slot = entries,
            Err(poisoned) => *poisoned.into_inner() = entries,
        }
    }

    fn expected(&self) -> MutexGuard<'_, ExpectedDown> {
        match self.expected_down.lock() {
            Ok(expected) => expected,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Marks `instance_id` as expectedly down: open-ended (`None`) while its process restarts,
    /// or until a deadline once the new process was spawned.
    pub fn expect_down(&self, instance_id: &str, until: Option<Instant>) {
        self.expected().until.insert(instance_id.to_owned(), until);
    }

    /// Ends an expected down time (the process stopped for good or went fatal).
    pub fn clear_expected_down(&self, instance_id: &str) {
        self.expected().until.remove(instance_id);
    }

    /// Whether `instance_id` being down now is expected (its process is restarting or started
    /// less than `STARTUP_GRACE` ago). The listener then records no new outage error.
    pub fn expected_down(&self, instance_id: &str) -> bool {
        match self.expected().until.get(instance_id) {
            Some(None) => true,
            Some(Some(until)) => Instant::now() < *until,
            None => false,
        }
    }

    /// Names of the fatal processes.
    pub fn fatal(&self) -> Vec<String> {
        self.entries()
            .iter()
            .filter(|entry| entry.lock().state == ProcessState::Fatal)
            .map(|entry| entry.name.clone())
            .collect()
    }

    /// The summary in the health document and `/api/v1/status`: counts, and the names of fatal
    /// processes. It does not change the health score.
    pub fn summary(&self) -> Value {
        let entries = self.entries();
        let running = entries
            .iter()
            .filter(|entry| entry.lock().state == ProcessState::Running)
            .count();
        let fatal = self.fatal();
        json!({
            "total_count": entries.len(),
            "running_count": running,
            "fatal_count": fatal.len(),
            "fatal": fatal,
        })
    }
}

/// CPU and memory summed over a process group.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Accumulated CPU seconds of the live group members.
    pub cpu_seconds: f64,
    /// Resident memory in bytes.
    pub resident_bytes: u64,
}

/// Samples every entry's group with the sidecar's long-lived sysinfo `System`.
pub fn usage(sampler: &ProcessCollector, entry: &Entry) -> Usage {
    let pids = entry.group_pids();
    if pids.is_empty() {
        return Usage::default();
    }
    let (cpu_seconds, resident_bytes) = sampler.sample_pids(&entry.name, &pids);
    Usage {
        cpu_seconds,
        resident_bytes,
    }
}

/// One `GET /api/v1/processes` row.
pub fn view(sampler: &ProcessCollector, entry: &Entry) -> Value {
    let status = entry.status();
    let usage = usage(sampler, entry);
    let uptime = match (status.state, status.started) {
        (ProcessState::Starting | ProcessState::Running, Some(started)) => {
            Some(started.elapsed().as_secs_f64())
        }
        _ => None,
    };
    let (stdout, stderr) = entry.log_lines();
    json!({
        "name": entry.name,
        "state": status.state,
        "pid": status.pid,
        "restarts": status.restarts,
        "last_exit_code": status.last_exit_code,
        "uptime_seconds": uptime.map(|seconds| (seconds * 100.0).round() / 100.0),
        "uptime_formatted": uptime.map(format_uptime),
        "start_time": status.start_time.map(rfc3339),
        "start_time_seconds": status.start_time.map(unix_seconds),
        "cpu_seconds": (usage.cpu_seconds * 1000.0).round() / 1000.0,
        "memory_bytes": usage.resident_bytes,
        "memory_usage_mb": ((usage.resident_bytes as f64 / (1024.0 * 1024.0)) * 100.0).round() / 100.0,
        "group_pids": entry.group_pids(),
        "command": status.command,
        "instance": status.instance,
        "last_error": status.last_error,
        "log_lines": {"stdout": stdout, "stderr": stderr},
    })
}

enum ManagerMsg {
    Apply(Vec<ProcessConfig>),
    Command {
        name: String,
        action: Action,
        respond: oneshot::Sender<Result<(), ProcessError>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// The handle to process supervision. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Processes {
    table: Arc<ProcessTable>,
    sampler: Arc<ProcessCollector>,
    manager: mpsc::UnboundedSender<ManagerMsg>,
}

impl std::fmt::Debug for ManagerMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Apply(_) => "Apply",
            Self::Command { .. } => "Command",
            Self::Shutdown(_) => "Shutdown",
        })
    }
}

impl Processes {
    /// Starts supervising `configs`, in order (each is spawned before the next is looked at).
    pub async fn start(
        table: Arc<ProcessTable>,
        sampler: Arc<ProcessCollector>,
        configs: &[ProcessConfig],
    ) -> Self {
        let (manager, inbox) = mpsc::unbounded_channel();
        let mut state = Manager {
            table: Arc::clone(&table),
            configs: Vec::new(),
            actors: HashMap::new(),
        };
        state.apply(configs.to_vec()).await;
        tokio::spawn(state.run(inbox));
        Self {
            table,
            sampler,
            manager,
        }
    }

    /// The shared table.
    pub fn table(&self) -> &Arc<ProcessTable> {
        &self.table
    }

    /// The sysinfo sampler.
    pub fn sampler(&self) -> &Arc<ProcessCollector> {
        &self.sampler
    }

    /// Applies a new `processes:` list (a reload): added ones start, removed ones stop, a
    /// changed command/args/cwd/env restarts only that process, other changes apply in place.
    pub fn apply(&self, configs: Vec<ProcessConfig>) {
        let _ = self.manager.send(ManagerMsg::Apply(configs));
    }

    /// Runs an API command and waits until it took effect.
    pub async fn command(&self, name: &str, action: Action) -> Result<(), ProcessError> {
        let (respond, answer) = oneshot::channel();
        self.manager
            .send(ManagerMsg::Command {
                name: name.to_owned(),
                action,
                respond,
            })
            .map_err(|_| ProcessError::Stopped)?;
        answer.await.unwrap_or(Err(ProcessError::Stopped))
    }

    /// The view of one process.
    pub fn view(&self, name: &str) -> Option<Value> {
        self.table
            .entries()
            .iter()
            .find(|entry| entry.name == name)
            .map(|entry| view(&self.sampler, entry))
    }

    /// Every view, in config order.
    pub fn views(&self) -> Vec<Value> {
        self.table
            .entries()
            .iter()
            .map(|entry| view(&self.sampler, entry))
            .collect()
    }

    /// Stops every process (all groups at once, each with its stop signal, timeout and kill)
    /// and waits until they are gone. Later commands fail with `ProcessError::Stopped`.
    pub async fn shutdown(&self) {
        let (respond, answer) = oneshot::channel();
        if self.manager.send(ManagerMsg::Shutdown(respond)).is_ok() {
            let _ = answer.await;
        }
    }
}

struct ActorHandle {
    inbox: mpsc::UnboundedSender<child::ActorMsg>,
    done: tokio::task::JoinHandle<()>,
}

struct Manager {
    table: Arc<ProcessTable>,
    configs: Vec<ProcessConfig>,
    actors: HashMap<String, ActorHandle>,
}

impl Manager {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<ManagerMsg>) {
        while let Some(message) = inbox.recv().await {
            match message {
                ManagerMsg::Apply(configs) => self.apply(configs).await,
                ManagerMsg::Command {
                    name,
                    action,
                    respond,
                } => match self.actors.get(&name) {
                    Some(actor) => {
                        let message = child::ActorMsg::Command(action, respond);
                        if let Err(mpsc::error::SendError(child::ActorMsg::Command(_, respond))) =
                            actor.inbox.send(message)
                        {
                            let _ = respond.send(Err(ProcessError::Stopped));
                        }
                    }
                    None => {
                        let _ = respond.send(Err(ProcessError::NotFound(name)));
                    }
                },
                ManagerMsg::Shutdown(respond) => {
                    self.shutdown().await;
                    let _ = respond.send(());
                    return;
                }
            }
        }
        self.shutdown().await;
    }

    async fn apply(&mut self, configs: Vec<ProcessConfig>) {
        let changes = process_changes(&self.configs, &configs);
        if changes.is_empty() {
            return;
        }
        let mut entries: HashMap<String, Arc<Entry>> = self
            .table
            .entries()
            .into_iter()
            .map(|entry| (entry.name.clone(), entry))
            .collect();
        // Removed ones first: a renamed process must not run twice at once.
        for (name, change) in &changes {
            if *change == ProcessChange::Removed
                && let Some(actor) = self.actors.remove(name)
            {
                tracing::info!(process = %name, "Process removed from the configuration; stopping it.");
                stop_actor(actor).await;
                entries.remove(name);
            }
        }
        let mut ordered = Vec::with_capacity(configs.len());
        for config in &configs {
            let entry = entries
                .remove(&config.name)
                .unwrap_or_else(|| Arc::new(Entry::new(config)));
            ordered.push(entry);
        }
        self.table.set_entries(ordered.clone());
        for (config, entry) in configs.iter().zip(&ordered) {
            let change = changes
                .iter()
                .find(|(name, _)| *name == config.name)
                .map(|(_, change)| *change);
            match change {
                Some(ProcessChange::Added) => {
                    let (actor, started) = child::spawn_actor(
                        config.clone(),
                        Arc::clone(entry),
                        Arc::clone(&self.table),
                    );
                    // In order: the next process starts after this one was spawned.
                    let _ = started.await;
                    self.actors.insert(config.name.clone(), actor);
                }
                Some(change @ (ProcessChange::Restart | ProcessChange::Settings)) => {
                    if let Some(actor) = self.actors.get(&config.name) {
                        let (respond, done) = oneshot::channel();
                        let restart = change == ProcessChange::Restart;
                        let _ = actor.inbox.send(child::ActorMsg::Update {
                            config: Box::new(config.clone()),
                            restart,
                            respond,
                        });
                        let _ = done.await;
                    }
                }
                Some(ProcessChange::Removed) | None => {}
            }
        }
        self.configs = configs;
    }

    async fn shutdown(&mut self) {
        let actors: Vec<ActorHandle> = self.actors.drain().map(|(_, actor)| actor).collect();
        let stops = actors.into_iter().map(stop_actor);
        futures_join_all(stops).await;
        self.configs.clear();
    }
}

/// Tells an actor to stop its process and waits for the actor to end.
async fn stop_actor(actor: ActorHandle) {
    let (respond, done) = oneshot::channel();
    if actor.inbox.send(child::ActorMsg::Shutdown(respond)).is_ok() {
        let _ = done.await;
    }
    let _ = actor.done.await;
}

/// Awaits every future concurrently (no `futures` dependency: each runs as its own task).
async fn futures_join_all<F>(futures: impl IntoIterator<Item = F>)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    for handle in handles {
        let _ = handle.await;
    }
}
