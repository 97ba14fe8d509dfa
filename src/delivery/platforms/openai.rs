//! `openai`: any OpenAI-compatible `POST {api_base}/chat/completions`, with an optional system
//! prompt and the last `history` exchanges of the chat (kept in the store) as prior messages.

use std::time::Duration;

use serde_json::{Value, json};

use crate::config::OpenAiPlatform;
use crate::message::InboundMessage;
use crate::monitor::ErrorKind;
use crate::secret::Secret;

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
        messages.push(json!({"role": "user", "content": msg.content}));
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
                    (msg.content.clone(), reply.clone()),
                    self.history,
                )
                .await
                .map_err(|err| PlatformError::retry(ErrorKind::Storage, err.to_string()))?;
        }
        Ok(reply)
    }
}
