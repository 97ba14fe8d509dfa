//! The `/_sim/` control surface: plain JSON, no auth, never faulted, same effect as the
//! `Simulator` methods. Bad requests are HTTP 400 and unknown paths 404, with `{"error": "..."}`.
//!
//! - `POST /_sim/inject` `{chat, sender?, content, count?}` or `{chat, message: {...}, count?}`
//! - `POST /_sim/wechat` `{online}`
//! - `POST /_sim/fault` `{mode: none|http500|garbage|wrong_types|slow|hang, delay_ms?}`
//! - `POST /_sim/missing` `{chats: [...]}`: chats the account does not have (`listen/add` of
//!   one fails with HTTP 500, code 3001)
//! - `POST /_sim/media` `{chat, sender?, mtype, file_path?, content?, data_base64?}`: a media
//!   message; `data_base64` makes `/api/file/download` serve those bytes for `file_path`
//! - `POST /_sim/reset` (answers the fresh state)
//! - `POST /_sim/restart` (a server restart: ids start over; answers the fresh state)
//! - `GET  /_sim/state`

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{Fault, Simulator};

/// Bounds one inject call, so a typo in `count` cannot exhaust memory.
const MAX_INJECT: usize = 10_000;

/// Bounds a `/_sim/media` request (its file travels as base64).
const MAX_MEDIA_REQUEST: usize = 128 * 1024 * 1024;

/// The delay of `slow` when the request names none.
const DEFAULT_SLOW: Duration = Duration::from_millis(1000);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectRequest {
    chat: String,
    /// Defaults to the chat, which makes the message look like a private chat's.
    sender: Option<String>,
    content: Option<String>,
    /// A raw message object, injected as is.
    message: Option<Value>,
    count: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaRequest {
    chat: String,
    sender: Option<String>,
    mtype: String,
    file_path: Option<String>,
    /// Defaults to the file path, which is what wxauto puts in a file message's content.
    content: Option<String>,
    data_base64: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WechatRequest {
    online: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MissingRequest {
    chats: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultRequest {
    mode: String,
    delay_ms: Option<u64>,
}

/// The control routes, to be nested under `/_sim`.
pub(super) fn routes() -> Router<Simulator> {
    Router::new()
        .route("/inject", post(inject))
        // A file may be larger than axum's default 2 MB request limit.
        .route(
            "/media",
            post(media).layer(DefaultBodyLimit::max(MAX_MEDIA_REQUEST)),
        )
        .route("/wechat", post(wechat))
        .route("/fault", post(fault))
        .route("/missing", post(missing))
        .route("/reset", post(reset))
        .route("/restart", post(restart))
        .route("/state", get(state))
        // Its own fallback, so an unknown control path is neither faulted nor counted as an
        // API call by the API router's fallback.
        .fallback(not_found)
}

// === handlers ===

async fn inject(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: InjectRequest = match parse(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    if request.chat.is_empty() {
        return bad_request("chat must not be empty");
    }
    let count = request.count.unwrap_or(1);
    if count > MAX_INJECT {
        return bad_request(&format!("count must be at most {MAX_INJECT}"));
    }
    match (request.content, request.message) {
        (Some(content), None) => {
            let sender = request.sender.as_deref().unwrap_or(&request.chat);
            for _ in 0..count {
                sim.inject(&request.chat, sender, &content);
            }
        }
        (None, Some(message)) => {
            for _ in 0..count {
                sim.inject_message(&request.chat, message.clone());
            }
        }
        _ => return bad_request("give exactly one of content and message"),
    }
    Json(json!({ "injected": count })).into_response()
}

async fn media(State(sim): State<Simulator>, body: Bytes) -> Response {
    use base64::Engine as _;
    let request: MediaRequest = match parse(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    if request.chat.is_empty() || request.mtype.is_empty() {
        return bad_request("chat and mtype must not be empty");
    }
    if let Some(data) = &request.data_base64 {
        let Some(file_path) = &request.file_path else {
            return bad_request("data_base64 needs a file_path");
        };
        match base64::engine::general_purpose::STANDARD.decode(data) {
            Ok(bytes) => sim.add_file(file_path, bytes),
            Err(err) => return bad_request(&format!("data_base64 is not base64: {err}")),
        }
    }
    let content = request
        .content
        .or_else(|| request.file_path.clone())
        .unwrap_or_default();
    let sender = request.sender.as_deref().unwrap_or(&request.chat);
    sim.inject_media(
        &request.chat,
        sender,
        &request.mtype,
        request.file_path.as_deref(),
        &content,
    );
    Json(json!({ "injected": 1 })).into_response()
}

async fn wechat(State(sim): State<Simulator>, body: Bytes) -> Response {
    match parse::<WechatRequest>(&body) {
        Ok(request) => {
            sim.set_online(request.online);
            Json(json!({ "online": request.online })).into_response()
        }
        Err(message) => bad_request(&message),
    }
}

async fn fault(State(sim): State<Simulator>, body: Bytes) -> Response {
    let request: FaultRequest = match parse(&body) {
        Ok(request) => request,
        Err(message) => return bad_request(&message),
    };
    let fault = match request.mode.as_str() {
        "none" => Fault::None,
        "http500" => Fault::Http500,
        "garbage" => Fault::Garbage,
        "wrong_types" => Fault::WrongTypes,
        "slow" => Fault::Slow(request.delay_ms.map_or(DEFAULT_SLOW, Duration::from_millis)),
        "hang" => Fault::Hang,
        other => {
            return bad_request(&format!(
                "unknown mode {other:?}; expected none, http500, garbage, wrong_types, slow or hang"
            ));
        }
    };
    sim.set_fault(fault);
    let delay_ms = match fault {
        Fault::Slow(delay) => Some(delay.as_millis()),
        _ => None,
    };
    Json(json!({ "mode": fault.mode(), "delay_ms": delay_ms })).into_response()
}

/// `{"chats": [...]}`: the chats the account does not have (see `Simulator::set_missing_chats`).
async fn missing(State(sim): State<Simulator>, body: Bytes) -> Response {
    match parse::<MissingRequest>(&body) {
        Ok(request) => {
            let chats: Vec<&str> = request.chats.iter().map(String::as_str).collect();
            sim.set_missing_chats(&chats);
            Json(json!({ "missing": request.chats })).into_response()
        }
        Err(message) => bad_request(&message),
    }
}

async fn reset(State(sim): State<Simulator>) -> Response {
    sim.reset();
    Json(sim.snapshot()).into_response()
}

async fn restart(State(sim): State<Simulator>) -> Response {
    sim.restart();
    Json(sim.snapshot()).into_response()
}

async fn state(State(sim): State<Simulator>) -> Response {
    Json(sim.snapshot()).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "unknown control endpoint" })),
    )
        .into_response()
}

// === helpers ===

/// Parses a JSON body whatever its `Content-Type`, so a bare `curl -d` works too.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|err| format!("invalid request body: {err}"))
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": message }))).into_response()
}
