//! The event-driven families and the scrape encoder, and the differential test that holds the
//! hand-written encoder to what prometheus-client wrote for the same families.

use super::*;

#[test]
fn an_instance_starts_at_zero_and_leaves_no_series_behind() {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    metrics.init_instance("wx-a");
    metrics.init_instance("wx-b");
    metrics.observe_api_call("wx-a", 0, ApiOutcome::Success, Duration::from_millis(3));
    let (text, _) = encode(&registry, false);
    assert!(text.contains(
        "wxauto_api_requests_total{instance_id=\"wx-a\",endpoint=\"send\",outcome=\"timeout\"} 0"
    ));
    assert!(
        text.contains("wxauto_listeners_removed_total{instance_id=\"wx-a\",reason=\"config\"} 0")
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
    // The statistic counts calls since start: a removed instance's calls stay in it.
    assert_eq!(metrics.api_calls_made(&["wx-b".to_owned()]), 1);
    metrics.observe_api_call("wx-b", 0, ApiOutcome::Success, Duration::from_millis(3));
    assert_eq!(metrics.api_calls_made(&["wx-b".to_owned()]), 2);
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
    metrics.observe_api_call("wx-a", 0, ApiOutcome::Success, Duration::from_millis(30));
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

// === the differential test: the hand-written families against prometheus-client ===

/// One sample of an exposition: its family (the last `# TYPE` name), name, labels in order
/// and value as written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Sample {
    pub family: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: String,
}

/// The samples and the header lines (`# HELP`, `# TYPE`, `# UNIT`) of an exposition, each
/// sorted, so two encoders that order families or series differently compare equal. Panics on
/// a line that is not well-formed, on a header after its family's samples began, and (for
/// OpenMetrics) unless `# EOF` is the last line and appears once.
pub(crate) fn parse(text: &str, openmetrics: bool) -> (Vec<Sample>, Vec<String>) {
    let mut samples = Vec::new();
    let mut headers = Vec::new();
    let mut family = String::new();
    let lines: Vec<&str> = text.lines().collect();
    if openmetrics {
        assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
        assert_eq!(lines.iter().filter(|l| **l == "# EOF").count(), 1);
    }
    for line in lines {
        if line == "# EOF" {
            continue;
        }
        if let Some(header) = line.strip_prefix("# ") {
            let mut words = header.splitn(3, ' ');
            let (kind, name) = (words.next().unwrap(), words.next().unwrap());
            assert!(matches!(kind, "HELP" | "TYPE" | "UNIT"), "{line}");
            if kind == "HELP" {
                family = name.to_owned();
            } else {
                assert_eq!(name, family, "{kind} of another family: {line}");
            }
            headers.push(line.to_owned());
            continue;
        }
        assert!(!line.is_empty(), "empty line in {text}");
        samples.push(parse_sample(&family, line));
    }
    samples.sort();
    headers.sort();
    (samples, headers)
}

fn parse_sample(family: &str, line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line}"));
    let name = &line[..name_end];
    assert!(
        name.starts_with(family.trim_end_matches("_total")),
        "{name} outside its family {family}"
    );
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            let eq = rest
                .find("=\"")
                .unwrap_or_else(|| panic!("bad label: {line}"));
            let key = rest[..eq].to_owned();
            let mut value = String::new();
            let mut chars = rest[eq + 2..].char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => panic!("bad escape {other:?}: {line}"),
                    },
                    Some((i, '"')) => break eq + 2 + i + 1,
                    Some((_, '\n')) | None => panic!("unterminated value: {line}"),
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((key, value));
            rest = &rest[end..];
            if let Some(next) = rest.strip_prefix(',') {
                rest = next;
            } else if let Some(next) = rest.strip_prefix('}') {
                rest = next;
                break;
            } else {
                panic!("bad label list: {line}");
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no value: {line}"));
    assert!(!value.contains(' '), "one value and no timestamp: {line}");
    Sample {
        family: family.to_owned(),
        name: name.to_owned(),
        labels,
        value: value.to_owned(),
    }
}

