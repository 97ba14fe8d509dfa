//! The supervised listener against real simulators: draining, chats, recovery, faults.

use wxauto_sidecar::simulator::{Fault, ListenAction};

use crate::util::*;

fn adds(sim: &Sim, chat: &str) -> usize {
    sim.sim
        .snapshot()
        .listen_log
        .iter()
        .filter(|event| event.action == ListenAction::Add && event.nickname == chat)
        .count()
}

fn removes(sim: &Sim, chat: &str) -> usize {
    sim.sim
        .snapshot()
        .listen_log
        .iter()
        .filter(|event| event.action == ListenAction::Remove && event.nickname == chat)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_drained_filtered_and_chats_listened() {
    let sim = start_sim("a").await;
    // Three chats with unread messages before the sidecar starts: get-next-new returns one
    // chat per call, so all three must be drained by the bounded loop.
    sim.sim.inject("alice", "alice", "hello 1");
    sim.sim.inject("alice", "alice", "hello 2");
    sim.sim.inject("bob", "bob", "hi from bob");
    sim.sim.inject("team", "carol", "group message");
    sim.sim.inject_message(
        "bob",
        serde_json::json!({"id": "x-time", "type": "time", "content": "10:00", "sender": "bob"}),
    );
    let (text, env) = config_for(&[("wx-a", &sim)], "");
    let sidecar = start_sidecar(text, env).await;

    eventually("all messages taken", DEADLINE, || async {
        let contents = sidecar.sink.contents();
        (contents.len() >= 4).then_some(())
    })
    .await;
    let contents = sidecar.sink.contents();
    assert_eq!(
        contents.len(),
        4,
        "filters keep only chat messages: {contents:?}"
    );
    for chat in ["alice", "bob", "team"] {
        assert_eq!(adds(&sim, chat), 1, "{chat} added once");
    }
    // Later messages arrive through the destructive listen/get of listened chats.
    sim.sim.inject("alice", "alice", "later");
    eventually("listened message taken", DEADLINE, || async {
        sidecar
            .sink
            .contents()
            .contains(&"later".to_owned())
            .then_some(())
    })
    .await;
    let snapshot = sim.sim.snapshot();
    assert!(snapshot.pending_main.is_empty() && snapshot.pending_listen.is_empty());
    assert_eq!(
        sidecar
            .metric("wxauto_messages_processed_total{instance_id=\"wx-a\"}")
            .await,
        Some(5.0)
    );
    assert_eq!(
        sidecar
            .metric("wxauto_client_up{instance_id=\"wx-a\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        sidecar
            .metric("wxauto_listeners{instance_id=\"wx-a\",state=\"active\"}")
            .await,
        Some(3.0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_instance_records_one_error_and_recovers_with_its_chats() {
    let sim = start_sim("b").await;
    let (text, env) = config_for(&[("wx-b", &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    sim.sim.inject("alice", "alice", "before");
    eventually("chat listened", DEADLINE, || async {
        (adds(&sim, "alice") == 1).then_some(())
    })
    .await;

    sim.sim.set_online(false);
    eventually("instance down", DEADLINE, || async {
        (sidecar
            .metric("wxauto_client_up{instance_id=\"wx-b\"}")
            .await
            == Some(0.0))
        .then_some(())
    })
    .await;
    // Let several backoff retries fail while it is down.
    let failed_before = failed_calls(&sidecar).await;
    eventually("retries happen", DEADLINE, || async {
        (failed_calls(&sidecar).await >= failed_before + 3.0).then_some(())
    })
    .await;
    let errors = sidecar.get_json("/api/v1/errors?limit=100").await;
    let down_errors = errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|error| error["instance_id"] == "wx-b")
        .count();
    assert_eq!(
        down_errors, 1,
        "one error for the transition, not one per retry: {errors}"
    );

    sim.sim.set_online(true);
    eventually("recovered and chat re-added", DEADLINE, || async {
        (adds(&sim, "alice") == 2 && sim.sim.snapshot().listened == vec!["alice".to_owned()])
            .then_some(())
    })
    .await;
    assert!(
        sim.sim.snapshot().initialize_calls >= 2,
        "re-initialised after the outage"
    );
    eventually("client up again", DEADLINE, || async {
        (sidecar
            .metric("wxauto_client_up{instance_id=\"wx-b\"}")
            .await
            == Some(1.0))
        .then_some(())
    })
    .await;
    sidecar.stop().await;
}

async fn failed_calls(sidecar: &Sidecar) -> f64 {
    let text = sidecar.metrics().await;
    text.lines()
        .filter(|line| {
            line.starts_with("wxauto_api_requests_total{")
                && line.contains("instance_id=\"wx-b\"")
                && !line.contains("outcome=\"success\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_wrong_types_are_counted_and_survived() {
    let sim = start_sim("c").await;
    let (text, env) = config_for(&[("wx-c", &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    eventually("up", DEADLINE, || async {
        (sidecar
            .metric("wxauto_client_up{instance_id=\"wx-c\"}")
            .await
            == Some(1.0))
        .then_some(())
    })
    .await;
    for fault in [Fault::Garbage, Fault::WrongTypes] {
        sim.sim.set_fault(fault);
        eventually("decode errors counted", DEADLINE, || async {
            let text = sidecar.metrics().await;
            let decode = metric_value(
                &text,
                "wxauto_errors_total{component=\"client\",kind=\"decode\"}",
            )
            .unwrap_or(0.0);
            (decode >= 1.0).then_some(())
        })
        .await;
    }
    sim.sim.set_fault(Fault::None);
    sim.sim.inject("dave", "dave", "after the storm");
    eventually("still working", DEADLINE, || async {
        sidecar
            .sink
            .contents()
            .contains(&"after the storm".to_owned())
            .then_some(())
    })
    .await;
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_instance_does_not_stall_the_others_and_a_wrong_key_is_auth() {
    let hang = start_sim("hang").await;
    let good = start_sim("good").await;
    let wrong = start_sim("wrong").await;
    hang.sim.set_fault(Fault::Hang);
    let (mut text, mut env) = config_for(&[("wx-hang", &hang), ("wx-good", &good)], "");
    text.push_str(&format!(
        "  - id: wx-wrong\n    base_url: http://{}\n    api_key_env: KEY_WRONG\n",
        wrong.addr
    ));
    env.push(("KEY_WRONG".to_owned(), "not-the-right-key".to_owned()));
    let sidecar = start_sidecar(text, env).await;
    for i in 0..5 {
        good.sim.inject("erin", "erin", &format!("m{i}"));
    }
    eventually("good instance keeps flowing", DEADLINE, || async {
        (sidecar.sink.contents().len() >= 5).then_some(())
    })
    .await;
    eventually("auth error recorded", DEADLINE, || async {
        let text = sidecar.metrics().await;
        metric_value(
            &text,
            "wxauto_errors_total{component=\"client\",kind=\"auth\"}",
        )
        .filter(|value| *value >= 1.0)
    })
    .await;
    let clients = sidecar.get_json("/api/v1/clients").await;
    assert_eq!(clients["total_count"], 3);
    assert_eq!(clients["connected_count"], 1, "{clients}");
    // The wrong key never appears anywhere we serve.
    let everything = format!(
        "{}{}{}",
        sidecar.metrics().await,
        sidecar.get_json("/api/v1/errors?limit=100").await,
        sidecar.get_json("/api/v1/health").await
    );
    for key in ["not-the-right-key", good.key.as_str(), hang.key.as_str()] {
        assert!(!everything.contains(key), "a key leaked");
    }
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_chats_time_out_upstream_and_reactivate_fixed_never_do() {
    let sim = start_sim("d").await;
    let (text, env) = config_for(
        &[("wx-d", &sim)],
        "fixed_listeners:\n  - chat: 文件传输助手\n",
    );
    let text = text.replace("listener:\n", "listener:\n  listener_timeout: 700ms\n");
    let sidecar = start_sidecar(text, env).await;
    sim.sim.inject("frank", "frank", "one");
    eventually("frank removed after the timeout", DEADLINE, || async {
        (removes(&sim, "frank") == 1).then_some(())
    })
    .await;
    let listeners = sidecar.get_json("/api/v1/listeners").await;
    let frank = listeners["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["who"] == "frank")
        .cloned()
        .unwrap();
    assert_eq!(frank["active"], false);
    // The fixed chat was added and never removed.
    assert_eq!(adds(&sim, "文件传输助手"), 1);
    assert_eq!(removes(&sim, "文件传输助手"), 0);
    // A message for the inactive chat reactivates it instead of being dropped.
    sim.sim.inject("frank", "frank", "two");
    eventually("frank reactivated", DEADLINE, || async {
        (adds(&sim, "frank") == 2 && sidecar.sink.contents().contains(&"two".to_owned()))
            .then_some(())
    })
    .await;
    assert_eq!(
        sidecar
            .metric("wxauto_listeners_removed_total{instance_id=\"wx-d\",reason=\"timeout\"}")
            .await
            .map(|v| v >= 1.0),
        Some(true)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_counts_active_chats_and_keeps_messages() {
    let sim = start_sim("e").await;
    let (text, env) = config_for(&[("wx-e", &sim)], "");
    let text = text.replace(
        "listener:\n",
        "listener:\n  max_listeners_per_instance: 2\n",
    );
    let sidecar = start_sidecar(text, env).await;
    for chat in ["c1", "c2", "c3"] {
        sim.sim.inject(chat, chat, &format!("from {chat}"));
    }
    eventually("all three messages kept", DEADLINE, || async {
        (sidecar.sink.contents().len() == 3).then_some(())
    })
    .await;
    // A few more polls, each of which could have added the third chat.
    keeps_polling(&sim, 3).await;
    assert_eq!(
        sim.sim.snapshot().listened.len(),
        2,
        "only two chats listened"
    );
    sidecar.stop().await;
}

/// A sink with a bug: it panics on the first batch, then works.
struct PanicOnce {
    inner: std::sync::Arc<CollectSink>,
    panicked: std::sync::atomic::AtomicBool,
}

impl wxauto_sidecar::message::MessageSink for PanicOnce {
    fn accept(
        &self,
        messages: Vec<wxauto_sidecar::message::InboundMessage>,
    ) -> wxauto_sidecar::message::BoxFuture<'_, Result<(), wxauto_sidecar::message::SinkError>>
    {
        if !self
            .panicked
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("sink bug (test)");
        }
        self.inner.accept(messages)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_is_restarted_counted_and_recorded() {
    let sim = start_sim("p").await;
    let (text, env) = config_for(&[("wx-p", &sim)], "");
    let collect = std::sync::Arc::new(CollectSink::default());
    let sink = std::sync::Arc::new(PanicOnce {
        inner: collect.clone(),
        panicked: std::sync::atomic::AtomicBool::new(false),
    });
    let sidecar = start_sidecar_with_sink(text, env, false, sink, collect).await;
    sim.sim.inject("gina", "gina", "triggers the bug");
    eventually("actor restarted", DEADLINE, || async {
        sidecar
            .metric("wxauto_listener_task_restarts_total{instance_id=\"wx-p\"}")
            .await
            .filter(|restarts| *restarts == 1.0)
    })
    .await;
    assert_eq!(
        sidecar.metric("wxauto_listener_restarts_total").await,
        Some(1.0)
    );
    let errors = sidecar.get_json("/api/v1/errors?limit=100").await;
    assert!(
        errors["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|error| error["error_type"] == "listener.task" && error["instance_id"] == "wx-p"),
        "{errors}"
    );
    // The restarted actor works: new messages flow again.
    sim.sim.inject("gina", "gina", "after the restart");
    eventually("messages flow after the restart", DEADLINE, || async {
        sidecar
            .sink
            .contents()
            .contains(&"after the restart".to_owned())
            .then_some(())
    })
    .await;
    // The message the crashed actor held (taken upstream, refused by the panicking sink) was
    // kept outside the actor and handed over by its successor, once, before the newer one.
    let contents = sidecar.sink.contents();
    let held: Vec<usize> = contents
        .iter()
        .enumerate()
        .filter(|(_, content)| *content == "triggers the bug")
        .map(|(index, _)| index)
        .collect();
    assert_eq!(held.len(), 1, "{contents:?}");
    let after = contents
        .iter()
        .position(|c| c == "after the restart")
        .unwrap();
    assert!(held[0] < after, "{contents:?}");
    assert_eq!(sidecar.metric("wxauto_listener_tasks").await, Some(1.0));
    sidecar.stop().await;
}

/// A sink whose store is unavailable for its first `failures` batches.
struct FlakySink {
    inner: std::sync::Arc<CollectSink>,
    failures: std::sync::atomic::AtomicUsize,
}

impl wxauto_sidecar::message::MessageSink for FlakySink {
    fn accept(
        &self,
        messages: Vec<wxauto_sidecar::message::InboundMessage>,
    ) -> wxauto_sidecar::message::BoxFuture<'_, Result<(), wxauto_sidecar::message::SinkError>>
    {
        let failing = self
            .failures
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |left| left.checked_sub(1),
            )
            .is_ok();
        if failing {
            return Box::pin(async {
                Err(wxauto_sidecar::message::SinkError(
                    "store unavailable (test)".to_owned(),
                ))
            });
        }
        self.inner.accept(messages)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sink_holds_messages_and_loses_none() {
    let sim = start_sim("s").await;
    for i in 0..5 {
        sim.sim.inject("hank", "hank", &format!("held {i}"));
        sim.sim.inject("ivy", "ivy", &format!("held {i}"));
    }
    let (text, env) = config_for(&[("wx-s", &sim)], "");
    let collect = std::sync::Arc::new(CollectSink::default());
    let sink = std::sync::Arc::new(FlakySink {
        inner: collect.clone(),
        failures: std::sync::atomic::AtomicUsize::new(3),
    });
    let sidecar = start_sidecar_with_sink(text, env, false, sink, collect).await;
    eventually(
        "every message delivered once the sink recovers",
        DEADLINE,
        || async { (sidecar.sink.contents().len() == 10).then_some(()) },
    )
    .await;
    let mut contents = sidecar.sink.contents();
    contents.sort();
    contents.dedup();
    assert_eq!(
        contents.len(),
        5,
        "five distinct texts, each from two chats"
    );
    let text = sidecar.metrics().await;
    assert!(
        metric_value(
            &text,
            "wxauto_errors_total{component=\"listener\",kind=\"storage\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "the sink failure is recorded"
    );
    // Counted once each, not once per retry.
    assert_eq!(
        metric_value(
            &text,
            "wxauto_messages_processed_total{instance_id=\"wx-s\"}"
        ),
        Some(10.0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_is_one_error_per_outage_not_per_retry() {
    let sim = start_sim("k").await;
    // Someone with the right key initialised WeChat; /api/health is unauthenticated upstream,
    // so our probe passes and only the authenticated re-add fails, cycle after cycle.
    let (text, env) = config_for(&[("wx-k", &sim)], "");
    let first = start_sidecar(text, env).await;
    eventually("initialised by the right key", DEADLINE, || async {
        sim.sim.snapshot().initialized.then_some(())
    })
    .await;
    first.stop().await;

    let (text, _) = config_for(&[("wx-k", &sim)], "fixed_listeners:\n  - chat: ops\n");
    let env = vec![("KEY_WX_K".to_owned(), "a-wrong-key-123".to_owned())];
    let sidecar = start_sidecar(text, env).await;
    let adds_before = sim
        .sim
        .snapshot()
        .calls
        .get("POST /api/message/listen/add")
        .copied()
        .unwrap_or(0);
    eventually("several rejected retries", DEADLINE, || async {
        let adds = sim
            .sim
            .snapshot()
            .calls
            .get("POST /api/message/listen/add")
            .copied()
            .unwrap_or(0);
        (adds >= adds_before + 4).then_some(())
    })
    .await;
    let errors = sidecar.get_json("/api/v1/errors?limit=100").await;
    let recorded: Vec<_> = errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|error| error["instance_id"] == "wx-k")
        .collect();
    assert_eq!(recorded.len(), 1, "one error for the outage: {recorded:?}");
    assert_eq!(recorded[0]["kind"], "auth");
    assert_eq!(
        sidecar
            .metric("wxauto_client_up{instance_id=\"wx-k\"}")
            .await,
        Some(0.0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_chat_table_and_re_adds_upstream() {
    let sim = start_sim("r").await;
    let (text, env) = config_for(&[("wx-r", &sim)], "");
    let sidecar = start_sidecar_with(text, env, true).await;
    sim.sim.inject("jack", "jack", "one");
    sim.sim.inject("kate", "kate", "two");
    eventually("both chats listened", DEADLINE, || async {
        (adds(&sim, "jack") == 1 && adds(&sim, "kate") == 1).then_some(())
    })
    .await;
    let response = sidecar
        .http
        .post(sidecar.url("/api/v1/restart"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The new actors start from the old table: both chats are re-added upstream on the first
    // connection (a restored listener, not a new one), and stay in the JSON.
    eventually("chats re-added after the restart", DEADLINE, || async {
        (adds(&sim, "jack") == 2 && adds(&sim, "kate") == 2).then_some(())
    })
    .await;
    assert_eq!(
        sidecar
            .metric("wxauto_listeners_added_total{instance_id=\"wx-r\"}")
            .await,
        Some(2.0),
        "a restored chat is not counted as added again"
    );
    let listeners = sidecar.get_json("/api/v1/listeners").await;
    assert_eq!(listeners["total_count"], 2, "{listeners}");
    assert_eq!(listeners["active_count"], 2);
    sim.sim.inject("jack", "jack", "three");
    eventually("messages still flow", DEADLINE, || async {
        sidecar
            .sink
            .contents()
            .contains(&"three".to_owned())
            .then_some(())
    })
    .await;
    sidecar.stop().await;
}

/// `instances[].listener` reaches that instance's actor only: one instance polled every
/// 100 ms (the global section), the other with its own hour-long poll interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_polls_at_its_own_interval() {
    let fast = start_sim("own-fast").await;
    let slow = start_sim("own-slow").await;
    let (text, env) = config_for(&[("wx-fast", &fast), ("wx-slow", &slow)], "");
    let own = "api_key_env: KEY_WX_SLOW\n";
    assert!(text.contains(own));
    let text = text.replacen(
        own,
        &format!("{own}    listener:\n      poll_interval: 1h\n"),
        1,
    );
    let sidecar = start_sidecar(text, env).await;
    eventually("the slow instance polled once", DEADLINE, || async {
        (polls(&slow) >= 1).then_some(())
    })
    .await;
    keeps_polling(&fast, 10).await;
    assert_eq!(polls(&slow), 1, "wx-slow polled at the global 100 ms");
    sidecar.stop().await;
}
