//! Retry timing of the real workers (platform and reply stage) in paused time: a real webhook
//! server on loopback, a real SQLite file, and the workers scheduling by tokio's clock
//! (`Clock::Tokio`) instead of the wall clock, so a retry comes due exactly when paused time
//! reaches it.
//!
//! Paused time moves only while every task is idle: the store's `spawn_blocking` calls hold
//! it, and the loopback calls complete at one instant, so the platform timeout (3 s) never
//! fires on its own.

use super::*;

const SECOND: Duration = Duration::from_secs(1);

/// Like `Harness::start`, with the workers on tokio's clock.
async fn start_paused(config: &DeliveryConfig, routing: Routing) -> Harness {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data").join("messages.db");
    let replies = Arc::new(Replies::default());
    let errors = Arc::new(Errors::default());
    let mut registry = Registry::default();
    let cancel = CancellationToken::new();
    let clock = Clock::Tokio {
        origin_ms: store::now_ms(),
        origin: tokio::time::Instant::now(),
    };
    let delivery = Delivery::start_with_clock(
        &storage(&path),
        config,
        media_settings(&path),
        routing,
        Arc::clone(&replies) as Arc<dyn ReplySender>,
        Arc::clone(&errors) as Arc<dyn ErrorSink>,
        &mut registry,
        cancel.clone(),
        clock,
    )
    .await
    .expect("delivery starts");
    Harness {
        delivery,
        replies,
        errors,
        registry,
        cancel,
        _dir: Some(dir),
    }
}

/// Steps paused time until `message_id` is in `state`; fails after `limit` of it.
async fn wait_state(harness: &Harness, message_id: &str, state: &str, limit: Duration) -> u32 {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some((now, attempts, _)) = harness.state(message_id).await
            && now == state
        {
            return attempts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{message_id} not {state} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Attempt `n + 1` follows attempt `n` after the backoff of attempt `n`: `[0.8, 1] × cap`,
/// the cap doubling from 1 s up to 4 s (and a few ms for the store's whole-ms times).
fn assert_gaps(requests: &[Recorded], caps: &[u32]) {
    let times: Vec<tokio::time::Instant> = requests.iter().map(|r| r.at).collect();
    assert_time_gaps(&times, caps);
}

/// `assert_gaps` for the times of any kind of attempt.
fn assert_time_gaps(times: &[tokio::time::Instant], caps: &[u32]) {
    assert_eq!(times.len(), caps.len() + 1, "attempts");
    for (n, (pair, cap)) in times.windows(2).zip(caps).enumerate() {
        let gap = pair[1] - pair[0];
        let cap = *cap * SECOND;
        assert!(
            gap >= cap.mul_f64(0.8) && gap <= cap + Duration::from_millis(10),
            "retry {}: {gap:?} after the failed attempt, outside [{:?}, {cap:?}]",
            n + 1,
            cap.mul_f64(0.8)
        );
    }
}

fn paused_config(max_attempts: u32) -> DeliveryConfig {
    DeliveryConfig {
        workers: 1,
        max_attempts,
        backoff: BackoffConfig {
            initial: SECOND,
            max: 4 * SECOND,
        },
        attempt_timeout: 30 * SECOND,
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_platform_is_retried_after_a_doubling_capped_backoff_then_dead_lettered() {
    let server = Server::start(vec![]).await;
    server.respond_with(|_| Step::Empty(500));
    let harness = start_paused(
        &paused_config(5),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    let attempts = wait_state(&harness, "m1", "dead", 60 * SECOND).await;
    assert_eq!(attempts, 5);
    let requests = server.requests();
    assert_gaps(&requests, &[1, 2, 4, 4]);
    let numbers: Vec<u64> = requests
        .iter()
        .map(|r| r.body["attempt"].as_u64().expect("attempt"))
        .collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5]);
    // Dead is final: a minute more of (paused) time brings no sixth attempt.
    tokio::time::sleep(60 * SECOND).await;
    assert_eq!(server.count(), 5);
    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="retry"} 4"#
    ));
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="dead"} 1"#
    ));
    harness.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_retry_that_succeeds_is_delivered_and_the_next_message_waits_behind_it() {
    let server = Server::start(vec![Step::Empty(503), Step::Empty(503)]).await;
    let harness = start_paused(
        &paused_config(5),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .accept(vec![msg("a", "a", "m1", "x"), msg("a", "a", "m2", "y")])
        .await;
    assert_eq!(
        wait_state(&harness, "m2", "delivered", 30 * SECOND).await,
        1
    );
    assert_eq!(harness.state("m1").await.map(|row| row.1), Some(3));
    let requests = server.requests();
    // m1 three times (1 s, then 2 s apart), then m2 at once: the chat keeps its order.
    let keys: Vec<String> = requests.iter().map(Recorded::key).collect();
    assert_eq!(keys, ["wx1:m1", "wx1:m1", "wx1:m1", "wx1:m2"]);
    assert_gaps(&requests[..3], &[1, 2]);
    assert!(requests[3].at - requests[2].at < Duration::from_millis(10));
    harness.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failing_reply_is_retried_after_the_same_backoff_without_calling_the_platform_again() {
    let server = Server::start(vec![Step::Json(200, json!({"reply": "hi"}))]).await;
    let harness = start_paused(
        &paused_config(5),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .replies
        .failures
        .lock()
        .expect("lock")
        .extend((0..3).map(|n| ReplyError::Upstream(format!("HTTP 500 ({n})"))));
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    wait_state(&harness, "m1", "delivered", 60 * SECOND).await;
    assert_eq!(server.count(), 1, "the platform answered once");
    let times = harness.replies.call_times.lock().expect("lock").clone();
    assert_eq!(harness.replies.sent().len(), 1);
    // Three failed replies, then the one that went through.
    assert_time_gaps(&times, &[1, 2, 4]);
    harness.stop().await;
}
