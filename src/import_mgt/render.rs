//! Maps a WXAUTO-MGT database onto a commented sidecar config: every secret becomes an
//! `api_key_env` name, and everything that cannot be carried over becomes a note.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use serde_json::Value;

use super::read::{MgtDb, MgtInstance, MgtPlatform, MgtRule};
use crate::secret::Secret;

/// WXAUTO-MGT's own defaults, used when its config leaves a value out.
const MGT_OPENAI_API_BASE: &str = "https://api.openai.com/v1";
const MGT_OPENAI_MODEL: &str = "gpt-3.5-turbo";
const MGT_OPENAI_TEMPERATURE: f64 = 0.7;
const MGT_OPENAI_SYSTEM_PROMPT: &str = "你是一个有用的助手。";
const MGT_OPENAI_MAX_TOKENS: i64 = 1000;
const MGT_DIFY_USER_ID: &str = "default_user";
/// WXAUTO-MGT never polled faster than this.
const MGT_MIN_POLL_SECONDS: u64 = 5;
/// WXAUTO-MGT gave a delivery 30 s; a platform request must stay below the sidecar's
/// default `delivery.attempt_timeout` of 30 s.
const NETWORK_TIMEOUT: &str = "25s";
/// The sidecar accepts shorter keys from no source.
const MIN_KEY_CHARS: usize = 4;

/// The result of mapping: the YAML, the secrets it names, and the report.
#[derive(Debug)]
pub(super) struct Plan {
    pub yaml: String,
    /// `(variable, value)` in file order; values never leave as text except into the secrets
    /// file.
    pub secrets: Vec<(String, Secret)>,
    /// Variables the YAML names that have no usable value in the database.
    pub unset: Vec<String>,
    /// Report lines: what was skipped or could not be mapped, without secrets.
    pub notes: Vec<String>,
    pub counts: Counts,
}

/// How many of each were written to the YAML.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub instances: usize,
    pub platforms: usize,
    pub rules: usize,
    pub fixed_listeners: usize,
}

/// Unique environment variable names.
#[derive(Default)]
struct EnvNames(HashSet<String>);

struct Builder {
    out: String,
    secrets: Vec<(String, Secret)>,
    unset: Vec<String>,
    notes: Vec<String>,
    counts: Counts,
    env_names: EnvNames,
}

// === mapping ===

/// Maps `db` (read from `source`, the path shown in the header) onto a sidecar config.
pub(super) fn plan(db: &MgtDb, source: &str) -> Plan {
    let mut b = Builder {
        out: String::new(),
        secrets: Vec::new(),
        unset: Vec::new(),
        notes: Vec::new(),
        counts: Counts::default(),
        env_names: EnvNames::default(),
    };
    for table in &db.missing_tables {
        b.note(format!(
            "table {table} is not in the database; nothing imported from it"
        ));
    }
    header(&mut b, source);
    listener(&mut b, &db.instances);
    let instance_ids = instances(&mut b, &db.instances);
    fixed_listeners(&mut b, db);
    let platform_ids = platforms(&mut b, &db.platforms);
    rules(&mut b, &db.rules, &instance_ids, &platform_ids);
    if db.manual_listeners > 0 {
        b.note(format!(
            "{} manually added listener(s) in table listeners are not imported: the sidecar adds \
             chats as messages arrive; list a chat under fixed_listeners to keep it always listened",
            db.manual_listeners
        ));
    }
    if !b.notes.is_empty() {
        b.line("");
        b.line("# Not imported or changed on the way (import-mgt printed the same list):");
        let notes: Vec<String> = b.notes.iter().map(|note| comment(note)).collect();
        for note in notes {
            b.line(&format!("#   - {note}"));
        }
    }
    Plan {
        yaml: b.out,
        secrets: b.secrets,
        unset: b.unset,
        notes: b.notes,
        counts: b.counts,
    }
}

