//! The typed HTTP client for one wxauto instance: auth header, envelope, timeouts, error classes.
//!
//! Only this module speaks the upstream protocol. Every call is counted and timed in
//! `wxauto_api_requests_total` / `wxauto_api_request_duration_seconds`.

mod error;
mod request;
pub mod types;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::message::Download;
use crate::metrics::Metrics;
use crate::secret::Secret;

pub use error::WxautoError;
use error::api_outcome;
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

// One metric label per endpoint (`label` indexes the list by the variant).
const _: () = assert!(Endpoint::ALL.len() == crate::metrics::API_ENDPOINTS.len());

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

    /// The metric label (`metrics::API_ENDPOINTS`, which lists them in this order).
    pub fn label(self) -> &'static str {
        crate::metrics::API_ENDPOINTS[self as usize]
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
        self.metrics.observe_api_call(
            &self.instance_id,
            Endpoint::FileDownload as usize,
            api_outcome(&result),
            started.elapsed(),
        );
        result
    }
}

#[cfg(test)]
mod tests;
