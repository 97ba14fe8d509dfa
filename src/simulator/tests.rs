//! HTTP-level tests of the simulator: each starts `Simulator::serve` on a real `127.0.0.1:0`
//! socket and talks to it with reqwest, the way the sidecar will.

use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

const KEY: &str = "secret-key";

/// A running simulator plus a client for it. Dropping it stops the server.
struct Harness {
    sim: Simulator,
    base: String,
    client: Client,
    cancel: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn start() -> Harness {
    start_with(SimConfig {
        api_key: KEY.to_owned(),
        name: "test".to_owned(),
        flaky: false,
        ..SimConfig::default()
    })
    .await
}

async fn start_with(config: SimConfig) -> Harness {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim = Simulator::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let cancel = CancellationToken::new();
    let server = tokio::spawn(sim.clone().serve(listener, cancel.clone()));
    Harness {
        sim,
        base: format!("http://{addr}"),
        client: client(Duration::from_secs(5)),
        cancel,
        server: Some(server),
    }
}

fn client(timeout: Duration) -> Client {
    Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .expect("client")
}

impl Harness {
    /// An authenticated wxauto API call; answers the status and the parsed body.
    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("X-API-Key", KEY);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        let text = res.text().await.expect("body");
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("{path}: body is not JSON ({err}): {text}"));
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.api(Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.api(Method::POST, path, Some(body)).await
    }

    /// A control-surface call (no key).
    async fn control(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, format!("{}/_sim{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await.expect("request");
        let status = res.status();
        (status, res.json().await.expect("control answers JSON"))
    }

    async fn initialize(&self) {
        let (status, body) = self.post("/api/wechat/initialize", json!({})).await;
        assert_eq!(
            (status, &body["code"]),
            (StatusCode::OK, &json!(0)),
            "{body}"
        );
    }

    async fn listen(&self, who: &str) {
        let (status, body) = self
            .post("/api/message/listen/add", json!({ "nickname": who }))
            .await;
        assert_eq!(
            (status, &body["code"]),
            (StatusCode::OK, &json!(0)),
            "{body}"
        );
    }
}

/// The single `(chat, messages)` pair of a `{messages: {...}}` answer, or `None` when empty.
fn only_chat(body: &Value) -> Option<(String, Vec<Value>)> {
    assert_eq!(body["code"], 0, "{body}");
    let messages = body["data"]["messages"]
        .as_object()
        .expect("messages object");
    assert!(
        messages.len() <= 1,
        "more than one chat in one answer: {body}"
    );
    messages
        .iter()
        .next()
        .map(|(chat, list)| (chat.clone(), list.as_array().expect("message list").clone()))
}

fn contents(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["content"].as_str().expect("content").to_owned())
        .collect()
}

fn assert_error(answer: &(StatusCode, Value), status: StatusCode, code: i64) {
    let (got_status, body) = answer;
    assert_eq!(
        (*got_status, &body["code"]),
        (status, &json!(code)),
        "{body}"
    );
    assert!(body["message"].is_string(), "{body}");
    assert!(body["data"].is_null(), "{body}");
}

#[tokio::test]
async fn auth_rejects_missing_and_wrong_keys() {
    let h = start().await;
    let url = format!("{}/api/message/get-next-new", h.base);

    let res = h.client.get(&url).send().await.expect("request");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.expect("json");
    assert_eq!(
        body,
        json!({ "code": 1001, "message": "缺少API密钥", "data": null })
    );

    let res = h
        .client
        .post(format!("{}/api/wechat/initialize", h.base))
        .header("X-API-Key", "nope")
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let body: Value = res.json().await.expect("json");
    assert_eq!(
        body,
        json!({ "code": 1001, "message": "API密钥无效", "data": null })
    );

    // A rejected call changes nothing but is still counted.
    let snapshot = h.sim.snapshot();
    assert!(!snapshot.initialized);
    assert_eq!(snapshot.initialize_calls, 0);
    assert_eq!(snapshot.calls.get("POST /api/wechat/initialize"), Some(&1));

    // Unknown routes are a 404 envelope, before any auth.
    let res = h
        .client
        .get(format!("{}/api/nope", h.base))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: Value = res.json().await.expect("json");
    assert_eq!(body["code"], 5000);
}

