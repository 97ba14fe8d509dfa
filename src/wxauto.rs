//! The typed HTTP client for one wxauto instance: auth header, envelope, timeouts, error classes.
//!
//! Only this module speaks the upstream protocol. Every call is counted and timed in
//! `wxauto_api_requests_total` / `wxauto_api_request_duration_seconds`.

pub mod types;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::event::ErrorKind;
use crate::message::Download;
use crate::metrics::Metrics;
use crate::secret::Secret;

pub use types::{ChatBatch, HealthInfo, RawMessage};

/// Answers larger than this are refused as `Decode` errors instead of being buffered.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The budget of one file download (the old client's 60 s per try), instead of
/// `listener.request_timeout`: a large file over a slow link takes longer than a poll.
pub const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// The upstream endpoints the sidecar calls (the `endpoint` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /api/health` (unauthenticated upstream).
    Health,
    /// `POST /api/wechat/initialize`.
    Initialize,
    /// `GET /api/message/get-next-new`.
    GetNextNew,
    /// `POST /api/message/listen/add`.
    ListenAdd,
    /// `GET /api/message/listen/get` (destructive).
    ListenGet,
    /// `POST /api/message/listen/remove`.
    ListenRemove,
    /// `POST /api/chat-window/message/send`.
    Send,
    /// `POST /api/chat-window/message/send-typing`.
    SendTyping,
    /// `POST /api/file/download` (raw bytes).
    FileDownload,
    /// `GET /api/chat/get-all-messages?who=` (non-destructive; current servers only).
    GetAllMessages,
}

impl Endpoint {
    /// Every endpoint, for pre-initialising label sets.
    pub const ALL: [Endpoint; 10] = [
        Self::Health,
        Self::Initialize,
        Self::GetNextNew,
        Self::ListenAdd,
        Self::ListenGet,
        Self::ListenRemove,
        Self::Send,
        Self::SendTyping,
        Self::FileDownload,
        Self::GetAllMessages,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Initialize => "initialize",
            Self::GetNextNew => "get_next_new",
            Self::ListenAdd => "listen_add",
            Self::ListenGet => "listen_get",
            Self::ListenRemove => "listen_remove",
            Self::Send => "send",
            Self::SendTyping => "send_typing",
            Self::FileDownload => "file_download",
            Self::GetAllMessages => "get_all_messages",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Self::Health => "/api/health",
            Self::Initialize => "/api/wechat/initialize",
            Self::GetNextNew => {
                "/api/message/get-next-new?savepic=false&savevideo=false&savefile=false&savevoice=false&parseurl=false"
            }
            Self::ListenAdd => "/api/message/listen/add",
            Self::ListenGet => "/api/message/listen/get",
            Self::ListenRemove => "/api/message/listen/remove",
            Self::Send => "/api/chat-window/message/send",
            Self::SendTyping => "/api/chat-window/message/send-typing",
            Self::FileDownload => "/api/file/download",
            Self::GetAllMessages => "/api/chat/get-all-messages",
        }
    }
}

/// A failed call, classified into the closed set of error kinds.
///
/// Texts never contain the API key: they are built from status codes and upstream messages,
/// and upstream messages pass through `Secret::redact_in`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WxautoError {
    /// No answer within `listener.request_timeout`.
    #[error("{endpoint}: timed out")]
    Timeout {
        /// Endpoint label.
        endpoint: &'static str,
    },
    /// Could not connect or the connection broke.
    #[error("{endpoint}: connection failed: {reason}")]
    Connect {
        /// Endpoint label.
        endpoint: &'static str,
        /// What the transport said.
        reason: String,
    },
    /// HTTP 401: the key was rejected.
    #[error("{endpoint}: API key rejected (HTTP 401): {message}")]
    Auth {
        /// Endpoint label.
        endpoint: &'static str,
        /// Upstream message.
        message: String,
    },
    /// A non-success HTTP status other than 401.
    #[error("{endpoint}: HTTP {status}{}: {message}", code_suffix(*code))]
    HttpStatus {
        /// Endpoint label.
        endpoint: &'static str,
        /// The status.
        status: u16,
        /// The envelope code, when the body was an envelope.
        code: Option<i64>,
        /// Upstream message.
        message: String,
    },
    /// HTTP 200 but the envelope's `code` was not 0.
    #[error("{endpoint}: API code {code}: {message}")]
    ApiCode {
        /// Endpoint label.
        endpoint: &'static str,
        /// The envelope code.
        code: i64,
        /// Upstream message.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("{endpoint}: malformed answer: {reason}")]
    Decode {
        /// Endpoint label.
        endpoint: &'static str,
        /// What was wrong.
        reason: String,
    },
}

