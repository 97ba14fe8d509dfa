//! `platforms:` (keyword, webhook, openai, dify, coze); `rules:` is in `routing/rules.rs`.

use std::time::Duration;

use regex::Regex;
use reqwest::header::{HeaderName, HeaderValue};

use super::keys::{self, KEY_SOURCES};
use super::node::{Node, NodeKind};
use super::reader::{Ctx, Fields, IntRange, index};
use super::sections::{KnownIds, http_url, to_u32, to_usize};
use crate::config::{
    CozePlatform, DeliveryConfig, DifyPlatform, KeywordEntry, KeywordMatch, KeywordPlatform,
    OpenAiPlatform, PlatformConfig, PlatformKind, SendMode, WebhookPlatform,
};
use crate::secret::Secret;

mod rules;

pub(super) use rules::rules;

const COMMON_KEYS: &[&str] = &["id", "type", "message_send_mode", "timeout"];
const KEYWORD_KEYS: &[&str] = &["keywords"];
const WEBHOOK_KEYS: &[&str] = &["url", "headers", "headers_from_env"];
const OPENAI_KEYS: &[&str] = &[
    "api_base",
    "model",
    "system_prompt",
    "temperature",
    "max_tokens",
    "history",
    "vision",
];
const DIFY_KEYS: &[&str] = &["api_base", "user_id"];
const COZE_KEYS: &[&str] = &[
    "api_base",
    "bot_id",
    "workspace_id",
    "continuous_conversation",
];
const KEYWORD_ENTRY_KEYS: &[&str] = &["keywords", "match_type", "replies", "random"];
const TYPES: &str = "keyword, webhook, openai, dify or coze";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
const OPENAI_API_BASE: &str = "https://api.openai.com/v1";
const DIFY_USER_ID: &str = "wxauto-sidecar";
const COZE_API_BASE: &str = "https://api.coze.cn";

#[derive(Clone, Copy)]
enum Type {
    Keyword,
    Webhook,
    OpenAi,
    Dify,
    Coze,
}

impl Type {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "keyword" => Some(Self::Keyword),
            "webhook" => Some(Self::Webhook),
            "openai" => Some(Self::OpenAi),
            "dify" => Some(Self::Dify),
            "coze" => Some(Self::Coze),
            _ => None,
        }
    }

    /// Every key a platform of this type may have.
    fn allowed(self) -> Vec<&'static str> {
        let specific: &[&str] = match self {
            Self::Keyword => KEYWORD_KEYS,
            Self::Webhook => WEBHOOK_KEYS,
            Self::OpenAi => OPENAI_KEYS,
            Self::Dify => DIFY_KEYS,
            Self::Coze => COZE_KEYS,
        };
        let mut allowed = COMMON_KEYS.to_vec();
        allowed.extend_from_slice(specific);
        if matches!(self, Self::OpenAi | Self::Dify | Self::Coze) {
            allowed.extend_from_slice(&KEY_SOURCES);
        }
        allowed
    }

    fn name(self) -> &'static str {
        match self {
            Self::Keyword => "keyword",
            Self::Webhook => "webhook",
            Self::OpenAi => "openai",
            Self::Dify => "dify",
            Self::Coze => "coze",
        }
    }
}

// === platforms ===

/// Decodes `platforms:`. Also returns every id as written (even of invalid platforms), so a rule
/// naming a broken platform is not reported a second time.
pub(super) fn platforms(
    ctx: &mut Ctx<'_>,
    node: Option<&Node>,
    delivery: &DeliveryConfig,
) -> (Vec<PlatformConfig>, KnownIds) {
    let path = "platforms";
    let mut known = KnownIds::new();
    let Some(items) = node.and_then(|node| ctx.seq(node, path)) else {
        return (Vec::new(), known);
    };
    let mut platforms = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(platform) = platform(ctx, item, &index(path, i), delivery, &mut known) {
            platforms.push(platform);
        }
    }
    (platforms, known)
}

