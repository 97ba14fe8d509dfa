//! The top level and the plain sections: server, listener, delivery, health, logging and
//! storage (`instances:` and `fixed_listeners:` are in `sections/instances.rs`). Defaults live
//! here (docs/configuration.md).

mod instances;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::keys;
use super::node::{Node, NodeKind};
use super::processes;
use super::reader::{Ctx, Fields, IntRange};
use super::routing;
use crate::config::{
    BackoffConfig, Config, ConfigSource, DEFAULT_LISTEN, DeliveryConfig, HealthConfig, HttpLimits,
    ListenerConfig, LogFormat, LoggingConfig, MediaConfig, ServerConfig, StorageConfig,
    Synchronous,
};
use instances::{fixed_listeners, instances};

const ROOT_KEYS: &[&str] = &[
    "server",
    "listener",
    "instances",
    "fixed_listeners",
    "platforms",
    "rules",
    "delivery",
    "health",
    "logging",
    "storage",
    "media",
    "processes",
];
const SERVER_KEYS: &[&str] = &[
    "listen",
    "enable_lifecycle",
    "header_read_timeout",
    "idle_timeout",
    "max_connections",
    "max_request_body_bytes",
    "web_config_file",
    "open_probes",
];
const LISTENER_KEYS: &[&str] = &[
    "poll_interval",
    "health_check_interval",
    "listener_timeout",
    "forget_inactive_after",
    "max_listeners_per_instance",
    "request_timeout",
    "backoff",
];
const BACKOFF_KEYS: &[&str] = &["initial", "max"];
const DELIVERY_KEYS: &[&str] = &["workers", "max_attempts", "backoff", "attempt_timeout"];
const HEALTH_KEYS: &[&str] = &["window", "report_interval", "report_file"];
const LOGGING_KEYS: &[&str] = &[
    "level",
    "dir",
    "file_prefix",
    "retention_days",
    "format",
    "redact_chat_names",
];
const STORAGE_KEYS: &[&str] = &[
    "path",
    "retention_days",
    "dead_retention_days",
    "synchronous",
];
const MEDIA_KEYS: &[&str] = &["download", "dir", "max_bytes", "retention_days"];

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Ids as written (of instances, platforms or rules), with the line of their first occurrence.
/// Invalid ids are included, so that one bad id yields one error, not one more per reference.
pub(super) type KnownIds = HashMap<String, u64>;

/// Decodes the whole document. `None` only when the top level is not a mapping.
pub(super) fn config(ctx: &mut Ctx<'_>, root: &Node) -> Option<Config> {
    let fields = if root.kind == NodeKind::Null {
        // An empty file: every section defaults, and the missing `instances` is reported.
        Fields::empty_at(root, "")
    } else {
        let fields = ctx.map(root, "")?;
        fields.check_allowed(ctx, ROOT_KEYS, "");
        fields
    };

    let server = server(ctx, fields.get_raw("server"));
    let listener = listener(ctx, fields.get_raw("listener"));
    let delivery = delivery(ctx, fields.get_raw("delivery"));
    let health = health(ctx, fields.get_raw("health"));
    let logging = logging(ctx, fields.get_raw("logging"));
    let storage = storage(ctx, fields.get_raw("storage"));
    let media = media(ctx, fields.get_raw("media"));

    let (instances, known_ids, instance_listeners) = match fields.get_raw("instances") {
        // `instances: []` is valid (nothing to poll yet); a bare `instances:` is not a list.
        Some(node) => instances(ctx, node, "instances", &listener),
        None => {
            fields.required(ctx, "instances");
            (Vec::new(), KnownIds::new(), BTreeMap::new())
        }
    };
    let fixed_listeners = fixed_listeners(ctx, fields.get("fixed_listeners"), &known_ids);
    let (platforms, platform_ids) = routing::platforms(ctx, fields.get("platforms"), &delivery);
    let rules = routing::rules(ctx, fields.get("rules"), &known_ids, &platform_ids);
    let processes = processes::processes(ctx, fields.get("processes"), &known_ids);

    Some(Config {
        server,
        listener,
        instances,
        instance_listeners,
        fixed_listeners,
        platforms,
        rules,
        delivery,
        health,
        logging,
        storage,
        media,
        processes,
        // Filled in by `decode` once the key files are known.
        source: ConfigSource {
            path: None,
            hash: 0,
            referenced_files: Vec::new(),
        },
    })
}

