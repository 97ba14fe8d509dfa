//! Unit tests of the mapping: names, quoting, and each table's translation, each checked by
//! decoding the generated YAML with the real decoder.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::read::{MgtDb, MgtFixedListener, MgtInstance, MgtPlatform, MgtRule};
use super::render::{self, comment, env_part, quote, sidecar_id};
use crate::config::{self, Config, PlatformKind};
use crate::secret::Secret;

fn instance(id: &str, key: &str, config: serde_json::Value) -> MgtInstance {
    MgtInstance {
        instance_id: id.to_owned(),
        name: format!("name of {id}"),
        base_url: "http://127.0.0.1:5000".to_owned(),
        api_key: Secret::new(key),
        enabled: true,
        config,
    }
}

fn platform(id: &str, kind: &str, config: serde_json::Value) -> MgtPlatform {
    MgtPlatform {
        platform_id: id.to_owned(),
        name: String::new(),
        kind: kind.to_owned(),
        config,
        enabled: true,
    }
}

fn rule(id: &str, chat: &str, platform: &str) -> MgtRule {
    MgtRule {
        rule_id: id.to_owned(),
        name: String::new(),
        instance_id: "*".to_owned(),
        chat_pattern: chat.to_owned(),
        platform_id: platform.to_owned(),
        priority: 0,
        enabled: true,
        only_at: false,
        at_name: String::new(),
        reply_at_sender: false,
    }
}

/// Plans `db` and decodes the YAML with the plan's own secrets as the environment.
fn decoded(db: &MgtDb) -> (render::Plan, Config) {
    let plan = render::plan(db, "test.db");
    let env: HashMap<String, String> = plan
        .secrets
        .iter()
        .map(|(name, value)| (name.clone(), value.expose().to_owned()))
        .chain(
            plan.unset
                .iter()
                .map(|name| (name.clone(), "placeholder".to_owned())),
        )
        .collect();
    let lookup = |name: &str| env.get(name).cloned();
    match config::decode(&plan.yaml, None, &lookup) {
        Ok(loaded) => (plan, loaded.config),
        Err(errors) => panic!("{errors}\n---\n{}", plan.yaml),
    }
}

fn has_note(plan: &render::Plan, part: &str) -> bool {
    plan.notes.iter().any(|note| note.contains(part))
}

#[test]
fn quoted_strings_survive_the_decoder() {
    for chat in [
        "plain",
        "文件传输助手",
        "a \"quoted\" # not a comment: really",
        "back\\slash and\ttab",
        "two\nlines",
        "- looks like a list",
        "*",
        "🎉 party, 2024",
        "\u{7}bell",
    ] {
        let yaml = format!(
            "instances: []\nfixed_listeners:\n  - chat: {}\n",
            quote(chat)
        );
        let loaded = config::decode(&yaml, None, &|_| None).expect("decodes");
        assert_eq!(loaded.config.fixed_listeners[0].chat, chat, "{yaml}");
    }
    assert_eq!(comment("a\nb\rc"), "a b c");
}

#[test]
fn names_are_valid_and_stable() {
    assert_eq!(sidecar_id("wx-main", 1), "wx-main");
    assert_eq!(sidecar_id("客服 1号", 1), "___1_");
    assert_eq!(sidecar_id("客服", 3), "instance-3");
    assert_eq!(sidecar_id(&"x".repeat(100), 1).len(), 60);
    assert_eq!(env_part("dify_1a2b3c4d"), "DIFY_1A2B3C4D");
    assert_eq!(env_part("wx.main-1"), "WX_MAIN_1");
    assert_eq!(env_part("__"), "X");

    // Two ids that clean to the same variable get distinct ones; so do the instance ids.
    let db = MgtDb {
        instances: vec![
            instance("wx-1", "key-one-1111", json!({})),
            instance("wx_1", "key-two-2222", json!({})),
            instance("客服", "key-three-3333", json!({})),
            instance("售后", "key-four-4444", json!({})),
        ],
        ..MgtDb::default()
    };
    let (plan, config) = decoded(&db);
    let names: Vec<&str> = plan.secrets.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "WXAUTO_API_KEY_WX_1",
            "WXAUTO_API_KEY_WX_1_2",
            "WXAUTO_API_KEY_INSTANCE_3",
            "WXAUTO_API_KEY_INSTANCE_4"
        ]
    );
    let ids: Vec<&str> = config.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["wx-1", "wx_1", "instance-3", "instance-4"]);
    assert_eq!(config.instances[1].api_key.expose(), "key-two-2222");
    assert!(has_note(
        &plan,
        "instance \"客服\" is called \"instance-3\""
    ));
    // The same database gives the same file.
    assert_eq!(render::plan(&db, "test.db").yaml, plan.yaml);
}