fn platform(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    delivery: &DeliveryConfig,
    known: &mut KnownIds,
) -> Option<PlatformConfig> {
    let fields = ctx.map(node, path)?;
    let id = fields
        .required(ctx, "id")
        .and_then(|id_node| unique_id(ctx, id_node, &fields.path_of("id"), known, "platform"));
    let kind = fields.required(ctx, "type").and_then(|type_node| {
        let type_path = fields.path_of("type");
        let text = ctx.string(type_node, &type_path)?;
        let kind = Type::parse(text.trim());
        if kind.is_none() {
            let message = format!("unknown platform type {text:?}; expected {TYPES}");
            ctx.error(type_node, &type_path, message);
        }
        kind
    });
    // Without a valid type the type-specific keys cannot be judged; skip them rather than
    // burying the one real error under "unknown key" noise.
    if let Some(kind) = kind {
        let what = format!(" for a {} platform", kind.name());
        fields.check_allowed(ctx, &kind.allowed(), &what);
    }

    let send_mode = match fields.get("message_send_mode") {
        Some(mode) => send_mode(ctx, mode, &fields.path_of("message_send_mode")),
        None => Some(SendMode::Normal),
    };
    let timeout = platform_timeout(ctx, &fields, delivery);
    let kind = match kind? {
        Type::Keyword => keyword(ctx, &fields).map(PlatformKind::Keyword),
        Type::Webhook => webhook(ctx, &fields).map(PlatformKind::Webhook),
        Type::OpenAi => openai(ctx, &fields).map(PlatformKind::OpenAi),
        Type::Dify => dify(ctx, &fields).map(PlatformKind::Dify),
        Type::Coze => coze(ctx, &fields).map(PlatformKind::Coze),
    };
    Some(PlatformConfig {
        id: id?,
        send_mode: send_mode?,
        timeout: timeout?,
        kind: kind?,
    })
}

/// A non-empty id, unique within its list; the second occurrence is the error.
fn unique_id(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    known: &mut KnownIds,
    what: &str,
) -> Option<String> {
    let id = ctx.non_empty_string(node, path)?;
    if let Some(first) = known.get(&id) {
        let message = format!("duplicate {what} id {id:?} (first defined at line {first})");
        ctx.error(node, path, message);
        return None;
    }
    known.insert(id.clone(), node.line);
    Some(id)
}

