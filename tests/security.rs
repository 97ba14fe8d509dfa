//! Security: the secret audit (every configured secret, in every encoding, absent from every
//! output), URL credentials sent as exactly one `Authorization` header.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

use crate::util::{BIN, DEADLINE, MONITOR_GETS, eventually, free_port, http_client, start_sim};

/// What the echo server saw: path → the `Authorization` values of each request.
type Seen = Arc<Mutex<BTreeMap<String, Vec<Vec<String>>>>>;

/// A hostile upstream: answers 500 and echoes every request header, raw on most paths and
/// base64-encoded on paths ending in `-b64`, in a wxauto-style envelope.
async fn start_echo() -> (std::net::SocketAddr, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = Router::new().fallback(move |uri: Uri, headers: HeaderMap, _body: Bytes| {
        let record = record.clone();
        async move {
            let auth: Vec<String> = headers
                .get_all("authorization")
                .iter()
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                .collect();
            let first = uri.path().split('/').nth(1).unwrap_or("").to_owned();
            record
                .lock()
                .unwrap()
                .entry(first.clone())
                .or_default()
                .push(auth.clone());
            // Credentials first, so the quoted (truncated) part of an error holds them.
            let mut text = String::new();
            for name in ["authorization", "x-api-key", "x-token"] {
                for value in headers.get_all(name) {
                    text.push_str(&format!(
                        "{name}={} ",
                        String::from_utf8_lossy(value.as_bytes())
                    ));
                }
            }
            if first.ends_with("-b64") {
                text = format!("b64:{}", STANDARD.encode(&text));
            }
            let body = serde_json::json!({"code": 500, "message": text, "data": null});
            (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(body))
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, seen)
}

/// Every encoding of a secret an output might carry.
fn encodings(secret: &str) -> Vec<String> {
    let mut forms = vec![secret.to_owned()];
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(secret));
    }
    forms.push(
        percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    );
    forms.push(secret.bytes().map(|b| format!("{b:02x}")).collect());
    // Inside a longer base64 text (the hostile echo encodes whole header lists): the
    // characters only the secret determines, at each of the three byte alignments.
    for offset in 0..3usize {
        let mut bytes = vec![b'x'; offset];
        bytes.extend_from_slice(secret.as_bytes());
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&bytes);
            let start = (offset * 8).div_ceil(6);
            let end = bytes.len() * 8 / 6;
            forms.push(encoded[start..end].to_owned());
        }
    }
    forms
}