#[tokio::test]
async fn health_needs_no_key_and_reflects_wechat_state() {
    let h = start().await;
    let health = || async {
        let res = h
            .client
            .get(format!("{}/api/health", h.base))
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), StatusCode::OK);
        let body: Value = res.json().await.expect("json");
        assert_eq!(body["code"], 0);
        assert_eq!(body["data"]["status"], "ok");
        assert_eq!(body["data"]["wx_lib"], "wxauto");
        assert!(body["data"]["uptime"].is_u64(), "{body}");
        body["data"]["wechat_status"]
            .as_str()
            .expect("status")
            .to_owned()
    };

    assert_eq!(health().await, "disconnected", "online but not initialised");
    h.initialize().await;
    assert_eq!(health().await, "connected");
    h.sim.set_online(false);
    assert_eq!(health().await, "disconnected");
    h.sim.set_online(true);
    assert_eq!(
        health().await,
        "disconnected",
        "a WeChat restart needs a new initialize"
    );
    h.initialize().await;
    assert_eq!(health().await, "connected");
}

#[tokio::test]
async fn get_next_new_answers_one_chat_per_call_with_the_marker() {
    let h = start().await;
    h.initialize().await;
    h.sim.inject("群A", "张三", "a1");
    h.sim.inject("好友B", "好友B", "b1");
    h.sim.inject("群A", "李四", "a2");

    let path = "/api/message/get-next-new?savepic=true&savevideo=false&savefile=true&savevoice=true&parseurl=true";
    let (_, body) = h.get(path).await;
    let (chat, messages) = only_chat(&body).expect("群A first: its oldest unread is oldest");
    assert_eq!(chat, "群A");
    assert_eq!(contents(&messages), ["以下为新消息", "a1", "a2"]);
    assert_eq!(messages[0]["type"], "sys");
    let first = &messages[1];
    assert_eq!(first["type"], "friend");
    assert_eq!(first["sender"], "张三");
    assert!(first["sender_remark"].is_null() && first["mtype"].is_null());
    assert!(first["file_path"].is_null());
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sim-test-"))
    );
    let time = first["time"].as_str().expect("time");
    assert!(
        chrono::NaiveDateTime::parse_from_str(time, "%Y-%m-%d %H:%M:%S").is_ok(),
        "{time}"
    );
    assert_eq!(h.sim.snapshot().pending_main.get("好友B"), Some(&1));

    let (_, body) = h.get(path).await;
    let (chat, messages) = only_chat(&body).expect("then 好友B");
    assert_eq!(chat, "好友B");
    assert_eq!(
        contents(&messages),
        ["b1"],
        "one message comes without a marker"
    );

    let (_, body) = h.get(path).await;
    assert_eq!(only_chat(&body), None);
    assert!(h.sim.snapshot().pending_main.is_empty());
}

#[tokio::test]
async fn listen_get_is_destructive_and_answers_one_chat_per_call() {
    let h = start().await;
    h.initialize().await;
    h.sim.inject("A", "A", "unread before listening");
    h.listen("A").await;
    h.listen("B").await;
    h.sim.inject("B", "B", "b1");
    h.sim.inject("A", "A", "a1");
    h.sim.inject("A", "A", "a2");

    let snapshot = h.sim.snapshot();
    assert_eq!(
        snapshot.pending_main.get("A"),
        Some(&1),
        "old unread stays in the main window"
    );
    assert_eq!(snapshot.pending_listen.get("A"), Some(&2));

    // "A" was listened first, so it is served first although "B" got a message earlier.
    let (status, body) = h.get("/api/message/listen/get?who=B").await;
    assert_eq!(status, StatusCode::OK);
    let (chat, messages) = only_chat(&body).expect("A");
    assert_eq!(
        (chat.as_str(), contents(&messages)),
        ("A", vec!["a1".into(), "a2".into()])
    );
    let (_, body) = h.get("/api/message/listen/get").await;
    let (chat, messages) = only_chat(&body).expect("B");
    assert_eq!(
        (chat.as_str(), contents(&messages)),
        ("B", vec!["b1".into()])
    );
    let (_, body) = h.get("/api/message/listen/get").await;
    assert_eq!(only_chat(&body), None, "the caches were emptied");

    let (_, body) = h.get("/api/message/get-next-new").await;
    assert_eq!(only_chat(&body).map(|(chat, _)| chat).as_deref(), Some("A"));
}

