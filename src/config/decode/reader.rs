//! The decoding context: typed reads from the located tree, each failure recorded (never thrown).
//!
//! Every read takes the node and its key path and returns `Option`: `None` means "absent or
//! invalid, and if invalid the error is already recorded", so callers simply keep going.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The longest accepted duration: a year.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

use super::ConfigError;
use super::node::{Node, NodeKind};

/// Collects errors and warnings while the decoder walks one config text.
pub(super) struct Ctx<'a> {
    /// The file name shown in messages.
    pub(super) file: String,
    /// The config text, to recover the spelling of plain scalars YAML typed as numbers.
    text: &'a str,
    /// The directory relative `api_key_file` paths resolve against.
    pub(super) base_dir: Option<PathBuf>,
    /// Environment lookup (the process environment, or a table in tests).
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) errors: Vec<ConfigError>,
    pub(super) warnings: Vec<String>,
    /// Key files read so far, in first-reference order, with their bytes (for the hash).
    pub(super) key_files: Vec<(PathBuf, Vec<u8>)>,
    /// Read environment variables and key files for secrets; `false` for `check-config
    /// --no-secrets`, where only the references are checked and placeholders stand in.
    pub(super) resolve_secrets: bool,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(
        file: String,
        text: &'a str,
        base_dir: Option<PathBuf>,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Self {
        Self {
            file,
            text,
            base_dir,
            env,
            errors: Vec::new(),
            warnings: Vec::new(),
            key_files: Vec::new(),
            resolve_secrets: true,
        }
    }

    /// Records an error located at `node`.
    pub(super) fn error(&mut self, node: &Node, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: node.line,
            column: node.column,
            key_path: path.to_owned(),
            message: message.into(),
        });
    }

    /// Records a warning located at `node`, formatted like an error.
    pub(super) fn warn(&mut self, node: &Node, path: &str, message: &str) {
        let warning = ConfigError {
            file: self.file.clone(),
            line: node.line,
            column: node.column,
            key_path: path.to_owned(),
            message: message.to_owned(),
        };
        self.warnings.push(warning.to_string());
    }

    /// Records "expected X, found Y". Never quotes the found value: it may be a secret.
    pub(super) fn type_error(&mut self, node: &Node, path: &str, expected: &str) {
        let found = node.kind.describe();
        self.error(node, path, format!("expected {expected}, found {found}"));
    }

    // === scalar reads ===

    /// A string. Plain scalars that YAML typed as numbers or booleans (`id: 2024`) are taken
    /// with their original spelling, as a typed deserializer into `String` would.
    pub(super) fn string(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.kind {
            NodeKind::Str(value) => Some(value.clone()),
            NodeKind::Int(_) | NodeKind::Float(_) | NodeKind::Bool(_) => {
                match node.source_text(self.text) {
                    Some(raw) => Some(raw.to_owned()),
                    None => {
                        self.type_error(node, path, "a string");
                        None
                    }
                }
            }
            _ => {
                self.type_error(node, path, "a string");
                None
            }
        }
    }

    /// A string that must not be empty (after trimming whitespace).
    pub(super) fn non_empty_string(&mut self, node: &Node, path: &str) -> Option<String> {
        let value = self.string(node, path)?;
        if value.trim().is_empty() {
            self.error(node, path, "must not be empty");
            return None;
        }
        Some(value)
    }

    pub(super) fn bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.kind {
            NodeKind::Bool(value) => Some(value),
            NodeKind::Str(ref text) => {
                // Strict booleans: `yes`/`on` arrive here as strings; say so, since YAML 1.1
                // habits are the usual cause.
                let yaml11 = ["y", "n", "yes", "no", "on", "off"]
                    .iter()
                    .any(|word| text.trim().eq_ignore_ascii_case(word));
                let message = if yaml11 {
                    format!(
                        "expected true or false, found {text:?} (yes/no/on/off are not booleans)"
                    )
                } else {
                    "expected true or false, found a string".to_owned()
                };
                self.error(node, path, message);
                None
            }
            _ => {
                self.type_error(node, path, "true or false");
                None
            }
        }
    }

    pub(super) fn int(&mut self, node: &Node, path: &str) -> Option<i128> {
        match node.kind {
            NodeKind::Int(value) => Some(value),
            _ => {
                self.type_error(node, path, "an integer");
                None
            }
        }
    }

    /// An integer within `range`.
    pub(super) fn int_in(&mut self, node: &Node, path: &str, range: IntRange) -> Option<i128> {
        let value = self.int(node, path)?;
        let IntRange { min, max } = range;
        match max {
            Some(max) if value < min || value > max => {
                let message = format!("must be between {min} and {max}, got {value}");
                self.error(node, path, message);
                None
            }
            None if value < min => {
                self.error(node, path, format!("must be at least {min}, got {value}"));
                None
            }
            None if value > i128::from(u32::MAX) => {
                let message = format!("must be at most {}, got {value}", u32::MAX);
                self.error(node, path, message);
                None
            }
            _ => Some(value),
        }
    }

    pub(super) fn float(&mut self, node: &Node, path: &str) -> Option<f64> {
        match node.kind {
            NodeKind::Float(value) if value.is_finite() => Some(value),
            // i128 → f64 is exact for every value a config could sensibly hold.
            NodeKind::Int(value) => Some(value as f64),
            _ => {
                self.type_error(node, path, "a number");
                None
            }
        }
    }

    /// A humantime duration string (`500ms`, `5s`, `1h 30m`), strictly positive.
    pub(super) fn duration(&mut self, node: &Node, path: &str) -> Option<Duration> {
        let NodeKind::Str(text) = &node.kind else {
            self.type_error(node, path, "a duration such as \"5s\"");
            return None;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(duration) if duration.is_zero() => {
                self.error(node, path, "must be greater than zero");
                None
            }
            // Far beyond any useful setting, and far inside what timers and clocks can add.
            Ok(duration) if duration > MAX_DURATION => {
                self.error(node, path, "must be at most 365d");
                None
            }
            Ok(duration) => Some(duration),
            Err(err) => {
                self.error(node, path, format!("invalid duration {text:?}: {err}"));
                None
            }
        }
    }

    /// A list of strings.
    pub(super) fn string_list(&mut self, node: &Node, path: &str) -> Option<Vec<String>> {
        let NodeKind::Seq(items) = &node.kind else {
            self.type_error(node, path, "a list");
            return None;
        };
        let mut values = Vec::with_capacity(items.len());
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            match self.string(item, &index(path, i)) {
                Some(value) => values.push(value),
                None => ok = false,
            }
        }
        ok.then_some(values)
    }

    /// A list of non-empty strings; with `require_items` the list itself must not be empty.
    pub(super) fn nonblank_list(
        &mut self,
        node: &Node,
        path: &str,
        require_items: bool,
    ) -> Option<Vec<String>> {
        let values = self.string_list(node, path)?;
        if require_items && values.is_empty() {
            self.error(node, path, "must not be empty");
            return None;
        }
        let mut ok = true;
        if let NodeKind::Seq(items) = &node.kind {
            for (i, (item, value)) in items.iter().zip(&values).enumerate() {
                if value.trim().is_empty() {
                    self.error(item, &index(path, i), "must not be empty");
                    ok = false;
                }
            }
        }
        ok.then_some(values)
    }

    /// The items of a list node; `None` (with an error) for anything else.
    pub(super) fn seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<&'n [Node]> {
        match &node.kind {
            NodeKind::Seq(items) => Some(items),
            _ => {
                self.type_error(node, path, "a list");
                None
            }
        }
    }

    // === maps ===

    /// Opens a mapping for field reads. Reports non-string keys and duplicate keys (the second
    /// occurrence, naming the first's line). `None` (with an error) when `node` is no mapping.
    pub(super) fn map<'n>(&mut self, node: &'n Node, path: &str) -> Option<Fields<'n>> {
        let NodeKind::Map(entries) = &node.kind else {
            self.type_error(node, path, "a map");
            return None;
        };
        let mut fields = Fields {
            node,
            path: path.to_owned(),
            entries: Vec::with_capacity(entries.len()),
        };
        let mut first_line: HashMap<String, u64> = HashMap::new();
        for (key, value) in entries {
            let name = match &key.kind {
                NodeKind::Str(name) => name.clone(),
                NodeKind::Int(_) | NodeKind::Float(_) | NodeKind::Bool(_) => {
                    match key.source_text(self.text) {
                        Some(raw) => raw.to_owned(),
                        None => {
                            self.error(key, path, "keys must be strings");
                            continue;
                        }
                    }
                }
                _ => {
                    self.error(key, path, "keys must be strings");
                    continue;
                }
            };
            if let Some(line) = first_line.get(&name) {
                let message = format!("duplicate key {name:?} (first at line {line})");
                self.error(key, &field(path, &name), message);
                continue;
            }
            first_line.insert(name.clone(), key.line);
            fields.entries.push((name, key, value));
        }
        Some(fields)
    }

    /// Opens an optional section: absent or null means "all defaults" (an empty field set).
    pub(super) fn section<'n>(
        &mut self,
        node: Option<&'n Node>,
        path: &str,
        allowed: &[&str],
    ) -> Option<Fields<'n>> {
        match node {
            None => Some(Fields::empty_at(&ABSENT, path)),
            Some(node) if node.kind == NodeKind::Null => Some(Fields::empty_at(node, path)),
            Some(node) => {
                let fields = self.map(node, path)?;
                fields.check_allowed(self, allowed, "");
                Some(fields)
            }
        }
    }
}

