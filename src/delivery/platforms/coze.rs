//! `coze`: `POST {api_base}/v3/chat` (non-streaming), then poll `GET /v3/chat/retrieve` with a
//! growing delay until the chat is `completed`, then read `GET /v3/chat/message/list` and reply
//! with the first assistant `answer`. With `continuous_conversation`, the conversation id is kept
//! per (instance, chat, sender, platform) in the store.
//!
//! Polling has no count limit of its own: the worker's `delivery.attempt_timeout` cuts a chat
//! that never completes, and the attempt is retried like any timeout.

use std::time::Duration;

use reqwest::{StatusCode, Url};
use serde_json::{Value, json};

use crate::config::CozePlatform;
use crate::event::ErrorKind;
use crate::message::InboundMessage;
use crate::secret::Secret;

use super::super::store::{SenderKey, StoreError};
use super::{Attempt, PlatformError, join, quote, send, status_error};

/// The user id sent when the sender is unknown.
const DEFAULT_USER_ID: &str = "wxauto-sidecar";

/// Coze codes (in a 2xx envelope) that mean the token is invalid or lacks permission.
const AUTH_CODES: [i64; 2] = [4100, 4101];

#[derive(Debug)]
pub(super) struct Coze {
    api_base: String,
    api_key: Secret,
    bot_id: String,
    continuous: bool,
    http: reqwest::Client,
    timeout: Duration,
    poll: PollSchedule,
}

/// The delay before each status poll: `first`, growing by half each time, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PollSchedule {
    pub first: Duration,
    pub max: Duration,
}

/// A failed call, and whether Coze refused the request itself (a business code, 400 or 404)
/// rather than failing to answer it (transport, timeout, server error, auth).
#[derive(Debug)]
struct Failure {
    error: PlatformError,
    refused: bool,
}

impl Failure {
    fn other(error: PlatformError) -> Self {
        Self {
            error,
            refused: false,
        }
    }
}

/// What `/v3/chat` and `/v3/chat/retrieve` say about a chat.
#[derive(Debug)]
struct ChatState {
    chat_id: String,
    conversation_id: String,
    status: String,
    data: Value,
}

// === impl PollSchedule ===

impl PollSchedule {
    /// 1 s, 1.5 s, 2.25 s, 3.375 s, then 5 s.
    pub(super) const DEFAULT: Self = Self {
        first: Duration::from_secs(1),
        max: Duration::from_secs(5),
    };

    /// The delay before poll `n` (0-based).
    pub(super) fn delay(self, n: u32) -> Duration {
        let mut delay = self.first.min(self.max);
        for _ in 0..n {
            if delay >= self.max {
                break;
            }
            delay = (delay + delay / 2).min(self.max);
        }
        delay
    }
}

// === impl Coze ===

