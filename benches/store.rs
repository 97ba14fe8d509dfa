//! The message store's write path, measured through the listener's seam (`MessageSink::accept`,
//! which returns once a batch is committed): commit latency with `storage.synchronous` normal
//! and full, and whether the cost of a write grows with the dead letters kept (it must not:
//! counts are kept by triggers, not counted after every write).
//!
//! `cargo bench --bench store` measures and prints one `bench name=...` line per case. Without
//! `--bench` (as `cargo test --all-targets` runs it) each case runs a few commits, as a smoke
//! test.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use wxauto_sidecar::config::{self, Config};
use wxauto_sidecar::delivery::{Delivery, MediaSettings, Routing};
use wxauto_sidecar::event::{Component, ErrorKind, ErrorSink};
use wxauto_sidecar::message::{BoxFuture, InboundMessage, Reply, ReplyError, ReplySender};

struct NoReplies;

impl ReplySender for NoReplies {
    fn send_reply(&self, _: Reply, _: Duration) -> BoxFuture<'_, Result<(), ReplyError>> {
        Box::pin(async { Ok(()) })
    }
}

struct NoErrors;

impl ErrorSink for NoErrors {
    fn record_error(&self, _: Component, _: ErrorKind, _: Option<&str>, message: &str) {
        eprintln!("bench: error recorded: {message}");
    }
}

fn config(db: &Path, synchronous: &str) -> Config {
    // A keyword platform that answers nothing: deliveries are local and quick, so the store
    // sees the claims and completions of a live sidecar beside the measured inserts.
    let text = format!(
        "instances: []\n\
         platforms:\n  - id: kw\n    type: keyword\n    keywords:\n      - keywords: [never-matches]\n        replies: [x]\n\
         rules:\n  - id: all\n    instance: \"*\"\n    chat: \"*\"\n    platform: kw\n\
         storage:\n  path: {}\n  synchronous: {synchronous}\n",
        db.display()
    );
    config::decode(&text, None, &|_| None)
        .unwrap_or_else(|errors| panic!("bench config: {errors}"))
        .config
}

async fn start(config: &Config) -> Delivery {
    Delivery::start(
        &config.storage,
        &config.delivery,
        MediaSettings::from_config(config),
        Routing::new(&config.rules, &config.platforms, reqwest::Client::new()),
        Arc::new(NoReplies),
        Arc::new(NoErrors),
        &mut Registry::default(),
        CancellationToken::new(),
    )
    .await
    .expect("delivery starts")
}

fn message(n: usize) -> InboundMessage {
    InboundMessage {
        instance_id: "wx-bench".to_owned(),
        chat: format!("chat-{}", n % 30),
        message_id: format!("m{n}"),
        msg_type: "friend".to_owned(),
        sender: "alice".to_owned(),
        content: "a message of a typical length, about sixty characters long".to_owned(),
        received_at: chrono::Utc::now(),
        ..InboundMessage::default()
    }
}

/// Adds `n` dead rows straight into the file (as months of failing deliveries would).
fn add_dead_rows(db: &Path, n: usize) {
    let mut conn = rusqlite::Connection::open(db).expect("open");
    let tx = conn.transaction().expect("tx");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO messages (instance_id, message_id, synthetic_id, chat, sender, \
                 msg_type, content, received_ms, rule_id, platform_id, reply_at_sender, state, \
                 created_ms, updated_ms, dead_ms, last_error) \
                 VALUES ('wx-dead', ?1, 0, 'c', 's', 'friend', 'x', 1, 'all', 'kw', 0, 'dead', \
                 1, 1, 1, 'HTTP 400')",
            )
            .expect("prepare");
        for i in 0..n {
            insert.execute([format!("d{i}")]).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// Commits `samples` one-message batches and reports the latency percentiles.
async fn measure(name: &str, delivery: &Delivery, samples: usize, offset: usize) {
    let sink = delivery.sink();
    let mut times = Vec::with_capacity(samples);
    for n in 0..samples {
        let started = Instant::now();
        sink.accept(vec![message(offset + n)])
            .await
            .expect("committed");
        times.push(started.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "bench name={name} samples={samples} p50_us={} p90_us={} p99_us={} max_us={}",
        at(0.5).as_micros(),
        at(0.9).as_micros(),
        at(0.99).as_micros(),
        at(1.0).as_micros(),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let measuring = std::env::args().any(|arg| arg == "--bench");
    let samples = if measuring { 500 } else { 5 };
    let dead_rows = if measuring { 100_000 } else { 100 };
    let dir = tempfile::tempdir().expect("tempdir");

    for synchronous in ["normal", "full"] {
        let db = dir.path().join(format!("commit-{synchronous}.db"));
        let config = config(&db, synchronous);
        let delivery = start(&config).await;
        measure(&format!("commit_{synchronous}"), &delivery, samples, 0).await;
        delivery.shutdown().await;
    }

    // The same writes with 0 and with `dead_rows` dead letters in the store.
    for (case, dead) in [("empty", 0), ("dead", dead_rows)] {
        let db = dir.path().join(format!("flat-{case}.db"));
        let config = config(&db, "normal");
        start(&config).await.shutdown().await;
        if dead > 0 {
            add_dead_rows(&db, dead);
        }
        let delivery = start(&config).await;
        assert_eq!(delivery.counts().await.dead, dead as u64);
        measure(&format!("write_with_{dead}_dead"), &delivery, samples, 0).await;
        delivery.shutdown().await;
    }
}
