//! Decoder tests: a full round trip, defaults, every error class with its exact location, and
//! the no-secrets-in-messages guarantee.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;
use crate::config::{
    ChatPattern, InstanceSelector, KeySource, KeywordMatch, PlatformKind, SendMode,
};

const FILE: &str = "config.yaml";

/// A fixed environment: `WX_KEY` and `HOOK_TOKEN` hold secrets, `EMPTY` is set but empty.
fn env(name: &str) -> Option<String> {
    match name {
        "WX_KEY" => Some("env-secret-Kq81".to_owned()),
        "HOOK_TOKEN" => Some("Bearer hook-secret-Zp3".to_owned()),
        "OPENAI_KEY" => Some("sk-openai-secret-Vw5".to_owned()),
        "SHORT" => Some("Zq7".to_owned()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fn decode_text(text: &str) -> Result<Loaded, ConfigErrors> {
    decode(text, Some(Path::new(FILE)), &env)
}

/// The errors of `text`, each rendered as `line:col: key_path: message` (file name dropped).
fn errors_of(text: &str) -> Vec<String> {
    match decode_text(text) {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .errors
            .iter()
            .map(|error| {
                let rendered = error.to_string();
                rendered
                    .strip_prefix(&format!("{FILE}:"))
                    .unwrap_or(&rendered)
                    .to_owned()
            })
            .collect(),
    }
}

/// Asserts that `text` fails with exactly `expected` (in file order).
#[track_caller]
fn check(text: &str, expected: &[&str]) {
    let actual = errors_of(text);
    assert_eq!(actual, expected, "config:\n{text}");
}

fn valid(text: &str) -> Loaded {
    match decode_text(text) {
        Ok(loaded) => loaded,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

// === valid configs ===

#[test]
fn full_config_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("wx-b.key"), "file-secret-Hd42\n").expect("write key");
    let text = r#"server:
  listen: 0.0.0.0:9000
  enable_lifecycle: true
listener:
  poll_interval: 2s
  health_check_interval: 15s
  listener_timeout: 1h
  forget_inactive_after: 2h
  max_listeners_per_instance: 12
  request_timeout: 3s
  backoff: {initial: 500ms, max: 2m}
instances:
  - id: wx-a
    base_url: http://127.0.0.1:5000/
    api_key_env: WX_KEY
  - id: wx-b
    base_url: https://wx.example.com/base/
    api_key_file: wx-b.key
    enabled: false
  - id: wx.c_3
    base_url: http://10.0.0.3:5000
    api_key: inline-secret-Mx9
fixed_listeners:
  - chat: 文件传输助手
  - chat: ops
    instances: [wx-a, wx-b]
  - chat: all
    instances: "*"
platforms:
  - id: faq
    type: keyword
    message_send_mode: typing
    timeout: 5s
    keywords:
      - keywords: [hello, hi]
        match_type: exact
        replies: [Hello!, Hi!]
        random: true
      - keywords: ['order \d+']
        match_type: regex
        replies: [Looking it up]
      - keywords: [help]
        replies: [See the FAQ]
  - id: hook
    type: webhook
    url: https://hooks.example.com/in
    headers: {X-Static: static-secret-Qa1}
    headers_from_env: {Authorization: HOOK_TOKEN}
  - id: gpt
    type: openai
    api_base: https://llm.example.com/v1/
    api_key_env: OPENAI_KEY
    model: gpt-4o-mini
    system_prompt: Be brief.
    temperature: 0.7
    max_tokens: 256
    history: 3
  - id: bot
    type: dify
    api_base: https://dify.example.com/v1
    api_key_env: WX_KEY
    user_id: sidecar-user
rules:
  - id: catch-all
    platform: faq
  - id: vip
    instance: wx-a
    chat: "alice, bob"
    platform: gpt
    priority: 10
    only_at: true
    at_names: [bot, 机器人]
    reply_at_sender: true
  - id: orders
    chat: "regex:order-.*"
    platform: hook
delivery:
  workers: 8
  max_attempts: 3
  backoff: {initial: 1s, max: 1m}
  attempt_timeout: 20s
health:
  window: 30m
  report_interval: 10s
  report_file: out/health.json
logging:
  level: wxauto_sidecar=debug,info
  dir: out/logs
  file_prefix: sidecar
  retention_days: 14
  format: json
  redact_chat_names: true
storage:
  path: out/db.sqlite
  retention_days: 3
"#;
    let config_path = dir.path().join("config.yaml");
    let loaded = decode(text, Some(&config_path), &env).unwrap_or_else(|errors| panic!("{errors}"));
    let config = &loaded.config;

    assert_eq!(config.server.listen.to_string(), "0.0.0.0:9000");
    assert!(config.server.enable_lifecycle);

    let listener = &config.listener;
    assert_eq!(listener.poll_interval, Duration::from_secs(2));
    assert_eq!(listener.health_check_interval, Duration::from_secs(15));
    assert_eq!(listener.listener_timeout, Duration::from_secs(3600));
    assert_eq!(listener.forget_inactive_after, Duration::from_secs(7200));
    assert_eq!(listener.max_listeners_per_instance, 12);
    assert_eq!(listener.request_timeout, Duration::from_secs(3));
    assert_eq!(listener.backoff.initial, Duration::from_millis(500));
    assert_eq!(listener.backoff.max, Duration::from_secs(120));

    let [a, b, c] = config.instances.as_slice() else {
        panic!("three instances expected: {:?}", config.instances);
    };
    assert_eq!(
        (a.id.as_str(), a.base_url.as_str(), a.enabled),
        ("wx-a", "http://127.0.0.1:5000", true)
    );
    assert_eq!(a.api_key.expose(), "env-secret-Kq81");
    assert_eq!(a.api_key_source, KeySource::Env("WX_KEY".to_owned()));
    assert_eq!(
        (b.id.as_str(), b.base_url.as_str(), b.enabled),
        ("wx-b", "https://wx.example.com/base", false)
    );
    assert_eq!(b.api_key.expose(), "file-secret-Hd42");
    let key_file = dir.path().join("wx-b.key");
    assert_eq!(b.api_key_source, KeySource::File(key_file.clone()));
    assert_eq!(c.id, "wx.c_3");
    assert_eq!(c.api_key.expose(), "inline-secret-Mx9");
    assert_eq!(c.api_key_source, KeySource::Inline);

    let fixed: Vec<(&str, &InstanceSelector)> = config
        .fixed_listeners
        .iter()
        .map(|fixed| (fixed.chat.as_str(), &fixed.instances))
        .collect();
    let ids = InstanceSelector::Ids(vec!["wx-a".to_owned(), "wx-b".to_owned()]);
    assert_eq!(
        fixed,
        [
            ("文件传输助手", &InstanceSelector::All),
            ("ops", &ids),
            ("all", &InstanceSelector::All)
        ]
    );

    let [faq, hook, gpt, bot] = config.platforms.as_slice() else {
        panic!("four platforms expected");
    };
    assert_eq!(
        (faq.id.as_str(), faq.send_mode, faq.timeout),
        ("faq", SendMode::Typing, Duration::from_secs(5))
    );
    let PlatformKind::Keyword(keyword) = &faq.kind else {
        panic!("faq is a keyword platform");
    };
    let [greet, order, help] = keyword.keywords.as_slice() else {
        panic!("three keyword entries expected");
    };
    assert_eq!(greet.keywords, ["hello", "hi"]);
    assert_eq!(greet.match_type, KeywordMatch::Exact);
    assert_eq!(greet.replies, ["Hello!", "Hi!"]);
    assert!(greet.random && greet.patterns.is_empty());
    assert_eq!(order.match_type, KeywordMatch::Regex);
    assert_eq!(order.patterns.len(), 1);
    assert!(order.patterns[0].is_match("order 42"));
    assert!(!order.patterns[0].is_match("my order 42"), "fully anchored");
    assert!(!order.random);
    assert_eq!(help.match_type, KeywordMatch::Contains);

    assert_eq!(
        (hook.id.as_str(), hook.send_mode, hook.timeout),
        ("hook", SendMode::Normal, Duration::from_secs(10))
    );
    let PlatformKind::Webhook(webhook) = &hook.kind else {
        panic!("hook is a webhook platform");
    };
    assert_eq!(webhook.url, "https://hooks.example.com/in");
    let headers: Vec<(&str, &str)> = webhook
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.expose()))
        .collect();
    assert_eq!(
        headers,
        [
            ("X-Static", "static-secret-Qa1"),
            ("Authorization", "Bearer hook-secret-Zp3")
        ]
    );

    let PlatformKind::OpenAi(openai) = &gpt.kind else {
        panic!("gpt is an openai platform");
    };
    assert_eq!(openai.api_base, "https://llm.example.com/v1");
    assert_eq!(openai.api_key.expose(), "sk-openai-secret-Vw5");
    assert_eq!(openai.model, "gpt-4o-mini");
    assert_eq!(openai.system_prompt.as_deref(), Some("Be brief."));
    assert_eq!(openai.temperature, Some(0.7));
    assert_eq!(openai.max_tokens, Some(256));
    assert_eq!(openai.history, 3);

    let PlatformKind::Dify(dify) = &bot.kind else {
        panic!("bot is a dify platform");
    };
    assert_eq!(dify.api_base, "https://dify.example.com/v1");
    assert_eq!(dify.api_key.expose(), "env-secret-Kq81");
    assert_eq!(dify.user_id, "sidecar-user");

    // Sorted: priority 10 first, then the regex rule before the catch-all (same priority).
    let order: Vec<&str> = config.rules.iter().map(|rule| rule.id.as_str()).collect();
    assert_eq!(order, ["vip", "orders", "catch-all"]);
    let vip = &config.rules[0];
    assert_eq!(vip.instance, InstanceSelector::Ids(vec!["wx-a".to_owned()]));
    assert!(matches!(&vip.chat, ChatPattern::List(names) if names == &["alice", "bob"]));
    assert_eq!(vip.platform, "gpt");
    assert_eq!(vip.priority, 10);
    assert!(vip.only_at && vip.reply_at_sender);
    assert_eq!(vip.at_names, ["bot", "机器人"]);
    let orders = &config.rules[1];
    assert!(orders.chat.matches("order-1") && !orders.chat.matches("my order-1"));
    let catch_all = &config.rules[2];
    assert!(matches!(catch_all.chat, ChatPattern::Any));
    assert_eq!(catch_all.instance, InstanceSelector::All);
    assert_eq!(catch_all.priority, 0);
    assert!(!catch_all.only_at && !catch_all.reply_at_sender && catch_all.at_names.is_empty());

    let delivery = &config.delivery;
    assert_eq!((delivery.workers, delivery.max_attempts), (8, 3));
    assert_eq!(delivery.backoff.initial, Duration::from_secs(1));
    assert_eq!(delivery.backoff.max, Duration::from_secs(60));
    assert_eq!(delivery.attempt_timeout, Duration::from_secs(20));

    assert_eq!(config.health.window, Duration::from_secs(1800));
    assert_eq!(config.health.report_interval, Duration::from_secs(10));
    assert_eq!(config.health.report_file, PathBuf::from("out/health.json"));
    assert_eq!(config.logging.level, "wxauto_sidecar=debug,info");
    assert_eq!(config.logging.dir, PathBuf::from("out/logs"));
    assert_eq!(config.logging.file_prefix, "sidecar");
    assert_eq!(config.logging.retention_days, 14);
    assert_eq!(config.logging.format, crate::config::LogFormat::Json);
    assert!(config.logging.redact_chat_names);
    assert_eq!(config.storage.path, PathBuf::from("out/db.sqlite"));
    assert_eq!(config.storage.retention_days, 3);

    assert_eq!(config.source.path.as_deref(), Some(config_path.as_path()));
    assert_eq!(config.source.referenced_files, [key_file]);
    assert_eq!(
        config.source.hash,
        crate::config::fnv1a64(&[text.as_bytes(), b"file-secret-Hd42\n"])
    );
    assert_eq!(
        loaded.warnings,
        [format!(
            "{}:22:14: instances[2].api_key: inline API key; prefer api_key_env or api_key_file",
            config_path.display()
        )]
    );
}

#[test]
fn empty_instances_is_valid_and_everything_defaults() {
    let loaded = valid("instances: []\n");
    let config = &loaded.config;
    assert!(loaded.warnings.is_empty());
    assert!(config.instances.is_empty() && config.platforms.is_empty() && config.rules.is_empty());
    assert!(config.fixed_listeners.is_empty());
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8907");
    assert!(!config.server.enable_lifecycle);
    let listener = &config.listener;
    assert_eq!(listener.poll_interval, Duration::from_secs(5));
    assert_eq!(listener.health_check_interval, Duration::from_secs(30));
    assert_eq!(listener.listener_timeout, Duration::from_secs(30 * 60));
    assert_eq!(listener.forget_inactive_after, Duration::from_secs(60 * 60));
    assert_eq!(listener.max_listeners_per_instance, 30);
    assert_eq!(listener.request_timeout, Duration::from_secs(10));
    assert_eq!(listener.backoff.initial, Duration::from_secs(1));
    assert_eq!(listener.backoff.max, Duration::from_secs(60));
    let delivery = &config.delivery;
    assert_eq!((delivery.workers, delivery.max_attempts), (4, 5));
    assert_eq!(delivery.backoff.initial, Duration::from_secs(2));
    assert_eq!(delivery.backoff.max, Duration::from_secs(300));
    assert_eq!(delivery.attempt_timeout, Duration::from_secs(30));
    assert_eq!(config.health.window, Duration::from_secs(3600));
    assert_eq!(config.health.report_interval, Duration::from_secs(30));
    assert_eq!(
        config.health.report_file,
        PathBuf::from("data/logs/health_report.json")
    );
    assert_eq!(config.logging.level, "info");
    assert_eq!(config.logging.dir, PathBuf::from("data/logs"));
    assert_eq!(config.logging.file_prefix, "wxauto_mgt");
    assert_eq!(config.logging.retention_days, 7);
    assert_eq!(config.logging.format, crate::config::LogFormat::Text);
    assert!(!config.logging.redact_chat_names);
    assert_eq!(config.storage.path, PathBuf::from("data/wxauto_sidecar.db"));
    assert_eq!(config.storage.retention_days, 7);
    assert!(config.source.referenced_files.is_empty());
    assert_eq!(
        config.source.hash,
        crate::config::fnv1a64(&[b"instances: []\n"])
    );
}

#[test]
fn null_sections_mean_defaults() {
    let config = valid("server:\nlistener:\nhealth: ~\ninstances: []\n").config;
    assert_eq!(config.listener.poll_interval, Duration::from_secs(5));
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8907");
}

#[test]
fn platform_defaults() {
    let config = valid(
        "instances: []\nplatforms:\n  - id: k\n    type: keyword\n    keywords: []\n  - id: o\n    type: openai\n    api_key_env: WX_KEY\n    model: m\n  - id: d\n    type: dify\n    api_base: http://dify\n    api_key_env: WX_KEY\n",
    )
    .config;
    let [keyword, openai, dify] = config.platforms.as_slice() else {
        panic!("three platforms");
    };
    assert_eq!(keyword.send_mode, SendMode::Normal);
    assert_eq!(keyword.timeout, Duration::from_secs(10));
    let PlatformKind::OpenAi(openai) = &openai.kind else {
        panic!("openai");
    };
    assert_eq!(openai.api_base, "https://api.openai.com/v1");
    assert_eq!((openai.history, openai.max_tokens), (0, None));
    assert!(openai.temperature.is_none() && openai.system_prompt.is_none());
    let PlatformKind::Dify(dify) = &dify.kind else {
        panic!("dify");
    };
    assert_eq!(dify.user_id, "wxauto-sidecar");
    assert_eq!(dify.api_base, "http://dify");
}

#[test]
fn numeric_looking_strings_keep_their_spelling() {
    // The multi-byte chat name first: spans are byte offsets, columns are characters.
    let config = valid(
        "fixed_listeners:\n  - chat: 文件传输助手\n  - chat: 007\ninstances:\n  - id: 0x10\n    base_url: http://h\n    api_key_env: WX_KEY\n",
    )
    .config;
    assert_eq!(config.instances[0].id, "0x10");
    assert_eq!(config.fixed_listeners[1].chat, "007");
}

#[test]
fn anchors_and_merge_keys_work() {
    let config = valid(concat!(
        "instances:\n",
        "  - &base {id: wx-a, base_url: http://h, api_key_env: WX_KEY}\n",
        "  - <<: *base\n",
        "    id: wx-b\n",
    ))
    .config;
    let ids: Vec<&str> = config.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["wx-a", "wx-b"]);
    assert_eq!(config.instances[1].base_url, "http://h");
}

