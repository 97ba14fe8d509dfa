//! Supervised processes on the real OS: real `sh` children and grandchildren, checked against
//! `/proc` (Linux only). Every wait polls the API or `/metrics` with a deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use wxauto_sidecar::config::{RestartPolicy, StopSignal};
use wxauto_sidecar::simulator::Fault;

use crate::util::*;

// === /proc helpers ===

/// `(state, ppid, pgrp)` of a pid, or `None` when it is gone.
fn stat(pid: u64) -> Option<(String, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_owned();
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Alive means present and not a zombie (an orphan's zombie waits for its reaper).
fn alive(pid: u64) -> bool {
    stat(pid).is_some_and(|(state, _, _)| state != "Z" && state != "X")
}

/// Live pids whose process group is `pgid`.
fn group_members(pgid: u64) -> Vec<u64> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u64>().ok())
        .filter(|pid| stat(*pid).is_some_and(|(state, _, group)| group == pgid && state != "Z"))
        .collect()
}

fn vm_rss_bytes(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// utime + stime in seconds (clock ticks of 1/100 s, Linux's USER_HZ).
fn cpu_seconds(pid: u64) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = text.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

// === config and API helpers ===

/// A config with no instances (unless `instances` is given) and the given `processes:` block.
fn config_text(dir: &Path, instances: &str, processes: &str) -> String {
    let instances = if instances.is_empty() {
        "instances: []\n".to_owned()
    } else {
        instances.to_owned()
    };
    format!(
        "health:\n  report_interval: 200ms\n  report_file: {}\n{instances}processes:\n{processes}",
        dir.join("report.json").display()
    )
}

async fn process(sidecar: &Sidecar, name: &str) -> Value {
    let body = sidecar.get_json("/api/v1/processes").await;
    assert_eq!(body["success"], true, "{body}");
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

async fn wait_state(sidecar: &Sidecar, name: &str, state: &str) -> Value {
    eventually(&format!("{name} {state}"), DEADLINE, || async {
        let row = process(sidecar, name).await;
        (row["state"] == state).then_some(row)
    })
    .await
}

fn pids_of(row: &Value) -> Vec<u64> {
    row["group_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pid| pid.as_u64().unwrap())
        .collect()
}

/// A shell that starts a grandchild (`sleep`) and waits for it.
const TREE: &str = "['-c', 'sleep 300 & echo started $$; wait']";

// === tests ===

#[tokio::test]
async fn a_crashing_child_is_backed_off_counted_and_goes_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        dir.path(),
        "",
        "  - name: crasher\n    command: sh\n    args: ['-c', 'echo boom; echo oops >&2; exit 3']\n    \
         restart: on-failure\n    backoff: { initial: 20ms, max: 50ms }\n    \
         crash_loop: { max_starts: 3, window: 1m }\n",
    );
    let started = Instant::now();
    let sidecar = start_sidecar(text, Vec::new()).await;
    let row = wait_state(&sidecar, "crasher", "fatal").await;
    // Three starts with 20 ms, 40 ms and 50 ms (capped) between them and the give-up.
    assert!(
        started.elapsed() >= Duration::from_millis(110),
        "no backoff: fatal after {:?}",
        started.elapsed()
    );
    assert_eq!(row["restarts"], 2, "{row}");
    assert_eq!(row["last_exit_code"], 3, "{row}");
    assert_eq!(row["pid"], Value::Null);
    assert!(
        row["last_error"].as_str().unwrap().contains("crash loop"),
        "{row}"
    );

    let metrics = eventually("three runs' output counted", DEADLINE, || async {
        let text = sidecar.metrics().await;
        let out = metric_value(
            &text,
            "wxauto_process_log_lines_total{process=\"crasher\",stream=\"stdout\"}",
        );
        let err = metric_value(
            &text,
            "wxauto_process_log_lines_total{process=\"crasher\",stream=\"stderr\"}",
        );
        (out == Some(3.0) && err == Some(3.0)).then_some(text)
    })
    .await;
    let series = |name: &str| metric_value(&metrics, name);
    assert_eq!(
        series("wxauto_process_state{process=\"crasher\",state=\"fatal\"}"),
        Some(1.0)
    );
    for state in ["starting", "running", "backoff", "stopped", "exited"] {
        assert_eq!(
            series(&format!(
                "wxauto_process_state{{process=\"crasher\",state=\"{state}\"}}"
            )),
            Some(0.0),
            "{state}"
        );
    }
    assert_eq!(
        series("wxauto_process_restarts_total{process=\"crasher\"}"),
        Some(2.0)
    );
    assert_eq!(series("wxauto_process_up{process=\"crasher\"}"), Some(0.0));
    assert_eq!(
        series("wxauto_process_last_exit_code{process=\"crasher\"}"),
        Some(3.0)
    );
    assert!(series("wxauto_process_start_time_seconds{process=\"crasher\"}").unwrap() > 1.0e9);
    // The row's `start_time` is RFC 3339, like every `start_time` of the API; the unix seconds
    // the metric shows are beside it.
    let row = process(&sidecar, "crasher").await;
    assert_eq!(check_time_fields(&row, "crasher"), 1, "{row}");
    let seconds = row["start_time_seconds"].as_f64().unwrap();
    // The same number: serde_json's default float parser (no `float_roundtrip`) may read the
    // JSON text one unit in the last place off, 0.24 µs at this magnitude.
    let metric = series("wxauto_process_start_time_seconds{process=\"crasher\"}").unwrap();
    assert!((metric - seconds).abs() < 1e-6, "{metric} vs {seconds}");
    let text = row["start_time"].as_str().unwrap();
    let millis = chrono::DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_millis();
    assert!((millis as f64 / 1000.0 - seconds).abs() <= 0.001, "{row}");

    // Reported in the health document and the status, without changing the score's formula.
    let health = sidecar.get_json("/api/v1/health").await;
    assert_eq!(
        health["data"]["processes"]["fatal"][0], "crasher",
        "{health}"
    );
    assert_eq!(health["data"]["health_score"], 100, "{health}");
    let status = sidecar.get_json("/api/v1/status").await;
    assert_eq!(status["data"]["processes"]["fatal_count"], 1, "{status}");

    // A manual start forgets the history: it runs (and fails) again.
    let (code, body) = sidecar.post("/api/v1/processes/crasher/start").await;
    assert_eq!(code, 200, "{body}");
    let row = eventually("a new round of starts", DEADLINE, || async {
        let row = process(&sidecar, "crasher").await;
        (row["restarts"].as_u64().unwrap() >= 3).then_some(row)
    })
    .await;
    assert_ne!(row["state"], Value::Null);
    wait_state(&sidecar, "crasher", "fatal").await;
    sidecar.stop().await;
}

#[tokio::test]
async fn process_commands_are_gated_and_unknown_names_are_404() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        dir.path(),
        "",
        "  - name: sleeper\n    command: sleep\n    args: ['300']\n",
    );
    let sidecar = start_sidecar_with(text.clone(), Vec::new(), false).await;
    wait_state(&sidecar, "sleeper", "running").await;
    let (code, body) = sidecar.post("/api/v1/processes/sleeper/stop").await;
    assert_eq!(code, 403, "{body}");
    assert_eq!(process(&sidecar, "sleeper").await["state"], "running");
    sidecar.stop().await;

    let sidecar = start_sidecar_with(text, Vec::new(), true).await;
    // The status page shows the process; the endpoint list names the API.
    let page = sidecar
        .http
        .get(sidecar.url("/?view=status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("id=\"processes\"") && page.contains("<b>sleeper</b>"),
        "{page}"
    );
    let links = sidecar
        .http
        .get(sidecar.url("/?view=links"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(links.contains("/api/v1/processes"), "{links}");
    let (code, body) = sidecar.post("/api/v1/processes/nope/restart").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["success"], false);
    let (code, _) = sidecar.post("/api/v1/processes/sleeper/explode").await;
    assert_eq!(code, 404);
    let running = wait_state(&sidecar, "sleeper", "running").await;
    let pid = running["pid"].as_u64().unwrap();
    let (code, body) = sidecar.post("/api/v1/processes/sleeper/stop").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["state"], "stopped", "{body}");
    assert!(!alive(pid), "stopped process {pid} still alive");
    // Stopped stays stopped (no restart policy applies), until started.
    assert_eq!(
        sidecar
            .metric("wxauto_process_state{process=\"sleeper\",state=\"stopped\"}")
            .await,
        Some(1.0)
    );
    let (code, body) = sidecar.post("/api/v1/processes/sleeper/start").await;
    assert_eq!(code, 200, "{body}");
    let state = body["data"]["state"].as_str().unwrap().to_owned();
    assert!(state == "starting" || state == "running", "{body}");
    assert_eq!(body["data"]["restarts"], 1, "{body}");
    sidecar.stop().await;
}

