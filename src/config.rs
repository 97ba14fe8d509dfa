//! The validated configuration (`Config`) and how a YAML file becomes one.
//!
//! `decode` turns YAML text into a `Config`, reporting every problem at once with file, line,
//! column and key path; nothing else in the crate parses or re-validates configuration.

mod decode;
mod diff;
mod log_filter;
mod process;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regex::Regex;

use crate::secret::Secret;

pub use decode::{
    ConfigError, ConfigErrors, Loaded, Unresolved, check_file_without_secrets, decode, load_file,
};
pub(crate) use decode::{utf8_error_position, yaml_error_parts, yaml_options};
pub use diff::{ConfigDiff, InstanceChange, ProcessChange, process_changes};
pub use log_filter::{LOG_LEVELS, parse_log_filter};
pub use process::{CrashLoopConfig, ProcessConfig, RestartPolicy, StopSignal};

/// The default `server.listen` address (docs/reference.md, "Names").
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8907";

/// A fully validated configuration. Fields are public for reading; only `decode` builds one.
#[derive(Debug, Clone)]
pub struct Config {
    /// `server:` section.
    pub server: ServerConfig,
    /// `listener:` section.
    pub listener: ListenerConfig,
    /// `instances:`, in file order, ids unique.
    pub instances: Vec<InstanceConfig>,
    /// The listener settings of the instances that set `instances[].listener`: the global
    /// `listener:` with their keys over it (`listener_for`). Not part of `InstanceConfig`, so
    /// that changing them applies live instead of restarting the instance.
    pub instance_listeners: BTreeMap<String, ListenerConfig>,
    /// `fixed_listeners:`.
    pub fixed_listeners: Vec<FixedListener>,
    /// `platforms:`, ids unique.
    pub platforms: Vec<PlatformConfig>,
    /// `rules:`, already sorted into matching order (priority desc, specificity, id).
    pub rules: Vec<RuleConfig>,
    /// `delivery:` section.
    pub delivery: DeliveryConfig,
    /// `health:` section.
    pub health: HealthConfig,
    /// `logging:` section.
    pub logging: LoggingConfig,
    /// `storage:` section.
    pub storage: StorageConfig,
    /// `media:` section.
    pub media: MediaConfig,
    /// `processes:`, in file order, names unique.
    pub processes: Vec<ProcessConfig>,
    /// Where the config came from and its content hash.
    pub source: ConfigSource,
}

/// Identity of the text a `Config` was decoded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSource {
    /// The config file, or `None` for a built-in config (demo, tests).
    pub path: Option<PathBuf>,
    /// A stable 64-bit FNV-1a hash of the config text plus the contents of every referenced
    /// file (API key files), so that rotating a key file counts as a change.
    pub hash: u64,
    /// Other files the config reads (API key files); the watcher watches them too.
    pub referenced_files: Vec<PathBuf>,
}

/// `server:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// `server.listen`.
    pub listen: SocketAddr,
    /// `server.enable_lifecycle`: allow the mutating endpoints.
    pub enable_lifecycle: bool,
    /// `server.header_read_timeout`, `idle_timeout`, `max_connections`,
    /// `max_request_body_bytes`: what a slow or hostile client can hold.
    pub limits: HttpLimits,
    /// `server.web_config_file`: TLS, basic auth and headers (exporter-toolkit format),
    /// resolved against the config file's directory. `--web.config.file` wins.
    pub web_config_file: Option<PathBuf>,
    /// `server.open_probes`: `/-/healthy` and `/-/ready` answer without basic auth.
    pub open_probes: bool,
}

/// The HTTP server's limits (read at start; a change needs a restart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request head (line and headers) must arrive within this long of the server starting
    /// to wait for it: on a new connection, and between requests on a kept-alive one.
    pub header_read_timeout: Duration,
    /// A connection that moves no byte in either direction for this long is closed (a
    /// stalled request body, a client that stops reading its answer).
    pub idle_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// Larger request bodies are answered 413.
    pub max_request_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
            max_request_body_bytes: 64 * 1024,
        }
    }
}

