//! The renderers of the status page body: one function per section, and the HTML escaping
//! and cell helpers they share.

use std::fmt::Write as _;

use serde_json::Value;

use super::Model;
use super::text::{Lang, Text};
use crate::delivery::StoreCounts;

/// Escapes text for HTML element content and quoted attribute values.
pub(super) fn esc(text: &str) -> String {
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
pub(super) fn render_body(model: &Model, lang: Lang) -> String {
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
    // Disabled instances are not polled: the document names them beside the rows.
    let disabled = h["api_clients_summary"]["disabled_instances"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if rows.is_empty() && disabled.is_empty() {
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
        let state = str_of(row, "state");
        let word = state_word(state, t);
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
    for id in disabled.iter().filter_map(Value::as_str) {
        let _ = write!(
            out,
            "<tr data-instance=\"{id}\"><td><b>{id}</b></td>\
             <td><span class=\"badge disabled\" data-state=\"disabled\">{word}</span></td>\
             <td>–</td><td class=\"num\">–</td><td class=\"num\">–</td><td class=\"text\"></td></tr>",
            id = esc(id),
            word = t.disabled,
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
