//! `wxauto-sidecar dead list|retry|purge`: the dead-letter tools, talking to a running
//! sidecar's `/api/v1/messages/dead` endpoints (retry and purge need lifecycle enabled).

use serde_json::{Value, json};

use crate::cli::{HttpAccess, Output};

/// What to do with the dead letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadAction {
    /// Print them.
    List,
    /// Queue them for another delivery.
    Retry,
    /// Delete them.
    Purge,
}

/// Runs one action against the sidecar at `url` (through its web config, if any, with
/// `access`); `ids` selects rows (empty: all). Returns the exit code: 0 done (also when stdout
/// was closed early, `dead list | head`), 2 the sidecar is unreachable or refused, or stdout
/// failed.
pub async fn run(
    url: &str,
    access: &HttpAccess,
    action: DeadAction,
    ids: &[i64],
    limit: usize,
) -> i32 {
    let base = format!("{}/api/v1/messages/dead", url.trim_end_matches('/'));
    let (client, password) = match access.client() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("wxauto-sidecar: {error}");
            return 2;
        }
    };
    let request = match action {
        DeadAction::List => client.get(format!("{base}?limit={limit}")),
        DeadAction::Retry | DeadAction::Purge => {
            let path = if action == DeadAction::Retry {
                "retry"
            } else {
                "purge"
            };
            // No body selects every dead letter.
            let body = if ids.is_empty() {
                String::new()
            } else {
                json!({ "ids": ids }).to_string()
            };
            client
                .post(format!("{base}/{path}"))
                .header("content-type", "application/json")
                .body(body)
        }
    };
    let request = access.authorize(request, password.as_ref());
    let (status, body) = match request.send().await {
        Ok(response) => {
            let status = response.status();
            match response.json::<Value>().await {
                Ok(body) => (status, body),
                Err(error) => {
                    eprintln!(
                        "wxauto-sidecar: {base} did not answer with JSON ({status}): {error}"
                    );
                    return 2;
                }
            }
        }
        Err(error) => {
            eprintln!("wxauto-sidecar: {base} is unreachable: {error}");
            return 2;
        }
    };
    if !status.is_success() || body["success"] != json!(true) {
        let error = body["error"].as_str().unwrap_or("no error text");
        eprintln!("wxauto-sidecar: the sidecar refused ({status}): {error}");
        return 2;
    }
    let data = &body["data"];
    let mut out = Output::default();
    match action {
        DeadAction::List => print_list(&mut out, data, &body),
        DeadAction::Retry => out.line(format_args!(
            "{} dead letter(s) queued for another delivery",
            data["retried"]
        )),
        DeadAction::Purge => out.line(format_args!("{} dead letter(s) purged", data["purged"])),
    }
    i32::from(out.finish(0))
}

fn print_list(out: &mut Output, data: &Value, body: &Value) {
    let letters = data.as_array().map(Vec::as_slice).unwrap_or_default();
    out.line(format_args!(
        "{} dead letter(s) shown of {}",
        letters.len(),
        body["total_count"].as_u64().unwrap_or(letters.len() as u64)
    ));
    if letters.is_empty() {
        return;
    }
    out.line("ID\tINSTANCE\tCHAT\tPLATFORM\tATTEMPTS\tDEAD AT\tLAST ERROR");
    for letter in letters {
        let attempts = if letter["reply_pending"] == json!(true) {
            format!("reply {}", letter["reply_attempts"])
        } else {
            letter["attempts"].to_string()
        };
        out.line(format_args!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}",
            letter["id"],
            text(&letter["instance_id"]),
            text(&letter["chat"]),
            text(&letter["platform"]),
            attempts,
            text(&letter["dead_at"]),
            text(&letter["last_error"]),
        ));
    }
}

/// A string field as is; anything else (null) as `-`. Tabs and newlines would break columns.
fn text(value: &Value) -> String {
    value
        .as_str()
        .map_or_else(|| "-".to_owned(), |text| text.replace(['\t', '\n'], " "))
}