/// `listener:` section: how every instance actor polls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Period of the message poll (get-next-new plus the listen/get drain).
    pub poll_interval: Duration,
    /// Period of the `GET /api/health` probe while an instance is up.
    pub health_check_interval: Duration,
    /// A chat with no message for this long becomes inactive and is removed upstream.
    pub listener_timeout: Duration,
    /// An inactive chat is forgotten (dropped from the chat table, the store, the monitor API
    /// and the health score's `listeners` part) this long after it became inactive.
    pub forget_inactive_after: Duration,
    /// Cap on active chats per instance.
    pub max_listeners_per_instance: usize,
    /// Timeout of every call to a wxauto instance.
    pub request_timeout: Duration,
    /// Retry backoff for a down instance.
    pub backoff: BackoffConfig,
}

/// An exponential backoff range; `initial <= max` is guaranteed by validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
}

/// One wxauto HTTP API instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceConfig {
    /// `[A-Za-z0-9_.-]{1,64}`, unique.
    pub id: String,
    /// Base URL without a trailing slash, `http` or `https`.
    pub base_url: String,
    /// The resolved API key.
    pub api_key: Secret,
    /// Where the key came from (for messages and for watching key files).
    pub api_key_source: KeySource,
    /// `enabled: false` instances are not polled and not counted in the health score.
    pub enabled: bool,
}

impl InstanceConfig {
    /// `base_url` safe to log: credentials in the URL (`user:pass@`) become `****@`.
    pub fn display_url(&self) -> String {
        redact_url(&self.base_url)
    }
}

/// Replaces any `user:password@` part of a URL with `****@`.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) if !parsed.username().is_empty() || parsed.password().is_some() => {
            let _ = parsed.set_password(None);
            let _ = parsed.set_username("****");
            parsed.to_string().trim_end_matches('/').to_owned()
        }
        _ => url.to_owned(),
    }
}

/// Where a secret was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `api_key_env: NAME`.
    Env(String),
    /// `api_key_file: PATH` (trailing newline stripped).
    File(PathBuf),
    /// `api_key: ...` inline in the file (a warning at load).
    Inline,
}

/// A chat listened on every matching instance, never timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixedListener {
    /// The chat name (`who`).
    pub chat: String,
    /// Which instances.
    pub instances: InstanceSelector,
}

/// `"*"` or a list of instance ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceSelector {
    /// Every instance.
    All,
    /// These ids (each validated to exist).
    Ids(Vec<String>),
}

impl InstanceSelector {
    /// Whether this selector picks `instance_id`.
    pub fn matches(&self, instance_id: &str) -> bool {
        match self {
            Self::All => true,
            Self::Ids(ids) => ids.iter().any(|id| id == instance_id),
        }
    }
}

/// A routing target.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Unique id, used by rules and as the `platform` metric label.
    pub id: String,
    /// How replies are sent back: chat-window `send` or `send-typing`.
    pub send_mode: SendMode,
    /// Per-request timeout, shorter than `delivery.attempt_timeout`.
    pub timeout: Duration,
    /// The type-specific part.
    pub kind: PlatformKind,
}

/// `message_send_mode` of a platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendMode {
    /// `POST /api/chat-window/message/send`.
    Normal,
    /// `POST /api/chat-window/message/send-typing`.
    Typing,
}

/// The platform types of docs/configuration.md.
#[derive(Debug, Clone)]
pub enum PlatformKind {
    /// Local keyword replies.
    Keyword(KeywordPlatform),
    /// POST the message as JSON (docs/reference.md, "The webhook request").
    Webhook(WebhookPlatform),
    /// An OpenAI-compatible `/chat/completions` endpoint.
    OpenAi(OpenAiPlatform),
    /// Dify `/chat-messages` in blocking mode.
    Dify(DifyPlatform),
    /// Coze `/v3/chat`, polled until the chat completes.
    Coze(CozePlatform),
}

impl PlatformKind {
    /// The `type:` string.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Keyword(_) => "keyword",
            Self::Webhook(_) => "webhook",
            Self::OpenAi(_) => "openai",
            Self::Dify(_) => "dify",
            Self::Coze(_) => "coze",
        }
    }
}

/// `type: keyword`.
#[derive(Debug, Clone)]
pub struct KeywordPlatform {
    /// First matching entry wins.
    pub keywords: Vec<KeywordEntry>,
}