#[test]
fn builtin_config_uses_builtin_file_name() {
    let errors = decode("instances: 3\n", None, &env).expect_err("invalid");
    assert_eq!(
        errors.to_string(),
        "<builtin>:1:12: instances: expected a list, found an integer"
    );
}

// === errors: one class per case, with exact line:col and key path ===

/// `instances: []` plus the given sections, so single-section cases stay short.
fn with_empty_instances(rest: &str) -> String {
    format!("instances: []\n{rest}")
}

/// One valid instance (lines 2-4), then `rest` from line 5.
fn with_instance(rest: &str) -> String {
    format!("instances:\n  - id: wx-a\n    base_url: http://h\n    api_key_env: WX_KEY\n{rest}")
}

#[test]
fn structure_errors() {
    check("", &["1:1: instances: missing required key"]);
    check("server: {}\n", &["1:1: instances: missing required key"]);
    check("- 1\n", &["1:1: expected a map, found a list"]);
    check(
        "instances:\n",
        &["1:10: instances: expected a list, found null"],
    );
    check(
        "instances: {}\n",
        &["1:12: instances: expected a list, found a map"],
    );
    check(
        "instances: []\nbogus: 1\n",
        &[
            "2:1: bogus: unknown key \"bogus\"; allowed keys: server, listener, instances, fixed_listeners, platforms, rules, delivery, health, logging, storage, media, processes",
        ],
    );
    check(
        "instances: []\nserver:\n  listen: 127.0.0.1:1\n  listen: 127.0.0.1:2\n",
        &["4:3: server.listen: duplicate key \"listen\" (first at line 3)"],
    );
    check(
        "instances: []\ninstances: []\n",
        &["2:1: instances: duplicate key \"instances\" (first at line 1)"],
    );
    check(
        "instances: []\nserver: [1]\n",
        &["2:9: server: expected a map, found a list"],
    );
    check(
        "instances: [3]\n",
        &["1:13: instances[0]: expected a map, found an integer"],
    );
}

