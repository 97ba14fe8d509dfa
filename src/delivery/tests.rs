//! Delivery tests against a real SQLite file and real HTTP servers on `127.0.0.1:0`.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::{TimeZone, Utc};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::metrics::{DROP_REASONS, REPLY_OUTCOMES};
use super::*;
use crate::config::{
    BackoffConfig, ChatPattern, CozePlatform, DifyPlatform, InstanceSelector, KeywordEntry,
    KeywordMatch, KeywordPlatform, OpenAiPlatform, PlatformConfig, PlatformKind, RuleConfig,
    SendMode, WebhookPlatform,
};
use crate::message::{Download, DownloadError, Reply, ReplyError};
use crate::metrics::Registry;
use crate::secret::Secret;

// === test doubles: HTTP server ===

/// One scripted answer.
#[derive(Clone, Debug)]
enum Step {
    Json(u16, Value),
    Empty(u16),
    Text(u16, &'static str),
    Delay(Duration, Box<Step>),
}

/// A request as the server saw it.
#[derive(Clone, Debug)]
struct Recorded {
    path: String,
    headers: HeaderMap,
    body: Value,
    /// When it arrived, on tokio's clock (paused in `paused.rs`).
    at: tokio::time::Instant,
}

type Responder = Arc<dyn Fn(&Recorded) -> Step + Send + Sync>;

struct ServerState {
    requests: Mutex<Vec<Recorded>>,
    script: Mutex<VecDeque<Step>>,
    fallback: Mutex<Responder>,
}

#[derive(Clone)]
struct Server {
    url: String,
    state: Arc<ServerState>,
}

impl Server {
    /// Starts a server answering from `script`, then with `200 {}`.
    async fn start(script: Vec<Step>) -> Self {
        let state = Arc::new(ServerState {
            requests: Mutex::new(Vec::new()),
            script: Mutex::new(script.into()),
            fallback: Mutex::new(Arc::new(|_: &Recorded| Step::Json(200, json!({})))),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn respond_with(&self, responder: impl Fn(&Recorded) -> Step + Send + Sync + 'static) {
        *self.state.fallback.lock().expect("lock") = Arc::new(responder);
    }

    fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    fn count(&self) -> usize {
        self.state.requests.lock().expect("lock").len()
    }
}

async fn handle(
    State(state): State<Arc<ServerState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = Recorded {
        path: uri.path().to_owned(),
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at: tokio::time::Instant::now(),
    };
    let step = state.script.lock().expect("lock").pop_front();
    let step = step.unwrap_or_else(|| (state.fallback.lock().expect("lock"))(&recorded));
    state.requests.lock().expect("lock").push(recorded);
    answer(step).await
}

async fn answer(mut step: Step) -> Response {
    loop {
        match step {
            Step::Delay(delay, next) => {
                tokio::time::sleep(delay).await;
                step = *next;
            }
            Step::Json(code, body) => return (status(code), axum::Json(body)).into_response(),
            Step::Empty(code) => return status(code).into_response(),
            Step::Text(code, text) => return (status(code), text).into_response(),
        }
    }
}

fn status(code: u16) -> StatusCode {
    StatusCode::from_u16(code).expect("valid status")
}

impl Recorded {
    fn key(&self) -> String {
        self.headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    }

    fn message_id(&self) -> String {
        self.body["message_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

// === test doubles: replies and errors ===

#[derive(Default)]
struct Replies {
    sent: Mutex<Vec<Reply>>,
    failures: Mutex<VecDeque<ReplyError>>,
    calls: AtomicUsize,
    /// When each `send_reply` call came, by tokio's clock (paused time in `paused.rs`).
    call_times: Mutex<Vec<tokio::time::Instant>>,
    /// Scripted download answers, in order; `Unsupported` once they run out.
    downloads: Mutex<VecDeque<Result<Download, DownloadError>>>,
    download_calls: AtomicUsize,
}

impl ReplySender for Replies {
    fn download_file(
        &self,
        _: &str,
        _: &str,
        _: u64,
    ) -> BoxFuture<'_, Result<Download, DownloadError>> {
        Box::pin(async move {
            self.download_calls.fetch_add(1, Ordering::SeqCst);
            self.downloads
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Err(DownloadError::Unsupported))
        })
    }

    fn send_reply(&self, reply: Reply, _: Duration) -> BoxFuture<'_, Result<(), ReplyError>> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.call_times
                .lock()
                .expect("lock")
                .push(tokio::time::Instant::now());
            if let Some(err) = self.failures.lock().expect("lock").pop_front() {
                return Err(err);
            }
            self.sent.lock().expect("lock").push(reply);
            Ok(())
        })
    }
}

impl Replies {
    fn sent(&self) -> Vec<Reply> {
        self.sent.lock().expect("lock").clone()
    }
}

/// One recorded error: component, kind, instance, text.
type RecordedError = (Component, ErrorKind, Option<String>, String);

#[derive(Default)]
struct Errors {
    recorded: Mutex<Vec<RecordedError>>,
}

impl ErrorSink for Errors {
    fn record_error(
        &self,
        component: Component,
        kind: ErrorKind,
        instance_id: Option<&str>,
        message: &str,
    ) {
        self.recorded.lock().expect("lock").push((
            component,
            kind,
            instance_id.map(str::to_owned),
            message.to_owned(),
        ));
    }
}

impl Errors {
    fn all(&self) -> Vec<RecordedError> {
        self.recorded.lock().expect("lock").clone()
    }
}

// === config builders ===

fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

fn delivery_config(workers: usize, max_attempts: u32) -> DeliveryConfig {
    DeliveryConfig {
        workers,
        max_attempts,
        backoff: BackoffConfig {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(80),
        },
        attempt_timeout: Duration::from_secs(5),
    }
}

fn storage(path: &Path) -> StorageConfig {
    StorageConfig {
        path: path.to_path_buf(),
        retention_days: 7,
        dead_retention_days: 30,
        synchronous: crate::config::Synchronous::Normal,
    }
}

fn webhook(id: &str, url: &str) -> PlatformConfig {
    PlatformConfig {
        id: id.to_owned(),
        send_mode: SendMode::Normal,
        timeout: Duration::from_secs(3),
        kind: PlatformKind::Webhook(WebhookPlatform {
            url: url.to_owned(),
            headers: vec![],
        }),
    }
}

fn rule(id: &str, platform: &str) -> RuleConfig {
    RuleConfig {
        id: id.to_owned(),
        instance: InstanceSelector::All,
        chat: ChatPattern::Any,
        platform: platform.to_owned(),
        priority: 0,
        only_at: false,
        at_names: vec![],
        reply_at_sender: false,
    }
}

fn routing(rules: &[RuleConfig], platforms: &[PlatformConfig]) -> Routing {
    Routing::new(rules, platforms, http())
}

/// Media beside the database, downloads off (these tests send text).
fn media_settings(db: &Path) -> MediaSettings {
    let dir = db.parent().unwrap_or(Path::new("."));
    MediaSettings {
        config: crate::config::MediaConfig {
            download: false,
            dir: dir.join("downloads"),
            ..crate::config::MediaConfig::default()
        },
        log_dir: dir.join("logs"),
        log_retention_days: 7,
    }
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
            .with_ymd_and_hms(2026, 11, 29, 14, 0, 0)
            .single()
            .expect("valid time"),
        epoch: 0,
    }
}

/// A running `Delivery` with its doubles.
struct Harness {
    delivery: Delivery,
    replies: Arc<Replies>,
    errors: Arc<Errors>,
    registry: Registry,
    cancel: CancellationToken,
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    async fn start(config: &DeliveryConfig, routing: Routing) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("data").join("messages.db");
        let mut harness = Self::start_at(&path, config, routing).await;
        harness._dir = Some(dir);
        harness
    }

