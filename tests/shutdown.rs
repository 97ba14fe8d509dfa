//! One shutdown deadline: a graceful stop whose stages all hang (an upstream call in flight in
//! the listener, a platform call in flight in delivery) takes the grace period once, not once
//! per stage.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::routing::post;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wxauto_sidecar::app::{self, RunOptions};
use wxauto_sidecar::simulator::{SimConfig, Simulator};

use crate::util::DEADLINE;

const KEY: &str = "key-hung-stop-0123456789";

const GRACE: Duration = Duration::from_secs(3);

/// Before one deadline, the actor stop and the delivery stop each waited the full grace, so
/// this stop took at least 2 × `GRACE`; now the stages share it. The lower bound shows that the
/// stop did wait for the work in flight (timers never fire early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_every_stage_hung_takes_the_grace_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The upstream: a simulator behind a switch that, once on, holds every request forever.
    let sim = Simulator::new(SimConfig {
        api_key: KEY.to_owned(),
        name: "hung-stop".to_owned(),
        flaky: false,
        ..SimConfig::default()
    });
    let hang = Arc::new(AtomicBool::new(false));
    let hung = Arc::new(Notify::new());
    let upstream = {
        let (hang, hung) = (Arc::clone(&hang), Arc::clone(&hung));
        sim.router()
            .layer(middleware::from_fn(move |request: Request, next: Next| {
                let (hang, hung) = (Arc::clone(&hang), Arc::clone(&hung));
                async move {
                    if hang.load(Ordering::SeqCst) {
                        hung.notify_one();
                        return std::future::pending().await;
                    }
                    next.run(request).await
                }
            }))
    };
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(sim_listener, upstream).await });
    // A webhook that takes the message and never answers.
    let arrived = Arc::new(Notify::new());
    let hook = {
        let arrived = Arc::clone(&arrived);
        Router::new().route(
            "/hook",
            post(move || {
                let arrived = Arc::clone(&arrived);
                async move {
                    arrived.notify_one();
                    std::future::pending::<&'static str>().await
                }
            }),
        )
    };
    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_addr = hook_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(hook_listener, hook).await });

    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "listener:\n  poll_interval: 100ms\n  health_check_interval: 300ms\n  request_timeout: 60s\n\
         instances:\n  - id: wx\n    base_url: http://{sim}\n    api_key_env: HUNG_STOP_KEY\n\
         delivery:\n  attempt_timeout: 120s\n\
         platforms:\n  - id: hook\n    type: webhook\n    url: http://{hook_addr}/hook\n    timeout: 60s\n\
         rules:\n  - id: everything\n    chat: \"*\"\n    platform: hook\n\
         storage:\n  path: {store}\n",
        sim = sim_addr,
        store = dir.path().join("store.db").display(),
    );
    let loader = app::builtin_loader(text, vec![("HUNG_STOP_KEY".to_owned(), KEY.to_owned())]);
    let loaded = loader().expect("test config must be valid");
    let options = RunOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        grace: GRACE,
        watch: false,
        ..RunOptions::new()
    };
    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let run = tokio::spawn(async move {
        app::run(loaded, loader, options, stop, move |started| {
            let _ = started_tx.send(started.addr);
        })
        .await
    });
    started_rx.await.expect("sidecar did not start");

    // Delivery hangs: a worker is inside the webhook call.
    let hook_called = arrived.notified();
    sim.inject("hung-chat", "alice", "hello");
    tokio::time::timeout(DEADLINE, hook_called)
        .await
        .expect("the webhook was not called");
    // The listener hangs: its next upstream call never answers.
    hang.store(true, Ordering::SeqCst);
    tokio::time::timeout(DEADLINE, hung.notified())
        .await
        .expect("no upstream call after the switch");

    let began = Instant::now();
    shutdown.cancel();
    let result = tokio::time::timeout(GRACE * 10, run)
        .await
        .expect("the stop did not end")
        .expect("run panicked");
    let took = began.elapsed();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        took >= GRACE,
        "the stop did not wait for the work in flight: {took:?}"
    );
    assert!(
        took < GRACE * 2,
        "the stages did not share one deadline: the stop took {took:?} with a grace of {GRACE:?}"
    );
}
