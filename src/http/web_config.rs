//! The web config file (the Prometheus exporter-toolkit format): TLS, basic auth and response
//! headers for everything the HTTP server serves.
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt          # relative paths resolve against this file's directory
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # or NoClientCert, VerifyClientCertIfGiven
//!   client_ca_file: clients-ca.crt
//!   min_version: TLS12             # TLS12 or TLS13
//!   max_version: TLS13
//!   cipher_suites: [TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]   # TLS 1.2 only, as in Go
//! http_server_config:
//!   headers:
//!     Strict-Transport-Security: max-age=31536000
//! basic_auth_users:
//!   prometheus: $2y$10$...         # bcrypt hashes
//! ```
//!
//! The file (and the certificate, key and CA files it names) is re-checked at most once a
//! second when a connection arrives; a changed, valid file applies to the next connections,
//! an invalid one keeps the last valid one, is logged and counted in
//! `wxauto_web_config_reload_failures_total`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// How often the files are re-checked at most.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// The response headers exporter-toolkit allows in `http_server_config.headers`.
const ALLOWED_HEADERS: &[&str] = &[
    "Content-Security-Policy",
    "X-Frame-Options",
    "X-Content-Type-Options",
    "X-XSS-Protection",
    "Strict-Transport-Security",
];

/// Successful basic-auth checks remembered, so that bcrypt (tens of milliseconds a check)
/// runs once per distinct credential, not per request.
const AUTH_CACHE_CAPACITY: usize = 256;

/// Why a web config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WebConfigError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed or has unknown keys.
    #[error("{}{}: {message}", .path.display(), at(*.line, *.column))]
    Parse {
        /// The web config file.
        path: PathBuf,
        /// 1-based line; 0 when unknown.
        line: u64,
        /// 1-based column; 0 when unknown.
        column: u64,
        /// What the parser said.
        message: String,
    },
    /// A value is not acceptable (or a file it names cannot be read).
    #[error("{}{}: {key}: {message}", .path.display(), at(*.line, *.column))]
    Invalid {
        /// The web config file.
        path: PathBuf,
        /// 1-based line of the value; 0 when unknown.
        line: u64,
        /// 1-based column of the value; 0 when unknown.
        column: u64,
        /// The key path, e.g. `tls_server_config.min_version`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// `:line:column`, or nothing for an unknown position.
fn at(line: u64, column: u64) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}:{column}")
    }
}

/// A string value with where it was written.
type Text = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    tls_server_config: Option<Spanned<RawTls>>,
    http_server_config: Option<RawHttp>,
    basic_auth_users: Option<BTreeMap<String, Text>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: Option<Text>,
    key_file: Option<Text>,
    client_auth_type: Option<Text>,
    client_ca_file: Option<Text>,
    min_version: Option<Text>,
    max_version: Option<Text>,
    cipher_suites: Option<Vec<Text>>,
    /// Accepted for compatibility; rustls always prefers the server's order.
    prefer_server_cipher_suites: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    headers: Option<BTreeMap<String, Text>>,
    /// Accepted for compatibility; this server speaks HTTP/1.1 only.
    http2: Option<bool>,
}

/// A validated web config.
pub struct WebConfig {
    /// The TLS server config, when `tls_server_config` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// user → bcrypt hash; empty means no authentication.
    users: HashMap<String, String>,
    /// Added to every response.
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.len())
            .field("headers", &self.headers.len())
            .finish()
    }
}

/// What the files held when last checked.
struct Checked {
    hash: u64,
    at: Instant,
    active: Arc<WebConfig>,
    /// The hash of the last invalid content, so it is counted and logged once.
    failed_hash: Option<u64>,
}

/// The live web config: re-checked cheaply as connections arrive.
pub struct WebConfigHandle {
    path: PathBuf,
    state: Mutex<Checked>,
    failures: Counter,
    auth_cache: Mutex<HashMap<(String, [u8; 32]), ()>>,
    /// `/-/healthy` and `/-/ready` answer without basic auth.
    open_probes: bool,
}

impl std::fmt::Debug for WebConfigHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfigHandle")
            .field("path", &self.path)
            .finish()
    }
}

impl WebConfigHandle {
    /// Loads `path`; an invalid file at start is an error.
    pub fn load(
        path: &Path,
        failures: Counter,
        open_probes: bool,
    ) -> Result<Arc<Self>, WebConfigError> {
        let (hash, files) = read_files(path)?;
        let active = Arc::new(build(path, &files)?);
        Ok(Arc::new(Self {
            path: path.to_owned(),
            state: Mutex::new(Checked {
                hash,
                at: Instant::now(),
                active,
                failed_hash: None,
            }),
            failures,
            auth_cache: Mutex::new(HashMap::new()),
            open_probes,
        }))
    }