/// One keyword entry.
#[derive(Debug, Clone)]
pub struct KeywordEntry {
    /// Any of these matches (case-insensitive for exact and contains).
    pub keywords: Vec<String>,
    /// How `keywords` are compared with the message.
    pub match_type: KeywordMatch,
    /// Compiled, fully anchored patterns when `match_type` is regex (same order as `keywords`).
    pub patterns: Vec<Regex>,
    /// Non-empty.
    pub replies: Vec<String>,
    /// Pick a random reply instead of the first.
    pub random: bool,
}

/// Keyword comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeywordMatch {
    /// Whole message equals a keyword.
    Exact,
    /// Message contains a keyword.
    Contains,
    /// Message matches a (fully anchored) regex.
    Regex,
}

/// `type: webhook`.
#[derive(Debug, Clone)]
pub struct WebhookPlatform {
    /// Where to POST.
    pub url: String,
    /// Extra headers; values are secrets because they often carry tokens.
    pub headers: Vec<(String, Secret)>,
}

/// `type: openai`.
#[derive(Debug, Clone)]
pub struct OpenAiPlatform {
    /// e.g. `https://api.openai.com/v1` (no trailing slash).
    pub api_base: String,
    /// Bearer token.
    pub api_key: Secret,
    /// Model name.
    pub model: String,
    /// Optional system prompt.
    pub system_prompt: Option<String>,
    /// Sampling temperature.
    pub temperature: Option<f64>,
    /// Max tokens of the answer.
    pub max_tokens: Option<u32>,
    /// How many previous exchanges of the same chat to send (0 = none).
    pub history: usize,
    /// Send images as `image_url` content parts (a vision model); otherwise a placeholder.
    pub vision: bool,
}

/// `type: dify`.
#[derive(Debug, Clone)]
pub struct DifyPlatform {
    /// e.g. `https://api.dify.ai/v1` (no trailing slash).
    pub api_base: String,
    /// Bearer token.
    pub api_key: Secret,
    /// Fallback user id when the sender is unknown.
    pub user_id: String,
}

/// `type: coze`.
#[derive(Debug, Clone)]
pub struct CozePlatform {
    /// `https://api.coze.cn` (default) or `https://api.coze.com` (no trailing slash).
    pub api_base: String,
    /// Bearer token (a personal access token).
    pub api_key: Secret,
    /// The bot, published to the API channel.
    pub bot_id: String,
    /// The workspace (space) of the bot; informational, not sent with chats.
    pub workspace_id: Option<String>,
    /// Keep one Coze conversation per (instance, chat, sender) in the store.
    pub continuous_conversation: bool,
}

/// A routing rule.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    /// Unique id (the last tie-break).
    pub id: String,
    /// Which instance.
    pub instance: InstanceSelector,
    /// Which chats.
    pub chat: ChatPattern,
    /// Target platform id (validated to exist).
    pub platform: String,
    /// Higher first.
    pub priority: i64,
    /// Only messages that @-mention one of `at_names`.
    pub only_at: bool,
    /// Names counted as an @-mention.
    pub at_names: Vec<String>,
    /// Prefix the reply with `@sender` (group chats only).
    pub reply_at_sender: bool,
}

/// A rule's chat pattern.
#[derive(Debug, Clone)]
pub enum ChatPattern {
    /// `*`.
    Any,
    /// `"exact name"`.
    Exact(String),
    /// `"a, b, c"`.
    List(Vec<String>),
    /// `regex:<pattern>`, compiled fully anchored.
    Regex(Regex),
}

impl ChatPattern {
    /// Specificity for ordering: exact > list > regex > any.
    pub fn specificity(&self) -> u8 {
        match self {
            Self::Exact(_) => 3,
            Self::List(_) => 2,
            Self::Regex(_) => 1,
            Self::Any => 0,
        }
    }

    /// Whether `chat` matches.
    pub fn matches(&self, chat: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(name) => name == chat,
            Self::List(names) => names.iter().any(|name| name == chat),
            Self::Regex(regex) => regex.is_match(chat),
        }
    }
}

/// `delivery:` section (an addition to the documented sections, docs/configuration.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Concurrent delivery workers.
    pub workers: usize,
    /// Attempts before a message is dead.
    pub max_attempts: u32,
    /// Retry backoff between attempts.
    pub backoff: BackoffConfig,
    /// Budget of one attempt (platform call plus reply).
    pub attempt_timeout: Duration,
}

