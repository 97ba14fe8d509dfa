//! The scrape registry, the event-driven metric families (counters and histograms) and the
//! scrape encoder.
//!
//! The per-instance families (the API request counter and duration histogram, the counters
//! labelled by `instance_id`) are held as atomics per instance (`series::Table`) and written by
//! the hand-written encoder of `text.rs`, straight into a pooled buffer; they are most of a
//! scrape's series. The few remaining families (process metrics, error and reload counters,
//! store gauges) stay on prometheus-client's `Registry`, which this `Registry` wraps.
//!
//! Gauges that mirror live state (client up, listeners, health) are not here: they are built
//! at scrape time by `monitor::StateCollector`, so they never go stale and removed instances
//! vanish by construction. Process metrics come from `metrics::process`.

pub mod process;
pub mod series;
pub mod text;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Metric;

use self::series::{AtomicHistogram, Presence, Table};
use self::text::{Bounds, Descriptor, Encoder, Labels};

/// `Content-Type` of the Prometheus text format 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics 1.0.0.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Families written by hand at scrape time (see `text::Encoder`), after the prometheus-client
/// part of the registry, in the order they were registered.
pub trait Source: std::fmt::Debug + Send + Sync {
    /// Writes this source's families.
    fn encode(&self, encoder: &mut Encoder<'_>);
}

/// Everything a scrape shows: prometheus-client's registry for the small families and the
/// hand-written sources for the large ones.
#[derive(Debug, Default)]
pub struct Registry {
    client: prometheus_client::registry::Registry,
    sources: Vec<Box<dyn Source>>,
}

impl Registry {
    /// Registers a prometheus-client metric (`Registry::register`; the help gets its period).
    pub fn register(&mut self, name: &str, help: &str, metric: impl Metric) {
        self.client.register(name, help, metric);
    }

    /// Registers a prometheus-client collector.
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.client.register_collector(collector);
    }

    /// A prometheus-client sub-registry whose names get `prefix_`.
    pub fn sub_registry_with_prefix(
        &mut self,
        prefix: &str,
    ) -> &mut prometheus_client::registry::Registry {
        self.client.sub_registry_with_prefix(prefix)
    }

    /// Registers hand-written families.
    pub fn register_source(&mut self, source: Box<dyn Source>) {
        self.sources.push(source);
    }
}

/// Labels of per-instance counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct InstanceLabels {
    /// The configured instance id.
    pub instance_id: String,
}

/// Labels of `wxauto_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// listener, client, delivery, config.
    pub component: &'static str,
    /// The closed set of `ErrorKind`.
    pub kind: &'static str,
}

/// Labels of counters with a closed `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ReasonLabels {
    /// The configured instance id.
    pub instance_id: String,
    /// A closed set per metric.
    pub reason: &'static str,
}

/// The `endpoint` label of the API families, one per upstream endpoint the sidecar calls, in
/// the order of `wxauto::Endpoint` (whose `label()` is this list, indexed by the variant).
pub const API_ENDPOINTS: [&str; 10] = [
    "health",
    "initialize",
    "get_next_new",
    "listen_add",
    "listen_get",
    "listen_remove",
    "send",
    "send_typing",
    "file_download",
    "get_all_messages",
];

/// The closed set of `wxauto_api_requests_total` outcomes.
pub const API_OUTCOMES: [&str; 3] = ["success", "error", "timeout"];

/// How an upstream call ended (`wxauto_api_requests_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiOutcome {
    /// An answer that decoded.
    Success = 0,
    /// Any failure but a timeout.
    Error = 1,
    /// No answer in time.
    Timeout = 2,
}

/// The closed set of `wxauto_listeners_removed_total` reasons.
pub const REMOVE_REASONS: [&str; 3] = ["timeout", "manual", "config"];

