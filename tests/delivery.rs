//! Delivery through the real binary: SIGKILL and restart at random moments, platform failures
//! that retry or dead-letter, and replies back to the right chat, against simulators and a
//! webhook receiver on loopback.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::serve::IncomingStream;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::{CancellationToken, DropGuard};
use wxauto_sidecar::simulator::{ApiGeneration, SimConfig, Simulator};

use crate::util::{eventually, http_client};

const BIN: &str = env!("CARGO_BIN_EXE_wxauto-sidecar");

// === the sidecar process ===

/// The real binary in a tempdir of its own (it writes `data/` into its working directory),
/// restartable on the same port, config and database. Dropping it kills the process, so a
/// failed assertion never leaves a sidecar behind; a panicking test also prints its logs.
struct Sidecar {
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: usize,
}

impl Sidecar {
    fn start(config: &str, env: Vec<(String, String)>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sidecar.yaml");
        std::fs::write(&path, config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut sidecar = Self {
            dir,
            config: path,
            port,
            env,
            child: None,
            starts: 0,
        };
        sidecar.spawn();
        sidecar
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "the previous process still runs");
        let log = self.dir.path().join(format!("sidecar-{}.log", self.starts));
        let log = File::create(log).unwrap();
        let child = Command::new(BIN)
            .current_dir(self.dir.path())
            .arg("--config")
            .arg(&self.config)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.starts += 1;
    }

    /// SIGKILL (`Child::kill` is `kill -KILL <pid>` on Unix): no shutdown path runs.
    #[cfg(unix)]
    fn kill(&mut self) {
        let mut child = self.child.take().expect("a running sidecar");
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert!(!status.success(), "killed, not exited: {status}");
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The `/metrics` text, or `None` while the process is not (yet) serving.
    async fn metrics(&self, http: &reqwest::Client) -> Option<String> {
        let response = http.get(self.url("/metrics")).send().await.ok()?;
        response.text().await.ok()
    }

    fn logs(&self) -> String {
        let mut logs = String::new();
        for start in 0..self.starts {
            let path = self.dir.path().join(format!("sidecar-{start}.log"));
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            logs.push_str(&format!("--- sidecar run {start} (last 40 lines) ---\n"));
            logs.push_str(&tail.join("\n"));
            logs.push('\n');
        }
        logs
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            if std::env::var_os("DELIVERY_KILL_KEEP").is_some() {
                let kept = self.dir.path().with_extension("kept");
                let _ = std::fs::rename(self.dir.path(), &kept);
                eprintln!("kept {}", kept.display());
            }
        }
    }
}

/// The value of the first series of `name` whose labels include every pair of `labels`.
fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let ours = (rest.is_empty() || rest.starts_with('{'))
                && labels
                    .iter()
                    .all(|(label, want)| rest.contains(&format!("{label}=\"{want}\"")));
            ours.then(|| value.parse().ok()).flatten()
        })
}

// === simulators that record what they hand out ===

/// A simulator whose every API answer is logged with the connection it went out on and the
/// contents of the messages it carried (the destructive reads hand messages over exactly once).
struct RecordedSim {
    sim: Simulator,
    name: String,
    instance_id: String,
    addr: SocketAddr,
    key: String,
    served: Arc<Mutex<Vec<Served>>>,
    _stop: DropGuard,
}

/// One wxauto API answer (read by the Unix-only kill test).
#[cfg_attr(not(unix), allow(dead_code))]
struct Served {
    conn: u64,
    contents: Vec<String>,
}

/// A process-wide serial number per accepted connection: unlike a peer address, it can never
/// be shared by a killed sidecar and its successor.
#[derive(Clone, Copy)]
struct ConnId(u64);

static NEXT_CONN: AtomicU64 = AtomicU64::new(0);

impl Connected<IncomingStream<'_, TcpListener>> for ConnId {
    fn connect_info(_stream: IncomingStream<'_, TcpListener>) -> Self {
        ConnId(NEXT_CONN.fetch_add(1, Ordering::Relaxed))
    }
}

async fn start_sim(name: &str, instance_id: &str) -> RecordedSim {
    start_sim_with(name, instance_id, SimConfig::default()).await
}

/// A recorded simulator built from `base` (its key and name are set here).
async fn start_sim_with(name: &str, instance_id: &str, base: SimConfig) -> RecordedSim {
    let key = format!("key-{name}-0123456789");
    let sim = Simulator::new(SimConfig {
        api_key: key.clone(),
        name: name.to_owned(),
        flaky: false,
        ..base
    });
    let served = Arc::new(Mutex::new(Vec::new()));
    let app = sim.router().layer(axum::middleware::from_fn_with_state(
        Arc::clone(&served),
        record_answer,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<ConnId>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    });
    RecordedSim {
        sim,
        name: name.to_owned(),
        instance_id: instance_id.to_owned(),
        addr,
        key,
        served,
        _stop: stop.drop_guard(),
    }
}

