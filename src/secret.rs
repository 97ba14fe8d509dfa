//! `Secret`: a string that never shows itself in `Debug`, `Display`, logs, metrics or JSON.
//!
//! Every non-trivial `Secret` registers itself, and every form it can take on the wire (its
//! base64 in each alphabet, including inside a longer base64 text, its percent-encoded and
//! JSON-escaped forms, `Bearer <token>`, the base64 of `user:password` of a URL credential),
//! with one process-wide redactor. [`redact`] scrubs all of them from any text; the monitor's
//! error recorder, the platform error quoting and the wxauto error texts pass through it.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{LazyLock, RwLock};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

/// The redacted stand-in shown wherever a secret would otherwise appear.
pub const REDACTED: &str = "****";

/// Forms shorter than this are not registered: they would redact ordinary words.
const MIN_FORM_LEN: usize = 4;

/// A cap on registered forms, so that a process reloading an ever-changing config cannot grow
/// the redactor without bound (each secret adds about twenty forms).
const MAX_FORMS: usize = 20_000;

/// An API key, token or password.
///
/// The only way to read the value is [`Secret::expose`], which is called where the secret is
/// put on the wire (an HTTP header) and nowhere else. `Debug` and `Display` print [`REDACTED`],
/// and the type deliberately implements neither `Serialize` nor `Deserialize`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value and registers it (and its encoded forms) with the redactor.
    pub fn new(value: impl Into<String>) -> Self {
        let value = value.into();
        register_forms(forms_of(&value));
        Self(value)
    }

    /// The secret itself, for the one place it is sent upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces every occurrence of this secret, and of every registered secret form, in
    /// `text` with [`REDACTED`].
    ///
    /// Error texts that quote an upstream answer pass through this before they are stored,
    /// so a server echoing our key back (literally or encoded) cannot leak it.
    pub fn redact_in(&self, text: &str) -> String {
        let text = if self.0.len() < MIN_FORM_LEN {
            // Very short secrets would redact ordinary words; such keys are rejected by
            // validation anyway, so there is nothing meaningful to hide here.
            text.to_owned()
        } else {
            forms_of(&self.0)
                .iter()
                .fold(text.to_owned(), |text, form| text.replace(form, REDACTED))
        };
        redact(&text)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Credentials taken out of a URL's `user:password@` part, as HTTP basic auth.
#[derive(Clone, PartialEq, Eq)]
pub struct BasicCredentials {
    /// The whole `Authorization` header value, `Basic <base64(user:password)>`.
    header: Secret,
}

impl BasicCredentials {
    /// Builds the header from the decoded user and password and registers every form:
    /// the password, `user:password`, its base64 and the header itself.
    pub fn new(user: &str, password: &str) -> Self {
        // Registering the parts: the password alone (and, when it is long enough, the user,
        // which may be a token itself, as in `https://TOKEN@host`).
        let _ = Secret::new(password);
        if password.is_empty() {
            let _ = Secret::new(user);
        }
        let pair = Secret::new(format!("{user}:{password}"));
        let encoded = STANDARD.encode(pair.expose());
        register_forms(vec![encoded.clone()]);
        Self {
            header: Secret::new(format!("Basic {encoded}")),
        }
    }

    /// The `Authorization` header value.
    pub fn header_value(&self) -> &Secret {
        &self.header
    }
}

impl fmt::Debug for BasicCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BasicCredentials(****)")
    }
}

/// Splits `user:password@` out of a URL: the URL without it, and the credentials (decoded
/// from their percent-encoding), if there were any. A text that is not a URL is returned as
/// it is.
pub fn split_url_credentials(url: &str) -> (String, Option<BasicCredentials>) {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return (url.to_owned(), None);
    };
    if parsed.username().is_empty() && parsed.password().is_none() {
        return (url.to_owned(), None);
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8_lossy()
            .into_owned()
    };
    // The raw (percent-encoded) parts are secrets too: they are what the URL showed.
    let raw_user = parsed.username().to_owned();
    let raw_password = parsed.password().unwrap_or_default().to_owned();
    let _ = Secret::new(raw_password.clone());
    let credentials = BasicCredentials::new(&decode(&raw_user), &decode(&raw_password));
    let _ = parsed.set_password(None);
    let _ = parsed.set_username("");
    let mut clean = parsed.to_string();
    // `Url` adds a `/` path to a bare origin; keep the caller's form.
    if !url.ends_with('/') && clean.ends_with('/') && parsed.path() == "/" {
        clean.pop();
    }
    (clean, Some(credentials))
}

/// Replaces every registered secret form in `text` with [`REDACTED`].
pub fn redact(text: &str) -> String {
    let Ok(forms) = REGISTRY.read() else {
        return text.to_owned();
    };
    if forms.by_length.is_empty() {
        return text.to_owned();
    }
    let mut out = text.to_owned();
    // Longest first, so a form containing a shorter one is removed whole.
    for (_, form) in forms.by_length.iter().rev() {
        if out.contains(form.as_str()) {
            out = out.replace(form.as_str(), REDACTED);
        }
    }
    out
}

/// Whether `text` contains any registered secret form (for tests and audits).
pub fn contains_secret(text: &str) -> bool {
    REGISTRY.read().is_ok_and(|forms| {
        forms
            .by_length
            .iter()
            .any(|(_, form)| text.contains(form.as_str()))
    })
}

