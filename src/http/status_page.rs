//! The HTML status page at `/` for browsers, and the endpoint list (`/links`, and `/` for
//! clients that do not prefer HTML).
//!
//! One renderer, on the server: the page is built from the same documents the JSON API serves
//! (`/api/v1/health`, the store's counts, `/api/v1/processes` when that endpoint exists), with
//! every user-supplied string HTML-escaped. The embedded script only re-fetches the rendered
//! body (`/?fragment=1`) every few seconds and applies the reader's stored language, so the
//! page with scripts disabled shows the same figures. Assets are compiled in (`include_str!`).

mod render;
mod text;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

use super::{AppState, store_counts};
use crate::delivery::StoreCounts;
use render::render_body;
use text::Lang;

const PAGE: &str = include_str!("status_page/page.html");
const CSS: &str = include_str!("status_page/page.css");
const JS: &str = include_str!("status_page/page.js");

/// The endpoint list (the landing page before the status page existed).
const LINKS: &str = concat!(
    "<!doctype html><html><head><meta charset=\"utf-8\"><title>wxauto-sidecar</title></head>",
    "<body><h1>wxauto-sidecar ",
    env!("CARGO_PKG_VERSION"),
    "</h1><ul>",
    "<li><a href=\"/?view=status\">/</a> status page (browsers)</li>",
    "<li><a href=\"/metrics\">/metrics</a> Prometheus metrics</li>",
    "<li><a href=\"/-/healthy\">/-/healthy</a> liveness</li>",
    "<li><a href=\"/-/ready\">/-/ready</a> readiness</li>",
    "<li>POST /-/reload: reload the configuration (lifecycle)</li>",
    "<li><a href=\"/api/v1/status\">/api/v1/status</a> service status</li>",
    "<li><a href=\"/api/v1/health\">/api/v1/health</a> health report</li>",
    "<li><a href=\"/api/v1/clients\">/api/v1/clients</a> wxauto instances</li>",
    "<li><a href=\"/api/v1/listeners\">/api/v1/listeners</a> listened chats</li>",
    "<li><a href=\"/api/v1/statistics\">/api/v1/statistics</a> statistics</li>",
    "<li><a href=\"/api/v1/errors?limit=10\">/api/v1/errors</a> recent errors</li>",
    "<li>POST /api/v1/restart, POST /api/v1/reload (lifecycle)</li>",
    "<li><a href=\"/api/v1/processes\">/api/v1/processes</a> supervised processes; ",
    "POST /api/v1/processes/{name}/start|stop|restart (lifecycle)</li>",
    "</ul></body></html>"
);

/// `?lang=en|zh`, `?fragment=1` (the body only, for the refresh), `?view=status|links`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct PageQuery {
    lang: Option<String>,
    fragment: Option<String>,
    view: Option<String>,
}

/// `GET /`: the status page when the client prefers HTML (browsers), else the endpoint list.
pub(super) async fn index(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<PageQuery>,
) -> Response {
    let header = |name| headers.get(name).and_then(|value| value.to_str().ok());
    let wants_page = match query.view.as_deref() {
        Some("status") => true,
        Some("links") => false,
        _ => query.fragment.is_some() || prefers_html(header(header::ACCEPT)),
    };
    if !wants_page {
        // The same URL answers differently by `Accept`: tell caches.
        return ([(header::VARY, "Accept")], links().await).into_response();
    }
    let lang = Lang::negotiate(query.lang.as_deref(), header(header::ACCEPT_LANGUAGE));
    let model = Model::gather(&state).await;
    let body = render_body(&model, lang);
    let html = if query.fragment.is_some() {
        body
    } else {
        page(lang, &body)
    };
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::VARY, "Accept, Accept-Language"),
        ],
        Html(html),
    )
        .into_response()
}

/// `GET /links`: the endpoint list.
pub(super) async fn links() -> Html<&'static str> {
    Html(LINKS)
}

/// Whether `Accept` names `text/html` (or XHTML) with a weight no other named type beats.
/// `*/*` alone (curl, reqwest, Prometheus) is not a preference for HTML.
fn prefers_html(accept: Option<&str>) -> bool {
    let Some(accept) = accept else { return false };
    let mut html: Option<f32> = None;
    let mut other: f32 = 0.0;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let weight = parts
            .find_map(|param| param.trim().strip_prefix("q="))
            .and_then(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if media == "text/html" || media == "application/xhtml+xml" {
            html = Some(html.map_or(weight, |top| top.max(weight)));
        } else if !media.ends_with("/*") {
            other = other.max(weight);
        }
    }
    html.is_some_and(|weight| weight > 0.0 && weight >= other)
}

/// What the page shows, gathered once per request.
struct Model {
    health: Value,
    delivery: Option<StoreCounts>,
    processes: Option<Value>,
    lifecycle: bool,
}

impl Model {
    async fn gather(state: &AppState) -> Self {
        let snap = state.monitor.snapshot();
        let counts = store_counts(state.message_counts.as_ref(), &snap).await;
        let health = state.monitor.health_document(&snap, &counts);
        let delivery = match &state.delivery_counts {
            Some(counts) => Some(counts().await),
            None => None,
        };
        Self {
            health,
            delivery,
            processes: processes(state).await,
            lifecycle: state.lifecycle_enabled(),
        }
    }
}

/// The `data` of `GET /api/v1/processes`, asked of the API router itself so that the page needs
/// nothing from the process supervisor but its endpoint; `None` while that endpoint is absent.
/// The API router, not the outer one: layers around the whole surface (timeouts, access
/// control) already ran for the page's own request.
async fn processes(state: &AppState) -> Option<Value> {
    let request = Request::get("/processes").body(Body::empty()).ok()?;
    let response = super::api::router()
        .with_state(state.clone())
        .oneshot(request)
        .await
        .ok()?;
    if response.status() != StatusCode::OK {
        return None;
    }
    let bytes = axum::body::to_bytes(response.into_body(), 4 << 20)
        .await
        .ok()?;
    let mut body: Value = serde_json::from_slice(&bytes).ok()?;
    let rows = body.get_mut("data")?.take();
    // No card when nothing is supervised.
    rows.as_array()
        .is_some_and(|rows| !rows.is_empty())
        .then_some(rows)
}

fn page(lang: Lang, body: &str) -> String {
    PAGE.replace("{{lang}}", lang.code())
        .replace("{{title}}", lang.text().title)
        .replace("{{css}}", CSS)
        .replace("{{js}}", JS)
        .replace("{{body}}", body)
}

#[cfg(test)]
mod tests;
