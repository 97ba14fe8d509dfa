//! Media messages end to end: the simulator serves files over `/api/file/download`, the
//! in-process sidecar (real store, real delivery) downloads them once, and a webhook receiver
//! and Dify and OpenAI fakes written here check what each platform gets, multipart parsed
//! for real.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use wxauto_sidecar::app::{self, RunOptions};

use crate::util::{DEADLINE, Sim, eventually, http_client, metric_value, start_sim};

const IMAGE_PATH: &str = r"C:\Users\me\Documents\wxauto文件\微信图片_20261201.png";
const SAME_NAME_PATH: &str = r"D:\other\微信图片_20261201.png";
const BIG_PATH: &str = r"C:\Users\me\Documents\wxauto文件\big.mp4";
const MISSING_PATH: &str = r"C:\Users\me\Documents\wxauto文件\gone.pdf";
const DIFY_KEY: &str = "dify-secret-key-4242";
const OPENAI_KEY: &str = "sk-openai-secret-7373";

/// What the fake platforms received.
struct Seen {
    webhook: Vec<Value>,
    uploads: Vec<Upload>,
    dify: Vec<Value>,
    openai: Vec<Value>,
    /// A webhook message whose content is `hold` waits for a permit here.
    hold: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Clone)]
struct Upload {
    authorization: String,
    user: String,
    filename: String,
    content_type: String,
    data: Vec<u8>,
}

impl Default for Seen {
    fn default() -> Self {
        Self {
            webhook: Vec::new(),
            uploads: Vec::new(),
            dify: Vec::new(),
            openai: Vec::new(),
            hold: Arc::new(tokio::sync::Semaphore::new(0)),
        }
    }
}

type Shared = Arc<Mutex<Seen>>;

/// The webhook receiver plus the Dify and OpenAI fakes, on one loopback port.
async fn start_platforms() -> (String, Shared, tokio_util::sync::DropGuard) {
    let seen = Shared::default();
    let app = Router::new()
        .route(
            "/hook",
            post(webhook).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/dify/v1/files/upload", post(dify_upload))
        .route("/dify/v1/chat-messages", post(dify_chat))
        .route("/openai/v1/chat/completions", post(openai_chat))
        .with_state(Arc::clone(&seen));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .unwrap();
    });
    (base, seen, cancel.drop_guard())
}

async fn webhook(State(seen): State<Shared>, body: Bytes) -> Response {
    let value: Value = serde_json::from_slice(&body).expect("the webhook body is JSON");
    if value["content"] == "hold" {
        let hold = Arc::clone(&seen.lock().unwrap().hold);
        let _permit = hold.acquire().await.expect("semaphore open");
    }
    seen.lock().unwrap().webhook.push(value);
    StatusCode::NO_CONTENT.into_response()
}

async fn dify_upload(State(seen): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let Some(boundary) = content_type
        .strip_prefix("multipart/form-data; boundary=")
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "not multipart").into_response();
    };
    let parts = parse_multipart(&body, &boundary);
    let field = |name: &str| parts.iter().find(|part| part.name == name).cloned();
    let (Some(user), Some(file)) = (field("user"), field("file")) else {
        return (StatusCode::BAD_REQUEST, "missing user or file").into_response();
    };
    let mut seen = seen.lock().unwrap();
    seen.uploads.push(Upload {
        authorization: header(&headers, "authorization"),
        user: String::from_utf8(user.data).unwrap(),
        filename: file.filename.unwrap_or_default(),
        content_type: file.content_type.unwrap_or_default(),
        data: file.data,
    });
    let id = format!("upload-{}", seen.uploads.len());
    (StatusCode::CREATED, axum::Json(json!({ "id": id }))).into_response()
}

async fn dify_chat(State(seen): State<Shared>, body: Bytes) -> Response {
    let value: Value = serde_json::from_slice(&body).unwrap();
    seen.lock().unwrap().dify.push(value);
    axum::Json(json!({ "answer": "", "conversation_id": "conv-1" })).into_response()
}

async fn openai_chat(State(seen): State<Shared>, body: Bytes) -> Response {
    let value: Value = serde_json::from_slice(&body).unwrap();
    seen.lock().unwrap().openai.push(value);
    axum::Json(json!({ "choices": [{ "message": { "content": "" } }] })).into_response()
}

