//! Coze against a fake Coze written here (axum on `127.0.0.1:0`) and a real SQLite store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};

use super::*;
use crate::delivery::store::{Store, StoreGauges};

const KEY: &str = "pat_coze-test-secret-7788";
const PLATFORM: &str = "coze";

// === the fake Coze ===

/// A request as the fake saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    query: HashMap<String, String>,
    auth: Option<String>,
    body: Value,
}

/// How the fake answers.
#[derive(Debug, Clone, Copy)]
struct Behaviour {
    /// `in_progress` answers to `/v3/chat/retrieve` before the final status.
    in_progress: usize,
    /// The final status: `completed` or `failed`.
    outcome: &'static str,
    /// A wrong key gets HTTP 401 (true) or a 200 envelope with code 4100 (false).
    auth_as_http: bool,
}

#[derive(Debug)]
struct Chat {
    conversation_id: String,
    question: String,
    polls_left: usize,
}

#[derive(Default)]
struct FakeState {
    seen: Vec<Seen>,
    chats: HashMap<String, Chat>,
    /// Conversations the fake knows; any other id is refused.
    conversations: Vec<String>,
    next: usize,
}

struct Fake {
    behaviour: Behaviour,
    state: Mutex<FakeState>,
}

#[derive(Clone)]
struct Server {
    url: String,
    fake: Arc<Fake>,
}

impl Server {
    async fn start(behaviour: Behaviour) -> Self {
        let fake = Arc::new(Fake {
            behaviour,
            state: Mutex::new(FakeState::default()),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&fake));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            fake,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.fake.state.lock().expect("lock").seen.clone()
    }

    fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }
}

fn envelope(data: Value) -> Response {
    axum::Json(json!({"code": 0, "msg": "", "data": data})).into_response()
}

fn refuse(code: i64, msg: &str) -> Response {
    axum::Json(json!({"code": code, "msg": msg})).into_response()
}

