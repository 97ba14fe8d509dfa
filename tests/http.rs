//! The HTTP surface: probes, metrics exposition, the JSON monitor API and lifecycle gating.

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_content_types_and_openmetrics() {
    let sim = start_sim("h1").await;
    let (text, env) = config_for(&[("wx-h", &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    let http = &sidecar.http;
    for path in ["/-/healthy", "/-/ready", "/"] {
        let response = http.get(sidecar.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let response = http.get(sidecar.url("/metrics")).send().await.unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = response.text().await.unwrap();
    for name in [
        "wxauto_listener_running 1",
        "wxauto_health_score ",
        "wxauto_health_status{status=\"healthy\"}",
        "wxauto_health_deduction_points{component=\"clients\"}",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_start_time_seconds ",
        "wxauto_api_requests_total{instance_id=\"wx-h\",endpoint=\"health\",outcome=\"success\"}",
        "wxauto_config_last_reload_successful 1",
        "wxauto_uptime_seconds ",
    ] {
        assert!(body.contains(name), "missing {name}");
    }
    assert!(!body.contains("# EOF"));
    // The revision is the build's commit (a build script runs git), or `unknown` without git.
    let revision = wxauto_sidecar::monitor::REVISION;
    let build_info = format!(
        "wxauto_build_info{{version=\"{}\",revision=\"{revision}\"}} ",
        env!("CARGO_PKG_VERSION")
    );
    assert!(body.contains(&build_info), "missing {build_info}");
    let git = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output();
    match git {
        Ok(out) if out.status.success() && std::env::var_os("WXAUTO_REVISION").is_none() => {
            assert_eq!(revision, String::from_utf8_lossy(&out.stdout).trim());
        }
        _ => assert!(!revision.is_empty()),
    }
    let response = http
        .get(sidecar.url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(response.text().await.unwrap().ends_with("# EOF\n"));
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_envelope_fields_and_bad_queries() {
    let sim = start_sim("h2").await;
    sim.sim.inject("alice", "alice", "hi");
    let (text, env) = config_for(&[("wx-h", &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    eventually("message taken", DEADLINE, || async {
        (!sidecar.sink.contents().is_empty()).then_some(())
    })
    .await;
    // The message is committed before its chat is listened and published: wait for both.
    eventually("chat published", DEADLINE, || async {
        let listeners = sidecar.get_json("/api/v1/listeners").await;
        (listeners["total_count"] == 1).then_some(())
    })
    .await;
    let status = sidecar.get_json("/api/v1/status").await;
    assert_eq!(status["success"], true);
    assert!(status["timestamp"].as_str().unwrap().contains('T'));
    for field in [
        "service_name",
        "running",
        "uptime_seconds",
        "uptime_formatted",
        "task_count",
        "error_count",
        "last_error_time",
        "last_error_message",
        "memory_usage_mb",
        "cpu_percent",
    ] {
        assert!(status["data"].get(field).is_some(), "status.{field}");
    }
    assert!(status["data"]["memory_usage_mb"].as_f64().unwrap() > 0.0);
    let listeners = sidecar.get_json("/api/v1/listeners").await;
    assert_eq!(listeners["total_count"], 1);
    assert_eq!(listeners["active_count"], 1);
    let row = &listeners["data"][0];
    for field in [
        "instance_id",
        "who",
        "active",
        "last_message_time",
        "last_check_time",
        "message_count",
        "error_count",
    ] {
        assert!(row.get(field).is_some(), "listeners.{field}");
    }
    let stats = sidecar.get_json("/api/v1/statistics").await;
    for field in [
        "total_messages_processed",
        "total_errors",
        "api_calls_made",
        "listeners_added",
        "listeners_removed",
        "config_reloads",
        "uptime_seconds",
        "uptime_formatted",
        "start_time",
        "current_time",
        "error_rate",
        "recent_errors_count",
    ] {
        assert!(stats["data"].get(field).is_some(), "statistics.{field}");
    }
    assert_eq!(stats["data"]["total_messages_processed"], 1);
    assert!(stats["data"]["api_calls_made"].as_u64().unwrap() > 0);

    for bad in ["0", "101", "-1", "ten", ""] {
        let response = sidecar
            .http
            .get(sidecar.url(&format!("/api/v1/errors?limit={bad}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "limit={bad}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["success"], false);
        assert!(body["error"].as_str().unwrap().contains("limit"));
    }
    let errors = sidecar.get_json("/api/v1/errors?limit=100").await;
    assert_eq!(errors["success"], true);
    assert!(errors["count"].is_number());

    // A wrong method: the same envelope, 405, and the methods the path takes in `Allow`; an
    // unknown path stays the 404 envelope, whatever the method. (method, path, status, Allow)
    for (method, path, status, allow) in [
        ("POST", "/api/v1/status", 405, "GET,HEAD"),
        ("DELETE", "/api/v1/errors", 405, "GET,HEAD"),
        ("GET", "/api/v1/reload", 405, "POST"),
        ("PUT", "/api/v1/processes/x/restart", 405, "POST"),
        ("GET", "/api/v1/messages/dead/purge", 405, "POST"),
        ("POST", "/api/v1/nothing", 404, ""),
    ] {
        let what = format!("{method} {path}");
        let response = sidecar
            .http
            .request(method.parse().unwrap(), sidecar.url(path))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{what}");
        let allowed = response
            .headers()
            .get("allow")
            .map_or(String::new(), |value| {
                value.to_str().unwrap().replace(' ', "")
            });
        assert_eq!(allowed, allow, "{what}");
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "{what}"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["success"], false, "{what}");
        assert!(body["timestamp"].as_str().unwrap().contains('T'), "{body}");
        if status == 405 {
            let error = body["error"].as_str().unwrap();
            assert!(error.contains(method), "{body}");
        }
    }
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_score_matches_between_metrics_and_api() {
    let up = start_sim("h3").await;
    let down = start_sim("h4").await;
    down.sim.set_online(false);
    let (text, env) = config_for(&[("wx-up", &up), ("wx-down", &down)], "");
    let sidecar = start_sidecar(text, env).await;
    // One of two clients down: 30 × 1 div 2 = 15 points for clients.
    let health = eventually("score settles", DEADLINE, || async {
        let health = sidecar.get_json("/api/v1/health").await;
        (health["data"]["deductions"]["clients"] == 15).then_some(health)
    })
    .await;
    let data = &health["data"];
    let score = data["health_score"].as_u64().unwrap();
    let deductions: u64 = ["listener", "clients", "listeners", "error_rate"]
        .iter()
        .map(|name| data["deductions"][*name].as_u64().unwrap())
        .sum();
    assert_eq!(score + deductions, 100);
    let text = sidecar.metrics().await;
    let api = sidecar.get_json("/api/v1/health").await;
    assert_eq!(
        metric_value(&text, "wxauto_health_score"),
        Some(api["data"]["health_score"].as_f64().unwrap()),
        "the same score on /metrics and the API"
    );
    for component in ["listener", "clients", "listeners", "error_rate"] {
        assert_eq!(
            metric_value(
                &text,
                &format!("wxauto_health_deduction_points{{component=\"{component}\"}}")
            ),
            api["data"]["deductions"][component].as_f64(),
            "{component}"
        );
    }
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_is_gated_and_restart_resets_uptime() {
    let sim = start_sim("h5").await;
    let (text, env) = config_for(&[("wx-h", &sim)], "");
    let closed = start_sidecar_with(text.clone(), env.clone(), false).await;
    for path in ["/-/reload", "/api/v1/reload", "/api/v1/restart"] {
        let response = closed.http.post(closed.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 403, "{path}");
    }
    let response = closed
        .http
        .get(closed.url("/-/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    closed.stop().await;

    let open = start_sidecar_with(text, env, true).await;
    let response = open.http.post(open.url("/-/reload")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let before = open.get_json("/api/v1/status").await["data"]["start_time_seconds"]
        .as_f64()
        .unwrap();
    // A restart from now on starts later than the first start: wait until the clock (the
    // sidecar's, in this process) has moved past it.
    eventually(
        "the clock passes the first start time",
        DEADLINE,
        || async {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64();
            (now > before).then_some(())
        },
    )
    .await;
    let response = open
        .http
        .post(open.url("/api/v1/restart"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let status = open.get_json("/api/v1/status").await;
    assert_eq!(status["data"]["running"], true);
    assert!(status["data"]["start_time_seconds"].as_f64().unwrap() > before);
    assert_eq!(
        open.metric("wxauto_listener_restarts_total").await,
        Some(1.0)
    );
    open.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check() {
    let Some(promtool) = which("promtool") else {
        assert!(
            std::env::var_os("WXAUTO_REQUIRE_TOOLS").is_none(),
            "promtool is required (scripts/install-tools.sh installs it)"
        );
        eprintln!("promtool not installed; skipped (scripts/test.sh installs it)");
        return;
    };
    let sim = start_sim("h6").await;
    sim.sim.inject("alice", "alice", "hi");
    let (text, env) = config_for(&[("wx-h", &sim)], "");
    let sidecar = start_sidecar(text, env).await;
    eventually("message taken", DEADLINE, || async {
        (!sidecar.sink.contents().is_empty()).then_some(())
    })
    .await;
    let body = sidecar.metrics().await;
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

pub fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_health_check_writes_the_report_file() {
    let sim = start_sim("h7").await;
    let (text, env) = config_for(&[("wx-h", &sim)], "");
    let report = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("report_file: "))
        .map(std::path::PathBuf::from)
        .unwrap();
    let sidecar = start_sidecar(text, env).await;
    let document: serde_json::Value = eventually("report written", DEADLINE, || async {
        let text = std::fs::read_to_string(&report).ok()?;
        let document: serde_json::Value = serde_json::from_str(&text).ok()?;
        (document["api_clients_summary"]["connected_count"] == 1).then_some(document)
    })
    .await;
    assert!(document["health_score"].as_u64().unwrap() <= 100);
    assert!(document["overall_status"].is_string());
    assert!(document["deductions"]["clients"].is_number());
    assert!(!std::fs::read_to_string(&report).unwrap().contains(&sim.key));
    sidecar.stop().await;
    let _ = std::fs::remove_file(&report);
}

/// Unix seconds of an RFC 3339 text.
fn seconds_of(text: &serde_json::Value) -> f64 {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("{text} is not text"));
    let time = chrono::DateTime::parse_from_rfc3339(text).unwrap();
    time.timestamp_millis() as f64 / 1000.0
}

/// The documented time convention holds in every answer: `start_time` (status, the health
/// document's `message_listener`, statistics, the restart answer) is RFC 3339 like
/// `timestamp` and `current_time`, with the unix seconds beside it as `start_time_seconds`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_time_field_is_rfc3339_or_unix_seconds_as_documented() {
    let sim = start_sim("h6").await;
    sim.sim.inject("alice", "alice", "hi");
    let down = start_sim("h7").await;
    down.sim.set_online(false);
    let (text, env) = config_for(&[("wx-t", &sim), ("wx-down", &down)], "");
    let sidecar = start_sidecar(text, env).await;
    // A chat (listener rows with their times) and an error (its times, last_error_time).
    eventually("a chat and an error", DEADLINE, || async {
        let health = sidecar.get_json("/api/v1/health").await;
        let ready = health["data"]["listeners"]
            .as_array()
            .is_some_and(|rows| !rows.is_empty())
            && health["data"]["recent_errors"]
                .as_array()
                .is_some_and(|rows| !rows.is_empty());
        ready.then_some(())
    })
    .await;
    let mut checked = 0;
    for path in MONITOR_GETS {
        checked += check_time_fields(&sidecar.get_json(path).await, path);
    }
    assert!(checked > 20, "only {checked} time fields: walker broken?");

    let status = sidecar.get_json("/api/v1/status").await["data"].clone();
    let health = sidecar.get_json("/api/v1/health").await["data"].clone();
    let statistics = sidecar.get_json("/api/v1/statistics").await["data"].clone();
    let seconds = status["start_time_seconds"].as_f64().unwrap();
    assert!(
        (seconds_of(&status["start_time"]) - seconds).abs() <= 0.001,
        "{status}"
    );
    assert_eq!(
        health["message_listener"]["start_time"],
        status["start_time"]
    );
    assert_eq!(statistics["start_time"], status["start_time"]);
    assert_eq!(
        statistics["start_time_seconds"],
        status["start_time_seconds"]
    );

    let (code, answer) = sidecar.post("/api/v1/restart").await;
    assert_eq!(code, 200, "{answer}");
    check_time_fields(&answer, "restart");
    let restarted = answer["data"]["start_time_seconds"].as_f64().unwrap();
    assert!(restarted >= seconds, "{answer}");
    assert!((seconds_of(&answer["data"]["start_time"]) - restarted).abs() <= 0.001);
    sidecar.stop().await;
}
