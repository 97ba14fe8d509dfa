//! Test harness: simulators, an in-process sidecar on `127.0.0.1:0`, the real binary on a
//! config file, and polling helpers.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use wxauto_sidecar::app::{self, RunOptions};
use wxauto_sidecar::message::{BoxFuture, InboundMessage, MessageSink, SinkError};
use wxauto_sidecar::simulator::{SimConfig, Simulator};

/// A running simulator.
pub struct Sim {
    pub sim: Simulator,
    pub addr: SocketAddr,
    pub key: String,
    _cancel: tokio_util::sync::DropGuard,
}

pub async fn start_sim(name: &str) -> Sim {
    let key = format!("key-{name}-0123456789");
    let sim = Simulator::new(SimConfig {
        api_key: key.clone(),
        name: name.to_owned(),
        flaky: false,
        ..SimConfig::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    tokio::spawn(sim.clone().serve(listener, cancel.clone()));
    Sim {
        sim,
        addr,
        key,
        _cancel: cancel.drop_guard(),
    }
}

/// A sink that records everything it is handed.
#[derive(Default)]
pub struct CollectSink {
    pub messages: Mutex<Vec<InboundMessage>>,
}

impl CollectSink {
    pub fn contents(&self) -> Vec<String> {
        self.messages
            .lock()
            .unwrap()
            .iter()
            .map(|message| message.content.clone())
            .collect()
    }
}

impl MessageSink for CollectSink {
    fn accept(&self, messages: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.messages.lock().unwrap().extend(messages);
            Ok(())
        })
    }
}

/// A running in-process sidecar.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub sink: Arc<CollectSink>,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<()>,
    pub http: reqwest::Client,
}