#[test]
fn syntax_error_is_the_only_error() {
    check(
        "instances: [\nbogus: 1\n",
        &["1:12: invalid YAML: unclosed bracket '['"],
    );
    check(
        "instances: []\nserver:\n\tlisten: x\n",
        &["3:2: invalid YAML: tabs disallowed within this context (block indentation)"],
    );
    check(
        "instances: []\n---\ninstances: []\n",
        &[
            "3:1: invalid YAML: multiple YAML documents detected; use from_str_multiple or from_str_multiple_with_options",
        ],
    );
}

#[test]
fn scalar_type_errors() {
    check(
        &with_empty_instances("server:\n  enable_lifecycle: yes\n"),
        &[
            "3:21: server.enable_lifecycle: expected true or false, found \"yes\" (yes/no/on/off are not booleans)",
        ],
    );
    check(
        &with_empty_instances("server:\n  enable_lifecycle: \"true\"\n"),
        &["3:21: server.enable_lifecycle: expected true or false, found a string"],
    );
    check(
        &with_empty_instances("server:\n  enable_lifecycle: 1\n"),
        &["3:21: server.enable_lifecycle: expected true or false, found an integer"],
    );
    check(
        &with_empty_instances("listener:\n  max_listeners_per_instance: ten\n"),
        &["3:31: listener.max_listeners_per_instance: expected an integer, found a string"],
    );
    check(
        &with_empty_instances("listener:\n  max_listeners_per_instance: 0\n"),
        &["3:31: listener.max_listeners_per_instance: must be at least 1, got 0"],
    );
    check(
        &with_empty_instances("listener:\n  max_listeners_per_instance: 1.5\n"),
        &["3:31: listener.max_listeners_per_instance: expected an integer, found a number"],
    );
    check(
        &with_empty_instances("storage:\n  path: [a]\n"),
        &["3:9: storage.path: expected a string, found a list"],
    );
    check(
        &with_empty_instances("storage:\n  path: ''\n"),
        &["3:9: storage.path: must not be empty"],
    );
}

