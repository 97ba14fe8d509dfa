//! Mirrors the seed's `tests/test_config_notifier_integration.py`: a configuration change is
//! noticed, every part subscribed to the configuration is told, and the change takes effect.
//! In the sidecar the notifier is the supervisor: the file watcher (or a reload request)
//! loads the file, and its config subscribers (delivery routing, the instance actors, the log
//! filter) receive the new configuration together with the diff.
//!
//! Covers: a real file edited on disk, picked up by the real watcher of the real binary, the
//! routing subscriber answering with the new reply, and an invalid edit that is counted and
//! keeps the old routing answering; the reload report (`POST /api/v1/reload`) saying whether
//! anything changed, what needs a restart, and the instance subscriber starting a new instance.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use wxauto_sidecar::app::{self, RunOptions};
use wxauto_sidecar::config;

use crate::util::*;

const RELOADS: &str = "wxauto_config_reloads_total";
const FAILURES: &str = "wxauto_config_reload_failures_total";
const LAST_OK: &str = "wxauto_config_last_reload_successful";
const HASH: &str = "wxauto_config_hash";

/// A keyword platform answering "hi" with `reply`, routed from every chat.
fn routing(reply: &str) -> String {
    format!(
        "platforms:\n  - id: faq\n    type: keyword\n    keywords:\n      - keywords: [\"hi\"]\n        \
         replies: [\"{reply}\"]\nrules:\n  - id: everything\n    instance: \"*\"\n    chat: \"*\"\n    \
         platform: faq\n    priority: 1\n"
    )
}