async fn handle(
    State(fake): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let seen = Seen {
        method: method.clone(),
        path: uri.path().to_owned(),
        query: query.clone(),
        auth: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    let mut state = fake.state.lock().expect("lock");
    state.seen.push(seen.clone());
    if seen.auth.as_deref() != Some(&format!("Bearer {KEY}")) {
        // Like a server that echoes what it got: the client must redact it.
        let msg = format!(
            "authentication is invalid: {}",
            seen.auth.unwrap_or_default()
        );
        if fake.behaviour.auth_as_http {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"code": 4100, "msg": msg})),
            )
                .into_response();
        }
        return refuse(4100, &msg);
    }
    match (method, uri.path()) {
        (Method::POST, "/v3/chat") => {
            let conversation = match query.get("conversation_id") {
                Some(id) if state.conversations.contains(id) => id.clone(),
                Some(_) => return refuse(4200, "conversation not found"),
                None => {
                    state.next += 1;
                    let id = format!("conv-{}", state.next);
                    state.conversations.push(id.clone());
                    id
                }
            };
            state.next += 1;
            let chat_id = format!("chat-{}", state.next);
            let question = seen.body["additional_messages"][0]["content"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            state.chats.insert(
                chat_id.clone(),
                Chat {
                    conversation_id: conversation.clone(),
                    question,
                    polls_left: fake.behaviour.in_progress,
                },
            );
            envelope(json!({
                "id": chat_id, "conversation_id": conversation, "bot_id": "7350",
                "status": "created",
            }))
        }
        (Method::GET, "/v3/chat/retrieve") => {
            let behaviour = fake.behaviour;
            let Some(chat) = chat_of(&mut state.chats, &query) else {
                return refuse(4000, "unknown chat");
            };
            let status = if chat.polls_left > 0 {
                chat.polls_left -= 1;
                "in_progress"
            } else {
                behaviour.outcome
            };
            let mut data = json!({
                "id": query["chat_id"], "conversation_id": chat.conversation_id,
                "status": status,
            });
            if status == "failed" {
                data["last_error"] =
                    json!({"code": 5000, "msg": format!("model overloaded (token {KEY})")});
            }
            envelope(data)
        }
        (Method::GET, "/v3/chat/message/list") => {
            let Some(chat) = chat_of(&mut state.chats, &query) else {
                return refuse(4000, "unknown chat");
            };
            let question = chat.question.clone();
            envelope(json!([
                {"role": "user", "type": "question", "content": question},
                {"role": "assistant", "type": "verbose", "content": "{\"msg_type\":\"x\"}"},
                {"role": "assistant", "type": "answer", "content": format!("answer to {question}")},
                {"role": "assistant", "type": "answer", "content": "a second answer"},
                {"role": "assistant", "type": "follow_up", "content": "anything else?"},
            ]))
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The chat named by `chat_id`, if `conversation_id` matches it.
fn chat_of<'a>(
    chats: &'a mut HashMap<String, Chat>,
    query: &HashMap<String, String>,
) -> Option<&'a mut Chat> {
    let chat = chats.get_mut(query.get("chat_id")?)?;
    (query.get("conversation_id") == Some(&chat.conversation_id)).then_some(chat)
}

// === helpers ===

const FAST: PollSchedule = PollSchedule {
    first: Duration::from_millis(5),
    max: Duration::from_millis(20),
};

fn behaviour(in_progress: usize, outcome: &'static str) -> Behaviour {
    Behaviour {
        in_progress,
        outcome,
        auth_as_http: true,
    }
}

fn coze(server: &Server, key: &str, continuous: bool) -> Coze {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let config = CozePlatform {
        api_base: format!("{}/", server.url),
        api_key: Secret::new(key),
        bot_id: "7350".to_owned(),
        workspace_id: Some("ws-1".to_owned()),
        continuous_conversation: continuous,
    };
    Coze::new(&config, http, Duration::from_secs(3)).with_poll(FAST)
}

fn msg(chat: &str, sender: &str, id: &str, content: &str) -> InboundMessage {
    InboundMessage {
        instance_id: "wx1".to_owned(),
        chat: chat.to_owned(),
        message_id: id.to_owned(),
        synthetic_id: false,
        msg_type: "friend".to_owned(),
        sender: sender.to_owned(),
        sender_remark: None,
        content: content.to_owned(),
        mtype: None,
        file_path: None,
        received_at: Utc
            .with_ymd_and_hms(2026, 12, 1, 9, 0, 0)
            .single()
            .expect("valid time"),
        epoch: 0,
    }
}

async fn store(path: &Path) -> Store {
    Store::open(
        path,
        crate::config::Synchronous::Normal,
        StoreGauges::default(),
    )
    .await
    .expect("store opens")
}

async fn deliver(
    coze: &Coze,
    store: &Store,
    msg: &InboundMessage,
) -> Result<Option<String>, PlatformError> {
    coze.deliver(
        msg,
        Attempt {
            number: 1,
            store,
            platform_id: PLATFORM,
            attachments: &[],
        },
    )
    .await
}

// === tests ===

#[test]
fn the_poll_delay_grows_from_one_second_to_five() {
    let delays: Vec<Duration> = (0..7).map(|n| PollSchedule::DEFAULT.delay(n)).collect();
    assert_eq!(
        delays,
        [1000, 1500, 2250, 3375, 5000, 5000, 5000].map(Duration::from_millis)
    );
    assert_eq!(
        PollSchedule::DEFAULT.delay(u32::MAX),
        Duration::from_secs(5)
    );
    // A first delay above the cap is capped.
    let odd = PollSchedule {
        first: Duration::from_secs(9),
        max: Duration::from_secs(5),
    };
    assert_eq!(odd.delay(0), Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polls_until_completed_and_replies_with_the_first_answer() {
    let server = Server::start(behaviour(3, "completed")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir.path().join("m.db")).await;
    let coze = coze(&server, KEY, false);
    let mut message = msg("team", "bob", "m1", "what is up?");
    message.sender_remark = Some("Bobby".to_owned());

    let reply = deliver(&coze, &store, &message).await.expect("delivered");
    assert_eq!(reply.as_deref(), Some("answer to what is up?"));

    let seen = server.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v3/chat",
            "/v3/chat/retrieve",
            "/v3/chat/retrieve",
            "/v3/chat/retrieve",
            "/v3/chat/retrieve",
            "/v3/chat/message/list"
        ]
    );
    assert!(
        seen.iter()
            .all(|s| s.auth.as_deref() == Some(&format!("Bearer {KEY}")))
    );
    let create = &seen[0];
    assert_eq!(create.method, Method::POST);
    assert!(create.query.is_empty(), "{:?}", create.query);
    assert_eq!(
        create.body,
        json!({
            "bot_id": "7350",
            "user_id": "Bobby",
            "stream": false,
            "auto_save_history": true,
            "additional_messages": [
                {"role": "user", "content": "what is up?", "content_type": "text"}
            ],
        })
    );
    for poll in &seen[1..] {
        assert_eq!(poll.method, Method::GET);
        assert_eq!(poll.query["chat_id"], "chat-2");
        assert_eq!(poll.query["conversation_id"], "conv-1");
    }

    // Without continuous conversation, every message starts a new conversation.
    deliver(&coze, &store, &msg("team", "bob", "m2", "again"))
        .await
        .expect("delivered");
    let creates = server.seen_at("/v3/chat");
    assert_eq!(creates.len(), 2);
    assert!(!creates[1].query.contains_key("conversation_id"));
    assert!(creates[1].body.get("conversation_id").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_chat_is_a_retried_error_with_the_redacted_reason() {
    let server = Server::start(behaviour(1, "failed")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir.path().join("m.db")).await;
    let coze = coze(&server, KEY, false);
    let err = deliver(&coze, &store, &msg("a", "a", "m1", "hi"))
        .await
        .expect_err("the chat failed");
    assert_eq!(err.kind, ErrorKind::ApiCode);
    assert!(!err.permanent, "a failed chat is retried");
    assert!(err.message.contains("model overloaded"), "{}", err.message);
    assert!(!err.message.contains(KEY), "{}", err.message);
    assert!(
        server.seen_at("/v3/chat/message/list").is_empty(),
        "no answer is read from a failed chat"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_conversation_is_kept_per_sender_across_a_store_reopen() {
    let server = Server::start(behaviour(1, "completed")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let coze = coze(&server, KEY, true);
    {
        let store = store(&path).await;
        for message in [
            msg("team", "bob", "m1", "q1"),
            msg("team", "bob", "m2", "q2"),
            msg("team", "alice", "m3", "q3"),
            msg("other", "bob", "m4", "q4"),
        ] {
            deliver(&coze, &store, &message).await.expect("delivered");
        }
    }
    // A new process: the ids come from the file.
    let store = store(&path).await;
    let reply = deliver(&coze, &store, &msg("team", "bob", "m5", "q5"))
        .await
        .expect("delivered");
    assert_eq!(reply.as_deref(), Some("answer to q5"));

    let sent: Vec<(Option<String>, Option<String>)> = server
        .seen_at("/v3/chat")
        .iter()
        .map(|s| {
            (
                s.query.get("conversation_id").cloned(),
                s.body["conversation_id"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let both = |id: &str| (Some(id.to_owned()), Some(id.to_owned()));
    assert_eq!(
        sent,
        [
            (None, None),
            both("conv-1"),
            (None, None),
            (None, None),
            both("conv-1"),
        ],
        "bob keeps conv-1 in team; alice and bob-in-other get their own"
    );
    let key = SenderKey {
        instance_id: "wx1".to_owned(),
        chat: "team".to_owned(),
        sender: "alice".to_owned(),
        platform_id: PLATFORM.to_owned(),
    };
    let alice = store.sender_conversation(key).await.expect("read");
    assert!(
        alice.as_deref().is_some_and(|id| id != "conv-1"),
        "{alice:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stored_conversation_is_forgotten() {
    let server = Server::start(behaviour(0, "completed")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir.path().join("m.db")).await;
    let key = SenderKey {
        instance_id: "wx1".to_owned(),
        chat: "a".to_owned(),
        sender: "a".to_owned(),
        platform_id: PLATFORM.to_owned(),
    };
    store
        .set_sender_conversation(key.clone(), Some("conv-gone".to_owned()))
        .await
        .expect("write");
    let coze = coze(&server, KEY, true);
    let err = deliver(&coze, &store, &msg("a", "a", "m1", "hi"))
        .await
        .expect_err("refused");
    assert_eq!(err.kind, ErrorKind::ApiCode);
    assert!(!err.permanent);
    assert_eq!(
        store.sender_conversation(key.clone()).await.expect("read"),
        None
    );
    // The retry starts a new conversation and keeps it.
    deliver(&coze, &store, &msg("a", "a", "m1", "hi"))
        .await
        .expect("delivered");
    let creates = server.seen_at("/v3/chat");
    assert_eq!(creates[0].query["conversation_id"], "conv-gone");
    assert!(!creates[1].query.contains_key("conversation_id"));
    assert_eq!(
        store
            .sender_conversation(key)
            .await
            .expect("read")
            .as_deref(),
        Some("conv-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_key_is_a_permanent_auth_error_without_the_key() {
    for auth_as_http in [true, false] {
        let server = Server::start(Behaviour {
            auth_as_http,
            ..behaviour(0, "completed")
        })
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store(&dir.path().join("m.db")).await;
        let wrong = "pat_wrong-coze-key-1234";
        let coze = coze(&server, wrong, true);
        let err = deliver(&coze, &store, &msg("a", "a", "m1", "hi"))
            .await
            .expect_err("rejected");
        assert_eq!(err.kind, ErrorKind::Auth, "{auth_as_http}: {err:?}");
        assert!(err.permanent, "{auth_as_http}");
        assert!(err.message.contains("4100") || err.message.contains("401"));
        assert!(!err.message.contains(wrong), "{}", err.message);
        assert_eq!(server.seen().len(), 1, "nothing is polled after a refusal");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_is_retried() {
    // Nothing Coze-like answers: a 503 on the create call.
    let app = axum::Router::new().fallback(|| async { StatusCode::SERVICE_UNAVAILABLE });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let server = Server {
        url: format!("http://{addr}"),
        fake: Arc::new(Fake {
            behaviour: behaviour(0, "completed"),
            state: Mutex::new(FakeState::default()),
        }),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(&dir.path().join("m.db")).await;
    let err = deliver(
        &coze(&server, KEY, false),
        &store,
        &msg("a", "a", "m1", "x"),
    )
    .await
    .expect_err("busy");
    assert_eq!(err.kind, ErrorKind::HttpStatus);
    assert!(!err.permanent);
}