/// Upper bounds of `wxauto_api_request_duration_seconds`: 5 ms to 20.48 s, ×4 apart (7 bounds,
/// plus `+Inf`). The histogram is per instance and endpoint, so it is most of a sidecar's
/// series: 10 series per called endpoint and instance (16 with the earlier ×2 bounds, each of
/// which these are a subset of).
pub const API_DURATION_BOUNDS: [f64; 7] = [0.005, 0.02, 0.08, 0.32, 1.28, 5.12, 20.48];

const ENDPOINTS: usize = API_ENDPOINTS.len();
const OUTCOMES: usize = API_OUTCOMES.len();
/// `API_DURATION_BOUNDS` and `+Inf`.
const API_BUCKETS: usize = API_DURATION_BOUNDS.len() + 1;

/// The counters labelled by `instance_id` alone, then `wxauto_listeners_removed_total` by
/// reason: the slots of `InstanceSeries::counters`.
const CLIENT_ERRORS: usize = 0;
const LISTENERS_ADDED: usize = 1;
const MESSAGES_PROCESSED: usize = 2;
const MESSAGES_RECOVERED: usize = 3;
const TASK_RESTARTS: usize = 4;
const INSTANCE_COUNTERS: usize = 5;
const LISTENERS_REMOVED: usize = INSTANCE_COUNTERS;
const COUNTERS: usize = INSTANCE_COUNTERS + REMOVE_REASONS.len();

/// Presence bits of an instance's series: the request counters (endpoint × outcome), the
/// histograms (per endpoint), then the `counters` slots.
const REQUESTS_BIT: u32 = 0;
const DURATION_BIT: u32 = REQUESTS_BIT + (ENDPOINTS * OUTCOMES) as u32;
const COUNTERS_BIT: u32 = DURATION_BIT + ENDPOINTS as u32;
const _: () = assert!(COUNTERS_BIT as usize + COUNTERS <= 64);

/// The series `init_instance` creates at 0: every request counter and every counter slot (the
/// histograms appear with their first observation).
const INIT_MASK: u64 =
    ((1 << (ENDPOINTS * OUTCOMES)) - 1) << REQUESTS_BIT | ((1 << COUNTERS) - 1) << COUNTERS_BIT;

/// Every series of one instance.
#[derive(Debug)]
struct InstanceSeries {
    present: Presence,
    /// `wxauto_api_requests_total`, index `endpoint * OUTCOMES + outcome`.
    requests: [AtomicU64; ENDPOINTS * OUTCOMES],
    /// `wxauto_api_request_duration_seconds` per endpoint.
    durations: [AtomicHistogram<API_BUCKETS>; ENDPOINTS],
    /// The per-instance counters, then `wxauto_listeners_removed_total` per reason.
    counters: [AtomicU64; COUNTERS],
}

