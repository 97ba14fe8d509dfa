//! Logs of the real binary: `logging.format: json` on stderr and in the file, chat names kept
//! out of the lines by `logging.redact_chat_names` (switched live by a reload), and a format
//! change reported as needing a restart.

use crate::util::*;

fn config_text(sim: &Sim, format: &str, redact: bool) -> String {
    format!(
        "listener:\n  poll_interval: 100ms\n  health_check_interval: 300ms\n\
         logging:\n  format: {format}\n  redact_chat_names: {redact}\n\
         instances:\n  - id: wx-log\n    base_url: http://{}\n    api_key_env: LOG_TEST_KEY\n",
        sim.addr
    )
}

fn file_logs(dir: &std::path::Path) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(dir.join("data/logs")).unwrap() {
        logs.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    logs
}

/// The JSON lines of `text` whose message is `message`.
fn events(text: &str, message: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["message"] == message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_redact_chat_names_until_a_reload_turns_it_off() {
    let sim = start_sim("log").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, config_text(&sim, "json", true)).unwrap();
    let env = [("LOG_TEST_KEY".to_owned(), sim.key.clone())];
    sim.sim.inject("测试群", "张三", "你好");
    let binary = Binary::start_with_args(dir.path(), &config, &env, &["--enable-lifecycle"]).await;
    let taken = "Messages taken from the instance.";
    let hidden = wxauto_sidecar::logging::chat("测试群").redacted();
    eventually("the redacted line", DEADLINE, || async {
        events(&binary.stderr_text(), taken)
            .iter()
            .any(|event| event["chat"] == hidden.as_str())
            .then_some(())
    })
    .await;
    let stderr = binary.stderr_text();
    // Every stderr line is one JSON object with a timestamp, a level and a message.
    for line in stderr.lines().filter(|line| !line.trim().is_empty()) {
        let event: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        assert!(event["message"].is_string(), "{line}");
    }
    assert!(
        !stderr.contains("测试群"),
        "a chat name reached stderr:\n{stderr}"
    );

    // Turn redaction off and ask for text: redaction follows at once, the format needs a restart.
    std::fs::write(&config, config_text(&sim, "text", false)).unwrap();
    let (status, body) = binary
        .request(reqwest::Method::POST, "/api/v1/reload")
        .await;
    assert_eq!(status, 200, "{body}");
    let reload: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        reload["data"]["needs_restart"],
        serde_json::json!(["logging.format"])
    );
    sim.sim.inject("第二群", "李四", "在吗");
    eventually("the clear line", DEADLINE, || async {
        events(&binary.stderr_text(), taken)
            .iter()
            .any(|event| event["chat"] == "第二群")
            .then_some(())
    })
    .await;
    // Still JSON: the running format is kept until a restart.
    assert!(!events(&binary.stderr_text(), "Configuration reloaded.").is_empty());
    drop(binary);

    // The file has the same lines.
    let logs = file_logs(dir.path());
    assert!(
        events(&logs, taken)
            .iter()
            .any(|event| event["chat"] == hidden.as_str()),
        "{logs}"
    );
    assert!(!logs.contains("测试群"), "a chat name reached the log file");
    for line in logs.lines().filter(|line| !line.trim().is_empty()) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not JSON: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_name_chats_by_default() {
    let sim = start_sim("log2").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    let text = config_text(&sim, "text", false).replace(
        "  format: text\n  redact_chat_names: false\n",
        "  level: info\n",
    );
    std::fs::write(&config, text).unwrap();
    let env = [("LOG_TEST_KEY".to_owned(), sim.key.clone())];
    sim.sim.inject("测试群", "张三", "你好");
    let binary = Binary::start(dir.path(), &config, &env).await;
    eventually("the line", DEADLINE, || async {
        binary
            .stderr_text()
            .lines()
            .any(|line| {
                line.contains("Messages taken from the instance.") && line.contains("chat=测试群")
            })
            .then_some(())
    })
    .await;
    assert!(
        serde_json::from_str::<serde_json::Value>(binary.stderr_text().lines().next().unwrap())
            .is_err()
    );
}
