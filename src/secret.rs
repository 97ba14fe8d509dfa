//! `Secret`: a string that never shows itself in `Debug`, `Display`, logs, metrics or JSON.

use std::fmt;

/// The redacted stand-in shown wherever a secret would otherwise appear.
pub const REDACTED: &str = "****";

/// An API key, token or password.
///
/// The only way to read the value is [`Secret::expose`], which is called where the secret is
/// put on the wire (an HTTP header) and nowhere else. `Debug` and `Display` print [`REDACTED`],
/// and the type deliberately implements neither `Serialize` nor `Deserialize`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place it is sent upstream.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Replaces every occurrence of this secret in `text` with [`REDACTED`].
    ///
    /// Error texts that quote an upstream answer pass through this before they are stored,
    /// so a server echoing our key back cannot leak it into the error ring.
    pub fn redact_in(&self, text: &str) -> String {
        if self.0.len() < 4 {
            // Very short secrets would redact ordinary words; such keys are rejected by
            // validation anyway, so there is nothing meaningful to hide here.
            return text.to_owned();
        }
        text.replace(&self.0, REDACTED)
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
}
