//! Scrape-time `process_*` metrics for the sidecar's own pid, from one long-lived `sysinfo::System`.
//!
//! CPU needs the previous refresh, so the `System` lives across scrapes behind a mutex that is
//! never held across an await. Only our own pid is refreshed (tens of microseconds).
//!
//! Readers (`/metrics`, `/api/v1/status`, `/api/v1/health`, the health report) get the last
//! sample. While they keep reading it, `refresh_every` renews it once a second on a blocking
//! thread, so frequent scrapes never walk `/proc`; when nobody read the last sample, the tick
//! does nothing (an idle sidecar does not sample itself every second). A sample older than
//! `MAX_AGE` (after a quiet spell, or with no refresher, as in tests and benches) is renewed by
//! the reader: the first scrape after a pause pays one `/proc` walk, tens of microseconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// One sample of our own process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// Accumulated CPU time in seconds.
    pub cpu_seconds: f64,
    /// Resident set size in bytes.
    pub resident_bytes: u64,
    /// Virtual memory in bytes.
    pub virtual_bytes: u64,
    /// Unix start time in seconds.
    pub start_time_seconds: u64,
    /// Open file descriptors, where the platform tells.
    pub open_fds: Option<u64>,
    /// The fd limit, where the platform tells.
    pub max_fds: Option<u64>,
    /// CPU share since the previous sample, in percent of one core (0 on the first sample).
    pub cpu_percent: f64,
}

/// How often `refresh_every` renews the sample.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(1);

/// A sample older than this is renewed by the reader (the refresher is not running).
const MAX_AGE: Duration = Duration::from_secs(2);

/// Samples the sidecar's own process.
#[derive(Debug)]
pub struct ProcessCollector {
    pid: Pid,
    state: Mutex<SamplerState>,
    /// The last sample and when it was taken. A lock of its own, so readers never wait for a
    /// refresh in progress.
    /// (tokio's `Instant`, which is the std clock outside paused-time tests.)
    cached: Mutex<Option<(tokio::time::Instant, ProcessSample)>>,
    /// Whether a reader took the cached sample since the last refresh (so the next tick
    /// should renew it).
    read_since_refresh: AtomicBool,
    /// Refreshes so far (for tests).
    refreshes: AtomicU64,
}

#[derive(Debug)]
struct SamplerState {
    /// `None` where sysinfo cannot read processes on this platform.
    system: Option<System>,
    previous: Option<(Instant, f64)>,
    last_percent: f64,
    /// Pids sampled for each supervised process last time, so dead ones are dropped from the
    /// `System` on the next refresh.
    groups: HashMap<String, Vec<Pid>>,
}

// === impl ProcessCollector ===

impl ProcessCollector {
    /// A collector for the current process.
    pub fn new() -> Self {
        Self {
            pid: Pid::from_u32(std::process::id()),
            state: Mutex::new(SamplerState {
                system: System::new().ok(),
                previous: None,
                last_percent: 0.0,
                groups: HashMap::new(),
            }),
            cached: Mutex::new(None),
            read_since_refresh: AtomicBool::new(false),
            refreshes: AtomicU64::new(0),
        }
    }

    /// The last sample, renewed here only when it is older than `MAX_AGE` (or there is none).
    pub fn sample(&self) -> ProcessSample {
        let cached = *lock(&self.cached);
        match cached {
            Some((at, sample)) if at.elapsed() < MAX_AGE => {
                self.read_since_refresh.store(true, Ordering::Relaxed);
                sample
            }
            _ => self.refresh(),
        }
    }

