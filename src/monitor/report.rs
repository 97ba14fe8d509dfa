//! The monitor API's JSON documents (`data` of each endpoint), built from one `Snapshot`.
//!
//! Field names are the seed's (docs/reference.md, "JSON answers"); the periodic report file is the health document.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{ErrorRecord, Snapshot};
use crate::clock::{format_uptime, rfc3339_of_seconds};
use crate::metrics::process::ProcessSample;

const MB: f64 = 1024.0 * 1024.0;

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// `GET /api/v1/status`.
pub fn status(snap: &Snapshot, process: &ProcessSample) -> Value {
    json!({
        "service_name": crate::event::SERVICE_NAME,
        "running": snap.running,
        "status": if snap.running { "running" } else { "stopped" },
        "uptime_seconds": round2(snap.uptime_seconds),
        "uptime_formatted": format_uptime(snap.uptime_seconds),
        "task_count": snap.tasks,
        "error_count": snap.window_listener_errors,
        "last_error_time": snap.last_error.as_ref().map(|error| error.time),
        "last_error_message": snap.last_error.as_ref().map(|error| error.error_message.clone()),
        "memory_usage_mb": round2(process.resident_bytes as f64 / MB),
        "cpu_percent": round2(process.cpu_percent),
        "start_time": snap.listener_start_time.map(rfc3339_of_seconds),
        "start_time_seconds": snap.listener_start_time,
    })
}

/// `GET /api/v1/clients` rows: the enabled instances, the ones the health score counts. A
/// disabled instance is not polled, so it has no connectivity to show; `client_summary` names it.
pub fn clients(snap: &Snapshot) -> Vec<Value> {
    snap.instances
        .values()
        .filter(|state| state.enabled)
        .map(|state| {
            json!({
                "instance_id": state.instance_id,
                "enabled": state.enabled,
                "initialized": state.initialized,
                "connected": state.connected,
                "state": state.state,
                "last_check_time": state.last_check_time,
                "error_count": state.error_count,
                "last_error": state.last_error,
                "active_listeners": state.active_chats(),
            })
        })
        .collect()
}

/// The fields beside the `clients` rows: `total_count` and `connected_count` count those rows,
/// and `disabled_instances` names the configured instances left out of them.
pub fn client_summary(snap: &Snapshot, rows: &[Value]) -> Vec<(&'static str, Value)> {
    let connected = rows
        .iter()
        .filter(|row| row["connected"] == Value::Bool(true))
        .count();
    let disabled: Vec<&str> = snap
        .instances
        .values()
        .filter(|state| !state.enabled)
        .map(|state| state.instance_id.as_str())
        .collect();
    vec![
        ("total_count", json!(rows.len())),
        ("connected_count", json!(connected)),
        ("disabled_instances", json!(disabled)),
    ]
}

/// Messages the store holds per `(instance_id, chat)`.
pub type ChatCounts = HashMap<(String, String), u64>;

/// `GET /api/v1/listeners` rows. `message_count` comes from `counts` when the store knows the
/// chat, else from the listener's own count.
pub fn listeners(snap: &Snapshot, counts: &ChatCounts) -> Vec<Value> {
    let mut rows = Vec::new();
    for state in snap.instances.values().filter(|state| state.enabled) {
        for (who, chat) in &state.chats {
            rows.push(json!({
                "instance_id": state.instance_id,
                "who": who,
                "active": chat.active,
                "fixed": chat.fixed,
                "last_message_time": chat.last_message_time,
                "last_check_time": chat.last_check_time,
                "message_count": counts
                    .get(&(state.instance_id.clone(), who.clone()))
                    .copied()
                    .unwrap_or(chat.message_count),
                "error_count": chat.error_count,
            }));
        }
    }
    rows
}

/// How many listener rows are active.
pub fn active_count(rows: &[Value]) -> usize {
    rows.iter()
        .filter(|row| row["active"] == Value::Bool(true))
        .count()
}

/// `GET /api/v1/statistics`.
pub fn statistics(snap: &Snapshot, api_calls_made: u64) -> Value {
    json!({
        "total_messages_processed": snap.totals.messages_processed,
        "total_errors": snap.total_errors,
        "api_calls_made": api_calls_made,
        "listeners_added": snap.totals.listeners_added,
        "listeners_removed": snap.totals.listeners_removed,
        "config_reloads": snap.reload.reloads,
        "config_reload_failures": snap.reload.failures,
        "uptime_seconds": round2(snap.uptime_seconds),
        "uptime_formatted": format_uptime(snap.uptime_seconds),
        "start_time": snap.listener_start_time.map(rfc3339_of_seconds),
        "start_time_seconds": snap.listener_start_time,
        "current_time": rfc3339_of_seconds(snap.now),
        "error_rate": snap.error_ratio,
        "recent_errors_count": snap.window_errors,
        "window_messages": snap.window_messages,
    })
}

/// `GET /api/v1/errors` rows.
pub fn errors(records: &[ErrorRecord]) -> Vec<Value> {
    records
        .iter()
        .map(|record| serde_json::to_value(record).unwrap_or(Value::Null))
        .collect()
}

/// `GET /api/v1/health` and the report file.
pub fn health(
    snap: &Snapshot,
    process: &ProcessSample,
    api_calls_made: u64,
    recent: &[ErrorRecord],
    counts: &ChatCounts,
) -> Value {
    let mut listener = status(snap, process);
    listener["status"] = json!(if snap.running { "running" } else { "stopped" });
    let clients = clients(snap);
    let clients_summary: serde_json::Map<String, Value> = client_summary(snap, &clients)
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
    let listeners = listeners(snap, counts);
    let active = active_count(&listeners);
    json!({
        "timestamp": rfc3339_of_seconds(snap.now),
        "health_score": snap.health.score,
        "overall_status": snap.health.status,
        "deductions": snap.health.deductions,
        "message_listener": listener,
        "api_clients": clients,
        "api_clients_summary": clients_summary,
        "listeners": listeners,
        "listeners_summary": {"total_count": listeners.len(), "active_count": active},
        "statistics": statistics(snap, api_calls_made),
        "recent_errors": errors(recent),
        "config": {
            "last_reload_successful": snap.reload.last_reload_successful,
            "last_reload_success_time": snap.reload.last_success_time,
            "config_hash": format!("{:016x}", snap.reload.config_hash),
        },
    })
}

/// The components that lost points, for the periodic log line: e.g. `clients -6, listeners -4`.
pub fn lost_points(snap: &Snapshot) -> String {
    let d = snap.health.deductions;
    let parts: Vec<String> = [
        ("listener", d.listener),
        ("clients", d.clients),
        ("listeners", d.listeners),
        ("error_rate", d.error_rate),
    ]
    .iter()
    .filter(|(_, points)| *points > 0)
    .map(|(name, points)| format!("{name} -{points}"))
    .collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}
