//! Mirrors the seed's `tests/test_message_listener_health.py`: the listener's health check of
//! each wxauto instance and its recovery, against a real simulator whose WeChat goes offline
//! and comes back, observed through `/metrics` and the JSON monitor API.
//!
//! Covers: the health check seeing the outage (`wxauto_client_up` 0, the client row
//! disconnected) while the listener service itself keeps running; one error per outage, not
//! per failed retry; recovery re-initialising the instance, re-adding its chats and draining
//! the messages that arrived while it was down (none lost); repeated outages counted apart.

use serde_json::Value;
use wxauto_sidecar::simulator::ListenAction;

use crate::util::*;

const ID: &str = "wx-lh";

fn adds(sim: &Sim, chat: &str) -> usize {
    sim.sim
        .snapshot()
        .listen_log
        .iter()
        .filter(|event| event.action == ListenAction::Add && event.nickname == chat)
        .count()
}

async fn wait_client_up(sidecar: &Sidecar, want: f64) {
    let series = format!("wxauto_client_up{{instance_id=\"{ID}\"}}");
    eventually(&format!("{series} == {want}"), DEADLINE, || async {
        (sidecar.metric(&series).await == Some(want)).then_some(())
    })
    .await;
}

async fn client_row(sidecar: &Sidecar) -> Value {
    let clients = sidecar.get_json("/api/v1/clients").await;
    clients["data"]
        .as_array()
        .and_then(|rows| rows.iter().find(|row| row["instance_id"] == ID).cloned())
        .unwrap_or_else(|| panic!("no client row for {ID}: {clients}"))
}

async fn instance_errors(sidecar: &Sidecar) -> usize {
    let errors = sidecar.get_json("/api/v1/errors?limit=100").await;
    errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|error| error["instance_id"] == ID)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_detected_and_recovery_re_adds_chats_and_drains_what_was_missed() {
    let sim = start_sim("lh1").await;
    let (text, env) = config_for(&[(ID, &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    sim.sim.inject("alice", "alice", "before the outage");
    eventually("alice listened", DEADLINE, || async {
        (adds(&sim, "alice") == 1).then_some(())
    })
    .await;
    wait_client_up(&sidecar, 1.0).await;
    let row = client_row(&sidecar).await;
    assert_eq!(row["connected"], true, "{row}");
    let initialized_before = sim.sim.snapshot().initialize_calls;

    sim.sim.set_online(false);
    wait_client_up(&sidecar, 0.0).await;
    let row = client_row(&sidecar).await;
    assert_eq!(row["connected"], false, "{row}");
    assert_ne!(row["state"], "up", "{row}");
    // The health check found the instance down; the listener service is still running.
    let health = sidecar.get_json("/api/v1/health").await;
    assert_eq!(
        health["data"]["message_listener"]["status"], "running",
        "{health}"
    );
    assert_eq!(sidecar.metric("wxauto_listener_running").await, Some(1.0));
    // Written while WeChat is down: it waits unread in the main window.
    sim.sim.inject("alice", "alice", "during the outage");

    sim.sim.set_online(true);
    wait_client_up(&sidecar, 1.0).await;
    eventually("alice re-added and listened again", DEADLINE, || async {
        let snap = sim.sim.snapshot();
        (adds(&sim, "alice") >= 2 && snap.listened.contains(&"alice".to_owned())).then_some(())
    })
    .await;
    eventually("the missed message drained", DEADLINE, || async {
        sidecar
            .sink
            .contents()
            .contains(&"during the outage".to_owned())
            .then_some(())
    })
    .await;
    let contents = sidecar.sink.contents();
    assert!(
        contents.contains(&"before the outage".to_owned()),
        "{contents:?}"
    );
    assert!(
        sim.sim.snapshot().initialize_calls > initialized_before,
        "re-initialised after the outage"
    );
    let row = client_row(&sidecar).await;
    assert_eq!(row["connected"], true, "{row}");
    assert_eq!(instance_errors(&sidecar).await, 1);
    assert_eq!(
        sidecar.metric("wxauto_listener_restarts_total").await,
        Some(0.0)
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_outage_is_one_error_and_one_re_add() {
    let sim = start_sim("lh2").await;
    let (text, env) = config_for(&[(ID, &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    sim.sim.inject("bob", "bob", "hello");
    eventually("bob listened", DEADLINE, || async {
        (adds(&sim, "bob") == 1).then_some(())
    })
    .await;
    wait_client_up(&sidecar, 1.0).await;

    for outage in 1..=2 {
        sim.sim.set_online(false);
        wait_client_up(&sidecar, 0.0).await;
        sim.sim.set_online(true);
        wait_client_up(&sidecar, 1.0).await;
        eventually(
            &format!("bob re-added after outage {outage}"),
            DEADLINE,
            || async { (adds(&sim, "bob") == 1 + outage).then_some(()) },
        )
        .await;
        eventually(&format!("{outage} outage errors"), DEADLINE, || async {
            (instance_errors(&sidecar).await == outage).then_some(())
        })
        .await;
    }
    let row = client_row(&sidecar).await;
    assert_eq!(row["connected"], true, "{row}");
    let listeners = sidecar.get_json("/api/v1/listeners").await;
    assert_eq!(listeners["total_count"], 1, "{listeners}");
    assert_eq!(listeners["active_count"], 1, "{listeners}");
    sidecar.stop().await;
}