/// Logs the answer before it is sent, so it is in the log before the client can make its next
/// request on that connection.
async fn record_answer(
    State(served): State<Arc<Mutex<Vec<Served>>>>,
    ConnectInfo(ConnId(conn)): ConnectInfo<ConnId>,
    request: Request,
    next: Next,
) -> Response {
    let api = request.uri().path().starts_with("/api/");
    let response = next.run(request).await;
    if !api {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    let contents = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|answer| answer["data"]["messages"].as_object().cloned())
        .into_iter()
        .flat_map(|chats| chats.into_iter().map(|(_, messages)| messages))
        .filter_map(|messages| messages.as_array().cloned())
        .flatten()
        .filter_map(|message| message["content"].as_str().map(str::to_owned))
        .collect();
    served.lock().unwrap().push(Served { conn, contents });
    Response::from_parts(parts, Body::from(bytes))
}

impl RecordedSim {
    /// The replies this instance received, as (chat, text).
    fn sent(&self) -> Vec<(String, String)> {
        self.sim
            .snapshot()
            .sent
            .into_iter()
            .map(|sent| (sent.who, sent.message))
            .collect()
    }
}

// === the webhook receiver ===

/// What the receiver answers to one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// 200 `{"reply": "ack <content>"}`.
    Reply,
    /// 204, no reply.
    Empty,
    /// This status with a plain-text body.
    Status(u16),
    /// Sleep this long (past the platform timeout), then `Reply`.
    Late(Duration),
}

/// Decides the answer from the message content and how many requests carried its key so far
/// (1 for the first).
type Script = Arc<dyn Fn(&str, usize) -> Answer + Send + Sync>;

/// One request the receiver got, recorded on arrival.
#[derive(Clone, Debug)]
struct Hit {
    key: String,
    content_type: String,
    body: Value,
    answer: Answer,
    at: Instant,
}

impl Hit {
    fn content(&self) -> &str {
        self.body["content"].as_str().unwrap_or_default()
    }

    fn attempt(&self) -> u64 {
        self.body["attempt"].as_u64().unwrap_or_default()
    }
}

struct HookState {
    hits: Mutex<Vec<Hit>>,
    script: Script,
}

struct Hook {
    url: String,
    state: Arc<HookState>,
    _stop: DropGuard,
}

async fn start_hook(script: Script) -> Hook {
    let state = Arc::new(HookState {
        hits: Mutex::new(Vec::new()),
        script,
    });
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(Arc::clone(&state));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let shutdown = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    Hook {
        url: format!("http://{addr}/hook"),
        state,
        _stop: stop.drop_guard(),
    }
}

async fn receive(State(state): State<Arc<HookState>>, headers: HeaderMap, body: Bytes) -> Response {
    // A request cut short by a kill is not a delivery.
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let key = header("idempotency-key");
    let content = body["content"].as_str().unwrap_or_default().to_owned();
    let answer = {
        let mut hits = state.hits.lock().unwrap();
        let nth = 1 + hits.iter().filter(|hit| hit.key == key).count();
        let answer = (state.script)(&content, nth);
        hits.push(Hit {
            key,
            content_type: header("content-type"),
            body,
            answer,
            at: Instant::now(),
        });
        answer
    };
    let reply = || axum::Json(json!({ "reply": format!("ack {content}") })).into_response();
    match answer {
        Answer::Reply => reply(),
        Answer::Empty => StatusCode::NO_CONTENT.into_response(),
        Answer::Status(code) => {
            (StatusCode::from_u16(code).unwrap(), "scripted failure").into_response()
        }
        Answer::Late(delay) => {
            tokio::time::sleep(delay).await;
            reply()
        }
    }
}

impl Hook {
    fn hits(&self) -> Vec<Hit> {
        self.state.hits.lock().unwrap().clone()
    }

    fn hits_for(&self, content: &str) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|hit| hit.content() == content)
            .collect()
    }
}

// === configuration ===

/// A config for the simulators and the receiver, with fast listener intervals; `delivery` is
/// the verbatim `delivery:` section and `timeout` the webhook platform's.
fn config(
    sims: &[&RecordedSim],
    hook: &Hook,
    timeout: &str,
    delivery: &str,
) -> (String, Vec<(String, String)>) {
    let mut text = String::from(
        "listener:\n  poll_interval: 100ms\n  health_check_interval: 300ms\n  \
         request_timeout: 2s\n  backoff: { initial: 100ms, max: 400ms }\n",
    );
    text.push_str("instances:\n");
    let mut env = Vec::new();
    for sim in sims {
        let var = format!("DELIVERY_TEST_KEY_{}", sim.name.to_uppercase());
        text.push_str(&format!(
            "  - id: {}\n    base_url: http://{}\n    api_key_env: {var}\n",
            sim.instance_id, sim.addr
        ));
        env.push((var, sim.key.clone()));
    }
    text.push_str(&format!(
        "platforms:\n  - id: hook\n    type: webhook\n    url: {}\n    timeout: {timeout}\n",
        hook.url
    ));
    text.push_str(
        "rules:\n  - id: everything\n    instance: \"*\"\n    chat: \"*\"\n    platform: hook\n",
    );
    text.push_str(delivery);
    // Relative to the sidecar's working directory, its tempdir.
    text.push_str("storage:\n  path: data/delivery-test.db\n");
    (text, env)
}