fn header(b: &mut Builder, source: &str) {
    b.line(&format!(
        "# wxauto-sidecar configuration imported from the WXAUTO-MGT database {}",
        comment(source)
    ));
    b.line(
        "# by `wxauto-sidecar import-mgt`. No secret is in this file: every key is read from the",
    );
    b.line(
        "# environment variable its api_key_env names (import-mgt --secrets-file writes them as",
    );
    b.line("# NAME=value lines). Check the result with:");
    b.line("#   wxauto-sidecar check-config --config <this file>");
    b.line("# Durations are humantime strings (500ms, 5s, 30m). Unknown keys are errors.");
}

/// `listener:` from the instances' JSON config. The sidecar has one listener section for all
/// instances (WXAUTO-MGT, too, applied the last instance's poll interval to all of them).
fn listener(b: &mut Builder, instances: &[MgtInstance]) {
    let enabled: Vec<&MgtInstance> = instances.iter().filter(|i| i.enabled).collect();
    let from: Vec<&MgtInstance> = if enabled.is_empty() {
        instances.iter().collect()
    } else {
        enabled
    };
    let setting = |key: &str| -> Vec<u64> {
        let mut values: Vec<u64> = from
            .iter()
            .filter_map(|i| whole_seconds(i.config.get(key)?))
            .filter(|n| *n > 0)
            .collect();
        values.sort_unstable();
        values.dedup();
        values
    };
    let poll = setting("poll_interval");
    let idle = setting("timeout_minutes");
    let request = setting("timeout");
    let retry = from
        .iter()
        .any(|i| i.config.get("retry_limit").is_some_and(|v| !v.is_null()));
    if retry {
        b.note(
            "instances' retry_limit is not mapped: the sidecar retries a down instance without \
             a limit, with the backoff of listener.backoff"
                .to_owned(),
        );
    }
    if poll.is_empty() && idle.is_empty() && request.is_empty() {
        return;
    }
    b.line("");
    b.line("listener:");
    b.line("  # From the instances' WXAUTO-MGT settings; one value applies to every instance.");
    if let (Some(&min), Some(&max)) = (poll.first(), poll.last()) {
        let seconds = min.max(MGT_MIN_POLL_SECONDS);
        if min != max {
            b.note(format!(
                "instances poll every {min}-{max} s in WXAUTO-MGT; listener.poll_interval is \
                 {seconds}s for all of them"
            ));
        }
        b.line(&aligned(
            &format!("  poll_interval: {seconds}s"),
            "WXAUTO-MGT never polled faster than every 5 s",
        ));
    }
    if let (Some(_), Some(&max)) = (idle.first(), idle.last()) {
        if idle.len() > 1 {
            b.note(format!(
                "instances time idle chats out after different times; listener.listener_timeout \
                 is the longest, {max}m"
            ));
        }
        b.line(&aligned(
            &format!("  listener_timeout: {max}m"),
            "timeout_minutes: an idle chat is removed after this",
        ));
    }
    if let (Some(_), Some(&max)) = (request.first(), request.last()) {
        if request.len() > 1 {
            b.note(format!(
                "instances have different request timeouts; listener.request_timeout is the \
                 longest, {max}s"
            ));
        }
        b.line(&aligned(
            &format!("  request_timeout: {max}s"),
            "timeout: every call to a wxauto instance",
        ));
    }
}

