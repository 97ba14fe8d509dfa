//! Reading the web config: the file and every file it names (hashed together, so a change to
//! any of them is seen), the YAML shape, and the checks that turn it into a `WebConfig`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::{HeaderName, HeaderValue};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::tls::tls_config;
use super::{ALLOWED_HEADERS, WebConfig, WebConfigError};

/// bcrypt's own lower bound.
const MIN_BCRYPT_COST: u32 = 4;
/// The highest cost accepted. A check doubles per step: measured on one core of the test
/// machine, 60 ms at 10, 1 s at 14, so about 4 s at 16, within Prometheus's default 10 s
/// scrape timeout for the first scrape (later ones hit the cache); `htpasswd -B` stops at 17.
const MAX_BCRYPT_COST: u32 = 16;

pub(super) type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) tls_server_config: Option<Spanned<RawTls>>,
    pub(super) http_server_config: Option<RawHttp>,
    pub(super) basic_auth_users: Option<BTreeMap<String, Text>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert_file: Option<Text>,
    pub(super) key_file: Option<Text>,
    pub(super) client_auth_type: Option<Text>,
    pub(super) client_ca_file: Option<Text>,
    pub(super) min_version: Option<Text>,
    pub(super) max_version: Option<Text>,
    pub(super) cipher_suites: Option<Vec<Text>>,
    /// Accepted for compatibility; rustls always prefers the server's order.
    pub(super) prefer_server_cipher_suites: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    pub(super) headers: Option<BTreeMap<String, Text>>,
    /// Accepted for compatibility; this server speaks HTTP/1.1 only.
    http2: Option<bool>,
}

/// A validated web config.
/// The contents of the web config and of every file it names, with their combined hash.
pub(super) struct Files {
    pub(super) text: String,
    /// Referenced file path → bytes.
    pub(super) referenced: HashMap<PathBuf, Vec<u8>>,
}

#[allow(
    clippy::disallowed_methods,
    reason = "small files, re-read at most once a second (`WebConfigHandle::current`)"
)]
fn read(path: &Path) -> Result<Vec<u8>, WebConfigError> {
    std::fs::read(path).map_err(|source| WebConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse(path: &Path, text: &str) -> Result<RawFile, WebConfigError> {
    if text.trim().is_empty() {
        return Ok(RawFile::default());
    }
    // The config's parser options (depth limit, no snippets, strict booleans), but a repeated
    // key is an error: serde would otherwise keep one of them silently.
    let mut options = crate::config::yaml_options();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    serde_saphyr::from_str_with_options(text, options).map_err(|error| {
        let (line, column, message) = crate::config::yaml_error_parts(&error);
        WebConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: format!("invalid YAML: {message}"),
        }
    })
}

/// Checks a web config file as `check-config` does. With `read_files` false (`check-config
/// --no-secrets`) the certificate, key and CA files it names are not read (a private key is a
/// secret; in CI none of them may exist): only that they are named where required.
pub fn check_file(path: &Path, read_files: bool) -> Result<(), WebConfigError> {
    if read_files {
        let (_, files) = self::read_files(path)?;
        return build(path, &files).map(drop);
    }
    let text = read_text(path)?;
    let raw = parse(path, &text)?;
    build_raw(path, raw, None).map(drop)
}

fn read_text(path: &Path) -> Result<String, WebConfigError> {
    let bytes = read(path)?;
    String::from_utf8(bytes).map_err(|error| {
        let (line, column, offset) = crate::config::utf8_error_position(&error);
        WebConfigError::Parse {
            path: path.to_owned(),
            line,
            column,
            message: format!("the file is not valid UTF-8 (invalid byte at offset {offset})"),
        }
    })
}

#[allow(
    clippy::disallowed_methods,
    reason = "small files, re-read at most once a second (`WebConfigHandle::current`)"
)]
pub(super) fn read_files(path: &Path) -> Result<(u64, Files), WebConfigError> {
    let text = read_text(path)?;
    let raw = parse(path, &text)?;
    let mut referenced = HashMap::new();
    let mut parts: Vec<Vec<u8>> = vec![text.clone().into_bytes()];
    if let Some(tls) = &raw.tls_server_config {
        let tls = &tls.value;
        for (key, file) in [
            ("cert_file", &tls.cert_file),
            ("key_file", &tls.key_file),
            ("client_ca_file", &tls.client_ca_file),
        ] {
            let Some(file) = file else { continue };
            let resolved = resolve(path, &file.value);
            // Named by the key that names it, where it is written.
            let bytes = std::fs::read(&resolved).map_err(|error| WebConfigError::Invalid {
                path: path.to_owned(),
                line: file.referenced.line(),
                column: file.referenced.column(),
                key: format!("tls_server_config.{key}"),
                message: format!("cannot read {}: {error}", resolved.display()),
            })?;
            parts.push(bytes.clone());
            referenced.insert(resolved, bytes);
        }
    }
    let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok((crate::config::fnv1a64(&slices), Files { text, referenced }))
}