/// A chat the account does not have: `listen/add` fails as the real server fails it (HTTP
/// 500, code 3001), set through the control surface and kept by a restart.
#[tokio::test]
async fn listen_add_of_a_chat_the_account_lacks_is_refused_with_3001() {
    let h = start().await;
    h.initialize().await;
    let (status, body) = h
        .control(
            Method::POST,
            "/missing",
            Some(json!({ "chats": ["ghost"] })),
        )
        .await;
    assert_eq!(
        (status, &body["missing"]),
        (StatusCode::OK, &json!(["ghost"]))
    );
    assert_error(
        &h.post("/api/message/listen/add", json!({ "nickname": "ghost" }))
            .await,
        StatusCode::INTERNAL_SERVER_ERROR,
        3001,
    );
    h.listen("A").await;
    h.sim.restart();
    h.initialize().await;
    assert_error(
        &h.post(
            "/api/message/listen/add",
            json!({ "who": "ghost", "nickname": "ghost" }),
        )
        .await,
        StatusCode::INTERNAL_SERVER_ERROR,
        3001,
    );
    h.sim.set_missing_chats(&[]);
    h.listen("ghost").await;
    assert_eq!(h.sim.snapshot().listened, ["ghost"]);
}

#[tokio::test]
async fn listen_add_and_remove_follow_the_server_rules() {
    let h = start().await;
    h.initialize().await;
    let (_, body) = h
        .post("/api/message/listen/add", json!({ "nickname": "A" }))
        .await;
    assert_eq!(
        body["data"],
        json!({ "nickname": "A", "library": "wxauto" })
    );
    h.listen("A").await;

    assert_error(
        &h.post("/api/message/listen/add", json!({})).await,
        StatusCode::BAD_REQUEST,
        1002,
    );
    assert_error(
        &h.post("/api/message/listen/remove", json!({ "who": "A" }))
            .await,
        StatusCode::BAD_REQUEST,
        1001,
    );
    assert_error(
        &h.post("/api/message/listen/remove", json!({ "nickname": "Z" }))
            .await,
        StatusCode::INTERNAL_SERVER_ERROR,
        3003,
    );
    let (status, body) = h
        .post("/api/message/listen/remove", json!({ "nickname": "A" }))
        .await;
    assert_eq!(
        (status, &body["data"]["nickname"]),
        (StatusCode::OK, &json!("A"))
    );

    let snapshot = h.sim.snapshot();
    assert!(snapshot.listened.is_empty());
    let log: Vec<_> = snapshot
        .listen_log
        .iter()
        .map(|e| (e.action, e.nickname.as_str()))
        .collect();
    assert_eq!(
        log,
        [
            (ListenAction::Add, "A"),
            (ListenAction::Add, "A"),
            (ListenAction::Remove, "A")
        ]
    );
}

