//! Scrape-time `wxauto_process_*` series, built from the process table: a removed process's
//! series vanish by construction. CPU and memory are summed over the process group.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::{ProcessState, ProcessTable, Status, Usage, usage};
use crate::clock::unix_seconds;
use crate::metrics::process::ProcessCollector;

/// The collector; register it once at the registry root.
#[derive(Debug)]
pub struct ProcessMetrics {
    table: Arc<ProcessTable>,
    sampler: Arc<ProcessCollector>,
}

impl ProcessMetrics {
    /// A collector over `table`, sampling with the sidecar's `sampler`.
    pub fn new(table: Arc<ProcessTable>, sampler: Arc<ProcessCollector>) -> Self {
        Self { table, sampler }
    }
}

struct Row {
    name: String,
    status: Status,
    usage: Usage,
    lines: (u64, u64),
}

fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    kind: MetricType,
    series: impl IntoIterator<Item = (Vec<(&'static str, &'a str)>, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, unit.as_ref(), kind)?;
    for (labels, value) in series {
        let encoder = family.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(encoder)?,
            _ => ConstGauge::new(value).encode(encoder)?,
        }
    }
    Ok(())
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<Row> = self
            .table
            .entries()
            .iter()
            .map(|entry| Row {
                name: entry.name().to_owned(),
                status: entry.status(),
                usage: usage(&self.sampler, entry),
                lines: entry.log_lines(),
            })
            .collect();
        if rows.is_empty() {
            return Ok(());
        }
        let per = |value: fn(&Row) -> Option<f64>| {
            rows.iter()
                .filter_map(move |row| {
                    value(row).map(|v| (vec![("process", row.name.as_str())], v))
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "wxauto_process_up",
            "1 while the supervised process is running (up for at least a second).",
            None,
            MetricType::Gauge,
            per(|row| {
                Some(f64::from(u8::from(
                    row.status.state == ProcessState::Running,
                )))
            }),
        )?;
        let states = rows.iter().flat_map(|row| {
            ProcessState::ALL.iter().map(move |state| {
                (
                    vec![("process", row.name.as_str()), ("state", state.as_str())],
                    f64::from(u8::from(row.status.state == *state)),
                )
            })
        });
        family(
            &mut encoder,
            "wxauto_process_state",
            "State of the supervised process (starting, running, backoff, stopped, exited, fatal); one is 1.",
            None,
            MetricType::Gauge,
            states,
        )?;
        family(
            &mut encoder,
            "wxauto_process_restarts",
            "Starts of the supervised process after its first (automatic, API and reload restarts).",
            None,
            MetricType::Counter,
            per(|row| Some(row.status.restarts as f64)),
        )?;
        family(
            &mut encoder,
            "wxauto_process_start_time",
            "Unix time the supervised process last started; 0 before its first start.",
            Some(Unit::Seconds),
            MetricType::Gauge,
            per(|row| Some(row.status.start_time.map_or(0.0, unix_seconds))),
        )?;
        family(
            &mut encoder,
            "wxauto_process_last_exit_code",
            "Exit code of the last run; -N when killed by signal N. Absent before the first exit.",
            None,
            MetricType::Gauge,
            per(|row| row.status.last_exit_code.map(f64::from)),
        )?;
        family(
            &mut encoder,
            "wxauto_process_cpu",
            "CPU time of the live processes in the supervised process group, in seconds (resets when the group restarts).",
            Some(Unit::Seconds),
            MetricType::Counter,
            per(|row| Some(row.usage.cpu_seconds)),
        )?;
        family(
            &mut encoder,
            "wxauto_process_resident_memory",
            "Resident memory summed over the supervised process group, in bytes.",
            Some(Unit::Bytes),
            MetricType::Gauge,
            per(|row| Some(row.usage.resident_bytes as f64)),
        )?;
        let lines = rows.iter().flat_map(|row| {
            [("stdout", row.lines.0), ("stderr", row.lines.1)]
                .into_iter()
                .map(move |(stream, count)| {
                    (
                        vec![("process", row.name.as_str()), ("stream", stream)],
                        count as f64,
                    )
                })
        });
        family(
            &mut encoder,
            "wxauto_process_log_lines",
            "Lines the supervised process wrote to stdout or stderr (logged by the sidecar).",
            None,
            MetricType::Counter,
            lines,
        )
    }
}
