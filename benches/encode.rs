//! Scrape-path cost with 100 instances: encoding `/metrics` (text and OpenMetrics), taking a
//! `Monitor::snapshot`, and computing the health score. A small `Instant`-based harness.
//!
//! `cargo bench --bench encode` measures and prints one `bench name=... ` line per case.
//! Without `--bench` (as `cargo test --all-targets` runs it) each case runs once, as a smoke test.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use wxauto_sidecar::event::{Component, ErrorKind};
use wxauto_sidecar::metrics::process::ProcessCollector;
use wxauto_sidecar::metrics::{self, Metrics};
use wxauto_sidecar::monitor::health::{self, HealthInputs};
use wxauto_sidecar::monitor::{ChatState, Connectivity, InstanceState, Monitor, StateCollector};
use wxauto_sidecar::wxauto::Endpoint;

const INSTANCES: usize = 100;
const CHATS_PER_INSTANCE: usize = 10;
/// Upstream calls recorded per instance and endpoint, spread over the histogram buckets.
const CALLS_PER_ENDPOINT: u32 = 20;

fn main() {
    let measure = std::env::args().any(|arg| arg == "--bench");
    let plan = if measure {
        Plan {
            warmup: Duration::from_millis(500),
            samples: 200,
        }
    } else {
        Plan {
            warmup: Duration::ZERO,
            samples: 1,
        }
    };

    let full = Fixture::new(true);
    let without_process = Fixture::new(false);
    let (text, _) = metrics::encode(&full.registry, false);
    let (openmetrics, _) = metrics::encode(&full.registry, true);
    let series = text.lines().filter(|line| !line.starts_with('#')).count();
    println!(
        "fixture instances={INSTANCES} chats_per_instance={CHATS_PER_INSTANCE} series={series} text_bytes={} openmetrics_bytes={}",
        text.len(),
        openmetrics.len()
    );
    assert!(
        text.contains("wxauto_client_up{instance_id=\"wx-099\"} 1"),
        "the fixture is not what the benchmark claims to measure"
    );

    plan.run("encode_text", 1, || metrics::encode(&full.registry, false));
    plan.run("encode_openmetrics", 1, || {
        metrics::encode(&full.registry, true)
    });
    plan.run("encode_text_without_process_collector", 1, || {
        metrics::encode(&without_process.registry, false)
    });
    plan.run("monitor_snapshot", 10, || full.monitor.snapshot());
    let inputs = HealthInputs {
        running: true,
        listener_errors: 7,
        clients_total: INSTANCES as u64,
        clients_disconnected: 3,
        chats_total: (INSTANCES * CHATS_PER_INSTANCE) as u64,
        chats_inactive: 40,
        window_errors: 12,
        window_messages: 5000,
    };
    plan.run("health_compute", 10_000, || {
        health::compute(black_box(&inputs))
    });
}

/// The registry and monitor wired as `app::run` wires them, filled with 100 instances.
struct Fixture {
    registry: Registry,
    monitor: Arc<Monitor>,
}

impl Fixture {
    fn new(with_process: bool) -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let process = Arc::new(ProcessCollector::new());
        let monitor = Arc::new(Monitor::new(
            metrics,
            Arc::clone(&process),
            Duration::from_secs(3600),
        ));
        if with_process {
            registry.register_collector(Box::new(Arc::clone(&process)));
        }
        registry.register_collector(Box::new(StateCollector::new(Arc::clone(&monitor))));
        monitor.listener_started();
        monitor.set_tasks(INSTANCES);
        monitor.record_reload_success(0x1234_5678, false);

        let now = wxauto_sidecar::clock::unix_seconds(std::time::SystemTime::now());
        for n in 0..INSTANCES {
            let id = format!("wx-{n:03}");
            monitor.register_instance(&id, true);
            let mut state = InstanceState::new(&id, true);
            state.initialized = true;
            state.connected = true;
            state.state = Connectivity::Up;
            state.last_check_time = Some(now);
            for c in 0..CHATS_PER_INSTANCE {
                state.chats.insert(
                    format!("chat-{c}"),
                    ChatState {
                        active: c % 4 != 0,
                        fixed: c == 0,
                        last_message_time: Some(now - c as f64),
                        last_check_time: now,
                        message_count: c as u64 * 3,
                        error_count: 0,
                    },
                );
            }
            monitor.publish_instance(state);
            for endpoint in Endpoint::ALL {
                for call in 0..CALLS_PER_ENDPOINT {
                    // 1 ms .. ~1 s, so most buckets hold something.
                    let elapsed = Duration::from_micros(1000 << (call % 11));
                    let outcome = if call % 10 == 9 { "error" } else { "success" };
                    monitor
                        .metrics()
                        .observe_api_call(&id, endpoint.label(), outcome, elapsed);
                }
            }
            monitor.record_messages(&id, 25);
            monitor.record_listener_added(&id);
            if n % 10 == 0 {
                monitor.record_error(Component::Client, ErrorKind::Timeout, Some(&id), "timeout");
            }
        }
        Self { registry, monitor }
    }
}

/// How long to warm up and how many timed samples to take.
struct Plan {
    warmup: Duration,
    samples: usize,
}

impl Plan {
    /// Times `samples` samples of `batch` calls each and prints the per-call statistics.
    fn run<T>(&self, name: &str, batch: u32, mut f: impl FnMut() -> T) {
        let warm_until = Instant::now() + self.warmup;
        while Instant::now() < warm_until {
            black_box(f());
        }
        let mut per_call: Vec<f64> = Vec::with_capacity(self.samples);
        for _ in 0..self.samples {
            let start = Instant::now();
            for _ in 0..batch {
                black_box(f());
            }
            per_call.push(start.elapsed().as_secs_f64() * 1e6 / f64::from(batch));
        }
        per_call.sort_by(f64::total_cmp);
        let mean = per_call.iter().sum::<f64>() / per_call.len() as f64;
        let at = |q: f64| per_call[((per_call.len() - 1) as f64 * q).round() as usize];
        println!(
            "bench name={name} samples={} batch={batch} mean_us={mean:.3} median_us={:.3} p90_us={:.3} min_us={:.3} max_us={:.3}",
            per_call.len(),
            at(0.5),
            at(0.9),
            at(0.0),
            at(1.0),
        );
    }
}
