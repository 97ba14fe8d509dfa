//! Config reload end to end: the real binary, a real config file edited the ways editors and
//! Kubernetes edit it, the real watcher, and simulators that show what reached upstream.
//!
//! Every wait polls for an outcome with a deadline (`eventually`); a negative outcome ("not
//! restarted", "not counted") is checked against a later positive event that must come after it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::Method;
use wxauto_sidecar::config;
use wxauto_sidecar::simulator::{Fault, ListenAction};

use crate::util::*;

const RELOADS: &str = "wxauto_config_reloads_total";
const FAILURES: &str = "wxauto_config_reload_failures_total";
const LAST_OK: &str = "wxauto_config_last_reload_successful";
const HASH: &str = "wxauto_config_hash";
const SUCCESS_TIME: &str = "wxauto_config_last_reload_success_timestamp_seconds";

/// Listened on every instance, so a restarted actor shows up as a second `listen/add`.
const FIXED_CHAT: &str = "文件传输助手";
const FIXED_ALL: &str = "fixed_listeners:\n  - chat: 文件传输助手\n    instances: [\"*\"]\n";
const LIFECYCLE_ON: &str = "server:\n  enable_lifecycle: true\n";
const ROUTING: &str = "platforms:\n  - id: faq\n    type: keyword\n    keywords:\n      - keywords: [\"hi\"]\n        replies: [\"hello\"]\nrules:\n  - id: everything\n    instance: \"*\"\n    chat: \"*\"\n    platform: faq\n    priority: 1\n";

/// A temp dir the binary runs in, and the config file path inside `conf/` (so the binary's
/// own stderr file and `data/` do not live in the watched directory).
struct Files {
    dir: tempfile::TempDir,
    config: PathBuf,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let config = dir.path().join("conf").join("config.yaml");
    Files { dir, config }
}