    /// The config for a new connection: the files are re-read when the last check is older
    /// than a second, and a changed valid config replaces the active one.
    pub async fn current(self: &Arc<Self>) -> Arc<WebConfig> {
        {
            let state = self.lock();
            if state.at.elapsed() < RECHECK_EVERY {
                return Arc::clone(&state.active);
            }
        }
        let this = Arc::clone(self);
        let checked = tokio::task::spawn_blocking(move || this.recheck()).await;
        match checked {
            Ok(active) => active,
            Err(_) => Arc::clone(&self.lock().active),
        }
    }

    fn recheck(&self) -> Arc<WebConfig> {
        let read = read_files(&self.path);
        let mut state = self.lock();
        state.at = Instant::now();
        let (hash, files) = match read {
            Ok(read) => read,
            Err(error) => {
                // A missing file is as invalid as a broken one; the hash 0 stands for it.
                self.fail(&mut state, 0, &error);
                return Arc::clone(&state.active);
            }
        };
        if hash == state.hash {
            return Arc::clone(&state.active);
        }
        match build(&self.path, &files) {
            Ok(config) => {
                tracing::info!(path = %self.path.display(), "Web config reloaded.");
                state.active = Arc::new(config);
                state.hash = hash;
                state.failed_hash = None;
                if let Ok(mut cache) = self.auth_cache.lock() {
                    cache.clear();
                }
            }
            Err(error) => self.fail(&mut state, hash, &error),
        }
        Arc::clone(&state.active)
    }

