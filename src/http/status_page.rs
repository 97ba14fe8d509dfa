//! The HTML status page at `/` for browsers, and the endpoint list (`/links`, and `/` for
//! clients that do not prefer HTML).
//!
//! One renderer, on the server: the page is built from the same documents the JSON API serves
//! (`/api/v1/health`, the store's counts, `/api/v1/processes` when that endpoint exists), with
//! every user-supplied string HTML-escaped. The embedded script only re-fetches the rendered
//! body (`/?fragment=1`) every few seconds and applies the reader's stored language, so the
//! page with scripts disabled shows the same figures. Assets are compiled in (`include_str!`).

mod text;

use std::fmt::Write as _;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use tower::ServiceExt as _;

use super::{AppState, store_counts};
use crate::delivery::StoreCounts;
use text::{Lang, Text};

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

/// Escapes text for HTML element content and quoted attribute values.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn str_of<'a>(value: &'a Value, key: &str) -> &'a str {
    value[key].as_str().unwrap_or("")
}

fn u64_of(value: &Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or(0)
}

/// A `<time>` element for unix seconds or an RFC 3339 string; the script shows it in local time.
fn time_cell(value: &Value, t: &Text) -> String {
    let stamp = match value {
        Value::Number(seconds) => seconds
            .as_f64()
            .and_then(|seconds| chrono::DateTime::from_timestamp_millis((seconds * 1000.0) as i64)),
        Value::String(text) => chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|time| time.to_utc()),
        _ => None,
    };
    match stamp {
        Some(time) => format!(
            "<time datetime=\"{}\">{}</time>",
            time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            time.format("%Y-%m-%d %H:%M:%S UTC")
        ),
        None => format!("<span class=\"muted\">{}</span>", t.never),
    }
}

fn status_word(status: &str, t: &Text) -> &'static str {
    match status {
        "healthy" => t.healthy,
        "warning" => t.warning,
        _ => t.critical,
    }
}

fn state_word(state: &str, t: &Text) -> &'static str {
    match state {
        "up" => t.state_up,
        "down" => t.state_down,
        "recovering" => t.state_recovering,
        _ => t.state_unknown,
    }
}

/// The whole `<body>` content; also the refresh fragment.
fn render_body(model: &Model, lang: Lang) -> String {
    let t = lang.text();
    let h = &model.health;
    let other = match lang {
        Lang::En => Lang::Zh,
        Lang::Zh => Lang::En,
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "<div id=\"app\" data-lang=\"{lang}\" data-title=\"{title}\" data-failed=\"{failed}\">\
         <header><h1>{title} <small>{version}</small></h1>\
         <nav><a href=\"?lang={other_code}\" data-lang=\"{other_code}\" lang=\"{other_code}\">{other_name}</a> \
         <a href=\"links\">{endpoints}</a></nav>\
         <p class=\"muted\">{updated} {time} · <span id=\"live\">{live}</span></p></header><main>",
        lang = lang.code(),
        title = esc(t.title),
        failed = esc(t.refresh_failed),
        version = env!("CARGO_PKG_VERSION"),
        other_code = other.code(),
        other_name = t.other_language,
        endpoints = t.endpoints,
        updated = t.updated,
        time = time_cell(&h["timestamp"], t),
        live = t.live,
    );
    render_health(&mut out, h, model, t);
    render_instances(&mut out, h, t);
    render_chats(&mut out, h, t);
    render_delivery(&mut out, model.delivery.as_ref(), t);
    render_config(&mut out, h, model.lifecycle, t);
    if let Some(processes) = &model.processes {
        render_processes(&mut out, processes, t);
    }
    render_errors(&mut out, h, t);
    out.push_str("</main></div>");
    out
}