/// What an editor that saves in place does: truncate, then write.
fn write_in_place(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// What vim, helix and VS Code do: write a temp file beside it, then rename it over.
fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_file_name(".config.yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `wxauto_config_hash` for a config text, computed the way the sidecar does: the gauge keeps
/// the low 52 bits of `Config.source.hash`, which an `f64` holds exactly.
fn expected_hash(text: &str, env: &[(String, String)]) -> f64 {
    let lookup = |name: &str| {
        env.iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let loaded = config::decode(text, None, &lookup).expect("test config must be valid");
    (loaded.config.source.hash & ((1u64 << 52) - 1)) as f64
}

fn up(id: &str) -> String {
    format!("wxauto_client_up{{instance_id=\"{id}\"}}")
}

fn value(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// Whether any sample on `/metrics` carries this instance id.
fn has_instance_series(text: &str, id: &str) -> bool {
    let label = format!("instance_id=\"{id}\"");
    text.lines()
        .any(|line| !line.starts_with('#') && line.contains(&label))
}

fn adds(sim: &Sim, chat: &str) -> usize {
    sim.sim
        .snapshot()
        .listen_log
        .iter()
        .filter(|event| event.action == ListenAction::Add && event.nickname == chat)
        .count()
}

/// Whether `text` holds `file:<line>:<col>:` with non-zero numbers.
fn has_location(text: &str, file: &str) -> bool {
    text.match_indices(&format!("{file}:")).any(|(at, found)| {
        let rest = &text[at + found.len()..];
        let mut parts = rest.splitn(3, ':');
        let line = parts.next().and_then(|n| n.parse::<u64>().ok());
        let column = parts.next().and_then(|n| n.parse::<u64>().ok());
        matches!((line, column), (Some(l), Some(c)) if l > 0 && c > 0)
    })
}

/// Scrapes until `check` accepts the text; returns that text.
async fn wait_for(binary: &Binary, what: &str, check: impl Fn(&str) -> bool) -> String {
    eventually(what, DEADLINE, || async {
        let text = binary.metrics().await;
        check(&text).then_some(text)
    })
    .await
}

/// Waits until `id` is connected and its simulator has the fixed chat listened once.
async fn wait_up(binary: &Binary, sim: &Sim, id: &str) {
    let series = up(id);
    wait_for(binary, &format!("{id} up"), |text| {
        metric_value(text, &series) == Some(1.0)
    })
    .await;
    eventually(
        &format!("{id} listens to the fixed chat"),
        DEADLINE,
        || async { (adds(sim, FIXED_CHAT) >= 1).then_some(()) },
    )
    .await;
}

/// What an instance's simulator has seen of it; a restarted actor changes it.
#[derive(Debug, PartialEq, Eq)]
struct Footprint {
    initialize_calls: u64,
    fixed_chat_adds: usize,
}

fn footprint(sim: &Sim) -> Footprint {
    Footprint {
        initialize_calls: sim.sim.snapshot().initialize_calls,
        fixed_chat_adds: adds(sim, FIXED_CHAT),
    }
}

/// The binary on a config with `wx-a` alone; returns the files, the binary and the config
/// with `wx-b` added. The environment has both keys from the start.
async fn start_with_a_of_two(
    a: &Sim,
    b: &Sim,
    extra: &str,
) -> (Files, Binary, String, Vec<(String, String)>) {
    let files = files();
    let (text, env) = config_for(&[("wx-a", a), ("wx-b", b)], extra);
    let (only_a, _) = config_for(&[("wx-a", a)], extra);
    write_in_place(&files.config, &only_a);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    (files, binary, text, env)
}

// === cases ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rename_on_save_adds_an_instance_and_leaves_the_other_running() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let (files, binary, text, env) = start_with_a_of_two(&a, &b, FIXED_ALL).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);
    assert_eq!(
        before.initialize_calls, 1,
        "the simulator starts uninitialised"
    );
    let metrics = binary.metrics().await;
    let reloads = value(&metrics, RELOADS);
    let added = "wxauto_listeners_added_total{instance_id=\"wx-a\"}";
    let added_before = value(&metrics, added);

    write_by_rename(&files.config, &text);
    wait_up(&binary, &b, "wx-b").await;
    let metrics = binary.metrics().await;
    assert!(value(&metrics, RELOADS) > reloads);
    assert_eq!(value(&metrics, HASH), expected_hash(&text, &env));
    assert_eq!(
        value(&metrics, added),
        added_before,
        "wx-a re-added its chats"
    );
    keeps_polling(&a, 3).await;
    assert_eq!(
        footprint(&a),
        before,
        "wx-a was restarted by an unrelated change"
    );

    // A second rename-on-save: the watch survived the inode change. A fixed chat for wx-b
    // only goes to wx-b; wx-a is handed the new settings but has nothing to add.
    let extra = format!("{FIXED_ALL}  - chat: group-b\n    instances: [\"wx-b\"]\n");
    let (text, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], &extra);
    write_by_rename(&files.config, &text);
    eventually("wx-b listens to its new fixed chat", DEADLINE, || async {
        (adds(&b, "group-b") == 1).then_some(())
    })
    .await;
    let hash = expected_hash(&text, &env);
    wait_for(&binary, "the second save is live", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    keeps_polling(&a, 3).await;
    assert_eq!(
        footprint(&a),
        before,
        "wx-a was restarted by a fixed_listeners change"
    );
    assert_eq!(adds(&a, "group-b"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_in_place_rewrite_removes_an_instance_and_all_its_series() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let files = files();
    let (text, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], FIXED_ALL);
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    wait_up(&binary, &b, "wx-b").await;
    let before = footprint(&a);
    // Slow answers keep a call to wx-b in flight when it is removed; that call must not
    // bring its series back when it returns.
    b.sim.set_fault(Fault::Slow(Duration::from_millis(300)));

    let (only_a, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_in_place(&files.config, &only_a);
    let hash = expected_hash(&only_a, &env);
    let metrics = wait_for(&binary, "wx-b removed", |text| {
        metric_value(text, HASH) == Some(hash) && metric_value(text, &up("wx-b")).is_none()
    })
    .await;
    assert_eq!(value(&metrics, &up("wx-a")), 1.0);

    // The removed actor stops: its simulator sees no new calls once the in-flight one ended.
    let calls = |sim: &Sim| sim.sim.snapshot().calls.values().sum::<u64>();
    eventually("wx-b is no longer called", DEADLINE, || async {
        let seen = calls(&b);
        keeps_polling(&a, 5).await;
        (calls(&b) == seen).then_some(())
    })
    .await;
    let metrics = binary.metrics().await;
    assert!(
        !has_instance_series(&metrics, "wx-b"),
        "series of the removed instance remain:\n{}",
        metrics
            .lines()
            .filter(|line| line.contains("\"wx-b\""))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(has_instance_series(&metrics, "wx-a"));
    assert_eq!(footprint(&a), before, "wx-a was restarted");
}

/// The instances with a sample in the family `name`, in id order.
fn instances_in(text: &str, name: &str) -> Vec<String> {
    let prefix = format!("{name}{{instance_id=\"");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Switching a down instance off (`enabled: false`) takes it out of everything that counts
/// connectivity at once: `wxauto_client_up` (so WxautoClientDown and `job:wxauto_clients:count`
/// no longer see it), the chat gauge, the health score and the clients document, whose counts
/// are those of its rows; `wxauto_instance_enabled` and `disabled_instances` still name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_disabling_a_down_instance_takes_it_out_of_connectivity_and_the_score() {
    let (a, down) = (start_sim("a").await, start_sim("down").await);
    down.sim.set_online(false);
    let files = files();
    let (text, env) = config_for(&[("wx-a", &a), ("wx-down", &down)], LIFECYCLE_ON);
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    let deduction = "wxauto_health_deduction_points{component=\"clients\"}";
    wait_for(&binary, "wx-a up and wx-down down", |text| {
        metric_value(text, &up("wx-a")) == Some(1.0)
            && metric_value(text, &up("wx-down")) == Some(0.0)
            && metric_value(text, deduction) == Some(15.0)
    })
    .await;

    let disabled = text.replace(
        "api_key_env: KEY_WX_DOWN\n",
        "api_key_env: KEY_WX_DOWN\n    enabled: false\n",
    );
    assert_ne!(disabled, text);
    write_in_place(&files.config, &disabled);
    let hash = expected_hash(&disabled, &env);
    let metrics = wait_for(&binary, "the disabling reload", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    let enabled = |id: &str| format!("wxauto_instance_enabled{{instance_id=\"{id}\"}}");
    assert_eq!(metric_value(&metrics, &enabled("wx-a")), Some(1.0));
    assert_eq!(metric_value(&metrics, &enabled("wx-down")), Some(0.0));
    for family in [
        "wxauto_client_up",
        "wxauto_client_last_check_timestamp_seconds",
        "wxauto_listeners",
    ] {
        assert_eq!(
            instances_in(&metrics, family),
            ["wx-a"],
            "{family}:\n{metrics}"
        );
    }
    // What the rules compute from the exported series is what the score deducts.
    let ups = instances_in(&metrics, "wxauto_client_up");
    let disconnected = ups
        .iter()
        .filter(|id| metric_value(&metrics, &up(id)) == Some(0.0))
        .count();
    assert_eq!(
        metric_value(&metrics, deduction),
        Some((disconnected * 30 / ups.len()) as f64)
    );
    assert_eq!(value(&metrics, deduction), 0.0);

    let (status, body) = binary.request(Method::GET, "/api/v1/clients").await;
    assert_eq!(status, 200, "{body}");
    let clients: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = clients["data"].as_array().unwrap();
    assert_eq!(clients["total_count"], rows.len(), "{clients}");
    assert_eq!(rows.len(), 1, "{clients}");
    assert_eq!(rows[0]["instance_id"], "wx-a");
    assert_eq!(clients["connected_count"], 1, "{clients}");
    assert_eq!(
        clients["disabled_instances"],
        serde_json::json!(["wx-down"])
    );
    let (_, body) = binary.request(Method::GET, "/api/v1/health").await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    let summary = &health["data"]["api_clients_summary"];
    assert_eq!(summary["total_count"], clients["total_count"], "{health}");
    assert_eq!(summary["connected_count"], clients["connected_count"]);
    assert_eq!(summary["disabled_instances"], clients["disabled_instances"]);
    assert_eq!(health["data"]["api_clients"], clients["data"]);

    // The `health` command and the status page say so too.
    let output = std::process::Command::new(BIN)
        .args(["health", "--url", &binary.url("")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("clients 1/1 connected (1 disabled)"),
        "{stdout}"
    );
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    let (_, page) = binary.request(Method::GET, "/?view=status").await;
    assert!(
        page.contains("<tr data-instance=\"wx-down\"><td><b>wx-down</b></td><td><span class=\"badge disabled\" data-state=\"disabled\">"),
        "{page}"
    );
}

/// Every reply, drop and media series of `id`, as `/metrics` names them.
fn delivery_series(id: &str) -> Vec<String> {
    let mut series = Vec::new();
    for outcome in ["success", "error"] {
        series.push(format!(
            "wxauto_replies_total{{instance_id=\"{id}\",outcome=\"{outcome}\"}}"
        ));
    }
    for reason in ["no_rule", "at_filter", "duplicate", "echo", "cap"] {
        series.push(format!(
            "wxauto_messages_dropped_total{{instance_id=\"{id}\",reason=\"{reason}\"}}"
        ));
    }
    for outcome in ["success", "error", "too_large", "disabled", "unavailable"] {
        series.push(format!(
            "wxauto_media_downloads_total{{instance_id=\"{id}\",outcome=\"{outcome}\"}}"
        ));
    }
    series
}

/// The reply, drop and media counters of an instance exist at 0 from the start of the process
/// (before its first message, so `rate()` and WxautoRepliesFailing see the first failures),
/// appear at 0 for an instance a reload adds and go with one a reload removes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_series_exist_at_zero_from_the_start_and_follow_reloads() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let (files, binary, text, env) = start_with_a_of_two(&a, &b, ROUTING).await;
    let check = |metrics: &str, id: &str, want: Option<f64>| {
        for series in delivery_series(id) {
            assert_eq!(metric_value(metrics, &series), want, "{series}:\n{metrics}");
        }
    };
    // Ready means the config was applied: no message has been taken, none is needed.
    check(&binary.metrics().await, "wx-a", Some(0.0));
    let (only_b, _) = config_for(&[("wx-b", &b)], ROUTING);
    for (config, what) in [(&text, "wx-b added"), (&only_b, "wx-a removed")] {
        write_by_rename(&files.config, config);
        let hash = expected_hash(config, &env);
        let metrics = wait_for(&binary, what, |text| metric_value(text, HASH) == Some(hash)).await;
        check(&metrics, "wx-b", Some(0.0));
        let a_after = if config == &text { Some(0.0) } else { None };
        check(&metrics, "wx-a", a_after);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_invalid_yaml_keeps_the_running_config() {
    let a = start_sim("a").await;
    let files = files();
    let (text, env) = config_for(&[("wx-a", &a)], &format!("{FIXED_ALL}{LIFECYCLE_ON}"));
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);
    let metrics = binary.metrics().await;
    let (failures, hash) = (value(&metrics, FAILURES), value(&metrics, HASH));
    assert_eq!(value(&metrics, LAST_OK), 1.0);

    write_in_place(&files.config, &format!("{text}listener: [unclosed\n"));
    // One scrape is not a snapshot across families: wait until it shows both the failure counted
    // and the configuration marked as not loaded.
    let metrics = wait_for(&binary, "the reload failure", |text| {
        metric_value(text, FAILURES).is_some_and(|n| n > failures)
            && metric_value(text, LAST_OK) == Some(0.0)
    })
    .await;
    assert_eq!(value(&metrics, HASH), hash, "the old config stays active");
    assert_eq!(value(&metrics, &up("wx-a")), 1.0);
    keeps_polling(&a, 5).await;
    assert_eq!(footprint(&a), before);

    let failures = value(&binary.metrics().await, FAILURES);
    let (status, body) = binary.request(Method::POST, "/-/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(has_location(&body, "config.yaml"), "{body}");
    assert!(body.contains("invalid YAML"), "{body}");
    let metrics = binary.metrics().await;
    assert_eq!(value(&metrics, FAILURES), failures + 1.0);
    assert_eq!(value(&metrics, LAST_OK), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_a_wrong_type_deep_in_a_rule_is_named_by_key_path() {
    let a = start_sim("a").await;
    let files = files();
    let extra = format!("{FIXED_ALL}{LIFECYCLE_ON}{ROUTING}");
    let (text, env) = config_for(&[("wx-a", &a)], &extra);
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);
    let metrics = binary.metrics().await;
    let (failures, hash) = (value(&metrics, FAILURES), value(&metrics, HASH));

    let broken = text.replace("priority: 1", "priority: high");
    assert_ne!(broken, text);
    write_by_rename(&files.config, &broken);
    // One scrape is not a snapshot across families: wait until it shows both the failure counted
    // and the configuration marked as not loaded.
    let metrics = wait_for(&binary, "the reload failure", |text| {
        metric_value(text, FAILURES).is_some_and(|n| n > failures)
            && metric_value(text, LAST_OK) == Some(0.0)
    })
    .await;
    assert_eq!(value(&metrics, HASH), hash);
    keeps_polling(&a, 5).await;
    assert_eq!(footprint(&a), before);

    let (status, body) = binary.request(Method::POST, "/-/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("rules[0].priority"), "{body}");
    assert!(has_location(&body, "config.yaml"), "{body}");
    let (status, body) = binary.request(Method::POST, "/api/v1/reload").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("rules[0].priority"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_fixing_the_file_clears_the_failure() {
    let a = start_sim("a").await;
    let files = files();
    let (text, env) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);
    let metrics = binary.metrics().await;
    let (failures, reloads) = (value(&metrics, FAILURES), value(&metrics, RELOADS));

    write_by_rename(&files.config, "instances: [\n");
    wait_for(&binary, "the reload failure", |text| {
        metric_value(text, FAILURES).is_some_and(|n| n > failures)
            && metric_value(text, LAST_OK) == Some(0.0)
    })
    .await;

    // Undo back to the running content: no new config, but the failure is over.
    write_by_rename(&files.config, &text);
    wait_for(&binary, "the failure cleared by an undo", |text| {
        metric_value(text, LAST_OK) == Some(1.0)
    })
    .await;

    // A real fix with new content is a counted reload.
    let (fixed, _) = config_for(
        &[("wx-a", &a)],
        &format!("{FIXED_ALL}delivery:\n  max_attempts: 7\n"),
    );
    write_in_place(&files.config, "instances: [\n");
    wait_for(&binary, "the second failure", |text| {
        metric_value(text, LAST_OK) == Some(0.0)
    })
    .await;
    write_in_place(&files.config, &fixed);
    let hash = expected_hash(&fixed, &env);
    let metrics = wait_for(&binary, "the fix is live", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    assert_eq!(value(&metrics, LAST_OK), 1.0);
    assert!(value(&metrics, RELOADS) > reloads);
    assert!(value(&metrics, FAILURES) >= failures + 2.0);
    assert_eq!(value(&metrics, &up("wx-a")), 1.0);
    keeps_polling(&a, 3).await;
    assert_eq!(footprint(&a), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_storm_ends_on_the_final_content() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let files = files();
    let (with_b, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], FIXED_ALL);
    let (only_a, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_in_place(&files.config, &only_a);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);
    let reloads = value(&binary.metrics().await, RELOADS);

    // 20 writes, alternating the instance set and the way of writing; the last adds wx-b.
    let writes: Vec<String> = (0..20)
        .map(|n| {
            let base = if n % 2 == 1 { &with_b } else { &only_a };
            format!("# write {n}\n{base}")
        })
        .collect();
    for (n, text) in writes.iter().enumerate() {
        if n % 3 == 0 {
            write_by_rename(&files.config, text);
        } else {
            write_in_place(&files.config, text);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hash = expected_hash(&writes[19], &env);
    let metrics = wait_for(&binary, "the final content is live", |text| {
        metric_value(text, HASH) == Some(hash) && metric_value(text, &up("wx-b")) == Some(1.0)
    })
    .await;
    let counted = value(&metrics, RELOADS) - reloads;
    assert!(
        (1.0..10.0).contains(&counted),
        "{counted} reloads for one storm"
    );
    assert_eq!(value(&metrics, LAST_OK), 1.0);
    let (status, _) = binary.request(Method::GET, "/-/healthy").await;
    assert_eq!(status, 200);
    keeps_polling(&a, 3).await;
    assert_eq!(footprint(&a), before);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_configmap_data_symlink_swap() {
    use std::os::unix::fs::symlink;

    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let files = files();
    let conf = files.config.parent().unwrap().to_owned();
    let (only_a, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    let (with_b, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], FIXED_ALL);
    // The kubelet's layout: config.yaml -> ..data/config.yaml, ..data -> ..<timestamp>.
    std::fs::create_dir(conf.join("..2026_a")).unwrap();
    write_in_place(&conf.join("..2026_a/config.yaml"), &only_a);
    symlink("..2026_a", conf.join("..data")).unwrap();
    symlink("..data/config.yaml", &files.config).unwrap();
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);

    // The swap: a new timestamped dir, a new symlink renamed over ..data, the old dir removed.
    std::fs::create_dir(conf.join("..2026_b")).unwrap();
    write_in_place(&conf.join("..2026_b/config.yaml"), &with_b);
    symlink("..2026_b", conf.join("..data_tmp")).unwrap();
    std::fs::rename(conf.join("..data_tmp"), conf.join("..data")).unwrap();
    std::fs::remove_dir_all(conf.join("..2026_a")).unwrap();

    let hash = expected_hash(&with_b, &env);
    wait_for(&binary, "the swapped config is live", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    wait_up(&binary, &b, "wx-b").await;
    keeps_polling(&a, 3).await;
    assert_eq!(footprint(&a), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_lifecycle_gate_follows_the_file() {
    let a = start_sim("a").await;
    let files = files();
    let (closed, env) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_in_place(&files.config, &closed);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;

    for path in ["/-/reload", "/api/v1/reload", "/api/v1/restart"] {
        let (status, body) = binary.request(Method::POST, path).await;
        assert_eq!(status, 403, "POST {path}: {body}");
    }
    let (status, _) = binary.request(Method::GET, "/-/reload").await;
    assert_eq!(status, 405);

    let (open, _) = config_for(&[("wx-a", &a)], &format!("{FIXED_ALL}{LIFECYCLE_ON}"));
    write_by_rename(&files.config, &open);
    let hash = expected_hash(&open, &env);
    wait_for(&binary, "lifecycle enabled by the file", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    let (status, body) = binary.request(Method::POST, "/-/reload").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = binary.request(Method::GET, "/-/reload").await;
    assert_eq!(status, 405);

    write_in_place(&files.config, &closed);
    let hash = expected_hash(&closed, &env);
    wait_for(&binary, "lifecycle disabled by the file", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    let (status, body) = binary.request(Method::POST, "/-/reload").await;
    assert_eq!(status, 403, "{body}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_on_sighup() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let files = files();
    let (only_a, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    let (with_b, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], FIXED_ALL);
    write_in_place(&files.config, &only_a);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);

    // With the file untouched the watcher has nothing to report, and an unchanged watcher
    // reload is never counted; a counted reload can only come from the signal.
    let metrics = binary.metrics().await;
    let (reloads, hash) = (value(&metrics, RELOADS), value(&metrics, HASH));
    binary.signal("HUP");
    let metrics = wait_for(&binary, "the SIGHUP reload", |text| {
        metric_value(text, RELOADS).is_some_and(|n| n > reloads)
    })
    .await;
    assert_eq!(value(&metrics, HASH), hash);
    assert_eq!(value(&metrics, LAST_OK), 1.0);

    // An edit plus SIGHUP: the new config goes live (the watcher may see it too).
    write_in_place(&files.config, &with_b);
    binary.signal("HUP");
    let hash = expected_hash(&with_b, &env);
    wait_for(&binary, "the edited config is live", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    wait_up(&binary, &b, "wx-b").await;
    keeps_polling(&a, 3).await;
    assert_eq!(footprint(&a), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_unchanged_content_is_not_counted() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let files = files();
    let (text, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    let (with_b, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], FIXED_ALL);
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);
    let metrics = binary.metrics().await;
    let reloads = value(&metrics, RELOADS);

    // Each no-op edit still reaches the supervisor, which re-reads the file and records a
    // successful load: wait for that, so the edit is known to have been handled.
    let touch = |path: &Path| {
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(std::time::SystemTime::now()).unwrap();
    };
    let edits: [(&str, &dyn Fn()); 3] = [
        ("touch", &|| touch(&files.config)),
        ("same bytes in place", &|| {
            write_in_place(&files.config, &text)
        }),
        ("same bytes by rename", &|| {
            write_by_rename(&files.config, &text)
        }),
    ];
    for (what, edit) in edits {
        let handled = value(&binary.metrics().await, SUCCESS_TIME);
        edit();
        let metrics = wait_for(&binary, &format!("the {what} is handled"), |text| {
            metric_value(text, SUCCESS_TIME).is_some_and(|time| time > handled)
        })
        .await;
        assert_eq!(
            value(&metrics, RELOADS),
            reloads,
            "{what} counted as a reload"
        );
        assert_eq!(value(&metrics, LAST_OK), 1.0);
    }

    // A real change after them is exactly one more: none of the no-ops was counted late.
    write_in_place(&files.config, &with_b);
    let hash = expected_hash(&with_b, &env);
    let metrics = wait_for(&binary, "the real change is live", |text| {
        metric_value(text, HASH) == Some(hash)
    })
    .await;
    assert_eq!(value(&metrics, RELOADS), reloads + 1.0);
    assert_eq!(footprint(&a), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_fixed_listeners_are_added_and_removed_live() {
    let a = start_sim("a").await;
    let files = files();
    let (text, env) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_in_place(&files.config, &text);
    let binary = Binary::start(files.dir.path(), &files.config, &env).await;
    wait_up(&binary, &a, "wx-a").await;
    let before = footprint(&a);

    // A new fixed chat is listened without restarting the instance.
    let with_ops = format!("{FIXED_ALL}  - chat: ops\n");
    let (text, _) = config_for(&[("wx-a", &a)], &with_ops);
    write_by_rename(&files.config, &text);
    eventually("ops listened", DEADLINE, || async {
        (adds(&a, "ops") == 1).then_some(())
    })
    .await;

    // Removing it from the config removes it upstream, counted with reason "config".
    let (text, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_by_rename(&files.config, &text);
    wait_for(&binary, "ops removed for the config", |text| {
        metric_value(
            text,
            "wxauto_listeners_removed_total{instance_id=\"wx-a\",reason=\"config\"}",
        ) == Some(1.0)
    })
    .await;
    let log = a.sim.snapshot().listen_log;
    assert!(
        log.iter()
            .any(|event| event.action == ListenAction::Remove && event.nickname == "ops")
    );
    assert!(
        !log.iter()
            .any(|event| event.action == ListenAction::Remove && event.nickname == FIXED_CHAT),
        "the remaining fixed chat stays"
    );
    assert_eq!(footprint(&a), before, "wx-a was not restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_watch_poll_sees_edits_without_filesystem_events() {
    let (a, b) = (start_sim("a").await, start_sim("b").await);
    let files = files();
    let (both, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], FIXED_ALL);
    let (only_a, _) = config_for(&[("wx-a", &a)], FIXED_ALL);
    write_in_place(&files.config, &only_a);
    let binary =
        Binary::start_with_args(files.dir.path(), &files.config, &env, &["--watch", "poll"]).await;
    wait_up(&binary, &a, "wx-a").await;
    let started = binary.stderr_text();
    assert!(
        started
            .lines()
            .any(|line| line.contains("Watching the configuration") && line.contains("poll")),
        "the poll watcher is in use:\n{started}"
    );
    write_by_rename(&files.config, &both);
    wait_up(&binary, &b, "wx-b").await;
    let metrics = binary.metrics().await;
    assert_eq!(value(&metrics, RELOADS), 1.0);
}

/// Kills the child on drop, so a failing assertion leaves no process behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_a_new_log_level_live() {
    let a = start_sim("a").await;
    let files = files();
    let with_level =
        |level: &str| config_for(&[("wx-a", &a)], &format!("logging:\n  level: {level}\n"));
    let (text, env) = with_level("info");
    write_in_place(&files.config, &text);
    // No --log-level on the command line: the file decides, on reloads too.
    let port = free_port();
    let stderr = files.dir.path().join("level.stderr");
    let _child = KillOnDrop(
        std::process::Command::new(BIN)
            .current_dir(files.dir.path())
            .arg("--config")
            .arg(&files.config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("WXAUTO_SIDECAR_CONFIG")
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let http = http_client();
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let scrape = || async {
        match http.get(&metrics_url).send().await {
            Ok(response) => response.text().await.ok(),
            Err(_) => None,
        }
    };
    eventually("the sidecar is up", DEADLINE, || async {
        let text = scrape().await?;
        (metric_value(&text, &up("wx-a")) == Some(1.0)).then_some(())
    })
    .await;
    let debug_lines = || {
        std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(" DEBUG "))
            .count()
    };
    assert_eq!(debug_lines(), 0, "info level logs no debug lines");

    let (text, _) = with_level("debug");
    write_by_rename(&files.config, &text);
    let hash = expected_hash(&text, &env);
    eventually("the new config is live", DEADLINE, || async {
        let text = scrape().await?;
        (metric_value(&text, HASH) == Some(hash)).then_some(())
    })
    .await;
    // Debug lines now appear (every poll logs some at debug).
    eventually("debug lines after the reload", DEADLINE, || async {
        (debug_lines() > 0).then_some(())
    })
    .await;

    // A typo is an invalid file like any other: the running config and filter stay, and the
    // failure is logged with its location (a filter of target "debugg" would log nothing).
    let failures = value(&scrape().await.unwrap(), FAILURES);
    let (typo, _) = with_level("debugg");
    write_by_rename(&files.config, &typo);
    eventually("the reload failure", DEADLINE, || async {
        let text = scrape().await?;
        (metric_value(&text, FAILURES).is_some_and(|n| n > failures)
            && metric_value(&text, LAST_OK) == Some(0.0))
        .then_some(())
    })
    .await;
    // The lines are written after the counter moves.
    eventually("the located error in the log", DEADLINE, || async {
        let log = std::fs::read_to_string(&stderr).unwrap_or_default();
        let line = log
            .lines()
            .find(|line| line.contains("logging.level: unknown log level \"debugg\""))?;
        has_location(line, "config.yaml").then_some(())
    })
    .await;
    assert_eq!(
        value(&scrape().await.unwrap(), HASH),
        hash,
        "the old config stays"
    );
    let seen = debug_lines();
    eventually("debug lines go on", DEADLINE, || async {
        (debug_lines() > seen).then_some(())
    })
    .await;
}