impl Coze {
    pub(super) fn new(config: &CozePlatform, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            // URL credentials are never sent: the key goes as `Authorization: Bearer`.
            api_base: crate::secret::split_url_credentials(&config.api_base).0,
            api_key: config.api_key.clone(),
            bot_id: config.bot_id.clone(),
            continuous: config.continuous_conversation,
            http,
            timeout,
            poll: PollSchedule::DEFAULT,
        }
    }

    /// The same platform with another poll schedule (tests use milliseconds).
    #[cfg(test)]
    pub(super) fn with_poll(mut self, poll: PollSchedule) -> Self {
        self.poll = poll;
        self
    }

    pub(super) async fn deliver(
        &self,
        msg: &InboundMessage,
        attempt: Attempt<'_>,
    ) -> Result<Option<String>, PlatformError> {
        let key = SenderKey {
            instance_id: msg.instance_id.clone(),
            chat: msg.chat.clone(),
            sender: msg.sender.clone(),
            platform_id: attempt.platform_id.to_owned(),
        };
        let stored = if self.continuous {
            attempt
                .store
                .sender_conversation(key.clone())
                .await
                .map_err(storage)?
        } else {
            None
        };
        let chat = match self.create(msg, stored.as_deref()).await {
            Ok(chat) => chat,
            Err(err) => {
                // A conversation Coze no longer accepts would fail every later message of
                // this sender; forget it so that the retry starts a new one.
                if stored.is_some() && err.refused {
                    tracing::info!(instance_id = %msg.instance_id, platform = %key.platform_id,
                        "Coze refused the chat in a stored conversation; starting a new one next time.");
                    attempt
                        .store
                        .set_sender_conversation(key, None)
                        .await
                        .map_err(storage)?;
                }
                return Err(err.error);
            }
        };
        // Kept before polling, so that a retry after a timeout stays in the same conversation.
        if self.continuous
            && !chat.conversation_id.is_empty()
            && stored.as_deref() != Some(chat.conversation_id.as_str())
        {
            attempt
                .store
                .set_sender_conversation(key, Some(chat.conversation_id.clone()))
                .await
                .map_err(storage)?;
        }
        let chat = self.wait(chat).await?;
        self.answer(&chat).await
    }

    /// `POST /v3/chat`.
    async fn create(
        &self,
        msg: &InboundMessage,
        conversation: Option<&str>,
    ) -> Result<ChatState, Failure> {
        let content = if msg.content.is_empty() {
            " "
        } else {
            msg.content.as_str()
        };
        let mut body = json!({
            "bot_id": self.bot_id,
            "user_id": user_id(msg),
            "stream": false,
            "auto_save_history": true,
            "additional_messages": [
                {"role": "user", "content": content, "content_type": "text"}
            ],
        });
        let mut query = Vec::new();
        if let Some(conversation) = conversation {
            // The API reads it from the query string; the body copy is harmless.
            query.push(("conversation_id", conversation));
            body["conversation_id"] = json!(conversation);
        }
        let url = self.url("v3/chat", &query).map_err(Failure::other)?;
        let request = self
            .http
            .post(url)
            .bearer_auth(self.api_key.expose())
            .json(&body);
        let data = self.call(request).await?;
        chat_state(data).map_err(Failure::other)
    }

    /// Polls `GET /v3/chat/retrieve` until the chat is over.
    async fn wait(&self, mut chat: ChatState) -> Result<ChatState, PlatformError> {
        let mut n = 0;
        loop {
            match chat.status.as_str() {
                "completed" => return Ok(chat),
                "failed" => {
                    let reason = chat
                        .data
                        .pointer("/last_error/msg")
                        .and_then(Value::as_str)
                        .filter(|text| !text.is_empty())
                        .unwrap_or("no reason given");
                    let reason = quote(reason.as_bytes(), &[&self.api_key]);
                    return Err(PlatformError::retry(
                        ErrorKind::ApiCode,
                        format!("the Coze chat failed: {reason}"),
                    ));
                }
                "requires_action" => {
                    return Err(PlatformError::permanent(
                        ErrorKind::ApiCode,
                        "the Coze bot asked for a client-side tool call, which the sidecar \
                         cannot answer",
                    ));
                }
                "canceled" => {
                    return Err(PlatformError::retry(
                        ErrorKind::ApiCode,
                        "the Coze chat was canceled",
                    ));
                }
                // `created`, `in_progress` and anything new: keep waiting.
                _ => {}
            }
            tokio::time::sleep(self.poll.delay(n)).await;
            n = n.saturating_add(1);
            let url = self.url(
                "v3/chat/retrieve",
                &[
                    ("conversation_id", chat.conversation_id.as_str()),
                    ("chat_id", chat.chat_id.as_str()),
                ],
            )?;
            let request = self.http.get(url).bearer_auth(self.api_key.expose());
            let data = self.call(request).await.map_err(|f| f.error)?;
            let next = chat_state(data)?;
            chat.status = next.status;
            chat.data = next.data;
        }
    }

    /// `GET /v3/chat/message/list`: the first assistant answer.
    async fn answer(&self, chat: &ChatState) -> Result<Option<String>, PlatformError> {
        let url = self.url(
            "v3/chat/message/list",
            &[
                ("conversation_id", chat.conversation_id.as_str()),
                ("chat_id", chat.chat_id.as_str()),
            ],
        )?;
        let request = self.http.get(url).bearer_auth(self.api_key.expose());
        let data = self.call(request).await.map_err(|f| f.error)?;
        // `data` is the list; tolerate `{messages: [...]}` too.
        let messages = data
            .as_array()
            .or_else(|| data.get("messages").and_then(Value::as_array))
            .ok_or_else(|| {
                PlatformError::retry(ErrorKind::Decode, "the Coze message list has no messages")
            })?;
        Ok(messages
            .iter()
            .find(|m| {
                m.get("role").and_then(Value::as_str) == Some("assistant")
                    && m.get("type").and_then(Value::as_str) == Some("answer")
            })
            .and_then(|m| m.get("content").and_then(Value::as_str))
            .map(str::to_owned))
    }

    /// Sends one request and unwraps Coze's `{code, msg, data}` envelope.
    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let (status, bytes) = send(request, self.timeout).await.map_err(Failure::other)?;
        if !status.is_success() {
            let refused = matches!(status, StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND);
            return Err(Failure {
                error: status_error(status, &bytes, &[&self.api_key]),
                refused,
            });
        }
        let mut answer: Value = serde_json::from_slice(&bytes).map_err(|_| {
            Failure::other(PlatformError::retry(
                ErrorKind::Decode,
                "the Coze answer is not JSON",
            ))
        })?;
        let code = answer.get("code").and_then(Value::as_i64).unwrap_or(0);
        if code != 0 {
            let text = answer
                .get("msg")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let message = format!(
                "Coze code {code}: {}",
                quote(text.as_bytes(), &[&self.api_key])
            );
            return Err(if AUTH_CODES.contains(&code) {
                Failure::other(PlatformError::permanent(ErrorKind::Auth, message))
            } else {
                Failure {
                    error: PlatformError::retry(ErrorKind::ApiCode, message),
                    refused: true,
                }
            });
        }
        Ok(answer
            .get_mut("data")
            .map(Value::take)
            .unwrap_or(Value::Null))
    }

    fn url(&self, path: &str, query: &[(&str, &str)]) -> Result<Url, PlatformError> {
        let mut url = Url::parse(&join(&self.api_base, path)).map_err(|_| {
            PlatformError::permanent(ErrorKind::HttpStatus, "the Coze api_base is not a URL")
        })?;
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }
}

/// The sender as Coze's `user_id` (remark first), or a fixed id when unknown.
fn user_id(msg: &InboundMessage) -> String {
    let sender = msg.sender_display();
    if sender.is_empty() {
        DEFAULT_USER_ID.to_owned()
    } else {
        sender.to_owned()
    }
}

/// Reads the chat object of `/v3/chat` and `/v3/chat/retrieve`.
fn chat_state(data: Value) -> Result<ChatState, PlatformError> {
    let text = |name: &str| {
        data.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (chat_id, conversation_id, status) = (text("id"), text("conversation_id"), text("status"));
    if chat_id.is_empty() || conversation_id.is_empty() {
        return Err(PlatformError::retry(
            ErrorKind::Decode,
            "the Coze answer has no chat or conversation id",
        ));
    }
    Ok(ChatState {
        chat_id,
        conversation_id,
        status,
        data,
    })
}

fn storage(err: StoreError) -> PlatformError {
    PlatformError::retry(ErrorKind::Storage, err.to_string())
}

#[cfg(test)]
mod tests;
