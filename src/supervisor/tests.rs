//! The supervisor's unit tests: crash restarts, builds that fail, settings, replies.

use super::*;
use crate::config::SendMode;
use crate::message::{
    BoxFuture, Download, DownloadError, InboundMessage, Reply, ReplyError, ReplySender, SinkError,
    StoredChat, UpstreamSession,
};
use crate::metrics::{Metrics, process::ProcessCollector};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::oneshot;

/// A sink with no store. Its `load_listener` (the first thing an actor does) can panic
/// once, or wait for the test to open a gate, so an actor can crash or be kept busy
/// without any upstream.
#[derive(Default)]
struct TestSink {
    loads: AtomicUsize,
    panic_once: AtomicBool,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl MessageSink for TestSink {
    fn accept(&self, _: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn load_listener(
        &self,
        _: &str,
    ) -> BoxFuture<'_, Result<(Vec<StoredChat>, UpstreamSession), SinkError>> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        if self.panic_once.swap(false, Ordering::SeqCst) {
            panic!("sink bug (test)");
        }
        let gate = self.gate.clone();
        Box::pin(async move {
            if let Some(gate) = gate {
                let _ = gate.acquire().await;
            }
            Ok((Vec::new(), UpstreamSession::default()))
        })
    }
}

/// One instance on a port nothing listens on, with these fixed chats.
fn config_text(fixed: &[&str]) -> String {
    let mut text = String::from(
        "instances:\n  - id: wx-a\n    base_url: http://127.0.0.1:9\n    api_key_env: KEY_A\n",
    );
    if !fixed.is_empty() {
        text.push_str("fixed_listeners:\n");
        for chat in fixed {
            text.push_str(&format!("  - chat: {chat}\n    instances: [\"*\"]\n"));
        }
    }
    text
}

struct Harness {
    monitor: Arc<Monitor>,
    replies: Arc<ReplyRouter>,
    control: mpsc::Sender<Control>,
    text: Arc<Mutex<String>>,
    shutdown: CancellationToken,
    run: tokio::task::JoinHandle<bool>,
}

fn start(sink: Arc<TestSink>, fixed: &[&str], failing_builds: usize) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let text = Arc::new(Mutex::new(config_text(fixed)));
    let decode = |text: &str| {
        crate::config::decode(text, None, &|name: &str| {
            (name == "KEY_A").then(|| "key-a-0123456789".to_owned())
        })
    };
    let loaded = decode(&text.lock().unwrap()).expect("valid config");
    let current = Arc::clone(&text);
    let loader: ConfigLoader = Box::new(move || decode(&current.lock().unwrap()));
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    let monitor = Arc::new(Monitor::new(
        metrics,
        Arc::new(ProcessCollector::new()),
        Duration::from_secs(300),
    ));
    let replies = Arc::new(ReplyRouter::default());
    let config = Arc::new(loaded.config);
    let (active, _) = watch::channel(Arc::clone(&config));
    let (control, receiver) = mpsc::channel(64);
    let mut supervisor = Supervisor::new(
        config,
        loader,
        Arc::clone(&monitor),
        sink,
        Arc::clone(&replies),
        active,
        control.clone(),
        Deadline::new(Duration::from_secs(5)),
    );
    supervisor.failing_builds = failing_builds;
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(supervisor.run(receiver, shutdown.clone()));
    Harness {
        monitor,
        replies,
        control,
        text,
        shutdown,
        run,
    }
}

/// Polls `check` every 10 ms of (paused) time until it holds; false after `limit`.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