fn header(headers: &HeaderMap, name: &str) -> String {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[derive(Debug, Clone)]
struct Part {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
}

/// A strict little `multipart/form-data` parser: `--boundary` delimiters, CRLF header lines,
/// a blank line, the data, CRLF before the next delimiter, and `--boundary--` at the end.
fn parse_multipart(body: &[u8], boundary: &str) -> Vec<Part> {
    let delimiter = format!("--{boundary}");
    let find = |haystack: &[u8], needle: &[u8], from: usize| {
        haystack[from..]
            .windows(needle.len())
            .position(|window| window == needle)
            .map(|at| at + from)
    };
    let mut parts = Vec::new();
    let mut at = find(body, delimiter.as_bytes(), 0).expect("first delimiter");
    loop {
        at += delimiter.len();
        if body[at..].starts_with(b"--") {
            assert_eq!(
                &body[at + 2..],
                b"\r\n",
                "nothing after the close delimiter"
            );
            return parts;
        }
        assert!(body[at..].starts_with(b"\r\n"), "CRLF after a delimiter");
        at += 2;
        let headers_end = find(body, b"\r\n\r\n", at).expect("end of part headers");
        let headers = std::str::from_utf8(&body[at..headers_end]).expect("UTF-8 headers");
        let next = find(body, format!("\r\n{delimiter}").as_bytes(), headers_end + 4)
            .expect("next delimiter");
        let mut part = Part {
            name: String::new(),
            filename: None,
            content_type: None,
            data: body[headers_end + 4..next].to_vec(),
        };
        for line in headers.split("\r\n") {
            let (key, value) = line.split_once(':').expect("header line");
            match key.trim().to_ascii_lowercase().as_str() {
                "content-disposition" => {
                    for param in value.split(';').map(str::trim) {
                        let quoted = |prefix: &str| {
                            param
                                .strip_prefix(prefix)
                                .map(|v| v.trim_matches('"').to_owned())
                        };
                        if let Some(name) = quoted("name=") {
                            part.name = name;
                        } else if let Some(filename) = quoted("filename=") {
                            part.filename = Some(filename);
                        }
                    }
                }
                "content-type" => part.content_type = Some(value.trim().to_owned()),
                other => panic!("unexpected part header {other}"),
            }
        }
        parts.push(part);
        at = next + 2;
    }
}

// === the sidecar ===

struct Sidecar {
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Sidecar {
    async fn metrics(&self) -> String {
        http_client()
            .get(format!("http://{}/metrics", self.addr))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    fn downloads(&self) -> PathBuf {
        self.dir.path().join("downloads")
    }

    /// How often the message with the file `file_path` went back to the queue to wait for its
    /// instance (the `waits` of its media row, read from the store file).
    fn media_waits(&self, file_path: &str) -> i64 {
        let conn = rusqlite::Connection::open(self.dir.path().join("messages.db")).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.query_row(
            "SELECT COALESCE(MAX(waits), 0) FROM media WHERE file_path = ?1",
            [file_path],
            |row| row.get(0),
        )
        .unwrap()
    }

    fn file_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join("file_processing.log"))
            .unwrap_or_default()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
    }
}

/// The in-process sidecar with its real store and delivery, everything under a tempdir.
async fn start(sim: &Sim, platforms: &str, max_bytes: u64) -> Sidecar {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let text = format!(
        "listener:\n  poll_interval: 100ms\n  health_check_interval: 300ms\n  request_timeout: 2s\n  backoff: {{ initial: 100ms, max: 400ms }}\n\
         health:\n  report_interval: 1h\n  report_file: {root}/report.json\n\
         logging:\n  dir: {root}/logs\n\
         storage:\n  path: {root}/messages.db\n\
         delivery:\n  backoff: {{ initial: 100ms, max: 400ms }}\n\
         media:\n  dir: {root}/downloads\n  max_bytes: {max_bytes}\n  retention_days: 7\n\
         instances:\n  - id: wx\n    base_url: http://{addr}\n    api_key_env: KEY_WX\n\
         platforms:\n  - id: hook\n    type: webhook\n    url: {platforms}/hook\n\
         \x20 - id: kb\n    type: dify\n    api_base: {platforms}/dify/v1\n    api_key_env: DIFY_KEY\n\
         \x20 - id: gpt\n    type: openai\n    api_base: {platforms}/openai/v1\n    api_key_env: OPENAI_KEY\n    model: vision-model\n    vision: true\n\
         rules:\n  - id: to-dify\n    chat: dify-chat\n    platform: kb\n    priority: 10\n\
         \x20 - id: to-gpt\n    chat: gpt-chat\n    platform: gpt\n    priority: 10\n\
         \x20 - id: rest\n    chat: \"*\"\n    platform: hook\n",
        addr = sim.addr,
    );
    let env = vec![
        ("KEY_WX".to_owned(), sim.key.clone()),
        ("DIFY_KEY".to_owned(), DIFY_KEY.to_owned()),
        ("OPENAI_KEY".to_owned(), OPENAI_KEY.to_owned()),
    ];
    let loader = app::builtin_loader(text, env);
    let loaded = loader().expect("test config must be valid");
    let options = RunOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        enable_lifecycle: false,
        grace: Duration::from_secs(5),
        watch: false,
        watch_poll: false,
        sink: None,
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
        dir,
        shutdown,
        handle,
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A small fake PNG: the signature, then bytes no text encoding would keep intact.
fn png(len: usize) -> Vec<u8> {
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend((0..len).map(|i| u8::try_from(i * 7 % 256).unwrap()));
    bytes
}

async fn webhook_bodies(seen: &Shared, n: usize) -> Vec<Value> {
    eventually("webhook deliveries", DEADLINE, || async {
        let bodies = seen.lock().unwrap().webhook.clone();
        (bodies.len() >= n).then_some(bodies)
    })
    .await
}

fn by_message<'a>(bodies: &'a [Value], content: &str) -> &'a Value {
    bodies
        .iter()
        .find(|body| body["content"] == content)
        .unwrap_or_else(|| panic!("no webhook body with content {content:?}: {bodies:?}"))
}