#[test]
fn duration_errors() {
    check(
        &with_empty_instances("listener:\n  poll_interval: 5\n"),
        &["3:18: listener.poll_interval: expected a duration such as \"5s\", found an integer"],
    );
    check(
        &with_empty_instances("listener:\n  poll_interval: 0s\n"),
        &["3:18: listener.poll_interval: must be greater than zero"],
    );
    check(
        &with_empty_instances("health:\n  window: 5 parsecs\n"),
        &[
            "3:11: health.window: invalid duration \"5 parsecs\": unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)",
        ],
    );
    check(
        &with_empty_instances("listener:\n  backoff: {initial: 2m, max: 1m}\n"),
        &["3:22: listener.backoff: initial (2m) must not exceed max (1m)"],
    );
    // A lone `initial` is compared with the default max (60s).
    check(
        &with_empty_instances("listener:\n  backoff:\n    initial: 2m\n"),
        &["4:14: listener.backoff: initial (2m) must not exceed max (1m)"],
    );
    check(
        &with_empty_instances("delivery:\n  backoff: {initial: 10m, max: 5m}\n"),
        &["3:22: delivery.backoff: initial (10m) must not exceed max (5m)"],
    );
    check(
        &with_empty_instances("delivery:\n  backoff: {start: 1s}\n"),
        &["3:13: delivery.backoff.start: unknown key \"start\"; allowed keys: initial, max"],
    );
}

#[test]
fn section_value_errors() {
    check(
        &with_empty_instances("server:\n  listen: localhost:8907\n"),
        &[
            "3:11: server.listen: invalid socket address \"localhost:8907\": expected IP:port, e.g. 127.0.0.1:8907 or [::1]:8907",
        ],
    );
    check(
        &with_empty_instances("delivery:\n  workers: 65\n  max_attempts: 0\n"),
        &[
            "3:12: delivery.workers: must be between 1 and 64, got 65",
            "4:17: delivery.max_attempts: must be at least 1, got 0",
        ],
    );
    check(
        &with_empty_instances(
            "logging:\n  level: \"a=b=c\"\n  retention_days: 0\n  file_prefix: a/b\n",
        ),
        &[
            "3:10: logging.level: invalid log filter \"a=b=c\": error parsing level filter: expected one of \"off\", \"error\", \"warn\", \"info\", \"debug\", \"trace\", or a number 0-5",
            "4:19: logging.retention_days: must be between 1 and 36500, got 0",
            "5:16: logging.file_prefix: must be a file name prefix, not a path (use logging.dir)",
        ],
    );
    // A bare word is a target name to `tracing` (`warnn` would log nothing at all), so only
    // level names may stand alone.
    check(
        &with_empty_instances("logging:\n  level: warnn\n"),
        &[
            "3:10: logging.level: unknown log level \"warnn\"; expected one of trace, debug, info, warn, error, off, or target=level (e.g. info,wxauto_sidecar=debug)",
        ],
    );
    check(
        &with_empty_instances("logging:\n  level: \"hyper=warn,  wxauto_sidecar\"\n"),
        &[
            "3:10: logging.level: unknown log level \"wxauto_sidecar\"; expected one of trace, debug, info, warn, error, off, or target=level (e.g. info,wxauto_sidecar=debug)",
        ],
    );
    assert_eq!(
        valid(&with_empty_instances(
            "logging:\n  level: WARN, hyper=off\n"
        ))
        .config
        .logging
        .level,
        "WARN,hyper=off"
    );
    check(
        &with_empty_instances("logging:\n  format: yaml\n  redact_chat_names: sometimes\n"),
        &[
            "3:11: logging.format: unknown log format \"yaml\"; expected text or json",
            "4:22: logging.redact_chat_names: expected true or false, found a string",
        ],
    );
    check(
        &with_empty_instances("storage:\n  retention_days: 99999999999\n"),
        &["3:19: storage.retention_days: must be between 1 and 36500, got 99999999999"],
    );
}

#[test]
fn instance_errors() {
    check(
        "instances:\n  - base_url: http://h\n    api_key_env: WX_KEY\n",
        &["2:5: instances[0].id: missing required key"],
    );
    check(
        "instances:\n  - id: wx-a\n    api_key_env: WX_KEY\n",
        &["2:5: instances[0].base_url: missing required key"],
    );
    check(
        "instances:\n  - id: wx a\n    base_url: http://h\n    api_key_env: WX_KEY\n",
        &[
            "2:9: instances[0].id: invalid instance id \"wx a\": use 1 to 64 characters from A-Z a-z 0-9 _ . -",
        ],
    );
    let long = "x".repeat(65);
    check(
        &format!("instances:\n  - id: {long}\n    base_url: http://h\n    api_key_env: WX_KEY\n"),
        &[&format!(
            "2:9: instances[0].id: invalid instance id \"{long}\": use 1 to 64 characters from A-Z a-z 0-9 _ . -"
        )],
    );
    check(
        &with_instance("  - id: wx-a\n    base_url: http://h2\n    api_key_env: WX_KEY\n"),
        &["5:9: instances[1].id: duplicate instance id \"wx-a\" (first defined at line 2)"],
    );
    check(
        "instances:\n  - id: a\n    base_url: htp:/x\n    api_key_env: WX_KEY\n",
        &["3:15: instances[0].base_url: invalid URL \"htp:/x\": the scheme must be http or https"],
    );
    check(
        "instances:\n  - id: a\n    base_url: 127.0.0.1:5000\n    api_key_env: WX_KEY\n",
        &[
            "3:15: instances[0].base_url: invalid URL \"127.0.0.1:5000\": relative URL without a base",
        ],
    );
    check(
        "instances:\n  - id: a\n    base_url: http://user:pw@/x\n    api_key_env: WX_KEY\n",
        &["3:15: instances[0].base_url: invalid URL \"http://****@/x\": empty host"],
    );
    check(
        "instances:\n  - id: a\n    base_url: http://h\n    api_key_env: WX_KEY\n    enabled: on\n",
        &[
            "5:14: instances[0].enabled: expected true or false, found \"on\" (yes/no/on/off are not booleans)",
        ],
    );
    check(
        "instances:\n  - id: a\n    base_url: http://h\n    api_key_env: WX_KEY\n    port: 1\n",
        &[
            "5:5: instances[0].port: unknown key \"port\"; allowed keys: id, base_url, api_key_env, api_key_file, api_key, enabled, listener",
        ],
    );
}

#[test]
fn api_key_errors() {
    let instance =
        |key_lines: &str| format!("instances:\n  - id: a\n    base_url: http://h\n{key_lines}");
    check(
        &instance(""),
        &[
            "2:5: instances[0]: missing API key: set exactly one of api_key_env, api_key_file or api_key",
        ],
    );
    check(
        &instance("    api_key_env: WX_KEY\n    api_key: inline-key\n"),
        &[
            "5:14: instances[0].api_key: conflicts with api_key_env: set exactly one of api_key_env, api_key_file or api_key",
        ],
    );
    check(
        &instance("    api_key_env: NOT_SET\n"),
        &["4:18: instances[0].api_key_env: environment variable \"NOT_SET\" is not set"],
    );
    check(
        &instance("    api_key_env: EMPTY\n"),
        &["4:18: instances[0].api_key_env: environment variable \"EMPTY\" is empty"],
    );
    check(
        &instance("    api_key_env: SHORT\n"),
        &[
            "4:18: instances[0].api_key_env: API key from environment variable \"SHORT\" is too short (at least 4 characters)",
        ],
    );
    check(
        &instance("    api_key: abc\n"),
        &["4:14: instances[0].api_key: inline API key is too short (at least 4 characters)"],
    );
    check(
        &instance("    api_key: ''\n"),
        &["4:14: instances[0].api_key: must not be empty"],
    );
}

