//! `WxautoError`, the closed set of call failures, and the `outcome` label of a result.

use crate::event::ErrorKind;
use crate::metrics::ApiOutcome;

/// A failed call, classified into the closed set of error kinds.
///
/// Texts never contain the API key: they are built from status codes and upstream messages,
/// and upstream messages pass through `Secret::redact_in`.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WxautoError {
    /// No answer within `listener.request_timeout`.
    #[error("{endpoint}: timed out")]
    Timeout {
        /// Endpoint label.
        endpoint: &'static str,
    },
    /// Could not connect or the connection broke.
    #[error("{endpoint}: connection failed: {reason}")]
    Connect {
        /// Endpoint label.
        endpoint: &'static str,
        /// What the transport said.
        reason: String,
    },
    /// HTTP 401: the key was rejected.
    #[error("{endpoint}: API key rejected (HTTP 401): {message}")]
    Auth {
        /// Endpoint label.
        endpoint: &'static str,
        /// Upstream message.
        message: String,
    },
    /// A non-success HTTP status other than 401.
    #[error("{endpoint}: HTTP {status}{}: {message}", code_suffix(*code))]
    HttpStatus {
        /// Endpoint label.
        endpoint: &'static str,
        /// The status.
        status: u16,
        /// The envelope code, when the body was an envelope.
        code: Option<i64>,
        /// Upstream message.
        message: String,
    },
    /// HTTP 200 but the envelope's `code` was not 0.
    #[error("{endpoint}: API code {code}: {message}")]
    ApiCode {
        /// Endpoint label.
        endpoint: &'static str,
        /// The envelope code.
        code: i64,
        /// Upstream message.
        message: String,
    },
    /// The answer was not the expected JSON.
    #[error("{endpoint}: malformed answer: {reason}")]
    Decode {
        /// Endpoint label.
        endpoint: &'static str,
        /// What was wrong.
        reason: String,
    },
}

/// The `outcome` label of a call's result.
pub(super) fn api_outcome<T>(result: &Result<T, WxautoError>) -> ApiOutcome {
    match result {
        Ok(_) => ApiOutcome::Success,
        Err(WxautoError::Timeout { .. }) => ApiOutcome::Timeout,
        Err(_) => ApiOutcome::Error,
    }
}

fn code_suffix(code: Option<i64>) -> String {
    code.map(|code| format!(" (code {code})"))
        .unwrap_or_default()
}

impl WxautoError {
    /// The `kind` label of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Timeout { .. } => ErrorKind::Timeout,
            Self::Connect { .. } => ErrorKind::Connect,
            Self::Auth { .. } => ErrorKind::Auth,
            Self::HttpStatus { .. } => ErrorKind::HttpStatus,
            Self::ApiCode { .. } => ErrorKind::ApiCode,
            Self::Decode { .. } => ErrorKind::Decode,
        }
    }

    /// True when the instance as a whole is unusable (as opposed to one request being refused):
    /// no answer, a broken connection, a rejected key, a server error, or "WeChat not initialised".
    pub fn is_instance_failure(&self) -> bool {
        match self {
            Self::Timeout { .. } | Self::Connect { .. } | Self::Auth { .. } => true,
            Self::HttpStatus { status, code, .. } => *status >= 500 || *code == Some(2001),
            Self::ApiCode { code, .. } => *code == 2001,
            Self::Decode { .. } => false,
        }
    }

    /// For a call about one chat (`listen/add`, `listen/remove`, a send, the chat's history):
    /// true only when the instance itself failed. An answer in the server's envelope with a
    /// code of its own (1001, 1002, 3001-3003) is about that chat, even with HTTP 500: the
    /// server answers a `listen/add` it cannot carry out (a chat this account does not have)
    /// with HTTP 500 and code 3001. Such a refusal must not stop the polls of every other
    /// chat. 2001 (WeChat not initialised) and 5000 (the server's uncaught exception) are
    /// about the instance, as is a 5xx without the envelope.
    pub fn is_instance_failure_for_chat(&self) -> bool {
        match self {
            Self::HttpStatus {
                code: Some(code), ..
            } => *code == 2001 || *code == 5000,
            _ => self.is_instance_failure(),
        }
    }

    /// True for the error that means "this chat is not listened" (send to an unknown chat).
    pub fn is_not_listened(&self) -> bool {
        matches!(
            self,
            Self::HttpStatus {
                status: 404,
                code: Some(3001),
                ..
            }
        )
    }

    /// True when the server has no such endpoint (an older server generation): a 404 that is
    /// not the "chat not listened" answer.
    pub fn is_missing_endpoint(&self) -> bool {
        matches!(self, Self::HttpStatus { status: 404, .. }) && !self.is_not_listened()
    }
}