impl Default for InstanceSeries {
    fn default() -> Self {
        Self {
            present: Presence::default(),
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            durations: std::array::from_fn(|_| AtomicHistogram::default()),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// The state behind `Metrics` and its source.
#[derive(Debug)]
struct Shared {
    instances: Table<InstanceSeries>,
    bounds: Bounds,
    /// The labels after `instance_id`, rendered once: `endpoint,outcome` by request slot,
    /// `endpoint` by endpoint, `reason` by removal reason.
    request_labels: Vec<Labels>,
    endpoint_labels: Vec<Labels>,
    reason_labels: Vec<Labels>,
    /// Upstream calls of removed instances, so that `api_calls_made` never goes down.
    removed_calls: AtomicU64,
}

/// A per-instance counter family (`InstanceLabels` or `ReasonLabels`), shaped like
/// prometheus-client's `Family::get_or_create_owned` so the recorders read the same.
#[derive(Clone, Debug)]
pub struct InstanceCounter {
    shared: Arc<Shared>,
    /// The first `InstanceSeries::counters` slot of this family.
    slot: usize,
}

impl InstanceCounter {
    /// The series of `labels.instance_id`, created at 0 if missing.
    pub fn get_or_create_owned(&self, labels: &InstanceLabels) -> CounterHandle {
        self.handle(&labels.instance_id, self.slot)
    }

    fn handle(&self, instance_id: &str, slot: usize) -> CounterHandle {
        let series = self.shared.instances.get_or_create(instance_id);
        series.present.add(1 << (COUNTERS_BIT + slot as u32));
        CounterHandle { series, slot }
    }
}

/// `wxauto_listeners_removed_total{instance_id,reason}`.
#[derive(Clone, Debug)]
pub struct ReasonCounter(InstanceCounter);

impl ReasonCounter {
    /// The series of these labels, created at 0 if missing. `reason` is one of
    /// `REMOVE_REASONS`.
    pub fn get_or_create_owned(&self, labels: &ReasonLabels) -> CounterHandle {
        let reason = REMOVE_REASONS.iter().position(|r| *r == labels.reason);
        debug_assert!(reason.is_some(), "unknown reason {}", labels.reason);
        self.0
            .handle(&labels.instance_id, self.0.slot + reason.unwrap_or(0))
    }
}

/// One counter series of an instance.
#[derive(Debug)]
pub struct CounterHandle {
    series: Arc<InstanceSeries>,
    slot: usize,
}

impl CounterHandle {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.series.counters[self.slot].fetch_add(n, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.series.counters[self.slot].load(Ordering::Relaxed)
    }
}

/// Every event-driven metric family. Cheap to clone (the families are `Arc`s inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    shared: Arc<Shared>,
    /// `wxauto_client_errors_total{instance_id}`.
    pub client_errors: InstanceCounter,
    /// `wxauto_errors_total{component,kind}`.
    pub errors: Family<ErrorLabels, Counter>,
    /// `wxauto_listeners_added_total{instance_id}`.
    pub listeners_added: InstanceCounter,
    /// `wxauto_listeners_removed_total{instance_id,reason}`.
    pub listeners_removed: ReasonCounter,
    /// `wxauto_messages_processed_total{instance_id}`.
    pub messages_processed: InstanceCounter,
    /// `wxauto_messages_recovered_total{instance_id}`: messages found by re-reading a chat's
    /// history after an unclean stop or an actor crash.
    pub messages_recovered: InstanceCounter,
    /// `wxauto_listener_restarts_total`.
    pub listener_restarts: Counter,
    /// `wxauto_listener_task_restarts_total{instance_id}`: one actor restarted after a crash.
    pub task_restarts: InstanceCounter,
    /// `wxauto_config_reloads_total`.
    pub config_reloads: Counter,
    /// `wxauto_config_reload_failures_total`.
    pub config_reload_failures: Counter,
}

static API_REQUESTS: Descriptor = Descriptor::counter(
    "wxauto_api_requests",
    "Calls to wxauto instances by endpoint and outcome (success, error, timeout).",
);
static API_DURATION: Descriptor = Descriptor::histogram(
    "wxauto_api_request_duration_seconds",
    "Duration of calls to wxauto instances.",
    Some("seconds"),
);
/// The families of the `counters` slots below `LISTENERS_REMOVED`, by slot.
static INSTANCE_COUNTER_FAMILIES: [Descriptor; INSTANCE_COUNTERS] = [
    Descriptor::counter(
        "wxauto_client_errors",
        "Errors recorded for a wxauto instance (one per transition to down, plus refused requests).",
    ),
    Descriptor::counter(
        "wxauto_listeners_added",
        "Chats added as listeners (new or reactivated).",
    ),
    Descriptor::counter(
        "wxauto_messages_processed",
        "Messages received from an instance that passed the filters.",
    ),
    Descriptor::counter(
        "wxauto_messages_recovered",
        "Messages taken from an instance but not stored when the sidecar or an actor died, \
         found again in the chat's history.",
    ),
    Descriptor::counter(
        "wxauto_listener_task_restarts",
        "Restarts of one instance actor after it failed or panicked.",
    ),
];
static LISTENERS_REMOVED_FAMILY: Descriptor = Descriptor::counter(
    "wxauto_listeners_removed",
    "Chats removed as listeners, by reason (timeout, manual, config).",
);

// === impl Metrics ===

impl Metrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let shared = Arc::new(Shared {
            instances: Table::default(),
            bounds: Bounds::new(&API_DURATION_BOUNDS),
            request_labels: API_ENDPOINTS
                .into_iter()
                .flat_map(|endpoint| {
                    API_OUTCOMES.into_iter().map(move |outcome| {
                        Labels::of(&[("endpoint", endpoint), ("outcome", outcome)])
                    })
                })
                .collect(),
            endpoint_labels: API_ENDPOINTS
                .into_iter()
                .map(|endpoint| Labels::of(&[("endpoint", endpoint)]))
                .collect(),
            reason_labels: REMOVE_REASONS
                .into_iter()
                .map(|reason| Labels::of(&[("reason", reason)]))
                .collect(),
            removed_calls: AtomicU64::new(0),
        });
        let counter = |slot| InstanceCounter {
            shared: Arc::clone(&shared),
            slot,
        };
        let metrics = Self {
            client_errors: counter(CLIENT_ERRORS),
            errors: Family::default(),
            listeners_added: counter(LISTENERS_ADDED),
            listeners_removed: ReasonCounter(counter(LISTENERS_REMOVED)),
            messages_processed: counter(MESSAGES_PROCESSED),
            messages_recovered: counter(MESSAGES_RECOVERED),
            listener_restarts: Counter::default(),
            task_restarts: counter(TASK_RESTARTS),
            config_reloads: Counter::default(),
            config_reload_failures: Counter::default(),
            shared: Arc::clone(&shared),
        };
        registry.register_source(Box::new(InstanceFamilies(shared)));
        // The small families stay with prometheus-client (the `wxauto_` prefix is added here).
        let wx = registry.sub_registry_with_prefix("wxauto");
        wx.register(
            "errors",
            "Every recorded error, by component (listener, client, delivery, config) and kind",
            metrics.errors.clone(),
        );
        wx.register(
            "listener_restarts",
            "Restarts of the listener service (API restart, crash recovery)",
            metrics.listener_restarts.clone(),
        );
        wx.register(
            "config_reloads",
            "Successful configuration reloads",
            metrics.config_reloads.clone(),
        );
        wx.register(
            "config_reload_failures",
            "Failed configuration reloads (the old configuration stays active)",
            metrics.config_reload_failures.clone(),
        );
        metrics
    }