#[tokio::test]
async fn restart_replaces_the_child_and_its_grandchild() {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        dir.path(),
        "",
        &format!("  - name: tree\n    command: sh\n    args: {TREE}\n    stop_timeout: 5s\n"),
    );
    let sidecar = start_sidecar(text, Vec::new()).await;
    let before = eventually("leader and grandchild", DEADLINE, || async {
        let row = process(&sidecar, "tree").await;
        (pids_of(&row).len() == 2).then_some(row)
    })
    .await;
    let leader = before["pid"].as_u64().unwrap();
    let old = pids_of(&before);
    // Its own group, led by the child; the grandchild is the leader's child, in the same group.
    assert_eq!(stat(leader).unwrap().2, leader);
    let grandchild = *old.iter().find(|pid| **pid != leader).unwrap();
    assert_eq!(stat(grandchild).unwrap().1, leader);
    assert_eq!(stat(grandchild).unwrap().2, leader);
    assert_eq!(group_members(leader).len(), 2);

    let (code, body) = sidecar.post("/api/v1/processes/tree/restart").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["data"]["restarts"], 1, "{body}");
    for pid in &old {
        assert!(!alive(*pid), "old process {pid} survived the restart");
    }
    let after = eventually("a new leader and grandchild", DEADLINE, || async {
        let row = process(&sidecar, "tree").await;
        (pids_of(&row).len() == 2).then_some(row)
    })
    .await;
    let new = pids_of(&after);
    assert!(
        new.iter().all(|pid| !old.contains(pid)),
        "{old:?} -> {new:?}"
    );
    let new_leader = after["pid"].as_u64().unwrap();
    assert_eq!(group_members(new_leader).len(), 2);
    assert_eq!(
        sidecar
            .metric("wxauto_process_restarts_total{process=\"tree\"}")
            .await,
        Some(1.0)
    );
    sidecar.stop().await;
    for pid in &new {
        assert!(!alive(*pid), "process {pid} survived the sidecar's stop");
    }
}

