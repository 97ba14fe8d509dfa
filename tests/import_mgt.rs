//! `import-mgt` on a WXAUTO-MGT database built here from the documented schema, through the
//! real binary: the YAML, the secrets file and its mode, secret hygiene, the decoder, and the
//! notes on rules that route differently.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use wxauto_sidecar::config::{self, PlatformKind};

use crate::util::BIN;

/// Every secret the database holds; none may appear in the YAML, stdout or stderr.
const SECRETS: &[&str] = &[
    "wx-main-secret-key-1",
    "wx-backup-secret-key-2",
    "app-dify-secret-3",
    "sk-openai-secret-4",
    "pat-coze-secret-5",
    "zhiweijz-password-6",
];

/// The WXAUTO-MGT tables the importer reads (upstream schema, §4.4 of its description).
const SCHEMA: &str = r"
CREATE TABLE instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    base_url TEXT NOT NULL,
    api_key TEXT NOT NULL,
    status TEXT DEFAULT 'inactive',
    enabled INTEGER DEFAULT 1,
    last_active INTEGER,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    config TEXT
);
CREATE TABLE service_platforms (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    platform_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    config TEXT NOT NULL,
    enabled INTEGER DEFAULT 1,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL
);
CREATE TABLE delivery_rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rule_id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    chat_pattern TEXT NOT NULL,
    platform_id TEXT NOT NULL,
    priority INTEGER DEFAULT 0,
    enabled INTEGER DEFAULT 1,
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL,
    only_at_messages INTEGER DEFAULT 0,
    at_name TEXT DEFAULT '',
    reply_at_sender INTEGER DEFAULT 0
);
CREATE TABLE fixed_listeners (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_name TEXT NOT NULL UNIQUE,
    enabled INTEGER DEFAULT 1,
    description TEXT DEFAULT '',
    create_time INTEGER NOT NULL,
    update_time INTEGER NOT NULL
);
CREATE TABLE listeners (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    who TEXT NOT NULL,
    last_message_time INTEGER,
    create_time INTEGER,
    conversation_id TEXT DEFAULT '',
    manual_added INTEGER DEFAULT 0,
    status TEXT DEFAULT 'active',
    UNIQUE(instance_id, who)
);
";

/// A WXAUTO-MGT database with two instances, five platforms (one without a sidecar
/// equivalent), four rules, two fixed listeners and one manual listener.
fn mgt_db(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("PRAGMA journal_mode = WAL;").unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    let now = 1_764_000_000_i64;
    let instance = |id: &str, name: &str, url: &str, key: &str, enabled: i64, config: &str| {
        conn.execute(
            "INSERT INTO instances (instance_id, name, base_url, api_key, enabled, created_at, \
             updated_at, config) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            rusqlite::params![id, name, url, key, enabled, now, config],
        )
        .unwrap();
    };
    instance(
        "wxauto_a1b2c3d4",
        "主号",
        "http://192.168.1.10:5000",
        SECRETS[0],
        1,
        r#"{"poll_interval": 5, "timeout_minutes": 30, "timeout": 20, "retry_limit": 3}"#,
    );
    instance(
        "wxauto_backup",
        "备用号",
        "http://192.168.1.11:5000/",
        SECRETS[1],
        0,
        r#"{"poll_interval": 10}"#,
    );
    let platform = |id: &str, name: &str, kind: &str, config: String| {
        conn.execute(
            "INSERT INTO service_platforms (platform_id, name, type, config, enabled, \
             create_time, update_time) VALUES (?1, ?2, ?3, ?4, 1, ?5, ?5)",
            rusqlite::params![id, name, kind, config, now],
        )
        .unwrap();
    };
    platform(
        "dify_11111111",
        "客服知识库",
        "dify",
        format!(
            r#"{{"api_base": "https://api.dify.ai/v1", "api_key": "{}", "user_id": "kefu", "message_send_mode": "typing"}}"#,
            SECRETS[2]
        ),
    );
    platform(
        "openai_22222222",
        "GPT",
        "openai",
        format!(
            r#"{{"api_base": "https://api.openai.com/v1", "api_key": "{}", "model": "gpt-4o-mini", "temperature": 0.3, "system_prompt": "简短回答", "max_tokens": 500}}"#,
            SECRETS[3]
        ),
    );
    platform(
        "keyword_33333333",
        "关键词",
        "keyword",
        r#"{"rules": [{"keywords": ["价格", "多少钱"], "match_type": "contains", "replies": ["请看官网"], "is_random_reply": false, "min_reply_time": 1, "max_reply_time": 3}]}"#.to_owned(),
    );
    platform(
        "coze_44444444",
        "扣子",
        "coze",
        format!(
            r#"{{"api_key": "{}", "workspace_id": "7349000000000000001", "bot_id": "7350000000000000002", "continuous_conversation": true}}"#,
            SECRETS[4]
        ),
    );
    platform(
        "zhiweijz_55555555",
        "记账",
        "zhiweijz",
        format!(
            r#"{{"server_url": "https://zhiweijz.example", "username": "me@example.com", "password": "{}"}}"#,
            SECRETS[5]
        ),
    );
    let rule = |id: &str, instance: &str, chat: &str, platform: &str, priority: i64, at: &str| {
        conn.execute(
            "INSERT INTO delivery_rules (rule_id, name, instance_id, chat_pattern, platform_id, \
             priority, enabled, create_time, update_time, only_at_messages, at_name, \
             reply_at_sender) VALUES (?1, ?1, ?2, ?3, ?4, ?5, 1, ?6, ?6, ?7, ?8, ?9)",
            rusqlite::params![
                id,
                instance,
                chat,
                platform,
                priority,
                now,
                i64::from(!at.is_empty()),
                at,
                i64::from(!at.is_empty())
            ],
        )
        .unwrap();
    };
    rule(
        "rule_aaaaaaaa",
        "wxauto_a1b2c3d4",
        "技术交流群",
        "openai_22222222",
        20,
        "机器人",
    );
    rule("rule_bbbbbbbb", "*", "regex:VIP", "coze_44444444", 10, "");
    rule("rule_cccccccc", "*", "记账群", "zhiweijz_55555555", 10, "");
    rule("rule_dddddddd", "*", "*", "keyword_33333333", 0, "");
    for (name, enabled) in [("文件传输助手", 1), ("旧群", 0)] {
        conn.execute(
            "INSERT INTO fixed_listeners (session_name, enabled, description, create_time, \
             update_time) VALUES (?1, ?2, '', ?3, ?3)",
            rusqlite::params![name, enabled, now],
        )
        .unwrap();
    }
    conn.execute(
        "INSERT INTO listeners (instance_id, who, manual_added) VALUES ('wxauto_a1b2c3d4', '客户A', 1)",
        [],
    )
    .unwrap();
}

