//! The JSON monitor API under `/api/v1`, in the seed's `{success, data, timestamp}` envelope.

use std::time::SystemTime;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{AppState, store_counts};
use crate::clock::{rfc3339, rfc3339_of_seconds};
use crate::monitor::{ERROR_RING_CAPACITY, report};

/// An API failure: the one place errors become status codes and JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "success": false,
            "error": self.message,
            "timestamp": rfc3339(SystemTime::now()),
        });
        (self.status, Json(body)).into_response()
    }
}

/// A successful answer: `data` plus optional extra top-level fields (e.g. `total_count`).
pub(super) fn ok(data: Value, extra: &[(&str, Value)]) -> Response {
    let mut body = json!({
        "success": true,
        "data": data,
        "timestamp": rfc3339(SystemTime::now()),
    });
    for (key, value) in extra {
        body[*key] = value.clone();
    }
    Json(body).into_response()
}

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/status", get(status))
        .route("/health", get(health))
        .route("/clients", get(clients))
        .route("/listeners", get(listeners))
        .route("/statistics", get(statistics))
        .route("/errors", get(errors))
        .route("/restart", post(restart))
        .route("/reload", post(reload))
        .route("/processes", get(processes))
        .route("/processes/{name}/{action}", post(process_action))
        .route("/messages/dead", get(super::dead::list))
        .route("/messages/dead/retry", post(super::dead::retry))
        .route("/messages/dead/purge", post(super::dead::purge))
        // After every route: it becomes each route's answer to the methods it lacks.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
}

/// A path of the API asked with a method it does not take: the envelope with 405. axum adds
/// the `Allow` header (the route's methods) to this answer, as to its own empty 405.
async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed here (the Allow header lists the methods that are)"),
    )
}

async fn status(State(state): State<AppState>) -> Response {
    let snap = state.monitor.snapshot();
    let process = state.monitor.process_sample();
    let mut document = report::status(&snap, &process);
    document["processes"] = state.monitor.processes().summary();
    ok(document, &[])
}

async fn health(State(state): State<AppState>) -> Response {
    let snap = state.monitor.snapshot();
    let counts = store_counts(state.message_counts.as_ref(), &snap).await;
    ok(state.monitor.health_document(&snap, &counts), &[])
}

async fn clients(State(state): State<AppState>) -> Response {
    let snap = state.monitor.snapshot();
    let rows = report::clients(&snap);
    let summary = report::client_summary(&snap, &rows);
    ok(Value::Array(rows), &summary)
}

async fn listeners(State(state): State<AppState>) -> Response {
    let snap = state.monitor.snapshot();
    let counts = store_counts(state.message_counts.as_ref(), &snap).await;
    let rows = report::listeners(&snap, &counts);
    let active = report::active_count(&rows);
    let total = rows.len();
    ok(
        Value::Array(rows),
        &[
            ("total_count", json!(total)),
            ("active_count", json!(active)),
        ],
    )
}

async fn statistics(State(state): State<AppState>) -> Response {
    let snap = state.monitor.snapshot();
    ok(
        report::statistics(&snap, state.monitor.api_calls_made(&snap)),
        &[],
    )
}

async fn errors(State(state): State<AppState>, uri: axum::http::Uri) -> Result<Response, ApiError> {
    let limit = strict_limit(uri.query().unwrap_or(""), 10, ERROR_RING_CAPACITY)?;
    let records = state.monitor.recent_errors(limit);
    let count = records.len();
    Ok(ok(
        Value::Array(report::errors(&records)),
        &[("count", json!(count))],
    ))
}

/// `limit` parsed strictly: at most once, ASCII digits only (no sign, space or `+`), within
/// 1..=`max`. Other parameters are ignored.
pub(super) fn strict_limit(query: &str, default: usize, max: usize) -> Result<usize, ApiError> {
    let bad = || {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be given at most once, as digits only, from 1 to {max}"),
        )
    };
    let mut values = query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .filter(|(name, _)| *name == "limit")
        .map(|(_, value)| value);
    let Some(raw) = values.next() else {
        return Ok(default);
    };
    if values.next().is_some()
        || raw.is_empty()
        || raw.len() > 9
        || !raw.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    match raw.parse::<usize>() {
        Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
        _ => Err(bad()),
    }
}

pub(super) fn require_lifecycle(state: &AppState) -> Result<(), ApiError> {
    if state.lifecycle_enabled() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "lifecycle APIs are not enabled (server.enable_lifecycle or --enable-lifecycle)",
        ))
    }
}

async fn restart(State(state): State<AppState>) -> Result<Response, ApiError> {
    require_lifecycle(&state)?;
    state
        .restart()
        .await
        .map_err(|message| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message))?;
    let snap = state.monitor.snapshot();
    Ok(ok(
        json!({
            "restarted": true,
            "running": snap.running,
            "start_time": snap.listener_start_time.map(rfc3339_of_seconds),
            "start_time_seconds": snap.listener_start_time,
        }),
        &[],
    ))
}

async fn reload(State(state): State<AppState>) -> Result<Response, ApiError> {
    require_lifecycle(&state)?;
    match state.reload().await {
        Ok(report) => Ok(ok(
            json!({
                "reloaded": true,
                "changed": report.changed,
                "summary": report.summary,
                "needs_restart": report.needs_restart,
            }),
            &[],
        )),
        Err(errors) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "configuration reload failed; the previous configuration stays active: {}",
                errors.join("; ")
            ),
        )),
    }
}

async fn processes(State(state): State<AppState>) -> Response {
    // Sampling reads /proc and refreshes sysinfo: keep it off the reactor.
    let handle = state.processes.clone();
    let rows = tokio::task::spawn_blocking(move || handle.views())
        .await
        .unwrap_or_default();
    let total = rows.len();
    ok(Value::Array(rows), &[("total_count", json!(total))])
}

async fn process_action(
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let Some(action) = crate::process::Action::parse(&action) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "no such action: use start, stop or restart",
        ));
    };
    require_lifecycle(&state)?;
    state
        .processes
        .command(&name, action)
        .await
        .map_err(|error| match error {
            crate::process::ProcessError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, error.to_string())
            }
            crate::process::ProcessError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
        })?;
    let handle = state.processes.clone();
    let view = tokio::task::spawn_blocking(move || handle.view(&name))
        .await
        .ok()
        .flatten()
        .unwrap_or(Value::Null);
    Ok(ok(view, &[]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_parsed_strictly() {
        assert_eq!(strict_limit("", 10, ERROR_RING_CAPACITY).unwrap(), 10);
        assert_eq!(
            strict_limit("other=1", 10, ERROR_RING_CAPACITY).unwrap(),
            10
        );
        assert_eq!(strict_limit("limit=5", 10, ERROR_RING_CAPACITY).unwrap(), 5);
        assert_eq!(
            strict_limit("x=1&limit=7", 10, ERROR_RING_CAPACITY).unwrap(),
            7
        );
        // The dead-letter list's bounds (`dead::MAX_LIST`); it used to keep the last of
        // repeated `limit`s.
        assert_eq!(strict_limit("limit=1000", 100, 1000).unwrap(), 1000);
        assert!(strict_limit("limit=1001", 100, 1000).is_err());
        assert!(strict_limit("limit=5&limit=6", 100, 1000).is_err());
        for bad in [
            "limit=+5",
            "limit=5&limit=6",
            "limit=",
            "limit",
            "limit=-1",
            "limit=%205",
            "limit=0",
            "limit=5.0",
            "limit=99999999999999999999",
        ] {
            assert!(strict_limit(bad, 10, ERROR_RING_CAPACITY).is_err(), "{bad}");
        }
    }
}
