//! The real binary: exit codes, check-config, the health command, signals and secret hygiene.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn check_config_exit_codes_and_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "instances:\n  - id: wx\n    base_url: http://127.0.0.1:5000\n    api_key: inline-secret-key\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("inline"), "inline key warning: {stderr}");
    assert!(!stderr.contains("inline-secret-key"));

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "listener:\n  poll_interval: fast\ninstances:\n  - id: wx\n    base_url: nope\n    api_key: inline-secret-key\n  - id: wx\n    base_url: http://x\n",
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Every problem, each with file:line:col.
    assert!(stderr.contains("bad.yaml:2:"), "{stderr}");
    assert!(stderr.contains("poll_interval"), "{stderr}");
    assert!(stderr.contains("base_url"), "{stderr}");
    assert!(
        stderr.contains("duplicate") || stderr.contains("unique"),
        "{stderr}"
    );
    assert!(!stderr.contains("inline-secret-key"));
}

#[test]
fn a_taken_port_is_a_runtime_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "instances: []\n").unwrap();
    let output = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--config"])
        .arg(&config)
        .args(["--listen", &addr.to_string()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot listen"));
}

#[cfg(unix)]
#[test]
fn sigterm_stops_gracefully_and_no_key_reaches_logs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(start_sim("bin"));
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "listener:\n  poll_interval: 100ms\ninstances:\n  - id: wx-bin\n    base_url: http://{}\n    api_key_env: BIN_TEST_KEY\n  - id: wx-dead\n    base_url: http://127.0.0.1:9\n    api_key_file: key.txt\n",
            sim.addr
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("key.txt"), "file-secret-0123456789\n").unwrap();
    sim.sim.inject("alice", "alice", "hello");
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .args(["--config"])
        .arg(&config)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "trace",
        ])
        .env("BIN_TEST_KEY", &sim.key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = http_client();
    let url = format!("http://127.0.0.1:{port}");
    let ready = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(response) = http.get(format!("{url}/-/ready")).send().await
                && response.status() == 200
                && sim.sim.snapshot().listened.contains(&"alice".to_owned())
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });
    assert!(ready, "sidecar did not become ready");
    // `health` against the running sidecar: one of two instances is unreachable (-15).
    let output = Command::new(BIN)
        .args(["health", "--url", &url])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("score"), "{stdout}");
    assert!(matches!(output.status.code(), Some(0 | 1)), "{stdout}");

    let started = Instant::now();
    let pid = child.id().to_string();
    sigterm(&pid);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "clean shutdown exits 0");
    assert!(started.elapsed() < Duration::from_secs(12));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let mut logs = String::new();
    for entry in std::fs::read_dir(dir.path().join("data/logs")).unwrap() {
        logs.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    assert!(logs.contains("Instance actor started"), "file log written");
    for secret in [sim.key.as_str(), "file-secret-0123456789"] {
        assert!(!stderr.contains(secret), "key in stderr");
        assert!(!logs.contains(secret), "key in log file");
    }

    // Unreachable sidecar: exit 2.
    let output = Command::new(BIN)
        .args(["health", "--url", &url])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn the_shipped_example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(root.join("examples/config.yaml"))
        .env("WXAUTO_API_KEY", "example-key-123")
        .env("OPENAI_API_KEY", "example-openai-key")
        .env("DIFY_API_KEY", "example-dify-key")
        .env("COZE_API_KEY", "example-coze-key")
        .output()
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Without the key's environment variable the same file is invalid, and says why.
    let output = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(root.join("examples/config.yaml"))
        .env_remove("WXAUTO_API_KEY")
        .env("OPENAI_API_KEY", "example-openai-key")
        .env("DIFY_API_KEY", "example-dify-key")
        .env("COZE_API_KEY", "example-coze-key")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("WXAUTO_API_KEY"));
}

/// Sends SIGTERM to `pid` (which must still run).
#[cfg(unix)]
fn sigterm(pid: &str) {
    assert!(
        Command::new("kill")
            .args(["-TERM", pid])
            .status()
            .unwrap()
            .success()
    );
}