#[tokio::test]
async fn memory_and_cpu_are_summed_over_the_group_like_proc_says() {
    let dir = tempfile::tempdir().unwrap();
    // A leader holding ~16 MB in a shell variable, and a child shell that burns some CPU, says
    // so, and sleeps.
    let script = dir.path().join("hog.sh");
    let flag = dir.path().join("looped");
    std::fs::write(
        &script,
        format!(
            "x=$(head -c 16000000 /dev/zero | tr '\\0' a)\n\
             sh -c 'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; touch {flag}; sleep 300' &\n\
             sleep 300\n\
             echo ${{#x}}\n",
            flag = flag.display()
        ),
    )
    .unwrap();
    let text = config_text(
        dir.path(),
        "",
        &format!(
            "  - name: hog\n    command: sh\n    args: ['{}']\n",
            script.display()
        ),
    );
    let sidecar = start_sidecar(text, Vec::new()).await;
    eventually("the loop finished", Duration::from_secs(30), || async {
        flag.exists().then_some(())
    })
    .await;
    let leader = wait_state(&sidecar, "hog", "running").await["pid"]
        .as_u64()
        .unwrap();
    eventually("the leader holds its variable", DEADLINE, || async {
        (vm_rss_bytes(leader) > 16_000_000).then_some(())
    })
    .await;
    let pids = group_members(leader);
    let rss_before: u64 = pids.iter().map(|pid| vm_rss_bytes(*pid)).sum();
    let row = process(&sidecar, "hog").await;
    let rss_after: u64 = pids.iter().map(|pid| vm_rss_bytes(*pid)).sum();
    let mut reported_pids = pids_of(&row);
    reported_pids.sort_unstable();
    let mut expected_pids = pids.clone();
    expected_pids.sort_unstable();
    assert_eq!(reported_pids, expected_pids);
    let reported = row["memory_bytes"].as_u64().unwrap() as f64;
    let (low, high) = (
        rss_before.min(rss_after) as f64,
        rss_before.max(rss_after) as f64,
    );
    assert!(
        reported >= low * 0.9 && reported <= high * 1.1,
        "reported {reported} bytes, /proc VmRSS sum {low}..{high}"
    );
    // The loop is over: CPU time no longer moves.
    let proc_cpu: f64 = pids.iter().map(|pid| cpu_seconds(*pid)).sum();
    let cpu = row["cpu_seconds"].as_f64().unwrap();
    assert!(proc_cpu > 0.0, "the loop used no measurable CPU");
    assert!(
        (cpu - proc_cpu).abs() <= 0.02 + proc_cpu * 0.05,
        "reported {cpu} s, /proc says {proc_cpu} s"
    );
    let metrics = sidecar.metrics().await;
    let gauge = metric_value(
        &metrics,
        "wxauto_process_resident_memory_bytes{process=\"hog\"}",
    )
    .unwrap();
    assert!(gauge >= low * 0.9 && gauge <= high * 1.1, "{gauge}");
    let counter = metric_value(
        &metrics,
        "wxauto_process_cpu_seconds_total{process=\"hog\"}",
    )
    .unwrap();
    assert!(
        (counter - proc_cpu).abs() <= 0.02 + proc_cpu * 0.05,
        "{counter}"
    );
    sidecar.stop().await;
}