    async fn start_at(path: &Path, config: &DeliveryConfig, routing: Routing) -> Self {
        Self::start_media(path, config, routing, media_settings(path)).await
    }

    async fn start_media(
        path: &Path,
        config: &DeliveryConfig,
        routing: Routing,
        media: MediaSettings,
    ) -> Self {
        let replies = Arc::new(Replies::default());
        let errors = Arc::new(Errors::default());
        let mut registry = Registry::default();
        let cancel = CancellationToken::new();
        let delivery = Delivery::start(
            &storage(path),
            config,
            media,
            routing,
            Arc::clone(&replies) as Arc<dyn ReplySender>,
            Arc::clone(&errors) as Arc<dyn ErrorSink>,
            &mut registry,
            cancel.clone(),
        )
        .await
        .expect("delivery starts");
        Self {
            delivery,
            replies,
            errors,
            registry,
            cancel,
            _dir: None,
        }
    }

    async fn accept(&self, messages: Vec<InboundMessage>) {
        self.delivery
            .sink()
            .accept(messages)
            .await
            .expect("accepted");
    }

    async fn state(&self, message_id: &str) -> Option<(String, u32, Option<String>)> {
        self.delivery.store().row_state("wx1", message_id).await
    }

    async fn wait_state(&self, message_id: &str, state: &str) -> (String, u32, Option<String>) {
        eventually(&format!("{message_id} reaches {state}"), async || {
            self.state(message_id).await.filter(|row| row.0 == state)
        })
        .await
    }

    fn metrics(&self) -> String {
        crate::metrics::encode(&self.registry, true).0
    }

    async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(10), self.delivery.shutdown())
            .await
            .expect("shutdown within grace");
        self.cancel.cancel();
    }
}

/// Polls `check` until it yields a value; fails the test after 10 s.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn has_line(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

