//! One shutdown deadline: a graceful stop whose stages all hang (an upstream call in flight in
//! the listener, a platform call in flight in delivery) takes the grace period once, not once
//! per stage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use wxauto_sidecar::app::{self, RunOptions};
use wxauto_sidecar::simulator::Fault;

use crate::util::{DEADLINE, eventually, start_sim};

const GRACE: Duration = Duration::from_secs(3);

/// Before one deadline, the actor stop and the delivery stop each waited the full grace, so
/// this stop took at least 2 × `GRACE`; now the stages share it. The lower bound shows that the
/// stop did wait for the work in flight (timers never fire early).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_every_stage_hung_takes_the_grace_once() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = start_sim("hung-stop").await;
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
        sim = sim.addr,
        store = dir.path().join("store.db").display(),
    );
    let loader = app::builtin_loader(text, vec![("HUNG_STOP_KEY".to_owned(), sim.key.clone())]);
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
    sim.sim.inject("hung-chat", "alice", "hello");
    tokio::time::timeout(DEADLINE, hook_called)
        .await
        .expect("the webhook was not called");
    // The listener hangs: its next upstream call never answers (the call is counted when the
    // simulator receives it, before the fault holds it).
    let calls = sim.sim.snapshot().calls.len();
    sim.sim.set_fault(Fault::Hang);
    eventually("a hung upstream call", DEADLINE, || async {
        (sim.sim.snapshot().calls.len() > calls).then_some(())
    })
    .await;

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
