//! The one place that records what happens: errors, counters, windowed counts and live state.
//!
//! Every `record_*` call writes the log line, bumps the metric and updates the JSON state
//! together, so `/metrics`, `/api/v1/*` and the logs cannot disagree. The health score is
//! computed from the same snapshot for `/metrics` and the API.

mod collector;
pub mod health;
pub mod report;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::clock::{rfc3339, unix_seconds};
use crate::event::{Component, ErrorKind};
use crate::metrics::process::{ProcessCollector, ProcessSample};
use crate::metrics::{ErrorLabels, InstanceLabels, Metrics, ReasonLabels};

pub use collector::StateCollector;
use health::{Health, HealthInputs};
use window::Window;

/// The error ring keeps this many entries (the seed's history cap).
pub const ERROR_RING_CAPACITY: usize = 100;

/// The git revision the binary was built from (`git rev-parse --short HEAD`), or `unknown`.
pub const REVISION: &str = env!("WXAUTO_REVISION");

/// One entry of the error ring.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorRecord {
    /// RFC 3339.
    pub timestamp: String,
    /// RFC 3339 (the seed's field name).
    pub datetime: String,
    /// The seed's service name.
    pub service_name: &'static str,
    /// `component.kind`.
    pub error_type: String,
    /// Redacted text.
    pub error_message: String,
    /// The instance, when the error belongs to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The component label.
    pub component: &'static str,
    /// The kind label.
    pub kind: &'static str,
    /// Unix seconds.
    pub time: f64,
}

/// Connectivity of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Connectivity {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Connected.
    Up,
    /// Failing; retried with backoff.
    Down,
    /// Came back; re-initialising and re-adding chats.
    Recovering,
}

/// One chat as the listener tracks it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatState {
    /// Listened (counts against the cap) or timed out.
    pub active: bool,
    /// From `fixed_listeners`; never times out.
    pub fixed: bool,
    /// Unix seconds of the last message, if any.
    pub last_message_time: Option<f64>,
    /// Unix seconds of the last poll that covered this chat.
    pub last_check_time: f64,
    /// Messages received since the listener started.
    pub message_count: u64,
    /// Failed listen/add or listen/remove calls for this chat.
    pub error_count: u64,
}

/// One instance as its actor last published it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceState {
    /// The configured id.
    pub instance_id: String,
    /// `enabled` in the config; disabled instances are listed but not counted.
    pub enabled: bool,
    /// WeChat reported connected at the last probe (initialised upstream).
    pub initialized: bool,
    /// Connected as docs/reference.md ("Health score") defines it.
    pub connected: bool,
    /// The state machine.
    pub state: Connectivity,
    /// Unix seconds of the last health probe.
    pub last_check_time: Option<f64>,
    /// Errors recorded for this instance since the sidecar started.
    pub error_count: u64,
    /// The last error's text.
    pub last_error: Option<String>,
    /// Chats by name.
    pub chats: BTreeMap<String, ChatState>,
}

impl InstanceState {
    /// A fresh, unprobed instance.
    pub fn new(instance_id: &str, enabled: bool) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            enabled,
            initialized: false,
            connected: false,
            state: Connectivity::Unknown,
            last_check_time: None,
            error_count: 0,
            last_error: None,
            chats: BTreeMap::new(),
        }
    }

    /// Active chats.
    pub fn active_chats(&self) -> usize {
        self.chats.values().filter(|chat| chat.active).count()
    }
}

/// The last reload's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReloadState {
    /// 1 or 0 on `/metrics`.
    pub last_reload_successful: bool,
    /// Unix seconds of the last successful load (the first load counts).
    pub last_success_time: f64,
    /// The active config's hash.
    pub config_hash: u64,
    /// Successful reloads (not counting the first load).
    pub reloads: u64,
    /// Failed reloads.
    pub failures: u64,
}

/// A point-in-time copy of everything the API and the collector read.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The listener service runs.
    pub running: bool,
    /// Unix seconds the listener last started.
    pub listener_start_time: Option<f64>,
    /// Seconds since then (0 when stopped).
    pub uptime_seconds: f64,
    /// Live supervised tasks.
    pub tasks: usize,
    /// Instances by id.
    pub instances: BTreeMap<String, InstanceState>,
    /// Every error recorded since start.
    pub total_errors: u64,
    /// Errors inside the window (all components).
    pub window_errors: u64,
    /// Errors inside the window except config.
    pub window_listener_errors: u64,
    /// Messages inside the window.
    pub window_messages: u64,
    /// The last error.
    pub last_error: Option<ErrorRecord>,
    /// Totals since start.
    pub totals: Totals,
    /// Reload state.
    pub reload: ReloadState,
    /// The score computed from this snapshot.
    pub health: Health,
    /// The error ratio from this snapshot.
    pub error_ratio: f64,
    /// When the snapshot was taken (unix seconds).
    pub now: f64,
}