#[test]
fn api_key_file_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(dir.path().join("empty.key"), "\n").expect("write");
    std::fs::write(dir.path().join("short.key"), "Zq7\n").expect("write");
    let run = |file: &str| {
        let text =
            format!("instances:\n  - id: a\n    base_url: http://h\n    api_key_file: {file}\n");
        decode(&text, Some(&config_path), &env)
            .expect_err("invalid")
            .errors
            .into_iter()
            .map(|error| {
                format!(
                    "{}:{}: {}: {}",
                    error.line, error.column, error.key_path, error.message
                )
            })
            .collect::<Vec<_>>()
    };
    let missing = dir.path().join("missing.key");
    // The OS's own wording, e.g. "No such file or directory (os error 2)".
    let os_reason = std::fs::read(&missing).expect_err("missing").to_string();
    assert_eq!(
        run("missing.key"),
        [format!(
            "4:19: instances[0].api_key_file: cannot read API key file \"{}\": {os_reason}",
            missing.display()
        )]
    );
    assert_eq!(
        run("empty.key"),
        [format!(
            "4:19: instances[0].api_key_file: API key file \"{}\" is empty",
            dir.path().join("empty.key").display()
        )]
    );
    assert_eq!(
        run("short.key"),
        [format!(
            "4:19: instances[0].api_key_file: API key in file \"{}\" is too short (at least 4 characters)",
            dir.path().join("short.key").display()
        )]
    );
}

#[test]
fn fixed_listener_errors() {
    check(
        &with_instance(
            "fixed_listeners:\n  - chat: ''\n  - instances: [wx-a]\n  - chat: x\n    instances: [wx-a, wx-b]\n  - chat: y\n    instances: []\n  - chat: z\n    instances: all\n",
        ),
        &[
            "6:11: fixed_listeners[0].chat: must not be empty",
            "7:5: fixed_listeners[1].chat: missing required key",
            "9:23: fixed_listeners[2].instances[1]: unknown instance id \"wx-b\"",
            "11:16: fixed_listeners[3].instances: must not be empty; use \"*\" for every instance",
            "13:16: fixed_listeners[4].instances: expected \"*\" or a list of instance ids",
        ],
    );
}

#[test]
fn platform_errors() {
    check(
        &with_empty_instances(
            "platforms:\n  - type: keyword\n    keywords: []\n  - id: x\n  - id: y\n    type: mail\n    to: me\n",
        ),
        &[
            "3:5: platforms[0].id: missing required key",
            "5:5: platforms[1].type: missing required key",
            "7:11: platforms[2].type: unknown platform type \"mail\"; expected keyword, webhook, openai, dify or coze",
        ],
    );
    check(
        &with_empty_instances(
            "platforms:\n  - id: k\n    type: keyword\n    keywords: []\n  - id: k\n    type: keyword\n    keywords: []\n",
        ),
        &["6:9: platforms[1].id: duplicate platform id \"k\" (first defined at line 3)"],
    );
    check(
        &with_empty_instances(
            "platforms:\n  - id: k\n    type: keyword\n    keywords: []\n    url: http://x\n    message_send_mode: shout\n    timeout: 30s\n",
        ),
        &[
            "6:5: platforms[0].url: unknown key \"url\" for a keyword platform; allowed keys: id, type, message_send_mode, timeout, keywords",
            "7:24: platforms[0].message_send_mode: unknown send mode \"shout\"; expected normal or typing",
            "8:14: platforms[0].timeout: 30s must be shorter than delivery.attempt_timeout (30s)",
        ],
    );
    // The default timeout (10s) is checked against a shorter attempt timeout too.
    check(
        &with_empty_instances(
            "delivery:\n  attempt_timeout: 5s\nplatforms:\n  - id: k\n    type: keyword\n    keywords: []\n",
        ),
        &["5:5: platforms[0].timeout: 10s must be shorter than delivery.attempt_timeout (5s)"],
    );
}

#[test]
fn keyword_platform_errors() {
    check(
        &with_empty_instances(concat!(
            "platforms:\n",
            "  - id: k\n",
            "    type: keyword\n",
            "    keywords:\n",
            "      - keywords: []\n",
            "        replies: [a]\n",
            "      - keywords: ['(', 'ok']\n",
            "        match_type: regex\n",
            "        replies: []\n",
            "      - keywords: [a]\n",
            "        match_type: fuzzy\n",
            "        replies: [b, '']\n",
            "        random: maybe\n",
            "      - replies: [a]\n",
        )),
        &[
            "6:19: platforms[0].keywords[0].keywords: must not be empty",
            "8:20: platforms[0].keywords[1].keywords[0]: invalid regex \"(\": unclosed group",
            "10:18: platforms[0].keywords[1].replies: must not be empty",
            "12:21: platforms[0].keywords[2].match_type: unknown match type \"fuzzy\"; expected exact, contains or regex",
            "13:22: platforms[0].keywords[2].replies[1]: must not be empty",
            "14:17: platforms[0].keywords[2].random: expected true or false, found a string",
            "15:9: platforms[0].keywords[3].keywords: missing required key",
        ],
    );
    check(
        &with_empty_instances("platforms:\n  - id: k\n    type: keyword\n"),
        &["3:5: platforms[0].keywords: missing required key"],
    );
}

#[test]
fn webhook_platform_errors() {
    check(
        &with_empty_instances(concat!(
            "platforms:\n",
            "  - id: w\n",
            "    type: webhook\n",
            "    url: ftp://x\n",
            "    headers: {Bad Name: v, X-A: \"a\\nb\", x-b: 1}\n",
            "    headers_from_env: {X-B: HOOK_TOKEN, X-C: NOT_SET}\n",
        )),
        &[
            "5:10: platforms[0].url: invalid URL \"ftp://x\": the scheme must be http or https",
            "6:15: platforms[0].headers.Bad Name: invalid HTTP header name \"Bad Name\"",
            "6:33: platforms[0].headers.X-A: the header value contains characters not allowed in HTTP headers",
            "7:24: platforms[0].headers_from_env.X-B: header \"X-B\" is set twice (names are case-insensitive)",
            "7:46: platforms[0].headers_from_env.X-C: environment variable \"NOT_SET\" is not set",
        ],
    );
    check(
        &with_empty_instances("platforms:\n  - id: w\n    type: webhook\n    headers: [a]\n"),
        &[
            "3:5: platforms[0].url: missing required key",
            "5:14: platforms[0].headers: expected a map, found a list",
        ],
    );
}

