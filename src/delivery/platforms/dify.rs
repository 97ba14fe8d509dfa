//! `dify`: `POST {api_base}/chat-messages` in blocking mode, with the conversation id kept per
//! (instance, chat, platform) in the store; a 404 for a stale conversation id clears it and
//! retries once without it.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::config::DifyPlatform;
use crate::message::InboundMessage;
use crate::monitor::ErrorKind;
use crate::secret::Secret;

use super::{Attempt, PlatformError, join, send, status_error};

#[derive(Debug)]
pub(super) struct Dify {
    url: String,
    api_key: Secret,
    user_id: String,
    http: reqwest::Client,
    timeout: Duration,
}

// === impl Dify ===

impl Dify {
    pub(super) fn new(config: &DifyPlatform, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            // URL credentials are never sent: the key goes as `Authorization: Bearer`.
            url: join(
                &crate::secret::split_url_credentials(&config.api_base).0,
                "chat-messages",
            ),
            api_key: config.api_key.clone(),
            user_id: config.user_id.clone(),
            http,
            timeout,
        }
    }

    pub(super) async fn deliver(
        &self,
        msg: &InboundMessage,
        attempt: Attempt<'_>,
    ) -> Result<Option<String>, PlatformError> {
        let storage = |err: super::super::store::StoreError| {
            PlatformError::retry(ErrorKind::Storage, err.to_string())
        };
        let key = (
            msg.instance_id.clone(),
            msg.chat.clone(),
            attempt.platform_id.to_owned(),
        );
        let mut conversation = attempt
            .store
            .conversation(key.0.clone(), key.1.clone(), key.2.clone())
            .await
            .map_err(storage)?;
        loop {
            let (status, bytes) = self.post(msg, conversation.as_deref()).await?;
            if status == StatusCode::NOT_FOUND && conversation.is_some() {
                tracing::info!(instance_id = %msg.instance_id, platform = %key.2,
                    "Dify conversation not found; starting a new one.");
                attempt
                    .store
                    .set_conversation(key.0.clone(), key.1.clone(), key.2.clone(), None)
                    .await
                    .map_err(storage)?;
                conversation = None;
                continue;
            }
            if !status.is_success() {
                return Err(status_error(status, &bytes, &[&self.api_key]));
            }
            let answer: Value = serde_json::from_slice(&bytes).map_err(|_| {
                PlatformError::retry(ErrorKind::Decode, "the Dify answer is not JSON")
            })?;
            let new_conversation = answer
                .get("conversation_id")
                .and_then(Value::as_str)
                .filter(|id| !id.is_empty());
            if let Some(id) = new_conversation
                && conversation.as_deref() != Some(id)
            {
                attempt
                    .store
                    .set_conversation(key.0, key.1, key.2, Some(id.to_owned()))
                    .await
                    .map_err(storage)?;
            }
            return Ok(answer
                .get("answer")
                .and_then(Value::as_str)
                .map(str::to_owned));
        }
    }

    async fn post(
        &self,
        msg: &InboundMessage,
        conversation: Option<&str>,
    ) -> Result<(StatusCode, Vec<u8>), PlatformError> {
        let query = if msg.content.is_empty() {
            " "
        } else {
            msg.content.as_str()
        };
        let mut body = json!({
            "inputs": {},
            "query": query,
            "response_mode": "blocking",
            "user": self.user(msg),
        });
        if let Some(conversation) = conversation {
            body["conversation_id"] = json!(conversation);
        }
        let request = self
            .http
            .post(&self.url)
            .bearer_auth(self.api_key.expose())
            .json(&body);
        send(request, self.timeout).await
    }

    /// `"{chat}=={sender}"` in groups, else the sender; the configured `user_id` when the
    /// sender is unknown.
    fn user(&self, msg: &InboundMessage) -> String {
        let sender = msg.sender_display();
        if sender.is_empty() {
            self.user_id.clone()
        } else if msg.is_group() {
            format!("{}=={sender}", msg.chat)
        } else {
            sender.to_owned()
        }
    }
}