fn render_health(out: &mut String, h: &Value, model: &Model, t: &Text) {
    let status = str_of(h, "overall_status");
    let listener = &h["message_listener"];
    let clients = &h["api_clients_summary"];
    let chats = &h["listeners_summary"];
    let running = listener["running"].as_bool().unwrap_or(false);
    let _ = write!(
        out,
        "<section class=\"card health {status}\" id=\"health\"><h2>{health}</h2>\
         <div class=\"score-row\"><div class=\"score\" id=\"score\" title=\"{score_word}\">{score}</div>\
         <div><span class=\"badge {status}\" id=\"overall-status\" data-status=\"{status}\">{status_word}</span>\
         <p>{running_word} · {uptime} {uptime_value}</p></div></div>\
         <h3>{deductions}</h3><ul class=\"deductions\">",
        status = esc(status),
        health = t.health,
        score_word = t.score,
        score = u64_of(h, "health_score"),
        status_word = status_word(status, t),
        running_word = if running {
            t.listener_running
        } else {
            t.listener_stopped
        },
        uptime = t.uptime,
        uptime_value = esc(str_of(listener, "uptime_formatted")),
        deductions = t.deductions,
    );
    let d = &h["deductions"];
    for (key, label, max) in [
        ("listener", t.deduction_listener, 40),
        ("clients", t.deduction_clients, 30),
        ("listeners", t.deduction_listeners, 20),
        ("error_rate", t.deduction_error_rate, 10),
    ] {
        let lost = u64_of(d, key);
        let _ = write!(
            out,
            "<li class=\"{class}\" data-deduction=\"{key}\"><span>{label}</span>\
             <span class=\"bar\"><i style=\"width:{percent}%\"></i></span><b>−{lost}</b><small>/ {max}</small></li>",
            class = if lost > 0 { "lost" } else { "kept" },
            percent = (lost * 100 / max).min(100),
        );
    }
    out.push_str("</ul></section>");
    // The headline figures.
    let _ = write!(
        out,
        "<section class=\"tiles\">\
         <div class=\"tile\"><b id=\"tile-instances\">{connected} / {total}</b><span>{instances} {connected_word}</span></div>\
         <div class=\"tile\"><b id=\"tile-chats\">{active} / {chats_total}</b><span>{chats_word} {active_word}</span></div>\
         <div class=\"tile\"><b id=\"tile-backlog\">{backlog}</b><span>{backlog_word}</span></div>\
         <div class=\"tile{dead_class}\"><b id=\"tile-dead\">{dead}</b><span>{dead_word}</span></div>\
         <div class=\"tile\"><b id=\"tile-errors\">{errors}</b><span>{errors_word}</span></div>\
         <div class=\"tile\"><b id=\"tile-messages\">{messages}</b><span>{messages_word}</span></div>\
         </section>",
        connected = u64_of(clients, "connected_count"),
        total = u64_of(clients, "total_count"),
        instances = t.instances,
        connected_word = t.connected,
        active = u64_of(chats, "active_count"),
        chats_total = u64_of(chats, "total_count"),
        chats_word = t.chats,
        active_word = t.active,
        backlog = model
            .delivery
            .as_ref()
            .map_or("–".to_owned(), |counts| counts.undelivered().to_string()),
        backlog_word = t.backlog,
        dead_class = if model.delivery.as_ref().is_some_and(|c| c.dead > 0) {
            " alert"
        } else {
            ""
        },
        dead = model
            .delivery
            .as_ref()
            .map_or("–".to_owned(), |counts| counts.dead.to_string()),
        dead_word = t.dead_letters,
        errors = u64_of(&h["statistics"], "recent_errors_count"),
        errors_word = t.errors_in_window,
        messages = u64_of(&h["statistics"], "window_messages"),
        messages_word = t.messages_in_window,
    );
}

