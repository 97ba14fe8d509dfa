//! `dify`: `POST {api_base}/chat-messages` in blocking mode, with the conversation id kept per
//! (instance, chat, platform) in the store; a 404 for a stale conversation id clears it and
//! retries once without it. Kept media files are uploaded first (`files/upload`) and sent as
//! `files` (images as `image`).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::config::DifyPlatform;
use crate::event::ErrorKind;
use crate::message::InboundMessage;
use crate::secret::Secret;

use super::super::media::{self, Attachment};
use super::{Attempt, PlatformError, join, send, status_error};

#[derive(Debug)]
pub(super) struct Dify {
    url: String,
    upload_url: String,
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
            upload_url: join(
                &crate::secret::split_url_credentials(&config.api_base).0,
                "files/upload",
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
        let mut files = Vec::with_capacity(attempt.attachments.len());
        for attachment in attempt.attachments {
            if let Some(file) = self.upload(msg, attachment).await? {
                files.push(file);
            }
        }
        loop {
            let (status, bytes) = self.post(msg, conversation.as_deref(), &files).await?;
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
        files: &[Value],
    ) -> Result<(StatusCode, Vec<u8>), PlatformError> {
        let text = media::text_of(msg);
        let query = if text.trim().is_empty() { " " } else { text };
        let mut body = json!({
            "inputs": {},
            "query": query,
            "response_mode": "blocking",
            "user": self.user(msg),
        });
        if let Some(conversation) = conversation {
            body["conversation_id"] = json!(conversation);
        }
        if !files.is_empty() {
            body["files"] = json!(files);
        }
        let request = self
            .http
            .post(&self.url)
            .bearer_auth(self.api_key.expose())
            .json(&body);
        send(request, self.timeout).await
    }

    /// Uploads a kept file (`POST files/upload`, multipart `file` and `user`) and returns its
    /// `files` entry. A file Dify refuses for good (e.g. a type or size it does not take) is
    /// left out, so the message still goes through; a rejected key or a retryable failure is
    /// the delivery's error.
    async fn upload(
        &self,
        msg: &InboundMessage,
        attachment: &Attachment,
    ) -> Result<Option<Value>, PlatformError> {
        let Some(data) = attachment.data().await else {
            return Ok(None);
        };
        let boundary = format!(
            "wxauto-sidecar-{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        let body = multipart(&boundary, &self.user(msg), attachment, &data);
        let request = self
            .http
            .post(&self.upload_url)
            .bearer_auth(self.api_key.expose())
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body);
        let (status, bytes) = send(request, self.timeout).await?;
        if !status.is_success() {
            let err = status_error(status, &bytes, &[&self.api_key]);
            if err.permanent && err.kind != ErrorKind::Auth {
                tracing::warn!(instance_id = %msg.instance_id, message_id = %msg.message_id,
                    error = %err.message, "Dify refused the file; sending the message without it.");
                return Ok(None);
            }
            return Err(err);
        }
        let id = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .and_then(|answer| answer.get("id")?.as_str().map(str::to_owned))
            .ok_or_else(|| {
                PlatformError::retry(ErrorKind::Decode, "the Dify upload answer has no id")
            })?;
        Ok(Some(json!({
            "type": dify_type(attachment),
            "transfer_method": "local_file",
            "upload_file_id": id,
        })))
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

/// Dify's file type: `image`, `audio`, `video` or `document`.
fn dify_type(attachment: &Attachment) -> &'static str {
    let content_type = attachment.content_type.as_str();
    if attachment.kind == "image" || content_type.starts_with("image/") {
        "image"
    } else if attachment.kind == "voice" || content_type.starts_with("audio/") {
        "audio"
    } else if attachment.kind == "video" || content_type.starts_with("video/") {
        "video"
    } else {
        "document"
    }
}

/// A `multipart/form-data` body with the `user` field and the `file` part.
fn multipart(boundary: &str, user: &str, attachment: &Attachment, data: &[u8]) -> Vec<u8> {
    // Quotes and line breaks cannot appear inside the quoted header parameters.
    let clean = |text: &str| text.replace(['"', '\r', '\n'], "_");
    let mut body = Vec::with_capacity(data.len() + 512);
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"user\"\r\n\r\n{user}\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\
             Content-Type: {}\r\n\r\n",
            clean(&attachment.name),
            clean(&attachment.content_type),
        )
        .as_bytes(),
    );
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attachment(kind: &'static str, name: &str) -> Attachment {
        Attachment {
            kind,
            name: name.to_owned(),
            content_type: media::content_type(name).to_owned(),
            size: None,
            sha256: None,
            local_path: None,
        }
    }

    #[test]
    fn images_are_images_not_documents() {
        assert_eq!(dify_type(&attachment("image", "a.png")), "image");
        assert_eq!(dify_type(&attachment("image", "a.dat")), "image");
        assert_eq!(dify_type(&attachment("file", "scan.jpg")), "image");
        assert_eq!(dify_type(&attachment("voice", "v.amr")), "audio");
        assert_eq!(dify_type(&attachment("video", "v.mp4")), "video");
        assert_eq!(dify_type(&attachment("file", "r.pdf")), "document");
    }
}