// === platform failures ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_failures_retry_or_dead_letter() {
    let slow = Arc::new(AtomicBool::new(true));
    let script: Script = {
        let slow = Arc::clone(&slow);
        Arc::new(move |content, nth| match content {
            "slow" if slow.load(Ordering::SeqCst) => Answer::Late(Duration::from_secs(3)),
            "e500" if nth <= 2 => Answer::Status(500),
            "e429" if nth <= 2 => Answer::Status(429),
            "e408" if nth <= 1 => Answer::Status(408),
            "e408" => Answer::Empty,
            "e400" => Answer::Status(400),
            _ => Answer::Reply,
        })
    };
    let sim = start_sim("f", "wx-f").await;
    let hook = start_hook(script).await;
    let (text, env) = config(
        &[&sim],
        &hook,
        "1s",
        "delivery:\n  workers: 4\n  max_attempts: 8\n  \
         backoff: { initial: 100ms, max: 300ms }\n  attempt_timeout: 5s\n",
    );
    let http = http_client();
    let sidecar = Sidecar::start(&text, env);
    // One chat each, so that a message waiting for its retry holds back nothing else; the
    // second message of `e400` shows that a dead message does not block its chat either.
    for content in ["slow", "e500", "e429", "e408", "e400", "e400 after"] {
        let chat = content.split(' ').next().unwrap();
        sim.sim.inject(chat, chat, content);
    }

    eventually(
        "the slow platform timed out and was retried",
        Duration::from_secs(15),
        || async { (hook.hits_for("slow").len() >= 2).then_some(()) },
    )
    .await;
    slow.store(false, Ordering::SeqCst);
    let metrics = eventually("every message settled", Duration::from_secs(20), || async {
        let sent = sim.sent();
        let replied = ["slow", "e500", "e429", "e400 after"]
            .iter()
            .all(|content| {
                sent.iter()
                    .any(|(_, text)| *text == format!("ack {content}"))
            });
        let metrics = sidecar.metrics(&http).await?;
        let settled = series(&metrics, "wxauto_messages_pending", &[]) == Some(0.0);
        (replied && settled).then_some(metrics)
    })
    .await;

    for content in ["slow", "e500", "e429", "e408", "e400", "e400 after"] {
        let hits = hook.hits_for(content);
        let first = &hits[0];
        let mut same = first.body.clone();
        same["attempt"] = Value::Null;
        let fields: BTreeSet<&str> = first
            .body
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            BTreeSet::from([
                "instance_id",
                "chat",
                "sender",
                "content",
                "message_id",
                "epoch",
                "mtype",
                "received_at",
                "attempt"
            ]),
            "the documented webhook body"
        );
        assert_eq!(first.body["mtype"], Value::Null);
        let received_at = first.body["received_at"].as_str().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(received_at).is_ok(),
            "{received_at}"
        );
        let expected_key = format!("wx-f:{}", first.body["message_id"].as_str().unwrap());
        for (n, hit) in hits.iter().enumerate() {
            assert_eq!(hit.content_type, "application/json");
            assert_eq!(hit.key, expected_key, "{content}: the key is stable");
            // `attempt` counts from 1 and is the only field that changes.
            assert_eq!(hit.attempt(), n as u64 + 1, "{content}: attempt");
            let mut body = hit.body.clone();
            body["attempt"] = Value::Null;
            assert_eq!(body, same, "{content}: the body is stable");
        }
    }
    let attempts = |content: &str| hook.hits_for(content).len();
    assert_eq!(attempts("e500"), 3, "500 twice, then delivered");
    assert_eq!(attempts("e429"), 3, "429 twice, then delivered");
    assert_eq!(attempts("e408"), 2, "408 once, then 204");
    assert_eq!(attempts("e400"), 1, "400 is dead at once");
    assert_eq!(attempts("e400 after"), 1);
    let slow_hits = hook.hits_for("slow");
    let (last, timed_out) = slow_hits.split_last().unwrap();
    assert!(timed_out.len() >= 2, "{slow_hits:?}");
    assert!(
        timed_out
            .iter()
            .all(|hit| matches!(hit.answer, Answer::Late(_))),
        "{slow_hits:?}"
    );
    assert_eq!(last.answer, Answer::Reply);

    // Replies: one per delivered message with a reply; none for 204 or the dead message.
    let sent = sim.sent();
    for content in ["slow", "e500", "e429", "e400 after"] {
        let chat = content.split(' ').next().unwrap();
        let reply = format!("ack {content}");
        let copies = sent.iter().filter(|(_, text)| *text == reply).count();
        assert_eq!(copies, 1, "{reply:?} sent once: {sent:?}");
        assert!(sent.contains(&(chat.to_owned(), reply)), "{sent:?}");
    }
    assert_eq!(
        sent.len(),
        4,
        "no reply for 204 or a dead message: {sent:?}"
    );

    let value = |name: &str, labels: &[(&str, &str)]| series(&metrics, name, labels);
    let outcome = |outcome: &str| {
        value(
            "wxauto_deliveries_total",
            &[("platform", "hook"), ("outcome", outcome)],
        )
    };
    assert_eq!(value("wxauto_messages_dead", &[]), Some(1.0));
    assert_eq!(outcome("dead"), Some(1.0));
    assert_eq!(outcome("success"), Some(5.0));
    let retries = timed_out.len() + 2 + 2 + 1;
    assert_eq!(outcome("retry"), Some(retries as f64));
    let timeouts = value(
        "wxauto_errors_total",
        &[("component", "delivery"), ("kind", "timeout")],
    );
    assert!(timeouts >= Some(timed_out.len() as f64), "{timeouts:?}");
    let statuses = value(
        "wxauto_errors_total",
        &[("component", "delivery"), ("kind", "http_status")],
    );
    assert_eq!(statuses, Some(6.0), "500 ×2, 429 ×2, 408, 400");
}

