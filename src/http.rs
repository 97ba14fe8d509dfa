//! The HTTP surface. Endpoints:
//!
//! - `GET /` the HTML status page when `Accept` prefers `text/html` (browsers; `?lang=en|zh`,
//!   `?fragment=1` for its refresh), else the endpoint list; `GET /links` the endpoint list
//! - `GET /metrics` (text 0.0.4, or OpenMetrics when `Accept` asks)
//! - `GET|HEAD /-/healthy` (always 200), `GET|HEAD /-/ready` (200 once started, 503 otherwise)
//! - `POST /-/reload` (lifecycle-gated: 403 when off; 405 on GET; 500 with the errors on failure)
//! - `GET /api/v1/{status,health,clients,listeners,statistics,errors?limit=N}` (JSON envelope)
//! - `POST /api/v1/{restart,reload}` (lifecycle-gated)
//! - `GET /api/v1/processes`; `POST /api/v1/processes/{name}/{start,stop,restart}`
//!   (lifecycle-gated; 404 for an unknown name)
//! - `GET /api/v1/messages/dead?limit=N`; `POST /api/v1/messages/dead/{retry,purge}`
//!   (lifecycle-gated; body optional `{"ids": [...]}`)
//! - under `/api/v1`, an unknown path is a 404 and a wrong method a 405 (with `Allow`), both
//!   in the JSON envelope

mod api;
mod dead;
mod serve;
mod status_page;
pub mod web_config;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::{mpsc, oneshot, watch};
use tower_http::timeout::TimeoutLayer;

use crate::config::Config;
use crate::delivery::StoreCounts;
use crate::message::BoxFuture;
use crate::metrics::Registry;
use crate::monitor::report::ChatCounts;
use crate::monitor::{Monitor, Snapshot};
use crate::supervisor::{Control, ReloadReport, ReloadSource};

/// Reads how many messages the store holds for each given `(instance_id, chat)`.
pub type MessageCounts =
    Arc<dyn Fn(Vec<(String, String)>) -> BoxFuture<'static, ChatCounts> + Send + Sync>;

/// Reads the store's row counts by state (the status page's delivery figures).
pub type DeliveryCounts = Arc<dyn Fn() -> BoxFuture<'static, StoreCounts> + Send + Sync>;

/// The store's message counts for every chat in `snap`; empty without a store.
pub async fn store_counts(counts: Option<&MessageCounts>, snap: &Snapshot) -> ChatCounts {
    let Some(counts) = counts else {
        return ChatCounts::new();
    };
    let chats = snap
        .instances
        .values()
        .flat_map(|instance| {
            instance
                .chats
                .keys()
                .map(|chat| (instance.instance_id.clone(), chat.clone()))
        })
        .collect();
    counts(chats).await
}

/// Everything the handlers read. Cheap to clone; no lock is held across an await.
#[derive(Clone)]
pub struct AppState {
    /// The recorder.
    pub monitor: Arc<Monitor>,
    /// The metrics registry (encoding takes `&Registry`).
    pub registry: Arc<Registry>,
    /// The supervisor's control channel.
    pub control: mpsc::Sender<Control>,
    /// The active config.
    pub config: watch::Receiver<Arc<Config>>,
    /// Set once the listener started; cleared when shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// `--enable-lifecycle` on the command line (ORed with `server.enable_lifecycle`).
    pub lifecycle_flag: bool,
    /// Per-chat message counts from the store, when delivery runs.
    pub message_counts: Option<MessageCounts>,
    /// Row counts by state from the store, when delivery runs.
    pub delivery_counts: Option<DeliveryCounts>,
    /// Supervised external processes.
    pub processes: crate::process::Processes,
    /// The delivery service, when it runs (dead letters).
    pub delivery: Option<crate::delivery::Delivery>,
}

impl AppState {
    fn lifecycle_enabled(&self) -> bool {
        self.lifecycle_flag || self.config.borrow().server.enable_lifecycle
    }

    /// Sends a reload request and waits for the supervisor's answer.
    async fn reload(&self) -> Result<ReloadReport, Vec<String>> {
        let (respond, answer) = oneshot::channel();
        let request = Control::Reload {
            source: ReloadSource::Http,
            respond: Some(respond),
        };
        if self.control.send(request).await.is_err() {
            return Err(vec!["the supervisor is not running".to_owned()]);
        }
        answer
            .await
            .unwrap_or_else(|_| Err(vec!["the supervisor dropped the request".to_owned()]))
    }

    async fn restart(&self) -> Result<(), String> {
        let (respond, answer) = oneshot::channel();
        self.control
            .send(Control::Restart {
                respond: Some(respond),
            })
            .await
            .map_err(|_| "the supervisor is not running".to_owned())?;
        answer
            .await
            .map_err(|_| "the supervisor dropped the request".to_owned())
    }
}

/// Builds the router (no socket: tests call it directly or serve it on port 0).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page::index))
        .route("/links", get(status_page::links))
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/-/reload", post(reload))
        .nest("/api/v1", api::router())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(60),
        ))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok());
    let openmetrics = crate::metrics::wants_openmetrics(accept);
    let registry = Arc::clone(&state.registry);
    // A small body is cheaper to encode here than to hand over; a large registry takes
    // milliseconds of CPU, which stay off the reactor.
    let encoded = if crate::metrics::encode_inline() {
        Ok(crate::metrics::encode_pooled(&registry, openmetrics))
    } else {
        tokio::task::spawn_blocking(move || crate::metrics::encode_pooled(&registry, openmetrics))
            .await
    };
    match encoded {
        Ok((body, content_type)) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            "metrics encoding failed\n",
        )
            .into_response(),
    }
}

async fn healthy() -> &'static str {
    "Healthy.\n"
}

async fn ready(State(state): State<AppState>) -> Response {
    // Ready means: the config is loaded (we are serving), shutdown has not begun, and the
    // listener service runs (it is briefly stopped during POST /api/v1/restart).
    if state.ready.load(Ordering::SeqCst) && state.monitor.is_running() {
        (StatusCode::OK, "Ready.\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "Not ready.\n").into_response()
    }
}

async fn reload(State(state): State<AppState>) -> Response {
    if !state.lifecycle_enabled() {
        return (
            StatusCode::FORBIDDEN,
            "Lifecycle APIs are not enabled (server.enable_lifecycle or --enable-lifecycle).\n",
        )
            .into_response();
    }
    match state.reload().await {
        Ok(report) => (StatusCode::OK, format!("OK: {}\n", report.summary)).into_response(),
        Err(errors) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "failed to reload config; the previous config stays active:\n{}\n",
                errors.join("\n")
            ),
        )
            .into_response(),
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then drains until `deadline` (the
/// one the other stages of the shutdown share). `limits` bound what one client can hold (see
/// `serve.rs`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: tokio_util::sync::CancellationToken,
    deadline: crate::shutdown::Deadline,
    limits: crate::config::HttpLimits,
    web: Option<Arc<web_config::WebConfigHandle>>,
) -> std::io::Result<()> {
    serve::serve(listener, router, shutdown, deadline, limits, web).await
}
