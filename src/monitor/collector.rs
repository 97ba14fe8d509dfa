//! Scrape-time gauges built from one `Monitor::snapshot`: listener, clients, chats, health, reload.
//!
//! Building these at scrape time means a removed instance's series vanish by construction and
//! the health score on `/metrics` is computed exactly like the one on `/api/v1/health`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::Monitor;
use super::health::Status;

/// The scrape-time collector; register it once at the registry root.
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

/// A gauge family; the label sets are arrays, so a series costs no allocation.
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

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = self.monitor.snapshot();
        let version = env!("CARGO_PKG_VERSION");
        labelled(
            &mut encoder,
            "wxauto_build_info",
            "Build information; always 1.",
            None,
            [([("version", version), ("revision", super::REVISION)], 1.0)],
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
        let instances: Vec<_> = snap.instances.values().collect();
        labelled(
            &mut encoder,
            "wxauto_client_up",
            "1 when the wxauto instance is connected: its last health probe answered connected and no poll failed since.",
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
            "Unix time of the instance's last health probe; 0 before the first.",
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
            "Chats the listener tracks, by state (active, inactive).",
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
        // A 64-bit hash does not fit a float exactly; 52 bits keep it exact and still distinct.
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
