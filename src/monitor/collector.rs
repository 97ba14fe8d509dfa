//! Scrape-time gauges built from one `Monitor::snapshot`: listener, clients, chats, health, reload.
//!
//! Building these at scrape time means a removed instance's series vanish by construction and
//! the health score on `/metrics` is computed exactly like the one on `/api/v1/health`. They
//! are written by the hand-written encoder (`metrics::text`) from a snapshot that borrows the
//! instances instead of copying every chat (`Monitor::with_snapshot`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::metrics::Source;
use crate::metrics::text::{Descriptor, Encoder};

use super::health::Status;
use super::{InstanceState, Monitor, Snapshot};

/// The scrape-time source; register it once (`Registry::register_source`).
#[derive(Debug)]
pub struct StateCollector {
    monitor: Arc<Monitor>,
}

impl StateCollector {
    /// A collector reading `monitor`.
    pub fn new(monitor: Arc<Monitor>) -> Self {
        Self { monitor }
    }
}

impl Source for StateCollector {
    fn encode(&self, encoder: &mut Encoder<'_>) {
        self.monitor
            .with_snapshot(|snap, instances| write(encoder, &snap, instances));
    }
}

const SECONDS: Option<&str> = Some("seconds");

static BUILD_INFO: Descriptor =
    Descriptor::gauge("wxauto_build_info", "Build information; always 1.", None);
static LISTENER_RUNNING: Descriptor = Descriptor::gauge(
    "wxauto_listener_running",
    "1 while the listener service runs.",
    None,
);
static LISTENER_START_TIME: Descriptor = Descriptor::gauge(
    "wxauto_listener_start_time_seconds",
    "Unix time the listener service last started.",
    SECONDS,
);
static UPTIME: Descriptor = Descriptor::gauge(
    "wxauto_uptime_seconds",
    "Seconds since the listener service last started (0 when stopped). Prefer time() - wxauto_listener_start_time_seconds.",
    SECONDS,
);
static LISTENER_TASKS: Descriptor =
    Descriptor::gauge("wxauto_listener_tasks", "Live supervised tasks.", None);
static RECENT_ERRORS: Descriptor = Descriptor::gauge(
    "wxauto_recent_errors",
    "Errors recorded inside health.window.",
    None,
);
static LAST_ERROR_TIMESTAMP: Descriptor = Descriptor::gauge(
    "wxauto_last_error_timestamp_seconds",
    "Unix time of the last recorded error; 0 if none.",
    SECONDS,
);
static ERROR_RATIO: Descriptor = Descriptor::gauge(
    "wxauto_error_ratio",
    "Errors divided by max(1, messages processed), both inside health.window.",
    None,
);
static INSTANCE_ENABLED: Descriptor = Descriptor::gauge(
    "wxauto_instance_enabled",
    "1 for a configured wxauto instance that is enabled, 0 for a disabled one (not polled, not counted in the health score, no wxauto_client_up).",
    None,
);
static CLIENT_UP: Descriptor = Descriptor::gauge(
    "wxauto_client_up",
    "1 when the enabled wxauto instance is connected: its last health probe answered connected and no poll failed since.",
    None,
);
static CLIENT_LAST_CHECK: Descriptor = Descriptor::gauge(
    "wxauto_client_last_check_timestamp_seconds",
    "Unix time of the enabled instance's last health probe; 0 before the first.",
    SECONDS,
);
static LISTENERS: Descriptor = Descriptor::gauge(
    "wxauto_listeners",
    "Chats the listener tracks on enabled instances, by state (active, inactive).",
    None,
);
static HEALTH_SCORE: Descriptor = Descriptor::gauge(
    "wxauto_health_score",
    "Health score 0-100: 100 minus the deductions for listener (40/20/10), clients (disconnected*30 div total), listeners (inactive*20 div total) and error ratio (10 above 0.10, 5 above 0.05).",
    None,
);
static HEALTH_STATUS: Descriptor = Descriptor::gauge(
    "wxauto_health_status",
    "Health status; the current one is 1 (healthy >= 80, warning >= 60, critical below).",
    None,
);
static HEALTH_DEDUCTIONS: Descriptor = Descriptor::gauge(
    "wxauto_health_deduction_points",
    "Points the health score loses per component; 100 minus their sum is the score (floored at 0).",
    None,
);
static RELOAD_SUCCESSFUL: Descriptor = Descriptor::gauge(
    "wxauto_config_last_reload_successful",
    "1 if the last configuration load succeeded, else 0.",
    None,
);
static RELOAD_SUCCESS_TIMESTAMP: Descriptor = Descriptor::gauge(
    "wxauto_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful configuration load.",
    SECONDS,
);
static CONFIG_HASH: Descriptor = Descriptor::gauge(
    "wxauto_config_hash",
    "Hash of the active configuration (and its key files), as a number.",
    None,
);