fn import(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .arg("import-mgt")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `NAME=value` lines.
fn env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} in {what}:\n{text}");
    }
}

#[test]
fn import_mgt_writes_a_config_and_secrets_that_check_config_accepts() {
    let dir = tempfile::tempdir().unwrap();
    mgt_db(&dir.path().join("wxauto_mgt.db"));
    let args = [
        "--db",
        "wxauto_mgt.db",
        "--out",
        "config.yaml",
        "--secrets-file",
        "secrets.env",
    ];
    let output = import(&args, dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "", "the YAML went to --out");
    let yaml = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    let secrets = std::fs::read_to_string(dir.path().join("secrets.env")).unwrap();
    assert_no_secret("the YAML", &yaml);
    assert_no_secret("stderr", &stderr);

    // The YAML: commented, every section mapped.
    for part in [
        "# 主号, WXAUTO-MGT instance wxauto_a1b2c3d4",
        "  - id: \"wxauto_a1b2c3d4\"\n    base_url: \"http://192.168.1.10:5000\"\n    api_key_env: WXAUTO_API_KEY_WXAUTO_A1B2C3D4\n",
        "    api_key_env: WXAUTO_API_KEY_WXAUTO_BACKUP\n    enabled: false",
        "  poll_interval: 5s",
        "  listener_timeout: 30m",
        "  request_timeout: 20s",
        "  - chat: \"文件传输助手\"",
        "    type: dify\n    api_base: \"https://api.dify.ai/v1\"\n    api_key_env: PLATFORM_API_KEY_DIFY_11111111\n    user_id: \"kefu\"",
        "    message_send_mode: typing",
        "    model: \"gpt-4o-mini\"",
        "    bot_id: \"7350000000000000002\"",
        "    continuous_conversation: true",
        "      - keywords: [\"价格\", \"多少钱\"]",
        "    chat: \"regex:(?:VIP).*\"",
        "    only_at: true\n    at_names: [\"机器人\"]\n    reply_at_sender: true",
    ] {
        assert!(yaml.contains(part), "missing {part:?} in:\n{yaml}");
    }
    assert!(!yaml.contains("zhiweijz_55555555\"\n    type"), "{yaml}");
    assert!(
        !yaml.contains("chat: \"旧群\""),
        "a disabled fixed listener is not imported"
    );

    // The report names what was skipped, and why.
    for part in [
        "wrote config.yaml: 2 instances, 4 platforms, 3 rules, 1 fixed listener",
        "wrote secrets.env: 5 secrets",
        "skipped platform \"zhiweijz_55555555\": type \"zhiweijz\" (bookkeeping) has no sidecar equivalent",
        "skipped rule \"rule_cccccccc\": its platform \"zhiweijz_55555555\" was not imported",
        "skipped fixed listener \"旧群\": disabled in WXAUTO-MGT",
        "retry_limit is not mapped",
        "1 manually added listener(s)",
        "WXAUTO_API_KEY_WXAUTO_A1B2C3D4, WXAUTO_API_KEY_WXAUTO_BACKUP, PLATFORM_API_KEY_DIFY_11111111",
        // The regex:VIP rule cannot match the group's name; the catch-all can.
        "rule \"rule_aaaaaaaa\" answers only @-mentions: WXAUTO-MGT dropped the other messages of \
         its chats, here they fall through to rule \"rule_dddddddd\", which may match",
    ] {
        assert!(stderr.contains(part), "missing {part:?} in:\n{stderr}");
    }

    // The secrets file: exactly the keys, one NAME=value per line, owner-only.
    let env = env_file(&secrets);
    let expected: HashMap<String, String> = [
        ("WXAUTO_API_KEY_WXAUTO_A1B2C3D4", SECRETS[0]),
        ("WXAUTO_API_KEY_WXAUTO_BACKUP", SECRETS[1]),
        ("PLATFORM_API_KEY_DIFY_11111111", SECRETS[2]),
        ("PLATFORM_API_KEY_OPENAI_22222222", SECRETS[3]),
        ("PLATFORM_API_KEY_COZE_44444444", SECRETS[4]),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    assert_eq!(env, expected);
    assert_eq!(secrets.lines().count(), 5);
    assert!(
        !secrets.contains(SECRETS[5]),
        "skipped platforms leave no secret"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secrets.env"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The real decoder accepts it with the variables set...
    let lookup = |name: &str| env.get(name).cloned();
    let loaded = config::decode(&yaml, Some(Path::new("config.yaml")), &lookup)
        .unwrap_or_else(|errors| panic!("{errors}\n{yaml}"));
    let config = loaded.config;
    assert_eq!(config.instances.len(), 2);
    assert!(config.instances[0].enabled && !config.instances[1].enabled);
    assert_eq!(config.instances[0].api_key.expose(), SECRETS[0]);
    let coze = config
        .platforms
        .iter()
        .find_map(|p| match &p.kind {
            PlatformKind::Coze(coze) => Some(coze),
            _ => None,
        })
        .expect("the coze platform");
    assert_eq!(coze.api_base, "https://api.coze.cn");
    assert_eq!(coze.api_key.expose(), SECRETS[4]);
    assert_eq!(coze.workspace_id.as_deref(), Some("7349000000000000001"));
    let rule_ids: Vec<&str> = config.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(
        rule_ids,
        ["rule_aaaaaaaa", "rule_bbbbbbbb", "rule_dddddddd"]
    );
    assert!(config.rules[1].chat.matches("VIP客户") && !config.rules[1].chat.matches("老VIP"));
    assert_eq!(config.fixed_listeners.len(), 1);

    // ...and refuses it, naming each variable, without them.
    let errors = config::decode(&yaml, Some(Path::new("config.yaml")), &|_| None)
        .expect_err("invalid without the variables")
        .to_string();
    for name in expected.keys() {
        assert!(
            errors.contains(&format!("environment variable \"{name}\" is not set")),
            "{name}: {errors}"
        );
    }

    // So does the real check-config.
    let output = Command::new(BIN)
        .args(["check-config", "--config", "config.yaml"])
        .current_dir(dir.path())
        .envs(&env)
        .output()
        .unwrap();
    let check_stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{check_stderr}");
    assert_no_secret("check-config", &check_stderr);

    // An existing output is not overwritten without --force.
    std::fs::write(dir.path().join("config.yaml"), "mine\n").unwrap();
    let output = import(&args, dir.path());
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists; pass --force"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("config.yaml")).unwrap(),
        "mine\n"
    );
    let mut forced = args.to_vec();
    forced.push("--force");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("secrets.env");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let output = import(&forced, dir.path());
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("config.yaml")).unwrap(),
        yaml,
        "the same database gives the same file"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("secrets.env"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "an overwritten secrets file is narrowed"
        );
    }
}