#[tokio::test]
async fn send_works_only_for_listened_chats_and_echoes_as_self() {
    let h = start().await;
    h.initialize().await;
    let send = "/api/chat-window/message/send";

    let answer = h
        .post(send, json!({ "who": "A", "message": "hi", "clear": true }))
        .await;
    assert_error(&answer, StatusCode::NOT_FOUND, 3001);
    assert!(
        answer.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("未在监听列表"))
    );
    assert_error(
        &h.post(send, json!({ "who": "A" })).await,
        StatusCode::BAD_REQUEST,
        1002,
    );
    assert_error(
        &h.post(send, json!({ "message": "x" })).await,
        StatusCode::BAD_REQUEST,
        1002,
    );
    assert!(h.sim.snapshot().sent.is_empty());

    h.listen("A").await;
    let (status, body) = h
        .post(send, json!({ "who": "A", "message": "hi", "clear": true }))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"], json!({ "message_id": "success" }));
    let typing = "/api/chat-window/message/send-typing";
    let body = json!({ "who": "A", "message": "yo", "clear": true, "at_list": ["张三"] });
    assert_eq!(h.post(typing, body).await.0, StatusCode::OK);

    let sent = h.sim.snapshot().sent;
    assert_eq!(
        sent,
        [
            SentMessage {
                who: "A".into(),
                message: "hi".into(),
                at_list: vec![],
                typing: false,
            },
            SentMessage {
                who: "A".into(),
                message: "yo".into(),
                at_list: vec!["张三".into()],
                typing: true,
            },
        ]
    );

    let (_, body) = h.get("/api/message/listen/get").await;
    let (chat, messages) = only_chat(&body).expect("the echoes");
    assert_eq!(chat, "A");
    assert_eq!(contents(&messages), ["hi", "yo"]);
    assert!(
        messages
            .iter()
            .all(|m| m["type"] == "self" && m["sender"] == "Self")
    );
}

#[tokio::test]
async fn offline_wechat_refuses_calls_and_loses_its_listens() {
    let h = start().await;
    assert_error(
        &h.get("/api/message/get-next-new").await,
        StatusCode::BAD_REQUEST,
        2001,
    );
    h.initialize().await;
    h.listen("A").await;
    h.sim.inject("A", "A", "cached");
    h.sim.inject("B", "B", "unread");

    let (status, body) = h
        .control(Method::POST, "/wechat", Some(json!({ "online": false })))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "online": false })));
    h.sim.inject("A", "A", "while offline");

    for answer in [
        h.get("/api/message/get-next-new").await,
        h.get("/api/message/listen/get").await,
        h.post("/api/message/listen/add", json!({ "nickname": "A" }))
            .await,
        h.post("/api/message/listen/remove", json!({ "nickname": "A" }))
            .await,
        h.post(
            "/api/chat-window/message/send",
            json!({ "who": "A", "message": "x" }),
        )
        .await,
    ] {
        assert_error(&answer, StatusCode::BAD_REQUEST, 2001);
    }
    assert_error(
        &h.post("/api/wechat/initialize", json!({})).await,
        StatusCode::INTERNAL_SERVER_ERROR,
        2001,
    );

    let snapshot = h.sim.snapshot();
    assert!(!snapshot.initialized && !snapshot.online);
    assert!(snapshot.listened.is_empty() && snapshot.pending_listen.is_empty());
    assert_eq!(snapshot.pending_main.get("B"), Some(&1));
    assert_eq!(
        snapshot.pending_main.get("A"),
        Some(&1),
        "offline messages queue in the main window"
    );

    h.control(Method::POST, "/wechat", Some(json!({ "online": true })))
        .await;
    h.initialize().await;
    let (_, body) = h.get("/api/message/get-next-new").await;
    assert_eq!(only_chat(&body).map(|(chat, _)| chat).as_deref(), Some("B"));
    assert_eq!(h.sim.snapshot().initialize_calls, 3);
}

#[tokio::test]
async fn http500_fault_hits_every_api_route_but_not_the_control_surface() {
    let h = start().await;
    h.sim.set_fault(Fault::Http500);
    let res = h
        .client
        .get(format!("{}/api/health", h.base))
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let body: Value = res.json().await.expect("json");
    assert_eq!(
        body,
        json!({ "code": 5000, "message": "服务器内部错误", "data": null })
    );

    assert_error(
        &h.post("/api/wechat/initialize", json!({})).await,
        StatusCode::INTERNAL_SERVER_ERROR,
        5000,
    );
    assert!(
        !h.sim.snapshot().initialized,
        "a faulted call changes nothing"
    );

    let (status, snapshot) = h.control(Method::GET, "/state", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(snapshot["calls"]["GET /api/health"], 1);
}

#[tokio::test]
async fn garbage_fault_answers_invalid_json_labelled_as_json() {
    let h = start().await;
    h.sim.set_fault(Fault::Garbage);
    let mut bodies = Vec::new();
    for path in ["/api/health", "/api/message/get-next-new"] {
        let res = h
            .client
            .get(format!("{}{path}", h.base))
            .header("X-API-Key", KEY)
            .send()
            .await
            .expect("request");
        assert_eq!(res.status(), StatusCode::OK);
        let content_type = res.headers().get("content-type").cloned();
        assert_eq!(
            content_type.as_ref().and_then(|v| v.to_str().ok()),
            Some("application/json")
        );
        let text = res.text().await.expect("body");
        assert!(
            serde_json::from_str::<Value>(&text).is_err(),
            "valid JSON: {text}"
        );
        bodies.push(text);
    }
    assert_ne!(bodies[0], bodies[1], "the two garbage bodies alternate");
}

#[tokio::test]
async fn wrong_types_fault_answers_an_envelope_with_wrong_types() {
    let h = start().await;
    h.initialize().await;
    h.sim.set_fault(Fault::WrongTypes);
    let (status, body) = h.get("/api/message/get-next-new").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body["code"].is_string(), "{body}");
    assert!(body["message"].is_number(), "{body}");
    assert!(body["data"]["messages"].is_array(), "{body}");
}