/// Asserts that two expositions hold the same samples and headers, in both formats.
#[track_caller]
pub(crate) fn assert_same_exposition(ours: &str, theirs: &str, openmetrics: bool) {
    let (ours_samples, ours_headers) = parse(ours, openmetrics);
    let (their_samples, their_headers) = parse(theirs, openmetrics);
    assert_eq!(
        ours_headers, their_headers,
        "headers differ (openmetrics: {openmetrics})"
    );
    if ours_samples != their_samples {
        let only_ours: Vec<_> = ours_samples
            .iter()
            .filter(|s| !their_samples.contains(s))
            .collect();
        let only_theirs: Vec<_> = their_samples
            .iter()
            .filter(|s| !ours_samples.contains(s))
            .collect();
        panic!(
            "samples differ (openmetrics: {openmetrics}):\nonly ours: {only_ours:#?}\nonly theirs: {only_theirs:#?}"
        );
    }
    assert!(!ours_samples.is_empty(), "nothing compared");
}

/// The event-driven families as they were on prometheus-client alone: the oracle.
mod reference {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::{Registry, Unit};

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct InstanceLabels {
        pub instance_id: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ApiLabels {
        pub instance_id: String,
        pub endpoint: &'static str,
        pub outcome: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct EndpointLabels {
        pub instance_id: String,
        pub endpoint: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ReasonLabels {
        pub instance_id: String,
        pub reason: &'static str,
    }

    pub struct Reference {
        pub registry: Registry,
        pub api_requests: Family<ApiLabels, Counter>,
        pub api_duration: Family<EndpointLabels, Histogram, fn() -> Histogram>,
        /// client_errors, listeners_added, messages_processed, messages_recovered,
        /// task_restarts: the slots of `InstanceSeries::counters`.
        pub counters: [Family<InstanceLabels, Counter>; 5],
        pub listeners_removed: Family<ReasonLabels, Counter>,
        pub errors: Family<super::ErrorLabels, Counter>,
        pub listener_restarts: Counter,
        pub config_reloads: Counter,
        pub config_reload_failures: Counter,
    }

    fn histogram() -> Histogram {
        Histogram::new(super::API_DURATION_BOUNDS)
    }

    impl Reference {
        pub fn new() -> Self {
            let mut registry = Registry::default();
            let reference = Self {
                registry: Registry::default(),
                api_requests: Family::default(),
                api_duration: Family::new_with_constructor(histogram as fn() -> Histogram),
                counters: Default::default(),
                listeners_removed: Family::default(),
                errors: Family::default(),
                listener_restarts: Counter::default(),
                config_reloads: Counter::default(),
                config_reload_failures: Counter::default(),
            };
            let wx = registry.sub_registry_with_prefix("wxauto");
            wx.register(
                "api_requests",
                "Calls to wxauto instances by endpoint and outcome (success, error, timeout)",
                reference.api_requests.clone(),
            );
            wx.register_with_unit(
                "api_request_duration",
                "Duration of calls to wxauto instances",
                Unit::Seconds,
                reference.api_duration.clone(),
            );
            let [client_errors, added, processed, recovered, task_restarts] =
                reference.counters.clone();
            wx.register(
                "client_errors",
                "Errors recorded for a wxauto instance (one per transition to down, plus refused requests)",
                client_errors,
            );
            wx.register(
                "errors",
                "Every recorded error, by component (listener, client, delivery, config) and kind",
                reference.errors.clone(),
            );
            wx.register(
                "listeners_added",
                "Chats added as listeners (new or reactivated)",
                added,
            );
            wx.register(
                "listeners_removed",
                "Chats removed as listeners, by reason (timeout, manual, config)",
                reference.listeners_removed.clone(),
            );
            wx.register(
                "messages_processed",
                "Messages received from an instance that passed the filters",
                processed,
            );
            wx.register(
                "messages_recovered",
                "Messages taken from an instance but not stored when the sidecar or an actor died, \
                 found again in the chat's history",
                recovered,
            );
            wx.register(
                "listener_restarts",
                "Restarts of the listener service (API restart, crash recovery)",
                reference.listener_restarts.clone(),
            );
            wx.register(
                "listener_task_restarts",
                "Restarts of one instance actor after it failed or panicked",
                task_restarts,
            );
            wx.register(
                "config_reloads",
                "Successful configuration reloads",
                reference.config_reloads.clone(),
            );
            wx.register(
                "config_reload_failures",
                "Failed configuration reloads (the old configuration stays active)",
                reference.config_reload_failures.clone(),
            );
            Self {
                registry,
                ..reference
            }
        }

        pub fn api_sets(id: &str) -> impl Iterator<Item = ApiLabels> + '_ {
            super::API_ENDPOINTS.into_iter().flat_map(move |endpoint| {
                super::API_OUTCOMES
                    .into_iter()
                    .map(move |outcome| ApiLabels {
                        instance_id: id.to_owned(),
                        endpoint,
                        outcome,
                    })
            })
        }

        pub fn init(&self, id: &str) {
            for labels in Self::api_sets(id) {
                self.api_requests.get_or_create_owned(&labels);
            }
            let labels = InstanceLabels {
                instance_id: id.to_owned(),
            };
            for family in &self.counters {
                family.get_or_create_owned(&labels);
            }
            for reason in super::REMOVE_REASONS {
                self.listeners_removed.get_or_create_owned(&ReasonLabels {
                    instance_id: id.to_owned(),
                    reason,
                });
            }
        }

        pub fn remove(&self, id: &str) {
            for labels in Self::api_sets(id) {
                self.api_requests.remove(&labels);
            }
            for endpoint in super::API_ENDPOINTS {
                self.api_duration.remove(&EndpointLabels {
                    instance_id: id.to_owned(),
                    endpoint,
                });
            }
            let labels = InstanceLabels {
                instance_id: id.to_owned(),
            };
            for family in &self.counters {
                family.remove(&labels);
            }
            for reason in super::REMOVE_REASONS {
                self.listeners_removed.remove(&ReasonLabels {
                    instance_id: id.to_owned(),
                    reason,
                });
            }
        }

        pub fn call(&self, id: &str, endpoint: usize, outcome: usize, seconds: f64) {
            self.api_requests
                .get_or_create_owned(&ApiLabels {
                    instance_id: id.to_owned(),
                    endpoint: super::API_ENDPOINTS[endpoint],
                    outcome: super::API_OUTCOMES[outcome],
                })
                .inc();
            self.api_duration
                .get_or_create_owned(&EndpointLabels {
                    instance_id: id.to_owned(),
                    endpoint: super::API_ENDPOINTS[endpoint],
                })
                .observe(seconds);
        }
    }
}

/// What happens to both implementations.
enum Op {
    Init(&'static str),
    Remove(&'static str),
    Call(&'static str, usize, ApiOutcome, Duration),
    /// A `counters` slot below `LISTENERS_REMOVED`, incremented by n.
    Count(usize, &'static str, u64),
    Removed(&'static str, &'static str),
    Error(&'static str, &'static str),
    Restart,
    Reload,
    ReloadFailure,
}

/// An id with every character a label value must escape.
const NASTY: &str = "wx-\"q\"\\back\nline é";

fn operations() -> Vec<Op> {
    let mut ops = vec![
        Op::Init("wx-a"),
        Op::Init("wx-b"),
        Op::Init(NASTY),
        Op::Init("wx-gone"),
        Op::Init("wx-late"),
    ];
    let durations = [
        0.0, 1e-9, 0.004, 0.005, 0.0051, 0.02, 0.05, 0.3, 1.28, 2.0, 5.12, 20.48, 25.0, 3600.0,
    ];
    for (n, id) in ["wx-a", "wx-b", NASTY, "wx-gone", "wx-late"]
        .into_iter()
        .enumerate()
    {
        for (k, seconds) in durations.iter().enumerate() {
            let endpoint = (n * 3 + k) % API_ENDPOINTS.len();
            let outcome = [ApiOutcome::Success, ApiOutcome::Error, ApiOutcome::Timeout][k % 3];
            ops.push(Op::Call(
                id,
                endpoint,
                outcome,
                Duration::from_secs_f64(*seconds),
            ));
        }
        ops.push(Op::Count(n % INSTANCE_COUNTERS, id, n as u64 * 7 + 1));
        ops.push(Op::Removed(id, REMOVE_REASONS[n % 3]));
    }
    ops.extend([
        Op::Count(MESSAGES_PROCESSED, "wx-a", 1_000_000),
        Op::Count(CLIENT_ERRORS, "wx-b", 3),
        // An instance never initialised: only the series recorded appear.
        Op::Count(LISTENERS_ADDED, "wx-unregistered", 2),
        Op::Call(
            "wx-unregistered",
            4,
            ApiOutcome::Error,
            Duration::from_millis(40),
        ),
        Op::Error("client", "timeout"),
        Op::Error("client", "timeout"),
        Op::Error("config", "reload"),
        Op::Restart,
        Op::Reload,
        Op::ReloadFailure,
        Op::Remove("wx-gone"),
        Op::Remove("wx-late"),
        // A call that lands after its instance was removed brings back that series only.
        Op::Call("wx-late", 2, ApiOutcome::Success, Duration::from_millis(7)),
        Op::Removed("wx-late", "manual"),
    ]);
    ops
}

#[test]
fn the_hand_written_families_expose_what_prometheus_client_exposed() {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let reference = reference::Reference::new();
    for op in operations() {
        match op {
            Op::Init(id) => {
                metrics.init_instance(id);
                reference.init(id);
            }
            Op::Remove(id) => {
                metrics.remove_instance(id);
                reference.remove(id);
            }
            Op::Call(id, endpoint, outcome, elapsed) => {
                metrics.observe_api_call(id, endpoint, outcome, elapsed);
                reference.call(id, endpoint, outcome as usize, elapsed.as_secs_f64());
            }
            Op::Count(slot, id, n) => {
                let family = [
                    &metrics.client_errors,
                    &metrics.listeners_added,
                    &metrics.messages_processed,
                    &metrics.messages_recovered,
                    &metrics.task_restarts,
                ][slot];
                let labels = InstanceLabels {
                    instance_id: id.to_owned(),
                };
                family.get_or_create_owned(&labels).inc_by(n);
                reference.counters[slot]
                    .get_or_create_owned(&reference::InstanceLabels {
                        instance_id: id.to_owned(),
                    })
                    .inc_by(n);
            }
            Op::Removed(id, reason) => {
                metrics
                    .listeners_removed
                    .get_or_create_owned(&ReasonLabels {
                        instance_id: id.to_owned(),
                        reason,
                    })
                    .inc();
                reference
                    .listeners_removed
                    .get_or_create_owned(&reference::ReasonLabels {
                        instance_id: id.to_owned(),
                        reason,
                    })
                    .inc();
            }
            Op::Error(component, kind) => {
                let labels = ErrorLabels { component, kind };
                metrics.errors.get_or_create_owned(&labels).inc();
                reference.errors.get_or_create_owned(&labels).inc();
            }
            Op::Restart => {
                metrics.listener_restarts.inc();
                reference.listener_restarts.inc();
            }
            Op::Reload => {
                metrics.config_reloads.inc();
                reference.config_reloads.inc();
            }
            Op::ReloadFailure => {
                metrics.config_reload_failures.inc();
                reference.config_reload_failures.inc();
            }
        }
    }

    let (ours, _) = encode(&registry, false);
    let mut theirs = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut theirs, &reference.registry).unwrap();
    assert_same_exposition(&ours, &theirs, false);
    let (ours, _) = encode(&registry, true);
    let mut theirs = String::new();
    prometheus_client::encoding::text::encode(&mut theirs, &reference.registry).unwrap();
    assert_same_exposition(&ours, &theirs, true);

    assert!(
        ours.contains(r#"instance_id="wx-\"q\"\\back\nline é""#),
        "escaped"
    );
    assert!(
        !ours.contains("wx-gone"),
        "a removed instance leaves nothing"
    );
    let ids = ["wx-a", "wx-b", NASTY, "wx-late", "wx-unregistered"].map(str::to_owned);
    let calls: u64 = ids
        .iter()
        .flat_map(|id| reference::Reference::api_sets(id))
        .filter_map(|labels| reference.api_requests.get(&labels).map(|c| c.get()))
        .sum();
    // Plus the calls of the instances removed (each removal keeps the calls made until then).
    let mut live = std::collections::HashMap::new();
    let mut removed = 0;
    for op in operations() {
        match op {
            Op::Call(id, ..) => *live.entry(id).or_insert(0) += 1,
            Op::Remove(id) => removed += live.remove(id).unwrap_or(0),
            _ => {}
        }
    }
    assert_eq!(
        removed, 28,
        "wx-gone's and wx-late's calls before their removal"
    );
    assert_eq!(metrics.api_calls_made(&ids), calls + removed);
}

#[test]
fn the_parser_sees_a_difference_in_a_value_a_label_or_a_header() {
    let base = "# HELP a_total A.\n# TYPE a_total counter\na_total{k=\"v\"} 1\n";
    assert_same_exposition(base, base, false);
    for changed in [
        base.replace("} 1", "} 2"),
        base.replace("\"v\"", "\"w\""),
        base.replace("A.", "B."),
        base.replace("{k=\"v\"}", "{k=\"v\",l=\"x\"}"),
    ] {
        let result = std::panic::catch_unwind(|| assert_same_exposition(base, &changed, false));
        assert!(result.is_err(), "not told apart: {changed}");
    }
}