fn code_suffix(code: Option<i64>) -> String {
    code.map(|code| format!(" (code {code})"))
        .unwrap_or_default()
}

impl WxautoError {
    /// The `kind` label of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Connect { .. } => ErrorKind::Connect,
            Self::Auth { .. } => ErrorKind::Auth,
            Self::HttpStatus { .. } => ErrorKind::HttpStatus,
            Self::ApiCode { .. } => ErrorKind::ApiCode,
            Self::Decode { .. } => ErrorKind::Decode,
        }
    }

    /// True when the instance as a whole is unusable (as opposed to one request being refused):
    /// no answer, a broken connection, a rejected key, a server error, or "WeChat not initialised".
    pub fn is_instance_failure(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Connect { .. } | Self::Auth { .. } => true,
            Self::HttpStatus { status, code, .. } => *status >= 500 || *code == Some(2001),
            Self::ApiCode { code, .. } => *code == 2001,
            Self::Decode { .. } => false,
        }
    }

    /// True for the error that means "this chat is not listened" (send to an unknown chat).
    pub fn is_not_listened(&self) -> bool {
        matches!(
            self,
            Self::HttpStatus {
                status: 404,
                code: Some(3001),
                ..
            }
        )
    }

    /// True when the server has no such endpoint (an older server generation): a 404 that is
    /// not the "chat not listened" answer.
    pub fn is_missing_endpoint(&self) -> bool {
        matches!(self, Self::HttpStatus { status: 404, .. }) && !self.is_not_listened()
    }
}

/// The one `reqwest::Client` every instance shares: one connection pool, and the TLS roots
/// loaded once per process instead of once per instance actor. Per-instance settings (the
/// request timeout, basic-auth credentials) go on each request instead.
fn shared_http() -> Result<reqwest::Client, reqwest::Error> {
    static SHARED: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(http) = SHARED.get() {
        return Ok(http.clone());
    }
    // A failed build (no crypto provider installed yet) is not cached; the next call retries.
    let http = reqwest::Client::builder()
        .connect_timeout(MAX_CONNECT_TIMEOUT)
        .no_proxy()
        .user_agent(concat!("wxauto-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()?;
    Ok(SHARED.get_or_init(|| http).clone())
}

/// The connect timeout of the shared client; a shorter `request_timeout` bounds a connect too,
/// since it covers the whole request.
const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client for one instance. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `listener.request_timeout`, applied to every call but downloads.
    request_timeout: Duration,
    /// `Authorization: Basic` from `user:password@` in the base URL (marked sensitive).
    authorization: Option<reqwest::header::HeaderValue>,
    instance_id: String,
    base_url: String,
    api_key: Secret,
    metrics: Metrics,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("instance_id", &self.instance_id)
            .field("base_url", &crate::config::redact_url(&self.base_url))
            .field("api_key", &self.api_key)
            .finish()
    }
}

// === impl Client ===

impl Client {
    /// Builds a client with `request_timeout` applied to every call.
    pub fn new(
        instance_id: &str,
        base_url: &str,
        api_key: Secret,
        request_timeout: Duration,
        metrics: Metrics,
    ) -> Result<Self, reqwest::Error> {
        // `user:password@` in the URL becomes one `Authorization: Basic` header (the key goes
        // as `X-API-Key`), and the URL requests are sent to has no credentials left in it.
        let (base_url, credentials) = crate::secret::split_url_credentials(base_url);
        let authorization = credentials.and_then(|credentials| {
            let mut value =
                reqwest::header::HeaderValue::from_str(credentials.header_value().expose()).ok()?;
            value.set_sensitive(true);
            Some(value)
        });
        Ok(Self {
            http: shared_http()?,
            request_timeout,
            authorization,
            instance_id: instance_id.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            metrics,
        })
    }

    /// The instance this client talks to.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// `GET /api/health`.
    pub async fn health(&self) -> Result<HealthInfo, WxautoError> {
        self.call(Endpoint::Health, None).await
    }

    /// `POST /api/wechat/initialize`.
    pub async fn initialize(&self) -> Result<(), WxautoError> {
        self.call::<Value>(Endpoint::Initialize, Some(serde_json::json!({})))
            .await
            .map(drop)
    }

    /// `GET /api/message/get-next-new`: the unread messages of at most one chat.
    pub async fn get_next_new(&self) -> Result<Vec<ChatBatch>, WxautoError> {
        let data: Value = self.call(Endpoint::GetNextNew, None).await?;
        types::parse_batches(&data).map_err(|reason| WxautoError::Decode {
            endpoint: Endpoint::GetNextNew.label(),
            reason,
        })
    }

