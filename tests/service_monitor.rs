//! Mirrors the seed's `tests/test_service_monitor.py`: the service monitor's figures and its
//! health score, read from a real in-process sidecar polling a real simulator.
//!
//! Covers: the status and statistics documents counting what the listener really processed
//! (and agreeing with `/metrics`), the health score and its deductions being the same on
//! `/metrics` and `/api/v1/health` while an instance goes down and comes back, and the error
//! ring (`/api/v1/errors`) keeping the newest records within `limit`, oldest first.

use serde_json::Value;

use crate::util::*;

const ID: &str = "wx-sm";
const COMPONENTS: [&str; 4] = ["listener", "clients", "listeners", "error_rate"];

fn up_series() -> String {
    format!("wxauto_client_up{{instance_id=\"{ID}\"}}")
}

/// Sum of every sample of `name` (all label sets) in an exposition text.
fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

async fn wait_client_up(sidecar: &Sidecar, want: f64) {
    let series = up_series();
    eventually(&format!("{series} == {want}"), DEADLINE, || async {
        (sidecar.metric(&series).await == Some(want)).then_some(())
    })
    .await;
}

/// The score and deductions of one `/api/v1/health` answer, checked against one scrape taken
/// right after it; retried while the two straddle a change.
async fn score_agrees(sidecar: &Sidecar, clients: u64, error_rate: u64) -> (u64, Value) {
    eventually(
        &format!("deductions clients {clients}, error_rate {error_rate}, equal on both surfaces"),
        DEADLINE,
        || async {
            let health = sidecar.get_json("/api/v1/health").await;
            let text = sidecar.metrics().await;
            let data = &health["data"];
            if data["deductions"]["clients"] != clients
                || data["deductions"]["error_rate"] != error_rate
            {
                return None;
            }
            let score = data["health_score"].as_u64()?;
            if metric_value(&text, "wxauto_health_score") != Some(score as f64) {
                return None;
            }
            for component in COMPONENTS {
                let series = format!("wxauto_health_deduction_points{{component=\"{component}\"}}");
                if metric_value(&text, &series) != data["deductions"][component].as_f64() {
                    return None;
                }
            }
            Some((score, data["deductions"].clone()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_statistics_count_what_the_listener_processed() {
    let sim = start_sim("sm1").await;
    let (text, env) = config_for(&[(ID, &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    sim.sim.inject("alice", "alice", "one");
    sim.sim.inject("alice", "alice", "two");
    sim.sim.inject("bob", "bob", "three");
    eventually("three messages taken", DEADLINE, || async {
        (sidecar.sink.contents().len() == 3).then_some(())
    })
    .await;
    eventually("both chats published", DEADLINE, || async {
        let listeners = sidecar.get_json("/api/v1/listeners").await;
        (listeners["total_count"] == 2).then_some(())
    })
    .await;

    let stats = sidecar.get_json("/api/v1/statistics").await;
    let data = &stats["data"];
    assert_eq!(stats["success"], true);
    assert_eq!(data["total_messages_processed"], 3, "{stats}");
    assert_eq!(data["listeners_added"], 2, "{stats}");
    assert_eq!(data["total_errors"], 0, "{stats}");
    assert_eq!(data["recent_errors_count"], 0, "{stats}");
    let metrics = sidecar.metrics().await;
    assert_eq!(sum_of(&metrics, "wxauto_messages_processed_total"), 3.0);
    assert_eq!(sum_of(&metrics, "wxauto_listeners_added_total"), 2.0);
    // Every upstream call the statistics count is one on /metrics too (the scrape came later,
    // so it may have seen more polls, never fewer).
    let calls = data["api_calls_made"].as_u64().unwrap() as f64;
    assert!(calls > 0.0);
    assert!(sum_of(&metrics, "wxauto_api_requests_total") >= calls);

    let listeners = sidecar.get_json("/api/v1/listeners").await;
    let per_chat: u64 = listeners["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["message_count"].as_u64().unwrap())
        .sum();
    assert_eq!(per_chat, 3, "{listeners}");

    let status = sidecar.get_json("/api/v1/status").await;
    assert_eq!(status["data"]["running"], true, "{status}");
    assert_eq!(status["data"]["error_count"], 0, "{status}");
    assert!(status["data"]["uptime_seconds"].as_f64().unwrap() >= 0.0);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_score_and_deductions_agree_through_an_outage() {
    let sim = start_sim("sm2").await;
    let (text, env) = config_for(&[(ID, &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    wait_client_up(&sidecar, 1.0).await;
    let (healthy, deductions) = score_agrees(&sidecar, 0, 0).await;
    let sum: u64 = COMPONENTS
        .iter()
        .map(|c| deductions[*c].as_u64().unwrap())
        .sum();
    assert_eq!(healthy + sum, 100, "{deductions}");
    assert_eq!(healthy, 100, "nothing wrong yet: {deductions}");

    sim.sim.set_online(false);
    wait_client_up(&sidecar, 0.0).await;
    // The only instance down: all 30 client points, and its one error against no processed
    // message is an error ratio above 10%: 10 more.
    let (degraded, deductions) = score_agrees(&sidecar, 30, 10).await;
    assert_eq!(degraded, 60, "{deductions}");
    let health = sidecar.get_json("/api/v1/health").await;
    assert_ne!(health["data"]["overall_status"], "healthy", "{health}");

    sim.sim.set_online(true);
    wait_client_up(&sidecar, 1.0).await;
    // The client points come back at once; the error stays in the health window.
    let (recovered, deductions) = score_agrees(&sidecar, 0, 10).await;
    assert_eq!(recovered, 90, "{deductions}");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_ring_keeps_the_newest_within_the_limit() {
    let sim = start_sim("sm3").await;
    let (text, env) = config_for(&[(ID, &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    wait_client_up(&sidecar, 1.0).await;
    // Three outages: one error each.
    for _ in 0..3 {
        sim.sim.set_online(false);
        wait_client_up(&sidecar, 0.0).await;
        sim.sim.set_online(true);
        wait_client_up(&sidecar, 1.0).await;
    }
    let all = eventually("three errors recorded", DEADLINE, || async {
        let errors = sidecar.get_json("/api/v1/errors?limit=100").await;
        (errors["count"] == 3).then_some(errors)
    })
    .await;
    let records = all["data"].as_array().unwrap();
    for record in records {
        assert_eq!(record["instance_id"], ID, "{record}");
        assert!(
            record["error_type"].as_str().unwrap().contains('.'),
            "{record}"
        );
    }
    let times: Vec<f64> = records
        .iter()
        .map(|r| r["time"].as_f64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "oldest first: {times:?}"
    );

    let two = sidecar.get_json("/api/v1/errors?limit=2").await;
    assert_eq!(two["count"], 2, "{two}");
    assert_eq!(
        two["data"].as_array().unwrap().as_slice(),
        &records[1..],
        "limit keeps the newest"
    );
    // The default limit is 10; the figures count the same three errors.
    assert_eq!(sidecar.get_json("/api/v1/errors").await["count"], 3);
    let stats = sidecar.get_json("/api/v1/statistics").await;
    assert_eq!(stats["data"]["recent_errors_count"], 3, "{stats}");
    assert_eq!(stats["data"]["total_errors"], 3, "{stats}");
    let status = sidecar.get_json("/api/v1/status").await;
    assert_eq!(status["data"]["error_count"], 3, "{status}");
    assert!(!status["data"]["last_error_message"].is_null(), "{status}");
    sidecar.stop().await;
}
