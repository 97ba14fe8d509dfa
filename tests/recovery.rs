//! What outlives the process: the chat table across restarts (quiet chats still time out),
//! upstream sessions (a reused id after a server restart is a new message), and dead letters an
//! operator lists, retries and purges with the real `dead` command; and a text typed twice on a
//! server that sends no message ids is two messages, not one deduplicated away.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use wxauto_sidecar::simulator::ListenAction;

use crate::util::{BIN, Binary, DEADLINE, Sim, eventually, metric_value, start_sim};

/// A webhook that records (idempotency key, body) and answers 400 while `refuse` is set;
/// with `reply` set it answers `{"reply": "ack <content>"}` once `release` is notified.
#[derive(Clone, Default)]
struct Hook {
    hits: Arc<Mutex<Vec<(String, Value)>>>,
    refuse: Arc<AtomicBool>,
    reply: Arc<AtomicBool>,
    release: Arc<tokio::sync::Notify>,
}

impl Hook {
    async fn start(&self) -> (String, tokio_util::sync::DropGuard) {
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        });
        (url, stop.drop_guard())
    }

    fn contents(&self) -> Vec<String> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| body["content"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Waits until the hook has received `count` deliveries.
    async fn wait_for(&self, count: usize, what: &str) {
        eventually(what, DEADLINE, || async {
            (self.contents().len() == count).then_some(())
        })
        .await;
    }

    fn keys_of(&self, content: &str) -> Vec<String> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, body)| body["content"] == content)
            .map(|(key, _)| key.clone())
            .collect()
    }
}

async fn receive(
    State(hook): State<Hook>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    if hook.refuse.load(Ordering::SeqCst) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let content = body["content"].as_str().unwrap_or_default().to_owned();
    hook.hits.lock().unwrap().push((key, body));
    if hook.reply.load(Ordering::SeqCst) {
        hook.release.notified().await;
        let reply = serde_json::json!({ "reply": format!("ack {content}") });
        return axum::Json(reply).into_response();
    }
    StatusCode::NO_CONTENT.into_response()
}

/// A config file for one simulator and the hook, in `dir`.
fn write_config(dir: &Path, sim: &Sim, hook_url: &str, extra: &str) -> Vec<(String, String)> {
    let text = format!(
        "server:\n  enable_lifecycle: true\n\
         listener:\n  poll_interval: 100ms\n  health_check_interval: 300ms\n  \
         request_timeout: 1s\n  backoff: {{ initial: 100ms, max: 400ms }}\n{extra}\
         health:\n  report_file: data/report.json\n\
         instances:\n  - id: wx-r\n    base_url: http://{}\n    api_key_env: RECOVERY_KEY\n\
         platforms:\n  - id: hook\n    type: webhook\n    url: {hook_url}\n\
         rules:\n  - id: all\n    instance: \"*\"\n    chat: \"*\"\n    platform: hook\n\
         delivery:\n  max_attempts: 2\n  backoff: {{ initial: 50ms, max: 100ms }}\n\
         storage:\n  path: data/recovery.db\n",
        sim.addr
    );
    std::fs::write(dir.join("sidecar.yaml"), text).unwrap();
    vec![("RECOVERY_KEY".to_owned(), sim.key.clone())]
}

/// One simulator, the hook and a config for them in a temporary directory: what every test here
/// starts from. The sidecar itself is started (and restarted) with `start`.
struct Setup {
    sim: Sim,
    hook: Hook,
    _hook_server: tokio_util::sync::DropGuard,
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
}

impl Setup {
    async fn new(name: &str, extra: &str) -> Self {
        let sim = start_sim(name).await;
        let hook = Hook::default();
        let (url, hook_server) = hook.start().await;
        let dir = tempfile::tempdir().unwrap();
        let env = write_config(dir.path(), &sim, &url, extra);
        Self {
            sim,
            hook,
            _hook_server: hook_server,
            dir,
            env,
        }
    }

    async fn start(&self) -> Binary {
        let config = self.dir.path().join("sidecar.yaml");
        Binary::start(self.dir.path(), &config, &self.env).await
    }