#[test]
fn poll_settings_map_onto_the_listener_section() {
    let db = MgtDb {
        instances: vec![
            instance(
                "a",
                "key-aaaa",
                json!({"poll_interval": 3, "timeout_minutes": 20, "timeout": 15, "retry_limit": 3}),
            ),
            instance(
                "b",
                "key-bbbb",
                json!({"poll_interval": "8", "timeout_minutes": 45}),
            ),
        ],
        ..MgtDb::default()
    };
    let (plan, config) = decoded(&db);
    // WXAUTO-MGT never polled below 5 s.
    assert_eq!(config.listener.poll_interval, Duration::from_secs(5));
    assert_eq!(
        config.listener.listener_timeout,
        Duration::from_secs(45 * 60)
    );
    assert_eq!(config.listener.request_timeout, Duration::from_secs(15));
    assert!(has_note(&plan, "retry_limit is not mapped"));
    assert!(has_note(&plan, "poll every 3-8 s"));
    assert!(has_note(&plan, "longest, 45m"));
}

#[test]
fn chat_patterns_keep_their_meaning() {
    let db = MgtDb {
        platforms: vec![platform("kw", "keyword", json!({"rules": []}))],
        rules: vec![
            rule("prefix", "regex:VIP", "kw"),
            rule("list", "售前, 售后", "kw"),
            rule("exact", "VIP*", "kw"),
            rule("lookaround", "regex:(?!x)abc", "kw"),
            rule("empty", "  ", "kw"),
            MgtRule {
                only_at: true,
                at_name: "  ".to_owned(),
                ..rule("at-nobody", "*", "kw")
            },
            MgtRule {
                only_at: true,
                at_name: "@机器人，bot".to_owned(),
                reply_at_sender: true,
                priority: 7,
                ..rule("at-bot", "*", "kw")
            },
            MgtRule {
                enabled: false,
                ..rule("off", "*", "kw")
            },
            rule("lost", "*", "gone_12345678"),
        ],
        ..MgtDb::default()
    };
    let (plan, config) = decoded(&db);
    let by_id = |id: &str| {
        config
            .rules
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("rule {id}"))
    };
    // re.match was anchored at the start only.
    let prefix = &by_id("prefix").chat;
    assert!(prefix.matches("VIP客户群") && prefix.matches("VIP"));
    assert!(!prefix.matches("老VIP"));
    assert!(by_id("list").chat.matches("售后"));
    assert!(by_id("exact").chat.matches("VIP*") && !by_id("exact").chat.matches("VIP1"));
    let at = by_id("at-bot");
    assert!(at.only_at && at.reply_at_sender);
    assert_eq!(at.at_names, ["机器人", "bot"]);
    assert_eq!(at.priority, 7);
    assert_eq!(config.rules.len(), 4);
    for skipped in [
        "rule \"lookaround\": its regex uses syntax",
        "rule \"empty\": its chat pattern is empty",
        "rule \"at-nobody\": it answers only @-mentions but its at_name \"  \" names no one",
        "rule \"off\": disabled",
        "rule \"lost\": its platform \"gone_12345678\" was not imported",
    ] {
        assert!(has_note(&plan, skipped), "{skipped}: {:?}", plan.notes);
    }
}