#[test]
fn import_mgt_without_out_prints_the_yaml_and_keeps_secrets_out_of_sight() {
    let dir = tempfile::tempdir().unwrap();
    mgt_db(&dir.path().join("mgt.db"));
    let output = import(&["--db", "mgt.db"], dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_no_secret("stdout", &stdout);
    assert_no_secret("stderr", &stderr);
    assert!(stdout.starts_with("# wxauto-sidecar configuration imported"));
    assert!(stderr.contains("wrote stdout: 2 instances"), "{stderr}");
    assert!(
        stderr.contains("values not written: pass --secrets-file FILE"),
        "{stderr}"
    );
    let placeholder = |_: &str| Some("a-key-from-the-vault".to_owned());
    config::decode(&stdout, None, &placeholder).unwrap_or_else(|errors| panic!("{errors}"));
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with("mgt.db"))
        .collect();
    assert!(files.is_empty(), "nothing else written: {files:?}");
}

#[test]
fn import_mgt_refuses_what_is_not_a_wxauto_mgt_database() {
    let dir = tempfile::tempdir().unwrap();
    let output = import(&["--db", "missing.db"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no database at missing.db"));

    let other = dir.path().join("other.db");
    rusqlite::Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE notes (text TEXT);")
        .unwrap();
    let output = import(&["--db", "other.db"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("is not a WXAUTO-MGT database"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.stdout.is_empty());
}

/// Where the sidecar routes differently, in a database shaped like the one the audit found: an
/// "@bot only" VIP rule above a catch-all (WXAUTO-MGT dropped the VIP group's other messages,
/// the sidecar hands them to the catch-all), and an @-only rule with an empty at_name (which
/// WXAUTO-MGT let every message through).
#[test]
fn import_mgt_notes_the_rules_that_route_differently() {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("mgt.db")).unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    let now = 1_764_000_000_i64;
    conn.execute(
        "INSERT INTO instances (instance_id, name, base_url, api_key, created_at, updated_at) \
         VALUES ('wxauto_1a2b', 'main', 'http://10.0.0.5:5000', ?1, ?2, ?2)",
        rusqlite::params![SECRETS[0], now],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO service_platforms (platform_id, name, type, config, create_time, \
         update_time) VALUES ('keyword_12345678', 'kw', 'keyword', ?1, ?2, ?2)",
        rusqlite::params![
            r#"{"rules": [{"keywords": ["价格"], "match_type": "contains", "replies": ["免费"]}]}"#,
            now
        ],
    )
    .unwrap();
    for (id, instance, chat, priority, only_at, at_name) in [
        ("rule_1", "*", "*", 0, 0, ""),
        ("rule_2", "wxauto_1a2b", "VIP群", 10, 1, "小助手, bot"),
        ("rule_3", "*", "regex:team", 5, 1, ""),
    ] {
        conn.execute(
            "INSERT INTO delivery_rules (rule_id, name, instance_id, chat_pattern, platform_id, \
             priority, create_time, update_time, only_at_messages, at_name) \
             VALUES (?1, ?1, ?2, ?3, 'keyword_12345678', ?4, ?5, ?5, ?6, ?7)",
            rusqlite::params![id, instance, chat, priority, now, only_at, at_name],
        )
        .unwrap();
    }
    drop(conn);

    let output = import(&["--db", "mgt.db", "--out", "config.yaml"], dir.path());
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("wrote config.yaml: 1 instance, 1 platform, 3 rules"),
        "{stderr}"
    );
    for part in [
        "rule \"rule_2\" answers only @-mentions: WXAUTO-MGT dropped the other messages of its \
         chats, here they fall through to rule \"rule_1\", which may match the same chats",
        "rule \"rule_3\" is marked @-only but names no one (at_name is empty), so WXAUTO-MGT \
         passed every message; imported without only_at",
    ] {
        assert!(stderr.contains(part), "missing {part:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("skipped rule"), "{stderr}");
    // rule_3 falls through nowhere: it has no @-filter.
    assert!(!stderr.contains("rule \"rule_3\" answers only"), "{stderr}");

    // The config routes as the notes say.
    let yaml = std::fs::read_to_string(dir.path().join("config.yaml")).unwrap();
    assert!(
        yaml.contains("#   - rule \"rule_2\" answers only @-mentions"),
        "{yaml}"
    );
    let lookup = |_: &str| Some("a-key-from-the-vault".to_owned());
    let config = config::decode(&yaml, None, &lookup)
        .unwrap_or_else(|errors| panic!("{errors}\n{yaml}"))
        .config;
    let routing = wxauto_sidecar::delivery::Routing::new(
        &config.rules,
        &config.platforms,
        crate::util::http_client(),
    );
    let route = |chat: &str, content: &str| {
        let message = wxauto_sidecar::message::InboundMessage {
            instance_id: "wxauto_1a2b".to_owned(),
            chat: chat.to_owned(),
            sender: "bob".to_owned(),
            content: content.to_owned(),
            ..Default::default()
        };
        match routing.route(&message) {
            wxauto_sidecar::delivery::RouteDecision::Deliver { rule_id, .. } => rule_id,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(route("VIP群", "@小助手 价格?"), "rule_2");
    assert_eq!(
        route("VIP群", "价格?"),
        "rule_1",
        "the un-@ed message falls through"
    );
    assert_eq!(route("team-a", "价格?"), "rule_3", "no @ needed");
}