// === plain sections ===

fn server(ctx: &mut Ctx<'_>, node: Option<&Node>) -> ServerConfig {
    // The constant is a valid address; the fallback only keeps this free of `unwrap`.
    let default_listen = DEFAULT_LISTEN
        .parse()
        .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 8907)));
    let Some(fields) = ctx.section(node, "server", SERVER_KEYS) else {
        return ServerConfig {
            listen: default_listen,
            enable_lifecycle: false,
            limits: HttpLimits::default(),
            web_config_file: None,
            open_probes: false,
        };
    };
    let listen = match fields.get("listen") {
        Some(node) => socket_addr(ctx, node, &fields.path_of("listen")).unwrap_or(default_listen),
        None => default_listen,
    };
    let defaults = HttpLimits::default();
    let limits = HttpLimits {
        header_read_timeout: fields.duration_or(
            ctx,
            "header_read_timeout",
            defaults.header_read_timeout,
        ),
        idle_timeout: fields.duration_or(ctx, "idle_timeout", defaults.idle_timeout),
        // The upper bounds keep the server inside what one process can hold open.
        max_connections: to_usize(fields.int_or(
            ctx,
            "max_connections",
            IntRange::between(1, 1_000_000),
            512,
        )),
        max_request_body_bytes: to_usize(fields.int_or(
            ctx,
            "max_request_body_bytes",
            IntRange::between(1024, 1024 * 1024 * 1024),
            64 * 1024,
        )),
    };
    let web_config_file = fields.get("web_config_file").and_then(|node| {
        let text = ctx.non_empty_string(node, &fields.path_of("web_config_file"))?;
        Some(keys::resolve(ctx.base_dir.as_deref(), &text))
    });
    ServerConfig {
        listen,
        enable_lifecycle: fields.bool_or(ctx, "enable_lifecycle", false),
        limits,
        web_config_file,
        open_probes: fields.bool_or(ctx, "open_probes", false),
    }
}

fn socket_addr(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<SocketAddr> {
    let text = ctx.string(node, path)?;
    match text.trim().parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            let message = format!(
                "invalid socket address {text:?}: expected IP:port, e.g. {DEFAULT_LISTEN} or [::1]:8907"
            );
            ctx.error(node, path, message);
            None
        }
    }
}

/// The `listener:` section's defaults.
fn default_listener() -> ListenerConfig {
    ListenerConfig {
        poll_interval: secs(5),
        health_check_interval: secs(30),
        listener_timeout: secs(30 * 60),
        forget_inactive_after: secs(60 * 60),
        max_listeners_per_instance: 30,
        request_timeout: secs(10),
        backoff: BackoffConfig {
            initial: secs(1),
            max: secs(60),
        },
    }
}

fn listener(ctx: &mut Ctx<'_>, node: Option<&Node>) -> ListenerConfig {
    listener_over(ctx, node, "listener", &default_listener())
}

/// A listener section at `path` (`listener`, or `instances[i].listener`), every key it does
/// not set taken from `defaults` (the built-in defaults, or the global section).
pub(super) fn listener_over(
    ctx: &mut Ctx<'_>,
    node: Option<&Node>,
    path: &str,
    defaults: &ListenerConfig,
) -> ListenerConfig {
    let Some(fields) = ctx.section(node, path, LISTENER_KEYS) else {
        return defaults.clone();
    };
    ListenerConfig {
        poll_interval: fields.duration_or(ctx, "poll_interval", defaults.poll_interval),
        health_check_interval: fields.duration_or(
            ctx,
            "health_check_interval",
            defaults.health_check_interval,
        ),
        listener_timeout: fields.duration_or(ctx, "listener_timeout", defaults.listener_timeout),
        forget_inactive_after: fields.duration_or(
            ctx,
            "forget_inactive_after",
            defaults.forget_inactive_after,
        ),
        max_listeners_per_instance: to_usize(fields.int_or(
            ctx,
            "max_listeners_per_instance",
            IntRange::at_least(1),
            i128::try_from(defaults.max_listeners_per_instance).unwrap_or(i128::MAX),
        )),
        request_timeout: fields.duration_or(ctx, "request_timeout", defaults.request_timeout),
        backoff: backoff(ctx, &fields, defaults.backoff),
    }
}