/// WXAUTO-MGT's first matching rule took a message even when its @-filter dropped it; the
/// sidecar falls through. Every @-only rule with a rule behind it that may share its chats is
/// named, with those rules; an @-only rule with an empty at_name passed everything there.
#[test]
fn at_only_rules_that_now_fall_through_are_noted() {
    let at_only = |id: &str, chat: &str, priority: i64, at_name: &str| MgtRule {
        only_at: true,
        at_name: at_name.to_owned(),
        priority,
        ..rule(id, chat, "kw")
    };
    let db = MgtDb {
        instances: vec![
            instance("wx1", "key-one", json!({})),
            instance("wx2", "key-two", json!({})),
        ],
        platforms: vec![platform("kw", "keyword", json!({"rules": []}))],
        rules: vec![
            at_only("vip", "VIP群", 10, "小助手, bot"),
            rule("catch-all", "*", "kw"),
            MgtRule {
                priority: 5,
                ..rule("team-list", "售前, 售后", "kw")
            },
            at_only("pre-sales", "售前", 8, "bot"),
            MgtRule {
                instance_id: "wx2".to_owned(),
                ..at_only("wx2-only", "regex:内部", 20, "bot")
            },
            MgtRule {
                instance_id: "wx1".to_owned(),
                priority: 15,
                ..rule("wx1-internal", "regex:内部", "kw")
            },
            at_only("last", "*", -5, "bot"),
            at_only("anyone", "regex:team", 3, ""),
        ],
        ..MgtDb::default()
    };
    let (plan, config) = decoded(&db);
    let note_of = |id: &str| {
        let start = format!("rule {id:?} answers only @-mentions");
        plan.notes
            .iter()
            .find(|note| note.starts_with(&start))
            .cloned()
    };
    // Behind "vip": the two `*` rules; neither the list, the other exact name nor the regex
    // can match "VIP群".
    let vip = note_of("vip").expect("a note for vip");
    assert!(
        vip.ends_with(
            "here they fall through to rules \"catch-all\", \"last\", which may match the same chats"
        ),
        "{vip}"
    );
    assert!(
        vip.contains("WXAUTO-MGT dropped the other messages"),
        "{vip}"
    );
    // Behind "pre-sales" (priority 8): the list naming 售前, then the catch-alls.
    let pre_sales = note_of("pre-sales").expect("a note for pre-sales");
    assert!(
        pre_sales.contains("rules \"team-list\", \"catch-all\", \"last\""),
        "{pre_sales}"
    );
    // Another instance's rule is not behind "wx2-only"; the catch-alls are.
    let wx2 = note_of("wx2-only").expect("a note for wx2-only");
    assert!(!wx2.contains("wx1-internal"), "{wx2}");
    assert!(wx2.contains("\"catch-all\""), "{wx2}");
    // Nothing is tried after "last".
    assert_eq!(note_of("last"), None, "{:?}", plan.notes);

    // An empty at_name: imported as a rule without the @-filter, with a note saying why.
    let anyone = config.rules.iter().find(|r| r.id == "anyone").unwrap();
    assert!(!anyone.only_at && anyone.at_names.is_empty());
    assert!(
        has_note(
            &plan,
            "rule \"anyone\" is marked @-only but names no one (at_name is empty)"
        ),
        "{:?}",
        plan.notes
    );
    assert_eq!(note_of("anyone"), None);
    assert!(
        plan.yaml
            .contains("  - id: \"anyone\"\n    instance: \"*\"\n    chat: \"regex:(?:team).*\""),
        "{}",
        plan.yaml
    );
    // The notes are in the YAML's closing comment too.
    assert!(
        plan.yaml
            .contains("#   - rule \"vip\" answers only @-mentions")
    );
}

