//! The Prometheus registry and the event-driven metric families (counters and histograms).
//!
//! Gauges that mirror live state (client up, listeners, health) are not here: they are built
//! at scrape time by `monitor::StateCollector`, so they never go stale and removed instances
//! vanish by construction. Process metrics come from `metrics::process`.

pub mod process;

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::wxauto::Endpoint;

/// `Content-Type` of the Prometheus text format 0.0.4.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics 1.0.0.
pub const CONTENT_TYPE_OPENMETRICS: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels of per-instance counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    /// The configured instance id.
    pub instance_id: String,
}

/// Labels of `wxauto_api_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    /// The configured instance id.
    pub instance_id: String,
    /// `Endpoint::label`.
    pub endpoint: &'static str,
    /// success, error, timeout.
    pub outcome: &'static str,
}

/// Labels of `wxauto_api_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// The configured instance id.
    pub instance_id: String,
    /// `Endpoint::label`.
    pub endpoint: &'static str,
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
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The configured instance id.
    pub instance_id: String,
    /// A closed set per metric.
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every event-driven metric family. Cheap to clone (the families are `Arc`s inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    api_requests: Family<ApiLabels, Counter>,
    api_duration: HistogramFamily<EndpointLabels>,
    /// `wxauto_client_errors_total{instance_id}`.
    pub client_errors: Family<InstanceLabels, Counter>,
    /// `wxauto_errors_total{component,kind}`.
    pub errors: Family<ErrorLabels, Counter>,
    /// `wxauto_listeners_added_total{instance_id}`.
    pub listeners_added: Family<InstanceLabels, Counter>,
    /// `wxauto_listeners_removed_total{instance_id,reason}`.
    pub listeners_removed: Family<ReasonLabels, Counter>,
    /// `wxauto_messages_processed_total{instance_id}`.
    pub messages_processed: Family<InstanceLabels, Counter>,
    /// `wxauto_messages_recovered_total{instance_id}`: messages found by re-reading a chat's
    /// history after an unclean stop or an actor crash.
    pub messages_recovered: Family<InstanceLabels, Counter>,
    /// `wxauto_listener_restarts_total`.
    pub listener_restarts: Counter,
    /// `wxauto_listener_task_restarts_total{instance_id}`: one actor restarted after a crash.
    pub task_restarts: Family<InstanceLabels, Counter>,
    /// `wxauto_config_reloads_total`.
    pub config_reloads: Counter,
    /// `wxauto_config_reload_failures_total`.
    pub config_reload_failures: Counter,
}

/// Upper bounds of `wxauto_api_request_duration_seconds`: 5 ms to 20.48 s, ×4 apart (7 bounds,
/// plus `+Inf`). The histogram is per instance and endpoint, so it is most of a sidecar's
/// series: 10 series per called endpoint and instance (16 with the earlier ×2 bounds, each of
/// which these are a subset of).
pub const API_DURATION_BOUNDS: [f64; 7] = [0.005, 0.02, 0.08, 0.32, 1.28, 5.12, 20.48];

fn api_histogram() -> Histogram {
    // Upstream calls are local-network UI automation: milliseconds when polling, seconds when
    // a send drives the WeChat window.
    Histogram::new(API_DURATION_BOUNDS)
}

// === impl Metrics ===