/// `instances:`; returns WXAUTO-MGT id → sidecar id for the instances written.
fn instances(b: &mut Builder, instances: &[MgtInstance]) -> HashMap<String, String> {
    let mut ids = HashMap::new();
    let mut taken = HashSet::new();
    b.line("");
    if instances.is_empty() {
        b.line("instances: []");
        return ids;
    }
    let mut written = 0;
    let mut body = Vec::new();
    for (n, instance) in instances.iter().enumerate() {
        let label = format!("instance {:?}", instance.instance_id);
        let Some(base_url) = http_url(&instance.base_url) else {
            b.note(format!(
                "skipped {label}: its base_url is not an http(s) URL"
            ));
            continue;
        };
        let base_url = strip_credentials(b, &base_url, &label);
        let id = unique(sidecar_id(&instance.instance_id, n + 1), &mut taken);
        if id != instance.instance_id {
            b.note(format!(
                "{label} is called {id:?} here (ids use 1 to 64 of A-Z a-z 0-9 _ . -); rules \
                 follow the rename"
            ));
        }
        let variable = b
            .env_names
            .take(&format!("WXAUTO_API_KEY_{}", env_part(&id)));
        b.secret(&variable, &instance.api_key, &label);
        let mut lines = Vec::new();
        let name = if instance.name.trim().is_empty() {
            String::new()
        } else {
            format!("{}, ", comment(&instance.name))
        };
        lines.push(format!(
            "  # {name}WXAUTO-MGT instance {}",
            comment(&instance.instance_id)
        ));
        lines.push(format!("  - id: {}", quote(&id)));
        lines.push(format!("    base_url: {}", quote(&base_url)));
        lines.push(format!("    api_key_env: {variable}"));
        if !instance.enabled {
            lines.push("    enabled: false                # disabled in WXAUTO-MGT".to_owned());
        }
        body.push(lines);
        ids.insert(instance.instance_id.clone(), id);
        written += 1;
    }
    if written == 0 {
        b.line("instances: []");
    } else {
        b.line("instances:");
        for line in body.into_iter().flatten() {
            b.line(&line);
        }
    }
    b.counts.instances = written;
    ids
}