// === webhook ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_request_shape_and_reply() {
    let server = Server::start(vec![
        Step::Json(200, json!({"reply": "pong"})),
        Step::Json(200, json!({"reply": "pong 2"})),
    ])
    .await;
    let mut platform = webhook("hook", &format!("{}/hook", server.url));
    platform.send_mode = SendMode::Typing;
    if let PlatformKind::Webhook(config) = &mut platform.kind {
        config
            .headers
            .push(("X-Token".to_owned(), Secret::new("secret-token-1")));
    }
    let mut at_rule = rule("r", "hook");
    at_rule.reply_at_sender = true;
    let harness = Harness::start(&delivery_config(2, 3), routing(&[at_rule], &[platform])).await;

    let mut group_msg = msg("team", "bob", "m1", "ping");
    group_msg.sender_remark = Some("Bobby".to_owned());
    harness.accept(vec![group_msg]).await;
    harness.wait_state("m1", "delivered").await;
    // A private chat: never an @, even though the rule asks for it.
    harness
        .accept(vec![msg("alice", "alice", "m2", "ping 2")])
        .await;
    harness.wait_state("m2", "delivered").await;

    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(first.path, "/hook");
    assert_eq!(first.key(), "wx1:m1");
    assert_eq!(
        first.headers.get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/json"[..])
    );
    assert_eq!(
        first.headers.get("x-token").map(|v| v.as_bytes()),
        Some(&b"secret-token-1"[..])
    );
    assert_eq!(
        first.body,
        json!({"instance_id": "wx1", "chat": "team", "sender": "bob", "content": "ping",
               "message_id": "m1", "epoch": 0, "mtype": null, "received_at": "2026-11-29T14:00:00Z",
               "attempt": 1})
    );
    assert_eq!(
        harness.replies.sent(),
        vec![
            Reply {
                instance_id: "wx1".to_owned(),
                chat: "team".to_owned(),
                text: "pong".to_owned(),
                at: vec!["Bobby".to_owned()],
                mode: SendMode::Typing,
            },
            Reply {
                instance_id: "wx1".to_owned(),
                chat: "alice".to_owned(),
                text: "pong 2".to_owned(),
                at: vec![],
                mode: SendMode::Typing,
            },
        ]
    );
    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="success"} 2"#
    ));
    assert!(has_line(
        &metrics,
        r#"wxauto_replies_total{instance_id="wx1",outcome="success"} 2"#
    ));
    assert!(has_line(&metrics, "wxauto_messages_pending 0"), "{metrics}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_204_and_2xx_without_reply_send_nothing() {
    let server = Server::start(vec![
        Step::Empty(204),
        Step::Json(200, json!({})),
        Step::Json(202, json!({"reply": null})),
        Step::Text(200, "not json"),
    ])
    .await;
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .accept(vec![
            msg("a", "a", "m1", "x"),
            msg("a", "a", "m2", "x"),
            msg("a", "a", "m3", "x"),
            msg("a", "a", "m4", "x"),
        ])
        .await;
    for id in ["m1", "m2", "m3", "m4"] {
        harness.wait_state(id, "delivered").await;
    }
    assert_eq!(server.count(), 4);
    assert!(harness.replies.sent().is_empty());
    assert_eq!(harness.replies.calls.load(Ordering::SeqCst), 0);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_with_backoff_then_success_keeps_the_idempotency_key() {
    let server = Server::start(vec![
        Step::Empty(500),
        Step::Empty(503),
        Step::Empty(429),
        Step::Json(200, json!({"reply": "finally"})),
    ])
    .await;
    let harness = Harness::start(
        &delivery_config(2, 5),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    let (_, attempts, reply) = harness.wait_state("m1", "delivered").await;
    assert_eq!(attempts, 4);
    assert_eq!(reply.as_deref(), Some("finally"));

    let requests = server.requests();
    assert_eq!(requests.len(), 4);
    assert!(requests.iter().all(|r| r.key() == "wx1:m1"));
    let attempts: Vec<u64> = requests
        .iter()
        .map(|r| r.body["attempt"].as_u64().expect("attempt"))
        .collect();
    assert_eq!(attempts, [1, 2, 3, 4]);
    // Everything else in the body is identical on every attempt.
    let strip = |r: &Recorded| {
        let mut body = r.body.clone();
        body["attempt"] = Value::Null;
        body
    };
    assert!(requests.iter().all(|r| strip(r) == strip(&requests[0])));

    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="retry"} 3"#
    ));
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="success"} 1"#
    ));
    let errors = harness.errors.all();
    assert_eq!(errors.len(), 3);
    assert!(errors.iter().all(|(component, kind, instance, _)| {
        *component == Component::Delivery
            && *kind == ErrorKind::HttpStatus
            && instance.as_deref() == Some("wx1")
    }));
    assert_eq!(harness.replies.sent().len(), 1);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_is_dead_at_once_and_does_not_block_the_chat() {
    let server = Server::start(vec![Step::Text(
        400,
        "invalid token secret-token-1 for this hook",
    )])
    .await;
    let mut platform = webhook("hook", &server.url);
    if let PlatformKind::Webhook(config) = &mut platform.kind {
        config
            .headers
            .push(("Authorization".to_owned(), Secret::new("secret-token-1")));
    }
    let harness = Harness::start(
        &delivery_config(1, 5),
        routing(&[rule("r", "hook")], &[platform]),
    )
    .await;
    harness
        .accept(vec![msg("a", "a", "m1", "x"), msg("a", "a", "m2", "y")])
        .await;
    let (_, attempts, _) = harness.wait_state("m1", "dead").await;
    assert_eq!(attempts, 1);
    harness.wait_state("m2", "delivered").await;
    assert_eq!(server.count(), 2);

    let errors = harness.errors.all();
    assert_eq!(errors.len(), 1);
    let (_, kind, _, text) = &errors[0];
    assert_eq!(*kind, ErrorKind::HttpStatus);
    assert!(text.contains("HTTP 400"), "{text}");
    assert!(!text.contains("secret-token-1"), "{text}");
    assert!(text.contains("****"), "{text}");

    let counts = harness.delivery.counts().await;
    assert_eq!(
        counts,
        StoreCounts {
            pending: 0,
            failed: 0,
            delivered: 1,
            dead: 1
        }
    );
    let metrics = harness.metrics();
    assert!(has_line(&metrics, "wxauto_messages_dead 1"), "{metrics}");
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="dead"} 1"#
    ));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attempts_exhausted_goes_dead() {
    let server = Server::start(vec![]).await;
    server.respond_with(|_| Step::Empty(500));
    let harness = Harness::start(
        &delivery_config(2, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    let (_, attempts, _) = harness.wait_state("m1", "dead").await;
    assert_eq!(attempts, 3);
    assert_eq!(server.count(), 3);
    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="retry"} 2"#
    ));
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="dead"} 1"#
    ));
    assert!(has_line(&metrics, "wxauto_messages_dead 1"));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_are_retried() {
    let server = Server::start(vec![
        Step::Delay(
            Duration::from_secs(2),
            Box::new(Step::Json(200, json!({"reply": "late"}))),
        ),
        Step::Json(200, json!({"reply": "ok"})),
    ])
    .await;
    let mut platform = webhook("hook", &server.url);
    platform.timeout = Duration::from_millis(200);
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "hook")], &[platform]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    let (_, attempts, reply) = harness.wait_state("m1", "delivered").await;
    assert_eq!(attempts, 2);
    assert_eq!(reply.as_deref(), Some("ok"));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].key(), requests[1].key());
    let texts: Vec<String> = harness.replies.sent().into_iter().map(|r| r.text).collect();
    assert_eq!(texts, ["ok"]);
    let errors = harness.errors.all();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].1, ErrorKind::Timeout);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_budget_bounds_a_slow_platform() {
    let server = Server::start(vec![
        Step::Delay(Duration::from_secs(3), Box::new(Step::Empty(204))),
        Step::Empty(204),
    ])
    .await;
    // The platform's own timeout is longer than the attempt budget here.
    let mut config = delivery_config(1, 3);
    config.attempt_timeout = Duration::from_millis(200);
    let harness = Harness::start(
        &config,
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    let (_, attempts, _) = harness.wait_state("m1", "delivered").await;
    assert_eq!(attempts, 2);
    assert_eq!(harness.errors.all()[0].1, ErrorKind::Timeout);
    harness.stop().await;
}

// === crash, concurrency and ordering ===

/// SIGKILL stand-in: the first "process" is a runtime torn down mid-delivery; the second
/// opens the same file and must deliver the in-flight row again, with the same key.
#[test]
fn at_least_once_across_a_crash() {
    let outer = tokio::runtime::Runtime::new().expect("runtime");
    let server = outer.block_on(Server::start(vec![Step::Delay(
        Duration::from_secs(30),
        Box::new(Step::Json(200, json!({"reply": "lost"}))),
    )]));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.db");
    let rules = [rule("r", "hook")];
    let platforms = [webhook("hook", &server.url)];

    let first = tokio::runtime::Runtime::new().expect("runtime");
    first.block_on(async {
        let harness =
            Harness::start_at(&path, &delivery_config(1, 5), routing(&rules, &platforms)).await;
        harness
            .accept(vec![msg("a", "a", "m1", "x"), msg("a", "a", "m2", "y")])
            .await;
        eventually("the first attempt is in flight", async || {
            (server.count() == 1).then_some(())
        })
        .await;
        assert_eq!(
            harness.state("m1").await.map(|row| row.0).as_deref(),
            Some("delivering")
        );
        // No shutdown: the runtime is torn down with the delivery in flight.
        drop(harness);
    });
    first.shutdown_background();

    outer.block_on(async {
        let harness =
            Harness::start_at(&path, &delivery_config(1, 5), routing(&rules, &platforms)).await;
        harness.wait_state("m1", "delivered").await;
        harness.wait_state("m2", "delivered").await;
        let requests = server.requests();
        let m1: Vec<&Recorded> = requests.iter().filter(|r| r.message_id() == "m1").collect();
        assert_eq!(m1.len(), 2, "delivered again after the crash");
        assert!(m1.iter().all(|r| r.key() == "wx1:m1"));
        assert_eq!(m1[0].body["attempt"], 1);
        assert_eq!(m1[1].body["attempt"], 2);
        let m2 = requests.iter().filter(|r| r.message_id() == "m2").count();
        assert_eq!(m2, 1);
        harness.stop().await;
    });
}

/// A reply whose send was cut by a crash is sent again without calling the platform.
#[test]
fn reply_survives_a_crash_without_a_second_platform_call() {
    let outer = tokio::runtime::Runtime::new().expect("runtime");
    let server = outer.block_on(Server::start(vec![Step::Json(
        200,
        json!({"reply": "stored"}),
    )]));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.db");
    let rules = [rule("r", "hook")];
    let platforms = [webhook("hook", &server.url)];

    /// Never answers: the reply stays in flight until the runtime dies.
    struct Stuck;
    impl ReplySender for Stuck {
        fn send_reply(&self, _: Reply, _: Duration) -> BoxFuture<'_, Result<(), ReplyError>> {
            Box::pin(std::future::pending())
        }
    }

    let first = tokio::runtime::Runtime::new().expect("runtime");
    first.block_on(async {
        let mut registry = Registry::default();
        let delivery = Delivery::start(
            &storage(&path),
            &delivery_config(1, 5),
            media_settings(&path),
            routing(&rules, &platforms),
            Arc::new(Stuck),
            Arc::new(Errors::default()),
            &mut registry,
            CancellationToken::new(),
        )
        .await
        .expect("start");
        delivery
            .sink()
            .accept(vec![msg("a", "a", "m1", "x")])
            .await
            .expect("accept");
        eventually("the reply is in flight", async || {
            delivery
                .store()
                .row_state("wx1", "m1")
                .await
                .filter(|row| row.0 == "replying")
        })
        .await;
        drop(delivery);
    });
    first.shutdown_background();

    outer.block_on(async {
        let harness =
            Harness::start_at(&path, &delivery_config(1, 5), routing(&rules, &platforms)).await;
        harness.wait_state("m1", "delivered").await;
        assert_eq!(server.count(), 1);
        let texts: Vec<String> = harness.replies.sent().into_iter().map(|r| r.text).collect();
        assert_eq!(texts, ["stored"]);
        harness.stop().await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_workers_deliver_each_message_once_in_chat_order() {
    let server = Server::start(vec![]).await;
    server.respond_with(|r| {
        let delay = Duration::from_millis(fastrand::u64(0..4));
        let reply = format!("re {}", r.message_id());
        Step::Delay(delay, Box::new(Step::Json(200, json!({"reply": reply}))))
    });
    let harness = Harness::start(
        &delivery_config(4, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    const CHATS: usize = 8;
    const PER_CHAT: usize = 25;
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    for round in 0..PER_CHAT {
        let batch: Vec<InboundMessage> = (0..CHATS)
            .map(|chat| {
                let chat_name = format!("chat-{chat}");
                let id = format!("c{chat}-{round:03}");
                expected
                    .entry(chat_name.clone())
                    .or_default()
                    .push(id.clone());
                msg(&chat_name, &chat_name, &id, "hello")
            })
            .collect();
        harness.accept(batch).await;
    }
    let total = CHATS * PER_CHAT;
    eventually("every message is delivered", async || {
        (harness.delivery.counts().await.delivered == total as u64).then_some(())
    })
    .await;

    let requests = server.requests();
    assert_eq!(requests.len(), total, "each message delivered exactly once");
    let mut seen: HashMap<String, Vec<String>> = HashMap::new();
    for request in &requests {
        let chat = request.body["chat"].as_str().expect("chat").to_owned();
        seen.entry(chat).or_default().push(request.message_id());
    }
    assert_eq!(seen, expected, "per-chat order kept");
    let replies = harness.replies.sent();
    assert_eq!(replies.len(), total);
    let mut reply_order: HashMap<String, Vec<String>> = HashMap::new();
    for reply in replies {
        let id = reply.text.trim_start_matches("re ").to_owned();
        reply_order.entry(reply.chat).or_default().push(id);
    }
    assert_eq!(
        reply_order, expected,
        "replies go to the right chat, in order"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_message_holds_back_the_rest_of_its_chat() {
    let server = Server::start(vec![]).await;
    let failed_once = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&failed_once);
    server.respond_with(move |r| {
        if r.message_id() == "a1" && counter.fetch_add(1, Ordering::SeqCst) < 2 {
            Step::Empty(500)
        } else {
            Step::Empty(204)
        }
    });
    let mut config = delivery_config(3, 5);
    config.backoff.initial = Duration::from_millis(100);
    let harness = Harness::start(
        &config,
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .accept(vec![
            msg("A", "A", "a1", "x"),
            msg("A", "A", "a2", "x"),
            msg("B", "B", "b1", "x"),
            msg("A", "A", "a3", "x"),
        ])
        .await;
    for id in ["a1", "a2", "a3", "b1"] {
        harness.wait_state(id, "delivered").await;
    }
    let order_a: Vec<String> = server
        .requests()
        .iter()
        .filter(|r| r.body["chat"] == "A")
        .map(Recorded::message_id)
        .collect();
    assert_eq!(order_a, ["a1", "a1", "a1", "a2", "a3"]);
    harness.stop().await;
}

// === hot reload ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_swap_leaves_in_flight_deliveries_alone() {
    let server_a = Server::start(vec![Step::Delay(
        Duration::from_millis(500),
        Box::new(Step::Json(200, json!({"reply": "from a"}))),
    )])
    .await;
    let server_b = Server::start(vec![]).await;
    server_b.respond_with(|r| Step::Json(200, json!({"reply": format!("b {}", r.message_id())})));
    let harness = Harness::start(
        &delivery_config(2, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server_a.url)]),
    )
    .await;
    harness
        .accept(vec![msg("c1", "c1", "m1", "x"), msg("c1", "c1", "m3", "x")])
        .await;
    eventually("m1 is in flight at A", async || {
        (server_a.count() == 1).then_some(())
    })
    .await;

    // The new config replaces `hook` by `hook2`, at another URL.
    harness.delivery.swap_routing(routing(
        &[rule("r2", "hook2")],
        &[webhook("hook2", &server_b.url)],
    ));
    harness.accept(vec![msg("c2", "c2", "m2", "x")]).await;
    for id in ["m1", "m2", "m3"] {
        harness.wait_state(id, "delivered").await;
    }
    let ids = |server: &Server| -> Vec<String> {
        server.requests().iter().map(Recorded::message_id).collect()
    };
    assert_eq!(
        ids(&server_a),
        ["m1"],
        "the in-flight delivery finished at A"
    );
    let mut at_b = ids(&server_b);
    at_b.sort();
    assert_eq!(at_b, ["m2", "m3"], "later messages use the new routing");
    let mut texts: Vec<String> = harness.replies.sent().into_iter().map(|r| r.text).collect();
    texts.sort();
    assert_eq!(texts, ["b m2", "b m3", "from a"]);
    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook2",outcome="dead"} 0"#
    ));
    harness.stop().await;
}

// === store behaviour ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_ignored_and_counted() {
    let server = Server::start(vec![]).await;
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .accept(vec![msg("a", "a", "m1", "x"), msg("a", "a", "m1", "x")])
        .await;
    harness.wait_state("m1", "delivered").await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    // A person who types "1" twice gets two answers: messages without an id are never merged
    // by their content.
    harness
        .accept(vec![msg("a", "a", "", "same"), msg("a", "a", "", "same")])
        .await;
    // The same upstream id in a new upstream session (WeChat or the server restarted, which
    // reuses runtime ids) is a new message, with its own key.
    let mut reused = msg("a", "a", "m1", "after a restart");
    reused.epoch = 1;
    harness.accept(vec![reused]).await;
    eventually("all four messages delivered", async || {
        (harness.delivery.counts().await.delivered == 4).then_some(())
    })
    .await;
    assert_eq!(server.count(), 4);
    let requests = server.requests();
    assert!(requests[1].message_id().starts_with("syn-"));
    assert!(requests[2].message_id().starts_with("syn-"));
    assert_ne!(requests[1].message_id(), requests[2].message_id());
    assert_eq!(requests[3].message_id(), "m1");
    assert_eq!(requests[3].key(), "wx1:m1@1");
    assert_eq!(requests[0].key(), "wx1:m1");
    assert_eq!(harness.delivery.message_count("wx1", "a").await, 4);
    let counts = harness
        .delivery
        .message_counts(vec![
            ("wx1".to_owned(), "a".to_owned()),
            ("wx1".to_owned(), "nobody".to_owned()),
        ])
        .await;
    assert_eq!(counts.get(&("wx1".to_owned(), "a".to_owned())), Some(&4));
    assert_eq!(
        counts.get(&("wx1".to_owned(), "nobody".to_owned())),
        Some(&0)
    );
    let metrics = harness.metrics();
    assert!(
        has_line(
            &metrics,
            r#"wxauto_messages_dropped_total{instance_id="wx1",reason="duplicate"} 2"#
        ),
        "{metrics}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_messages_are_counted_not_stored() {
    let server = Server::start(vec![]).await;
    let mut only_at = rule("at", "hook");
    only_at.chat = ChatPattern::Exact("g".to_owned());
    only_at.only_at = true;
    only_at.at_names = vec!["bot".to_owned()];
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[only_at], &[webhook("hook", &server.url)]),
    )
    .await;
    let sink = harness.delivery.sink();
    assert!(sink.wants_chat("wx1", "g"));
    assert!(!sink.wants_chat("wx1", "other"));
    harness
        .accept(vec![
            msg("other", "x", "m1", "hi"),
            msg("g", "x", "m2", "hi"),
            msg("g", "x", "m3", "@bot hi"),
        ])
        .await;
    harness.wait_state("m3", "delivered").await;
    assert!(harness.state("m1").await.is_none());
    assert!(harness.state("m2").await.is_none());
    assert_eq!(harness.delivery.message_count("wx1", "g").await, 1);
    let metrics = harness.metrics();
    for reason in ["no_rule", "at_filter"] {
        assert!(
            has_line(
                &metrics,
                &format!(
                    r#"wxauto_messages_dropped_total{{instance_id="wx1",reason="{reason}"}} 1"#
                )
            ),
            "{reason}: {metrics}"
        );
    }
    harness.delivery.remove_instance("wx1");
    let metrics = harness.metrics();
    assert!(!metrics.contains(r#"instance_id="wx1""#), "{metrics}");
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_removes_old_delivered_rows_only() {
    let server = Server::start(vec![Step::Empty(204), Step::Empty(400)]).await;
    server.respond_with(|_| Step::Empty(204));
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .accept(vec![
            msg("a", "a", "old", "x"),
            msg("a", "a", "dead", "x"),
            msg("a", "a", "new", "x"),
        ])
        .await;
    harness.wait_state("new", "delivered").await;
    harness.wait_state("dead", "dead").await;
    harness
        .delivery
        .store()
        .exec(
            "UPDATE messages SET delivered_ms = 1000, updated_ms = 1000 \
             WHERE message_id IN ('old', 'dead')",
        )
        .await;
    assert_eq!(harness.delivery.prune().await.expect("prune"), 1);
    assert!(harness.state("old").await.is_none());
    assert!(harness.state("new").await.is_some());
    assert!(harness.state("dead").await.is_some(), "dead rows are kept");
    assert_eq!(harness.delivery.message_count("wx1", "a").await, 2);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_is_versioned_and_a_newer_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.db");
    let harness = Harness::start_at(&path, &delivery_config(1, 3), routing(&[], &[])).await;
    harness.stop().await;
    let conn = rusqlite::Connection::open(&path).expect("open");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .expect("version");
    assert_eq!(version, store::schema_version());
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .expect("mode");
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "user_version", 99).expect("bump");
    drop(conn);
    let err = Delivery::start(
        &storage(&path),
        &delivery_config(1, 3),
        media_settings(&path),
        routing(&[], &[]),
        Arc::new(Replies::default()),
        Arc::new(Errors::default()),
        &mut Registry::default(),
        CancellationToken::new(),
    )
    .await
    .err()
    .expect("refused");
    assert!(
        matches!(
            err,
            StoreError::TooNew {
                found: 99,
                supported,
            } if supported == store::schema_version()
        ),
        "{err}"
    );
}

// === replies ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replies_are_retried_without_calling_the_platform_again() {
    let server = Server::start(vec![Step::Json(200, json!({"reply": "hi"}))]).await;
    let harness = Harness::start(
        &delivery_config(1, 5),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.replies.failures.lock().expect("lock").extend([
        ReplyError::InstanceDown("wx1".to_owned()),
        ReplyError::Upstream("HTTP 500".to_owned()),
    ]);
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    harness.wait_state("m1", "delivered").await;
    assert_eq!(server.count(), 1);
    assert_eq!(harness.replies.calls.load(Ordering::SeqCst), 3);
    assert_eq!(harness.replies.sent().len(), 1);
    let metrics = harness.metrics();
    // Waiting for a down instance is not a failed reply; the HTTP 500 is.
    assert!(has_line(
        &metrics,
        r#"wxauto_replies_total{instance_id="wx1",outcome="error"} 1"#
    ));
    assert!(has_line(
        &metrics,
        r#"wxauto_replies_total{instance_id="wx1",outcome="success"} 1"#
    ));
    assert!(has_line(
        &metrics,
        r#"wxauto_deliveries_total{platform="hook",outcome="success"} 1"#
    ));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_instance_does_not_use_up_reply_attempts() {
    let server = Server::start(vec![Step::Json(200, json!({"reply": "hi"}))]).await;
    // Two attempts only, but the instance is down for five tries: the reply must wait.
    let harness = Harness::start(
        &delivery_config(1, 2),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness
        .replies
        .failures
        .lock()
        .expect("lock")
        .extend((0..5).map(|_| ReplyError::InstanceDown("wx1".to_owned())));
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    harness.wait_state("m1", "delivered").await;
    assert_eq!(server.count(), 1, "the platform is called once");
    assert_eq!(harness.replies.calls.load(Ordering::SeqCst), 6);
    assert_eq!(harness.replies.sent().len(), 1);
    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_replies_total{instance_id="wx1",outcome="error"} 0"#
    ));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_never_goes_through_is_dead_lettered() {
    let server = Server::start(vec![Step::Json(200, json!({"reply": "hi"}))]).await;
    let harness = Harness::start(
        &delivery_config(1, 2),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.replies.failures.lock().expect("lock").extend([
        ReplyError::NoInstance("wx1".to_owned()),
        ReplyError::NoInstance("wx1".to_owned()),
    ]);
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    harness.wait_state("m1", "dead").await;
    assert_eq!(server.count(), 1);
    assert_eq!(harness.replies.calls.load(Ordering::SeqCst), 2);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_of_a_reply_is_not_a_new_message() {
    let server = Server::start(vec![Step::Json(
        200,
        json!({"reply": "thanks, noted your order"}),
    )])
    .await;
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]),
    )
    .await;
    harness.accept(vec![msg("g", "bob", "m1", "order 1")]).await;
    harness.wait_state("m1", "delivered").await;
    harness
        .accept(vec![
            // Our own reply, seen again in the group (e.g. with an @ prefix).
            msg("g", "me", "e1", "@bob thanks, noted your order"),
            // The person we answered may say the same words: that is a message.
            msg("g", "bob", "m2", "thanks, noted your order"),
        ])
        .await;
    harness.wait_state("m2", "delivered").await;
    assert!(harness.state("e1").await.is_none());
    // The echo absorbed one reply; the same text later is a message again.
    harness
        .accept(vec![msg("g", "me", "e2", "thanks, noted your order")])
        .await;
    harness.wait_state("e2", "delivered").await;
    let metrics = harness.metrics();
    assert!(has_line(
        &metrics,
        r#"wxauto_messages_dropped_total{instance_id="wx1",reason="echo"} 1"#
    ));
    harness.stop().await;
}

// === other platforms ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyword_platform_replies_locally() {
    let platform = PlatformConfig {
        id: "faq".to_owned(),
        send_mode: SendMode::Normal,
        timeout: Duration::from_secs(1),
        kind: PlatformKind::Keyword(KeywordPlatform {
            keywords: vec![KeywordEntry {
                keywords: vec!["price".to_owned()],
                match_type: KeywordMatch::Contains,
                patterns: vec![],
                replies: vec!["It is free.".to_owned()],
                random: false,
            }],
        }),
    };
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "faq")], &[platform]),
    )
    .await;
    harness
        .accept(vec![
            msg("a", "a", "m1", "what's the Price?"),
            msg("a", "a", "m2", "hello"),
        ])
        .await;
    harness.wait_state("m1", "delivered").await;
    harness.wait_state("m2", "delivered").await;
    let texts: Vec<String> = harness.replies.sent().into_iter().map(|r| r.text).collect();
    assert_eq!(texts, ["It is free."]);
    harness.stop().await;
}