#[tokio::test]
async fn faulted_listen_get_loses_no_messages() {
    let h = start().await;
    h.initialize().await;
    h.listen("A").await;
    h.sim.inject("A", "A", "keep me");
    let short = client(Duration::from_millis(200));

    for fault in [
        Fault::Http500,
        Fault::Garbage,
        Fault::WrongTypes,
        Fault::Hang,
    ] {
        h.sim.set_fault(fault);
        let res = short
            .get(format!("{}/api/message/listen/get", h.base))
            .header("X-API-Key", KEY)
            .send()
            .await;
        if fault == Fault::Hang {
            assert!(
                res.is_err_and(|err| err.is_timeout()),
                "a hung call only times out"
            );
        }
        assert_eq!(
            h.sim.snapshot().pending_listen.get("A"),
            Some(&1),
            "{fault:?}"
        );
    }

    h.sim.set_fault(Fault::None);
    let (_, body) = h.get("/api/message/listen/get").await;
    let (_, messages) = only_chat(&body).expect("still there");
    assert_eq!(contents(&messages), ["keep me"]);
    assert_eq!(
        h.sim.snapshot().calls.get("GET /api/message/listen/get"),
        Some(&5)
    );
}

#[tokio::test]
async fn slow_fault_delays_then_answers_normally() {
    let h = start().await;
    h.sim.set_fault(Fault::Slow(Duration::from_millis(150)));
    let started = Instant::now();
    h.initialize().await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert!(h.sim.snapshot().initialized);
}

#[tokio::test]
async fn flaky_fails_some_calls_but_not_all() {
    let h = start_with(SimConfig {
        api_key: KEY.to_owned(),
        name: "flaky".to_owned(),
        flaky: true,
        ..SimConfig::default()
    })
    .await;
    let mut failures = 0;
    const CALLS: usize = 200;
    for _ in 0..CALLS {
        let res = h
            .client
            .get(format!("{}/api/health", h.base))
            .send()
            .await
            .expect("request");
        if res.status() == StatusCode::INTERNAL_SERVER_ERROR {
            failures += 1;
        }
    }
    // 20% of 200 is 40; these bounds fail with negligible probability for a fair coin.
    assert!(
        (10..=90).contains(&failures),
        "{failures} of {CALLS} failed"
    );
}

