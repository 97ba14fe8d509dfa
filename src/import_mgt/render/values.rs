//! Text helpers of the mapping: ids and environment names, YAML quoting and comments, and
//! typed reads of WXAUTO-MGT's JSON config values.

use std::fmt::Write as _;

use serde_json::Value;

use super::Builder;

/// A valid sidecar instance id (`[A-Za-z0-9_.-]{1,64}`) for a WXAUTO-MGT one.
pub(in crate::import_mgt) fn sidecar_id(id: &str, n: usize) -> String {
    let cleaned: String = id
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    if cleaned.chars().any(|c| c.is_ascii_alphanumeric()) {
        cleaned
    } else {
        format!("instance-{n}")
    }
}

/// The part of an environment variable name made from an id: `A-Z 0-9 _`.
pub(in crate::import_mgt) fn env_part(id: &str) -> String {
    let part: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    let part = part.trim_matches('_').to_owned();
    if part.is_empty() {
        "X".to_owned()
    } else {
        part
    }
}

/// A YAML double-quoted scalar.
pub(in crate::import_mgt) fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}' | '\u{feff}') => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `line` with `note` as a comment in column 35.
pub(super) fn aligned(line: &str, note: &str) -> String {
    format!("{line:<34} # {note}")
}

/// Text that is safe on one comment line.
pub(in crate::import_mgt) fn comment(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// An http(s) URL with a host, without a trailing slash.
pub(super) fn http_url(text: &str) -> Option<String> {
    let url = reqwest::Url::parse(text.trim()).ok()?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return None;
    }
    Some(url.as_str().trim_end_matches('/').to_owned())
}

/// `url` without `user:password@`; the credentials are secrets and never go into the YAML.
pub(super) fn strip_credentials(b: &mut Builder, url: &str, label: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_owned();
    };
    if parsed.username().is_empty() && parsed.password().is_none() {
        return url.to_owned();
    }
    let _ = parsed.set_password(None);
    let _ = parsed.set_username("");
    b.note(format!(
        "{label}: the user:password@ part of its URL was left out of the file (it is a secret); \
         add it back by hand if the server needs it"
    ));
    parsed.as_str().trim_end_matches('/').to_owned()
}

/// A non-blank string (or number) field of a JSON object, trimmed.
pub(super) fn text(config: &Value, key: &str) -> Option<String> {
    let text = match config.get(key)? {
        Value::String(text) => text.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!text.is_empty()).then_some(text)
}

pub(super) fn number(config: &Value, key: &str) -> Option<f64> {
    match config.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

pub(super) fn flag(config: &Value, key: &str) -> bool {
    match config.get(key) {
        Some(Value::Bool(value)) => *value,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|x| x != 0.0),
        Some(Value::String(text)) => matches!(text.trim(), "1" | "true" | "True"),
        _ => false,
    }
}

/// A list of non-blank strings: a JSON array, or one string.
pub(super) fn strings(value: Option<&Value>) -> Vec<String> {
    let items: Vec<String> = match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(text) => Some(text.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect(),
        Some(Value::String(text)) => vec![text.clone()],
        _ => Vec::new(),
    };
    items
        .into_iter()
        .filter(|item| !item.trim().is_empty())
        .collect()
}

pub(super) fn whole(x: f64) -> Option<i64> {
    // Only whole numbers in a range that converts exactly.
    #[allow(clippy::cast_possible_truncation)]
    (x.fract() == 0.0 && x.abs() < 9.0e15).then_some(x as i64)
}

/// A positive whole number of seconds (or minutes) from a JSON number or numeric string.
pub(super) fn whole_seconds(value: &Value) -> Option<u64> {
    let x = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(text) => text.trim().parse().ok()?,
        _ => return None,
    };
    // Fractions round up: a poll of 2.5 s becomes 3 s, never 0.
    let x = x.ceil();
    whole(x).and_then(|n| u64::try_from(n).ok())
}