    /// Records one upstream call. `endpoint` indexes `API_ENDPOINTS` (`wxauto::Endpoint as
    /// usize`).
    pub fn observe_api_call(
        &self,
        instance_id: &str,
        endpoint: usize,
        outcome: ApiOutcome,
        elapsed: Duration,
    ) {
        if endpoint >= ENDPOINTS {
            debug_assert!(false, "endpoint index {endpoint} out of range");
            return;
        }
        let series = self.shared.instances.get_or_create(instance_id);
        let request = endpoint * OUTCOMES + outcome as usize;
        series
            .present
            .add(1 << (REQUESTS_BIT + request as u32) | 1 << (DURATION_BIT + endpoint as u32));
        series.requests[request].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        series.durations[endpoint].observe(self.shared.bounds.bucket(seconds), seconds);
    }

    /// Creates every series of an instance at 0, so ratios work from the first scrape.
    pub fn init_instance(&self, instance_id: &str) {
        self.shared
            .instances
            .get_or_create(instance_id)
            .present
            .add(INIT_MASK);
    }

    /// Drops every series of a removed instance; its calls stay counted in `api_calls_made`.
    pub fn remove_instance(&self, instance_id: &str) {
        if let Some(series) = self.shared.instances.remove(instance_id) {
            self.shared
                .removed_calls
                .fetch_add(calls_of(&series), Ordering::Relaxed);
        }
    }