#[tokio::test]
async fn control_surface_round_trip() {
    let h = start().await;
    let (status, body) = h
        .control(
            Method::POST,
            "/inject",
            Some(json!({ "chat": "A", "content": "x", "count": 3 })),
        )
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({ "injected": 3 })));
    let raw = json!({ "id": "raw-1", "type": "time", "content": "12:00", "sender": "SYS" });
    let (status, _) = h
        .control(
            Method::POST,
            "/inject",
            Some(json!({ "chat": "B", "message": raw })),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let (_, state) = h.control(Method::GET, "/state", None).await;
    assert_eq!(state["pending_main"], json!({ "A": 3, "B": 1 }));
    assert_eq!(state["online"], true);
    assert_eq!(state["initialized"], false);

    for bad in [
        json!({ "chat": "A" }),
        json!({ "chat": "A", "content": "x", "message": {} }),
        json!({ "chat": "", "content": "x" }),
        json!({ "chat": "A", "content": "x", "typo": 1 }),
        json!({ "chat": "A", "content": "x", "count": 1_000_000 }),
    ] {
        let (status, body) = h.control(Method::POST, "/inject", Some(bad.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert!(body["error"].is_string());
    }

    let (status, body) = h
        .control(
            Method::POST,
            "/fault",
            Some(json!({ "mode": "slow", "delay_ms": 20 })),
        )
        .await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({ "mode": "slow", "delay_ms": 20 }))
    );
    let (status, _) = h
        .control(Method::POST, "/fault", Some(json!({ "mode": "boom" })))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = h
        .control(Method::POST, "/fault", Some(json!({ "mode": "http500" })))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        h.get("/api/health").await.0,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    // The control surface, unknown paths included, is never faulted nor counted.
    let (status, body) = h.control(Method::GET, "/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let (_, state) = h.control(Method::GET, "/state", None).await;
    assert_eq!(state["calls"], json!({ "GET /api/health": 1 }));

    // After a reset everything is fresh, no fault included, and the key still works.
    let (status, state) = h.control(Method::POST, "/reset", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(state["pending_main"], json!({}));
    assert_eq!(state["calls"], json!({}));
    h.initialize().await;
    h.sim.inject("A", "A", "after reset");
    let (_, body) = h.get("/api/message/get-next-new").await;
    let (_, messages) = only_chat(&body).expect("one message");
    let id = messages[0]["id"].as_str().expect("id");
    assert_ne!(id, "sim-test-1", "ids keep counting across a reset");
}

#[tokio::test]
async fn serve_stops_promptly_even_with_a_hung_request() {
    let mut h = start().await;
    h.sim.set_fault(Fault::Hang);
    let hung = {
        let req = h.client.get(format!("{}/api/health", h.base)).send();
        tokio::spawn(req)
    };
    // The request has reached the hang once the simulator counted it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !h.sim.snapshot().calls.contains_key("GET /api/health") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the request never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    h.cancel.cancel();
    let server = h.server.take().expect("server handle");
    let stopped = tokio::time::timeout(Duration::from_secs(1), server).await;
    assert!(
        matches!(stopped, Ok(Ok(Ok(())))),
        "serve did not stop within 1 s: {stopped:?}"
    );
    let res = hung.await.expect("join");
    assert_eq!(
        res.map(|r| r.status()).ok(),
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
}

#[tokio::test(start_paused = true)]
async fn chatter_injects_until_cancelled() {
    // Paused time: one message per 20 ms tick, the first 20 ms after the start.
    let sim = Simulator::new(SimConfig::default());
    let cancel = CancellationToken::new();
    sim.spawn_chatter(Duration::from_millis(20), cancel.clone());
    let queued = || sim.snapshot().pending_main.values().sum::<usize>();
    tokio::time::sleep(Duration::from_millis(310)).await;
    assert_eq!(queued(), 15, "one message per tick");

    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let after_cancel = queued();
    // Fifty more ticks' worth of paused time: a chatter still running would have fired them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(queued(), after_cancel, "chatter kept going after cancel");
}

#[tokio::test(start_paused = true)]
async fn slow_call_abandoned_by_its_client_changes_nothing() {
    // hyper drops the handler when the client hangs up mid-wait, so the destructive read
    // behind a slow answer never runs. The sidecar relies on that to lose nothing on timeouts.
    let h = start().await;
    h.initialize().await;
    h.listen("A").await;
    h.sim.inject("A", "A", "keep me");
    h.sim.set_fault(Fault::Slow(Duration::from_millis(300)));
    let res = client(Duration::from_millis(100))
        .get(format!("{}/api/message/listen/get", h.base))
        .header("X-API-Key", KEY)
        .send()
        .await;
    assert!(res.is_err_and(|err| err.is_timeout()));
    // Paused time: well past the 300 ms the handler waited, so a read still pending would
    // have run by now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.sim.snapshot().pending_listen.get("A"), Some(&1));
}