    /// `GET /api/message/listen/get`: destructive; the cached messages of at most one chat.
    pub async fn listen_get(&self) -> Result<Vec<ChatBatch>, WxautoError> {
        let data: Value = self.call(Endpoint::ListenGet, None).await?;
        types::parse_batches(&data).map_err(|reason| WxautoError::Decode {
            endpoint: Endpoint::ListenGet.label(),
            reason,
        })
    }

    /// `POST /api/message/listen/add`. Both body keys go out: servers before mid-2025 read
    /// `who`, current ones `nickname`, and each ignores the other.
    pub async fn listen_add(&self, who: &str) -> Result<(), WxautoError> {
        self.call::<Value>(
            Endpoint::ListenAdd,
            Some(serde_json::json!({ "nickname": who, "who": who })),
        )
        .await
        .map(drop)
    }

    /// `POST /api/message/listen/remove`, with both body keys like `listen_add`.
    pub async fn listen_remove(&self, who: &str) -> Result<(), WxautoError> {
        self.call::<Value>(
            Endpoint::ListenRemove,
            Some(serde_json::json!({ "nickname": who, "who": who })),
        )
        .await
        .map(drop)
    }

    /// `GET /api/chat/get-all-messages?who=`: the visible history of a listened chat's window,
    /// oldest first, with the same ids `listen/get` hands out. Non-destructive.
    pub async fn get_all_messages(&self, who: &str) -> Result<Vec<RawMessage>, WxautoError> {
        let data: Value = self
            .call_with(Endpoint::GetAllMessages, None, &[("who", who)])
            .await?;
        types::parse_history(&data).map_err(|reason| WxautoError::Decode {
            endpoint: Endpoint::GetAllMessages.label(),
            reason,
        })
    }

    /// `POST /api/chat-window/message/send` (or `send-typing`).
    pub async fn send(
        &self,
        who: &str,
        message: &str,
        at: &[String],
        typing: bool,
    ) -> Result<(), WxautoError> {
        let endpoint = if typing {
            Endpoint::SendTyping
        } else {
            Endpoint::Send
        };
        let mut body = serde_json::json!({ "who": who, "message": message, "clear": true });
        if !at.is_empty() {
            body["at_list"] = serde_json::json!(at);
        }
        self.call::<Value>(endpoint, Some(body)).await.map(drop)
    }

    /// `POST /api/file/download`: the raw bytes of a file on the instance's machine, or
    /// `TooLarge` once the answer passes `max_bytes` (announced or read). A JSON error
    /// envelope (code 3003 or 1002) is an error like any other call's.
    pub async fn download_file(
        &self,
        file_path: &str,
        max_bytes: u64,
    ) -> Result<Download, WxautoError> {
        let started = Instant::now();
        let result = self.download_inner(file_path, max_bytes).await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(WxautoError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        self.metrics.observe_api_call(
            &self.instance_id,
            Endpoint::FileDownload.label(),
            outcome,
            started.elapsed(),
        );
        result
    }

    async fn download_inner(
        &self,
        file_path: &str,
        max_bytes: u64,
    ) -> Result<Download, WxautoError> {
        let endpoint = Endpoint::FileDownload;
        let label = endpoint.label();
        let url = format!("{}{}", self.base_url, endpoint.path());
        let mut response = self
            .authorized(self.http.post(url))
            .timeout(DOWNLOAD_TIMEOUT)
            .json(&serde_json::json!({ "file_path": file_path }))
            .send()
            .await
            .map_err(|error| self.transport_error(label, &error))?;
        let status = response.status();
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/json"));
        if status.is_success()
            && let Some(size) = response.content_length()
            && size > max_bytes
        {
            return Ok(Download::TooLarge { size: Some(size) });
        }
        // An error envelope is small; a file is capped at `max_bytes`.
        let cap = if status.is_success() {
            usize::try_from(max_bytes).unwrap_or(usize::MAX)
        } else {
            MAX_BODY_BYTES
        };
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > cap {
                        if status.is_success() {
                            return Ok(Download::TooLarge { size: None });
                        }
                        return Err(WxautoError::Decode {
                            endpoint: label,
                            reason: format!("answer larger than {cap} bytes"),
                        });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => return Err(self.transport_error(label, &error)),
            }
        }
        if status.is_success() && !is_json {
            return Ok(Download::Bytes(bytes));
        }
        let envelope = types::parse_envelope(&bytes);
        if status == StatusCode::UNAUTHORIZED {
            let message = envelope
                .map(|envelope| envelope.message)
                .unwrap_or_default();
            return Err(WxautoError::Auth {
                endpoint: label,
                message: self.clean(&message),
            });
        }
        match envelope {
            Ok(envelope) if !status.is_success() => Err(WxautoError::HttpStatus {
                endpoint: label,
                status: status.as_u16(),
                code: Some(envelope.code),
                message: self.clean(&envelope.message),
            }),
            Ok(envelope) if envelope.code != 0 => Err(WxautoError::ApiCode {
                endpoint: label,
                code: envelope.code,
                message: self.clean(&envelope.message),
            }),
            // A JSON file that is not an error envelope is a file like any other.
            _ if status.is_success() => Ok(Download::Bytes(bytes)),
            _ => Err(WxautoError::HttpStatus {
                endpoint: label,
                status: status.as_u16(),
                code: None,
                message: String::new(),
            }),
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
    ) -> Result<T, WxautoError> {
        self.call_with(endpoint, body, &[]).await
    }

    async fn call_with<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
        query: &[(&str, &str)],
    ) -> Result<T, WxautoError> {
        let started = Instant::now();
        let result = self.call_inner(endpoint, body, query).await;
        let outcome = match &result {
            Ok(_) => "success",
            Err(WxautoError::Timeout { .. }) => "timeout",
            Err(_) => "error",
        };
        self.metrics.observe_api_call(
            &self.instance_id,
            endpoint.label(),
            outcome,
            started.elapsed(),
        );
        result
    }