fn read_all_files(dir: &Path, skip: &[&Path], out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if skip.iter().any(|skipped| *skipped == path) {
            continue;
        }
        if path.is_dir() {
            read_all_files(&path, skip, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
}

#[cfg(unix)]
#[test]
fn secret_audit_no_form_of_any_secret_reaches_any_output() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sim = runtime.block_on(start_sim("audit"));
    let (echo, seen) = runtime.block_on(start_echo());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    let key_file = dir.path().join("echo.key");
    let secrets = [
        ("sim-user", "sim-url-pass-Hg67"),
        ("inst-user", "inst-url-pass-Kj45"),
        ("hook-user", "hook-url-pass-Wq31"),
        ("ign-user", "ignored-url-pass-Rt56"),
        ("oa-user", "oa-url-pass-Lm23"),
    ];
    std::fs::write(&key_file, "echo-file-key-Np09\n").unwrap();
    let text = format!(
        "listener:\n  poll_interval: 100ms\n  health_check_interval: 200ms\n  request_timeout: 1s\n  backoff: {{ initial: 100ms, max: 200ms }}\n\
instances:\n  - id: wx-sim\n    base_url: http://sim-user:sim-url-pass-Hg67@{sim}\n    api_key_env: AUDIT_SIM_KEY\n  \
- id: wx-echo\n    base_url: http://inst-user:inst-url-pass-Kj45@{echo}/inst\n    api_key_file: echo.key\n\
platforms:\n  - id: hook1\n    type: webhook\n    url: http://hook-user:hook-url-pass-Wq31@{echo}/hook1\n    headers: {{ X-Token: hook1-header-token-Vb52 }}\n  \
- id: hook2\n    type: webhook\n    url: http://ign-user:ignored-url-pass-Rt56@{echo}/hook2-b64\n    headers_from_env: {{ Authorization: AUDIT_HOOK2_AUTH }}\n  \
- id: oa\n    type: openai\n    api_base: http://oa-user:oa-url-pass-Lm23@{echo}/oa\n    api_key_env: AUDIT_OA_KEY\n    model: m\n  \
- id: dy\n    type: dify\n    api_base: http://{echo}/dy-b64\n    api_key_env: AUDIT_DY_KEY\n\
rules:\n  - {{ id: r1, chat: c1, platform: hook1 }}\n  - {{ id: r2, chat: c2, platform: hook2 }}\n  - {{ id: r3, chat: c3, platform: oa }}\n  - {{ id: r4, chat: c4, platform: dy }}\n\
delivery:\n  max_attempts: 3\n  backoff: {{ initial: 100ms, max: 200ms }}\n\
health:\n  report_interval: 200ms\n  report_file: data/report.json\n",
        sim = sim.addr,
    );
    std::fs::write(&config, text).unwrap();
    let env = [
        ("AUDIT_SIM_KEY", sim.key.clone()),
        (
            "AUDIT_HOOK2_AUTH",
            "Bearer hook2-bearer-token-Zx90".to_owned(),
        ),
        ("AUDIT_OA_KEY", "sk-openai-audit-key-Tt11".to_owned()),
        ("AUDIT_DY_KEY", "app-dify-audit-key-Uu22".to_owned()),
    ];
    for chat in ["c1", "c2", "c3", "c4"] {
        sim.sim.inject(chat, "bob", "hello");
    }
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let check = Command::new(BIN)
        .current_dir(dir.path())
        .args(["check-config", "--config"])
        .arg(&config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let mut child = Command::new(BIN)
        .current_dir(dir.path())
        .arg("--config")
        .arg(&config)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "trace",
        ])
        .env_remove("WXAUTO_SIDECAR_CONFIG")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr on a thread: trace logging fills a pipe quickly.
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut text);
        text
    });

    let mut outputs: Vec<(String, Vec<u8>)> = vec![
        ("check-config stdout".into(), check.stdout),
        ("check-config stderr".into(), check.stderr),
    ];
    let http = http_client();
    runtime.block_on(async {
        // Every platform and the echo instance failed at least twice (so errors were stored,
        // logged and recorded before the retry).
        eventually("every echo path hit twice", DEADLINE * 2, || {
            let seen = seen.clone();
            async move {
                let seen = seen.lock().unwrap();
                ["inst", "hook1", "hook2-b64", "oa", "dy-b64"]
                    .iter()
                    .all(|path| seen.get(*path).is_some_and(|hits| hits.len() >= 2))
                    .then_some(())
            }
        })
        .await;
        for path in ["/metrics", "/"].into_iter().chain(MONITOR_GETS) {
            let response = http.get(format!("{url}{path}")).send().await.unwrap();
            outputs.push((path.to_owned(), response.bytes().await.unwrap().to_vec()));
        }
    });
    let errors = String::from_utf8_lossy(&outputs.last().unwrap().1).into_owned();
    assert!(
        errors.contains(wxauto_sidecar::secret::REDACTED),
        "{errors}"
    );
    let health = Command::new(BIN)
        .args(["health", "--url", &url])
        .output()
        .unwrap();
    outputs.push(("health stdout".into(), health.stdout));
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    outputs.push(("stdout".into(), stdout));
    let stderr = stderr_reader.join().unwrap();
    assert!(
        String::from_utf8_lossy(&stderr).contains("TRACE"),
        "trace logging was on"
    );
    outputs.push(("stderr".into(), stderr));
    read_all_files(dir.path(), &[&config, &key_file], &mut outputs);
    assert!(
        outputs.iter().any(|(name, _)| name.ends_with(".db")),
        "the store was written: {:?}",
        outputs.iter().map(|(name, _)| name).collect::<Vec<_>>()
    );

    // Exactly one Authorization header on every request, of the configured kind.
    let seen = seen.lock().unwrap();
    let basic =
        |user: &str, pass: &str| format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")));
    let expected = [
        ("inst", basic("inst-user", "inst-url-pass-Kj45")),
        ("hook1", basic("hook-user", "hook-url-pass-Wq31")),
        ("hook2-b64", "Bearer hook2-bearer-token-Zx90".to_owned()),
        ("oa", "Bearer sk-openai-audit-key-Tt11".to_owned()),
        ("dy-b64", "Bearer app-dify-audit-key-Uu22".to_owned()),
    ];
    for (path, value) in &expected {
        for auth in &seen[*path] {
            assert_eq!(auth, &vec![value.clone()], "{path}");
        }
    }
    drop(seen);
    assert!(
        sim.sim.snapshot().listened.contains(&"c1".to_owned()),
        "the simulator accepted the sidecar with basic auth from its URL"
    );

    let mut plain: Vec<String> = secrets
        .iter()
        .flat_map(|(user, pass)| [pass.to_string(), format!("{user}:{pass}")])
        .collect();
    plain.extend(
        [
            sim.key.as_str(),
            "echo-file-key-Np09",
            "hook1-header-token-Vb52",
            "hook2-bearer-token-Zx90",
            "sk-openai-audit-key-Tt11",
            "app-dify-audit-key-Uu22",
        ]
        .map(str::to_owned),
    );
    for secret in &plain {
        for form in encodings(secret) {
            for (name, bytes) in &outputs {
                let found = bytes
                    .windows(form.len())
                    .any(|window| window == form.as_bytes());
                assert!(!found, "{form:?} (a form of {secret:?}) found in {name}");
            }
        }
    }
}