#[test]
fn platforms_take_wxauto_mgt_defaults_and_skip_what_cannot_work() {
    let db = MgtDb {
        platforms: vec![
            platform("openai_1", "openai", json!({"api_key": "sk-openai-key-1"})),
            platform(
                "dify_1",
                "dify",
                json!({"api_base": "https://user:pw-secret-99@dify.example/v1/", "api_key": "ap1",
                       "conversation_id": "c1", "message_send_mode": "typing"}),
            ),
            platform("dify_2", "dify", json!({"api_key": "app-dify-2"})),
            platform(
                "coze_1",
                "coze",
                json!({"api_key": "pat-coze-1", "workspace_id": "w"}),
            ),
            platform(
                "kw_1",
                "keyword_match",
                json!({"rules": [
                    {"keywords": ["价格"], "match_type": "fuzzy", "replies": ["免费", "不要钱"],
                     "is_random_reply": true, "min_reply_time": 1, "max_reply_time": 3},
                    {"keywords": [], "replies": ["x"]},
                    {"keywords": "hi", "match_type": "exact", "replies": ["hello"]}
                ]}),
            ),
            platform("zhiweijz_1", "zhiweijz", json!({"password": "pw-zhiweijz"})),
            MgtPlatform {
                enabled: false,
                ..platform("off_1", "openai", json!({"api_key": "sk-off-key"}))
            },
        ],
        ..MgtDb::default()
    };
    let (plan, config) = decoded(&db);
    let ids: Vec<&str> = config.platforms.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["openai_1", "dify_1", "kw_1"]);
    let PlatformKind::OpenAi(openai) = &config.platforms[0].kind else {
        panic!("openai");
    };
    assert_eq!(openai.model, "gpt-3.5-turbo");
    assert_eq!(openai.temperature, Some(0.7));
    assert_eq!(openai.max_tokens, Some(1000));
    assert_eq!(
        openai.system_prompt.as_deref(),
        Some("你是一个有用的助手。")
    );
    assert_eq!(config.platforms[0].timeout, Duration::from_secs(25));
    let PlatformKind::Dify(dify) = &config.platforms[1].kind else {
        panic!("dify");
    };
    assert_eq!(dify.api_base, "https://dify.example/v1");
    assert_eq!(dify.user_id, "default_user");
    assert_eq!(
        config.platforms[1].send_mode,
        crate::config::SendMode::Typing
    );
    assert!(!plan.yaml.contains("pw-secret-99"));
    // "ap1" is too short for the sidecar: named, not written, reported.
    assert_eq!(plan.unset, ["PLATFORM_API_KEY_DIFY_1"]);
    let PlatformKind::Keyword(keyword) = &config.platforms[2].kind else {
        panic!("keyword");
    };
    assert_eq!(keyword.keywords.len(), 2);
    assert!(keyword.keywords[0].random);
    assert_eq!(keyword.keywords[1].keywords, ["hi"]);
    for part in [
        "platform \"dify_1\": the user:password@ part",
        "platform \"dify_1\": the fixed conversation_id",
        "skipped platform \"dify_2\": Dify needs an http(s) api_base",
        "skipped platform \"coze_1\": Coze needs a bot_id",
        "fuzzy matching",
        "keyword rule 2 has no keyword",
        "reply delays",
        "skipped platform \"zhiweijz_1\": type \"zhiweijz\"",
        "skipped platform \"off_1\": disabled",
    ] {
        assert!(has_note(&plan, part), "{part}: {:?}", plan.notes);
    }
    for secret in [
        "pw-secret-99",
        "pw-zhiweijz",
        "sk-off-key",
        "sk-openai-key-1",
    ] {
        assert!(!plan.yaml.contains(secret), "{secret} in the YAML");
        assert!(
            plan.notes.iter().all(|note| !note.contains(secret)),
            "{secret} in a note"
        );
    }
}

#[test]
fn fixed_listeners_and_disabled_instances() {
    let db = MgtDb {
        instances: vec![MgtInstance {
            enabled: false,
            base_url: "http://user:inst-pass-77@10.0.0.2:5000".to_owned(),
            ..instance("wx", "", json!(null))
        }],
        fixed_listeners: vec![
            MgtFixedListener {
                session_name: "文件传输助手".to_owned(),
                enabled: true,
                description: "always\non".to_owned(),
            },
            MgtFixedListener {
                session_name: "old".to_owned(),
                enabled: false,
                description: String::new(),
            },
        ],
        manual_listeners: 2,
        ..MgtDb::default()
    };
    let (plan, config) = decoded(&db);
    assert!(!config.instances[0].enabled);
    assert_eq!(config.instances[0].base_url, "http://10.0.0.2:5000");
    assert!(!plan.yaml.contains("inst-pass-77"));
    assert_eq!(plan.unset, ["WXAUTO_API_KEY_WX"]);
    assert!(has_note(&plan, "instance \"wx\" has no API key"));
    let chats: Vec<&str> = config
        .fixed_listeners
        .iter()
        .map(|f| f.chat.as_str())
        .collect();
    assert_eq!(chats, ["文件传输助手"]);
    assert!(has_note(&plan, "fixed listener \"old\": disabled"));
    assert!(has_note(&plan, "2 manually added listener(s)"));
}
