//! The wxauto HTTP API routes: request parsing, `X-API-Key` auth, fault injection, envelopes.
//!
//! Layering, outermost first: the fault layer (every API request, known route or not), then
//! routing (unknown routes are a 404 before any auth, as in Flask), then auth (every route but
//! `/api/health`), then the handler, which asks `State` and renders its answer.

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tracing::debug;

use super::Simulator;
use super::state::{Action, SendRequest, WxError};

/// How long a `Fault::Hang` request waits when no shutdown releases it: far beyond any sane
/// client timeout, short enough that a leaked task cannot live forever.
const HANG_FOR: Duration = Duration::from_secs(3600);

const API_KEY_HEADER: &str = "x-api-key";

/// The API routes, still needing the `Simulator` state.
pub(super) fn routes(sim: &Simulator) -> Router<Simulator> {
    let mut authed = Router::new()
        .route("/api/wechat/initialize", post(initialize))
        .route("/api/message/get-next-new", get(get_next_new))
        .route("/api/message/listen/add", post(listen_add))
        .route("/api/message/listen/remove", post(listen_remove))
        .route("/api/message/listen/get", get(listen_get))
        .route("/api/chat-window/message/send", post(send))
        .route("/api/chat-window/message/send-typing", post(send_typing))
        .route("/api/file/download", post(file_download));
    if sim.inner.config.history {
        authed = authed.route("/api/chat/get-all-messages", get(get_all_messages));
    }
    let authed = authed.route_layer(middleware::from_fn_with_state(sim.clone(), require_api_key));
    Router::new()
        .route("/api/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(sim.clone(), inject_faults))
}

// === middleware ===

async fn inject_faults(State(sim): State<Simulator>, req: Request, next: Next) -> Response {
    let endpoint = format!("{} {}", req.method(), req.uri().path());
    debug!(name = %sim.inner.config.name, endpoint = %endpoint, "Simulated API call.");
    let action = sim.lock().begin_call(endpoint, sim.inner.config.flaky);
    match action {
        Action::Pass => next.run(req).await,
        Action::Http500 => {
            envelope_error(StatusCode::INTERNAL_SERVER_ERROR, 5000, "服务器内部错误")
        }
        Action::Garbage(body) => {
            // Claim JSON on purpose: the client must survive a body that lies about itself.
            let content_type = HeaderValue::from_static("application/json");
            (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Action::WrongTypes => (
            StatusCode::OK,
            axum::Json(json!({ "code": "zero", "message": 5, "data": { "messages": [1, 2] } })),
        )
            .into_response(),
        Action::Slow(delay) => {
            let released = sim.inner.release.notified();
            tokio::select! {
                () = tokio::time::sleep(delay) => next.run(req).await,
                () = released => shutting_down(),
            }
        }
        Action::Hang => {
            let released = sim.inner.release.notified();
            tokio::select! {
                () = tokio::time::sleep(HANG_FOR) => shutting_down(),
                () = released => shutting_down(),
            }
        }
    }
}

async fn require_api_key(State(sim): State<Simulator>, req: Request, next: Next) -> Response {
    // The real server treats an empty header like a missing one (`if not api_key`).
    match req.headers().get(API_KEY_HEADER).map(HeaderValue::as_bytes) {
        None | Some(b"") => envelope_error(StatusCode::UNAUTHORIZED, 1001, "缺少API密钥"),
        Some(key) if key != sim.inner.config.api_key.as_bytes() => {
            envelope_error(StatusCode::UNAUTHORIZED, 1001, "API密钥无效")
        }
        Some(_) => next.run(req).await,
    }
}

// === handlers ===

async fn health(State(sim): State<Simulator>) -> Response {
    let data = sim.lock().health();
    envelope(Ok(data))
}

async fn initialize(State(sim): State<Simulator>) -> Response {
    let result = sim.lock().initialize();
    envelope(result)
}

// The real server parses `savepic=true` and friends but never uses them; not extracting the
// query at all accepts any of them.
async fn get_next_new(State(sim): State<Simulator>) -> Response {
    let result = sim.lock().get_next_new();
    answer_late(&sim).await;
    envelope(result)
}

// Each generation reads its own key only, which is what breaks a client that sends one.
async fn listen_add(State(sim): State<Simulator>, body: Bytes) -> Response {
    let key = sim.inner.config.api_generation.key();
    let who = string_field(&parse_body(&body), key);
    let result = sim.lock().listen_add(who);
    envelope(result)
}

async fn listen_remove(State(sim): State<Simulator>, body: Bytes) -> Response {
    let key = sim.inner.config.api_generation.key();
    let who = string_field(&parse_body(&body), key);
    let result = sim.lock().listen_remove(who);
    envelope(result)
}

async fn listen_get(State(sim): State<Simulator>) -> Response {
    let result = sim.lock().listen_get();
    answer_late(&sim).await;
    envelope(result)
}

async fn get_all_messages(
    State(sim): State<Simulator>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let who = query.get("who").filter(|who| !who.is_empty()).cloned();
    let result = sim.lock().get_all_messages(who);
    envelope(result)
}

/// The read already happened (the messages are gone upstream); the answer takes its time.
async fn answer_late(sim: &Simulator) {
    let latency = sim.inner.config.read_latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

async fn send(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request = send_request(&parse_body(&body), false);
    let result = sim.lock().send(request);
    envelope(result)
}

async fn send_typing(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request = send_request(&parse_body(&body), true);
    let result = sim.lock().send(request);
    envelope(result)
}

/// Raw bytes for a known file; a missing `file_path` is code 1002 and an unknown one 3003,
/// as enveloped errors.
async fn file_download(State(sim): State<Simulator>, body: Bytes) -> Response {
    let Some(file_path) = string_field(&parse_body(&body), "file_path") else {
        return envelope_error(StatusCode::BAD_REQUEST, 1002, "缺少必要参数");
    };
    match sim.file(&file_path) {
        Some(bytes) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            )],
            bytes,
        )
            .into_response(),
        None => envelope_error(StatusCode::NOT_FOUND, 3003, "文件不存在"),
    }
}

async fn not_found() -> Response {
    envelope_error(StatusCode::NOT_FOUND, 5000, "接口不存在")
}

async fn method_not_allowed() -> Response {
    envelope_error(StatusCode::METHOD_NOT_ALLOWED, 5000, "请求方法不允许")
}

// === request parsing ===

/// The JSON body, or `Null` when it is absent or malformed: the handlers then report the
/// missing parameters, which is what the client needs to hear either way.
fn parse_body(body: &Bytes) -> Value {
    serde_json::from_slice(body).unwrap_or(Value::Null)
}

/// A non-empty string field.
fn string_field(body: &Value, name: &str) -> Option<String> {
    body.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn send_request(body: &Value, typing: bool) -> SendRequest {
    // wxauto accepts a single name as well as a list.
    let at_list = match body.get("at_list") {
        Some(Value::Array(names)) => names
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(name)) if !name.is_empty() => vec![name.clone()],
        _ => Vec::new(),
    };
    SendRequest {
        who: string_field(body, "who"),
        message: string_field(body, "message"),
        at_list,
        typing,
    }
}

// === responses ===

fn envelope(result: Result<Value, WxError>) -> Response {
    match result {
        Ok(data) => (
            StatusCode::OK,
            axum::Json(json!({ "code": 0, "message": "success", "data": data })),
        )
            .into_response(),
        Err(err) => envelope_error(err.status, err.code, &err.message),
    }
}

fn envelope_error(status: StatusCode, code: i64, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message, "data": null })),
    )
        .into_response()
}

fn shutting_down() -> Response {
    envelope_error(StatusCode::SERVICE_UNAVAILABLE, 5000, "服务器正在关闭")
}