impl Metrics {
    /// Creates the families and registers them (the `wxauto_` prefix is added here).
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            api_requests: Family::default(),
            api_duration: Family::new_with_constructor(api_histogram),
            client_errors: Family::default(),
            errors: Family::default(),
            listeners_added: Family::default(),
            listeners_removed: Family::default(),
            messages_processed: Family::default(),
            messages_recovered: Family::default(),
            listener_restarts: Counter::default(),
            task_restarts: Family::default(),
            config_reloads: Counter::default(),
            config_reload_failures: Counter::default(),
        };
        let wx = registry.sub_registry_with_prefix("wxauto");
        wx.register(
            "api_requests",
            "Calls to wxauto instances by endpoint and outcome (success, error, timeout)",
            metrics.api_requests.clone(),
        );
        wx.register_with_unit(
            "api_request_duration",
            "Duration of calls to wxauto instances",
            Unit::Seconds,
            metrics.api_duration.clone(),
        );
        wx.register(
            "client_errors",
            "Errors recorded for a wxauto instance (one per transition to down, plus refused requests)",
            metrics.client_errors.clone(),
        );
        wx.register(
            "errors",
            "Every recorded error, by component (listener, client, delivery, config) and kind",
            metrics.errors.clone(),
        );
        wx.register(
            "listeners_added",
            "Chats added as listeners (new or reactivated)",
            metrics.listeners_added.clone(),
        );
        wx.register(
            "listeners_removed",
            "Chats removed as listeners, by reason (timeout, manual, config)",
            metrics.listeners_removed.clone(),
        );
        wx.register(
            "messages_processed",
            "Messages received from an instance that passed the filters",
            metrics.messages_processed.clone(),
        );
        wx.register(
            "messages_recovered",
            "Messages taken from an instance but not stored when the sidecar or an actor died, \
             found again in the chat's history",
            metrics.messages_recovered.clone(),
        );
        wx.register(
            "listener_restarts",
            "Restarts of the listener service (API restart, crash recovery)",
            metrics.listener_restarts.clone(),
        );
        wx.register(
            "listener_task_restarts",
            "Restarts of one instance actor after it failed or panicked",
            metrics.task_restarts.clone(),
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

    /// Records one upstream call.
    pub fn observe_api_call(
        &self,
        instance_id: &str,
        endpoint: &'static str,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        self.api_requests
            .get_or_create_owned(&ApiLabels {
                instance_id: instance_id.to_owned(),
                endpoint,
                outcome,
            })
            .inc();
        self.api_duration
            .get_or_create_owned(&EndpointLabels {
                instance_id: instance_id.to_owned(),
                endpoint,
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Creates every series of an instance at 0, so ratios work from the first scrape.
    pub fn init_instance(&self, instance_id: &str) {
        for labels in api_label_sets(instance_id) {
            self.api_requests.get_or_create_owned(&labels);
        }
        let labels = InstanceLabels {
            instance_id: instance_id.to_owned(),
        };
        for family in self.instance_counters() {
            family.get_or_create_owned(&labels);
        }
        for labels in remove_label_sets(instance_id) {
            self.listeners_removed.get_or_create_owned(&labels);
        }
    }

    /// Drops every series of a removed instance.
    pub fn remove_instance(&self, instance_id: &str) {
        for labels in api_label_sets(instance_id) {
            self.api_requests.remove(&labels);
        }
        for endpoint in Endpoint::ALL {
            self.api_duration.remove(&EndpointLabels {
                instance_id: instance_id.to_owned(),
                endpoint: endpoint.label(),
            });
        }
        let labels = InstanceLabels {
            instance_id: instance_id.to_owned(),
        };
        for family in self.instance_counters() {
            family.remove(&labels);
        }
        for labels in remove_label_sets(instance_id) {
            self.listeners_removed.remove(&labels);
        }
    }

    /// The counter families labelled by `instance_id` alone.
    fn instance_counters(&self) -> [&Family<InstanceLabels, Counter>; 5] {
        [
            &self.client_errors,
            &self.listeners_added,
            &self.messages_processed,
            &self.messages_recovered,
            &self.task_restarts,
        ]
    }

    /// Total upstream calls made so far (the statistics' `api_calls_made`).
    pub fn api_calls_made(&self, instance_ids: &[String]) -> u64 {
        instance_ids
            .iter()
            .flat_map(|id| api_label_sets(id))
            .filter_map(|labels| self.api_requests.get(&labels).map(|counter| counter.get()))
            .sum()
    }
}

/// The closed set of `wxauto_api_requests_total` outcomes.
pub const API_OUTCOMES: [&str; 3] = ["success", "error", "timeout"];

/// Every `wxauto_api_requests_total` label set of one instance.
fn api_label_sets(instance_id: &str) -> impl Iterator<Item = ApiLabels> + '_ {
    Endpoint::ALL.into_iter().flat_map(move |endpoint| {
        API_OUTCOMES.into_iter().map(move |outcome| ApiLabels {
            instance_id: instance_id.to_owned(),
            endpoint: endpoint.label(),
            outcome,
        })
    })
}

/// Every `wxauto_listeners_removed_total` label set of one instance.
fn remove_label_sets(instance_id: &str) -> impl Iterator<Item = ReasonLabels> + '_ {
    REMOVE_REASONS.into_iter().map(move |reason| ReasonLabels {
        instance_id: instance_id.to_owned(),
        reason,
    })
}

/// The closed set of `wxauto_listeners_removed_total` reasons.
pub const REMOVE_REASONS: [&str; 3] = ["timeout", "manual", "config"];

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
    if openmetrics {
        // Writing into a String cannot fail; an encoder error would be a bug in a collector,
        // and a partial body is still better than none for a scrape.
        let _ = prometheus_client::encoding::text::encode(body, registry);
        CONTENT_TYPE_OPENMETRICS
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(body, registry);
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
mod tests {
    use super::*;

    #[test]
    fn an_instance_starts_at_zero_and_leaves_no_series_behind() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.init_instance("wx-a");
        metrics.init_instance("wx-b");
        metrics.observe_api_call("wx-a", "health", "success", Duration::from_millis(3));
        let (text, _) = encode(&registry, false);
        assert!(text.contains(
            "wxauto_api_requests_total{instance_id=\"wx-a\",endpoint=\"send\",outcome=\"timeout\"} 0"
        ));
        assert!(
            text.contains(
                "wxauto_listeners_removed_total{instance_id=\"wx-a\",reason=\"config\"} 0"
            )
        );
        assert!(text.contains("wxauto_api_request_duration_seconds_bucket{instance_id=\"wx-a\""));
        assert_eq!(
            metrics.api_calls_made(&["wx-a".to_owned(), "wx-b".to_owned()]),
            1
        );

        metrics.remove_instance("wx-a");
        let (text, _) = encode(&registry, false);
        assert!(
            !text.contains("\"wx-a\""),
            "series of a removed instance remain"
        );
        assert!(text.contains("instance_id=\"wx-b\""));
        // HELP lines end with exactly one period (the registry appends it).
        assert!(
            text.lines()
                .filter(|line| line.starts_with("# HELP"))
                .all(|line| !line.ends_with(".."))
        );
    }

    #[test]
    fn a_called_endpoint_costs_ten_histogram_series_per_instance() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.init_instance("wx-a");
        metrics.observe_api_call("wx-a", "health", "success", Duration::from_millis(30));
        let (text, _) = encode(&registry, false);
        let histogram: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("wxauto_api_request_duration_seconds"))
            .collect();
        // 7 bounds, +Inf, _sum and _count.
        assert_eq!(histogram.len(), 10, "{histogram:#?}");
        assert!(histogram.contains(
            &"wxauto_api_request_duration_seconds_bucket{instance_id=\"wx-a\",endpoint=\"health\",le=\"0.08\"} 1"
        ));
        assert!(histogram.contains(
            &"wxauto_api_request_duration_seconds_bucket{instance_id=\"wx-a\",endpoint=\"health\",le=\"0.02\"} 0"
        ));
    }

    #[test]
    fn pooled_scrapes_encode_the_same_body_and_reuse_buffers() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        for n in 0..20 {
            metrics.init_instance(&format!("wx-{n}"));
        }
        let (plain, plain_type) = encode(&registry, false);
        let (first, first_type) = encode_pooled(&registry, false);
        assert_eq!(first.as_ref(), plain.as_bytes());
        assert_eq!(first_type, plain_type);
        drop(first);
        // The buffer went back to the pool: the next scrape starts from it, cleared.
        let (second, _) = encode_pooled(&registry, true);
        let (openmetrics, _) = encode(&registry, true);
        assert_eq!(second.as_ref(), openmetrics.as_bytes());
    }

    #[test]
    fn accept_header_negotiation() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!wants_openmetrics(Some("*/*")));
        assert!(!wants_openmetrics(None));
    }
}
