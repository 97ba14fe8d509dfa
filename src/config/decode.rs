//! STUB (to be replaced): YAML text → `Config`, collecting every error.

use std::fmt;
use std::path::Path;

use super::Config;

/// One configuration problem, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name as given, or `<builtin>`.
    pub file: String,
    /// 1-based line; 0 when unknown.
    pub line: u64,
    /// 1-based column; 0 when unknown.
    pub column: u64,
    /// The key path, e.g. `instances[1].base_url`; empty for the whole file.
    pub key_path: String,
    /// What is wrong, never containing a secret.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.key_path, self.message
        )
    }
}

/// Every problem found in one config text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// In file order.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A decoded config plus non-fatal warnings (e.g. an inline API key).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated config.
    pub config: Config,
    /// Human-readable warnings, never containing secrets.
    pub warnings: Vec<String>,
}

/// Decodes and validates config text. `env` looks up environment variables.
pub fn decode(
    text: &str,
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigErrors> {
    let _ = (text, path, env);
    todo!("config decoding")
}

/// Reads and decodes a config file using the process environment.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    let _ = path;
    todo!("config loading")
}