/// The entries of one mapping, with the path of the mapping itself.
pub(super) struct Fields<'n> {
    /// The mapping node (for "missing key" locations); `None` for an absent section.
    node: &'n Node,
    pub(super) path: String,
    entries: Vec<(String, &'n Node, &'n Node)>,
}

/// Stands in for an absent section so that "missing key" errors still have a location.
static ABSENT: Node = Node {
    kind: NodeKind::Null,
    line: 0,
    column: 0,
    span: None,
};

impl<'n> Fields<'n> {
    /// No entries; "missing key" errors point at `node`.
    pub(super) fn empty_at(node: &'n Node, path: &str) -> Self {
        Self {
            node,
            path: path.to_owned(),
            entries: Vec::new(),
        }
    }

    /// The entries in file order (duplicates already dropped): name, key node, value node.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&str, &'n Node, &'n Node)> + '_ {
        self.entries
            .iter()
            .map(|(name, key, value)| (name.as_str(), *key, *value))
    }

    /// The mapping node itself.
    pub(super) fn node(&self) -> &'n Node {
        self.node
    }

    /// Reports every key not in `allowed` (at the key). `what` qualifies the message, e.g.
    /// " for a keyword platform".
    pub(super) fn check_allowed(&self, ctx: &mut Ctx<'_>, allowed: &[&str], what: &str) {
        for (name, key, _) in &self.entries {
            if !allowed.contains(&name.as_str()) {
                let message = format!(
                    "unknown key {name:?}{what}; allowed keys: {}",
                    allowed.join(", ")
                );
                ctx.error(key, &field(&self.path, name), message);
            }
        }
    }

    /// The value of `name`, treating an explicit null as absent.
    pub(super) fn get(&self, name: &str) -> Option<&'n Node> {
        self.get_raw(name)
            .filter(|node| node.kind != NodeKind::Null)
    }

    /// The value of `name`, even when null.
    pub(super) fn get_raw(&self, name: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(key, _, _)| key == name)
            .map(|(_, _, value)| *value)
    }

    /// The key path of `name` inside this mapping.
    pub(super) fn path_of(&self, name: &str) -> String {
        field(&self.path, name)
    }

    /// The value of a required key; records "missing required key" at the mapping otherwise.
    pub(super) fn required(&self, ctx: &mut Ctx<'_>, name: &str) -> Option<&'n Node> {
        if let Some(node) = self.get(name) {
            return Some(node);
        }
        // Present but null is located at the null itself; absent at the enclosing mapping.
        let at = self.get_raw(name).unwrap_or(self.node);
        ctx.error(at, &self.path_of(name), "missing required key");
        None
    }

    // Shorthands: read `name` with `read`, or fall back to `default` when absent.

    pub(super) fn string_or(&self, ctx: &mut Ctx<'_>, name: &str, default: &str) -> String {
        match self.get(name) {
            Some(node) => ctx
                .non_empty_string(node, &self.path_of(name))
                .unwrap_or_else(|| default.to_owned()),
            None => default.to_owned(),
        }
    }

    pub(super) fn bool_or(&self, ctx: &mut Ctx<'_>, name: &str, default: bool) -> bool {
        match self.get(name) {
            Some(node) => ctx.bool(node, &self.path_of(name)).unwrap_or(default),
            None => default,
        }
    }

    pub(super) fn duration_or(&self, ctx: &mut Ctx<'_>, name: &str, default: Duration) -> Duration {
        match self.get(name) {
            Some(node) => ctx.duration(node, &self.path_of(name)).unwrap_or(default),
            None => default,
        }
    }

    pub(super) fn int_or(
        &self,
        ctx: &mut Ctx<'_>,
        name: &str,
        range: IntRange,
        default: i128,
    ) -> i128 {
        match self.get(name) {
            Some(node) => ctx
                .int_in(node, &self.path_of(name), range)
                .unwrap_or(default),
            None => default,
        }
    }
}

/// The accepted values of an integer key; `max: None` means "fits the target type".
#[derive(Debug, Clone, Copy)]
pub(super) struct IntRange {
    pub(super) min: i128,
    pub(super) max: Option<i128>,
}

impl IntRange {
    /// `min..=max`.
    pub(super) const fn between(min: i128, max: i128) -> Self {
        Self {
            min,
            max: Some(max),
        }
    }

    /// `min..` up to `u32::MAX`, which every count-like key fits in.
    pub(super) const fn at_least(min: i128) -> Self {
        Self { min, max: None }
    }
}

/// `parent.name`, or `name` at the top level.
pub(super) fn field(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}.{name}")
    }
}

/// `parent[i]`.
pub(super) fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}