pub(super) fn resolve(config: &Path, file: &str) -> PathBuf {
    let file = Path::new(file);
    if file.is_absolute() {
        return file.to_owned();
    }
    config
        .parent()
        .map_or_else(|| file.to_owned(), |dir| dir.join(file))
}

pub(super) fn build(path: &Path, files: &Files) -> Result<WebConfig, WebConfigError> {
    let raw = parse(path, &files.text)?;
    build_raw(path, raw, Some(files))
}

/// An "invalid value" error at `at`.
pub(super) type Invalid<'a> = dyn Fn(&str, Location, String) -> WebConfigError + 'a;

/// Validates a parsed file. Without `files` (nothing read), TLS is checked but not built and
/// the result has no `tls`.
fn build_raw(
    path: &Path,
    raw: RawFile,
    files: Option<&Files>,
) -> Result<WebConfig, WebConfigError> {
    let invalid = |key: &str, at: Location, message: String| WebConfigError::Invalid {
        path: path.to_owned(),
        line: at.line(),
        column: at.column(),
        key: key.to_owned(),
        message,
    };
    let mut users = HashMap::new();
    for (user, hash) in raw.basic_auth_users.unwrap_or_default() {
        let key = format!("basic_auth_users.{user}");
        let (at, hash) = (hash.referenced, hash.value);
        if user.contains(':') {
            return Err(invalid(
                &key,
                at,
                "a user name cannot contain ':'".to_owned(),
            ));
        }
        // Parsed, not verified: a verification costs what a login costs, at every load.
        let parts =
            (hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
                .then(|| hash.parse::<bcrypt::HashParts>().ok())
                .flatten();
        let Some(parts) = parts else {
            return Err(invalid(&key, at, "not a bcrypt hash".to_owned()));
        };
        let cost = parts.get_cost();
        if !(MIN_BCRYPT_COST..=MAX_BCRYPT_COST).contains(&cost) {
            return Err(invalid(
                &key,
                at,
                format!(
                    "bcrypt cost {cost} is outside {MIN_BCRYPT_COST}..={MAX_BCRYPT_COST}: each \
                     check of a new password costs 2^cost rounds (about 60 ms at 10, 4 s at 16 \
                     on one core), so a higher cost makes the first scrape time out; \
                     `htpasswd -nBC 10 USER` makes a cost-10 hash"
                ),
            ));
        }
        users.insert(user, hash);
    }
    let mut headers = Vec::new();
    if let Some(http) = raw.http_server_config {
        let _ = http.http2;
        for (name, value) in http.headers.unwrap_or_default() {
            let key = format!("http_server_config.headers.{name}");
            let (at, value) = (value.referenced, value.value);
            let Some(allowed) = ALLOWED_HEADERS
                .iter()
                .find(|allowed| allowed.eq_ignore_ascii_case(&name))
            else {
                return Err(invalid(
                    &key,
                    at,
                    format!(
                        "not an allowed header; allowed: {}",
                        ALLOWED_HEADERS.join(", ")
                    ),
                ));
            };
            let value = HeaderValue::from_str(&value)
                .map_err(|_| invalid(&key, at, "not a valid header value".to_owned()))?;
            headers.push((HeaderName::from_static(lowercase(allowed)), value));
        }
    }
    let tls = match raw.tls_server_config {
        Some(tls) => tls_config(path, &tls, files, &invalid)?.map(Arc::new),
        None => None,
    };
    Ok(WebConfig {
        tls,
        users,
        headers,
    })
}

fn lowercase(name: &str) -> &'static str {
    match name {
        "Content-Security-Policy" => "content-security-policy",
        "X-Frame-Options" => "x-frame-options",
        "X-Content-Type-Options" => "x-content-type-options",
        "X-XSS-Protection" => "x-xss-protection",
        _ => "strict-transport-security",
    }
}