#[test]
fn openai_and_dify_errors() {
    check(
        &with_empty_instances(concat!(
            "platforms:\n",
            "  - id: o\n",
            "    type: openai\n",
            "    api_base: not a url\n",
            "    temperature: 2.5\n",
            "    max_tokens: 0\n",
            "    history: -1\n",
            "    user_id: u\n",
        )),
        &[
            "3:5: platforms[0]: missing API key: set exactly one of api_key_env, api_key_file or api_key",
            "3:5: platforms[0].model: missing required key",
            "5:15: platforms[0].api_base: invalid URL \"not a url\": relative URL without a base",
            "6:18: platforms[0].temperature: must be between 0 and 2, got 2.5",
            "7:17: platforms[0].max_tokens: must be at least 1, got 0",
            "8:14: platforms[0].history: must be at least 0, got -1",
            "9:5: platforms[0].user_id: unknown key \"user_id\" for a openai platform; allowed keys: id, type, message_send_mode, timeout, api_base, model, system_prompt, temperature, max_tokens, history, vision, api_key_env, api_key_file, api_key",
        ],
    );
    check(
        &with_empty_instances(
            "platforms:\n  - id: d\n    type: dify\n    api_key_env: NOT_SET\n    user_id: ''\n",
        ),
        &[
            "3:5: platforms[0].api_base: missing required key",
            "5:18: platforms[0].api_key_env: environment variable \"NOT_SET\" is not set",
            "6:14: platforms[0].user_id: must not be empty",
        ],
    );
}

#[test]
fn rule_errors() {
    let prefix =
        with_instance("platforms:\n  - id: faq\n    type: keyword\n    keywords: []\nrules:\n");
    // Rules start at line 10.
    check(
        &format!(
            "{prefix}  - platform: faq\n  - id: r1\n  - id: r2\n    platform: nope\n    instance: wx-z\n"
        ),
        &[
            "10:5: rules[0].id: missing required key",
            "11:5: rules[1].platform: missing required key",
            "13:15: rules[2].platform: unknown platform \"nope\"",
            "14:15: rules[2].instance: unknown instance id \"wx-z\"",
        ],
    );
    check(
        &format!("{prefix}  - id: r1\n    platform: faq\n  - id: r1\n    platform: faq\n"),
        &["12:9: rules[1].id: duplicate rule id \"r1\" (first defined at line 10)"],
    );
    check(
        &format!(
            "{prefix}  - id: r1\n    platform: faq\n    chat: \"a, , b\"\n  - id: r2\n    platform: faq\n    chat: \"regex:(\"\n  - id: r3\n    platform: faq\n    chat: \"regex:\"\n"
        ),
        &[
            "12:11: rules[0].chat: empty name in chat list \"a, , b\"",
            "15:11: rules[1].chat: invalid regex \"(\": unclosed group",
            "18:11: rules[2].chat: empty pattern after \"regex:\"",
        ],
    );
    check(
        &format!(
            "{prefix}  - id: r1\n    platform: faq\n    only_at: true\n  - id: r2\n    platform: faq\n    only_at: true\n    at_names: []\n  - id: r3\n    platform: faq\n    priority: high\n    at_names: ['']\n"
        ),
        &[
            "12:14: rules[0].at_names: must name at least one name when only_at is true",
            "16:15: rules[1].at_names: must name at least one name when only_at is true",
            "19:15: rules[2].priority: expected an integer, found a string",
            "20:16: rules[2].at_names[0]: must not be empty",
        ],
    );
}

#[test]
fn every_error_in_one_file_is_reported() {
    let text = concat!(
        "server:\n",
        "  listen: nowhere\n",
        "instances:\n",
        "  - id: wx-a\n",
        "    base_url: htp:/x\n",
        "    api_key_env: NOT_SET\n",
        "  - id: wx-a\n",
        "    base_url: http://h\n",
        "    api_key: inline-secret-Mx9\n",
        "delivery:\n",
        "  workers: 0\n",
        "rules:\n",
        "  - id: r\n",
        "    platform: none\n",
    );
    check(
        text,
        &[
            "2:11: server.listen: invalid socket address \"nowhere\": expected IP:port, e.g. 127.0.0.1:8907 or [::1]:8907",
            "5:15: instances[0].base_url: invalid URL \"htp:/x\": the scheme must be http or https",
            "6:18: instances[0].api_key_env: environment variable \"NOT_SET\" is not set",
            "7:9: instances[1].id: duplicate instance id \"wx-a\" (first defined at line 4)",
            "11:12: delivery.workers: must be between 1 and 64, got 0",
            "14:15: rules[0].platform: unknown platform \"none\"",
        ],
    );
}

#[test]
fn rules_are_sorted_into_matching_order() {
    let config = valid(&with_instance(concat!(
        "platforms:\n",
        "  - id: p\n",
        "    type: keyword\n",
        "    keywords: []\n",
        "rules:\n",
        "  - {id: any-b, platform: p}\n",
        "  - {id: any-a, platform: p}\n",
        "  - {id: regex, platform: p, chat: 'regex:x.*'}\n",
        "  - {id: list, platform: p, chat: 'x, y'}\n",
        "  - {id: exact, platform: p, chat: x}\n",
        "  - {id: low, platform: p, chat: x, priority: -1}\n",
        "  - {id: high-any, platform: p, priority: 5}\n",
        "  - {id: high-exact, platform: p, chat: x, priority: 5}\n",
    )))
    .config;
    let order: Vec<&str> = config.rules.iter().map(|rule| rule.id.as_str()).collect();
    assert_eq!(
        order,
        [
            "high-exact",
            "high-any",
            "exact",
            "list",
            "regex",
            "any-a",
            "any-b",
            "low"
        ]
    );
}

// === secrets ===

/// The secret values used throughout these tests; none may appear in any message.
const SECRETS: &[&str] = &[
    "env-secret-Kq81",
    "hook-secret-Zp3",
    "sk-openai-secret-Vw5",
    "inline-secret-Mx9",
    "static-secret-Qa1",
    "file-secret-Hd42",
    "Zq7",
];

#[track_caller]
fn assert_no_secret(text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "secret {secret:?} leaked into:\n{text}"
        );
    }
}