fn fixed_listeners(b: &mut Builder, db: &MgtDb) {
    let mut lines = Vec::new();
    for fixed in &db.fixed_listeners {
        let chat = fixed.session_name.trim();
        if chat.is_empty() {
            b.note("skipped a fixed listener with an empty session_name".to_owned());
            continue;
        }
        if !fixed.enabled {
            b.note(format!(
                "skipped fixed listener {chat:?}: disabled in WXAUTO-MGT"
            ));
            continue;
        }
        let description = fixed.description.trim();
        if description.is_empty() {
            lines.push(format!("  - chat: {}", quote(chat)));
        } else {
            lines.push(format!(
                "  - chat: {}   # {}",
                quote(chat),
                comment(description)
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    b.line("");
    b.line("fixed_listeners:                  # on every instance, as in WXAUTO-MGT");
    b.counts.fixed_listeners = lines.len();
    for line in lines {
        b.line(&line);
    }
}

/// `platforms:`; returns the ids written.
fn platforms(b: &mut Builder, platforms: &[MgtPlatform]) -> HashSet<String> {
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

fn rules(
    b: &mut Builder,
    rules: &[MgtRule],
    instances: &HashMap<String, String>,
    platforms: &HashSet<String>,
) {
    let mut blocks = Vec::new();
    let mut taken = HashSet::new();
    for (n, rule) in rules.iter().enumerate() {
        let source_id = rule.rule_id.trim();
        let label = format!("rule {source_id:?}");
        if !rule.enabled {
            b.note(format!("skipped {label}: disabled in WXAUTO-MGT"));
            continue;
        }
        let instance = match rule.instance_id.trim() {
            "*" | "" => "*".to_owned(),
            id => match instances.get(id) {
                Some(id) => id.clone(),
                None => {
                    b.note(format!(
                        "skipped {label}: its instance {id:?} was not imported"
                    ));
                    continue;
                }
            },
        };
        let platform = rule.platform_id.trim();
        if !platforms.contains(platform) {
            b.note(format!(
                "skipped {label}: its platform {platform:?} was not imported"
            ));
            continue;
        }
        let Some((chat, chat_comment)) = chat_pattern(b, &rule.chat_pattern, &label) else {
            continue;
        };
        let at_names: Vec<String> = rule
            .at_name
            .split([',', '，'])
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| name.trim_start_matches('@').to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        if rule.only_at && at_names.is_empty() {
            b.note(format!(
                "skipped {label}: it answers only @-mentions but names no one to mention (at_name \
                 is empty)"
            ));
            continue;
        }
        let fallback = format!("rule-{}", n + 1);
        let id = unique(
            if source_id.is_empty() {
                fallback
            } else {
                source_id.to_owned()
            },
            &mut taken,
        );
        let mut block = Vec::new();
        if !rule.name.trim().is_empty() {
            block.push(format!("  # {}", comment(&rule.name)));
        }
        block.push(format!("  - id: {}", quote(&id)));
        block.push(format!("    instance: {}", quote(&instance)));
        match chat_comment {
            Some(note) => block.push(format!("    chat: {}   # {note}", quote(&chat))),
            None => block.push(format!("    chat: {}", quote(&chat))),
        }
        block.push(format!("    platform: {}", quote(platform)));
        block.push(format!("    priority: {}", rule.priority));
        if rule.only_at {
            block.push("    only_at: true".to_owned());
            let names: Vec<String> = at_names.iter().map(|name| quote(name)).collect();
            block.push(format!("    at_names: [{}]", names.join(", ")));
        }
        if rule.reply_at_sender {
            block.push("    reply_at_sender: true".to_owned());
        }
        blocks.push(block);
    }
    if blocks.is_empty() {
        return;
    }
    b.line("");
    b.line("# Rules are tried by priority (higher first), then the more specific chat pattern, then id.");
    b.line("rules:");
    b.counts.rules = blocks.len();
    for line in blocks.into_iter().flatten() {
        b.line(&line);
    }
}

/// The sidecar's chat pattern for WXAUTO-MGT's, with an optional comment.
fn chat_pattern(b: &mut Builder, pattern: &str, label: &str) -> Option<(String, Option<String>)> {
    let pattern = pattern.trim();
    if pattern.is_empty() {
        b.note(format!("skipped {label}: its chat pattern is empty"));
        return None;
    }
    let Some(regex) = pattern.strip_prefix("regex:") else {
        return Some((pattern.to_owned(), None));
    };
    if regex.is_empty() {
        b.note(format!("skipped {label}: its regex is empty"));
        return None;
    }
    // WXAUTO-MGT matched with Python's re.match (anchored at the start only); the sidecar
    // anchors both ends, so a trailing `.*` keeps the old meaning.
    let translated = format!("(?:{regex}).*");
    if regex::Regex::new(&format!("^(?:{translated})$")).is_err() {
        b.note(format!(
            "skipped {label}: its regex uses syntax the sidecar's regex engine does not support \
             (look-around or backreferences)"
        ));
        return None;
    }
    Some((
        format!("regex:{translated}"),
        Some("WXAUTO-MGT matched the start only; `.*` keeps that".to_owned()),
    ))
}

// === impl Builder ===

impl Builder {
    fn line(&mut self, line: &str) {
        self.out.push_str(line.trim_end());
        self.out.push('\n');
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Records `value` under `variable`, or notes why it cannot be used.
    fn secret(&mut self, variable: &str, value: &Secret, label: &str) {
        let key = value.expose();
        if key.trim().is_empty() {
            self.note(format!(
                "{label} has no API key in WXAUTO-MGT; set {variable} yourself"
            ));
            self.unset.push(variable.to_owned());
        } else if key.chars().count() < MIN_KEY_CHARS {
            self.note(format!(
                "{label}: its API key is shorter than {MIN_KEY_CHARS} characters, which the \
                 sidecar refuses; set {variable} to a real key"
            ));
            self.unset.push(variable.to_owned());
        } else if key.contains(['\n', '\r', '\0']) {
            self.note(format!(
                "{label}: its API key contains a line break and cannot be written as NAME=value; \
                 set {variable} yourself"
            ));
            self.unset.push(variable.to_owned());
        } else {
            self.secrets.push((variable.to_owned(), value.clone()));
        }
    }
}

// === impl EnvNames ===

impl EnvNames {
    /// `wanted`, or `wanted_2`, `wanted_3`, … if taken.
    fn take(&mut self, wanted: &str) -> String {
        let name = unique(wanted.to_owned(), &mut self.0);
        self.0.insert(name.clone());
        name
    }
}

// === helpers ===

/// `wanted`, or `wanted_2`, `wanted_3`, … if `taken` has it; the result is added to `taken`.
fn unique(wanted: String, taken: &mut HashSet<String>) -> String {
    let mut name = wanted.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{wanted}_{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}

/// A valid sidecar instance id (`[A-Za-z0-9_.-]{1,64}`) for a WXAUTO-MGT one.
pub(super) fn sidecar_id(id: &str, n: usize) -> String {
    let cleaned: String = id
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    if cleaned.chars().any(|c| c.is_ascii_alphanumeric()) {
        cleaned
    } else {
        format!("instance-{n}")
    }
}

/// The part of an environment variable name made from an id: `A-Z 0-9 _`.
pub(super) fn env_part(id: &str) -> String {
    let part: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let part = part.trim_matches('_').to_owned();
    if part.is_empty() {
        "X".to_owned()
    } else {
        part
    }
}

/// A YAML double-quoted scalar.
pub(super) fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `line` with `note` as a comment in column 35.
fn aligned(line: &str, note: &str) -> String {
    format!("{line:<34} # {note}")
}

/// Text that is safe on one comment line.
pub(super) fn comment(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// An http(s) URL with a host, without a trailing slash.
fn http_url(text: &str) -> Option<String> {
    let url = reqwest::Url::parse(text.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return None;
    }
    Some(url.as_str().trim_end_matches('/').to_owned())
}

/// `url` without `user:password@`; the credentials are secrets and never go into the YAML.
fn strip_credentials(b: &mut Builder, url: &str, label: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_owned();
    };
    if parsed.username().is_empty() && parsed.password().is_none() {
        return url.to_owned();
    }
    let _ = parsed.set_password(None);
    let _ = parsed.set_username("");
    b.note(format!(
        "{label}: the user:password@ part of its URL was left out of the file (it is a secret); \
         add it back by hand if the server needs it"
    ));
    parsed.as_str().trim_end_matches('/').to_owned()
}

/// A non-blank string (or number) field of a JSON object, trimmed.
fn text(config: &Value, key: &str) -> Option<String> {
    let text = match config.get(key)? {
        Value::String(text) => text.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

fn number(config: &Value, key: &str) -> Option<f64> {
    match config.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn flag(config: &Value, key: &str) -> bool {
    match config.get(key) {
        Some(Value::Bool(value)) => *value,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(text)) => matches!(text.trim(), "1" | "true" | "True"),
        _ => false,
    }
}

/// A list of non-blank strings: a JSON array, or one string.
fn strings(value: Option<&Value>) -> Vec<String> {
    let items: Vec<String> = match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(text) => Some(text.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        Some(Value::String(text)) => vec![text.clone()],
        _ => Vec::new(),
    };
    items
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .collect()
}

fn whole(x: f64) -> Option<i64> {
    // Only whole numbers in a range that converts exactly.
    #[allow(clippy::cast_possible_truncation)]
    (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64)
}

/// A positive whole number of seconds (or minutes) from a JSON number or numeric string.
fn whole_seconds(value: &Value) -> Option<u64> {
    let x = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(text) => text.trim().parse().ok()?,
        _ => return None,
    };
    // Fractions round up: a poll of 2.5 s becomes 3 s, never 0.
    let x = x.ceil();
    whole(x).and_then(|n| u64::try_from(n).ok())
}