/// Counters of the statistics endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Messages that passed the filters.
    pub messages_processed: u64,
    /// Listen/add of new or reactivated chats.
    pub listeners_added: u64,
    /// Listen/remove, any reason.
    pub listeners_removed: u64,
}

/// Records everything; shared as `Arc<Monitor>`.
#[derive(Debug)]
pub struct Monitor {
    metrics: Metrics,
    process: Arc<ProcessCollector>,
    /// Supervised external processes (`processes:`): states for the health document and the
    /// listener's "expected down" check.
    processes: Arc<crate::process::ProcessTable>,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    window: Duration,
    running: bool,
    listener_start: Option<SystemTime>,
    tasks: usize,
    ring: VecDeque<ErrorRecord>,
    errors_all: Window,
    errors_listener: Window,
    messages: Window,
    total_errors: u64,
    totals: Totals,
    instances: BTreeMap<String, InstanceState>,
    reload: ReloadState,
}

// === impl Monitor ===

impl Monitor {
    /// A monitor with the given error window.
    pub fn new(metrics: Metrics, process: Arc<ProcessCollector>, window: Duration) -> Self {
        Self {
            metrics,
            process,
            processes: Arc::default(),
            inner: Mutex::new(Inner {
                window,
                running: false,
                listener_start: None,
                tasks: 0,
                ring: VecDeque::with_capacity(ERROR_RING_CAPACITY),
                errors_all: Window::default(),
                errors_listener: Window::default(),
                messages: Window::default(),
                total_errors: 0,
                totals: Totals::default(),
                instances: BTreeMap::new(),
                reload: ReloadState::default(),
            }),
        }
    }

    /// The supervised processes' shared table.
    pub fn processes(&self) -> &Arc<crate::process::ProcessTable> {
        &self.processes
    }

    /// The sidecar's own sampler (its sysinfo `System` also samples supervised processes).
    pub fn process_collector(&self) -> &Arc<ProcessCollector> {
        &self.process
    }