// === HTTP limits ===

/// Reads until the peer closes (EOF or reset) and returns what was read and when it closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream) -> (Vec<u8>, Instant) {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return (bytes, Instant::now()),
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `GET path` on a kept-alive connection and returns the response head (status line and
/// headers); the body is left unread.
async fn request_head(stream: &mut tokio::net::TcpStream, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    while !bytes.windows(4).any(|window| window == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("no answer on a held connection")
            .unwrap();
        assert!(n > 0, "closed before answering: {bytes:?}");
        bytes.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn limits_config(server: &str) -> (String, Vec<(String, String)>) {
    let (text, env) = crate::util::config_for(&[], "");
    let text = text.replace("instances:\n", "instances: []\n");
    (format!("server:\n{server}{text}"), env)
}

#[tokio::test]
async fn idle_connections_and_a_slowloris_cannot_starve_a_scrape() {
    use tokio::io::AsyncWriteExt;
    let (text, env) =
        limits_config("  header_read_timeout: 600ms\n  idle_timeout: 5s\n  max_connections: 200\n");
    let sidecar = crate::util::start_sidecar(text, env).await;
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(tokio::net::TcpStream::connect(sidecar.addr).await.unwrap());
    }
    let opened = Instant::now();
    let mut slow = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let dripping = tokio::spawn(async move {
        // One header byte every 50 ms: the head never completes within the timeout.
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (_, closed) = read_until_closed(&mut slow).await;
        closed
    });
    // A scrape answers at once while all of them are held.
    let started = Instant::now();
    let response = sidecar
        .http
        .get(sidecar.url("/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("wxauto_up"));
    assert!(started.elapsed() < Duration::from_secs(2));
    // The slowloris client is cut off after the header timeout, long before it finishes.
    let closed = tokio::time::timeout(Duration::from_secs(5), dripping)
        .await
        .expect("the slowloris connection was never closed")
        .unwrap();
    let held = closed - opened;
    assert!(
        held >= Duration::from_millis(500) && held < Duration::from_secs(3),
        "held {held:?}"
    );
    // So are the idle ones.
    for stream in &mut idle[..5] {
        let (bytes, _) = tokio::time::timeout(Duration::from_secs(3), read_until_closed(stream))
            .await
            .expect("an idle connection was kept");
        assert!(!bytes.starts_with(b"HTTP/1.1 2"), "{bytes:?}");
    }
    sidecar.stop().await;
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_at_once_and_bodies_are_capped() {
    let (text, env) = limits_config(
        "  header_read_timeout: 5s\n  max_connections: 4\n  max_request_body_bytes: 2048\n",
    );
    let sidecar = crate::util::start_sidecar(text, env).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(sidecar.addr).await.unwrap());
    }
    // Each of the four answers a request (and stays open, kept alive), so the accept loop has
    // taken it and it holds a slot before the fifth arrives.
    for stream in &mut held {
        let head = request_head(stream, "/-/healthy").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut extra = tokio::net::TcpStream::connect(sidecar.addr).await.unwrap();
    let started = Instant::now();
    let (bytes, _) = tokio::time::timeout(Duration::from_secs(2), read_until_closed(&mut extra))
        .await
        .expect("the connection over the cap was not answered");
    assert!(started.elapsed() < Duration::from_secs(1));
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    drop(held);
    // Slots free again once the held connections are gone.
    let status = crate::util::eventually("a slot is free", DEADLINE, || async {
        let response = sidecar
            .http
            .get(sidecar.url("/-/healthy"))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(response.status())
    })
    .await;
    assert_eq!(status, 200);
    // A body over max_request_body_bytes is 413; one under it is handled.
    let big = sidecar
        .http
        .post(sidecar.url("/-/reload"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    let small = sidecar
        .http
        .post(sidecar.url("/-/reload"))
        .body(vec![b'x'; 100])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
    sidecar.stop().await;
}

// === web config: TLS, basic auth, headers ===

/// A CA and a server certificate for 127.0.0.1/localhost, as PEM files in `dir`.
pub(crate) fn write_certificates(
    dir: &Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wxauto test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.join("ca.pem"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    (ca_file, cert_file, key_file)
}

pub(crate) fn web_config_text(user: &str, password: &str) -> String {
    let hash = bcrypt::hash(password, 4).unwrap();
    format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS12\nhttp_server_config:\n  headers:\n    Strict-Transport-Security: max-age=31536000\n    X-Frame-Options: deny\nbasic_auth_users:\n  {user}: '{hash}'\n"
    )
}

/// `curl` as a real TLS client: the status code and the response headers.
fn curl(url: &str, ca: &Path, user: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-D",
            "-",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("--noproxy")
        .arg("*");
    if let Some(user) = user {
        command.args(["-u", user]);
    }
    let output = command.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let code = text
        .get(text.len().saturating_sub(3)..)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test]
async fn tls_and_basic_auth_work_with_real_clients_and_reload_live() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, _, _) = write_certificates(dir.path());
    let web = dir.path().join("web.yml");
    std::fs::write(&web, web_config_text("prom", "first-pass-Kx41")).unwrap();
    let (text, env) = limits_config(&format!(
        "  web_config_file: {}\n  open_probes: true\n",
        web.display()
    ));
    let sidecar = crate::util::start_sidecar(text, env).await;
    let base = format!("https://127.0.0.1:{}", sidecar.addr.port());
    let metrics = format!("{base}/metrics");

    // curl, a real TLS client verifying against our CA.
    let (code, headers) = tokio::task::spawn_blocking({
        let (metrics, ca) = (metrics.clone(), ca_file.clone());
        move || curl(&metrics, &ca, Some("prom:first-pass-Kx41"))
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{headers}");
    let lower = headers.to_ascii_lowercase();
    assert!(
        lower.contains("strict-transport-security: max-age=31536000"),
        "{headers}"
    );
    assert!(lower.contains("x-frame-options: deny"), "{headers}");
    for (user, expected) in [
        (None, 401),
        (Some("prom:wrong-pass"), 401),
        (Some("nobody:first-pass-Kx41"), 401),
    ] {
        let (code, headers) = tokio::task::spawn_blocking({
            let (metrics, ca) = (metrics.clone(), ca_file.clone());
            move || curl(&metrics, &ca, user)
        })
        .await
        .unwrap();
        assert_eq!(code, expected, "{user:?}: {headers}");
        assert!(
            headers
                .to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{headers}"
        );
    }
    // The probes stay open (server.open_probes), still over TLS; the status page does not.
    let (code, _) = tokio::task::spawn_blocking({
        let (url, ca) = (format!("{base}/-/healthy"), ca_file.clone());
        move || curl(&url, &ca, None)
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    let (code, _) = tokio::task::spawn_blocking({
        let (url, ca) = (format!("{base}/"), ca_file.clone());
        move || curl(&url, &ca, None)
    })
    .await
    .unwrap();
    assert_eq!(code, 401);
    // Plain HTTP gets no answer.
    assert!(
        sidecar
            .http
            .get(sidecar.url("/metrics"))
            .send()
            .await
            .is_err()
    );

    // reqwest, trusting only our CA.
    let access = wxauto_sidecar::cli::HttpAccess {
        ca_file: Some(ca_file.clone()),
        user: Some("prom".to_owned()),
        password_file: None,
    };
    let (client, _) = access.client().unwrap();
    let status = |user: &'static str, password: &'static str| {
        let client = client.clone();
        let url = format!("{base}/api/v1/status");
        async move {
            client
                .get(url)
                .basic_auth(user, Some(password))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("prom", "first-pass-Kx41").await, 200);

    // A changed file applies without a restart.
    std::fs::write(&web, web_config_text("prom", "second-pass-Jd73")).unwrap();
    eventually("the new password is live", DEADLINE, || async {
        (status("prom", "second-pass-Jd73").await == 200).then_some(())
    })
    .await;
    assert_eq!(status("prom", "first-pass-Kx41").await, 401);

    // An invalid file keeps the last valid one and is counted.
    std::fs::write(&web, "basic_auth_users:\n  prom: not-a-hash\n").unwrap();
    let failures = eventually("the failure is counted", DEADLINE, || async {
        let text = client
            .get(&metrics)
            .basic_auth("prom", Some("second-pass-Jd73"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        crate::util::metric_value(&text, "wxauto_web_config_reload_failures_total")
            .filter(|value| *value >= 1.0)
    })
    .await;
    assert_eq!(failures, 1.0);
    assert_eq!(status("prom", "second-pass-Jd73").await, 200);

    // The health command, with --ca-file, --user and --password-file.
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, "second-pass-Jd73\n").unwrap();
    let output = tokio::task::spawn_blocking({
        let (base, ca, password_file) = (base.clone(), ca_file.clone(), password_file.clone());
        move || {
            Command::new(BIN)
                .args(["health", "--url", &base, "--user", "prom"])
                .arg("--ca-file")
                .arg(&ca)
                .arg("--password-file")
                .arg(&password_file)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("score"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    sidecar.stop().await;
}