#[tokio::test]
async fn a_linked_instance_down_while_its_process_restarts_records_no_outage() {
    let linked = start_sim("linked").await;
    let plain = start_sim("plain").await;
    let dir = tempfile::tempdir().unwrap();
    let (base, env) = config_for(&[("wx-linked", &linked), ("wx-plain", &plain)], "");
    let instances = &base[base.find("instances:").unwrap()..];
    let head = &base[..base.find("health:").unwrap()];
    let text = format!(
        "{head}{}",
        config_text(
            dir.path(),
            instances,
            "  - name: api\n    command: sleep\n    args: ['300']\n    instance: wx-linked\n",
        )
    );
    let sidecar = start_sidecar(text, env).await;
    for id in ["wx-linked", "wx-plain"] {
        eventually(&format!("{id} up"), DEADLINE, || async {
            (sidecar
                .metric(&format!("wxauto_client_up{{instance_id=\"{id}\"}}"))
                .await
                == Some(1.0))
            .then_some(())
        })
        .await;
    }
    // The process restarts; meanwhile both instances go down.
    let (code, body) = sidecar.post("/api/v1/processes/api/restart").await;
    assert_eq!(code, 200, "{body}");
    linked.sim.set_fault(Fault::Http500);
    plain.sim.set_fault(Fault::Http500);
    for id in ["wx-linked", "wx-plain"] {
        eventually(&format!("{id} down"), DEADLINE, || async {
            (sidecar
                .metric(&format!("wxauto_client_up{{instance_id=\"{id}\"}}"))
                .await
                == Some(0.0))
            .then_some(())
        })
        .await;
    }
    // The unlinked one recorded its outage; the linked one, within its grace, did not.
    let errors = |id: &str| format!("wxauto_client_errors_total{{instance_id=\"{id}\"}}");
    eventually("the plain outage recorded", DEADLINE, || async {
        (sidecar.metric(&errors("wx-plain")).await >= Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(sidecar.metric(&errors("wx-linked")).await, Some(0.0));
    sidecar.stop().await;
}

/// The real binary with a config file in a temp dir.
struct Bin {
    // Dropped first, so that a failing test still finds its stderr file in `dir`.
    binary: Binary,
    config: std::path::PathBuf,
    dir: tempfile::TempDir,
}

async fn start_binary(processes: &str) -> Bin {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  enable_lifecycle: true\n{}",
            config_text(dir.path(), "", processes)
        ),
    )
    .unwrap();
    let binary = Binary::start(dir.path(), &config, &[]).await;
    Bin {
        dir,
        config,
        binary,
    }
}

async fn binary_processes(binary: &Binary) -> Vec<Value> {
    let (status, body) = binary.request(Method::GET, "/api/v1/processes").await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    body["data"].as_array().unwrap().clone()
}

async fn binary_row(binary: &Binary, name: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(name, DEADLINE, || async {
        binary_processes(binary)
            .await
            .into_iter()
            .find(|row| row["name"] == name && check(row))
    })
    .await
}

#[tokio::test]
async fn sigterm_to_the_sidecar_leaves_no_process_of_any_group_alive() {
    // `tree` stops on TERM; `stubborn` ignores TERM (and so does its grandchild, which inherits
    // the ignored disposition), so its group is killed after stop_timeout.
    let bin = start_binary(&format!(
        "  - name: tree\n    command: sh\n    args: {TREE}\n  \
         - name: stubborn\n    command: sh\n    args: ['-c', 'trap \"\" TERM; sleep 300 & echo stubborn $$; wait; wait']\n    \
         stop_timeout: 300ms\n"
    ))
    .await;
    let binary = &bin.binary;
    let mut pids = Vec::new();
    for name in ["tree", "stubborn"] {
        let row = binary_row(binary, name, |row| pids_of(row).len() == 2).await;
        pids.extend(pids_of(&row));
    }
    assert!(pids.iter().all(|pid| alive(*pid)));
    let started = Instant::now();
    stop_gracefully(binary).await;
    for pid in &pids {
        assert!(!alive(*pid), "process {pid} outlived the sidecar");
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let log = binary.stderr_text();
    // Output went to the sidecar's log with the process name, and the stubborn group was killed.
    assert!(
        log.contains("process=tree") && log.contains("started"),
        "{log}"
    );
    assert!(log.contains("did not stop within stop_timeout"), "{log}");
    drop(bin.config);
    drop(bin.dir);
}

#[tokio::test]
async fn reload_restarts_only_the_changed_process() {
    let sleeper = |name: &str, seconds: &str| {
        format!("  - name: {name}\n    command: sleep\n    args: ['{seconds}']\n")
    };
    let bin = start_binary(&format!(
        "{}{}{}",
        sleeper("same", "300"),
        sleeper("changed", "300"),
        sleeper("removed", "300")
    ))
    .await;
    let binary = &bin.binary;
    let mut before = std::collections::HashMap::new();
    for name in ["same", "changed", "removed"] {
        let row = binary_row(binary, name, |row| row["state"] == "running").await;
        before.insert(name, row["pid"].as_u64().unwrap());
    }
    let text = std::fs::read_to_string(&bin.config).unwrap();
    let mut next = text.replace(&sleeper("removed", "300"), &sleeper("added", "301"));
    next = next.replace(&sleeper("changed", "300"), &sleeper("changed", "302"));
    // A settings-only change applies in place.
    next = next.replace(
        &sleeper("same", "300"),
        &format!("{}    stop_timeout: 3s\n", sleeper("same", "300")),
    );
    // Atomically (write and rename), so the watcher never reads a half-written file.
    let tmp = bin.config.with_extension("tmp");
    std::fs::write(&tmp, next).unwrap();
    std::fs::rename(&tmp, &bin.config).unwrap();
    // The watcher may see the write first; either way one reload applies it.
    let (status, body) = binary.request(Method::POST, "/-/reload").await;
    assert_eq!(status, 200, "{body}");
    let rows = eventually("the process diff applied", DEADLINE, || async {
        let rows = binary_processes(binary).await;
        let names: Vec<String> = rows
            .iter()
            .map(|row| row["name"].as_str().unwrap().to_owned())
            .collect();
        let changed = rows.iter().any(|row| {
            row["name"] == "changed" && row["restarts"] == 1 && row["state"] == "running"
        });
        (names == ["same", "changed", "added"] && changed).then_some(rows)
    })
    .await;
    assert!(
        binary.stderr_text().contains(
            "processes added [added], removed [removed], restarted [changed], updated [same]"
        ),
        "{}",
        binary.stderr_text()
    );
    let row = |name: &str| rows.iter().find(|row| row["name"] == name).unwrap().clone();
    assert_eq!(row("same")["pid"].as_u64(), Some(before["same"]));
    assert_eq!(row("same")["restarts"], 0);
    assert_ne!(row("changed")["pid"].as_u64(), Some(before["changed"]));
    assert_eq!(row("changed")["restarts"], 1);
    assert!(!alive(before["changed"]));
    assert!(!alive(before["removed"]));
    assert!(alive(before["same"]));
    let metrics = binary.metrics().await;
    assert!(
        !metrics.contains("process=\"removed\""),
        "removed series remain"
    );
    assert!(metrics.contains("wxauto_process_up{process=\"added\"}"));
    let cmdline = std::fs::read_to_string(format!(
        "/proc/{}/cmdline",
        row("changed")["pid"].as_u64().unwrap()
    ))
    .unwrap();
    assert!(cmdline.contains("302"), "{cmdline:?}");
    // A graceful stop, not the harness's kill: a SIGKILLed sidecar cannot stop its groups.
    stop_gracefully(binary).await;
}

/// SIGTERM, then wait until the sidecar is gone (a zombie until the harness reaps it).
async fn stop_gracefully(binary: &Binary) {
    binary.signal("TERM");
    eventually("the sidecar exited", DEADLINE, || async {
        (!alive(u64::from(binary.pid()))).then_some(())
    })
    .await;
}

#[test]
fn the_commented_example_is_valid_once_uncommented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("examples/config.yaml")).unwrap();
    let start = text
        .find("# processes:")
        .expect("the example has a processes block");
    let block: String = text[start..]
        .lines()
        .take_while(|line| line.starts_with("# "))
        .map(|line| format!("{}\n", &line[2..]))
        .collect();
    let env = |name: &str| Some(format!("{name}-example-value"));
    let loaded = wxauto_sidecar::config::decode(&format!("{text}\n{block}"), None, &env)
        .unwrap_or_else(|errors| panic!("{errors}"));
    let process = &loaded.config.processes[0];
    assert_eq!(process.name, "wxauto-api");
    assert_eq!(process.args, ["run.py", "--port", "5000"]);
    assert_eq!(process.restart, RestartPolicy::Always);
    assert_eq!(process.stop_signal, StopSignal::Term);
    assert_eq!(process.crash_loop.max_starts, 5);
    assert_eq!(process.instance.as_deref(), Some("wx-main"));
}

#[tokio::test]
async fn process_metrics_pass_promtool_check() {
    let Some(promtool) = crate::http::which("promtool") else {
        assert!(
            std::env::var_os("WXAUTO_REQUIRE_TOOLS").is_none(),
            "promtool is required (scripts/install-tools.sh installs it)"
        );
        eprintln!("promtool not installed; skipped (scripts/test.sh installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(
        dir.path(),
        "",
        "  - name: once\n    command: sh\n    args: ['-c', 'echo hi; exit 1']\n    restart: never\n  \
         - name: sleeper\n    command: sleep\n    args: ['300']\n",
    );
    let sidecar = start_sidecar(text, Vec::new()).await;
    wait_state(&sidecar, "once", "exited").await;
    wait_state(&sidecar, "sleeper", "running").await;
    let body = sidecar.metrics().await;
    for series in [
        "wxauto_process_last_exit_code{process=\"once\"} 1",
        "wxauto_process_state{process=\"once\",state=\"exited\"} 1",
        "wxauto_process_up{process=\"sleeper\"} 1",
    ] {
        assert!(body.contains(series), "{series} missing");
    }
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let findings = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && findings.trim().is_empty(),
        "promtool: {findings}"
    );
    sidecar.stop().await;
}