    async fn call_inner<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
        query: &[(&str, &str)],
    ) -> Result<T, WxautoError> {
        let label = endpoint.label();
        let mut url = format!("{}{}", self.base_url, endpoint.path());
        if !query.is_empty() {
            // Percent-encoded by `Url`; chat names are often Chinese or contain spaces.
            url = reqwest::Url::parse_with_params(&url, query)
                .map_err(|error| WxautoError::Connect {
                    endpoint: label,
                    reason: format!("invalid request URL: {error}"),
                })?
                .to_string();
        }
        let request = match body {
            Some(body) => self.http.post(url).json(&body),
            None => self.http.get(url),
        };
        let mut response = self
            .authorized(request)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|error| self.transport_error(label, &error))?;
        let status = response.status();
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(WxautoError::Decode {
                            endpoint: label,
                            reason: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                        });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => return Err(self.transport_error(label, &error)),
            }
        }
        let envelope = types::parse_envelope(&bytes);
        if status == StatusCode::UNAUTHORIZED {
            let message = envelope
                .as_ref()
                .map(|envelope| envelope.message.clone())
                .unwrap_or_default();
            return Err(WxautoError::Auth {
                endpoint: label,
                message: self.clean(&message),
            });
        }
        if !status.is_success() {
            let (code, message) = match &envelope {
                Ok(envelope) => (Some(envelope.code), envelope.message.clone()),
                Err(_) => (None, String::new()),
            };
            return Err(WxautoError::HttpStatus {
                endpoint: label,
                status: status.as_u16(),
                code,
                message: self.clean(&message),
            });
        }
        let envelope = envelope.map_err(|reason| WxautoError::Decode {
            endpoint: label,
            reason,
        })?;
        if envelope.code != 0 {
            return Err(WxautoError::ApiCode {
                endpoint: label,
                code: envelope.code,
                message: self.clean(&envelope.message),
            });
        }
        serde_json::from_value(envelope.data).map_err(|error| WxautoError::Decode {
            endpoint: label,
            reason: format!("unexpected data: {error}"),
        })
    }

    /// The instance's headers: `X-API-Key`, and `Authorization` when the URL had credentials.
    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = request.header("X-API-Key", self.api_key.expose());
        match &self.authorization {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => request,
        }
    }

    fn transport_error(&self, endpoint: &'static str, error: &reqwest::Error) -> WxautoError {
        if error.is_timeout() {
            return WxautoError::Timeout { endpoint };
        }
        // The reqwest error text includes the URL (never the key, which is a header); strip
        // it anyway so error texts stay short and uniform.
        let mut reason = text_without_url(error);
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = format!("{reason}: {cause}");
            source = cause.source();
        }
        WxautoError::Connect {
            endpoint,
            reason: self.clean(&reason),
        }
    }

    /// Removes the key if a server echoed it, then shortens the text. Redacting first matters:
    /// a cut through the middle of the key would leave its first characters unmatched.
    fn clean(&self, text: &str) -> String {
        self.api_key.redact_in(text).chars().take(200).collect()
    }
}