/// What vim and VS Code do: write a temp file beside it, then rename it over.
fn write_by_rename(path: &Path, text: &str) {
    let tmp = path.with_file_name(".config.yaml.swp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits until the simulator has sent `text` to `chat`.
async fn replied(sim: &Sim, chat: &str, text: &str) {
    eventually(&format!("reply {text:?} to {chat}"), DEADLINE, || async {
        sim.sim
            .snapshot()
            .sent
            .iter()
            .any(|sent| sent.who == chat && sent.message == text)
            .then_some(())
    })
    .await;
}

async fn scrape_until(binary: &Binary, what: &str, check: impl Fn(&str) -> bool) -> String {
    eventually(what, DEADLINE, || async {
        let text = binary.metrics().await;
        check(&text).then_some(text)
    })
    .await
}

fn value(text: &str, series: &str) -> f64 {
    metric_value(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_edit_reaches_the_routing_subscriber_and_a_bad_edit_keeps_it() {
    let sim = start_sim("cn1").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf")).unwrap();
    let path = dir.path().join("conf").join("config.yaml");
    let (text, env) = config_for(&[("wx-cn", &sim)], &routing("hello"));
    std::fs::write(&path, &text).unwrap();
    let binary = Binary::start(dir.path(), &path, &env).await;

    sim.sim.inject("alice", "alice", "hi");
    replied(&sim, "alice", "hello").await;
    let metrics = binary.metrics().await;
    let (reloads, failures) = (value(&metrics, RELOADS), value(&metrics, FAILURES));

    // The edit: only the reply changes. The watcher loads it and routing gets the new rules.
    let (edited, _) = config_for(&[("wx-cn", &sim)], &routing("bonjour"));
    write_by_rename(&path, &edited);
    let metrics = scrape_until(&binary, "the edit reloaded", |text| {
        metric_value(text, RELOADS).is_some_and(|n| n > reloads)
            && metric_value(text, LAST_OK) == Some(1.0)
    })
    .await;
    assert_eq!(value(&metrics, FAILURES), failures);
    let hash = value(&metrics, HASH);
    sim.sim.inject("bob", "bob", "hi");
    replied(&sim, "bob", "bonjour").await;

    // A broken edit: counted, reported as failed, and the subscribers keep the last good one.
    std::fs::write(&path, format!("{edited}rules: [unclosed\n")).unwrap();
    // One scrape is not a snapshot across families: wait for both signs of the failure.
    let metrics = scrape_until(&binary, "the bad edit counted", |text| {
        metric_value(text, FAILURES).is_some_and(|n| n > failures)
            && metric_value(text, LAST_OK) == Some(0.0)
    })
    .await;
    assert_eq!(
        value(&metrics, HASH),
        hash,
        "the last good config stays active"
    );
    sim.sim.inject("carol", "carol", "hi");
    replied(&sim, "carol", "bonjour").await;
    assert!(
        !sim.sim
            .snapshot()
            .sent
            .iter()
            .any(|sent| sent.who != "alice" && sent.message == "hello"),
        "no reply from the old rules after the edit"
    );
}

/// An in-process sidecar whose loader reads `text` each time it is asked, so a test decides
/// exactly when the configuration changes (no watcher: reloads come from `POST /api/v1/reload`).
struct Live {
    text: Arc<Mutex<String>>,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
    http: reqwest::Client,
}

impl Live {
    async fn start(text: String, env: Vec<(String, String)>) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shared = Arc::new(Mutex::new(text));
        let source = shared.clone();
        let loader: wxauto_sidecar::supervisor::ConfigLoader = Box::new(move || {
            let text = source.lock().unwrap().clone();
            let lookup = |name: &str| {
                env.iter()
                    .find(|(key, _)| key == name)
                    .map(|(_, value)| value.clone())
            };
            config::decode(&text, None, &lookup)
        });
        let loaded = loader().expect("test config must be valid");
        let options = RunOptions {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            enable_lifecycle: true,
            grace: Duration::from_secs(5),
            watch: false,
            watch_poll: false,
            sink: Some(Arc::new(CollectSink::default())),
            log_level: None,
            web_config_file: None,
        };
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(async move {
            app::run(loaded, loader, options, stop, move |started| {
                let _ = tx.send(started.addr);
            })
            .await
            .expect("sidecar run failed");
        });
        let addr = rx.await.expect("sidecar did not start");
        Self {
            text: shared,
            addr,
            shutdown,
            handle,
            http: http_client(),
        }
    }

    /// `POST /api/v1/reload`: the status and the envelope.
    async fn reload(&self) -> (u16, Value) {
        let response = self
            .http
            .post(format!("http://{}/api/v1/reload", self.addr))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metric_value(&text, series)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reload_report_tells_what_changed_and_subscribers_apply_it() {
    let a = start_sim("cn2").await;
    let b = start_sim("cn3").await;
    // One environment for both texts; the first text names only wx-a.
    let (first, _) = config_for(&[("wx-a", &a)], "");
    let (_, env) = config_for(&[("wx-a", &a), ("wx-b", &b)], "");
    let live = Live::start(first.clone(), env).await;
    let up_b = "wxauto_client_up{instance_id=\"wx-b\"}";
    assert_eq!(live.metric(up_b).await, None);

    // Nothing changed: answered, nothing applied.
    let (status, body) = live.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["reloaded"], true, "{body}");
    assert_eq!(body["data"]["changed"], false, "{body}");
    let hash = live.metric(HASH).await;

    // A key that only a restart applies: applied as far as it can be, and named.
    let json_logs = format!("{first}logging:\n  format: json\n");
    *live.text.lock().unwrap() = json_logs.clone();
    let (status, body) = live.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["changed"], true, "{body}");
    let needs_restart: Vec<&str> = body["data"]["needs_restart"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(needs_restart, vec!["logging.format"], "{body}");
    assert_ne!(live.metric(HASH).await, hash, "the new config is active");

    // A new instance: the instance subscriber starts its actor, which connects.
    let instance_b = format!(
        "  - id: wx-b\n    base_url: http://{}\n    api_key_env: KEY_WX_B\n",
        b.addr
    );
    let two = json_logs.replacen("\nlogging:", &format!("\n{}logging:", instance_b), 1);
    assert_ne!(two, json_logs, "the instance was inserted");
    *live.text.lock().unwrap() = two;
    let (status, body) = live.reload().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["changed"], true, "{body}");
    assert!(
        !body["data"]["summary"].as_str().unwrap().is_empty(),
        "{body}"
    );
    eventually("wx-b connected after the reload", DEADLINE, || async {
        (live.metric(up_b).await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(
        live.metric("wxauto_client_up{instance_id=\"wx-a\"}").await,
        Some(1.0)
    );
    live.stop().await;
}
