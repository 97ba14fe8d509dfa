//! Secret resolution: `api_key_env | api_key_file | api_key`, and `headers_from_env`.
//!
//! Messages name the variable or the file, never the value; the value goes straight into a
//! `Secret`.

use std::path::{Path, PathBuf};

use super::node::Node;
use super::reader::{Ctx, Fields};
use crate::config::KeySource;
use crate::secret::Secret;

/// The keys that can hold an API key; exactly one must be set.
pub(super) const KEY_SOURCES: [&str; 3] = ["api_key_env", "api_key_file", "api_key"];

/// Keys shorter than this are rejected: they are typos or placeholders, and `Secret::redact_in`
/// could not hide them anyway.
const MIN_KEY_CHARS: usize = 4;

const EXACTLY_ONE: &str = "set exactly one of api_key_env, api_key_file or api_key";

/// What stands in for a secret that was not resolved (`check-config --no-secrets`). Such a
/// config is never run: `check_file_without_secrets` returns only its warnings.
const UNRESOLVED: &str = "<unresolved secret>";

/// Resolves the API key of the mapping `fields` (an instance or a platform).
pub(super) fn api_key(ctx: &mut Ctx<'_>, fields: &Fields<'_>) -> Option<(Secret, KeySource)> {
    let mut present: Vec<(&str, &Node)> = KEY_SOURCES
        .iter()
        .filter_map(|name| fields.get(name).map(|node| (*name, node)))
        .collect();
    // File order, so that "conflicts with" points at the later key.
    present.sort_by_key(|(_, node)| (node.line, node.column));
    let Some(&(name, node)) = present.first() else {
        ctx.error(
            fields.node(),
            &fields.path,
            format!("missing API key: {EXACTLY_ONE}"),
        );
        return None;
    };
    if present.len() > 1 {
        for &(other, other_node) in &present[1..] {
            let message = format!("conflicts with {name}: {EXACTLY_ONE}");
            ctx.error(other_node, &fields.path_of(other), message);
        }
        return None;
    }
    let path = fields.path_of(name);
    match name {
        "api_key_env" => {
            let variable = ctx.non_empty_string(node, &path)?;
            if !ctx.resolve_secrets {
                return Some((Secret::new(UNRESOLVED.to_owned()), KeySource::Env(variable)));
            }
            let value = env_secret(ctx, node, &path, &variable)?;
            check_length(
                ctx,
                node,
                &path,
                &value,
                &format!("API key from environment variable {variable:?}"),
            )?;
            Some((Secret::new(value), KeySource::Env(variable)))
        }
        "api_key_file" => {
            let file = ctx.non_empty_string(node, &path)?;
            let resolved = resolve(ctx.base_dir.as_deref(), &file);
            if !ctx.resolve_secrets {
                return Some((
                    Secret::new(UNRESOLVED.to_owned()),
                    KeySource::File(resolved),
                ));
            }
            let value = read_key_file(ctx, node, &path, &resolved)?;
            let what = format!("API key in file \"{}\"", resolved.display());
            check_length(ctx, node, &path, &value, &what)?;
            Some((Secret::new(value), KeySource::File(resolved)))
        }
        _ => {
            let value = ctx.string(node, &path)?;
            ctx.warn(
                node,
                &path,
                "inline API key; prefer api_key_env or api_key_file",
            );
            if value.is_empty() {
                ctx.error(node, &path, "must not be empty");
                return None;
            }
            check_length(ctx, node, &path, &value, "inline API key")?;
            Some((Secret::new(value), KeySource::Inline))
        }
    }
}

/// The value of environment variable `variable`, which must be set and non-empty.
pub(super) fn env_secret(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    variable: &str,
) -> Option<String> {
    if !ctx.resolve_secrets {
        return Some(UNRESOLVED.to_owned());
    }
    match (ctx.env)(variable) {
        None => {
            ctx.error(
                node,
                path,
                format!("environment variable {variable:?} is not set"),
            );
            None
        }
        Some(value) if value.is_empty() => {
            ctx.error(
                node,
                path,
                format!("environment variable {variable:?} is empty"),
            );
            None
        }
        Some(value) => Some(value),
    }
}

/// Reads a key file, strips the trailing newline, and remembers the file for the hash and the
/// watcher.
#[allow(
    clippy::disallowed_methods,
    reason = "the decoder is synchronous; reloads run it on tokio's blocking pool"
)]
fn read_key_file(ctx: &mut Ctx<'_>, node: &Node, path: &str, file: &Path) -> Option<String> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(err) => {
            let message = format!("cannot read API key file \"{}\": {err}", file.display());
            ctx.error(node, path, message);
            return None;
        }
    };
    if !ctx.key_files.iter().any(|(known, _)| known == file) {
        ctx.key_files.push((file.to_path_buf(), bytes.clone()));
    }
    let Ok(text) = String::from_utf8(bytes) else {
        let message = format!("API key file \"{}\" is not valid UTF-8", file.display());
        ctx.error(node, path, message);
        return None;
    };
    // `echo key > file` and editors add a final newline; CRLF comes from Windows editors, and
    // so does a leading byte order mark (Notepad's "UTF-8 with BOM").
    let value = text
        .strip_prefix('\u{feff}')
        .unwrap_or(&text)
        .trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        ctx.error(
            node,
            path,
            format!("API key file \"{}\" is empty", file.display()),
        );
        return None;
    }
    Some(value.to_owned())
}

fn check_length(ctx: &mut Ctx<'_>, node: &Node, path: &str, value: &str, what: &str) -> Option<()> {
    if value.chars().count() < MIN_KEY_CHARS {
        let message = format!("{what} is too short (at least {MIN_KEY_CHARS} characters)");
        ctx.error(node, path, message);
        return None;
    }
    Some(())
}

/// Resolves a path written in the config against the config file's directory.
pub(super) fn resolve(base_dir: Option<&Path>, path: &str) -> PathBuf {
    let path = Path::new(path);
    match base_dir {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}