/// `backoff: {initial, max}` inside `parent`, with `initial <= max`.
pub(super) fn backoff(
    ctx: &mut Ctx<'_>,
    parent: &Fields<'_>,
    default: BackoffConfig,
) -> BackoffConfig {
    let path = parent.path_of("backoff");
    let Some(fields) = ctx.section(parent.get_raw("backoff"), &path, BACKOFF_KEYS) else {
        return default;
    };
    let initial = fields.duration_or(ctx, "initial", default.initial);
    let max = fields.duration_or(ctx, "max", default.max);
    if initial > max {
        // Point at whichever bound was written; a lone `initial: 2m` exceeds the default max.
        let at = fields
            .get("initial")
            .or_else(|| fields.get("max"))
            .unwrap_or(fields.node());
        let message = format!(
            "initial ({}) must not exceed max ({})",
            humantime::format_duration(initial),
            humantime::format_duration(max)
        );
        ctx.error(at, &path, message);
        return default;
    }
    BackoffConfig { initial, max }
}

fn delivery(ctx: &mut Ctx<'_>, node: Option<&Node>) -> DeliveryConfig {
    let default_backoff = BackoffConfig {
        initial: secs(2),
        max: secs(5 * 60),
    };
    let Some(fields) = ctx.section(node, "delivery", DELIVERY_KEYS) else {
        return DeliveryConfig {
            workers: 4,
            max_attempts: 5,
            backoff: default_backoff,
            attempt_timeout: secs(30),
        };
    };
    DeliveryConfig {
        workers: to_usize(fields.int_or(ctx, "workers", IntRange::between(1, 64), 4)),
        max_attempts: to_u32(fields.int_or(ctx, "max_attempts", IntRange::at_least(1), 5)),
        backoff: backoff(ctx, &fields, default_backoff),
        attempt_timeout: fields.duration_or(ctx, "attempt_timeout", secs(30)),
    }
}

fn health(ctx: &mut Ctx<'_>, node: Option<&Node>) -> HealthConfig {
    const REPORT_FILE: &str = "data/logs/health_report.json";
    let Some(fields) = ctx.section(node, "health", HEALTH_KEYS) else {
        return HealthConfig {
            window: secs(3600),
            report_interval: secs(30),
            report_file: PathBuf::from(REPORT_FILE),
        };
    };
    HealthConfig {
        window: fields.duration_or(ctx, "window", secs(3600)),
        report_interval: fields.duration_or(ctx, "report_interval", secs(30)),
        report_file: PathBuf::from(fields.string_or(ctx, "report_file", REPORT_FILE)),
    }
}

fn logging(ctx: &mut Ctx<'_>, node: Option<&Node>) -> LoggingConfig {
    let Some(fields) = ctx.section(node, "logging", LOGGING_KEYS) else {
        return LoggingConfig {
            level: "info".to_owned(),
            dir: PathBuf::from("data/logs"),
            file_prefix: "wxauto_mgt".to_owned(),
            retention_days: 7,
            format: LogFormat::Text,
            redact_chat_names: false,
        };
    };
    let level = match fields.get("level") {
        Some(node) => log_level(ctx, node, &fields.path_of("level")),
        None => None,
    };
    let file_prefix = fields.string_or(ctx, "file_prefix", "wxauto_mgt");
    if let Some(node) = fields.get("file_prefix")
        && file_prefix.contains(['/', '\\'])
    {
        let message = "must be a file name prefix, not a path (use logging.dir)";
        ctx.error(node, &fields.path_of("file_prefix"), message);
    }
    LoggingConfig {
        level: level.unwrap_or_else(|| "info".to_owned()),
        dir: PathBuf::from(fields.string_or(ctx, "dir", "data/logs")),
        file_prefix,
        // Bounded (100 years) so that date arithmetic on the days cannot overflow.
        retention_days: to_u32(fields.int_or(
            ctx,
            "retention_days",
            IntRange::between(1, 36_500),
            7,
        )),
        format: log_format(ctx, &fields),
        redact_chat_names: fields.bool_or(ctx, "redact_chat_names", false),
    }
}

/// `logging.format: text|json`.
fn log_format(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> LogFormat {
    let Some(node) = fields.get("format") else {
        return LogFormat::Text;
    };
    let path = fields.path_of("format");
    let Some(text) = ctx.string(node, &path) else {
        return LogFormat::Text;
    };
    match text.trim() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        _ => {
            ctx.error(
                node,
                &path,
                format!("unknown log format {text:?}; expected text or json"),
            );
            LogFormat::Text
        }
    }
}