// === replies and echoes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_go_to_the_right_chat_and_echo_is_ignored() {
    // `end …` markers get a 204: no reply, so no echo after them.
    let script: Script = Arc::new(|content, _| {
        if content.starts_with("end ") {
            Answer::Empty
        } else {
            Answer::Reply
        }
    });
    let sim = start_sim("r", "wx-r").await;
    let hook = start_hook(script).await;
    let (text, env) = config(
        &[&sim],
        &hook,
        "2s",
        "delivery:\n  workers: 4\n  max_attempts: 5\n  \
         backoff: { initial: 100ms, max: 300ms }\n  attempt_timeout: 5s\n",
    );
    let http = http_client();
    let sidecar = Sidecar::start(&text, env);
    let settled = || async {
        let metrics = sidecar.metrics(&http).await?;
        (series(&metrics, "wxauto_messages_pending", &[]) == Some(0.0)).then_some(metrics)
    };

    // A private chat (the sender is the chat) and a group.
    sim.sim.inject("alice", "alice", "hi alice");
    sim.sim.inject("team", "bob", "hi team");
    eventually("both replies sent", Duration::from_secs(15), || async {
        let sent = sim.sent();
        let want = [("alice", "ack hi alice"), ("team", "ack hi team")];
        want.iter()
            .all(|(who, text)| sent.contains(&((*who).to_owned(), (*text).to_owned())))
            .then_some(())
    })
    .await;
    // Both rows delivered: the replies are remembered for the echo guard.
    eventually("replies recorded", Duration::from_secs(10), settled).await;
    let snapshot = sim.sim.snapshot();
    assert!(
        snapshot
            .sent
            .iter()
            .all(|sent| sent.at_list.is_empty() && !sent.typing),
        "{:?}",
        snapshot.sent
    );

    // The simulator already queued its self-echo of each reply (type "self") in the listen
    // window. Now the group shows our reply again as a normal message from our own account
    // (an echo), and the people we answered repeat our words (messages, not echoes).
    sim.sim.inject_message(
        "team",
        json!({"type": "friend", "sender": "MyBot", "content": "ack hi team"}),
    );
    sim.sim.inject("team", "bob", "ack hi team");
    sim.sim.inject("alice", "alice", "ack hi alice");
    // Markers: a chat is delivered in order, so once its marker arrived, everything queued
    // before it in that chat has been seen and decided.
    sim.sim.inject("team", "bob", "end team");
    sim.sim.inject("alice", "alice", "end alice");
    eventually("markers delivered", Duration::from_secs(15), || async {
        let contents: Vec<String> = hook
            .hits()
            .iter()
            .map(|hit| hit.content().to_owned())
            .collect();
        (contents.contains(&"end team".to_owned()) && contents.contains(&"end alice".to_owned()))
            .then_some(())
    })
    .await;
    let metrics = eventually("all settled", Duration::from_secs(10), settled).await;

    let mut delivered: Vec<(String, String, String)> = hook
        .hits()
        .iter()
        .map(|hit| {
            (
                hit.body["chat"].as_str().unwrap_or_default().to_owned(),
                hit.body["sender"].as_str().unwrap_or_default().to_owned(),
                hit.content().to_owned(),
            )
        })
        .collect();
    delivered.sort();
    let expected = |rows: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
        rows.iter()
            .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
            .collect()
    };
    assert_eq!(
        delivered,
        expected(&[
            ("alice", "alice", "ack hi alice"),
            ("alice", "alice", "end alice"),
            ("alice", "alice", "hi alice"),
            ("team", "bob", "ack hi team"),
            ("team", "bob", "end team"),
            ("team", "bob", "hi team"),
        ]),
        "each message exactly once; no echo delivered"
    );
    let mut sent = sim.sent();
    sent.sort();
    assert_eq!(
        sent,
        vec![
            ("alice".to_owned(), "ack ack hi alice".to_owned()),
            ("alice".to_owned(), "ack hi alice".to_owned()),
            ("team".to_owned(), "ack ack hi team".to_owned()),
            ("team".to_owned(), "ack hi team".to_owned()),
        ],
        "each reply once, to its own chat"
    );
    assert_eq!(
        series(
            &metrics,
            "wxauto_messages_dropped_total",
            &[("instance_id", "wx-r"), ("reason", "echo")]
        ),
        Some(1.0),
        "the group echo is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_at_sender_ats_in_groups_and_never_in_a_chat_named_by_remark() {
    let sim = start_sim("at", "wx-at").await;
    let hook = start_hook(Arc::new(|_, _| Answer::Reply)).await;
    let (text, env) = config(&[&sim], &hook, "2s", "");
    let text = text.replace(
        "    platform: hook\n",
        "    platform: hook\n    reply_at_sender: true\n",
    );
    let _sidecar = Sidecar::start(&text, env);

    // wxauto names a 1:1 chat after the friend as WeChat shows them: the remark when one is
    // set. The same friend in a group, a plain 1:1 chat, and a group member without remark.
    let from_bob = |content: &str| json!({"type": "friend", "sender": "bob", "sender_remark": "Bobby", "content": content});
    sim.sim.inject_message("Bobby", from_bob("hi from bob"));
    sim.sim.inject_message("team", from_bob("hi team"));
    sim.sim.inject("carol", "carol", "hi from carol");
    sim.sim.inject("team", "dave", "hi from dave");
    let sent = eventually("four replies sent", Duration::from_secs(15), || async {
        let sent = sim.sim.snapshot().sent;
        (sent.len() >= 4).then_some(sent)
    })
    .await;
    let mut at_lists: Vec<(String, String, Vec<String>)> = sent
        .into_iter()
        .map(|sent| (sent.who, sent.message, sent.at_list))
        .collect();
    at_lists.sort();
    let expected = |who: &str, message: &str, at: &[&str]| {
        (
            who.to_owned(),
            message.to_owned(),
            at.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        at_lists,
        vec![
            expected("Bobby", "ack hi from bob", &[]),
            expected("carol", "ack hi from carol", &[]),
            expected("team", "ack hi from dave", &["dave"]),
            expected("team", "ack hi team", &["Bobby"]),
        ],
        "an @ in groups only (by remark), none in 1:1 chats"
    );
}

// === kill and restart ===

/// SIGKILL is Unix; the rest of this file runs everywhere.
#[cfg(unix)]
mod kill {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::*;

    /// Messages handed out in the last answer of a connection. The sidecar commits what one answer
    /// gave it before it makes its next request to that instance, so only these can have been in
    /// flight when a process died; every other answer was provably committed.
    fn unconfirmed(sim: &RecordedSim) -> HashSet<String> {
        let mut last: HashMap<u64, &[String]> = HashMap::new();
        let served = sim.served.lock().unwrap();
        for answer in served.iter() {
            last.insert(answer.conn, &answer.contents);
        }
        last.values()
            .flat_map(|contents| contents.iter().cloned())
            .collect()
    }

    /// One message of the kill test's stream.
    struct Planned {
        sim: usize,
        chat: &'static str,
        sender: &'static str,
        content: String,
        gap: Duration,
    }

    /// When a process was killed and when its successor was started.
    #[derive(Debug, Clone, Copy)]
    struct KillWindow {
        killed: Instant,
        restarted: Instant,
    }

    /// Chats of each simulator, with their senders: a private chat's only sender is the chat.
    const CHATS: [(&str, &[&str]); 4] = [
        ("alice", &["alice"]),
        ("bob", &["bob"]),
        ("team-1", &["carol", "dave"]),
        ("team-2", &["erin", "frank"]),
    ];

    /// `instance/content` of the planned messages `filter` selects, for a failure report.
    fn describe(plan: &[Planned], sims: &[RecordedSim], filter: impl Fn(&str) -> bool) -> String {
        plan.iter()
            .filter(|planned| filter(&planned.content))
            .map(|planned| format!("{}/{}", sims[planned.sim].instance_id, planned.content))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A stream of messages over several chats on two instances, one of each server
    /// generation, whose destructive reads answer late (like a real server driving the WeChat
    /// UI, so kills land while answers are in flight); the real binary is SIGKILLed at random
    /// moments and restarted. Nothing may be lost, twice in a row; duplicates carry one key.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_and_restart_loses_nothing() {
        let seed = std::env::var("DELIVERY_KILL_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        eprintln!("kill test seed {seed} (set DELIVERY_KILL_SEED to replay the schedule)");
        // Two rounds, twice in a row (DELIVERY_KILL_ROUNDS for more). DELIVERY_KILL_KEEP=1 keeps
        // a failing round's directory (store, every process's full log) and prints its path.
        let rounds: u64 = std::env::var("DELIVERY_KILL_ROUNDS")
            .ok()
            .and_then(|rounds| rounds.parse().ok())
            .filter(|rounds| *rounds > 0)
            .unwrap_or(2);
        for round in 0..rounds {
            kill_round(seed.wrapping_add(round), round).await;
        }
    }

    async fn kill_round(seed: u64, round: u64) {
        const WORKERS: usize = 4;
        /// Between a kill and the restart: a supervisor's restart delay. It also separates the
        /// requests of the dead process (all in the receiver before the restart) from the new
        /// one's.
        const RESTART_DELAY: Duration = Duration::from_millis(100);
        /// How long a destructive read takes to answer after it took the messages.
        const READ_LATENCY: Duration = Duration::from_millis(40);

        let messages: usize = std::env::var("DELIVERY_KILL_MESSAGES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(1000);
        // The kills fall into the injection, at random gaps.
        let kills_wanted: u64 = std::env::var("DELIVERY_KILLS")
            .ok()
            .and_then(|kills| kills.parse().ok())
            .filter(|kills| *kills > 0)
            .unwrap_or(5);
        let mut rng = fastrand::Rng::with_seed(seed);
        let plan: Vec<Planned> = (0..messages)
            .map(|n| {
                let sim = rng.usize(..2);
                let (chat, senders) = CHATS[rng.usize(..CHATS.len())];
                Planned {
                    sim,
                    chat,
                    sender: senders[rng.usize(..senders.len())],
                    content: format!("{}/{chat}/{n:04}", ["a", "b"][sim]),
                    gap: Duration::from_millis(rng.u64(1..6)),
                }
            })
            .collect();
        let injection_ms: u64 = plan.iter().map(|p| p.gap.as_millis() as u64).sum();
        let max_gap = injection_ms / kills_wanted;

        let generations = [ApiGeneration::Who, ApiGeneration::Nickname];
        let mut sims = Vec::new();
        for (name, generation) in ["a", "b"].into_iter().zip(generations) {
            // DELIVERY_KILL_NO_HISTORY=1 measures what a server without the history endpoint
            // (or a sidecar without recovery) loses: the test then fails and names the losses.
            let base = SimConfig {
                api_generation: generation,
                read_latency: READ_LATENCY,
                history: std::env::var_os("DELIVERY_KILL_NO_HISTORY").is_none(),
                ..SimConfig::default()
            };
            sims.push(start_sim_with(name, &format!("wx-{name}"), base).await);
        }
        let hook = start_hook(Arc::new(|_, _| Answer::Reply)).await;
        // No platform timeout can fire here, so every duplicate must come from a kill. The
        // chats are fixed listeners: the first message of a chat nobody listens to yet is the
        // one thing a kill can still take (read from the main window, it has no history to
        // re-read); that limit is documented, not tested here.
        let mut extra = format!(
            "delivery:\n  workers: {WORKERS}\n  max_attempts: 50\n  \
             backoff: {{ initial: 50ms, max: 250ms }}\n  attempt_timeout: 20s\n\
             fixed_listeners:\n"
        );
        for (chat, _) in CHATS {
            extra.push_str(&format!("  - chat: {chat}\n    instances: [\"*\"]\n"));
        }
        let (text, env) = config(&[&sims[0], &sims[1]], &hook, "10s", &extra);
        let http = http_client();
        let mut sidecar = Sidecar::start(&text, env);
        eventually(
            "both instances listen to every chat",
            Duration::from_secs(15),
            || {
                let ready = sims
                    .iter()
                    .all(|sim| sim.sim.snapshot().listened.len() == CHATS.len());
                async move { ready.then_some(()) }
            },
        )
        .await;
        let started = Instant::now();

        let injector = {
            let targets: Vec<Simulator> = sims.iter().map(|sim| sim.sim.clone()).collect();
            let stream: Vec<(usize, &str, &str, String, Duration)> = plan
                .iter()
                .map(|p| (p.sim, p.chat, p.sender, p.content.clone(), p.gap))
                .collect();
            tokio::spawn(async move {
                for (sim, chat, sender, content, gap) in stream {
                    targets[sim].inject(chat, sender, &content);
                    tokio::time::sleep(gap).await;
                }
            })
        };

        let mut kills = Vec::new();
        for _ in 0..kills_wanted {
            tokio::time::sleep(Duration::from_millis(rng.u64(max_gap / 5..max_gap.max(2)))).await;
            let killed = Instant::now();
            sidecar.kill();
            tokio::time::sleep(RESTART_DELAY).await;
            let restarted = Instant::now();
            sidecar.spawn();
            kills.push(KillWindow { killed, restarted });
        }
        injector.await.unwrap();
        let injected = started.elapsed();

        // Done when every message reached the receiver and its reply reached its chat.
        let by_content: HashMap<&str, &Planned> = plan
            .iter()
            .map(|planned| (planned.content.as_str(), planned))
            .collect();
        let answered = |planned: &Planned, sent: &[Vec<(String, String)>]| {
            let reply = format!("ack {}", planned.content);
            sent[planned.sim]
                .iter()
                .any(|(who, text)| who == planned.chat && *text == reply)
        };
        // Generous: on a loaded 2-core machine the settling alone took 15 s.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let delivered: HashSet<String> = hook
                .hits()
                .iter()
                .map(|hit| hit.content().to_owned())
                .collect();
            let sent: Vec<Vec<(String, String)>> = sims.iter().map(RecordedSim::sent).collect();
            let missing: BTreeSet<String> = plan
                .iter()
                .filter(|planned| !delivered.contains(&planned.content))
                .map(|planned| planned.content.clone())
                .collect();
            let unanswered = plan
                .iter()
                .filter(|planned| delivered.contains(&planned.content) && !answered(planned, &sent))
                .count();
            if missing.is_empty() && unanswered == 0 {
                break;
            }
            if Instant::now() > deadline {
                let unconfirmed: HashSet<String> = sims.iter().flat_map(unconfirmed).collect();
                let in_flight =
                    |content: &str| missing.contains(content) && unconfirmed.contains(content);
                panic!(
                    "round {round}, after 120 s: {} message(s) never delivered ({}), of which in \
                     flight at a kill: [{}]; {unanswered} delivered message(s) without their \
                     reply; seed {seed}",
                    missing.len(),
                    describe(&plan, &sims, |content| missing.contains(content)),
                    describe(&plan, &sims, in_flight),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let settled = started.elapsed();

        // Every delivery carries the right, stable key and the message it was taken from.
        let hits = hook.hits();
        let mut per_content: BTreeMap<&str, Vec<&Hit>> = BTreeMap::new();
        for hit in &hits {
            let planned = by_content
                .get(hit.content())
                .unwrap_or_else(|| panic!("delivered something never injected: {:?}", hit.body));
            let sim = &sims[planned.sim];
            assert_eq!(hit.content_type, "application/json");
            assert_eq!(hit.body["instance_id"], sim.instance_id.as_str());
            assert_eq!(hit.body["chat"], planned.chat);
            assert_eq!(hit.body["sender"], planned.sender);
            let message_id = hit.body["message_id"].as_str().unwrap_or_default();
            assert!(
                message_id.starts_with(&format!("sim-{}-", sim.name)),
                "{message_id}"
            );
            assert_eq!(hit.key, format!("{}:{message_id}", sim.instance_id));
            per_content
                .entry(planned.content.as_str())
                .or_default()
                .push(hit);
        }
        let mut keys = HashSet::new();
        let mut duplicates = 0;
        for (content, deliveries) in &per_content {
            let first = deliveries[0];
            assert!(
                keys.insert(first.key.clone()),
                "two messages share {}",
                first.key
            );
            for pair in deliveries.windows(2) {
                let (before, after) = (pair[0], pair[1]);
                assert_eq!(before.key, after.key, "{content}: the key changed");
                assert!(
                    after.attempt() > before.attempt(),
                    "{content}: attempt {} after {}",
                    after.attempt(),
                    before.attempt()
                );
                // The earlier delivery is the dead process's (in before its successor started),
                // the later one is a successor's (after the kill).
                assert!(
                    kills
                        .iter()
                        .any(|kill| before.at <= kill.restarted && after.at >= kill.killed),
                    "{content} delivered twice with no kill in between (attempts {} and {})",
                    before.attempt(),
                    after.attempt()
                );
                duplicates += 1;
            }
        }

        // Replies went to the chat of the message they answer, on its own instance.
        let mut reply_duplicates = 0;
        for (index, sim) in sims.iter().enumerate() {
            let mut seen = HashSet::new();
            for (who, text) in sim.sent() {
                let content = text.strip_prefix("ack ").unwrap_or(&text);
                let planned = by_content
                    .get(content)
                    .unwrap_or_else(|| panic!("{}: unexpected reply {text:?}", sim.instance_id));
                assert_eq!(planned.sim, index, "{text:?} went to the wrong instance");
                assert_eq!(who, planned.chat, "{text:?} went to the wrong chat");
                if !seen.insert(text.clone()) {
                    reply_duplicates += 1;
                }
            }
        }

        // The true bound: a worker claims one row at a time (one atomic UPDATE), so a kill
        // leaves at most WORKERS rows `delivering` (or `replying`); the next start puts exactly
        // those back in the queue, and each is delivered (or its reply sent) once more. Messages
        // re-read from a chat's history are matched by id, so they add none.
        let bound = kills.len() * WORKERS;
        assert!(
            duplicates <= bound,
            "{duplicates} duplicate deliveries, more than {bound}"
        );
        assert!(
            reply_duplicates <= bound,
            "{reply_duplicates} duplicate replies, more than {bound}"
        );
        let metrics = eventually("the last sidecar serves", Duration::from_secs(10), || {
            sidecar.metrics(&http)
        })
        .await;
        assert_eq!(series(&metrics, "wxauto_messages_dead", &[]), Some(0.0));
        let recovered: f64 = ["wx-a", "wx-b"]
            .iter()
            .filter_map(|id| {
                series(
                    &metrics,
                    "wxauto_messages_recovered_total",
                    &[("instance_id", id)],
                )
            })
            .sum();
        let unconfirmed: usize = sims.iter().map(|sim| unconfirmed(sim).len()).sum();
        eprintln!(
            "kill test round {round}: {} messages, {} kills at {:?} ms, {} deliveries, \
             {duplicates} duplicate(s) (bound {bound}), {reply_duplicates} duplicate repl(ies), \
             0 lost, {recovered} recovered by the last process ({unconfirmed} unconfirmed \
             answers at the end), injected in {injected:?}, settled in {settled:?}, seed {seed}",
            plan.len(),
            kills.len(),
            kills
                .iter()
                .map(|kill| kill.killed.duration_since(started).as_millis())
                .collect::<Vec<_>>(),
            hits.len(),
        );
    }
}

// === batched claims and group commit ===

/// Many rows over a few chats with more workers than chats: claims are batched (one write
/// claims a row for every free worker) and completions share commits, yet every chat reaches
/// the platform strictly in order, once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_claims_keep_each_chat_in_order() {
    const PER_CHAT: usize = 40;
    const CHATS: [&str; 3] = ["alice", "team-1", "team-2"];
    let script: Script = Arc::new(|_, _| Answer::Empty);
    let sim = start_sim("o", "wx-o").await;
    let hook = start_hook(script).await;
    let mut extra = String::from(
        "delivery:\n  workers: 8\n  max_attempts: 5\n  \
         backoff: { initial: 100ms, max: 300ms }\n  attempt_timeout: 5s\nfixed_listeners:\n",
    );
    for chat in CHATS {
        extra.push_str(&format!("  - chat: {chat}\n    instances: [\"*\"]\n"));
    }
    let (text, env) = config(&[&sim], &hook, "2s", &extra);
    let sidecar = Sidecar::start(&text, env);
    eventually("every chat listened", Duration::from_secs(15), || async {
        (sim.sim.snapshot().listened.len() == CHATS.len()).then_some(())
    })
    .await;
    for n in 0..PER_CHAT {
        for chat in CHATS {
            sim.sim.inject(chat, "carol", &format!("{chat}/{n:03}"));
        }
    }
    let total = PER_CHAT * CHATS.len();
    eventually(
        "every message delivered",
        Duration::from_secs(60),
        || async { (hook.hits().len() >= total).then_some(()) },
    )
    .await;
    let hits = hook.hits();
    let keys: BTreeSet<&str> = hits.iter().map(|hit| hit.key.as_str()).collect();
    assert_eq!(keys.len(), total, "one key per message");
    assert_eq!(
        hits.len(),
        total,
        "no duplicates without a kill or a timeout"
    );
    for chat in CHATS {
        let arrived: Vec<&str> = hits
            .iter()
            .map(Hit::content)
            .filter(|content| content.starts_with(&format!("{chat}/")))
            .collect();
        let mut sorted = arrived.clone();
        sorted.sort_unstable();
        assert_eq!(arrived, sorted, "chat {chat} delivered out of order");
    }
    drop(sidecar);
}

/// The platform took a message, and the sidecar is killed before the commit that records it:
/// the test holds the database's write lock from the platform's answer on, so that commit
/// (whichever batch it is in) cannot happen. After the restart the message is delivered again
/// with the same idempotency key, and then recorded.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_before_the_batched_commit_redelivers_with_the_same_key() {
    let db: Arc<Mutex<Option<PathBuf>>> = Arc::new(Mutex::new(None));
    let lock: Arc<Mutex<Option<rusqlite::Connection>>> = Arc::new(Mutex::new(None));
    let script: Script = {
        let (db, lock) = (Arc::clone(&db), Arc::clone(&lock));
        Arc::new(move |content, nth| {
            if content == "hold" && nth == 1 {
                let path = db
                    .lock()
                    .unwrap()
                    .clone()
                    .expect("the database path is set");
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(Duration::from_secs(10)).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                *lock.lock().unwrap() = Some(conn);
            }
            Answer::Empty
        })
    };
    let sim = start_sim("k", "wx-k").await;
    let hook = start_hook(script).await;
    let (text, env) = config(
        &[&sim],
        &hook,
        "2s",
        "delivery:\n  workers: 4\n  attempt_timeout: 5s\nfixed_listeners:\n  \
         - chat: alice\n    instances: [\"*\"]\n",
    );
    let http = http_client();
    let mut sidecar = Sidecar::start(&text, env);
    *db.lock().unwrap() = Some(sidecar.dir.path().join("data/delivery-test.db"));
    eventually("the chat listened", Duration::from_secs(15), || async {
        (!sim.sim.snapshot().listened.is_empty()).then_some(())
    })
    .await;
    sim.sim.inject("alice", "alice", "hold");
    eventually(
        "the platform took it, the lock is held",
        Duration::from_secs(15),
        || async { lock.lock().unwrap().is_some().then_some(()) },
    )
    .await;
    sidecar.kill();
    // The killed process committed nothing after the lock: release it unchanged.
    let held = lock.lock().unwrap().take().unwrap();
    held.execute_batch("ROLLBACK").unwrap();
    drop(held);
    sidecar.spawn();
    eventually("delivered again", Duration::from_secs(30), || async {
        (hook.hits_for("hold").len() >= 2).then_some(())
    })
    .await;
    eventually("recorded as delivered", Duration::from_secs(15), || async {
        let metrics = sidecar.metrics(&http).await?;
        (series(&metrics, "wxauto_messages_pending", &[]) == Some(0.0)).then_some(())
    })
    .await;
    let hits = hook.hits_for("hold");
    assert_eq!(hits.len(), 2, "{hits:?}");
    assert_eq!(hits[0].key, hits[1].key, "the same idempotency key");
    assert!(hits[0].key.starts_with("wx-k:"), "{}", hits[0].key);
}