fn series(metrics: &str, outcome: &str) -> f64 {
    metric_value(
        metrics,
        &format!("wxauto_media_downloads_total{{instance_id=\"wx\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or_else(|| panic!("no media series for {outcome}"))
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_reaches_the_webhook_inline_and_prefixes_are_stripped() {
    let sim = start_sim("media-a").await;
    let (platforms, seen, _platforms) = start_platforms().await;
    let sidecar = start(&sim, &platforms, 1024 * 1024).await;
    let image = png(3000);
    let other = png(10);
    sim.sim.add_file(IMAGE_PATH, image.clone());
    sim.sim.add_file(SAME_NAME_PATH, other.clone());
    sim.sim
        .inject_media("alice", "alice", "image", Some(IMAGE_PATH), IMAGE_PATH);
    sim.sim.inject_media(
        "alice",
        "alice",
        "voice",
        None,
        "[wxauto语音解析]明天下午三点开会",
    );
    sim.sim.inject_media(
        "alice",
        "alice",
        "card",
        None,
        "[wxauto卡片链接解析]季度报告 https://example.com/r",
    );
    sim.sim.inject("alice", "alice", "plain text");
    // Same file name, another folder, and only in the content (no `file_path`).
    sim.sim
        .inject_media("bob", "bob", "image", None, SAME_NAME_PATH);

    let bodies = webhook_bodies(&seen, 5).await;
    let first = by_message(&bodies, IMAGE_PATH);
    let attachments = first["attachments"].as_array().expect("attachments");
    assert_eq!(attachments.len(), 1);
    let attachment = &attachments[0];
    assert_eq!(attachment["kind"], "image");
    assert_eq!(attachment["name"], "微信图片_20261201.png");
    assert_eq!(attachment["content_type"], "image/png");
    assert_eq!(attachment["size"], image.len());
    assert_eq!(attachment["sha256"], sha256_hex(&image));
    let data = base64::engine::general_purpose::STANDARD
        .decode(attachment["data_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(data, image);

    // Text-only messages keep the old body: no `attachments` key at all.
    for content in [
        "明天下午三点开会",
        "季度报告 https://example.com/r",
        "plain text",
    ] {
        let body = by_message(&bodies, content);
        assert!(body.get("attachments").is_none(), "{body}");
    }
    let second = by_message(&bodies, SAME_NAME_PATH);
    assert_eq!(second["attachments"][0]["sha256"], sha256_hex(&other));

    // Both are kept, the second under a numbered name.
    let mut kept: Vec<String> = std::fs::read_dir(sidecar.downloads())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    kept.sort();
    assert_eq!(kept, ["微信图片_20261201.png", "微信图片_20261201_1.png"]);
    let first_kept = std::fs::read(sidecar.downloads().join("微信图片_20261201.png")).unwrap();
    let second_kept = std::fs::read(sidecar.downloads().join("微信图片_20261201_1.png")).unwrap();
    // Either may have been saved first (two chats, two workers); both bytes are there.
    let mut contents = [first_kept, second_kept];
    contents.sort();
    let mut expected = [image.clone(), other.clone()];
    expected.sort();
    assert_eq!(contents, expected);

    let metrics = sidecar.metrics().await;
    assert_eq!(series(&metrics, "success"), 2.0);
    assert_eq!(series(&metrics, "error"), 0.0);
    assert_eq!(series(&metrics, "too_large"), 0.0);
    let log = sidecar.file_log();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert!(
        lines.iter().all(|line| line.contains("outcome=success")),
        "{log}"
    );
    assert!(log.contains(&format!("size={}", image.len())), "{log}");
    assert!(
        log.contains(&format!("sha256={}", sha256_hex(&image))),
        "{log}"
    );
    assert!(!log.contains(&sim.key), "no key in the file log");
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_and_missing_files_are_delivered_without_data_and_counted() {
    let sim = start_sim("media-b").await;
    let (platforms, seen, _platforms) = start_platforms().await;
    let sidecar = start(&sim, &platforms, 4096).await;
    sim.sim.add_file(BIG_PATH, vec![7u8; 5000]);
    sim.sim
        .inject_media("alice", "alice", "video", Some(BIG_PATH), BIG_PATH);
    sim.sim
        .inject_media("alice", "alice", "file", Some(MISSING_PATH), MISSING_PATH);

    let bodies = webhook_bodies(&seen, 2).await;
    let big = &by_message(&bodies, BIG_PATH)["attachments"][0];
    assert_eq!(big["kind"], "video");
    assert_eq!(big["name"], "big.mp4");
    assert_eq!(big["size"], 5000);
    assert!(
        big["data_base64"].is_null() && big["sha256"].is_null(),
        "{big}"
    );
    let missing = &by_message(&bodies, MISSING_PATH)["attachments"][0];
    assert_eq!(missing["kind"], "file");
    assert_eq!(missing["content_type"], "application/pdf");
    assert!(missing["data_base64"].is_null(), "{missing}");

    let metrics = sidecar.metrics().await;
    assert_eq!(series(&metrics, "too_large"), 1.0);
    assert_eq!(series(&metrics, "error"), 1.0);
    assert_eq!(series(&metrics, "success"), 0.0);
    assert_eq!(
        metric_value(
            &metrics,
            "wxauto_deliveries_total{platform=\"hook\",outcome=\"success\"}"
        ),
        Some(2.0),
        "both delivered at the first attempt"
    );
    let log = sidecar.file_log();
    let error_line = log
        .lines()
        .find(|line| line.contains("gone.pdf"))
        .unwrap_or_else(|| panic!("the failure is logged: {log}"));
    assert!(error_line.contains("outcome=error"), "{error_line}");
    assert!(error_line.contains("3003"), "{error_line}");
    let big_line = log.lines().find(|line| line.contains("big.mp4")).unwrap();
    assert!(big_line.contains("outcome=too_large"), "{big_line}");
    assert!(
        !sidecar.downloads().join("big.mp4").exists(),
        "nothing kept for a too-large file"
    );
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dify_gets_an_uploaded_image_and_openai_a_data_uri() {
    let sim = start_sim("media-c").await;
    let (platforms, seen, _platforms) = start_platforms().await;
    let sidecar = start(&sim, &platforms, 1024 * 1024).await;
    let image = png(500);
    sim.sim.add_file(IMAGE_PATH, image.clone());
    sim.sim
        .inject_media("dify-chat", "carol", "image", Some(IMAGE_PATH), IMAGE_PATH);
    sim.sim
        .inject_media("gpt-chat", "dave", "image", Some(IMAGE_PATH), IMAGE_PATH);

    let (upload, chat) = eventually("the Dify chat message", DEADLINE, || async {
        let seen = seen.lock().unwrap();
        match (seen.uploads.first(), seen.dify.first()) {
            (Some(upload), Some(chat)) => Some((upload.clone(), chat.clone())),
            _ => None,
        }
    })
    .await;
    assert_eq!(upload.authorization, format!("Bearer {DIFY_KEY}"));
    assert_eq!(upload.filename, "微信图片_20261201.png");
    assert_eq!(upload.content_type, "image/png");
    assert_eq!(
        upload.user, "dify-chat==carol",
        "the same user as the chat message"
    );
    assert_eq!(chat["user"], "dify-chat==carol");
    assert_eq!(upload.data, image);
    assert_eq!(chat["query"], " ", "no text: a single space");
    assert_eq!(
        chat["files"],
        json!([{ "type": "image", "transfer_method": "local_file", "upload_file_id": "upload-1" }])
    );

    let completion = eventually("the OpenAI completion", DEADLINE, || async {
        seen.lock().unwrap().openai.first().cloned()
    })
    .await;
    let content = &completion["messages"].as_array().unwrap().last().unwrap()["content"];
    let url = content[0]["image_url"]["url"]
        .as_str()
        .expect("an image_url part");
    assert_eq!(content[0]["type"], "image_url");
    let expected = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&image)
    );
    assert_eq!(url, expected);
    assert_eq!(
        content.as_array().unwrap().len(),
        1,
        "no text part for an image alone"
    );

    // One download per message, two messages.
    assert_eq!(series(&sidecar.metrics().await, "success"), 2.0);
    sidecar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_serves_known_files_and_refuses_others() {
    let sim = start_sim("media-d").await;
    sim.sim.add_file(IMAGE_PATH, b"bytes".to_vec());
    let http = http_client();
    let url = format!("http://{}/api/file/download", sim.addr);
    let ok = http
        .post(&url)
        .header("X-API-Key", &sim.key)
        .json(&json!({ "file_path": IMAGE_PATH }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.bytes().await.unwrap().as_ref(), b"bytes");
    let missing = http
        .post(&url)
        .header("X-API-Key", &sim.key)
        .json(&json!({ "file_path": MISSING_PATH }))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], 3003);
    let no_path = http
        .post(&url)
        .header("X-API-Key", &sim.key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_path.status(), 400);
    assert_eq!(no_path.json::<Value>().await.unwrap()["code"], 1002);
    let unauthenticated = http
        .post(&url)
        .json(&json!({ "file_path": IMAGE_PATH }))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);

    // The control surface: a media message with its bytes.
    let control = http
        .post(format!("http://{}/_sim/media", sim.addr))
        .json(&json!({
            "chat": "alice",
            "mtype": "image",
            "file_path": BIG_PATH,
            // Past axum's default 2 MB request limit.
            "data_base64": base64::engine::general_purpose::STANDARD.encode(vec![5u8; 3 << 20]),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(control.status(), 200);
    assert_eq!(sim.sim.file(BIG_PATH), Some(vec![5u8; 3 << 20]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_waits_while_the_instance_is_down_and_completes_after_recovery() {
    let sim = start_sim("media-e").await;
    let (platforms, seen, _platforms) = start_platforms().await;
    let sidecar = start(&sim, &platforms, 1024 * 1024).await;
    let image = png(64);
    sim.sim.add_file(IMAGE_PATH, image.clone());
    // The image is queued behind a message the webhook holds, so the instance can go down
    // between the poll that took the image and its download.
    sim.sim.inject("alice", "alice", "hold");
    sim.sim
        .inject_media("alice", "alice", "image", Some(IMAGE_PATH), IMAGE_PATH);
    let client_up = "wxauto_client_up{instance_id=\"wx\"}";
    eventually(
        "both messages stored and the instance up",
        DEADLINE,
        || async {
            let metrics = sidecar.metrics().await;
            (metric_value(&metrics, "wxauto_messages_pending") == Some(2.0)
                && metric_value(&metrics, client_up) == Some(1.0))
            .then_some(())
        },
    )
    .await;
    sim.sim.set_online(false);
    eventually("the instance is seen down", DEADLINE, || async {
        (metric_value(&sidecar.metrics().await, client_up) == Some(0.0)).then_some(())
    })
    .await;
    seen.lock().unwrap().hold.add_permits(1);
    webhook_bodies(&seen, 1).await;
    // While the instance is down the image waits: a worker took it twice and twice put it
    // back without a download, and nothing was delivered.
    eventually(
        "the image waited twice for its instance",
        DEADLINE,
        || async { (sidecar.media_waits(IMAGE_PATH) >= 2).then_some(()) },
    )
    .await;
    let metrics = sidecar.metrics().await;
    assert_eq!(series(&metrics, "success"), 0.0);
    assert_eq!(series(&metrics, "unavailable"), 0.0);
    assert_eq!(seen.lock().unwrap().webhook.len(), 1);

    sim.sim.set_online(true);
    let bodies = webhook_bodies(&seen, 2).await;
    let attachment = &by_message(&bodies, IMAGE_PATH)["attachments"][0];
    assert_eq!(attachment["sha256"], sha256_hex(&image));
    let metrics = sidecar.metrics().await;
    assert_eq!(series(&metrics, "success"), 1.0);
    assert_eq!(
        metric_value(
            &metrics,
            "wxauto_deliveries_total{platform=\"hook\",outcome=\"retry\"}"
        ),
        Some(0.0),
        "waiting is not a failed attempt"
    );
    sidecar.stop().await;
}