fn openai(url: &str, history: usize) -> PlatformConfig {
    PlatformConfig {
        id: "gpt".to_owned(),
        send_mode: SendMode::Normal,
        timeout: Duration::from_secs(3),
        kind: PlatformKind::OpenAi(OpenAiPlatform {
            api_base: format!("{url}/v1/"),
            api_key: Secret::new("sk-test-openai-key"),
            model: "gpt-test".to_owned(),
            vision: false,
            system_prompt: Some("Be brief.".to_owned()),
            temperature: Some(0.5),
            max_tokens: Some(64),
            history,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_request_shape_and_history() {
    let server = Server::start(vec![]).await;
    let n = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&n);
    server.respond_with(move |_| {
        let i = counter.fetch_add(1, Ordering::SeqCst) + 1;
        Step::Json(
            200,
            json!({"choices": [{"message": {"role": "assistant", "content": format!("a{i}")}}]}),
        )
    });
    let harness = Harness::start(
        &delivery_config(2, 3),
        routing(&[rule("r", "gpt")], &[openai(&server.url, 2)]),
    )
    .await;
    for i in 1..=3 {
        let id = format!("m{i}");
        harness
            .accept(vec![msg("a", "a", &id, &format!("u{i}"))])
            .await;
        harness.wait_state(&id, "delivered").await;
    }
    // Another chat has its own (empty) history.
    harness.accept(vec![msg("b", "b", "n1", "other")]).await;
    harness.wait_state("n1", "delivered").await;

    let requests = server.requests();
    assert_eq!(requests[0].path, "/v1/chat/completions");
    assert_eq!(
        requests[0]
            .headers
            .get("authorization")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer sk-test-openai-key"[..])
    );
    assert_eq!(requests[0].body["model"], "gpt-test");
    assert_eq!(requests[0].body["temperature"], 0.5);
    assert_eq!(requests[0].body["max_tokens"], 64);
    let roles = |r: &Recorded| -> Vec<(String, String)> {
        r.body["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().expect("role").to_owned(),
                    m["content"].as_str().expect("content").to_owned(),
                )
            })
            .collect()
    };
    let pair = |role: &str, content: &str| (role.to_owned(), content.to_owned());
    assert_eq!(
        roles(&requests[0]),
        [pair("system", "Be brief."), pair("user", "u1")]
    );
    assert_eq!(
        roles(&requests[2]),
        [
            pair("system", "Be brief."),
            pair("user", "u1"),
            pair("assistant", "a1"),
            pair("user", "u2"),
            pair("assistant", "a2"),
            pair("user", "u3"),
        ]
    );
    assert_eq!(
        roles(&requests[3]),
        [pair("system", "Be brief."), pair("user", "other")]
    );
    let texts: Vec<String> = harness.replies.sent().into_iter().map(|r| r.text).collect();
    assert_eq!(texts, ["a1", "a2", "a3", "a4"]);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_auth_failure_is_dead_and_redacted() {
    let server = Server::start(vec![Step::Text(
        401,
        "Incorrect API key provided: sk-test-openai-key",
    )])
    .await;
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "gpt")], &[openai(&server.url, 0)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    harness.wait_state("m1", "dead").await;
    let errors = harness.errors.all();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].1, ErrorKind::Auth);
    assert!(
        !errors[0].3.contains("sk-test-openai-key"),
        "{}",
        errors[0].3
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dify_keeps_the_conversation_per_chat_and_drops_a_stale_one() {
    let server = Server::start(vec![
        Step::Json(200, json!({"answer": "a1", "conversation_id": "conv-1"})),
        Step::Json(
            404,
            json!({"code": "not_found", "message": "Conversation Not Exists."}),
        ),
        Step::Json(200, json!({"answer": "a2", "conversation_id": "conv-2"})),
        Step::Json(200, json!({"answer": "a3", "conversation_id": "conv-2"})),
        Step::Json(200, json!({"answer": "a4", "conversation_id": "conv-3"})),
    ])
    .await;
    let platform = PlatformConfig {
        id: "dify".to_owned(),
        send_mode: SendMode::Normal,
        timeout: Duration::from_secs(3),
        kind: PlatformKind::Dify(DifyPlatform {
            api_base: format!("{}/v1", server.url),
            api_key: Secret::new("app-dify-secret"),
            user_id: "default_user".to_owned(),
        }),
    };
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "dify")], &[platform]),
    )
    .await;
    for (i, id) in ["m1", "m2", "m3"].into_iter().enumerate() {
        let mut message = msg("team", "bob", id, &format!("q{}", i + 1));
        message.sender_remark = Some("Bobby".to_owned());
        harness.accept(vec![message]).await;
        harness.wait_state(id, "delivered").await;
    }
    // A 1:1 chat with the same friend: wxauto names it after the remark. The user is the
    // sender alone, as in any private chat.
    let mut private = msg("Bobby", "bob", "m4", "q4");
    private.sender_remark = Some("Bobby".to_owned());
    harness.accept(vec![private]).await;
    harness.wait_state("m4", "delivered").await;
    let requests = server.requests();
    assert_eq!(requests.len(), 5);
    assert_eq!(requests[4].body["user"], "Bobby");
    assert!(requests[4].body.get("conversation_id").is_none());
    assert_eq!(requests[0].path, "/v1/chat-messages");
    assert_eq!(
        requests[0]
            .headers
            .get("authorization")
            .map(|v| v.as_bytes()),
        Some(&b"Bearer app-dify-secret"[..])
    );
    assert_eq!(
        requests[0].body,
        json!({"inputs": {}, "query": "q1", "response_mode": "blocking", "user": "team==Bobby"})
    );
    assert_eq!(requests[1].body["conversation_id"], "conv-1");
    assert!(
        requests[2].body.get("conversation_id").is_none(),
        "stale id dropped"
    );
    assert_eq!(requests[2].body["query"], "q2");
    assert_eq!(requests[3].body["conversation_id"], "conv-2");
    let texts: Vec<String> = harness.replies.sent().into_iter().map(|r| r.text).collect();
    assert_eq!(texts, ["a1", "a2", "a3", "a4"]);
    harness.stop().await;
}

