//! The typed HTTP client for one wxauto instance: auth header, envelope, timeouts, error classes.
//!
//! Only this module speaks the upstream protocol. Every call is counted and timed in
//! `wxauto_api_requests_total` / `wxauto_api_request_duration_seconds`.

pub mod types;

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::metrics::Metrics;
use crate::monitor::ErrorKind;
use crate::secret::Secret;

pub use types::{ChatBatch, HealthInfo, RawMessage};

/// Answers larger than this are refused as `Decode` errors instead of being buffered.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

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
}

impl Endpoint {
    /// Every endpoint, for pre-initialising label sets.
    pub const ALL: [Endpoint; 8] = [
        Self::Health,
        Self::Initialize,
        Self::GetNextNew,
        Self::ListenAdd,
        Self::ListenGet,
        Self::ListenRemove,
        Self::Send,
        Self::SendTyping,
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
}

/// The client for one instance. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
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
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(credentials) = credentials
            && let Ok(mut value) =
                reqwest::header::HeaderValue::from_str(credentials.header_value().expose())
        {
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(5)))
            .no_proxy()
            .user_agent(concat!("wxauto-sidecar/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
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

    /// `POST /api/message/listen/add`.
    pub async fn listen_add(&self, who: &str) -> Result<(), WxautoError> {
        self.call::<Value>(
            Endpoint::ListenAdd,
            Some(serde_json::json!({ "nickname": who })),
        )
        .await
        .map(drop)
    }

    /// `POST /api/message/listen/remove`.
    pub async fn listen_remove(&self, who: &str) -> Result<(), WxautoError> {
        self.call::<Value>(
            Endpoint::ListenRemove,
            Some(serde_json::json!({ "nickname": who })),
        )
        .await
        .map(drop)
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

    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
    ) -> Result<T, WxautoError> {
        let started = Instant::now();
        let result = self.call_inner(endpoint, body).await;
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
    ) -> Result<T, WxautoError> {
        let label = endpoint.label();
        let url = format!("{}{}", self.base_url, endpoint.path());
        let request = match body {
            Some(body) => self.http.post(url).json(&body),
            None => self.http.get(url),
        };
        let request = request.header("X-API-Key", self.api_key.expose());
        let mut response = request
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
}
