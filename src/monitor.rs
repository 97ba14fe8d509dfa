//! The one place that records what happens: errors, counters, windowed counts and live state.
//!
//! Every `record_*` call writes the log line, bumps the metric and updates the JSON state
//! together, so `/metrics`, `/api/v1/*` and the logs cannot disagree. The health score is
//! computed from the same snapshot for `/metrics` and the API.
//!
//! `record.rs` is the recorder (errors, counters, reloads), `state.rs` the live-state registry
//! (instances, chats, the running flag), `window.rs` the windowed counts; this file holds the
//! shared state, `snapshot()` and the health document built from it.

mod collector;
pub mod health;
mod record;
pub mod report;
mod state;
mod window;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::clock::unix_seconds;
use crate::metrics::Metrics;
use crate::metrics::process::{ProcessCollector, ProcessSample};

pub use collector::StateCollector;
use health::{Health, HealthInputs};
pub use record::ErrorRecord;
pub use state::{ChatState, Connectivity, InstanceState};
use window::Window;

/// The error ring keeps this many entries (the seed's history cap).
pub const ERROR_RING_CAPACITY: usize = 100;

/// The git revision the binary was built from (`git rev-parse --short HEAD`), or `unknown`.
pub const REVISION: &str = env!("WXAUTO_REVISION");

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