fn send_mode(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<SendMode> {
    let text = ctx.string(node, path)?;
    match text.trim() {
        "normal" => Some(SendMode::Normal),
        "typing" => Some(SendMode::Typing),
        _ => {
            let message = format!("unknown send mode {text:?}; expected normal or typing");
            ctx.error(node, path, message);
            None
        }
    }
}

/// `timeout`, which must leave room inside one delivery attempt.
fn platform_timeout(
    ctx: &mut Ctx<'_>,
    fields: &Fields<'_>,
    delivery: &DeliveryConfig,
) -> Option<Duration> {
    let path = fields.path_of("timeout");
    let (timeout, at) = match fields.get("timeout") {
        Some(node) => (ctx.duration(node, &path)?, node),
        None => (DEFAULT_TIMEOUT, fields.node()),
    };
    if timeout >= delivery.attempt_timeout {
        let message = format!(
            "{} must be shorter than delivery.attempt_timeout ({})",
            humantime::format_duration(timeout),
            humantime::format_duration(delivery.attempt_timeout)
        );
        ctx.error(at, &path, message);
        return None;
    }
    Some(timeout)
}

fn keyword(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> Option<KeywordPlatform> {
    let path = fields.path_of("keywords");
    let node = fields.required(ctx, "keywords")?;
    let items = ctx.seq(node, &path)?;
    let mut entries = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match keyword_entry(ctx, item, &index(&path, i)) {
            Some(entry) => entries.push(entry),
            None => ok = false,
        }
    }
    ok.then_some(KeywordPlatform { keywords: entries })
}

fn keyword_entry(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<KeywordEntry> {
    let fields = ctx.map(node, path)?;
    fields.check_allowed(ctx, KEYWORD_ENTRY_KEYS, "");
    let match_type = match fields.get("match_type") {
        Some(node) => {
            let type_path = fields.path_of("match_type");
            let text = ctx.string(node, &type_path)?;
            match text.trim() {
                "exact" => Some(KeywordMatch::Exact),
                "contains" => Some(KeywordMatch::Contains),
                "regex" => Some(KeywordMatch::Regex),
                _ => {
                    let message =
                        format!("unknown match type {text:?}; expected exact, contains or regex");
                    ctx.error(node, &type_path, message);
                    None
                }
            }
        }
        None => Some(KeywordMatch::Contains),
    };
    let keywords_path = fields.path_of("keywords");
    let keywords_node = fields.required(ctx, "keywords");
    let keywords = keywords_node.and_then(|node| ctx.nonblank_list(node, &keywords_path, true));
    let mut patterns = Vec::new();
    let mut patterns_ok = true;
    if let (Some(KeywordMatch::Regex), Some(keywords), Some(NodeKind::Seq(items))) =
        (match_type, &keywords, keywords_node.map(|node| &node.kind))
    {
        for (i, (keyword, item)) in keywords.iter().zip(items).enumerate() {
            match anchored_regex(ctx, item, &index(&keywords_path, i), keyword) {
                Some(regex) => patterns.push(regex),
                None => patterns_ok = false,
            }
        }
    }
    let replies = fields
        .required(ctx, "replies")
        .and_then(|node| ctx.nonblank_list(node, &fields.path_of("replies"), true));
    let random = fields.bool_or(ctx, "random", false);
    if !patterns_ok {
        return None;
    }
    Some(KeywordEntry {
        keywords: keywords?,
        match_type: match_type?,
        patterns,
        replies: replies?,
        random,
    })
}

/// Compiles `pattern` to match whole strings only: `^(?:pattern)$`.
fn anchored_regex(ctx: &mut Ctx<'_>, node: &Node, path: &str, pattern: &str) -> Option<Regex> {
    match Regex::new(&format!("^(?:{pattern})$")) {
        Ok(regex) => Some(regex),
        Err(err) => {
            let message = format!("invalid regex {pattern:?}: {}", regex_reason(&err));
            ctx.error(node, path, message);
            None
        }
    }
}

/// The one-line reason of a regex error. Syntax errors render over several lines (the pattern,
/// a caret, then `error: ...`), which would break the one-error-per-line output.
fn regex_reason(err: &regex::Error) -> String {
    let text = err.to_string();
    text.lines()
        .rev()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .map_or_else(
            || text.split_whitespace().collect::<Vec<_>>().join(" "),
            str::to_owned,
        )
}

fn webhook(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> Option<WebhookPlatform> {
    let url = fields
        .required(ctx, "url")
        .and_then(|node| http_url(ctx, node, &fields.path_of("url")));
    let mut headers: Vec<(String, Secret)> = Vec::new();
    let mut ok = true;
    for (key, from_env) in [("headers", false), ("headers_from_env", true)] {
        let Some(node) = fields.get(key) else {
            continue;
        };
        let path = fields.path_of(key);
        let Some(map) = ctx.map(node, &path) else {
            ok = false;
            continue;
        };
        for (name, name_node, value_node) in map.entries() {
            let header_path = map.path_of(name);
            if !header(
                ctx,
                name,
                name_node,
                value_node,
                &header_path,
                from_env,
                &mut headers,
            ) {
                ok = false;
            }
        }
    }
    let url = url?;
    let has_auth = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("authorization"));
    if has_auth
        && has_credentials(&url)
        && let Some(node) = fields.get("url")
    {
        let message =
            "the user:password@ part of the URL is not sent: an Authorization header is configured";
        ctx.warn(node, &fields.path_of("url"), message);
    }
    ok.then_some(WebhookPlatform { url, headers })
}

/// One webhook header; `from_env` means the value names an environment variable.
fn header(
    ctx: &mut Ctx<'_>,
    name: &str,
    name_node: &Node,
    value_node: &Node,
    path: &str,
    from_env: bool,
    headers: &mut Vec<(String, Secret)>,
) -> bool {
    if HeaderName::from_bytes(name.as_bytes()).is_err() {
        ctx.error(
            name_node,
            path,
            format!("invalid HTTP header name {name:?}"),
        );
        return false;
    }
    if headers
        .iter()
        .any(|(known, _)| known.eq_ignore_ascii_case(name))
    {
        let message = format!("header {name:?} is set twice (names are case-insensitive)");
        ctx.error(name_node, path, message);
        return false;
    }
    let value = if from_env {
        let Some(variable) = ctx.non_empty_string(value_node, path) else {
            return false;
        };
        match keys::env_secret(ctx, value_node, path, &variable) {
            Some(value) => value,
            None => return false,
        }
    } else {
        match ctx.string(value_node, path) {
            Some(value) => value,
            None => return false,
        }
    };
    // Checked now so that a bad value fails the reload, not every delivery. The message must
    // not quote the value: header values are treated as secrets.
    if HeaderValue::from_str(&value).is_err() {
        let message = "the header value contains characters not allowed in HTTP headers";
        ctx.error(value_node, path, message);
        return false;
    }
    headers.push((name.to_owned(), Secret::new(value)));
    true
}

fn openai(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> Option<OpenAiPlatform> {
    let api_base = api_base(ctx, fields, Some(OPENAI_API_BASE));
    let key = keys::api_key(ctx, fields);
    let model = fields
        .required(ctx, "model")
        .and_then(|node| ctx.non_empty_string(node, &fields.path_of("model")));
    let system_prompt = fields
        .get("system_prompt")
        .map(|node| ctx.string(node, &fields.path_of("system_prompt")));
    let temperature = fields.get("temperature").map(|node| {
        let path = fields.path_of("temperature");
        let value = ctx.float(node, &path)?;
        if !(0.0..=2.0).contains(&value) {
            ctx.error(node, &path, format!("must be between 0 and 2, got {value}"));
            return None;
        }
        Some(value)
    });
    let max_tokens = fields.get("max_tokens").map(|node| {
        ctx.int_in(node, &fields.path_of("max_tokens"), IntRange::at_least(1))
            .map(to_u32)
    });
    let history = to_usize(fields.int_or(ctx, "history", IntRange::at_least(0), 0));
    let vision = fields.bool_or(ctx, "vision", false);
    let (api_key, _) = key?;
    warn_unsent_credentials(ctx, fields, api_base.as_deref());
    Some(OpenAiPlatform {
        api_base: api_base?,
        api_key,
        model: model?,
        system_prompt: optional(system_prompt)?,
        temperature: optional(temperature)?,
        max_tokens: optional(max_tokens)?,
        history,
        vision,
    })
}

/// An optional key's read: absent is `Some(None)`, present but invalid (`Some(None)` from the
/// read, already reported) is `None`, present and valid is `Some(Some(value))`.
fn optional<T>(read: Option<Option<T>>) -> Option<Option<T>> {
    match read {
        None => Some(None),
        Some(value) => value.map(Some),
    }
}

fn dify(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> Option<DifyPlatform> {
    let api_base = api_base(ctx, fields, None);
    let key = keys::api_key(ctx, fields);
    let user_id = fields.string_or(ctx, "user_id", DIFY_USER_ID);
    let (api_key, _) = key?;
    warn_unsent_credentials(ctx, fields, api_base.as_deref());
    Some(DifyPlatform {
        api_base: api_base?,
        api_key,
        user_id,
    })
}

fn coze(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> Option<CozePlatform> {
    let api_base = api_base(ctx, fields, Some(COZE_API_BASE));
    let key = keys::api_key(ctx, fields);
    let bot_id = fields
        .required(ctx, "bot_id")
        .and_then(|node| ctx.non_empty_string(node, &fields.path_of("bot_id")));
    let workspace_id = fields
        .get("workspace_id")
        .map(|node| ctx.non_empty_string(node, &fields.path_of("workspace_id")));
    let continuous_conversation = fields.bool_or(ctx, "continuous_conversation", false);
    let (api_key, _) = key?;
    warn_unsent_credentials(ctx, fields, api_base.as_deref());
    Some(CozePlatform {
        api_base: api_base?,
        api_key,
        bot_id: bot_id?,
        workspace_id: optional(workspace_id)?,
        continuous_conversation,
    })
}

/// Whether a URL carries `user:password@`.
fn has_credentials(url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|url| !url.username().is_empty() || url.password().is_some())
}

/// `api_base` credentials are never sent next to the API key's `Authorization: Bearer`.
fn warn_unsent_credentials(ctx: &mut Ctx<'_>, fields: &Fields<'_>, api_base: Option<&str>) {
    if let (Some(node), Some(true)) = (fields.get("api_base"), api_base.map(has_credentials)) {
        let message = "the user:password@ part of api_base is not sent: the API key is sent as Authorization: Bearer";
        ctx.warn(node, &fields.path_of("api_base"), message);
    }
}

/// `api_base`, required when there is no default.
fn api_base(ctx: &mut Ctx<'_>, fields: &Fields<'_>, default: Option<&str>) -> Option<String> {
    let path = fields.path_of("api_base");
    match (fields.get("api_base"), default) {
        (Some(node), _) => http_url(ctx, node, &path),
        (None, Some(default)) => Some(default.to_owned()),
        (None, None) => {
            fields.required(ctx, "api_base");
            None
        }
    }
}