    /// The event-driven metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A process sample (CPU share since the previous sample).
    pub fn process_sample(&self) -> ProcessSample {
        self.process.sample()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the data half-updated in a way that
        // matters more than losing the monitor; keep serving.
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Changes the error window (on reload).
    pub fn set_window(&self, window: Duration) {
        self.lock().window = window;
    }

    /// Records an error: log line, `wxauto_errors_total`, the ring and the windows together.
    ///
    /// `message` must already be free of secrets; it is truncated to 500 characters.
    pub fn record_error(
        &self,
        component: Component,
        kind: ErrorKind,
        instance_id: Option<&str>,
        message: &str,
    ) {
        // A last pass through the redactor: no registered secret form is logged or kept.
        let message: String = crate::secret::redact(message).chars().take(500).collect();
        match component {
            Component::Config => {
                tracing::error!(
                    component = component.as_str(),
                    kind = kind.as_str(),
                    "{message}"
                )
            }
            _ => tracing::warn!(
                component = component.as_str(),
                kind = kind.as_str(),
                instance_id = instance_id.unwrap_or("-"),
                "{message}"
            ),
        }
        self.metrics
            .errors
            .get_or_create_owned(&ErrorLabels {
                component: component.as_str(),
                kind: kind.as_str(),
            })
            .inc();
        let instance_error = matches!(component, Component::Client | Component::Listener);
        if let Some(id) = instance_id.filter(|_| instance_error) {
            self.metrics
                .client_errors
                .get_or_create_owned(&InstanceLabels {
                    instance_id: id.to_owned(),
                })
                .inc();
        }
        let now = SystemTime::now();
        let stamp = rfc3339(now);
        let record = ErrorRecord {
            timestamp: stamp.clone(),
            datetime: stamp,
            service_name: component.service_name(),
            error_type: format!("{}.{}", component.as_str(), kind.as_str()),
            error_message: message.clone(),
            instance_id: instance_id.map(str::to_owned),
            component: component.as_str(),
            kind: kind.as_str(),
            time: unix_seconds(now),
        };
        let mut inner = self.lock();
        let window = inner.window;
        inner.total_errors += 1;
        inner.errors_all.add(now, 1, window);
        if component != Component::Config {
            inner.errors_listener.add(now, 1, window);
        }
        if inner.ring.len() == ERROR_RING_CAPACITY {
            inner.ring.pop_front();
        }
        inner.ring.push_back(record);
        if let Some(state) = instance_id
            .filter(|_| instance_error)
            .and_then(|id| inner.instances.get_mut(id))
        {
            state.error_count += 1;
            state.last_error = Some(message);
        }
    }

    /// Records messages that passed the filters.
    pub fn record_messages(&self, instance_id: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.metrics
            .messages_processed
            .get_or_create_owned(&InstanceLabels {
                instance_id: instance_id.to_owned(),
            })
            .inc_by(count);
        let now = SystemTime::now();
        let mut inner = self.lock();
        let window = inner.window;
        inner.messages.add(now, count, window);
        inner.totals.messages_processed += count;
    }

    /// Records a listen/add of a new or reactivated chat.
    pub fn record_listener_added(&self, instance_id: &str) {
        tracing::debug!(instance_id, "Chat added as a listener.");
        self.metrics
            .listeners_added
            .get_or_create_owned(&InstanceLabels {
                instance_id: instance_id.to_owned(),
            })
            .inc();
        self.lock().totals.listeners_added += 1;
    }

    /// Records that a supervised instance task ended on its own and will be restarted: the
    /// error, `wxauto_listener_restarts_total` and `wxauto_listener_task_restarts_total`.
    pub fn record_task_restart(&self, instance_id: &str, message: &str) {
        self.record_error(
            Component::Listener,
            ErrorKind::Task,
            Some(instance_id),
            message,
        );
        self.metrics.listener_restarts.inc();
        self.metrics
            .task_restarts
            .get_or_create_owned(&InstanceLabels {
                instance_id: instance_id.to_owned(),
            })
            .inc();
    }

    /// Records a listen/remove.
    pub fn record_listener_removed(&self, instance_id: &str, reason: &'static str) {
        self.metrics
            .listeners_removed
            .get_or_create_owned(&ReasonLabels {
                instance_id: instance_id.to_owned(),
                reason,
            })
            .inc();
        self.lock().totals.listeners_removed += 1;
    }

    /// The listener service started: uptime counts from now.
    pub fn listener_started(&self) {
        let mut inner = self.lock();
        inner.running = true;
        inner.listener_start = Some(SystemTime::now());
    }

    /// The listener service stopped.
    pub fn listener_stopped(&self) {
        self.lock().running = false;
    }

    /// Whether the listener service runs (cheap; for readiness).
    pub fn is_running(&self) -> bool {
        self.lock().running
    }

    /// Sets the number of live supervised tasks.
    pub fn set_tasks(&self, tasks: usize) {
        self.lock().tasks = tasks;
    }

    /// Adds or replaces an instance's published state, creating its series at 0.
    pub fn register_instance(&self, instance_id: &str, enabled: bool) {
        // Under the lock, so `drop_series_if_removed` never sees the series without the entry.
        let mut inner = self.lock();
        self.metrics.init_instance(instance_id);
        inner
            .instances
            .entry(instance_id.to_owned())
            .and_modify(|state| state.enabled = enabled)
            .or_insert_with(|| InstanceState::new(instance_id, enabled));
    }

    /// Publishes an instance's state (from its actor). Counts kept by the monitor are kept.
    pub fn publish_instance(&self, mut state: InstanceState) {
        let mut inner = self.lock();
        if let Some(old) = inner.instances.get(&state.instance_id) {
            state.error_count = old.error_count;
            state.last_error.clone_from(&old.last_error);
            state.enabled = old.enabled;
        } else {
            // The instance was removed while its actor was still stopping: do not resurrect it.
            return;
        }
        inner.instances.insert(state.instance_id.clone(), state);
    }

    /// The chats an instance's last actor published, to seed its successor.
    pub fn chats_of(&self, instance_id: &str) -> Vec<(String, ChatState)> {
        self.lock()
            .instances
            .get(instance_id)
            .map(|state| {
                state
                    .chats
                    .iter()
                    .map(|(name, chat)| (name.clone(), chat.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets a removed instance: its JSON rows and every metric series disappear.
    pub fn remove_instance(&self, instance_id: &str) {
        self.metrics.remove_instance(instance_id);
        self.lock().instances.remove(instance_id);
    }

    /// Drops the series of an instance that is not registered (any more). The supervisor calls
    /// it once a stopped actor has really ended, since its last call may land after
    /// `remove_instance`.
    pub fn drop_series_if_removed(&self, instance_id: &str) {
        let inner = self.lock();
        if !inner.instances.contains_key(instance_id) {
            self.metrics.remove_instance(instance_id);
        }
    }

    /// Records a successful load or reload. `counted` is false for the first load and for a
    /// watcher signal whose content had not changed: those are not reloads.
    pub fn record_reload_success(&self, hash: u64, counted: bool) {
        if counted {
            self.metrics.config_reloads.inc();
        }
        let mut inner = self.lock();
        inner.reload.last_reload_successful = true;
        inner.reload.last_success_time = unix_seconds(SystemTime::now());
        inner.reload.config_hash = hash;
        if counted {
            inner.reload.reloads += 1;
        }
    }

    /// Records a failed reload; the errors are also logged and put in the ring.
    pub fn record_reload_failure(&self, errors: &[String]) {
        // The state first, then the counter: a scrape that sees the failure counted never sees
        // the configuration still marked as successfully loaded (once the state is read after
        // the counter).
        {
            let mut inner = self.lock();
            inner.reload.last_reload_successful = false;
            inner.reload.failures += 1;
        }
        self.metrics.config_reload_failures.inc();
        let summary = match errors {
            [] => "configuration reload failed".to_owned(),
            [only] => format!("configuration reload failed: {only}"),
            [first, rest @ ..] => format!(
                "configuration reload failed: {first} (and {} more)",
                rest.len()
            ),
        };
        for error in errors {
            tracing::error!(component = "config", "Invalid configuration: {error}");
        }
        self.record_error(Component::Config, ErrorKind::Reload, None, &summary);
    }

    /// The newest `limit` errors, oldest first.
    pub fn recent_errors(&self, limit: usize) -> Vec<ErrorRecord> {
        let inner = self.lock();
        let skip = inner.ring.len().saturating_sub(limit);
        inner.ring.iter().skip(skip).cloned().collect()
    }

    /// Upstream calls made to the instances of `snap` (the statistics' `api_calls_made`).
    pub fn api_calls_made(&self, snap: &Snapshot) -> u64 {
        let ids: Vec<String> = snap.instances.keys().cloned().collect();
        self.metrics.api_calls_made(&ids)
    }

    /// The health document: `data` of `GET /api/v1/health`, and the report file.
    pub fn health_document(
        &self,
        snap: &Snapshot,
        counts: &report::ChatCounts,
    ) -> serde_json::Value {
        let process = self.process_sample();
        let recent = self.recent_errors(10);
        let mut document =
            report::health(snap, &process, self.api_calls_made(snap), &recent, counts);
        // Reported, not scored: a fatal process shows here and in /api/v1/status.
        document["processes"] = self.processes.summary();
        document
    }

    /// A consistent copy of the state, with the health score computed from it.
    pub fn snapshot(&self) -> Snapshot {
        let now = SystemTime::now();
        let mut inner = self.lock();
        let window = inner.window;
        let window_errors = inner.errors_all.count(now, window);
        let window_listener_errors = inner.errors_listener.count(now, window);
        let window_messages = inner.messages.count(now, window);
        let enabled = inner.instances.values().filter(|state| state.enabled);
        let (mut clients_total, mut clients_disconnected) = (0u64, 0u64);
        let (mut chats_total, mut chats_inactive) = (0u64, 0u64);
        for state in enabled {
            clients_total += 1;
            if !state.connected {
                clients_disconnected += 1;
            }
            for chat in state.chats.values() {
                chats_total += 1;
                if !chat.active {
                    chats_inactive += 1;
                }
            }
        }
        let inputs = HealthInputs {
            running: inner.running,
            listener_errors: window_listener_errors,
            clients_total,
            clients_disconnected,
            chats_total,
            chats_inactive,
            window_errors,
            window_messages,
        };
        let uptime_seconds = match (inner.running, inner.listener_start) {
            (true, Some(start)) => now
                .duration_since(start)
                .map(|elapsed| elapsed.as_secs_f64())
                .unwrap_or(0.0),
            _ => 0.0,
        };
        Snapshot {
            running: inner.running,
            listener_start_time: inner.listener_start.map(unix_seconds),
            uptime_seconds,
            tasks: inner.tasks,
            instances: inner.instances.clone(),
            total_errors: inner.total_errors,
            window_errors,
            window_listener_errors,
            window_messages,
            last_error: inner.ring.back().cloned(),
            totals: inner.totals,
            reload: inner.reload.clone(),
            health: health::compute(&inputs),
            error_ratio: health::error_ratio(window_errors, window_messages),
            now: unix_seconds(now),
        }
    }
}

impl crate::event::ErrorSink for Monitor {
    fn record_error(
        &self,
        component: Component,
        kind: ErrorKind,
        instance_id: Option<&str>,
        message: &str,
    ) {
        Monitor::record_error(self, component, kind, instance_id, message);
    }
}