/// `health:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Sliding window for error counts and the error ratio.
    pub window: Duration,
    /// Period of the health check that writes `report_file`.
    pub report_interval: Duration,
    /// Where the report goes.
    pub report_file: PathBuf,
}

/// `logging:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingConfig {
    /// A `tracing` filter, e.g. `info` or `info,wxauto_sidecar=debug`, as `parse_log_filter`
    /// answers it.
    pub level: String,
    /// Directory of the daily log files.
    pub dir: PathBuf,
    /// File name prefix: `<prefix>_YYYYMMDD.log`.
    pub file_prefix: String,
    /// Daily files older than this many days are deleted.
    pub retention_days: u32,
    /// `logging.format`: human-readable text or one JSON object per line (stderr and file).
    pub format: LogFormat,
    /// `logging.redact_chat_names`: chat names in log lines become a short stable hash.
    pub redact_chat_names: bool,
}

/// `logging.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `text` (the default): `2026-11-29T10:00:00Z  INFO message key=value`.
    #[default]
    Text,
    /// `json`: one JSON object per line, for log shippers.
    Json,
}

/// `storage:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The SQLite file.
    pub path: PathBuf,
    /// Delivered rows older than this are pruned.
    pub retention_days: u32,
    /// Dead rows older than this (by their last change) are pruned.
    pub dead_retention_days: u32,
    /// SQLite's `synchronous` pragma in WAL mode.
    pub synchronous: Synchronous,
}

/// How hard each commit waits for the disk (`storage.synchronous`).
///
/// In WAL mode both survive a crash or a kill of the process; `Normal` may lose the last
/// commits on an operating-system crash or power loss, `Full` may not, at about 90× the cost
/// of a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Synchronous {
    /// `PRAGMA synchronous = NORMAL` (the default).
    #[default]
    Normal,
    /// `PRAGMA synchronous = FULL`.
    Full,
}

impl Synchronous {
    /// The pragma value.
    pub fn pragma(self) -> &'static str {
        match self {
            Self::Normal => "NORMAL",
            Self::Full => "FULL",
        }
    }
}

/// `media:` section: downloads of image, file, video and voice messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// Fetch the files at all; `false` forwards metadata only.
    pub download: bool,
    /// Where downloaded files are kept.
    pub dir: PathBuf,
    /// Larger files are not downloaded (the message is still delivered).
    pub max_bytes: u64,
    /// Downloaded files older than this many days are deleted.
    pub retention_days: u32,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            download: true,
            dir: PathBuf::from("data/downloads"),
            max_bytes: 20 * 1024 * 1024,
            retention_days: 7,
        }
    }
}

// === impl Config ===

impl Config {
    /// The listener settings of an instance: its `instances[].listener` keys over the global
    /// `listener:` section.
    pub fn listener_for(&self, instance_id: &str) -> &ListenerConfig {
        self.instance_listeners
            .get(instance_id)
            .unwrap_or(&self.listener)
    }

    /// The enabled instances, in file order.
    pub fn enabled_instances(&self) -> impl Iterator<Item = &InstanceConfig> {
        self.instances.iter().filter(|instance| instance.enabled)
    }

    /// The instance with this id.
    pub fn instance(&self, id: &str) -> Option<&InstanceConfig> {
        self.instances.iter().find(|instance| instance.id == id)
    }

    /// The fixed chats for one instance.
    pub fn fixed_chats_for<'a>(&'a self, instance_id: &'a str) -> impl Iterator<Item = &'a str> {
        self.fixed_listeners
            .iter()
            .filter(move |fixed| fixed.instances.matches(instance_id))
            .map(|fixed| fixed.chat.as_str())
    }

    /// The config file's path, if any.
    pub fn path(&self) -> Option<&Path> {
        self.source.path.as_deref()
    }
}

/// FNV-1a, 64 bit: stable across runs and platforms, unlike `std`'s `DefaultHasher`.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // Separate parts so that ("ab", "c") and ("a", "bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_for_display() {
        assert_eq!(
            redact_url("http://admin:hunter2@10.0.0.5:5000"),
            "http://****@10.0.0.5:5000"
        );
        assert_eq!(redact_url("http://10.0.0.5:5000"), "http://10.0.0.5:5000");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