impl Sidecar {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// POSTs to `path`: the status and the JSON body (null if it is not JSON).
    pub async fn post(&self, path: &str) -> (u16, serde_json::Value) {
        let response = self.http.post(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The value of one series, e.g. `wxauto_client_up{instance_id="a"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
    }
}

/// The monitor API's GET endpoints, the errors (with a valid `limit`) last.
pub const MONITOR_GETS: [&str; 6] = [
    "/api/v1/status",
    "/api/v1/health",
    "/api/v1/clients",
    "/api/v1/listeners",
    "/api/v1/statistics",
    "/api/v1/errors?limit=100",
];

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A config text for the given simulators with fast intervals. `extra` is appended verbatim.
pub fn config_for(sims: &[(&str, &Sim)], extra: &str) -> (String, Vec<(String, String)>) {
    let mut text = String::from(
        "listener:\n  poll_interval: 100ms\n  health_check_interval: 300ms\n  request_timeout: 1s\n  backoff: { initial: 100ms, max: 400ms }\n",
    );
    // Keep the periodic report out of the working directory; each sidecar gets its own file.
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let report = std::env::temp_dir().join(format!(
        "wxauto-sidecar-test-{}-{}.json",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    text.push_str(&format!(
        "health:\n  report_interval: 200ms\n  report_file: {}\n",
        report.display()
    ));
    text.push_str("instances:\n");
    let mut env = Vec::new();
    for (id, sim) in sims {
        let var = format!("KEY_{}", id.replace('-', "_").to_uppercase());
        text.push_str(&format!(
            "  - id: {id}\n    base_url: http://{}\n    api_key_env: {var}\n",
            sim.addr
        ));
        env.push((var, sim.key.clone()));
    }
    text.push_str(extra);
    (text, env)
}

/// Starts the sidecar in-process with a built-in config text.
pub async fn start_sidecar(text: String, env: Vec<(String, String)>) -> Sidecar {
    start_sidecar_with(text, env, true).await
}

pub async fn start_sidecar_with(
    text: String,
    env: Vec<(String, String)>,
    lifecycle: bool,
) -> Sidecar {
    let sink = Arc::new(CollectSink::default());
    start_sidecar_with_sink(text, env, lifecycle, sink.clone(), sink).await
}

/// Starts the sidecar with `sink` in front of the recording `collect` sink.
pub async fn start_sidecar_with_sink(
    text: String,
    env: Vec<(String, String)>,
    lifecycle: bool,
    sink: Arc<dyn MessageSink>,
    collect: Arc<CollectSink>,
) -> Sidecar {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let loader = app::builtin_loader(text, env);
    let loaded = loader().expect("test config must be valid");
    let options = RunOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        enable_lifecycle: lifecycle,
        grace: Duration::from_secs(5),
        watch: false,
        watch_poll: false,
        sink: Some(sink),
        log_level: None,
        web_config_file: None,
    };
    let shutdown = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let handle = tokio::spawn(async move {
        app::run(loaded, loader, options, stop, move |started| {
            let _ = tx.send(started.addr);
        })
        .await
        .expect("sidecar run failed");
    });
    let addr = rx.await.expect("sidecar did not start");
    Sidecar {
        addr,
        sink: collect,
        shutdown,
        handle,
        http: http_client(),
    }
}

/// Polls `check` until it returns `Some` or the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const DEADLINE: Duration = Duration::from_secs(10);

/// The binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_wxauto-sidecar");

/// A loopback port that was free a moment ago. Another process may take it before the binary
/// binds it: `Binary::start` retries on that.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary serving a config file on `127.0.0.1:<free port>`.
///
/// It runs in `dir` (it writes `data/` under its working directory) with its stderr in a file
/// there; dropping it kills the process, and prints the stderr when the test is failing.
pub struct Binary {
    child: Child,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    stderr: PathBuf,
}

/// How a start attempt ended.
enum Started {
    Ready,
    PortTaken,
}

impl Binary {
    /// Starts `wxauto-sidecar --config <config> --listen <addr>` with the given environment and
    /// waits until `/-/ready` answers 200. Config watcher events are logged at debug.
    pub async fn start(dir: &Path, config: &Path, env: &[(String, String)]) -> Self {
        Self::start_with_args(dir, config, env, &[]).await
    }

    /// `start` with extra command-line arguments.
    pub async fn start_with_args(
        dir: &Path,
        config: &Path,
        env: &[(String, String)],
        args: &[&str],
    ) -> Self {
        for attempt in 0..3 {
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let stderr = dir.join(format!("sidecar-{attempt}.stderr"));
            let file = std::fs::File::create(&stderr).unwrap();
            let child = Command::new(BIN)
                .current_dir(dir)
                .arg("--config")
                .arg(config)
                .args(["--listen", &addr.to_string()])
                .args(["--log-level", "info,wxauto_sidecar::config=debug"])
                .args(args)
                .env_remove("WXAUTO_SIDECAR_CONFIG")
                .envs(env.iter().map(|(key, value)| (key, value)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .unwrap();
            let mut binary = Self {
                child,
                addr,
                http: http_client(),
                stderr,
            };
            match binary.wait_ready().await {
                Started::Ready => return binary,
                Started::PortTaken => continue,
            }
        }
        panic!("the sidecar could not bind a free port in three attempts");
    }

    async fn wait_ready(&mut self) -> Started {
        let start = tokio::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let stderr = self.stderr_text();
                if status.code() == Some(2) && stderr.contains("cannot listen") {
                    return Started::PortTaken;
                }
                panic!("the sidecar exited during startup ({status}):\n{stderr}");
            }
            if let Ok(response) = self.http.get(self.url("/-/ready")).send().await
                && response.status() == 200
            {
                return Started::Ready;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "the sidecar was not ready within {DEADLINE:?}:\n{}",
                self.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `/metrics` as text; panics (showing the sidecar's stderr) if it cannot be scraped.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await;
        match response {
            Ok(response) if response.status() == 200 => response.text().await.unwrap(),
            Ok(response) => panic!("/metrics answered {}", response.status()),
            Err(error) => panic!("cannot scrape /metrics: {error}\n{}", self.stderr_text()),
        }
    }

    /// Sends a request and returns the status and body.
    pub async fn request(&self, method: reqwest::Method, path: &str) -> (u16, String) {
        let response = self
            .http
            .request(method, self.url(path))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.text().await.unwrap())
    }

    /// Sends a signal with `kill(1)`, e.g. `"HUP"`.
    #[cfg(unix)]
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.stderr_text();
            let tail: Vec<&str> = text.lines().rev().take(80).collect();
            eprintln!("--- sidecar stderr (last 80 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// The simulator's key for the message poll, counted per request.
pub const POLL_CALL: &str = "GET /api/message/get-next-new";

/// Message polls the simulator has served.
pub fn polls(sim: &Sim) -> u64 {
    sim.sim
        .snapshot()
        .calls
        .get(POLL_CALL)
        .copied()
        .unwrap_or(0)
}

/// Waits until the simulator has served `more` further message polls: an event to wait for
/// before asserting that something did not happen, instead of a sleep.
pub async fn keeps_polling(sim: &Sim, more: u64) {
    let before = polls(sim);
    eventually("the instance keeps polling", DEADLINE, || async {
        (polls(sim) >= before + more).then_some(())
    })
    .await;
}

/// Checks the monitor API's time convention on every field of `doc`, however deep: `timestamp`,
/// `datetime`, `start_time` and `current_time` are RFC 3339 text (or null), every other
/// `*_time` field unix seconds (or null). Returns how many fields it checked.
pub fn check_time_fields(doc: &serde_json::Value, path: &str) -> usize {
    use serde_json::Value;
    let mut checked = 0;
    match doc {
        Value::Object(fields) => {
            for (key, value) in fields {
                let here = format!("{path}.{key}");
                if ["timestamp", "datetime", "start_time", "current_time"].contains(&key.as_str()) {
                    checked += 1;
                    if !value.is_null() {
                        let text = value
                            .as_str()
                            .unwrap_or_else(|| panic!("{here} is {value}, not RFC 3339 text"));
                        chrono::DateTime::parse_from_rfc3339(text)
                            .unwrap_or_else(|err| panic!("{here} = {text:?}: {err}"));
                    }
                } else if key.ends_with("_time") {
                    checked += 1;
                    assert!(
                        value.is_null() || value.is_f64() || value.is_u64(),
                        "{here} is {value}, not unix seconds"
                    );
                } else {
                    checked += check_time_fields(value, &here);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                checked += check_time_fields(item, &format!("{path}[{i}]"));
            }
        }
        _ => {}
    }
    checked
}