    /// Upstream calls made since start (the statistics' `api_calls_made`): those of
    /// `instance_ids` and of every instance removed before.
    pub fn api_calls_made(&self, instance_ids: &[String]) -> u64 {
        let current: u64 = instance_ids
            .iter()
            .filter_map(|id| self.shared.instances.get(id))
            .map(|series| calls_of(&series))
            .sum();
        current + self.shared.removed_calls.load(Ordering::Relaxed)
    }
}

/// An instance's upstream calls, every endpoint and outcome.
fn calls_of(series: &InstanceSeries) -> u64 {
    series
        .requests
        .iter()
        .map(|count| count.load(Ordering::Relaxed))
        .sum()
}

/// The hand-written per-instance families, walked in instance id order.
#[derive(Debug)]
struct InstanceFamilies(Arc<Shared>);

impl Source for InstanceFamilies {
    fn encode(&self, encoder: &mut Encoder<'_>) {
        let instances = self.0.instances.read();
        // Each series' labels start with its instance's: rendered once per instance and
        // family, followed by the rest of the set, rendered once per registry.
        let mut labels = Labels::default();
        encoder.family(&API_REQUESTS);
        for (id, series) in instances.iter() {
            labels.start("instance_id", id);
            for (request, rest) in self.0.request_labels.iter().enumerate() {
                if series.present.has(REQUESTS_BIT + request as u32) {
                    encoder.counter_with(
                        labels.with(rest),
                        series.requests[request].load(Ordering::Relaxed),
                    );
                }
            }
        }
        encoder.family(&API_DURATION);
        for (id, series) in instances.iter() {
            labels.start("instance_id", id);
            for (e, rest) in self.0.endpoint_labels.iter().enumerate() {
                if series.present.has(DURATION_BIT + e as u32) {
                    let (buckets, sum) = series.durations[e].load();
                    encoder.histogram_with(labels.with(rest), &self.0.bounds, &buckets, sum);
                }
            }
        }
        for (slot, family) in INSTANCE_COUNTER_FAMILIES.iter().enumerate() {
            encoder.family(family);
            for (id, series) in instances.iter() {
                if series.present.has(COUNTERS_BIT + slot as u32) {
                    encoder.counter(
                        &[("instance_id", id.as_str())],
                        series.counters[slot].load(Ordering::Relaxed),
                    );
                }
            }
        }
        encoder.family(&LISTENERS_REMOVED_FAMILY);
        for (id, series) in instances.iter() {
            labels.start("instance_id", id);
            for (r, rest) in self.0.reason_labels.iter().enumerate() {
                let slot = LISTENERS_REMOVED + r;
                if series.present.has(COUNTERS_BIT + slot as u32) {
                    encoder.counter_with(
                        labels.with(rest),
                        series.counters[slot].load(Ordering::Relaxed),
                    );
                }
            }
        }
    }
}

/// Encodes the registry in the negotiated format. Returns the body and its content type.
pub fn encode(registry: &Registry, openmetrics: bool) -> (String, &'static str) {
    let mut body = String::with_capacity(16 * 1024);
    let content_type = encode_into(&mut body, registry, openmetrics);
    (body, content_type)
}

/// Encodes the registry for a scrape into a buffer from a small pool: the body goes to the
/// connection as `Bytes` that hand the buffer back when sent, so steady scrapes allocate
/// nothing and never regrow a buffer (a 100-instance body is about 1 MB).
pub fn encode_pooled(registry: &Registry, openmetrics: bool) -> (Bytes, &'static str) {
    let mut body = take_buffer();
    let content_type = encode_into(&mut body, registry, openmetrics);
    SCRAPE_BUFFERS.last_len.store(body.len(), Ordering::Relaxed);
    (Bytes::from_owner(PooledBody(body)), content_type)
}