#[test]
fn secrets_never_appear_in_errors_warnings_or_debug() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("good.key"), "file-secret-Hd42\n").expect("write");
    std::fs::write(dir.path().join("short.key"), "Zq7").expect("write");
    let config_path = dir.path().join("config.yaml");

    // Valid: warnings and `Debug` of the whole config.
    let good = concat!(
        "instances:\n",
        "  - {id: a, base_url: http://h, api_key_env: WX_KEY}\n",
        "  - {id: b, base_url: http://h, api_key_file: good.key}\n",
        "  - {id: c, base_url: http://h, api_key: inline-secret-Mx9}\n",
        "platforms:\n",
        "  - id: w\n",
        "    type: webhook\n",
        "    url: http://hook\n",
        "    headers: {X-Static: static-secret-Qa1}\n",
        "    headers_from_env: {Authorization: HOOK_TOKEN}\n",
        "  - {id: o, type: openai, model: m, api_key_env: OPENAI_KEY}\n",
    );
    let loaded = decode(good, Some(&config_path), &env).unwrap_or_else(|errors| panic!("{errors}"));
    assert_eq!(loaded.warnings.len(), 1);
    assert_no_secret(&loaded.warnings.join("\n"));
    assert_no_secret(&format!("{:?}", loaded.config));
    assert_no_secret(&format!("{loaded:?}"));

    // Invalid in every way a secret sits next to: conflicts, short keys, bad header values,
    // wrong types, unknown keys, a secret-looking value in an unknown key.
    let bad = concat!(
        "instances:\n",
        "  - {id: a, base_url: http://h, api_key_env: WX_KEY, api_key: inline-secret-Mx9}\n",
        "  - {id: b, base_url: http://h, api_key_file: short.key}\n",
        "  - {id: c, base_url: http://h, api_key: Zq7}\n",
        "  - {id: d, base_url: http://h, api_key_env: SHORT}\n",
        "  - {id: e, base_url: 'http://user:inline-secret-Mx9@/x', api_key: [inline-secret-Mx9]}\n",
        "  - {id: f, base_url: http://h, api_key: inline-secret-Mx9, secret: static-secret-Qa1}\n",
        "platforms:\n",
        "  - id: w\n",
        "    type: webhook\n",
        "    url: http://hook\n",
        "    headers: {X-Static: \"static-secret-Qa1\\n\", X-List: [static-secret-Qa1]}\n",
        "    headers_from_env: {X-Static: HOOK_TOKEN}\n",
        "  - {id: o, type: openai, model: m, api_key_env: OPENAI_KEY, api_key_file: good.key}\n",
    );
    let errors = decode(bad, Some(&config_path), &env).expect_err("invalid");
    assert!(errors.errors.len() >= 8, "{errors}");
    assert_no_secret(&errors.to_string());
    assert_no_secret(&format!("{errors:?}"));

    // A syntax error right inside an inline key must not quote the line.
    let broken = "instances:\n  - id: a\n    api_key: \"inline-secret-Mx9\n";
    let errors = decode(broken, Some(&config_path), &env).expect_err("invalid");
    assert_no_secret(&errors.to_string());
}

// === load_file ===

#[test]
fn load_file_reports_an_unreadable_file_at_line_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.yaml");
    let errors = load_file(&path).expect_err("missing file");
    let [error] = errors.errors.as_slice() else {
        panic!("one error expected: {errors}");
    };
    assert_eq!((error.line, error.column), (0, 0));
    assert_eq!(error.file, path.display().to_string());
    assert!(
        error.message.starts_with("cannot read config file: "),
        "{error}"
    );
}

#[test]
fn load_file_resolves_key_files_against_the_config_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(dir.path().join("keys")).expect("mkdir");
    std::fs::write(dir.path().join("keys/a.key"), "file-secret-Hd42\r\n").expect("write");
    let path = dir.path().join("config.yaml");
    let text = "instances:\n  - {id: a, base_url: http://h, api_key_file: keys/a.key}\n";
    std::fs::write(&path, text).expect("write");
    let loaded = load_file(&path).unwrap_or_else(|errors| panic!("{errors}"));
    let instance = &loaded.config.instances[0];
    assert_eq!(instance.api_key.expose(), "file-secret-Hd42");
    assert_eq!(
        loaded.config.source.referenced_files,
        [dir.path().join("keys/a.key")]
    );
    assert_eq!(loaded.config.path(), Some(path.as_path()));
}

#[test]
fn hash_changes_with_the_key_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("a.key");
    let path = dir.path().join("config.yaml");
    let text = "instances:\n  - {id: a, base_url: http://h, api_key_file: a.key}\n";
    std::fs::write(&key, "first-key\n").expect("write");
    let first = decode(text, Some(&path), &env)
        .expect("valid")
        .config
        .source
        .hash;
    std::fs::write(&key, "second-key\n").expect("write");
    let second = decode(text, Some(&path), &env)
        .expect("valid")
        .config
        .source
        .hash;
    assert_ne!(first, second);
}

#[test]
fn server_limits_have_defaults_and_ranges() {
    let loaded = valid(&with_empty_instances(""));
    assert_eq!(
        loaded.config.server.limits,
        crate::config::HttpLimits::default()
    );
    let loaded = valid(&with_empty_instances(
        "server:\n  header_read_timeout: 2s\n  idle_timeout: 30s\n  max_connections: 64\n  max_request_body_bytes: 4096\n",
    ));
    let limits = loaded.config.server.limits;
    assert_eq!(limits.header_read_timeout, Duration::from_secs(2));
    assert_eq!(limits.idle_timeout, Duration::from_secs(30));
    assert_eq!(limits.max_connections, 64);
    assert_eq!(limits.max_request_body_bytes, 4096);
    let errors = errors_of(&with_empty_instances(
        "server:\n  max_connections: 0\n  max_request_body_bytes: 10\n  header_read_timeout: 0s\n",
    ));
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0].starts_with("3:20: server.max_connections:"),
        "{errors:?}"
    );
    assert!(
        errors[1].contains("server.max_request_body_bytes"),
        "{errors:?}"
    );
    assert!(
        errors[2].contains("server.header_read_timeout"),
        "{errors:?}"
    );
}

#[test]
fn media_section_defaults_values_and_errors() {
    let defaults = valid("instances: []\n").config.media;
    assert_eq!(defaults, crate::config::MediaConfig::default());
    assert!(defaults.download);
    assert_eq!(defaults.dir, PathBuf::from("data/downloads"));
    assert_eq!(
        (defaults.max_bytes, defaults.retention_days),
        (20_971_520, 7)
    );

    let media = valid(&with_empty_instances(
        "media:\n  download: false\n  dir: /var/lib/wx/files\n  max_bytes: 1024\n  retention_days: 3\n",
    ))
    .config
    .media;
    assert!(!media.download);
    assert_eq!(media.dir, PathBuf::from("/var/lib/wx/files"));
    assert_eq!((media.max_bytes, media.retention_days), (1024, 3));

    check(
        &with_empty_instances(
            "media:\n  download: maybe\n  max_bytes: 0\n  retention_days: 0\n  size: 1\n",
        ),
        &[
            "3:13: media.download: expected true or false, found a string",
            "4:14: media.max_bytes: must be at least 1, got 0",
            "5:19: media.retention_days: must be between 1 and 36500, got 0",
            "6:3: media.size: unknown key \"size\"; allowed keys: download, dir, max_bytes, retention_days",
        ],
    );
}

#[test]
fn openai_vision_defaults_off() {
    let config = valid(
        "instances: []\nplatforms:\n  - id: o\n    type: openai\n    api_key_env: WX_KEY\n    model: m\n  - id: v\n    type: openai\n    api_key_env: WX_KEY\n    model: m\n    vision: true\n",
    )
    .config;
    let visions: Vec<bool> = config
        .platforms
        .iter()
        .map(|platform| match &platform.kind {
            PlatformKind::OpenAi(openai) => openai.vision,
            _ => panic!("openai"),
        })
        .collect();
    assert_eq!(visions, [false, true]);
}

