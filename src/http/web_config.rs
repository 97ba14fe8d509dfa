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

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use prometheus_client::metrics::counter::Counter;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

mod file;
mod tls;

pub use file::check_file;
#[cfg(test)]
use file::{Files, RawFile};
use file::{build, read_files};

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
    /// bcrypt checks that may run at once (one per core): a flood of wrong passwords queues
    /// here instead of taking a blocking thread each (the pool grows to 512), and cannot delay
    /// a request whose credentials are cached.
    checks: Arc<tokio::sync::Semaphore>,
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
            checks: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            )),
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

    /// One bcrypt check on the blocking pool, once a permit is free (`checks`). The permit
    /// goes with the check, so a client that hangs up does not free it while bcrypt runs.
    async fn check(&self, password: String, hash: String) -> bool {
        let Ok(permit) = Arc::clone(&self.checks).acquire_owned().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            bcrypt::verify(&password, &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false)
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
                let _ = self.check(password, other).await;
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
        if !self.check(password, hash).await {
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
    fn a_bcrypt_cost_outside_4_to_16_is_a_located_error_and_loading_does_not_run_bcrypt() {
        // A real cost-4 hash with its cost digits rewritten: parsing reads the cost, and only
        // a verification would spend 2^cost rounds (minutes at 22), so the load must parse.
        let hash = bcrypt::hash("pw-123456", 4).unwrap();
        let with_cost = |cost: &str| format!("{}{cost}{}", &hash[..4], &hash[6..]);
        let file = |cost: &str| format!("basic_auth_users:\n  alice: '{}'\n", with_cost(cost));
        for cost in ["16", "10", "04"] {
            assert!(build_text(&file(cost)).is_ok(), "cost {cost} refused");
        }
        for (cost, shown) in [("17", "17"), ("22", "22"), ("03", "3")] {
            let error = error_of(&file(cost));
            assert!(
                error.contains(&format!(
                    "web.yml:2:10: basic_auth_users.alice: bcrypt cost {shown} is outside 4..=16"
                )),
                "{error}"
            );
            assert!(error.contains("htpasswd -nBC 10 USER"), "{error}");
        }
    }

    fn basic(user: &str, password: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        headers
    }

    #[tokio::test(start_paused = true)]
    async fn bcrypt_checks_wait_for_a_free_core_and_cached_credentials_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.yml");
        let hash = bcrypt::hash("pw-123456", 4).unwrap();
        std::fs::write(&path, format!("basic_auth_users:\n  alice: '{hash}'\n")).unwrap();
        let handle = WebConfigHandle::load(&path, Counter::default(), false).unwrap();
        let config = handle.current().await;
        let good = basic("alice", "pw-123456");
        assert!(handle.authorize(&config, "/metrics", &good).await.is_none());

        // Every permit taken, as by a flood of wrong passwords: new checks wait, and start
        // no blocking thread meanwhile.
        let cores = handle.checks.available_permits();
        assert!(cores >= 1);
        let held = Arc::clone(&handle.checks)
            .acquire_many_owned(cores as u32)
            .await
            .unwrap();
        let second = Duration::from_secs(1);
        let passed = tokio::time::timeout(second, handle.authorize(&config, "/metrics", &good));
        assert!(
            matches!(passed.await, Ok(None)),
            "cached credentials need no bcrypt check"
        );
        let wrong = basic("alice", "guess");
        let unknown = basic("mallory", "guess");
        for headers in [&wrong, &unknown] {
            let waited =
                tokio::time::timeout(second, handle.authorize(&config, "/metrics", headers));
            assert!(waited.await.is_err(), "a check ran without a free core");
        }

        drop(held);
        for headers in [&wrong, &unknown] {
            let answer = handle.authorize(&config, "/metrics", headers).await;
            assert_eq!(
                answer.map(|response| response.status()),
                Some(StatusCode::UNAUTHORIZED)
            );
        }
        assert_eq!(
            handle.checks.available_permits(),
            cores,
            "every permit came back"
        );
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