/// Bodies up to this size are encoded on the async worker that serves the scrape; larger
/// ones on the blocking pool. The encoder writes about 4.5 bytes per nanosecond here
/// (`cargo bench --bench encode`), so 1 MiB (about 100 instances) holds a worker for about a
/// quarter of a millisecond, more than tokio's rule of thumb of 100 µs between awaits but
/// less than the wake-ups of a hand-over cost under steady scrapes; and the other worker keeps
/// serving. Under concurrent scrapes each hand-over could also start a blocking thread (about
/// 10 MiB of RSS at 100 instances under `wrk -c4`, docs/BENCHMARKS.md).
pub const INLINE_ENCODE_MAX: usize = 1024 * 1024;

/// Whether the next scrape should be encoded inline (`INLINE_ENCODE_MAX`), judged by the size
/// of the last body.
pub fn encode_inline() -> bool {
    SCRAPE_BUFFERS.last_len.load(Ordering::Relaxed) <= INLINE_ENCODE_MAX
}

/// Scrape bodies kept for reuse: at most `POOLED` buffers, each sized for the last body.
struct ScrapeBuffers {
    free: Mutex<Vec<String>>,
    /// Length of the last body encoded, the size of a new buffer (plus headroom).
    last_len: AtomicUsize,
}

/// Concurrent scrapes that reuse a buffer; more than this allocate (pre-sized) and free.
const POOLED: usize = 4;

static SCRAPE_BUFFERS: ScrapeBuffers = ScrapeBuffers {
    free: Mutex::new(Vec::new()),
    last_len: AtomicUsize::new(0),
};

fn take_buffer() -> String {
    let reused = match SCRAPE_BUFFERS.free.lock() {
        Ok(mut free) => free.pop(),
        Err(poisoned) => poisoned.into_inner().pop(),
    };
    let wanted = headroom(SCRAPE_BUFFERS.last_len.load(Ordering::Relaxed));
    match reused {
        Some(mut body) => {
            body.clear();
            body.reserve(wanted);
            body
        }
        None => String::with_capacity(wanted),
    }
}

/// A buffer size for a body of about `len` bytes: an eighth more, at least 16 KiB.
fn headroom(len: usize) -> usize {
    (len + len / 8).max(16 * 1024)
}

/// A scrape body that returns its buffer to the pool once the connection has sent it.
struct PooledBody(String);

impl AsRef<[u8]> for PooledBody {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let body = std::mem::take(&mut self.0);
        // A buffer far larger than the bodies now (instances were removed) is freed instead.
        let last = SCRAPE_BUFFERS.last_len.load(Ordering::Relaxed);
        if body.capacity() > 2 * headroom(last) {
            return;
        }
        let mut free = match SCRAPE_BUFFERS.free.lock() {
            Ok(free) => free,
            Err(poisoned) => poisoned.into_inner(),
        };
        if free.len() < POOLED {
            free.push(body);
        }
    }
}

fn encode_into(body: &mut String, registry: &Registry, openmetrics: bool) -> &'static str {
    // Writing into a String cannot fail; an encoder error would be a bug in a collector,
    // and a partial body is still better than none for a scrape.
    if openmetrics {
        let _ = prometheus_client::encoding::text::encode_registry(body, &registry.client);
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(body, &registry.client);
    }
    let mut encoder = Encoder::new(body, openmetrics);
    for source in &registry.sources {
        source.encode(&mut encoder);
    }
    encoder.finish();
    if openmetrics {
        CONTENT_TYPE_OPENMETRICS
    } else {
        if !body.ends_with('\n') {
            let _ = writeln!(body);
        }
        CONTENT_TYPE_TEXT
    }
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|accept| {
        accept
            .split(',')
            .any(|part| part.trim().starts_with("application/openmetrics-text"))
    })
}

#[cfg(test)]
pub(crate) mod tests;