#[test]
fn coze_platform_defaults_and_options() {
    let config = valid(concat!(
        "instances: []\n",
        "platforms:\n",
        "  - id: c1\n",
        "    type: coze\n",
        "    api_key_env: WX_KEY\n",
        "    bot_id: 7350123456789012345\n",
        "  - id: c2\n",
        "    type: coze\n",
        "    api_base: https://api.coze.com/\n",
        "    api_key_env: OPENAI_KEY\n",
        "    bot_id: \"bot-2\"\n",
        "    workspace_id: 7349\n",
        "    continuous_conversation: true\n",
        "    timeout: 15s\n",
    ))
    .config;
    let [c1, c2] = config.platforms.as_slice() else {
        panic!("two platforms");
    };
    assert_eq!(c1.kind.type_name(), "coze");
    assert_eq!(c1.timeout, Duration::from_secs(10));
    let PlatformKind::Coze(c1) = &c1.kind else {
        panic!("coze");
    };
    assert_eq!(c1.api_base, "https://api.coze.cn");
    assert_eq!(c1.api_key.expose(), "env-secret-Kq81");
    assert_eq!(
        c1.bot_id, "7350123456789012345",
        "a numeric id keeps its digits"
    );
    assert_eq!(c1.workspace_id, None);
    assert!(!c1.continuous_conversation);
    assert_eq!(c2.timeout, Duration::from_secs(15));
    let PlatformKind::Coze(c2) = &c2.kind else {
        panic!("coze");
    };
    assert_eq!(c2.api_base, "https://api.coze.com");
    assert_eq!(c2.bot_id, "bot-2");
    assert_eq!(c2.workspace_id.as_deref(), Some("7349"));
    assert!(c2.continuous_conversation);
}

#[test]
fn coze_platform_errors() {
    check(
        "instances: []\nplatforms:\n  - id: c\n    type: coze\n    api_key_env: WX_KEY\n",
        &["3:5: platforms[0].bot_id: missing required key"],
    );
    check(
        "instances: []\nplatforms:\n  - id: c\n    type: coze\n    bot_id: b\n    api_key_env: WX_KEY\n    api_key: inline-coze-key\n    model: m\n",
        &[
            "7:14: platforms[0].api_key: conflicts with api_key_env: set exactly one of api_key_env, api_key_file or api_key",
            "8:5: platforms[0].model: unknown key \"model\" for a coze platform; allowed keys: id, type, message_send_mode, timeout, api_base, bot_id, workspace_id, continuous_conversation, api_key_env, api_key_file, api_key",
        ],
    );
    check(
        "instances: []\nplatforms:\n  - id: c\n    type: coze\n    bot_id: b\n    api_key_env: NOPE\n    continuous_conversation: maybe\n",
        &[
            "6:18: platforms[0].api_key_env: environment variable \"NOPE\" is not set",
            "7:30: platforms[0].continuous_conversation: expected true or false, found a string",
        ],
    );
}

#[test]
fn a_key_file_saved_by_a_windows_editor_loses_its_bom_and_crlf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(dir.path().join("wx.key"), "\u{feff}key-from-notepad\r\n").expect("write");
    let text = "instances:\n  - id: a\n    base_url: http://h\n    api_key_file: wx.key\n";
    let loaded = decode(text, Some(&config_path), &env).expect("valid");
    assert_eq!(
        loaded.config.instances[0].api_key.expose(),
        "key-from-notepad"
    );
}

#[test]
fn without_secrets_references_are_checked_but_nothing_is_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("config.yaml");
    std::fs::write(
        &config_path,
        "instances:\n  - id: a\n    base_url: http://h\n    api_key_file: missing.key\n  - id: b\n    base_url: http://h\n    api_key_env: NOT_SET_ANYWHERE\n",
    )
    .expect("write");
    assert!(check_file_without_secrets(&config_path).is_ok());
    // A reference to nothing is still an error, and so is a missing key source.
    std::fs::write(
        &config_path,
        "instances:\n  - id: a\n    base_url: http://h\n    api_key_env: \"\"\n  - id: b\n    base_url: http://h\nrules:\n  - id: r\n    platform: nowhere\n",
    )
    .expect("write");
    let errors = check_file_without_secrets(&config_path).expect_err("invalid");
    let messages: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 3, "{messages:#?}");
    assert!(messages[0].contains("api_key_env"), "{messages:#?}");
    assert!(messages[1].contains("missing API key"), "{messages:#?}");
    assert!(messages[2].contains("unknown platform"), "{messages:#?}");
}

#[test]
fn coze_api_base_credentials_are_warned_about_not_kept() {
    let loaded = valid(
        "instances: []\nplatforms:\n  - id: c\n    type: coze\n    api_base: https://me:coze-pass-Xy12@api.coze.com\n    api_key_env: WX_KEY\n    bot_id: b\n",
    );
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(
        loaded.warnings[0].contains("platforms[0].api_base: the user:password@ part"),
        "{:?}",
        loaded.warnings
    );
    assert!(!loaded.warnings[0].contains("coze-pass-Xy12"));
}

/// `instances[].listener` sets that instance's listener keys over the global section; the
/// keys it leaves out come from the global section, and instances without one use it whole.
#[test]
fn an_instance_listener_section_overrides_the_global_one_key_by_key() {
    let loaded = valid(
        "listener:\n  poll_interval: 10s\n  listener_timeout: 2h\n  backoff: {initial: 2s, max: 30s}\n\
         instances:\n  - id: busy\n    base_url: http://h\n    api_key_env: WX_KEY\n    listener:\n      \
         poll_interval: 1s\n      max_listeners_per_instance: 80\n      backoff: {max: 5s}\n  \
         - id: plain\n    base_url: http://h\n    api_key_env: WX_KEY\n",
    );
    let config = &loaded.config;
    let busy = config.listener_for("busy");
    assert_eq!(busy.poll_interval, Duration::from_secs(1));
    assert_eq!(busy.max_listeners_per_instance, 80);
    assert_eq!(busy.listener_timeout, Duration::from_secs(7200), "global");
    assert_eq!(
        busy.health_check_interval,
        Duration::from_secs(30),
        "default"
    );
    assert_eq!(
        (busy.backoff.initial, busy.backoff.max),
        (Duration::from_secs(2), Duration::from_secs(5))
    );
    assert_eq!(config.listener_for("plain"), &config.listener);
    assert_eq!(config.listener_for("unknown"), &config.listener);
    assert_eq!(config.instance_listeners.len(), 1);
    // Errors name the instance's key path and position.
    check(
        &with_instance("    listener:\n      poll_interval: 0s\n      bogus: 1\n"),
        &[
            "6:22: instances[0].listener.poll_interval: must be greater than zero",
            "7:7: instances[0].listener.bogus: unknown key \"bogus\"; allowed keys: poll_interval, health_check_interval, listener_timeout, forget_inactive_after, max_listeners_per_instance, request_timeout, backoff",
        ],
    );
    // An instance's backoff.initial above the global max it inherits is an error there.
    check(
        &with_instance("    listener:\n      backoff: {initial: 2m}\n"),
        &["6:26: instances[0].listener.backoff: initial (2m) must not exceed max (1m)"],
    );
}