fn flag(on: bool) -> f64 {
    f64::from(u8::from(on))
}

/// Writes every family of the collector for `snap` and `instances` (one pass per family).
pub(super) fn write(
    encoder: &mut Encoder<'_>,
    snap: &Snapshot,
    instances: &BTreeMap<String, InstanceState>,
) {
    let scalar = |encoder: &mut Encoder<'_>, family: &'static Descriptor, value: f64| {
        encoder.family(family);
        encoder.gauge(&[], value);
    };
    encoder.family(&BUILD_INFO);
    encoder.gauge(
        &[
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", super::REVISION),
        ],
        1.0,
    );
    scalar(encoder, &LISTENER_RUNNING, flag(snap.running));
    scalar(
        encoder,
        &LISTENER_START_TIME,
        snap.listener_start_time.unwrap_or(0.0),
    );
    scalar(encoder, &UPTIME, snap.uptime_seconds);
    scalar(encoder, &LISTENER_TASKS, snap.tasks as f64);
    scalar(encoder, &RECENT_ERRORS, snap.window_errors as f64);
    scalar(
        encoder,
        &LAST_ERROR_TIMESTAMP,
        snap.last_error.as_ref().map_or(0.0, |error| error.time),
    );
    scalar(encoder, &ERROR_RATIO, snap.error_ratio);
    encoder.family(&INSTANCE_ENABLED);
    for state in instances.values() {
        encoder.gauge(
            &[("instance_id", state.instance_id.as_str())],
            flag(state.enabled),
        );
    }
    // A disabled instance is not polled: "up" would mean nothing, and a 0 would fire
    // WxautoClientDown for an instance switched off on purpose. Its chats are not counted in
    // the score either. Only enabled instances have these families, as in the health formula.
    let enabled = || instances.values().filter(|state| state.enabled);
    encoder.family(&CLIENT_UP);
    for state in enabled() {
        encoder.gauge(
            &[("instance_id", state.instance_id.as_str())],
            flag(state.connected),
        );
    }
    encoder.family(&CLIENT_LAST_CHECK);
    for state in enabled() {
        encoder.gauge(
            &[("instance_id", state.instance_id.as_str())],
            state.last_check_time.unwrap_or(0.0),
        );
    }
    encoder.family(&LISTENERS);
    for state in enabled() {
        let active = state.active_chats();
        let inactive = state.chats.len() - active;
        let id = state.instance_id.as_str();
        encoder.gauge(&[("instance_id", id), ("state", "active")], active as f64);
        encoder.gauge(
            &[("instance_id", id), ("state", "inactive")],
            inactive as f64,
        );
    }
    scalar(encoder, &HEALTH_SCORE, f64::from(snap.health.score));
    encoder.family(&HEALTH_STATUS);
    for status in Status::ALL {
        encoder.gauge(
            &[("status", status.as_str())],
            flag(status == snap.health.status),
        );
    }
    let d = snap.health.deductions;
    encoder.family(&HEALTH_DEDUCTIONS);
    for (component, points) in [
        ("listener", d.listener),
        ("clients", d.clients),
        ("listeners", d.listeners),
        ("error_rate", d.error_rate),
    ] {
        encoder.gauge(&[("component", component)], f64::from(points));
    }
    scalar(
        encoder,
        &RELOAD_SUCCESSFUL,
        flag(snap.reload.last_reload_successful),
    );
    scalar(
        encoder,
        &RELOAD_SUCCESS_TIMESTAMP,
        snap.reload.last_success_time,
    );
    // A 64-bit hash does not fit a float exactly; 52 bits keep it exact and still distinct.
    scalar(
        encoder,
        &CONFIG_HASH,
        (snap.reload.config_hash & ((1u64 << 52) - 1)) as f64,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::registry::Unit;

    use super::*;
    use crate::metrics::process::ProcessCollector;
    use crate::metrics::tests::assert_same_exposition;
    use crate::metrics::{Metrics, Registry};
    use crate::monitor::{ChatState, Connectivity};

    /// The collector as it was on prometheus-client's `ConstGauge`s: the oracle.
    #[derive(Debug)]
    struct Reference(Snapshot);

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        value: f64,
    ) -> Result<(), std::fmt::Error> {
        let metric = ConstGauge::new(value);
        metric.encode(encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?)
    }

    fn labelled<L: EncodeLabelSet>(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        series: impl IntoIterator<Item = (L, f64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), MetricType::Gauge)?;
        for (labels, value) in series {
            ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    impl Collector for Reference {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let snap = &self.0;
            let version = env!("CARGO_PKG_VERSION");
            labelled(
                &mut encoder,
                "wxauto_build_info",
                "Build information; always 1.",
                None,
                [(
                    [("version", version), ("revision", crate::monitor::REVISION)],
                    1.0,
                )],
            )?;
            gauge(
                &mut encoder,
                "wxauto_listener_running",
                "1 while the listener service runs.",
                None,
                f64::from(u8::from(snap.running)),
            )?;
            gauge(
                &mut encoder,
                "wxauto_listener_start_time",
                "Unix time the listener service last started.",
                Some(Unit::Seconds),
                snap.listener_start_time.unwrap_or(0.0),
            )?;
            gauge(
                &mut encoder,
                "wxauto_uptime",
                "Seconds since the listener service last started (0 when stopped). Prefer time() - wxauto_listener_start_time_seconds.",
                Some(Unit::Seconds),
                snap.uptime_seconds,
            )?;
            gauge(
                &mut encoder,
                "wxauto_listener_tasks",
                "Live supervised tasks.",
                None,
                snap.tasks as f64,
            )?;
            gauge(
                &mut encoder,
                "wxauto_recent_errors",
                "Errors recorded inside health.window.",
                None,
                snap.window_errors as f64,
            )?;
            gauge(
                &mut encoder,
                "wxauto_last_error_timestamp",
                "Unix time of the last recorded error; 0 if none.",
                Some(Unit::Seconds),
                snap.last_error.as_ref().map_or(0.0, |error| error.time),
            )?;
            gauge(
                &mut encoder,
                "wxauto_error_ratio",
                "Errors divided by max(1, messages processed), both inside health.window.",
                None,
                snap.error_ratio,
            )?;
            labelled(
                &mut encoder,
                "wxauto_instance_enabled",
                "1 for a configured wxauto instance that is enabled, 0 for a disabled one (not polled, not counted in the health score, no wxauto_client_up).",
                None,
                snap.instances.values().map(|state| {
                    (
                        [("instance_id", state.instance_id.as_str())],
                        f64::from(u8::from(state.enabled)),
                    )
                }),
            )?;
            let instances: Vec<_> = snap
                .instances
                .values()
                .filter(|state| state.enabled)
                .collect();
            labelled(
                &mut encoder,
                "wxauto_client_up",
                "1 when the enabled wxauto instance is connected: its last health probe answered connected and no poll failed since.",
                None,
                instances.iter().map(|state| {
                    (
                        [("instance_id", state.instance_id.as_str())],
                        f64::from(u8::from(state.connected)),
                    )
                }),
            )?;
            labelled(
                &mut encoder,
                "wxauto_client_last_check_timestamp",
                "Unix time of the enabled instance's last health probe; 0 before the first.",
                Some(Unit::Seconds),
                instances.iter().map(|state| {
                    (
                        [("instance_id", state.instance_id.as_str())],
                        state.last_check_time.unwrap_or(0.0),
                    )
                }),
            )?;
            labelled(
                &mut encoder,
                "wxauto_listeners",
                "Chats the listener tracks on enabled instances, by state (active, inactive).",
                None,
                instances.iter().flat_map(|state| {
                    let active = state.active_chats();
                    let inactive = state.chats.len() - active;
                    [
                        (
                            [
                                ("instance_id", state.instance_id.as_str()),
                                ("state", "active"),
                            ],
                            active as f64,
                        ),
                        (
                            [
                                ("instance_id", state.instance_id.as_str()),
                                ("state", "inactive"),
                            ],
                            inactive as f64,
                        ),
                    ]
                }),
            )?;
            gauge(
                &mut encoder,
                "wxauto_health_score",
                "Health score 0-100: 100 minus the deductions for listener (40/20/10), clients (disconnected*30 div total), listeners (inactive*20 div total) and error ratio (10 above 0.10, 5 above 0.05).",
                None,
                f64::from(snap.health.score),
            )?;
            labelled(
                &mut encoder,
                "wxauto_health_status",
                "Health status; the current one is 1 (healthy >= 80, warning >= 60, critical below).",
                None,
                Status::ALL.iter().map(|status| {
                    (
                        [("status", status.as_str())],
                        f64::from(u8::from(*status == snap.health.status)),
                    )
                }),
            )?;
            let d = snap.health.deductions;
            labelled(
                &mut encoder,
                "wxauto_health_deduction_points",
                "Points the health score loses per component; 100 minus their sum is the score (floored at 0).",
                None,
                [
                    ([("component", "listener")], f64::from(d.listener)),
                    ([("component", "clients")], f64::from(d.clients)),
                    ([("component", "listeners")], f64::from(d.listeners)),
                    ([("component", "error_rate")], f64::from(d.error_rate)),
                ],
            )?;
            gauge(
                &mut encoder,
                "wxauto_config_last_reload_successful",
                "1 if the last configuration load succeeded, else 0.",
                None,
                f64::from(u8::from(snap.reload.last_reload_successful)),
            )?;
            gauge(
                &mut encoder,
                "wxauto_config_last_reload_success_timestamp",
                "Unix time of the last successful configuration load.",
                Some(Unit::Seconds),
                snap.reload.last_success_time,
            )?;
            gauge(
                &mut encoder,
                "wxauto_config_hash",
                "Hash of the active configuration (and its key files), as a number.",
                None,
                (snap.reload.config_hash & ((1u64 << 52) - 1)) as f64,
            )?;
            Ok(())
        }
    }

    /// A monitor with connected and disconnected instances, chats in both states, an id that
    /// needs escaping, an error and a reload.
    fn populated() -> Arc<Monitor> {
        let mut registry = Registry::default();
        let monitor = Arc::new(Monitor::new(
            Metrics::register(&mut registry),
            Arc::new(ProcessCollector::new()),
            Duration::from_secs(600),
        ));
        monitor.listener_started();
        monitor.set_tasks(4);
        monitor.record_reload_success(0xfedc_ba98_7654_3210, false);
        for (n, id) in ["wx-a", "wx-b", "wx-\"q\"\\back\nline é", "wx-off"]
            .into_iter()
            .enumerate()
        {
            monitor.register_instance(id, n != 3);
            let mut state = InstanceState::new(id, n != 3);
            state.connected = n % 2 == 0;
            state.state = if state.connected {
                Connectivity::Up
            } else {
                Connectivity::Down
            };
            state.last_check_time = (n != 1).then_some(1_796_000_000.25 + n as f64);
            for c in 0..n * 3 {
                state.chats.insert(
                    format!("chat-{c}"),
                    ChatState {
                        active: c % 3 != 0,
                        fixed: false,
                        last_message_time: None,
                        last_check_time: 0.0,
                        message_count: 0,
                        error_count: 0,
                    },
                );
            }
            monitor.publish_instance(state);
        }
        monitor.record_messages("wx-a", 40);
        monitor.record_reload_failure(&["bad key".to_owned()]);
        monitor
    }

    #[test]
    fn the_state_gauges_expose_what_prometheus_client_exposed() {
        let monitor = populated();
        let snap = monitor.snapshot();
        assert!(snap.health.score < 100, "the fixture has deductions");
        for openmetrics in [false, true] {
            let mut ours = String::new();
            let mut encoder = Encoder::new(&mut ours, openmetrics);
            write(&mut encoder, &snap, &snap.instances);
            encoder.finish();
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register_collector(Box::new(Reference(snap.clone())));
            let mut theirs = String::new();
            if openmetrics {
                prometheus_client::encoding::text::encode(&mut theirs, &registry).unwrap();
            } else {
                prometheus_client::encoding::prometheus_text::encode(&mut theirs, &registry)
                    .unwrap();
            }
            assert_same_exposition(&ours, &theirs, openmetrics);
        }
    }

    #[test]
    fn a_scrape_reads_the_instances_without_copying_them_and_drops_removed_ones() {
        let monitor = populated();
        let collector = StateCollector::new(Arc::clone(&monitor));
        let mut text = String::new();
        collector.encode(&mut Encoder::new(&mut text, false));
        assert!(text.contains("wxauto_listeners{instance_id=\"wx-b\",state=\"active\"} 2.0\n"));
        assert!(
            text.contains("wxauto_client_up{instance_id=\"wx-\\\"q\\\"\\\\back\\nline é\"} 1.0\n")
        );
        // The disabled instance is named, and has no connectivity or chat series.
        assert!(text.contains("wxauto_instance_enabled{instance_id=\"wx-off\"} 0.0\n"));
        assert!(text.contains("wxauto_instance_enabled{instance_id=\"wx-a\"} 1.0\n"));
        for family in [
            "wxauto_client_up{",
            "wxauto_client_last_check_timestamp_seconds{",
            "wxauto_listeners{",
        ] {
            assert!(
                !text.contains(&format!("{family}instance_id=\"wx-off\"")),
                "{family}"
            );
        }
        monitor.remove_instance("wx-b");
        let mut text = String::new();
        collector.encode(&mut Encoder::new(&mut text, false));
        assert!(!text.contains("wx-b"), "{text}");
        assert!(text.contains("wxauto_client_up{instance_id=\"wx-a\"} 1.0\n"));
    }
}
