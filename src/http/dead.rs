//! Dead letters, for the operator: `GET /api/v1/messages/dead?limit=N`, and the
//! lifecycle-gated `POST /api/v1/messages/dead/retry` and `POST /api/v1/messages/dead/purge`
//! (body optional: `{"ids": [...]}`, the row ids the list shows; no body means all).

use std::time::{Duration, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::api::{ApiError, ok, require_lifecycle, strict_limit};
use crate::clock::rfc3339;
use crate::delivery::{DeadLetter, Delivery};

/// The most dead letters one list answer carries.
pub const MAX_LIST: usize = 1000;
/// What a list answers without `limit`.
const DEFAULT_LIST: usize = 100;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Selection {
    ids: Option<Vec<i64>>,
}

fn delivery(state: &AppState) -> Result<&Delivery, ApiError> {
    state.delivery.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no message store runs in this process",
        )
    })
}

pub(super) async fn list(
    State(state): State<AppState>,
    uri: axum::http::Uri,
) -> Result<Response, ApiError> {
    // The same strict parsing as `/api/v1/errors`: one `limit`, digits only.
    let limit = strict_limit(uri.query().unwrap_or(""), DEFAULT_LIST, MAX_LIST)?;
    let delivery = delivery(&state)?;
    let letters = delivery
        .dead_letters(limit)
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    let total = delivery.counts().await.dead;
    let count = letters.len();
    Ok(ok(
        Value::Array(letters.iter().map(letter).collect()),
        &[("count", json!(count)), ("total_count", json!(total))],
    ))
}

pub(super) async fn retry(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    act(&state, &body, "retried", |delivery, ids| async move {
        delivery.retry_dead(ids).await
    })
    .await
}

pub(super) async fn purge(
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    act(&state, &body, "purged", |delivery, ids| async move {
        delivery.purge_dead(ids).await
    })
    .await
}

/// A lifecycle-gated action on the selected dead letters; answers `{<done>: n}`.
async fn act<F, Fut>(
    state: &AppState,
    body: &Bytes,
    done: &str,
    action: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Delivery, Option<Vec<i64>>) -> Fut,
    Fut: std::future::Future<Output = Result<u64, crate::delivery::StoreError>>,
{
    require_lifecycle(state)?;
    let selection = selection(body)?;
    let n = action(delivery(state)?.clone(), selection.ids)
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()))?;
    Ok(ok(json!({ done: n }), &[]))
}

/// An empty body selects every dead letter; `{"ids": []}` selects none.
fn selection(body: &Bytes) -> Result<Selection, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Selection::default());
    }
    serde_json::from_slice(body).map_err(|error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body must be empty or {{\"ids\": [<id>, ...]}}: {error}"),
        )
    })
}

fn letter(letter: &DeadLetter) -> Value {
    json!({
        "id": letter.id,
        "instance_id": letter.instance_id,
        "message_id": letter.message_id,
        "idempotency_key": letter.key,
        "chat": letter.chat,
        "platform": letter.platform_id,
        "attempts": letter.attempts,
        "reply_attempts": letter.reply_attempts,
        "reply_pending": letter.reply_pending,
        "last_error": letter.last_error,
        "created_time": ms_to_seconds(letter.created_ms),
        "created_at": ms_to_rfc3339(letter.created_ms),
        "dead_time": ms_to_seconds(letter.dead_ms),
        "dead_at": ms_to_rfc3339(letter.dead_ms),
    })
}

fn ms_to_seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

fn ms_to_rfc3339(ms: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}
