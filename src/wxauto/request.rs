//! The request machinery of `Client`: the enveloped call, the capped download, the
//! instance's headers and the transport error texts.

use std::time::Instant;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{Client, DOWNLOAD_TIMEOUT, Endpoint, MAX_BODY_BYTES, WxautoError, api_outcome, types};
use crate::message::Download;

impl Client {
    pub(super) async fn download_inner(
        &self,
        file_path: &str,
        max_bytes: u64,
    ) -> Result<Download, WxautoError> {
        let endpoint = Endpoint::FileDownload;
        let label = endpoint.label();
        let url = format!("{}{}", self.base_url, endpoint.path());
        let mut response = self
            .authorized(self.http.post(url))
            .timeout(DOWNLOAD_TIMEOUT)
            .json(&serde_json::json!({ "file_path": file_path }))
            .send()
            .await
            .map_err(|error| self.transport_error(label, &error))?;
        let status = response.status();
        let is_json = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/json"));
        if status.is_success()
            && let Some(size) = response.content_length()
            && size > max_bytes
        {
            return Ok(Download::TooLarge { size: Some(size) });
        }
        // An error envelope is small; a file is capped at `max_bytes`.
        let cap = if status.is_success() {
            usize::try_from(max_bytes).unwrap_or(usize::MAX)
        } else {
            MAX_BODY_BYTES
        };
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > cap {
                        if status.is_success() {
                            return Ok(Download::TooLarge { size: None });
                        }
                        return Err(WxautoError::Decode {
                            endpoint: label,
                            reason: format!("answer larger than {cap} bytes"),
                        });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => return Err(self.transport_error(label, &error)),
            }
        }
        if status.is_success() && !is_json {
            return Ok(Download::Bytes(bytes));
        }
        let envelope = types::parse_envelope(&bytes);
        if status == StatusCode::UNAUTHORIZED {
            let message = envelope
                .map(|envelope| envelope.message)
                .unwrap_or_default();
            return Err(WxautoError::Auth {
                endpoint: label,
                message: self.clean(&message),
            });
        }
        match envelope {
            Ok(envelope) if !status.is_success() => Err(WxautoError::HttpStatus {
                endpoint: label,
                status: status.as_u16(),
                code: Some(envelope.code),
                message: self.clean(&envelope.message),
            }),
            Ok(envelope) if envelope.code != 0 => Err(WxautoError::ApiCode {
                endpoint: label,
                code: envelope.code,
                message: self.clean(&envelope.message),
            }),
            // A JSON file that is not an error envelope is a file like any other.
            _ if status.is_success() => Ok(Download::Bytes(bytes)),
            _ => Err(WxautoError::HttpStatus {
                endpoint: label,
                status: status.as_u16(),
                code: None,
                message: String::new(),
            }),
        }
    }

    pub(super) async fn call<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
    ) -> Result<T, WxautoError> {
        self.call_with(endpoint, body, &[]).await
    }

    pub(super) async fn call_with<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
        query: &[(&str, &str)],
    ) -> Result<T, WxautoError> {
        let started = Instant::now();
        let result = self.call_inner(endpoint, body, query).await;
        self.metrics.observe_api_call(
            &self.instance_id,
            endpoint as usize,
            api_outcome(&result),
            started.elapsed(),
        );
        result
    }

    async fn call_inner<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        body: Option<Value>,
        query: &[(&str, &str)],
    ) -> Result<T, WxautoError> {
        let label = endpoint.label();
        let mut url = format!("{}{}", self.base_url, endpoint.path());
        if !query.is_empty() {
            // Percent-encoded by `Url`; chat names are often Chinese or contain spaces.
            url = reqwest::Url::parse_with_params(&url, query)
                .map_err(|error| WxautoError::Connect {
                    endpoint: label,
                    reason: format!("invalid request URL: {error}"),
                })?
                .to_string();
        }
        let request = match body {
            Some(body) => self.http.post(url).json(&body),
            None => self.http.get(url),
        };
        let mut response = self
            .authorized(request)
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(|error| self.transport_error(label, &error))?;
        let status = response.status();
        let mut bytes = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_BODY_BYTES {
                        return Err(WxautoError::Decode {
                            endpoint: label,
                            reason: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                        });
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) => return Err(self.transport_error(label, &error)),
            }
        }
        let envelope = types::parse_envelope(&bytes);
        if status == StatusCode::UNAUTHORIZED {
            let message = envelope
                .as_ref()
                .map(|envelope| envelope.message.clone())
                .unwrap_or_default();
            return Err(WxautoError::Auth {
                endpoint: label,
                message: self.clean(&message),
            });
        }
        if !status.is_success() {
            let (code, message) = match &envelope {
                Ok(envelope) => (Some(envelope.code), envelope.message.clone()),
                Err(_) => (None, String::new()),
            };
            return Err(WxautoError::HttpStatus {
                endpoint: label,
                status: status.as_u16(),
                code,
                message: self.clean(&message),
            });
        }
        let envelope = envelope.map_err(|reason| WxautoError::Decode {
            endpoint: label,
            reason,
        })?;
        if envelope.code != 0 {
            return Err(WxautoError::ApiCode {
                endpoint: label,
                code: envelope.code,
                message: self.clean(&envelope.message),
            });
        }
        serde_json::from_value(envelope.data).map_err(|error| WxautoError::Decode {
            endpoint: label,
            reason: format!("unexpected data: {error}"),
        })
    }

    /// The instance's headers: `X-API-Key`, and `Authorization` when the URL had credentials.
    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let request = request.header("X-API-Key", self.api_key.expose());
        match &self.authorization {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => request,
        }
    }

    fn transport_error(&self, endpoint: &'static str, error: &reqwest::Error) -> WxautoError {
        if error.is_timeout() {
            return WxautoError::Timeout { endpoint };
        }
        // The reqwest error text includes the URL (never the key, which is a header); strip
        // it anyway so error texts stay short and uniform.
        let mut reason = text_without_url(error);
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason = format!("{reason}: {cause}");
            source = cause.source();
        }
        WxautoError::Connect {
            endpoint,
            reason: self.clean(&reason),
        }
    }

    /// Removes the key if a server echoed it, then shortens the text. Redacting first matters:
    /// a cut through the middle of the key would leave its first characters unmatched.
    pub(super) fn clean(&self, text: &str) -> String {
        self.api_key.redact_in(text).chars().take(200).collect()
    }
}

/// A reqwest error's text without its URL (reqwest's `without_url` takes the error by value).
fn text_without_url(error: &reqwest::Error) -> String {
    let text = error.to_string();
    match error.url() {
        Some(url) => text
            .replace(&format!(" ({url})"), "")
            .replace(url.as_str(), "<url>"),
        None => text,
    }
}