/// Every form a secret value can take in a request or an echo of one.
pub fn forms_of(value: &str) -> Vec<String> {
    if value.len() < MIN_FORM_LEN {
        return Vec::new();
    }
    let mut forms = vec![value.to_owned(), format!("Bearer {value}")];
    // Percent-encoded (URL path/userinfo style and form style).
    forms.push(
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    );
    forms.push(url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>());
    // JSON-escaped, as in an echoed JSON body.
    if let Ok(json) = serde_json::to_string(value) {
        forms.push(json.trim_matches('"').to_owned());
    }
    // base64 of the value alone, and the part of a longer base64 text that only the value
    // determines, at each of the three alignments it can start at.
    for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
        forms.push(engine.encode(value));
    }
    for offset in 0..3usize {
        let mut bytes = vec![0u8; offset];
        bytes.extend_from_slice(value.as_bytes());
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let encoded = engine.encode(&bytes);
            // The first characters mix in the prefix, the last ones the (absent) suffix.
            let skip = if offset == 0 {
                0
            } else {
                (offset * 8).div_ceil(6)
            };
            let total_bits = bytes.len() * 8;
            let stable = (total_bits / 6).min(encoded.len());
            if stable > skip + MIN_FORM_LEN {
                forms.push(encoded[skip..stable].to_owned());
            }
        }
    }
    forms.retain(|form| form.len() >= MIN_FORM_LEN);
    forms.sort();
    forms.dedup();
    forms
}

/// A writer that passes every write through [`redact`]: the log layers write through it, so
/// no registered secret form reaches stderr or the log file, whatever a log line quotes.
///
/// The formatting layers write one whole event per call, so a secret is never split across
/// two writes.
pub struct RedactingWriter<W>(pub W);

impl<W: std::io::Write> std::io::Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) if contains_secret(text) => self.0.write_all(redact(text).as_bytes())?,
            _ => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[derive(Default)]
struct Forms {
    /// `(length, form)`, so iteration in reverse yields the longest first.
    by_length: BTreeSet<(usize, String)>,
}

static REGISTRY: LazyLock<RwLock<Forms>> = LazyLock::new(|| RwLock::new(Forms::default()));

fn register_forms(forms: Vec<String>) {
    if forms.is_empty() {
        return;
    }
    if let Ok(mut registry) = REGISTRY.write() {
        for form in forms {
            if registry.by_length.len() >= MAX_FORMS {
                break;
            }
            if form.len() >= MIN_FORM_LEN {
                registry.by_length.insert((form.len(), form));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let secret = Secret::new("sk-very-secret-key");
        assert_eq!(format!("{secret:?}"), REDACTED);
        assert_eq!(format!("{secret}"), REDACTED);
        assert_eq!(format!("{:?}", Some(&secret)), "Some(****)");
        assert_eq!(secret.expose(), "sk-very-secret-key");
    }

    #[test]
    fn redact_in_replaces_every_occurrence() {
        let secret = Secret::new("abcd1234");
        assert_eq!(
            secret.redact_in("key abcd1234 rejected: abcd1234"),
            "key **** rejected: ****"
        );
    }

    #[test]
    fn encoded_forms_are_redacted() {
        let value = "tok/en+with spaces&Z9";
        let secret = Secret::new(value);
        for form in [
            STANDARD.encode(value),
            URL_SAFE_NO_PAD.encode(value),
            percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
            url::form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>(),
        ] {
            let text = format!("echo: {form} end");
            let cleaned = secret.redact_in(&text);
            assert!(!cleaned.contains(&form), "{form} survived in {cleaned}");
            assert!(!contains_secret(&cleaned), "{cleaned}");
        }
    }

    #[test]
    fn base64_of_a_longer_text_containing_the_secret_is_redacted() {
        let value = "inner-secret-Qz81x";
        let _secret = Secret::new(value);
        for prefix in ["", "a", "ab", "abc", "headers: X-Key="] {
            let whole = format!("{prefix}{value} and more");
            for encoded in [STANDARD.encode(&whole), URL_SAFE.encode(&whole)] {
                assert!(contains_secret(&encoded), "{prefix:?}: {encoded}");
                let cleaned = redact(&encoded);
                assert!(cleaned.contains(REDACTED), "{cleaned}");
            }
        }
    }

    #[test]
    fn the_log_writer_redacts_whole_lines() {
        let _secret = Secret::new("log-secret-Pq77");
        let mut out = RedactingWriter(Vec::new());
        std::io::Write::write_all(&mut out, b"token=log-secret-Pq77\n").unwrap();
        assert_eq!(String::from_utf8(out.0).unwrap(), "token=****\n");
    }

    #[test]
    fn url_credentials_are_split_into_basic_auth() {
        let (url, credentials) =
            split_url_credentials("https://al%40ice:p%3Ass-W0rd-Yx@host:8443/v1");
        assert_eq!(url, "https://host:8443/v1");
        let credentials = credentials.unwrap();
        let expected = format!("Basic {}", STANDARD.encode("al@ice:p:ss-W0rd-Yx"));
        assert_eq!(credentials.header_value().expose(), expected);
        assert!(format!("{credentials:?}").contains(REDACTED));
        for form in [
            expected.as_str(),
            &STANDARD.encode("al@ice:p:ss-W0rd-Yx"),
            "p:ss-W0rd-Yx",
            "p%3Ass-W0rd-Yx",
        ] {
            assert_eq!(redact(&format!("x {form} y")), "x **** y", "{form}");
        }
        let (url, none) = split_url_credentials("http://10.0.0.5:5000");
        assert_eq!(url, "http://10.0.0.5:5000");
        assert!(none.is_none());
        let (url, none) = split_url_credentials("not a url");
        assert_eq!(url, "not a url");
        assert!(none.is_none());
        let (url, token) = split_url_credentials("http://tok-only-user-123@h/");
        assert_eq!(url, "http://h/");
        assert_eq!(
            token.unwrap().header_value().expose(),
            format!("Basic {}", STANDARD.encode("tok-only-user-123:"))
        );
        assert_eq!(redact("tok-only-user-123"), REDACTED);
    }
}
