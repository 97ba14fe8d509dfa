//! `webhook`: POST the message as JSON, exactly docs/reference.md ("The webhook request"), with an `Idempotency-Key` of
//! `<instance_id>:<message_id>` that is the same on every attempt. A media message adds
//! `attachments` (the file inline as base64 when it was downloaded).

use std::time::Duration;

use chrono::SecondsFormat;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};

use crate::config::WebhookPlatform;
use crate::event::ErrorKind;
use crate::message::InboundMessage;
use crate::secret::Secret;

use super::super::media::{self, Attachment};
use super::{Attempt, PlatformError, send, status_error};

/// The idempotency header.
const IDEMPOTENCY_KEY: &str = "idempotency-key";

#[derive(Debug)]
pub(super) struct Webhook {
    url: String,
    /// The configured headers, or why they cannot be sent (a bad name or value).
    headers: Result<HeaderMap, String>,
    /// The header values, to redact from quoted bodies.
    secrets: Vec<Secret>,
    http: reqwest::Client,
    timeout: Duration,
}

// === impl Webhook ===

impl Webhook {
    pub(super) fn new(config: &WebhookPlatform, http: reqwest::Client, timeout: Duration) -> Self {
        let mut secrets: Vec<Secret> = config
            .headers
            .iter()
            .map(|(_, value)| value.clone())
            .collect();
        // `user:password@` in the URL becomes basic auth, unless an Authorization header is
        // configured (then it is dropped): exactly one Authorization header is ever sent.
        let (url, credentials) = crate::secret::split_url_credentials(&config.url);
        let mut headers = header_map(&config.headers);
        if let (Ok(map), Some(credentials)) = (&mut headers, credentials)
            && !map.contains_key(AUTHORIZATION)
        {
            match HeaderValue::from_str(credentials.header_value().expose()) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    map.insert(AUTHORIZATION, value);
                    secrets.push(credentials.header_value().clone());
                }
                Err(_) => {
                    headers = Err("the URL credentials are not a valid header value".to_owned());
                }
            }
        }
        Self {
            url,
            headers,
            secrets,
            http,
            timeout,
        }
    }

    pub(super) async fn deliver(
        &self,
        msg: &InboundMessage,
        attempt: Attempt<'_>,
    ) -> Result<Option<String>, PlatformError> {
        let mut headers = self
            .headers
            .clone()
            .map_err(|err| PlatformError::permanent(ErrorKind::HttpStatus, err))?;
        // Ours win over configured headers of the same name.
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let key = msg.idempotency_key();
        let key = HeaderValue::from_str(&key).map_err(|_| {
            PlatformError::permanent(
                ErrorKind::HttpStatus,
                "the idempotency key is not a valid header value",
            )
        })?;
        headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY), key);
        let mut body = body(msg, attempt.number);
        if !attempt.attachments.is_empty() {
            body["attachments"] = attachments(attempt.attachments).await;
        }
        let (status, bytes) = send(
            self.http.post(&self.url).headers(headers).json(&body),
            self.timeout,
        )
        .await?;
        if !status.is_success() {
            let secrets: Vec<&Secret> = self.secrets.iter().collect();
            return Err(status_error(status, &bytes, &secrets));
        }
        if status == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        // A 2xx means the receiver has the message: an answer we cannot read is "no reply",
        // never a retry (which would deliver it again).
        let reply = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|value| value.get("reply")?.as_str().map(str::to_owned));
        Ok(reply)
    }
}

/// The documented body (docs/reference.md, "The webhook request").
fn body(msg: &InboundMessage, attempt: u32) -> serde_json::Value {
    serde_json::json!({
        "instance_id": msg.instance_id,
        "chat": msg.chat,
        "sender": msg.sender,
        "content": msg.content,
        "message_id": msg.message_id,
        "epoch": msg.epoch,
        "mtype": msg.mtype,
        "received_at": msg.received_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        "attempt": attempt,
    })
}

/// The `attachments` list: metadata always, the bytes inline when the file was kept.
async fn attachments(attachments: &[Attachment]) -> serde_json::Value {
    let mut list = Vec::with_capacity(attachments.len());
    for attachment in attachments {
        let data = attachment.data().await;
        list.push(serde_json::json!({
            "kind": attachment.kind,
            "name": attachment.name,
            "content_type": attachment.content_type,
            "size": attachment.size,
            "sha256": data.as_ref().and(attachment.sha256.as_ref()),
            "data_base64": data.as_deref().map(media::base64),
        }));
    }
    serde_json::Value::Array(list)
}

fn header_map(headers: &[(String, Secret)]) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let mut value = HeaderValue::from_str(value.expose())
            .map_err(|_| format!("invalid value for header {name:?}"))?;
        value.set_sensitive(true);
        map.insert(header, value);
    }
    Ok(map)
}