#[cfg(unix)]
#[test]
fn a_second_signal_aborts_a_slow_shutdown() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(start_sim("abort"));
    // A hanging instance with a long request timeout: the graceful stop has to wait for the
    // call in flight (it is never aborted, to protect destructive reads), so it is slow.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "listener:\n  request_timeout: 60s\n  poll_interval: 100ms\ninstances:\n  - id: wx-hang\n    base_url: http://{}\n    api_key_env: ABORT_KEY\n",
            sim.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .arg("--config")
        .arg(&config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("ABORT_KEY", &sim.key)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let stderr = || std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    // Polls `check` every 20 ms until it holds; fails after 10 s.
    let wait_for = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let http = http_client();
    runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = http
                .get(format!("http://127.0.0.1:{port}/-/ready"))
                .send()
                .await
                .is_ok_and(|response| response.status() == 200);
            if ready
                && sim.sim.snapshot().initialize_calls + sim.sim.snapshot().calls.len() as u64 > 0
            {
                break;
            }
            assert!(Instant::now() < deadline, "sidecar did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let calls = || sim.sim.snapshot().calls.values().sum::<u64>();
    sim.sim.set_fault(wxauto_sidecar::simulator::Fault::Hang);
    // A call counted after the fault was set hangs: the next probe or poll.
    let before = calls();
    wait_for("a call hangs", &|| calls() > before);
    let pid = child.id().to_string();
    let started = Instant::now();
    sigterm(&pid);
    // The first signal was taken as the graceful stop, which waits for the hanging call (only
    // an abort ends it: the exit code below is the abort's).
    wait_for("the graceful stop begins", &|| {
        stderr().contains("Shutdown signal received")
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "still stopping gracefully"
    );
    // The same stop delivered twice (`timeout` signals its command, then its process group;
    // Ctrl-C reaches a wrapper script and the sidecar at once): not an abort.
    let term = || sigterm(&pid);
    term();
    wait_for("the repeat is seen", &|| {
        stderr().contains("received again within a second")
    });
    assert!(
        started.elapsed() < wxauto_sidecar::shutdown::REPEAT_WINDOW,
        "the repeat came too late to test"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "a repeat within a second aborted the graceful stop"
    );
    // Asked again later: abort. The window runs from when the sidecar took the first signal,
    // a little after `started`: ask every 200 ms until it ends.
    let status = loop {
        wait_for("a second has passed", &|| {
            started.elapsed() > wxauto_sidecar::shutdown::REPEAT_WINDOW
        });
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        term();
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
    };
    assert_eq!(status.code(), Some(130), "the second signal aborts");
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A body over 1 MiB (`metrics::INLINE_ENCODE_MAX`) is encoded on the blocking pool, not on
/// the worker serving the scrape: 200 instances, one scrape that makes the body that large and
/// the next one, which takes the other path, must both come whole. A separate process, because
/// the size of the last body is process-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_body_over_a_mebibyte_is_served_whole() {
    let sim = start_sim("big").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    let mut text =
        String::from("listener:\n  poll_interval: 2s\n  health_check_interval: 30s\ninstances:\n");
    for n in 0..200 {
        text.push_str(&format!(
            "  - id: wx-big-{n:03}\n    base_url: http://{}\n    api_key_env: BIG_TEST_KEY\n",
            sim.addr
        ));
    }
    std::fs::write(&config, text).unwrap();
    let sidecar = Binary::start(
        dir.path(),
        &config,
        &[("BIG_TEST_KEY".to_owned(), sim.key.clone())],
    )
    .await;
    let whole = |body: &str| {
        body.ends_with('\n')
            && ["000", "199"].iter().all(|n| {
                body.contains(&format!(
                    "wxauto_client_up{{instance_id=\"wx-big-{n}\"}} 1.0\n"
                ))
            })
    };
    let first = eventually("a body over 1 MiB", Duration::from_secs(60), || async {
        let body = sidecar.metrics().await;
        (body.len() > 1024 * 1024 && whole(&body)).then_some(body)
    })
    .await;
    let second = sidecar.metrics().await;
    assert!(whole(&second), "the second scrape came incomplete");
    let families = |body: &str| {
        body.lines()
            .filter(|line| line.starts_with("# TYPE"))
            .count()
    };
    assert_eq!(families(&second), families(&first));
    assert!(
        second.len() >= first.len() * 9 / 10,
        "{} then {} bytes",
        first.len(),
        second.len()
    );
}