fn restarts(monitor: &Monitor) -> usize {
    monitor
        .recent_errors(100)
        .iter()
        .filter(|error| error.error_message.contains("ended unexpectedly"))
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_crashed_task_in_its_restart_backoff_is_not_counted_live() {
    let sink = Arc::new(TestSink::default());
    sink.panic_once.store(true, Ordering::SeqCst);
    let harness = start(Arc::clone(&sink), &[], 0);
    // The first actor panics at once; the restart waits 0.5 to 1 s (jittered).
    assert!(
        within(Duration::from_millis(400), || restarts(&harness.monitor)
            == 1)
        .await,
        "the crash was not recorded"
    );
    assert_eq!(
        harness.monitor.snapshot().tasks,
        0,
        "a crashed task in its backoff counted as live"
    );
    assert!(
        within(Duration::from_secs(2), || sink.loads.load(Ordering::SeqCst)
            == 2)
        .await,
        "the task was not restarted"
    );
    assert_eq!(harness.monitor.snapshot().tasks, 1);
    harness.shutdown.cancel();
    assert!(harness.run.await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn an_actor_that_cannot_be_built_is_retried_with_backoff() {
    let sink = Arc::new(TestSink::default());
    let harness = start(Arc::clone(&sink), &[], 2);
    let failures = |monitor: &Monitor| {
        monitor
            .recent_errors(100)
            .iter()
            .filter(|error| error.error_message.contains("cannot build the HTTP client"))
            .count()
    };
    assert!(
        within(Duration::from_millis(100), || failures(&harness.monitor)
            == 1)
        .await
    );
    assert_eq!(harness.monitor.snapshot().tasks, 0);
    assert_eq!(sink.loads.load(Ordering::SeqCst), 0);
    // The second try (after 0.5 to 1 s) fails too, the third (1 to 2 s later) builds it.
    assert!(
        within(Duration::from_secs(4), || sink.loads.load(Ordering::SeqCst)
            == 1)
        .await,
        "the instance stayed stopped after a failed build"
    );
    assert_eq!(failures(&harness.monitor), 2);
    assert_eq!(harness.monitor.snapshot().tasks, 1);
    harness.shutdown.cancel();
    assert!(harness.run.await.unwrap());
}

/// The actor's command queue is full (it is stuck in a long call) when a reload changes
/// its fixed chats: the new settings still reach it once it is free.
#[tokio::test(start_paused = true)]
async fn settings_reach_an_actor_whose_command_queue_is_full() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let sink = Arc::new(TestSink {
        gate: Some(Arc::clone(&gate)),
        ..TestSink::default()
    });
    let harness = start(Arc::clone(&sink), &["alice"], 0);
    assert!(
        within(Duration::from_secs(1), || sink.loads.load(Ordering::SeqCst)
            == 1)
        .await
    );
    // More replies than the queue holds; each waits an hour for its answer.
    let mut pending = Vec::new();
    for _ in 0..70 {
        let replies = Arc::clone(&harness.replies);
        pending.push(tokio::spawn(async move {
            replies
                .send_reply(reply("wx-a"), Duration::from_secs(3600))
                .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    *harness.text.lock().unwrap() = config_text(&["alice", "bob"]);
    let (respond, answer) = oneshot::channel();
    harness
        .control
        .send(Control::Reload {
            source: ReloadSource::Http,
            respond: Some(respond),
        })
        .await
        .unwrap();
    let report = answer.await.unwrap().expect("reload");
    assert!(report.changed, "{report:?}");
    gate.add_permits(1);
    let has_bob = || {
        harness
            .monitor
            .chats_of("wx-a")
            .iter()
            .any(|(chat, state)| chat == "bob" && state.fixed)
    };
    assert!(
        within(Duration::from_secs(10), has_bob).await,
        "the new fixed chat never reached the actor: {:?}",
        harness.monitor.chats_of("wx-a")
    );
    for reply in pending {
        assert!(reply.await.unwrap().is_err(), "the instance is down");
    }
    harness.shutdown.cancel();
    harness.run.await.unwrap();
}

fn reply(instance_id: &str) -> Reply {
    Reply {
        instance_id: instance_id.to_owned(),
        chat: "alice".to_owned(),
        text: "hi".to_owned(),
        at: Vec::new(),
        mode: SendMode::Normal,
    }
}

#[tokio::test]
async fn replies_wait_for_enabled_instances_and_fail_for_unknown_ones() {
    let router = ReplyRouter::default();
    router.set_enabled(["wx-a".to_owned()]);
    // Enabled but its actor is not registered yet: wait (no attempt spent).
    let wait = Duration::from_secs(5);
    assert_eq!(
        router.send_reply(reply("wx-a"), wait).await,
        Err(ReplyError::InstanceDown("wx-a".to_owned()))
    );
    // Not in the config: give up eventually.
    assert_eq!(
        router.send_reply(reply("wx-gone"), wait).await,
        Err(ReplyError::NoInstance("wx-gone".to_owned()))
    );
    // A registered actor gets the command.
    let (sender, mut receiver) = mpsc::channel(1);
    router.set("wx-a", Some(sender));
    let send = tokio::spawn(async move { router.send_reply(reply("wx-a"), wait).await });
    match receiver.recv().await {
        Some(InstanceCommand::Reply {
            reply,
            ticket,
            respond,
        }) => {
            assert_eq!(reply.chat, "alice");
            assert!(ticket.start());
            let _ = respond.send(Ok(()));
        }
        other => panic!("unexpected command: {other:?}"),
    }
    assert_eq!(send.await.unwrap(), Ok(()));
}

/// The requester's deadline passes while the reply waits in the actor's queue: it is
/// abandoned, and the actor (coming to it later) must not send it, or the retry would make
/// the chat get it twice. Once the actor has started, the outcome is awaited instead.
#[tokio::test(start_paused = true)]
async fn a_reply_is_sent_by_the_actor_or_abandoned_by_the_worker_never_both() {
    let router = Arc::new(ReplyRouter::default());
    router.set_enabled(["wx-a".to_owned()]);
    let (sender, mut receiver) = mpsc::channel(4);
    router.set("wx-a", Some(sender));
    let wait = Duration::from_secs(30);

    let pending = tokio::spawn({
        let router = Arc::clone(&router);
        async move { router.send_reply(reply("wx-a"), wait).await }
    });
    // The actor is busy past the deadline; paused time jumps there.
    let answer = pending.await.unwrap();
    assert!(
        matches!(answer, Err(ReplyError::NotTaken(..))),
        "{answer:?}"
    );
    let Some(InstanceCommand::Reply { ticket, .. }) = receiver.recv().await else {
        panic!("the command was queued");
    };
    assert!(!ticket.start(), "an abandoned reply must not be sent");

    // Started before the deadline: the worker waits for the outcome past it.
    let pending = tokio::spawn({
        let router = Arc::clone(&router);
        async move { router.send_reply(reply("wx-a"), wait).await }
    });
    let Some(InstanceCommand::Reply {
        ticket, respond, ..
    }) = receiver.recv().await
    else {
        panic!("the command was queued");
    };
    assert!(ticket.start());
    tokio::time::sleep(wait * 2).await;
    assert!(!pending.is_finished(), "gave up on a reply being sent");
    let _ = respond.send(Ok(()));
    assert_eq!(pending.await.unwrap(), Ok(()));
}

#[tokio::test]
async fn downloads_go_to_the_instance_actor_like_replies() {
    let router = ReplyRouter::default();
    router.set_enabled(["wx-a".to_owned()]);
    assert_eq!(
        router.download_file("wx-a", r"C:\a.png", 10).await,
        Err(DownloadError::InstanceDown("wx-a".to_owned()))
    );
    assert_eq!(
        router.download_file("wx-gone", r"C:\a.png", 10).await,
        Err(DownloadError::NoInstance("wx-gone".to_owned()))
    );
    let (sender, mut receiver) = mpsc::channel(1);
    router.set("wx-a", Some(sender));
    let download = tokio::spawn(async move { router.download_file("wx-a", r"C:\a.png", 10).await });
    match receiver.recv().await {
        Some(InstanceCommand::Download {
            file_path,
            max_bytes,
            respond,
        }) => {
            assert_eq!((file_path.as_str(), max_bytes), (r"C:\a.png", 10));
            let _ = respond.send(Ok(Download::Bytes(b"x".to_vec())));
        }
        other => panic!("unexpected command: {other:?}"),
    }
    assert_eq!(download.await.unwrap(), Ok(Download::Bytes(b"x".to_vec())));
}
