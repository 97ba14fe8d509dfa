//! The seam between the listener and delivery: `InboundMessage`, `MessageSink` and `ReplySender`.
//!
//! The listener hands every message it takes from an instance to a `MessageSink`; delivery sends
//! replies back through a `ReplySender`. Neither side knows how the other is built.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use chrono::{DateTime, Utc};

use crate::config::SendMode;

/// A boxed, sendable future, for the object-safe traits below.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A chat message taken from a wxauto instance that passed the filters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InboundMessage {
    /// The configured instance id.
    pub instance_id: String,
    /// The chat (`who`) the message belongs to.
    pub chat: String,
    /// The upstream id, or a synthetic one when upstream sent none.
    pub message_id: String,
    /// True when upstream sent no id and the sidecar made `message_id` up.
    pub synthetic_id: bool,
    /// The upstream session the id belongs to: wxauto ids are UI runtime ids, which can come
    /// back after WeChat or the wxauto server restarts, so they are unique per epoch only.
    pub epoch: u32,
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

    /// True when the chat is a group. wxauto names a private chat after the friend as WeChat
    /// shows them, which is the remark when one is set, else the nickname: a chat named after
    /// its sender or the sender's remark is private.
    pub fn is_group(&self) -> bool {
        self.chat != self.sender && Some(self.chat.as_str()) != self.sender_remark.as_deref()
    }

    /// The key every delivery of this message carries (the webhook's `Idempotency-Key`):
    /// `<instance_id>:<message_id>`, with `@<epoch>` appended from the second upstream session
    /// on, so a reused upstream id never shares a key with an older message.
    pub fn idempotency_key(&self) -> String {
        if self.epoch == 0 {
            format!("{}:{}", self.instance_id, self.message_id)
        } else {
            format!("{}:{}@{}", self.instance_id, self.message_id, self.epoch)
        }
    }
}

/// One chat of an instance's chat table, as the store keeps it across restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChat {
    /// The chat name (`who`).
    pub chat: String,
    /// Listened (counts against the cap).
    pub active: bool,
    /// From `fixed_listeners`.
    pub fixed: bool,
    /// Unix milliseconds when the chat was first listened.
    pub added_ms: i64,
    /// Unix milliseconds of its last message, if any.
    pub last_message_ms: Option<i64>,
    /// Messages taken from this chat.
    pub message_count: u64,
    /// Errors recorded for this chat.
    pub error_count: u64,
    /// The newest message id of the chat's history when the sidecar started listening to it
    /// (`Some("")`: the history was empty; `None`: not known).
    pub baseline: Option<String>,
}

/// An upstream session: which epoch an instance's ids belong to, and when the wxauto server
/// behind it started (from `/api/health` `uptime`), to see it restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UpstreamSession {
    /// The epoch of the ids.
    pub epoch: u32,
    /// Unix milliseconds when the server started, when it reports its uptime.
    pub started_ms: Option<i64>,
}

/// What the store already has of one chat, for aligning a re-read of its history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatHistory {
    /// Those of the asked-for upstream ids stored in the current epoch.
    pub known_ids: Vec<String>,
    /// The newest stored messages of the chat (any epoch), oldest first, as (sender, content).
    pub tail: Vec<(String, String)>,
}

/// Why a sink could not take messages. The listener keeps the batch and retries.
#[derive(Debug, thiserror::Error)]
#[error("message sink unavailable: {0}")]
pub struct SinkError(pub String);

/// Where the listener hands messages once they are taken from an instance.
///
/// `accept` must only return `Ok` once the messages are durable (or, for a test's sink,
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

    /// Whether the previous run of the sidecar stopped cleanly (nothing can have been in flight
    /// when it stopped). A sink without a store answers true: there is nothing to recover.
    fn last_stop_clean(&self) -> bool {
        true
    }

    /// The chat table and upstream session a previous run left for an instance.
    fn load_listener(
        &self,
        instance_id: &str,
    ) -> BoxFuture<'_, Result<(Vec<StoredChat>, UpstreamSession), SinkError>> {
        let _ = instance_id;
        Box::pin(async { Ok((Vec::new(), UpstreamSession::default())) })
    }

    /// Replaces an instance's stored chat table.
    fn save_chats(
        &self,
        instance_id: &str,
        chats: Vec<StoredChat>,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        let _ = (instance_id, chats);
        Box::pin(async { Ok(()) })
    }

    /// Stores an instance's upstream session.
    fn save_session(
        &self,
        instance_id: &str,
        session: UpstreamSession,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        let _ = (instance_id, session);
        Box::pin(async { Ok(()) })
    }

    /// What is stored of a chat, to tell which messages of its re-read history are new.
    fn chat_history(
        &self,
        instance_id: &str,
        chat: &str,
        epoch: u32,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<ChatHistory, SinkError>> {
        let _ = (instance_id, chat, epoch, ids);
        Box::pin(async { Ok(ChatHistory::default()) })
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

/// The fate of one reply command, shared by the waiting delivery worker and the instance
/// actor, so that a reply is sent at most once per attempt: either the actor starts sending
/// it, or the worker gives up on it first, never both.
#[derive(Debug, Clone, Default)]
pub struct ReplyTicket(Arc<AtomicU8>);

const TICKET_QUEUED: u8 = 0;
const TICKET_SENDING: u8 = 1;
const TICKET_ABANDONED: u8 = 2;

impl ReplyTicket {
    /// The actor is about to send: true unless the requester gave up.
    pub fn start(&self) -> bool {
        self.0
            .compare_exchange(
                TICKET_QUEUED,
                TICKET_SENDING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// The requester gives up: true if the actor had not started, so it never will; false if
    /// the send is under way and its outcome must be awaited.
    pub fn abandon(&self) -> bool {
        self.0
            .compare_exchange(
                TICKET_QUEUED,
                TICKET_ABANDONED,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }
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
    /// The instance did not take the reply in time; it was not sent and never will be.
    #[error("instance {0} did not take the reply within {1:?}; it was not sent")]
    NotTaken(String, std::time::Duration),
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
    /// Sends one reply; resolves once upstream answered. If the instance has not started
    /// sending it within `wait`, the reply is abandoned (`NotTaken`) and never sent; once it has
    /// started, the outcome is awaited (the actor bounds the call by its request timeout).
    fn send_reply(
        &self,
        reply: Reply,
        wait: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), ReplyError>>;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_named_after_the_sender_or_their_remark_is_private() {
        let check = |chat: &str, sender: &str, remark: Option<&str>, group: bool| {
            let message = InboundMessage {
                chat: chat.to_owned(),
                sender: sender.to_owned(),
                sender_remark: remark.map(str::to_owned),
                ..InboundMessage::default()
            };
            assert_eq!(message.is_group(), group, "{chat} / {sender} / {remark:?}");
        };
        check("alice", "alice", None, false);
        // wxauto names a friend's chat after the remark when one is set.
        check("Bobby", "bob", Some("Bobby"), false);
        check("bob", "bob", Some("Bobby"), false);
        check("team", "bob", Some("Bobby"), true);
        check("team", "bob", None, true);
    }
}