    fn fail(&self, state: &mut Checked, hash: u64, error: &WebConfigError) {
        if state.failed_hash != Some(hash) {
            state.failed_hash = Some(hash);
            self.failures.inc();
            tracing::error!(
                "Invalid web config; the previous one stays active: {}",
                crate::secret::redact(&error.to_string())
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Checked> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `None` when the request may pass, else the 401 to answer.
    pub async fn authorize(
        &self,
        config: &WebConfig,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<Response> {
        if config.users.is_empty()
            || (self.open_probes && matches!(path, "/-/healthy" | "/-/ready"))
        {
            return None;
        }
        let denied = || {
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"))],
                "Unauthorized\n",
            )
                .into_response()
        };
        let Some((user, password)) = basic_credentials(headers) else {
            return Some(denied());
        };
        let Some(hash) = config.users.get(&user).cloned() else {
            // Spend the same time as a wrong password (a check against a configured hash of
            // the same cost), so that user names cannot be probed.
            if let Some(other) = config.users.values().next().cloned() {
                let _ =
                    tokio::task::spawn_blocking(move || bcrypt::verify(&password, &other)).await;
            }
            return Some(denied());
        };
        let digest: [u8; 32] = {
            let digest = ring::digest::digest(&ring::digest::SHA256, password.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(digest.as_ref());
            out
        };
        let key = (format!("{user}\u{0}{hash}"), digest);
        if self.auth_cache.lock().is_ok_and(|cache| {
            cache
                .keys()
                .any(|cached| cached.0 == key.0 && bool::from(cached.1.ct_eq(&key.1)))
        }) {
            return None;
        }
        let verified =
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !verified {
            return Some(denied());
        }
        if let Ok(mut cache) = self.auth_cache.lock() {
            if cache.len() >= AUTH_CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(key, ());
        }
        None
    }
}

impl WebConfig {
    /// Adds the configured headers to a response.
    pub fn add_headers(&self, response: &mut Response) {
        for (name, value) in &self.headers {
            response.headers_mut().insert(name.clone(), value.clone());
        }
    }
}

/// `Authorization: Basic base64(user:password)`, decoded.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// The contents of the web config and of every file it names, with their combined hash.
struct Files {
    text: String,
    /// Referenced file path → bytes.
    referenced: HashMap<PathBuf, Vec<u8>>,
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
fn read_files(path: &Path) -> Result<(u64, Files), WebConfigError> {
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

fn resolve(config: &Path, file: &str) -> PathBuf {
    let file = Path::new(file);
    if file.is_absolute() {
        return file.to_owned();
    }
    config
        .parent()
        .map_or_else(|| file.to_owned(), |dir| dir.join(file))
}

fn build(path: &Path, files: &Files) -> Result<WebConfig, WebConfigError> {
    let raw = parse(path, &files.text)?;
    build_raw(path, raw, Some(files))
}

/// An "invalid value" error at `at`.
type Invalid<'a> = dyn Fn(&str, Location, String) -> WebConfigError + 'a;

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
        if !(hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
            || bcrypt::verify("", &hash).is_err()
        {
            return Err(invalid(&key, at, "not a bcrypt hash".to_owned()));
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

/// How clients authenticate with certificates.
enum ClientAuth<'r> {
    None,
    /// Verified against `client_ca_file`; `optional` for `VerifyClientCertIfGiven`.
    Verify {
        ca: &'r Text,
        optional: bool,
    },
}

/// Checks `tls_server_config` and, with `files`, builds the rustls config from them.
fn tls_config(
    path: &Path,
    tls: &Spanned<RawTls>,
    files: Option<&Files>,
    invalid: &Invalid<'_>,
) -> Result<Option<rustls::ServerConfig>, WebConfigError> {
    let section = tls.referenced;
    let tls = &tls.value;
    let _ = tls.prefer_server_cipher_suites;
    let named = |key: &str, file: &'_ Option<Text>| -> Result<(), WebConfigError> {
        match file {
            Some(_) => Ok(()),
            None => Err(invalid(
                key,
                section,
                "required when tls_server_config is set".to_owned(),
            )),
        }
    };
    named("tls_server_config.cert_file", &tls.cert_file)?;
    named("tls_server_config.key_file", &tls.key_file)?;

    let version =
        |key: &str, value: &Option<Text>, default: &'static rustls::SupportedProtocolVersion| {
            match value
                .as_ref()
                .map(|value| (value.value.as_str(), value.referenced))
            {
                None => Ok(default),
                Some(("TLS12", _)) => Ok(&rustls::version::TLS12),
                Some(("TLS13", _)) => Ok(&rustls::version::TLS13),
                Some((other, at)) => Err(invalid(
                    key,
                    at,
                    format!("unsupported version {other:?}; rustls supports TLS12 and TLS13"),
                )),
            }
        };
    let min = version(
        "tls_server_config.min_version",
        &tls.min_version,
        &rustls::version::TLS12,
    )?;
    let max = version(
        "tls_server_config.max_version",
        &tls.max_version,
        &rustls::version::TLS13,
    )?;
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [&rustls::version::TLS12, &rustls::version::TLS13]
            .into_iter()
            .filter(|v| {
                !(min.version == rustls::ProtocolVersion::TLSv1_3
                    && v.version == rustls::ProtocolVersion::TLSv1_2)
            })
            .filter(|v| {
                !(max.version == rustls::ProtocolVersion::TLSv1_2
                    && v.version == rustls::ProtocolVersion::TLSv1_3)
            })
            .collect();
    if versions.is_empty() {
        let at = tls
            .min_version
            .as_ref()
            .map_or(section, |min| min.referenced);
        return Err(invalid(
            "tls_server_config.min_version",
            at,
            "is above max_version".to_owned(),
        ));
    }

    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(names) = &tls.cipher_suites {
        let mut chosen = Vec::new();
        for name in names {
            let wanted = name.value.trim_end_matches("_SHA256");
            let Some(suite) = rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|suite| {
                    suite.version().version == rustls::ProtocolVersion::TLSv1_2
                        && format!("{:?}", suite.suite()).trim_end_matches("_SHA256") == wanted
                })
            else {
                return Err(invalid(
                    "tls_server_config.cipher_suites",
                    name.referenced,
                    format!("{:?} is not a TLS 1.2 suite rustls supports", name.value),
                ));
            };
            chosen.push(*suite);
        }
        // TLS 1.3 suites are not configurable (as in Go); they are always offered.
        provider.cipher_suites.retain(|suite| {
            suite.version().version == rustls::ProtocolVersion::TLSv1_3 || chosen.contains(suite)
        });
    }
    let provider = Arc::new(provider);

    let (auth, auth_at) = tls
        .client_auth_type
        .as_ref()
        .map_or(("NoClientCert", section), |auth| {
            (auth.value.as_str(), auth.referenced)
        });
    let client_auth = match auth {
        "NoClientCert" => ClientAuth::None,
        "VerifyClientCertIfGiven" | "RequireAndVerifyClientCert" => {
            let Some(ca) = &tls.client_ca_file else {
                return Err(invalid(
                    "tls_server_config.client_ca_file",
                    auth_at,
                    format!("required with client_auth_type {auth}"),
                ));
            };
            ClientAuth::Verify {
                ca,
                optional: auth == "VerifyClientCertIfGiven",
            }
        }
        "RequestClientCert" | "RequireAnyClientCert" => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                auth_at,
                format!(
                    "{auth} (a client certificate that is not verified) is not supported; use VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                ),
            ));
        }
        other => {
            return Err(invalid(
                "tls_server_config.client_auth_type",
                auth_at,
                format!(
                    "unknown value {other:?}; expected NoClientCert, VerifyClientCertIfGiven or RequireAndVerifyClientCert"
                ),
            ));
        }
    };

    // Everything above is checked without the files (`check-config --no-secrets`).
    let Some(files) = files else {
        return Ok(None);
    };
    let bytes_of = |key: &str, file: &Option<Text>| -> Result<&Vec<u8>, WebConfigError> {
        let file = file.as_ref().ok_or_else(|| {
            invalid(
                key,
                section,
                "required when tls_server_config is set".to_owned(),
            )
        })?;
        files
            .referenced
            .get(&resolve(path, &file.value))
            .ok_or_else(|| invalid(key, file.referenced, "was not read".to_owned()))
    };
    let cert_at = tls
        .cert_file
        .as_ref()
        .map_or(section, |file| file.referenced);
    let key_at = tls
        .key_file
        .as_ref()
        .map_or(section, |file| file.referenced);
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bytes_of("tls_server_config.cert_file", &tls.cert_file)?)
            .collect::<Result<_, _>>()
            .map_err(|error| {
                invalid(
                    "tls_server_config.cert_file",
                    cert_at,
                    format!("not a PEM certificate: {error}"),
                )
            })?;
    if certs.is_empty() {
        return Err(invalid(
            "tls_server_config.cert_file",
            cert_at,
            "no certificate in the file".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(bytes_of("tls_server_config.key_file", &tls.key_file)?)
        .map_err(|error| {
            invalid(
                "tls_server_config.key_file",
                key_at,
                format!("not a PEM private key: {error}"),
            )
        })?;

    let verifier: Arc<dyn rustls::server::danger::ClientCertVerifier> = match client_auth {
        ClientAuth::None => rustls::server::WebPkiClientVerifier::no_client_auth(),
        ClientAuth::Verify { ca, optional } => {
            let key = "tls_server_config.client_ca_file";
            let bytes = bytes_of(key, &tls.client_ca_file)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(bytes) {
                let cert = cert.map_err(|error| {
                    invalid(
                        key,
                        ca.referenced,
                        format!("not a PEM certificate: {error}"),
                    )
                })?;
                roots.add(cert).map_err(|error| {
                    invalid(
                        key,
                        ca.referenced,
                        format!("unusable CA certificate: {error}"),
                    )
                })?;
            }
            let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&provider),
            );
            let builder = if optional {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder.build().map_err(|error| {
                invalid(
                    key,
                    ca.referenced,
                    format!("cannot verify clients: {error}"),
                )
            })?
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|error| invalid("tls_server_config", section, format!("{error}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|error| {
            invalid(
                "tls_server_config.key_file",
                key_at,
                format!("does not match the certificate: {error}"),
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build_text(text: &str) -> Result<WebConfig, WebConfigError> {
        let path = Path::new("/nonexistent/web.yml");
        let files = Files {
            text: text.to_owned(),
            referenced: HashMap::new(),
        };
        build(path, &files)
    }

    fn error_of(text: &str) -> String {
        match build_text(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn invalid_files_are_located_errors() {
        assert!(error_of("basic_auth_user: {}\n").contains("basic_auth_user"));
        assert!(
            error_of("basic_auth_users:\n  u: plain\n")
                .contains("basic_auth_users.u: not a bcrypt hash")
        );
        assert!(
            error_of("http_server_config:\n  headers:\n    Server: x\n")
                .contains("http_server_config.headers.Server: not an allowed header")
        );
        let files = |auth: &str| {
            format!(
                "tls_server_config:\n  cert_file: c\n  key_file: k\n  client_auth_type: {auth}\n"
            )
        };
        // The certificate is checked first; without files, that is the error.
        assert!(error_of(&files("NoClientCert")).contains("tls_server_config.cert_file"));
    }

    #[test]
    fn users_and_headers_are_read() {
        let hash = bcrypt::hash("pw-123456", 4).unwrap();
        let config = build_text(&format!(
            "basic_auth_users:\n  alice: '{hash}'\nhttp_server_config:\n  headers:\n    x-frame-options: deny\n"
        ))
        .unwrap();
        assert_eq!(config.users.len(), 1);
        assert_eq!(config.headers[0].0, "x-frame-options");
        assert!(config.tls.is_none());
        let empty = build_text("").unwrap();
        assert!(empty.users.is_empty() && empty.headers.is_empty());
    }

    #[test]
    fn basic_credentials_are_decoded() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("al:ice:pw");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("al".to_owned(), "ice:pw".to_owned()))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_credentials(&headers), None);
    }

    #[test]
    fn the_example_hash_is_a_bcrypt_hash() {
        let text = include_str!("../../examples/web-config.yml");
        let raw: RawFile = serde_saphyr::from_str(text).unwrap();
        for hash in raw.basic_auth_users.unwrap().values() {
            assert!(
                bcrypt::verify("wrong", &hash.value).is_ok(),
                "{}",
                hash.value
            );
        }
        assert!(raw.tls_server_config.is_some());
    }
}