/// A reqwest error's text without its URL (reqwest's `without_url` takes the error by value).
fn text_without_url(error: &reqwest::Error) -> String {
    let text = error.to_string();
    match error.url() {
        Some(url) => text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "<url>"),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_echoed_across_the_cut_is_still_redacted() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let key = "k3y-0123456789abcdef";
        let client = Client::new(
            "wx",
            "http://127.0.0.1:1",
            Secret::new(key),
            Duration::from_secs(1),
            metrics,
        )
        .unwrap();
        // The key starts at character 195, so a cut at 200 would split it.
        let echoed = format!("{}{key} rejected", "x".repeat(195));
        let cleaned = client.clean(&echoed);
        assert!(!cleaned.contains(&key[..5]), "{cleaned}");
        assert!(cleaned.contains(crate::secret::REDACTED));
        assert!(cleaned.chars().count() <= 200);
    }

    /// A loopback server answering `/api/file/download` by the requested path.
    async fn file_server() -> String {
        use axum::body::Body;
        use axum::response::IntoResponse;
        async fn download(axum::Json(body): axum::Json<Value>) -> axum::response::Response {
            let ok = |content_type: &'static str, body: Body| {
                (
                    StatusCode::OK,
                    [(axum::http::header::CONTENT_TYPE, content_type)],
                    body,
                )
                    .into_response()
            };
            match body["file_path"].as_str().unwrap_or_default() {
                "raw" => ok("image/png", Body::from(vec![1u8; 100])),
                "json-file" => ok("application/json", Body::from(r#"{"a": 1}"#)),
                "refused" => ok(
                    "application/json",
                    Body::from(r#"{"code": 3003, "message": "bad k3y-secret-0001", "data": null}"#),
                ),
                _ => (
                    StatusCode::NOT_FOUND,
                    axum::Json(
                        serde_json::json!({"code": 3003, "message": "文件不存在", "data": null}),
                    ),
                )
                    .into_response(),
            }
        }
        let app = axum::Router::new().route("/api/file/download", axum::routing::post(download));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}")
    }

    /// A raw HTTP/1.1 server that answers every request with a chunked body of `chunks` × 64
    /// bytes (no `Content-Length`), so only the running count can stop the read.
    async fn chunked_server(chunks: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 1024];
                    // Headers, then the small JSON body (its length is in the headers).
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&request);
                        if let Some((head, body)) = text.split_once("\r\n\r\n") {
                            let length = head
                                .lines()
                                .find_map(|line| {
                                    let (name, value) = line.split_once(':')?;
                                    name.eq_ignore_ascii_case("content-length")
                                        .then(|| value.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if body.len() >= length {
                                break;
                            }
                        }
                    }
                    let mut answer =
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                            .to_vec();
                    for _ in 0..chunks {
                        answer.extend_from_slice(b"40\r\n");
                        answer.extend_from_slice(&[2u8; 64]);
                        answer.extend_from_slice(b"\r\n");
                    }
                    answer.extend_from_slice(b"0\r\n\r\n");
                    let _ = socket.write_all(&answer).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn downloads_are_bytes_capped_or_classified_errors() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let key = "k3y-secret-0001";
        let client = |base: &str| {
            Client::new(
                "wx",
                base,
                Secret::new(key),
                Duration::from_secs(5),
                metrics.clone(),
            )
            .unwrap()
        };
        let streaming = client(&chunked_server(10).await);
        let client = client(&file_server().await);
        assert_eq!(
            client.download_file("raw", 1000).await,
            Ok(Download::Bytes(vec![1u8; 100]))
        );
        assert_eq!(
            client.download_file("raw", 99).await,
            Ok(Download::TooLarge { size: Some(100) })
        );
        assert_eq!(
            streaming.download_file("any", 300).await,
            Ok(Download::TooLarge { size: None })
        );
        assert_eq!(
            streaming.download_file("any", 640).await,
            Ok(Download::Bytes(vec![2u8; 640]))
        );
        assert_eq!(
            client.download_file("json-file", 1000).await,
            Ok(Download::Bytes(br#"{"a": 1}"#.to_vec()))
        );
        let refused = client.download_file("refused", 1000).await.unwrap_err();
        assert!(
            matches!(refused, WxautoError::ApiCode { code: 3003, .. }),
            "{refused:?}"
        );
        assert!(!refused.to_string().contains(key), "{refused}");
        let missing = client.download_file("gone", 1000).await.unwrap_err();
        assert!(
            matches!(
                missing,
                WxautoError::HttpStatus {
                    status: 404,
                    code: Some(3003),
                    ..
                }
            ),
            "{missing:?}"
        );
        let text = {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        };
        assert!(
            text.contains(r#"endpoint="file_download",outcome="error""#),
            "counted under its own endpoint label"
        );
    }
}
