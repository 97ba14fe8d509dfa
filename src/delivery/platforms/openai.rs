//! `openai`: any OpenAI-compatible `POST {api_base}/chat/completions`, with an optional system
//! prompt and the last `history` exchanges of the chat (kept in the store) as prior messages.
//! Images go as `image_url` parts (data URIs) when the platform sets `vision`; any other
//! attachment is a short placeholder in the text.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::OpenAiPlatform;
use crate::event::ErrorKind;
use crate::message::InboundMessage;
use crate::secret::Secret;

use super::super::media::{self, Attachment};
use super::{Attempt, PlatformError, join, send, status_error};

#[derive(Debug)]
pub(super) struct OpenAi {
    url: String,
    api_key: Secret,
    model: String,
    system_prompt: Option<String>,
    temperature: Option<f64>,
    max_tokens: Option<u32>,
    history: usize,
    vision: bool,
    http: reqwest::Client,
    timeout: Duration,
}

// === impl OpenAi ===

impl OpenAi {
    pub(super) fn new(config: &OpenAiPlatform, http: reqwest::Client, timeout: Duration) -> Self {
        Self {
            // URL credentials are never sent: the key goes as `Authorization: Bearer`.
            url: join(
                &crate::secret::split_url_credentials(&config.api_base).0,
                "chat/completions",
            ),
            api_key: config.api_key.clone(),
            model: config.model.clone(),
            system_prompt: config.system_prompt.clone(),
            temperature: config.temperature,
            max_tokens: config.max_tokens,
            history: config.history,
            vision: config.vision,
            http,
            timeout,
        }
    }

    pub(super) async fn deliver(
        &self,
        msg: &InboundMessage,
        attempt: Attempt<'_>,
    ) -> Result<Option<String>, PlatformError> {
        let history = if self.history > 0 {
            attempt
                .store
                .history(
                    msg.instance_id.clone(),
                    msg.chat.clone(),
                    attempt.platform_id.to_owned(),
                    self.history,
                )
                .await
                .map_err(|err| PlatformError::retry(ErrorKind::Storage, err.to_string()))?
        } else {
            Vec::new()
        };
        let mut messages = Vec::with_capacity(2 + 2 * history.len());
        if let Some(prompt) = self.system_prompt.as_deref().filter(|p| !p.is_empty()) {
            messages.push(json!({"role": "system", "content": prompt}));
        }
        for (user, assistant) in &history {
            messages.push(json!({"role": "user", "content": user}));
            messages.push(json!({"role": "assistant", "content": assistant}));
        }
        let (text, content) = self.user_content(msg, attempt.attachments).await;
        messages.push(json!({"role": "user", "content": content}));
        let mut body = json!({"model": self.model, "messages": messages});
        if let Some(temperature) = self.temperature {
            body["temperature"] = json!(temperature);
        }
        if let Some(max_tokens) = self.max_tokens {
            body["max_tokens"] = json!(max_tokens);
        }

        let request = self
            .http
            .post(&self.url)
            .bearer_auth(self.api_key.expose())
            .json(&body);
        let (status, bytes) = send(request, self.timeout).await?;
        if !status.is_success() {
            return Err(status_error(status, &bytes, &[&self.api_key]));
        }
        let answer: Value = serde_json::from_slice(&bytes)
            .map_err(|_| PlatformError::retry(ErrorKind::Decode, "the completion is not JSON"))?;
        let Some(choice) = answer.get("choices").and_then(|c| c.get(0)) else {
            return Err(PlatformError::retry(
                ErrorKind::Decode,
                "the completion has no choices",
            ));
        };
        let reply = choice
            .pointer("/message/content")
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .map(str::to_owned);
        if let (Some(reply), true) = (&reply, self.history > 0) {
            attempt
                .store
                .push_history(
                    msg.instance_id.clone(),
                    msg.chat.clone(),
                    attempt.platform_id.to_owned(),
                    (text, reply.clone()),
                    self.history,
                )
                .await
                .map_err(|err| PlatformError::retry(ErrorKind::Storage, err.to_string()))?;
        }
        Ok(reply)
    }

    /// The user turn: the text, with each attachment as a placeholder naming it, or, for an
    /// image on a `vision` platform, as an `image_url` part carrying a data URI. Returns the
    /// text for the history, where every attachment is its placeholder (history is text).
    async fn user_content(
        &self,
        msg: &InboundMessage,
        attachments: &[Attachment],
    ) -> (String, Value) {
        let mut text = media::text_of(msg).trim().to_owned();
        let mut history = text.clone();
        let mut images = Vec::new();
        for attachment in attachments {
            if !history.is_empty() {
                history.push('\n');
            }
            history.push_str(&attachment.placeholder());
            let inline = if self.vision && attachment.kind == "image" {
                attachment.data().await
            } else {
                None
            };
            match inline {
                Some(bytes) => images.push(json!({
                    "type": "image_url",
                    "image_url": {"url": format!(
                        "data:{};base64,{}",
                        attachment.content_type,
                        media::base64(&bytes)
                    )},
                })),
                None => {
                    if !text.is_empty() {
                        text.push('\n');
                    }
                    text.push_str(&attachment.placeholder());
                }
            }
        }
        if images.is_empty() {
            return (history, json!(text));
        }
        let mut parts = Vec::with_capacity(images.len() + 1);
        if !text.is_empty() {
            parts.push(json!({"type": "text", "text": text}));
        }
        parts.extend(images);
        (history, Value::Array(parts))
    }
}