    /// Renews the sample every `REFRESH_PERIOD` on a blocking thread until `cancel`, when a
    /// reader took the last one.
    pub async fn refresh_every(
        self: std::sync::Arc<Self>,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        let mut tick = tokio::time::interval(REFRESH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.read_since_refresh.load(Ordering::Relaxed) {
                continue;
            }
            let collector = std::sync::Arc::clone(&self);
            if tokio::task::spawn_blocking(move || collector.refresh())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Reads `/proc` (or the platform's equivalent) now, stores and returns the sample.
    ///
    /// `cpu_percent` is computed from the accumulated CPU time between this sample and the
    /// previous one, so it is a real figure from the second call on. Samples closer than
    /// 200 ms reuse the last percentage (too short an interval gives noise).
    pub fn refresh(&self) -> ProcessSample {
        let sample = self.read();
        *lock(&self.cached) = Some((tokio::time::Instant::now(), sample));
        self.read_since_refresh.store(false, Ordering::Relaxed);
        self.refreshes.fetch_add(1, Ordering::Relaxed);
        sample
    }

    fn read(&self) -> ProcessSample {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let pid = self.pid;
        let Some(system) = state.system.as_mut() else {
            return ProcessSample::default();
        };
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        let Some(process) = system.process(pid) else {
            return ProcessSample::default();
        };
        let cpu_seconds = process.accumulated_cpu_time() as f64 / 1000.0;
        let resident_bytes = process.memory();
        let virtual_bytes = process.virtual_memory();
        let start_time_seconds = process.start_time();
        let now = Instant::now();
        let cpu_percent = match state.previous {
            Some((at, cpu)) if now.duration_since(at) >= Duration::from_millis(200) => {
                let wall = now.duration_since(at).as_secs_f64();
                let percent = ((cpu_seconds - cpu) / wall * 100.0).max(0.0);
                state.previous = Some((now, cpu_seconds));
                state.last_percent = percent;
                percent
            }
            Some(_) => state.last_percent,
            None => {
                state.previous = Some((now, cpu_seconds));
                0.0
            }
        };
        let (open_fds, max_fds) = fds();
        ProcessSample {
            cpu_seconds,
            resident_bytes,
            virtual_bytes,
            start_time_seconds,
            open_fds,
            max_fds,
            cpu_percent,
        }
    }
}

impl ProcessCollector {
    /// CPU seconds and resident bytes summed over `pids` (a supervised process group called
    /// `group`), refreshing only those pids and the ones `group` had last time.
    pub fn sample_pids(&self, group: &str, pids: &[u32]) -> (f64, u64) {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        let current: Vec<Pid> = pids.iter().map(|pid| Pid::from_u32(*pid)).collect();
        let mut refresh = state.groups.remove(group).unwrap_or_default();
        refresh.extend(current.iter().copied());
        state.groups.insert(group.to_owned(), current.clone());
        let Some(system) = state.system.as_mut() else {
            return (0.0, 0);
        };
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&refresh),
            true,
            ProcessRefreshKind::nothing().with_cpu().with_memory(),
        );
        current.iter().filter_map(|pid| system.process(*pid)).fold(
            (0.0, 0),
            |(cpu, rss), process| {
                (
                    cpu + process.accumulated_cpu_time() as f64 / 1000.0,
                    rss + process.memory(),
                )
            },
        )
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Default for ProcessCollector {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(target_os = "linux")]
#[allow(
    clippy::disallowed_methods,
    reason = "/proc is in memory; callers sample on the blocking pool"
)]
fn fds() -> (Option<u64>, Option<u64>) {
    let open = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|entries| entries.count() as u64);
    let max = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|line| line.starts_with("Max open files"))
                .and_then(|line| line.split_whitespace().nth(3))
                .and_then(|soft| soft.parse().ok())
        });
    (open, max)
}

#[cfg(not(target_os = "linux"))]
fn fds() -> (Option<u64>, Option<u64>) {
    (None, None)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sample = self.sample();
        let cpu = ConstCounter::new(sample.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent by the sidecar in seconds.",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?)?;
        let gauges: [(&str, &str, Option<Unit>, Option<f64>); 5] = [
            (
                "process_resident_memory",
                "Resident memory size of the sidecar in bytes.",
                Some(Unit::Bytes),
                Some(sample.resident_bytes as f64),
            ),
            (
                "process_virtual_memory",
                "Virtual memory size of the sidecar in bytes.",
                Some(Unit::Bytes),
                Some(sample.virtual_bytes as f64),
            ),
            (
                "process_start_time",
                "Start time of the sidecar since the unix epoch in seconds.",
                Some(Unit::Seconds),
                Some(sample.start_time_seconds as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                sample.open_fds.map(|n| n as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                sample.max_fds.map(|n| n as f64),
            ),
        ];
        for (name, help, unit, value) in gauges {
            let Some(value) = value else { continue };
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lets the refresher's tick and its blocking refresh run after an `advance`.
    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_renews_the_sample_only_while_someone_reads_it() {
        let collector = std::sync::Arc::new(ProcessCollector::new());
        let cancel = tokio_util::sync::CancellationToken::new();
        let refresher =
            tokio::spawn(std::sync::Arc::clone(&collector).refresh_every(cancel.clone()));
        let refreshes = || collector.refreshes.load(Ordering::Relaxed);
        for _ in 0..5 {
            tokio::time::advance(REFRESH_PERIOD).await;
            settle().await;
        }
        assert_eq!(refreshes(), 0, "nobody read: no sampling");

        // The first read has nothing cached and samples itself.
        let first = collector.sample();
        assert_eq!(refreshes(), 1);
        assert!(first.resident_bytes > 0 || cfg!(not(any(target_os = "linux", windows))));
        // A second read takes the cached sample; the next tick renews it.
        collector.sample();
        assert_eq!(refreshes(), 1);
        tokio::time::advance(REFRESH_PERIOD).await;
        settle().await;
        assert_eq!(
            refreshes(),
            2,
            "a read since the last refresh: the tick renews"
        );
        for _ in 0..5 {
            tokio::time::advance(REFRESH_PERIOD).await;
            settle().await;
        }
        assert_eq!(refreshes(), 2, "no read since: the ticks do nothing");

        // After the quiet spell the cached sample is stale: the reader renews it.
        collector.sample();
        assert_eq!(refreshes(), 3);
        cancel.cancel();
        refresher.await.unwrap();
    }
}
