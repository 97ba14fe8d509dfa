//! `platforms:`: one block per WXAUTO-MGT platform (Dify, OpenAI, Coze, keyword), with its
//! secret as an `api_key_env` name and a note for everything that does not carry over.

use std::collections::HashSet;

use serde_json::Value;

use super::Builder;
use super::values::{
    comment, env_part, flag, http_url, number, quote, strings, strip_credentials, text, whole,
};
use crate::import_mgt::read::MgtPlatform;
use crate::secret::Secret;

/// WXAUTO-MGT's own defaults, used when its config leaves a value out.
const MGT_OPENAI_API_BASE: &str = "https://api.openai.com/v1";
const MGT_OPENAI_MODEL: &str = "gpt-3.5-turbo";
const MGT_OPENAI_TEMPERATURE: f64 = 0.7;
const MGT_OPENAI_SYSTEM_PROMPT: &str = "你是一个有用的助手。";
const MGT_OPENAI_MAX_TOKENS: i64 = 1000;
const MGT_DIFY_USER_ID: &str = "default_user";
/// WXAUTO-MGT gave a delivery 30 s; a platform request must stay below the sidecar's
/// default `delivery.attempt_timeout` of 30 s.
const NETWORK_TIMEOUT: &str = "25s";

/// `platforms:`; returns the ids written.
pub(super) fn platforms(b: &mut Builder, platforms: &[MgtPlatform]) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut blocks = Vec::new();
    for platform in platforms {
        let id = platform.platform_id.trim().to_owned();
        let label = format!("platform {id:?}");
        if id.is_empty() {
            b.note("skipped a platform with an empty platform_id".to_owned());
            continue;
        }
        if !platform.enabled {
            b.note(format!("skipped {label}: disabled in WXAUTO-MGT"));
            continue;
        }
        if ids.contains(&id) {
            b.note(format!("skipped {label}: the id appears twice"));
            continue;
        }
        let lines = match platform.kind.trim() {
            "dify" => dify(b, platform, &id, &label),
            "openai" => openai(b, platform, &id, &label),
            "coze" => coze(b, platform, &id, &label),
            "keyword" | "keyword_match" => Some(keyword(b, platform, &label)),
            "zhiweijz" => {
                b.note(format!(
                    "skipped {label}: type \"zhiweijz\" (bookkeeping) has no sidecar \
                     equivalent; a webhook platform to a small adapter can replace it"
                ));
                None
            }
            other => {
                b.note(format!(
                    "skipped {label}: type {other:?} has no sidecar equivalent"
                ));
                None
            }
        };
        let Some(lines) = lines else {
            continue;
        };
        let mut block = Vec::new();
        let name = if platform.name.trim().is_empty() {
            String::new()
        } else {
            format!("{}, ", comment(&platform.name))
        };
        block.push(format!(
            "  # {name}WXAUTO-MGT type {}",
            comment(platform.kind.trim())
        ));
        block.push(format!("  - id: {}", quote(&id)));
        block.extend(lines);
        if let Some(mode) = send_mode(b, &platform.config, &label) {
            block.push(format!("    message_send_mode: {mode}"));
        }
        blocks.push(block);
        ids.insert(id);
    }
    if blocks.is_empty() {
        return ids;
    }
    b.line("");
    b.line("platforms:");
    b.counts.platforms = blocks.len();
    for line in blocks.into_iter().flatten() {
        b.line(&line);
    }
    ids
}

fn send_mode(b: &mut Builder, config: &Value, label: &str) -> Option<&'static str> {
    match text(config, "message_send_mode").as_deref() {
        None | Some("normal") => None,
        Some("typing") => Some("typing"),
        Some(other) => {
            b.note(format!(
                "{label}: message_send_mode {other:?} is unknown; the default (normal) is used"
            ));
            None
        }
    }
}

fn dify(b: &mut Builder, platform: &MgtPlatform, id: &str, label: &str) -> Option<Vec<String>> {
    let config = &platform.config;
    let Some(api_base) = text(config, "api_base").and_then(|url| http_url(&url)) else {
        b.note(format!(
            "skipped {label}: Dify needs an http(s) api_base, and its config has none"
        ));
        return None;
    };
    let api_base = strip_credentials(b, &api_base, label);
    let variable = platform_secret(b, platform, id, label);
    if text(config, "conversation_id").is_some() {
        b.note(format!(
            "{label}: the fixed conversation_id is not imported; the sidecar keeps one \
             conversation per chat"
        ));
    }
    let user_id = text(config, "user_id").unwrap_or_else(|| MGT_DIFY_USER_ID.to_owned());
    Some(vec![
        "    type: dify".to_owned(),
        format!("    api_base: {}", quote(&api_base)),
        format!("    api_key_env: {variable}"),
        format!("    user_id: {}", quote(&user_id)),
        format!(
            "    timeout: {NETWORK_TIMEOUT}                  # WXAUTO-MGT allowed 30 s per delivery"
        ),
    ])
}