/// A log filter (`parse_log_filter`), checked now so that a reload cannot install a filter the
/// logger would reject, nor one that a typo turned into "log nothing".
fn log_level(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<String> {
    let level = ctx.non_empty_string(node, path)?;
    match crate::config::parse_log_filter(&level) {
        Ok(filter) => Some(filter),
        Err(message) => {
            ctx.error(node, path, message);
            None
        }
    }
}

fn storage(ctx: &mut Ctx<'_>, node: Option<&Node>) -> StorageConfig {
    const PATH: &str = "data/wxauto_sidecar.db";
    let Some(fields) = ctx.section(node, "storage", STORAGE_KEYS) else {
        return StorageConfig {
            path: PathBuf::from(PATH),
            retention_days: 7,
            dead_retention_days: 30,
            synchronous: Synchronous::Normal,
        };
    };
    // Bounded so that `days × 86 400 000` ms can never overflow the store's clock arithmetic.
    let days = IntRange::between(1, 36_500);
    let synchronous = match fields.get("synchronous") {
        Some(node) => synchronous(ctx, node, &fields.path_of("synchronous")),
        None => Synchronous::Normal,
    };
    StorageConfig {
        path: PathBuf::from(fields.string_or(ctx, "path", PATH)),
        retention_days: to_u32(fields.int_or(ctx, "retention_days", days, 7)),
        dead_retention_days: to_u32(fields.int_or(ctx, "dead_retention_days", days, 30)),
        synchronous,
    }
}

fn synchronous(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Synchronous {
    let Some(text) = ctx.string(node, path) else {
        return Synchronous::Normal;
    };
    match text.trim() {
        "normal" => Synchronous::Normal,
        "full" => Synchronous::Full,
        _ => {
            let message = format!("unknown synchronous mode {text:?}; expected normal or full");
            ctx.error(node, path, message);
            Synchronous::Normal
        }
    }
}

fn media(ctx: &mut Ctx<'_>, node: Option<&Node>) -> MediaConfig {
    let default = MediaConfig::default();
    let Some(fields) = ctx.section(node, "media", MEDIA_KEYS) else {
        return default;
    };
    let max_bytes = fields.int_or(
        ctx,
        "max_bytes",
        IntRange::at_least(1),
        i128::from(default.max_bytes),
    );
    MediaConfig {
        download: fields.bool_or(ctx, "download", default.download),
        dir: PathBuf::from(fields.string_or(ctx, "dir", "data/downloads")),
        max_bytes: u64::try_from(max_bytes).unwrap_or(u64::MAX),
        // Bounded (100 years) so that date arithmetic on the days cannot overflow.
        retention_days: to_u32(fields.int_or(
            ctx,
            "retention_days",
            IntRange::between(1, 36_500),
            7,
        )),
    }
}

// === URLs (instances and platforms) ===

/// An `http`/`https` URL with a host, returned without a trailing slash.
pub(super) fn http_url(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<String> {
    let text = ctx.string(node, path)?;
    let shown = redact_userinfo(&text);
    let problem = match reqwest::Url::parse(text.trim()) {
        Err(err) => err.to_string(),
        Ok(url) if !matches!(url.scheme(), "http" | "https") => {
            "the scheme must be http or https".to_owned()
        }
        Ok(url) if url.host_str().is_none_or(str::is_empty) => "missing host".to_owned(),
        Ok(url) => {
            if !url.username().is_empty() || url.password().is_some() {
                // Registers the credentials (and their encodings) with the redactor now, so
                // that no later text can show them, whether or not they are sent.
                let _ = crate::secret::split_url_credentials(url.as_str());
            }
            return Some(url.as_str().trim_end_matches('/').to_owned());
        }
    };
    ctx.error(node, path, format!("invalid URL {shown:?}: {problem}"));
    None
}

/// Hides `user:password@` in a URL shown in a message: it is a credential.
fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}://****@{}", &url[..scheme_end], &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Converts a range-checked integer. Validation bounds every value far below `u32::MAX`.
pub(super) fn to_u32(value: i128) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// Converts a range-checked integer (see `to_u32`).
pub(super) fn to_usize(value: i128) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}