fn coze(url: &str) -> PlatformConfig {
    PlatformConfig {
        id: "coze".to_owned(),
        send_mode: SendMode::Typing,
        timeout: Duration::from_secs(3),
        kind: PlatformKind::Coze(CozePlatform {
            api_base: url.to_owned(),
            api_key: Secret::new("pat-coze-e2e-secret"),
            bot_id: "7350".to_owned(),
            workspace_id: None,
            continuous_conversation: true,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coze_answer_goes_back_through_the_worker() {
    // A chat that is already complete when created needs no poll (and no poll delay).
    let server = Server::start(vec![
        Step::Json(
            200,
            json!({"code": 0, "data": {"id": "chat-1", "conversation_id": "conv-1", "status": "completed"}}),
        ),
        Step::Json(
            200,
            json!({"code": 0, "data": [
                {"role": "assistant", "type": "function_call", "content": "{}"},
                {"role": "assistant", "type": "answer", "content": "coze says hi"}
            ]}),
        ),
    ])
    .await;
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "coze")], &[coze(&server.url)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "hello")]).await;
    harness.wait_state("m1", "delivered").await;
    let sent = harness.replies.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].text, "coze says hi");
    let paths: Vec<String> = server.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v3/chat", "/v3/chat/message/list"]);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coze_auth_failure_is_dead_at_once_and_redacted() {
    let server = Server::start(vec![Step::Json(
        401,
        json!({"code": 4100, "msg": "invalid token pat-coze-e2e-secret"}),
    )])
    .await;
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(&[rule("r", "coze")], &[coze(&server.url)]),
    )
    .await;
    harness.accept(vec![msg("a", "a", "m1", "x")]).await;
    let (_, attempts, _) = harness.wait_state("m1", "dead").await;
    assert_eq!(attempts, 1, "not retried");
    assert_eq!(server.count(), 1);
    let errors = harness.errors.all();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].1, ErrorKind::Auth);
    assert!(
        !errors[0].3.contains("pat-coze-e2e-secret"),
        "{}",
        errors[0].3
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_store_is_migrated_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v1.db");
    // A file as version 1 wrote it, with a row that must survive.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.execute_batch(store::VERSION_1)
        .expect("version 1 schema");
    conn.execute_batch(
        "PRAGMA user_version = 1; \
         INSERT INTO conversations VALUES ('wx1', 'a', 'dify', 'conv-old', 0);",
    )
    .expect("version 1 row");
    drop(conn);
    let harness = Harness::start_at(&path, &delivery_config(1, 3), routing(&[], &[])).await;
    let store = harness.delivery.store();
    let key = store::SenderKey {
        instance_id: "wx1".to_owned(),
        chat: "a".to_owned(),
        sender: "bob".to_owned(),
        platform_id: "coze".to_owned(),
    };
    store
        .set_sender_conversation(key.clone(), Some("conv-new".to_owned()))
        .await
        .expect("the new table exists");
    assert_eq!(
        store
            .sender_conversation(key)
            .await
            .expect("read")
            .as_deref(),
        Some("conv-new")
    );
    let old = store
        .conversation("wx1".to_owned(), "a".to_owned(), "dify".to_owned())
        .await
        .expect("read");
    assert_eq!(old.as_deref(), Some("conv-old"));
    harness.stop().await;
    let conn = rusqlite::Connection::open(&path).expect("open");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .expect("version");
    assert_eq!(version, store::schema_version());
}