    /// `chat` is an active row of the chat table in the store file.
    fn stored_active(&self, chat: &str) -> bool {
        let path = self.dir.path().join("data").join("recovery.db");
        let Ok(conn) = rusqlite::Connection::open(path) else {
            return false;
        };
        let _ = conn.busy_timeout(Duration::from_secs(5));
        conn.query_row(
            "SELECT COUNT(*) FROM chats WHERE chat = ?1 AND active = 1",
            [chat],
            |row| row.get::<_, i64>(0),
        )
        .is_ok_and(|count| count == 1)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_table_survives_a_restart_and_quiet_chats_still_time_out() {
    let setup = Setup::new("ct", "  listener_timeout: 3s\n").await;
    let (sim, hook) = (&setup.sim, &setup.hook);
    let first = setup.start().await;
    sim.sim.inject("carol", "carol", "hello");
    eventually("carol is listened", DEADLINE, || async {
        sim.sim
            .snapshot()
            .listened
            .contains(&"carol".to_owned())
            .then_some(())
    })
    .await;
    // The table is written after the listen/add (before carol's first destructive read): a
    // kill between the two would leave nothing for the successor to know carol from.
    eventually("carol is in the stored chat table", DEADLINE, || async {
        setup.stored_active("carol").then_some(())
    })
    .await;
    // Killed: no shutdown path runs. Its successor knows carol only from the store.
    drop(first);
    let second = setup.start().await;
    let listens = |action: ListenAction| {
        sim.sim
            .snapshot()
            .listen_log
            .iter()
            .filter(|event| event.nickname == "carol" && event.action == action)
            .count()
    };
    eventually("carol is re-added by the new process", DEADLINE, || async {
        (listens(ListenAction::Add) >= 2).then_some(())
    })
    .await;
    // Nothing more is said in carol's chat: its idle timer ran on from its last message, so it
    // is removed upstream instead of holding a listener slot forever.
    eventually("carol times out upstream", DEADLINE, || async {
        (listens(ListenAction::Remove) == 1).then_some(())
    })
    .await;
    assert!(!sim.sim.snapshot().listened.contains(&"carol".to_owned()));
    let metrics = second.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wxauto_listeners_removed_total{instance_id=\"wx-r\",reason=\"timeout\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        hook.contents(),
        ["hello"],
        "delivered once, nothing re-read twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_id_after_a_server_restart_is_a_new_message() {
    let setup = Setup::new("ep", "").await;
    let (sim, hook) = (&setup.sim, &setup.hook);
    let sidecar = setup.start().await;
    sim.sim.inject("dave", "dave", "before");
    hook.wait_for(1, "the first message is delivered").await;
    // The wxauto server restarts: its runtime ids start over, so the next message gets the id
    // the first one had.
    sim.sim.restart();
    sim.sim.inject("dave", "dave", "after");
    hook.wait_for(2, "the second message is delivered").await;
    let before = hook.keys_of("before");
    let after = hook.keys_of("after");
    assert_eq!(before.len(), 1);
    assert_eq!(after.len(), 1);
    let id = before[0].strip_prefix("wx-r:").unwrap();
    assert!(
        after[0].starts_with(&format!("wx-r:{id}@")),
        "the same upstream id in a new session: {after:?} after {before:?}"
    );
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wxauto_messages_dropped_total{instance_id=\"wx-r\",reason=\"duplicate\"}"
        ),
        Some(0.0),
        "the new message was not taken for a duplicate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_text_twice_without_upstream_ids_is_two_messages() {
    let setup = Setup::new("ni", "").await;
    let (sim, hook) = (&setup.sim, &setup.hook);
    let sidecar = setup.start().await;
    // A server that hands out no message ids: a person types "1", gets an answer, types "1" again.
    let id_less =
        serde_json::json!({"type": "friend", "sender": "erin", "content": "1", "id": null});
    sim.sim.inject_message("erin", id_less.clone());
    hook.wait_for(1, "the first \"1\" is delivered").await;
    sim.sim.inject_message("erin", id_less);
    hook.wait_for(2, "the second \"1\" is delivered").await;
    let keys = hook.keys_of("1");
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "two messages carry two idempotency keys");
    let metrics = sidecar.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "wxauto_messages_dropped_total{instance_id=\"wx-r\",reason=\"duplicate\"}"
        ),
        Some(0.0),
        "the second \"1\" was not taken for a duplicate"
    );
}

fn dead(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN)
        .arg("dead")
        .args(args)
        .args(["--url", url])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs the binary with stdout a pipe whose reading end is closed at once, before the command
