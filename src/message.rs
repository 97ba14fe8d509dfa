//! The seam between the listener and delivery: `InboundMessage`, `MessageSink` and `ReplySender`.
//!
//! The listener hands every message it takes from an instance to a `MessageSink`; delivery sends
//! replies back through a `ReplySender`. Neither side knows how the other is built.

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};

use crate::config::SendMode;

/// A boxed, sendable future, for the object-safe traits below.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A chat message taken from a wxauto instance that passed the filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// The configured instance id.
    pub instance_id: String,
    /// The chat (`who`) the message belongs to.
    pub chat: String,
    /// The upstream id, or a stable synthetic one (see `synthetic_id`).
    pub message_id: String,
    /// True when upstream sent no id and `message_id` was derived from the content.
    pub synthetic_id: bool,
    /// The upstream `type` (e.g. `friend`).
    pub msg_type: String,
    /// The sender's name.
    pub sender: String,
    /// The sender's remark name, when upstream knows one.
    pub sender_remark: Option<String>,
    /// The text.
    pub content: String,
    /// The upstream `mtype` (null for plain text; `image`, `file`, ...).
    pub mtype: Option<String>,
    /// The upstream `file_path` of a media message (a path on the instance's machine).
    pub file_path: Option<String>,
    /// When the sidecar took the message from the instance.
    pub received_at: DateTime<Utc>,
}

impl InboundMessage {
    /// The name to @-mention or to identify the sender by: the remark if any, else the name.
    pub fn sender_display(&self) -> &str {
        self.sender_remark
            .as_deref()
            .filter(|remark| !remark.is_empty())
            .unwrap_or(&self.sender)
    }

    /// True when the chat is a group (the sender is not the chat itself).
    pub fn is_group(&self) -> bool {
        self.sender != self.chat
    }
}

/// Why a sink could not take messages. The listener keeps the batch and retries.
#[derive(Debug, thiserror::Error)]
#[error("message sink unavailable: {0}")]
pub struct SinkError(pub String);

/// Where the listener hands messages once they are taken from an instance.
///
/// `accept` must only return `Ok` once the messages are durable (or, for the logging sink,
/// handled): the instance has already forgotten them.
pub trait MessageSink: Send + Sync + 'static {
    /// Takes a batch of messages from one instance, in arrival order.
    fn accept(&self, messages: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>>;

    /// Whether a chat is worth a listener slot (a rule could route its messages).
    /// The listener asks before adding a chat it saw in the main window.
    fn wants_chat(&self, instance_id: &str, chat: &str) -> bool {
        let _ = (instance_id, chat);
        true
    }

    /// Counts a message the listener dropped before handing it over (e.g. `echo`), in
    /// `wxauto_messages_dropped_total`.
    fn record_drop(&self, instance_id: &str, reason: &'static str) {
        let _ = (instance_id, reason);
    }
}

/// A reply to send to a chat through its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Target instance.
    pub instance_id: String,
    /// Target chat.
    pub chat: String,
    /// The text.
    pub text: String,
    /// Names to @-mention (empty for none).
    pub at: Vec<String>,
    /// `send` or `send-typing`.
    pub mode: SendMode,
}

/// Why a reply could not be sent.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ReplyError {
    /// The instance is not configured, disabled, or its actor is not running.
    #[error("instance {0} is not running")]
    NoInstance(String),
    /// The instance is known to be down; try later.
    #[error("instance {0} is down")]
    InstanceDown(String),
    /// The upstream call failed (already redacted text).
    #[error("send failed: {0}")]
    Upstream(String),
}

/// A file fetched from an instance (`POST /api/file/download`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Download {
    /// The whole file.
    Bytes(Vec<u8>),
    /// The file is larger than the cap; nothing was kept. `size` when upstream announced it.
    TooLarge {
        /// The announced size, if any.
        size: Option<u64>,
    },
}

/// Why a file could not be fetched.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DownloadError {
    /// The instance is not configured, disabled, or its actor is not running.
    #[error("instance {0} is not running")]
    NoInstance(String),
    /// The instance is known to be down; try later.
    #[error("instance {0} is down")]
    InstanceDown(String),
    /// Upstream refused or failed (already redacted text), e.g. code 3003.
    #[error("download failed: {0}")]
    Upstream(String),
    /// This sender cannot download files.
    #[error("downloads are not supported here")]
    Unsupported,
}

/// Sends replies back through the owning instance actor.
pub trait ReplySender: Send + Sync + 'static {
    /// Sends one reply; resolves once upstream answered.
    fn send_reply(&self, reply: Reply) -> BoxFuture<'_, Result<(), ReplyError>>;

    /// Fetches a file (a path on the instance's machine) through the owning instance actor,
    /// keeping at most `max_bytes`.
    fn download_file(
        &self,
        instance_id: &str,
        file_path: &str,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<Download, DownloadError>> {
        let _ = (instance_id, file_path, max_bytes);
        Box::pin(async { Err(DownloadError::Unsupported) })
    }
}

/// A sink that only logs what it is handed (used when no store is configured, and in tests).
#[derive(Debug, Default)]
pub struct LogSink;

impl MessageSink for LogSink {
    fn accept(&self, messages: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            for message in &messages {
                // Message content is user data: log ids and sizes at info, never the text.
                tracing::info!(
                    instance_id = %message.instance_id,
                    message_id = %message.message_id,
                    chars = message.content.chars().count(),
                    "Message received."
                );
            }
            Ok(())
        })
    }
}