// === metrics ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_families_are_preinitialised() {
    let harness = Harness::start(
        &delivery_config(1, 3),
        routing(
            &[rule("r", "hook")],
            &[webhook("hook", "http://127.0.0.1:9")],
        ),
    )
    .await;
    let metrics = harness.metrics();
    for line in [
        "wxauto_messages_pending 0",
        "wxauto_messages_dead 0",
        r#"wxauto_deliveries_total{platform="hook",outcome="success"} 0"#,
        r#"wxauto_deliveries_total{platform="hook",outcome="retry"} 0"#,
        r#"wxauto_deliveries_total{platform="hook",outcome="dead"} 0"#,
        r#"wxauto_delivery_duration_seconds_count{platform="hook"} 0"#,
        r#"wxauto_delivery_duration_seconds_bucket{le="0.01",platform="hook"} 0"#,
        r#"wxauto_delivery_duration_seconds_bucket{le="60.0",platform="hook"} 0"#,
    ] {
        assert!(has_line(&metrics, line), "missing {line}:\n{metrics}");
    }
    // An instance's series exist at 0 once it is added (the configured ones, by `app`),
    // before its first message, and go with it.
    assert!(!metrics.contains("wx1"), "{metrics}");
    harness.delivery.add_instances(["wx1", "wx2"]);
    let metrics = harness.metrics();
    let mut lines = vec![
        "# HELP wxauto_messages_pending Messages stored and not yet delivered (waiting, retrying or in flight).".to_owned(),
    ];
    for outcome in REPLY_OUTCOMES {
        lines.push(format!(
            r#"wxauto_replies_total{{instance_id="wx1",outcome="{outcome}"}} 0"#
        ));
    }
    for reason in DROP_REASONS {
        lines.push(format!(
            r#"wxauto_messages_dropped_total{{instance_id="wx1",reason="{reason}"}} 0"#
        ));
    }
    for outcome in media::OUTCOMES {
        lines.push(format!(
            r#"wxauto_media_downloads_total{{instance_id="wx1",outcome="{outcome}"}} 0"#
        ));
    }
    for line in &lines {
        assert!(has_line(&metrics, line), "missing {line}:\n{metrics}");
    }
    harness.delivery.remove_instance("wx2");
    let metrics = harness.metrics();
    assert!(!metrics.contains("wx2"), "{metrics}");
    // The first drop is counted on top of the 0.
    harness.accept(vec![msg("nobody", "x", "m1", "x")]).await;
    harness.accept(vec![msg("nobody", "x", "m1", "x")]).await;
    let duplicate = r#"wxauto_messages_dropped_total{instance_id="wx1",reason="duplicate"} 1"#;
    assert!(
        has_line(&harness.metrics(), duplicate),
        "missing {duplicate}"
    );
    // A connection failure (nothing listens on port 9) is retried, counted and reported.
    let errors = eventually("the connect error is reported", async || {
        let errors = harness.errors.all();
        (!errors.is_empty()).then_some(errors)
    })
    .await;
    assert_eq!(errors[0].1, ErrorKind::Connect);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_message_keeps_its_file_path_and_download_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("media.db");
    let platform = PlatformConfig {
        id: "faq".to_owned(),
        send_mode: SendMode::Normal,
        timeout: Duration::from_secs(1),
        kind: PlatformKind::Keyword(KeywordPlatform { keywords: vec![] }),
    };
    let routing = routing(&[rule("r", "faq")], &[platform]);
    // `media_settings` turns downloads off: the outcome is `disabled`, the message delivered.
    let harness = Harness::start_at(&path, &delivery_config(1, 3), routing).await;
    let mut image = msg("a", "a", "m1", r"C:\wx\a.png");
    image.mtype = Some("image".to_owned());
    image.file_path = Some(r"D:\files\a.png".to_owned());
    harness
        .accept(vec![image, msg("a", "a", "m2", "text")])
        .await;
    harness.wait_state("m1", "delivered").await;
    harness.wait_state("m2", "delivered").await;
    let text = harness.metrics();
    assert!(
        text.contains("wxauto_media_downloads_total{instance_id=\"wx1\",outcome=\"disabled\"} 1"),
        "{text}"
    );
    harness.stop().await;
    let conn = rusqlite::Connection::open(&path).expect("open");
    let rows: Vec<(String, String, Option<String>, String)> = conn
        .prepare(
            "SELECT m.message_id, d.file_path, d.outcome, d.name FROM media d \
             JOIN messages m ON m.id = d.message_row",
        )
        .expect("prepare")
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(
        rows,
        [(
            "m1".to_owned(),
            r"D:\files\a.png".to_owned(),
            Some("disabled".to_owned()),
            "a.png".to_owned()
        )]
    );
}