fn render_instances(out: &mut String, h: &Value, t: &Text) {
    let _ = write!(
        out,
        "<section class=\"card\" id=\"instances\"><h2>{}</h2>",
        t.instances
    );
    let rows = h["api_clients"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if rows.is_empty() {
        let _ = write!(out, "<p class=\"muted\">{}</p></section>", t.no_instances);
        return;
    }
    // Inactive chats per instance, from the listener rows.
    let listeners = h["listeners"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let _ = write!(
        out,
        "<div class=\"scroll\"><table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
        t.instance, t.state, t.last_check, t.errors, t.chats_active_inactive, t.last_error
    );
    for row in rows {
        let id = str_of(row, "instance_id");
        let enabled = row["enabled"].as_bool().unwrap_or(true);
        let state = if enabled {
            str_of(row, "state")
        } else {
            "disabled"
        };
        let word = if enabled {
            state_word(state, t)
        } else {
            t.disabled
        };
        let of_instance = listeners
            .iter()
            .filter(|chat| str_of(chat, "instance_id") == id);
        let (mut active, mut inactive) = (0, 0);
        for chat in of_instance {
            if chat["active"].as_bool().unwrap_or(false) {
                active += 1;
            } else {
                inactive += 1;
            }
        }
        let _ = write!(
            out,
            "<tr data-instance=\"{id}\"><td><b>{id}</b></td>\
             <td><span class=\"badge {state}\" data-state=\"{state}\">{word}</span></td>\
             <td>{check}</td><td class=\"num\">{errors}</td><td class=\"num\">{active} / {inactive}</td>\
             <td class=\"text\">{last_error}</td></tr>",
            id = esc(id),
            state = esc(state),
            check = time_cell(&row["last_check_time"], t),
            errors = u64_of(row, "error_count"),
            last_error = esc(str_of(row, "last_error")),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn render_chats(out: &mut String, h: &Value, t: &Text) {
    let _ = write!(
        out,
        "<section class=\"card\" id=\"chats\"><h2>{}</h2>",
        t.chats
    );
    let rows = h["listeners"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if rows.is_empty() {
        let _ = write!(out, "<p class=\"muted\">{}</p></section>", t.no_chats);
        return;
    }
    let _ = write!(
        out,
        "<div class=\"scroll\"><table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
        t.chat, t.instance, t.state, t.messages, t.errors, t.last_message
    );
    for row in rows {
        let active = row["active"].as_bool().unwrap_or(false);
        let fixed = row["fixed"].as_bool().unwrap_or(false);
        let _ = write!(
            out,
            "<tr><td class=\"chat\">{chat}</td><td>{instance}</td>\
             <td><span class=\"badge {class}\">{state}</span>{fixed}</td>\
             <td class=\"num\">{messages}</td><td class=\"num\">{errors}</td><td>{last}</td></tr>",
            chat = esc(str_of(row, "who")),
            instance = esc(str_of(row, "instance_id")),
            class = if active { "up" } else { "unknown" },
            state = if active { t.active } else { t.inactive },
            fixed = if fixed {
                format!(" <span class=\"badge fixed\">{}</span>", t.fixed)
            } else {
                String::new()
            },
            messages = u64_of(row, "message_count"),
            errors = u64_of(row, "error_count"),
            last = time_cell(&row["last_message_time"], t),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn render_delivery(out: &mut String, counts: Option<&StoreCounts>, t: &Text) {
    let _ = write!(
        out,
        "<section class=\"card\" id=\"delivery\"><h2>{}</h2>",
        t.delivery
    );
    match counts {
        None => {
            let _ = write!(out, "<p class=\"muted\">{}</p>", t.no_delivery);
        }
        Some(counts) => {
            let _ = write!(
                out,
                "<dl class=\"pairs\"><dt>{backlog}</dt><dd id=\"delivery-pending\">{pending}</dd>\
                 <dt>{retrying}</dt><dd>{failed}</dd>\
                 <dt>{dead_word}</dt><dd id=\"delivery-dead\">{dead}</dd>\
                 <dt>{delivered_word}</dt><dd>{delivered}</dd></dl>",
                backlog = t.backlog,
                pending = counts.undelivered(),
                retrying = t.retrying,
                failed = counts.failed,
                dead_word = t.dead_letters,
                dead = counts.dead,
                delivered_word = t.delivered,
                delivered = counts.delivered,
            );
        }
    }
    out.push_str("</section>");
}

fn render_processes(out: &mut String, processes: &Value, t: &Text) {
    let rows = processes.as_array().map(Vec::as_slice).unwrap_or(&[]);
    if rows.is_empty() {
        // No `processes:` configured: nothing to show.
        return;
    }
    let _ = write!(
        out,
        "<section class=\"card\" id=\"processes\"><h2>{}</h2>\
         <div class=\"scroll\"><table><thead><tr><th>{}</th><th>{}</th><th>PID</th><th>{}</th>\
         <th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
        t.processes, t.process, t.state, t.uptime, t.restarts, t.exit_code, t.memory, t.last_error
    );
    for row in rows {
        let state = str_of(row, "state");
        let cell = |key: &str| match &row[key] {
            Value::Null => "–".to_owned(),
            Value::String(text) => esc(text),
            other => esc(&other.to_string()),
        };
        let class = match state {
            "running" => "up",
            "starting" | "backoff" => "recovering",
            "exited" | "fatal" => "down",
            _ => "unknown",
        };
        let _ = write!(
            out,
            "<tr data-process=\"{name}\"><td><b>{name}</b></td>\
             <td><span class=\"badge {class}\" data-state=\"{state}\">{state}</span></td>\
             <td class=\"num\">{pid}</td><td class=\"num\">{uptime}</td><td class=\"num\">{restarts}</td>\
             <td class=\"num\">{exit}</td><td class=\"num\">{memory}</td><td class=\"text\">{error}</td></tr>",
            name = cell("name"),
            state = esc(state),
            pid = cell("pid"),
            uptime = cell("uptime_formatted"),
            restarts = cell("restarts"),
            exit = cell("last_exit_code"),
            memory = match row["memory_usage_mb"].as_f64() {
                Some(mb) => format!("{mb:.1} MB"),
                None => "–".to_owned(),
            },
            error = match &row["last_error"] {
                Value::String(text) => esc(text),
                _ => String::new(),
            },
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn render_errors(out: &mut String, h: &Value, t: &Text) {
    let _ = write!(
        out,
        "<section class=\"card\" id=\"errors\"><h2>{}</h2>",
        t.recent_errors
    );
    let rows = h["recent_errors"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if rows.is_empty() {
        let _ = write!(out, "<p class=\"muted\">{}</p></section>", t.no_errors);
        return;
    }
    let _ = write!(
        out,
        "<div class=\"scroll\"><table><thead><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th></tr></thead><tbody>",
        t.time, t.kind, t.instance, t.message
    );
    // Newest first.
    for row in rows.iter().rev() {
        let _ = write!(
            out,
            "<tr><td>{time}</td><td><code>{kind}</code></td><td>{instance}</td><td class=\"text\">{message}</td></tr>",
            time = time_cell(&row["timestamp"], t),
            kind = esc(str_of(row, "error_type")),
            instance = esc(row["instance_id"].as_str().unwrap_or("–")),
            message = esc(str_of(row, "error_message")),
        );
    }
    out.push_str("</tbody></table></div></section>");
}

fn render_config(out: &mut String, h: &Value, lifecycle: bool, t: &Text) {
    let config = &h["config"];
    let stats = &h["statistics"];
    let ok = config["last_reload_successful"].as_bool().unwrap_or(false);
    let _ = write!(
        out,
        "<section class=\"card\" id=\"config\"><h2>{title}</h2><dl class=\"pairs\">\
         <dt>{last_reload}</dt><dd><span class=\"badge {class}\" id=\"reload-state\">{state}</span></dd>\
         <dt>{loaded_at}</dt><dd>{loaded}</dd>\
         <dt>{reloads}</dt><dd>{count} / {failures}</dd>\
         <dt>{hash_word}</dt><dd><code>{hash}</code></dd>\
         <dt>{lifecycle_word}</dt><dd>{lifecycle}</dd></dl></section>",
        title = t.config,
        last_reload = t.last_reload,
        class = if ok { "up" } else { "down" },
        state = if ok { t.reload_ok } else { t.reload_failed },
        loaded_at = t.loaded_at,
        loaded = time_cell(&config["last_reload_success_time"], t),
        reloads = t.reloads,
        count = u64_of(stats, "config_reloads"),
        failures = u64_of(stats, "config_reload_failures"),
        hash_word = t.config_hash,
        hash = esc(str_of(config, "config_hash")),
        lifecycle_word = t.lifecycle,
        lifecycle = if lifecycle {
            t.enabled
        } else {
            t.lifecycle_disabled
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsers_prefer_html_and_other_clients_do_not() {
        let chrome =
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
        assert!(prefers_html(Some(chrome)));
        assert!(prefers_html(Some("text/html")));
        assert!(!prefers_html(Some("*/*")));
        assert!(!prefers_html(None));
        assert!(!prefers_html(Some("application/json")));
        assert!(!prefers_html(Some("application/json, text/html;q=0.5")));
        assert!(!prefers_html(Some("text/html;q=0")));
    }

    #[test]
    fn user_text_is_escaped() {
        assert_eq!(
            esc("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
    }

    #[test]
    fn the_body_shows_the_document_and_escapes_chat_names_and_errors() {
        let health = serde_json::json!({
            "timestamp": "2026-12-01T10:00:00.000Z",
            "health_score": 74,
            "overall_status": "warning",
            "deductions": {"listener": 0, "clients": 10, "listeners": 6, "error_rate": 10},
            "message_listener": {"running": true, "uptime_formatted": "0:01:00"},
            "api_clients": [
                {"instance_id": "wx-a", "enabled": true, "state": "up", "last_check_time": 1.8e9,
                 "error_count": 0, "last_error": null},
                {"instance_id": "wx-b", "enabled": true, "state": "down", "last_check_time": null,
                 "error_count": 3, "last_error": "connect <refused>"},
            ],
            "api_clients_summary": {"total_count": 2, "connected_count": 1},
            "listeners": [
                {"instance_id": "wx-a", "who": "测试群<b>", "active": true, "fixed": false,
                 "message_count": 2, "error_count": 0, "last_message_time": 1.8e9},
                {"instance_id": "wx-a", "who": "old", "active": false, "fixed": false,
                 "message_count": 0, "error_count": 0, "last_message_time": null},
            ],
            "listeners_summary": {"total_count": 2, "active_count": 1},
            "statistics": {"recent_errors_count": 3, "config_reloads": 1, "config_reload_failures": 0},
            "recent_errors": [{"timestamp": "2026-12-01T09:59:00.000Z", "error_type": "client.connect",
                               "instance_id": "wx-b", "error_message": "<img src=x>"}],
            "config": {"last_reload_successful": true, "last_reload_success_time": 1.8e9,
                       "config_hash": "00000000000000ff"},
        });
        let model = Model {
            health,
            delivery: Some(StoreCounts {
                pending: 2,
                failed: 1,
                delivered: 9,
                dead: 4,
            }),
            processes: Some(serde_json::json!([
                {"name": "wxauto", "state": "running", "pid": 42, "restarts": 1,
                 "uptime_formatted": "0:05:00", "memory_usage_mb": 12.345, "last_error": null},
                {"name": "bot<1>", "state": "fatal", "pid": null, "last_error": "exit <3>"},
            ])),
            lifecycle: false,
        };
        let body = render_body(&model, Lang::Zh);
        for expected in [
            "id=\"score\" title=\"健康分\">74</div>",
            "data-status=\"warning\">警告</span>",
            "<li class=\"lost\" data-deduction=\"clients\">",
            "<b>−10</b>",
            "data-state=\"up\">在线</span>",
            "data-state=\"down\">离线</span>",
            "<td class=\"num\">1 / 1</td>",
            "测试群&lt;b&gt;",
            "connect &lt;refused&gt;",
            "&lt;img src=x&gt;",
            "<dd id=\"delivery-pending\">3</dd>",
            "<dd id=\"delivery-dead\">4</dd>",
            "<tr data-process=\"wxauto\"><td><b>wxauto</b></td>",
            "data-state=\"running\">running</span>",
            "<td class=\"num\">12.3 MB</td>",
            "<tr data-process=\"bot&lt;1&gt;\">",
            "<span class=\"badge down\" data-state=\"fatal\">",
            "exit &lt;3&gt;",
            "href=\"?lang=en\"",
            "未启用",
        ] {
            assert!(body.contains(expected), "missing {expected:?} in {body}");
        }
        assert!(!body.contains("<img"), "unescaped user text");
        let english = render_body(&model, Lang::En);
        assert!(english.contains("data-status=\"warning\">Warning</span>"));
        assert!(english.contains("href=\"?lang=zh\""));
        assert!(page(Lang::En, &english).starts_with("<!doctype html>"));
    }
}
