//! YAML text → validated `Config`, reporting every problem at once with file:line:col and key path.
//!
//! serde-saphyr parses the text into a located tree (`node`); the typed decoder (`reader` plus the
//! per-section modules) walks it and records each error instead of stopping at the first.

#[cfg(test)]
mod edge_tests;
mod keys;
mod node;
mod processes;
mod reader;
mod routing;
mod sections;
mod tags;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;

use self::node::Node;
use self::reader::Ctx;
use super::{Config, ConfigSource, fnv1a64};

/// The file name used in messages when the config did not come from a file.
const BUILTIN: &str = "<builtin>";

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
        if self.line == 0 {
            // No position (a file that cannot be read): the file alone, not a fake `0:0`.
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if !self.key_path.is_empty() {
            write!(f, "{}: ", self.key_path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

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
    decode_with(text, path, env, true)
}

/// What `check_file_without_secrets` tells of a valid file.
#[derive(Debug, Clone)]
pub struct Unresolved {
    /// Human-readable warnings, never containing secrets.
    pub warnings: Vec<String>,
    /// `server.web_config_file`, resolved against the config's directory.
    pub web_config_file: Option<std::path::PathBuf>,
}

/// Checks a config file without resolving its secrets (`check-config --no-secrets`, for CI):
/// syntax, types, ranges and references are checked as for a run, but no environment variable
/// named by `api_key_env`/`headers_from_env` and no `api_key_file` is read. Returns the
/// warnings and the web config file; the config itself is withheld because placeholders stand
/// in for its keys.
pub fn check_file_without_secrets(path: &Path) -> Result<Unresolved, ConfigErrors> {
    let text = read_file(path)?;
    decode_with(&text, Some(path), &|_| None, false).map(|loaded| Unresolved {
        warnings: loaded.warnings,
        web_config_file: loaded.config.server.web_config_file,
    })
}

fn decode_with(
    text: &str,
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    resolve_secrets: bool,
) -> Result<Loaded, ConfigErrors> {
    let file = path.map_or_else(|| BUILTIN.to_owned(), |path| path.display().to_string());
    let root = parse(text).map_err(|err| ConfigErrors {
        errors: vec![syntax_error(&file, &err)],
    })?;

    // Relative key files resolve against the config's directory, so the config works whatever
    // the working directory; a bare file name has an empty parent, i.e. the working directory.
    let base_dir = path.and_then(Path::parent).map(Path::to_path_buf);
    let mut ctx = Ctx::new(file, text, base_dir, env);
    ctx.resolve_secrets = resolve_secrets;
    tags::check(&mut ctx, &root, text);
    let config = sections::config(&mut ctx, &root);

    if !ctx.errors.is_empty() {
        let mut errors = ctx.errors;
        // Stable: errors at one spot keep the order they were found in.
        errors.sort_by_key(|error| (error.line, error.column));
        return Err(ConfigErrors { errors });
    }
    let Some(mut config) = config else {
        // Every path that yields no config records an error first; this is a safety net.
        return Err(ConfigErrors {
            errors: vec![ConfigError {
                file: ctx.file,
                line: 0,
                column: 0,
                key_path: String::new(),
                message: "invalid configuration".to_owned(),
            }],
        });
    };

    let mut hashed: Vec<&[u8]> = vec![text.as_bytes()];
    hashed.extend(ctx.key_files.iter().map(|(_, bytes)| bytes.as_slice()));
    config.source = ConfigSource {
        path: path.map(Path::to_path_buf),
        hash: fnv1a64(&hashed),
        referenced_files: ctx.key_files.iter().map(|(file, _)| file.clone()).collect(),
    };
    Ok(Loaded {
        config,
        warnings: ctx.warnings,
    })
}

/// Reads and decodes a config file using the process environment.
pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = read_file(path)?;
    decode(&text, Some(path), &|name| std::env::var(name).ok())
}

/// The file's text; a read failure or invalid UTF-8 is one located error.
#[allow(
    clippy::disallowed_methods,
    reason = "the decoder is synchronous; reloads run it on tokio's blocking pool"
)]
fn read_file(path: &Path) -> Result<String, ConfigErrors> {
    let error = |line: u64, column: u64, message: String| ConfigErrors {
        errors: vec![ConfigError {
            file: path.display().to_string(),
            line,
            column,
            key_path: String::new(),
            message,
        }],
    };
    let bytes = std::fs::read(path)
        .map_err(|err| error(0, 0, format!("cannot read config file: {err}")))?;
    String::from_utf8(bytes).map_err(|err| {
        let (line, column, offset) = utf8_error_position(&err);
        error(
            line,
            column,
            format!("the file is not valid UTF-8 (invalid byte at offset {offset})"),
        )
    })
}

/// Where UTF-8 decoding failed: (1-based line, 1-based column in characters, byte offset).
pub(crate) fn utf8_error_position(err: &std::string::FromUtf8Error) -> (u64, u64, usize) {
    let offset = err.utf8_error().valid_up_to();
    let valid = String::from_utf8_lossy(&err.as_bytes()[..offset]);
    let line = valid.matches('\n').count() + 1;
    let column = valid
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        + 1;
    (
        u64::try_from(line).unwrap_or(u64::MAX),
        u64::try_from(column).unwrap_or(u64::MAX),
        offset,
    )
}

/// The deepest nesting of lists and maps accepted. A config needs about 7 levels; the parser
/// and the located tree recurse once per level, and a reload decodes on a runtime worker thread
/// (2 MiB of stack), where serde-saphyr's own limit of 64 overflowed the stack of a debug build.
pub(crate) const MAX_DEPTH: usize = 16;

/// The parser options for our YAML files (the config and the web config).
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_depth = MAX_DEPTH;
    serde_saphyr::options! {
        strict_booleans: true,
        // Duplicates reach the tree and are reported by `Ctx::map` together with every other
        // problem, instead of aborting the parse.
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::PassThrough,
        // A snippet would quote the source line, which may hold an inline API key.
        with_snippet: false,
        budget: Some(budget),
    }
}

/// Parses YAML into the located tree.
fn parse(text: &str) -> Result<Node, serde_saphyr::Error> {
    serde_saphyr::from_str_with_options(text, yaml_options())
}

/// A parser error as (line, column, message); 0 for an unknown position. The message names
/// no value and no position (that goes in the prefix).
pub(crate) fn yaml_error_parts(err: &serde_saphyr::Error) -> (u64, u64, String) {
    let (line, column) = err
        .location()
        .map_or((0, 0), |location| (location.line(), location.column()));
    if let serde_saphyr::Error::Budget {
        breach: serde_saphyr::budget::BudgetBreach::Depth { .. },
        ..
    } = err.without_snippet()
    {
        let message = format!("lists and maps nested deeper than {MAX_DEPTH} levels");
        return (line, column, message);
    }
    let text = err.without_snippet().to_string();
    // The location is reported in the prefix already.
    let message = match text.rfind(" at line ") {
        Some(at) if at > 0 => &text[..at],
        _ => text.as_str(),
    };
    (line, column, message.to_owned())
}

/// The one error reported for text that is not YAML.
fn syntax_error(file: &str, err: &serde_saphyr::Error) -> ConfigError {
    let (line, column, message) = yaml_error_parts(err);
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        key_path: String::new(),
        message: format!("invalid YAML: {message}"),
    }
}