fn image_msg(id: &str) -> InboundMessage {
    let mut image = msg("a", "a", id, r"C:\wx\photo.png");
    image.mtype = Some("image".to_owned());
    image.file_path = Some(r"C:\wx\photo.png".to_owned());
    image
}

/// Downloads on, under the test's directory.
fn media_on(db: &Path) -> MediaSettings {
    let mut media = media_settings(db);
    media.config.download = true;
    media
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_waits_for_a_down_instance_without_spending_attempts() {
    let server = Server::start(vec![]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let routing = routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]);
    let harness =
        Harness::start_media(&path, &delivery_config(1, 2), routing, media_on(&path)).await;
    {
        let mut downloads = harness.replies.downloads.lock().expect("lock");
        for _ in 0..3 {
            downloads.push_back(Err(DownloadError::InstanceDown("wx1".to_owned())));
        }
        downloads.push_back(Ok(Download::Bytes(b"png bytes".to_vec())));
    }
    harness.accept(vec![image_msg("m1")]).await;
    let (_, attempts, _) = harness.wait_state("m1", "delivered").await;
    // Three waits, then one platform attempt (max_attempts is 2: waits did not count).
    assert_eq!(attempts, 1);
    assert_eq!(harness.replies.download_calls.load(Ordering::SeqCst), 4);
    let requests = server.requests();
    assert_eq!(
        requests.len(),
        1,
        "the platform is called once, after the download"
    );
    let attachment = &requests[0].body["attachments"][0];
    assert_eq!(attachment["data_base64"], media::base64(b"png bytes"));
    assert_eq!(attachment["sha256"], media::sha256_hex(b"png bytes"));
    let metrics = harness.metrics();
    assert!(
        metrics.contains("wxauto_media_downloads_total{instance_id=\"wx1\",outcome=\"success\"} 1"),
        "{metrics}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stays_down_sends_the_message_without_its_file() {
    let server = Server::start(vec![]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let routing = routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]);
    let harness =
        Harness::start_media(&path, &delivery_config(1, 2), routing, media_on(&path)).await;
    {
        let mut downloads = harness.replies.downloads.lock().expect("lock");
        for _ in 0..20 {
            downloads.push_back(Err(DownloadError::InstanceDown("wx1".to_owned())));
        }
    }
    harness.accept(vec![image_msg("m1")]).await;
    let (_, attempts, _) = harness.wait_state("m1", "delivered").await;
    assert_eq!(attempts, 1);
    // MAX_WAITS waits, then the last answer gives up on the file.
    assert_eq!(harness.replies.download_calls.load(Ordering::SeqCst), 11);
    let attachment = &server.requests()[0].body["attachments"][0];
    assert!(attachment["data_base64"].is_null(), "{attachment}");
    assert_eq!(attachment["name"], "photo.png");
    let metrics = harness.metrics();
    assert!(
        metrics.contains(
            "wxauto_media_downloads_total{instance_id=\"wx1\",outcome=\"unavailable\"} 1"
        ),
        "{metrics}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_platform_retry_reuses_the_stored_download() {
    let server = Server::start(vec![Step::Empty(503)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let routing = routing(&[rule("r", "hook")], &[webhook("hook", &server.url)]);
    let harness =
        Harness::start_media(&path, &delivery_config(1, 3), routing, media_on(&path)).await;
    harness
        .replies
        .downloads
        .lock()
        .expect("lock")
        .push_back(Ok(Download::Bytes(b"once".to_vec())));
    harness.accept(vec![image_msg("m1")]).await;
    let (_, attempts, _) = harness.wait_state("m1", "delivered").await;
    assert_eq!(attempts, 2);
    assert_eq!(harness.replies.download_calls.load(Ordering::SeqCst), 1);
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(
            request.body["attachments"][0]["data_base64"],
            media::base64(b"once")
        );
    }
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_without_vision_names_the_attachment_and_dify_goes_on_without_a_refused_file() {
    let server = Server::start(vec![]).await;
    server.respond_with(|request: &Recorded| match request.path.as_str() {
        "/v1/files/upload" => Step::Json(415, json!({"code": "unsupported_file_type"})),
        "/v1/chat-messages" => Step::Json(200, json!({"answer": "", "conversation_id": "c"})),
        _ => Step::Json(200, json!({"choices": [{"message": {"content": ""}}]})),
    });
    let dify = PlatformConfig {
        id: "dify".to_owned(),
        send_mode: SendMode::Normal,
        timeout: Duration::from_secs(3),
        kind: PlatformKind::Dify(DifyPlatform {
            api_base: format!("{}/v1", server.url),
            api_key: Secret::new("app-dify-secret"),
            user_id: "default_user".to_owned(),
        }),
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.db");
    let mut to_dify = rule("d", "dify");
    to_dify.chat = ChatPattern::List(vec!["docs".to_owned()]);
    to_dify.priority = 10;
    let routing = routing(
        &[to_dify, rule("o", "gpt")],
        &[openai(&server.url, 0), dify],
    );
    let harness =
        Harness::start_media(&path, &delivery_config(1, 3), routing, media_on(&path)).await;
    {
        let mut downloads = harness.replies.downloads.lock().expect("lock");
        downloads.push_back(Ok(Download::Bytes(b"img".to_vec())));
        downloads.push_back(Ok(Download::Bytes(b"%PDF".to_vec())));
    }
    let mut image = image_msg("m1");
    image.content = "look at this".to_owned();
    harness.accept(vec![image]).await;
    harness.wait_state("m1", "delivered").await;
    let mut pdf = msg("docs", "docs", "m2", r"C:\wx\report.pdf");
    pdf.mtype = Some("file".to_owned());
    harness.accept(vec![pdf]).await;
    harness.wait_state("m2", "delivered").await;

    let requests = server.requests();
    let completion = requests
        .iter()
        .find(|r| r.path == "/v1/chat/completions")
        .expect("completion");
    let user = completion.body["messages"]
        .as_array()
        .expect("messages")
        .last()
        .expect("user turn");
    assert_eq!(user["content"], "look at this\n[image: photo.png]");
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/files/upload",
            "/v1/chat-messages"
        ]
    );
    let chat = &requests[2].body;
    assert_eq!(chat["query"], " ", "a file message has no text");
    assert!(
        chat.get("files").is_none(),
        "the refused file is left out: {chat}"
    );
    harness.stop().await;
}

// Retry timing in paused time.
mod paused;