fn openai(b: &mut Builder, platform: &MgtPlatform, id: &str, label: &str) -> Option<Vec<String>> {
    let config = &platform.config;
    let api_base = match text(config, "api_base") {
        None => MGT_OPENAI_API_BASE.to_owned(),
        Some(url) => {
            let Some(url) = http_url(&url) else {
                b.note(format!(
                    "skipped {label}: its api_base is not an http(s) URL"
                ));
                return None;
            };
            strip_credentials(b, &url, label)
        }
    };
    let variable = platform_secret(b, platform, id, label);
    let model = text(config, "model").unwrap_or_else(|| MGT_OPENAI_MODEL.to_owned());
    let mut lines = vec![
        "    type: openai".to_owned(),
        format!("    api_base: {}", quote(&api_base)),
        format!("    api_key_env: {variable}"),
        format!("    model: {}", quote(&model)),
    ];
    let prompt = match config.get("system_prompt") {
        Some(Value::String(prompt)) => prompt.clone(),
        _ => MGT_OPENAI_SYSTEM_PROMPT.to_owned(),
    };
    lines.push(format!("    system_prompt: {}", quote(&prompt)));
    let temperature = number(config, "temperature").unwrap_or(MGT_OPENAI_TEMPERATURE);
    if (0.0..=2.0).contains(&temperature) {
        lines.push(format!("    temperature: {temperature}"));
    } else {
        b.note(format!(
            "{label}: temperature {temperature} is outside 0 to 2 and was left out"
        ));
    }
    let max_tokens = number(config, "max_tokens")
        .and_then(whole)
        .unwrap_or(MGT_OPENAI_MAX_TOKENS);
    if max_tokens >= 1 {
        lines.push(format!("    max_tokens: {max_tokens}"));
    }
    lines.push(format!(
        "    timeout: {NETWORK_TIMEOUT}                  # WXAUTO-MGT allowed 30 s per delivery"
    ));
    Some(lines)
}

fn coze(b: &mut Builder, platform: &MgtPlatform, id: &str, label: &str) -> Option<Vec<String>> {
    let config = &platform.config;
    let Some(bot_id) = text(config, "bot_id") else {
        b.note(format!(
            "skipped {label}: Coze needs a bot_id, and its config has none"
        ));
        return None;
    };
    let variable = platform_secret(b, platform, id, label);
    let mut lines = vec![
        "    type: coze                    # WXAUTO-MGT always used https://api.coze.cn".to_owned(),
        format!("    api_key_env: {variable}"),
        format!("    bot_id: {}", quote(&bot_id)),
    ];
    if let Some(workspace) = text(config, "workspace_id") {
        lines.push(format!("    workspace_id: {}", quote(&workspace)));
    }
    if flag(config, "continuous_conversation") {
        lines.push("    continuous_conversation: true".to_owned());
    }
    lines.push(format!(
        "    timeout: {NETWORK_TIMEOUT}                  # per request; polling stops at delivery.attempt_timeout"
    ));
    Some(lines)
}

fn keyword(b: &mut Builder, platform: &MgtPlatform, label: &str) -> Vec<String> {
    let mut lines = vec!["    type: keyword".to_owned()];
    let entries = platform
        .config
        .get("rules")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut written = Vec::new();
    let mut delays = false;
    for (n, entry) in entries.iter().enumerate() {
        let keywords = strings(entry.get("keywords"));
        let replies = strings(entry.get("replies"));
        if keywords.is_empty() || replies.is_empty() {
            b.note(format!(
                "{label}: keyword rule {} has no keyword or no reply and was left out",
                n + 1
            ));
            continue;
        }
        let match_type = match text(entry, "match_type").as_deref() {
            None | Some("contains") => "contains",
            Some("exact") => "exact",
            Some("fuzzy") => {
                b.note(format!(
                    "{label}: keyword rule {} used fuzzy matching, which the sidecar does not \
                     have; it matches with contains",
                    n + 1
                ));
                "contains"
            }
            Some(other) => {
                b.note(format!(
                    "{label}: keyword rule {} has match_type {other:?}; it matches with contains",
                    n + 1
                ));
                "contains"
            }
        };
        if number(entry, "min_reply_time").is_some_and(|x| x > 0.0)
            || number(entry, "max_reply_time").is_some_and(|x| x > 0.0)
        {
            delays = true;
        }
        let list = |items: &[String]| {
            items
                .iter()
                .map(|item| quote(item))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut entry_lines = vec![
            format!("      - keywords: [{}]", list(&keywords)),
            format!("        match_type: {match_type}"),
            format!("        replies: [{}]", list(&replies)),
        ];
        if flag(entry, "is_random_reply") && replies.len() > 1 {
            entry_lines.push("        random: true".to_owned());
        }
        written.push(entry_lines);
    }
    if delays {
        b.note(format!(
            "{label}: the reply delays (min_reply_time, max_reply_time) are not imported: the \
             sidecar answers keywords at once"
        ));
    }
    if written.is_empty() {
        lines.push("    keywords: []".to_owned());
    } else {
        lines.push("    keywords:".to_owned());
        lines.extend(written.into_iter().flatten());
    }
    lines
}

/// The platform's `api_key` as a named secret.
fn platform_secret(b: &mut Builder, platform: &MgtPlatform, id: &str, label: &str) -> String {
    let variable = b
        .env_names
        .take(&format!("PLATFORM_API_KEY_{}", env_part(id)));
    let key = text(&platform.config, "api_key").unwrap_or_default();
    b.secret(&variable, &Secret::new(key), label);
    variable
}
