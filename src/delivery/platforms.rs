//! Platforms: where a message is delivered and where a reply comes from. One file per type
//! under `platforms/`; this file holds the shared error type and the HTTP classification
//! (2xx ok; 408, 429, 5xx and transport failures retried; any other 4xx permanent).

mod coze;
mod dify;
mod keyword;
mod openai;
mod webhook;

use std::time::Duration;

use reqwest::StatusCode;

use crate::config::{PlatformConfig, PlatformKind, SendMode};
use crate::event::ErrorKind;
use crate::message::InboundMessage;
use crate::secret::Secret;

use super::media::Attachment;
use super::store::Store;

/// How much of an upstream body an error text may quote.
const BODY_QUOTE_CHARS: usize = 200;

/// A configured platform, ready to deliver.
#[derive(Debug)]
pub(crate) struct Platform {
    pub id: String,
    pub send_mode: SendMode,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Keyword(keyword::Keyword),
    Webhook(webhook::Webhook),
    OpenAi(openai::OpenAi),
    Dify(dify::Dify),
    Coze(coze::Coze),
}

/// What a delivery attempt needs besides the message.
pub(crate) struct Attempt<'a> {
    /// 1-based attempt number.
    pub number: u32,
    /// The store, for per-chat conversation state.
    pub store: &'a Store,
    /// The platform id (the key of per-chat state).
    pub platform_id: &'a str,
    /// The message's media file, downloaded or not (empty for a text message).
    pub attachments: &'a [Attachment],
}

/// A failed delivery attempt. `message` never contains a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PlatformError {
    pub kind: ErrorKind,
    /// A permanent error dead-letters the message at once; any other is retried.
    pub permanent: bool,
    pub message: String,
}

// === impl Platform ===

impl Platform {
    pub(crate) fn new(config: &PlatformConfig, http: &reqwest::Client) -> Self {
        let timeout = config.timeout;
        let kind = match &config.kind {
            PlatformKind::Keyword(keyword) => Kind::Keyword(keyword::Keyword::new(keyword)),
            PlatformKind::Webhook(webhook) => {
                Kind::Webhook(webhook::Webhook::new(webhook, http.clone(), timeout))
            }
            PlatformKind::OpenAi(openai) => {
                Kind::OpenAi(openai::OpenAi::new(openai, http.clone(), timeout))
            }
            PlatformKind::Dify(dify) => Kind::Dify(dify::Dify::new(dify, http.clone(), timeout)),
            PlatformKind::Coze(coze) => Kind::Coze(coze::Coze::new(coze, http.clone(), timeout)),
        };
        Self {
            id: config.id.clone(),
            send_mode: config.send_mode,
            kind,
        }
    }

    /// Delivers one message; `Ok(Some(text))` is a reply to send back.
    pub(crate) async fn deliver(
        &self,
        msg: &InboundMessage,
        attempt: Attempt<'_>,
    ) -> Result<Option<String>, PlatformError> {
        let reply = match &self.kind {
            Kind::Keyword(keyword) => keyword.deliver(msg),
            Kind::Webhook(webhook) => webhook.deliver(msg, attempt).await?,
            Kind::OpenAi(openai) => openai.deliver(msg, attempt).await?,
            Kind::Dify(dify) => dify.deliver(msg, attempt).await?,
            Kind::Coze(coze) => coze.deliver(msg, attempt).await?,
        };
        Ok(reply.filter(|text| !text.trim().is_empty()))
    }
}

// === impl PlatformError ===

impl PlatformError {
    pub(crate) fn retry(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            permanent: false,
            message: message.into(),
        }
    }

    pub(crate) fn permanent(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            permanent: true,
            message: message.into(),
        }
    }
}

// === shared HTTP handling ===

/// Sends a request and reads the whole answer; transport failures become retryable errors.
async fn send(
    request: reqwest::RequestBuilder,
    timeout: Duration,
) -> Result<(StatusCode, Vec<u8>), PlatformError> {
    let response = request
        .timeout(timeout)
        .send()
        .await
        .map_err(|err| transport_error(&err, timeout))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|err| transport_error(&err, timeout))?;
    Ok((status, body.to_vec()))
}

/// Classifies a non-2xx status: 408, 429 and 5xx are retried, any other 4xx is permanent.
/// 1xx and 3xx (an unfollowed redirect) are retried too: nothing says the message was refused.
fn status_error(status: StatusCode, body: &[u8], secrets: &[&Secret]) -> PlatformError {
    let kind = match status.as_u16() {
        401 | 403 => ErrorKind::Auth,
        _ => ErrorKind::HttpStatus,
    };
    let message = format!("HTTP {}: {}", status.as_u16(), quote(body, secrets));
    let code = status.as_u16();
    if (400..500).contains(&code) && code != 408 && code != 429 {
        PlatformError::permanent(kind, message)
    } else {
        PlatformError::retry(kind, message)
    }
}

fn transport_error(err: &reqwest::Error, timeout: Duration) -> PlatformError {
    if err.is_timeout() {
        PlatformError::retry(
            ErrorKind::Timeout,
            format!("no answer within {}", humantime::format_duration(timeout)),
        )
    } else if err.is_connect() {
        PlatformError::retry(ErrorKind::Connect, "connection failed")
    } else if err.is_decode() || err.is_body() {
        PlatformError::retry(ErrorKind::Decode, "could not read the answer")
    } else {
        // The URL may carry a token; it is left out of the text.
        PlatformError::retry(ErrorKind::Connect, "request failed")
    }
}

/// The first `BODY_QUOTE_CHARS` characters of a body, single-line, with every secret redacted.
fn quote(body: &[u8], secrets: &[&Secret]) -> String {
    let text = String::from_utf8_lossy(body);
    // Redact before truncating, so a secret cut in half by the limit cannot survive.
    let mut text = secrets
        .iter()
        .fold(text.into_owned(), |text, secret| secret.redact_in(&text));
    // Every other registered secret form too (URL credentials, encodings).
    text = crate::secret::redact(&text);
    text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if text.chars().count() > BODY_QUOTE_CHARS {
        let cut: String = text.chars().take(BODY_QUOTE_CHARS).collect();
        format!("{cut}…")
    } else {
        text
    }
}

/// Joins a base URL and a path with exactly one slash.
fn join(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classification() {
        let secret = Secret::new("tok-123456");
        let check = |code: u16, permanent: bool| {
            let err = status_error(StatusCode::from_u16(code).expect("valid"), b"x", &[&secret]);
            assert_eq!(err.permanent, permanent, "{code}");
        };
        check(400, true);
        check(401, true);
        check(404, true);
        check(422, true);
        check(408, false);
        check(429, false);
        check(500, false);
        check(503, false);
        check(302, false);
    }

    #[test]
    fn quote_truncates_and_redacts() {
        let secret = Secret::new("tok-123456");
        let body = format!("bad key tok-123456\n{}", "y".repeat(500));
        let text = quote(body.as_bytes(), &[&secret]);
        assert!(!text.contains("tok-123456"), "{text}");
        assert!(text.starts_with("bad key **** y"), "{text}");
        assert_eq!(text.chars().count(), BODY_QUOTE_CHARS + 1);
    }

    #[test]
    fn join_slashes() {
        assert_eq!(join("http://h/v1/", "/chat"), "http://h/v1/chat");
        assert_eq!(join("http://h/v1", "chat"), "http://h/v1/chat");
    }
}