/// can have asked the sidecar anything (`dead list | head -0`); returns the exit code and
/// stderr.
fn into_closed_pipe(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_retried_and_purged_with_the_cli() {
    let setup = Setup::new("dl", "").await;
    let (sim, hook) = (&setup.sim, &setup.hook);
    hook.refuse.store(true, Ordering::SeqCst);
    let sidecar = setup.start().await;
    let base = sidecar.url("");
    let dead_count = || async { metric_value(&sidecar.metrics().await, "wxauto_messages_dead") };
    sim.sim.inject("erin", "erin", "refused once");
    sim.sim.inject("frank", "frank", "refused for good");
    eventually("both are dead letters", DEADLINE, || async {
        (dead_count().await == Some(2.0)).then_some(())
    })
    .await;

    let (code, out, err) = dead(&base, &["list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 dead letter(s) shown of 2"), "{out}");
    assert!(out.contains("erin") && out.contains("frank"), "{out}");
    assert!(out.contains("HTTP 400"), "the last error is shown: {out}");
    // A reader that stops early (`| head`) ends the command quietly, with its usual exit code.
    let (code, err) = into_closed_pipe(&["dead", "list", "--url", &base]);
    assert_eq!(
        (code, err.as_str()),
        (0, ""),
        "dead list into a closed pipe"
    );
    let health = Command::new(BIN)
        .args(["health", "--url", &base])
        .output()
        .unwrap();
    let (code, err) = into_closed_pipe(&["health", "--url", &base]);
    assert_eq!((code, err.as_str()), (health.status.code().unwrap(), ""));
    // Any other write failure is a runtime failure, said on stderr.
    #[cfg(target_os = "linux")]
    {
        let output = Command::new(BIN)
            .args(["dead", "list", "--url", &base])
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{err}");
        assert!(err.contains("cannot write to stdout"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (status, body) = sidecar
        .request(reqwest::Method::GET, "/api/v1/messages/dead?limit=1")
        .await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["success"], true);
    assert_eq!(body["count"], 1);
    assert_eq!(body["total_count"], 2);
    let first = &body["data"][0];
    for field in [
        "id",
        "instance_id",
        "message_id",
        "chat",
        "platform",
        "attempts",
        "last_error",
        "dead_at",
    ] {
        assert!(!first[field].is_null(), "{field} in {first}");
    }
    let erin = first["id"].as_i64().unwrap();
    assert_eq!(first["chat"], "erin");
    for bad in ["limit=0", "limit=1001", "limit=x"] {
        let (status, _) = sidecar
            .request(
                reqwest::Method::GET,
                &format!("/api/v1/messages/dead?{bad}"),
            )
            .await;
        assert_eq!(status, 400, "{bad}");
    }

    // The platform is fixed: retry one; it goes through the normal path again.
    hook.refuse.store(false, Ordering::SeqCst);
    let (code, out, err) = dead(&base, &["retry", "--id", &erin.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 dead letter(s) queued"), "{out}");
    eventually("the retried letter is delivered", DEADLINE, || async {
        (hook.contents() == ["refused once"]).then_some(())
    })
    .await;
    assert_eq!(dead_count().await, Some(1.0));
    let (code, out, _) = dead(&base, &["purge"]);
    assert_eq!(code, 0);
    assert!(out.contains("1 dead letter(s) purged"), "{out}");
    assert_eq!(
        dead_count().await,
        Some(0.0),
        "the dead-letter alert can resolve"
    );
    let (code, out, _) = dead(&base, &["list"]);
    assert_eq!(code, 0);
    assert!(out.contains("0 dead letter(s) shown of 0"), "{out}");
    // Nobody listens there: the command says so and fails.
    let (code, _, err) = dead("http://127.0.0.1:9", &["list"]);
    assert_eq!(code, 2);
    assert!(err.contains("unreachable"), "{err}");
}

/// The chat's listen window is gone upstream while its message is with the platform: the
/// reply is refused with 3001. The sidecar listens to the chat again and sends the reply at
/// once, without spending an attempt or recording a failed reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_to_a_chat_whose_listener_vanished_relistens_and_goes_out() {
    let setup = Setup::new("hl", "").await;
    let (sim, hook) = (&setup.sim, &setup.hook);
    hook.reply.store(true, Ordering::SeqCst);
    let sidecar = setup.start().await;
    sim.sim.inject("gus", "gus", "question");
    hook.wait_for(1, "the platform has the message").await;
    // Someone (a WeChat window closed by hand, a server hiccup) removes the listener upstream.
    let removed = reqwest::Client::new()
        .post(format!("http://{}/api/message/listen/remove", sim.addr))
        .header("X-API-Key", &sim.key)
        .json(&serde_json::json!({ "nickname": "gus" }))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    assert!(!sim.sim.snapshot().listened.contains(&"gus".to_owned()));
    hook.release.notify_one();
    eventually("the reply reaches the chat", DEADLINE, || async {
        sim.sim
            .snapshot()
            .sent
            .iter()
            .any(|sent| sent.who == "gus" && sent.message == "ack question")
            .then_some(())
    })
    .await;
    assert!(sim.sim.snapshot().listened.contains(&"gus".to_owned()));
    // The simulator records the send before its answer reaches the sidecar, which counts the
    // outcome then: wait for the success before reading the error count beside it.
    let metrics = eventually("the reply is counted", DEADLINE, || async {
        let metrics = sidecar.metrics().await;
        let success = "wxauto_replies_total{instance_id=\"wx-r\",outcome=\"success\"}";
        (metric_value(&metrics, success) == Some(1.0)).then_some(metrics)
    })
    .await;
    assert_eq!(
        metric_value(
            &metrics,
            "wxauto_replies_total{instance_id=\"wx-r\",outcome=\"error\"}"
        ),
        Some(0.0),
        "no failed reply attempt"
    );
}
