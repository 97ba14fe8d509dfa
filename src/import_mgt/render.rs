//! Maps a WXAUTO-MGT database onto a commented sidecar config: every secret becomes an
//! `api_key_env` name, and everything that cannot be carried over becomes a note.

use std::collections::{HashMap, HashSet};

use super::read::{MgtDb, MgtInstance, MgtRule};
use crate::secret::Secret;

mod fall_through;
mod platforms;
mod values;

use platforms::platforms;
use values::{aligned, http_url, strip_credentials, whole_seconds};
pub(super) use values::{comment, env_part, quote, sidecar_id};

/// WXAUTO-MGT never polled faster than this.
const MGT_MIN_POLL_SECONDS: u64 = 5;
/// The sidecar accepts shorter keys from no source.
const MIN_KEY_CHARS: usize = 4;

/// The result of mapping: the YAML, the secrets it names, and the report.
#[derive(Debug)]
pub(super) struct Plan {
    pub yaml: String,
    /// `(variable, value)` in file order; values never leave as text except into the secrets
    /// file.
    pub secrets: Vec<(String, Secret)>,
    /// Variables the YAML names that have no usable value in the database.
    pub unset: Vec<String>,
    /// Report lines: what was skipped or could not be mapped, without secrets.
    pub notes: Vec<String>,
    pub counts: Counts,
}

/// How many of each were written to the YAML.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    pub instances: usize,
    pub platforms: usize,
    pub rules: usize,
    pub fixed_listeners: usize,
}

/// Unique environment variable names.
#[derive(Default)]
struct EnvNames(HashSet<String>);

struct Builder {
    out: String,
    secrets: Vec<(String, Secret)>,
    unset: Vec<String>,
    notes: Vec<String>,
    counts: Counts,
    env_names: EnvNames,
}

// === mapping ===

/// Maps `db` (read from `source`, the path shown in the header) onto a sidecar config.
pub(super) fn plan(db: &MgtDb, source: &str) -> Plan {
    let mut b = Builder {
        out: String::new(),
        secrets: Vec::new(),
        unset: Vec::new(),
        notes: Vec::new(),
        counts: Counts::default(),
        env_names: EnvNames::default(),
    };
    for table in &db.missing_tables {
        b.note(format!(
            "table {table} is not in the database; nothing imported from it"
        ));
    }
    header(&mut b, source);
    listener(&mut b, &db.instances);
    let instance_ids = instances(&mut b, &db.instances);
    fixed_listeners(&mut b, db);
    let platform_ids = platforms(&mut b, &db.platforms);
    rules(&mut b, &db.rules, &instance_ids, &platform_ids);
    for note in fall_through::notes(&b.out) {
        b.note(note);
    }
    if db.manual_listeners > 0 {
        b.note(format!(
            "{} manually added listener(s) in table listeners are not imported: the sidecar adds \
             chats as messages arrive; list a chat under fixed_listeners to keep it always listened",
            db.manual_listeners
        ));
    }
    if !b.notes.is_empty() {
        b.line("");
        b.line("# Not imported or changed on the way (import-mgt printed the same list):");
        let notes: Vec<String> = b.notes.iter().map(|note| comment(note)).collect();
        for note in notes {
            b.line(&format!("#   - {note}"));
        }
    }
    Plan {
        yaml: b.out,
        secrets: b.secrets,
        unset: b.unset,
        notes: b.notes,
        counts: b.counts,
    }
}

fn header(b: &mut Builder, source: &str) {
    b.line(&format!(
        "# wxauto-sidecar configuration imported from the WXAUTO-MGT database {}",
        comment(source)
    ));
    b.line(
        "# by `wxauto-sidecar import-mgt`. No secret is in this file: every key is read from the",
    );
    b.line(
        "# environment variable its api_key_env names (import-mgt --secrets-file writes them as",
    );
    b.line("# NAME=value lines). Check the result with:");
    b.line("#   wxauto-sidecar check-config --config <this file>");
    b.line("# Durations are humantime strings (500ms, 5s, 30m). Unknown keys are errors.");
}

/// `listener:` from the instances' JSON config. The sidecar has one listener section for all
/// instances (WXAUTO-MGT, too, applied the last instance's poll interval to all of them).
fn listener(b: &mut Builder, instances: &[MgtInstance]) {
    let enabled: Vec<&MgtInstance> = instances.iter().filter(|i| i.enabled).collect();
    let from: Vec<&MgtInstance> = if enabled.is_empty() {
        instances.iter().collect()
    } else {
        enabled
    };
    let setting = |key: &str| -> Vec<u64> {
        let mut values: Vec<u64> = from
            .iter()
            .filter_map(|i| whole_seconds(i.config.get(key)?))
            .filter(|n| *n > 0)
            .collect();
        values.sort_unstable();
        values.dedup();
        values
    };
    let poll = setting("poll_interval");
    let idle = setting("timeout_minutes");
    let request = setting("timeout");
    let retry = from
        .iter()
        .any(|i| i.config.get("retry_limit").is_some_and(|v| !v.is_null()));
    if retry {
        b.note(
            "instances' retry_limit is not mapped: the sidecar retries a down instance without \
             a limit, with the backoff of listener.backoff"
                .to_owned(),
        );
    }
    if poll.is_empty() && idle.is_empty() && request.is_empty() {
        return;
    }
    b.line("");
    b.line("listener:");
    b.line("  # From the instances' WXAUTO-MGT settings; one value applies to every instance.");
    if let (Some(&min), Some(&max)) = (poll.first(), poll.last()) {
        let seconds = min.max(MGT_MIN_POLL_SECONDS);
        if min != max {
            b.note(format!(
                "instances poll every {min}-{max} s in WXAUTO-MGT; listener.poll_interval is \
                 {seconds}s for all of them"
            ));
        }
        b.line(&aligned(
            &format!("  poll_interval: {seconds}s"),
            "WXAUTO-MGT never polled faster than every 5 s",
        ));
    }
    if let (Some(_), Some(&max)) = (idle.first(), idle.last()) {
        if idle.len() > 1 {
            b.note(format!(
                "instances time idle chats out after different times; listener.listener_timeout \
                 is the longest, {max}m"
            ));
        }
        b.line(&aligned(
            &format!("  listener_timeout: {max}m"),
            "timeout_minutes: an idle chat is removed after this",
        ));
    }
    if let (Some(_), Some(&max)) = (request.first(), request.last()) {
        if request.len() > 1 {
            b.note(format!(
                "instances have different request timeouts; listener.request_timeout is the \
                 longest, {max}s"
            ));
        }
        b.line(&aligned(
            &format!("  request_timeout: {max}s"),
            "timeout: every call to a wxauto instance",
        ));
    }
}

/// `instances:`; returns WXAUTO-MGT id → sidecar id for the instances written.
fn instances(b: &mut Builder, instances: &[MgtInstance]) -> HashMap<String, String> {
    let mut ids = HashMap::new();
    let mut taken = HashSet::new();
    b.line("");
    if instances.is_empty() {
        b.line("instances: []");
        return ids;
    }
    let mut written = 0;
    let mut body = Vec::new();
    for (n, instance) in instances.iter().enumerate() {
        let label = format!("instance {:?}", instance.instance_id);
        let Some(base_url) = http_url(&instance.base_url) else {
            b.note(format!(
                "skipped {label}: its base_url is not an http(s) URL"
            ));
            continue;
        };
        let base_url = strip_credentials(b, &base_url, &label);
        let id = unique(sidecar_id(&instance.instance_id, n + 1), &mut taken);
        if id != instance.instance_id {
            b.note(format!(
                "{label} is called {id:?} here (ids use 1 to 64 of A-Z a-z 0-9 _ . -); rules \
                 follow the rename"
            ));
        }
        let variable = b
            .env_names
            .take(&format!("WXAUTO_API_KEY_{}", env_part(&id)));
        b.secret(&variable, &instance.api_key, &label);
        let mut lines = Vec::new();
        let name = if instance.name.trim().is_empty() {
            String::new()
        } else {
            format!("{}, ", comment(&instance.name))
        };
        lines.push(format!(
            "  # {name}WXAUTO-MGT instance {}",
            comment(&instance.instance_id)
        ));
        lines.push(format!("  - id: {}", quote(&id)));
        lines.push(format!("    base_url: {}", quote(&base_url)));
        lines.push(format!("    api_key_env: {variable}"));
        if !instance.enabled {
            lines.push("    enabled: false                # disabled in WXAUTO-MGT".to_owned());
        }
        body.push(lines);
        ids.insert(instance.instance_id.clone(), id);
        written += 1;
    }
    if written == 0 {
        b.line("instances: []");
    } else {
        b.line("instances:");
        for line in body.into_iter().flatten() {
            b.line(&line);
        }
    }
    b.counts.instances = written;
    ids
}

fn fixed_listeners(b: &mut Builder, db: &MgtDb) {
    let mut lines = Vec::new();
    for fixed in &db.fixed_listeners {
        let chat = fixed.session_name.trim();
        if chat.is_empty() {
            b.note("skipped a fixed listener with an empty session_name".to_owned());
            continue;
        }
        if !fixed.enabled {
            b.note(format!(
                "skipped fixed listener {chat:?}: disabled in WXAUTO-MGT"
            ));
            continue;
        }
        let description = fixed.description.trim();
        if description.is_empty() {
            lines.push(format!("  - chat: {}", quote(chat)));
        } else {
            lines.push(format!(
                "  - chat: {}   # {}",
                quote(chat),
                comment(description)
            ));
        }
    }
    if lines.is_empty() {
        return;
    }
    b.line("");
    b.line("fixed_listeners:                  # on every instance, as in WXAUTO-MGT");
    b.counts.fixed_listeners = lines.len();
    for line in lines {
        b.line(&line);
    }
}

fn rules(
    b: &mut Builder,
    rules: &[MgtRule],
    instances: &HashMap<String, String>,
    platforms: &HashSet<String>,
) {
    let mut blocks = Vec::new();
    let mut taken = HashSet::new();
    for (n, rule) in rules.iter().enumerate() {
        let source_id = rule.rule_id.trim();
        let label = format!("rule {source_id:?}");
        if !rule.enabled {
            b.note(format!("skipped {label}: disabled in WXAUTO-MGT"));
            continue;
        }
        let instance = match rule.instance_id.trim() {
            "*" | "" => "*".to_owned(),
            id => match instances.get(id) {
                Some(id) => id.clone(),
                None => {
                    b.note(format!(
                        "skipped {label}: its instance {id:?} was not imported"
                    ));
                    continue;
                }
            },
        };
        let platform = rule.platform_id.trim();
        if !platforms.contains(platform) {
            b.note(format!(
                "skipped {label}: its platform {platform:?} was not imported"
            ));
            continue;
        }
        let Some((chat, chat_comment)) = chat_pattern(b, &rule.chat_pattern, &label) else {
            continue;
        };
        let at_names: Vec<String> = rule
            .at_name
            .split([',', '，'])
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| name.trim_start_matches('@').to_owned())
            .filter(|name| !name.is_empty())
            .collect();
        // WXAUTO-MGT applied the @-filter only with a non-empty at_name: an empty one let
        // every message through, which is a rule without the filter here.
        let only_at = rule.only_at && !rule.at_name.is_empty();
        if rule.only_at && !only_at {
            b.note(format!(
                "{label} is marked @-only but names no one (at_name is empty), so WXAUTO-MGT \
                 passed every message; imported without only_at, it takes every message of its \
                 chats"
            ));
        }
        if only_at && at_names.is_empty() {
            b.note(format!(
                "skipped {label}: it answers only @-mentions but its at_name {:?} names no one \
                 to mention",
                rule.at_name
            ));
            continue;
        }
        let fallback = format!("rule-{}", n + 1);
        let id = unique(
            if source_id.is_empty() {
                fallback
            } else {
                source_id.to_owned()
            },
            &mut taken,
        );
        let mut block = Vec::new();
        if !rule.name.trim().is_empty() {
            block.push(format!("  # {}", comment(&rule.name)));
        }
        block.push(format!("  - id: {}", quote(&id)));
        block.push(format!("    instance: {}", quote(&instance)));
        match chat_comment {
            Some(note) => block.push(format!("    chat: {}   # {note}", quote(&chat))),
            None => block.push(format!("    chat: {}", quote(&chat))),
        }
        block.push(format!("    platform: {}", quote(platform)));
        block.push(format!("    priority: {}", rule.priority));
        if rule.only_at && !only_at {
            block.push(
                "    # @-only in WXAUTO-MGT, but its empty at_name passed every message".to_owned(),
            );
        }
        if only_at {
            block.push("    only_at: true".to_owned());
            let names: Vec<String> = at_names.iter().map(|name| quote(name)).collect();
            block.push(format!("    at_names: [{}]", names.join(", ")));
        }
        if rule.reply_at_sender {
            block.push("    reply_at_sender: true".to_owned());
        }
        blocks.push(block);
    }
    if blocks.is_empty() {
        return;
    }
    b.line("");
    b.line("# Rules are tried by priority (higher first), then the more specific chat pattern, then id.");
    b.line("rules:");
    b.counts.rules = blocks.len();
    for line in blocks.into_iter().flatten() {
        b.line(&line);
    }
}

/// The sidecar's chat pattern for WXAUTO-MGT's, with an optional comment.
fn chat_pattern(b: &mut Builder, pattern: &str, label: &str) -> Option<(String, Option<String>)> {
    let pattern = pattern.trim();
    if pattern.is_empty() {
        b.note(format!("skipped {label}: its chat pattern is empty"));
        return None;
    }
    let Some(regex) = pattern.strip_prefix("regex:") else {
        return Some((pattern.to_owned(), None));
    };
    if regex.is_empty() {
        b.note(format!("skipped {label}: its regex is empty"));
        return None;
    }
    // WXAUTO-MGT matched with Python's re.match (anchored at the start only); the sidecar
    // anchors both ends, so a trailing `.*` keeps the old meaning.
    let translated = format!("(?:{regex}).*");
    if regex::Regex::new(&format!("^(?:{translated})$")).is_err() {
        b.note(format!(
            "skipped {label}: its regex uses syntax the sidecar's regex engine does not support \
             (look-around or backreferences)"
        ));
        return None;
    }
    Some((
        format!("regex:{translated}"),
        Some("WXAUTO-MGT matched the start only; `.*` keeps that".to_owned()),
    ))
}

// === impl Builder ===

impl Builder {
    fn line(&mut self, line: &str) {
        self.out.push_str(line.trim_end());
        self.out.push('\n');
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Records `value` under `variable`, or notes why it cannot be used.
    fn secret(&mut self, variable: &str, value: &Secret, label: &str) {
        let key = value.expose();
        if key.trim().is_empty() {
            self.note(format!(
                "{label} has no API key in WXAUTO-MGT; set {variable} yourself"
            ));
            self.unset.push(variable.to_owned());
        } else if key.chars().count() < MIN_KEY_CHARS {
            self.note(format!(
                "{label}: its API key is shorter than {MIN_KEY_CHARS} characters, which the \
                 sidecar refuses; set {variable} to a real key"
            ));
            self.unset.push(variable.to_owned());
        } else if key.contains(['\n', '\r', '\0']) {
            self.note(format!(
                "{label}: its API key contains a line break and cannot be written as NAME=value; \
                 set {variable} yourself"
            ));
            self.unset.push(variable.to_owned());
        } else {
            self.secrets.push((variable.to_owned(), value.clone()));
        }
    }
}

// === impl EnvNames ===

impl EnvNames {
    /// `wanted`, or `wanted_2`, `wanted_3`, … if taken.
    fn take(&mut self, wanted: &str) -> String {
        let name = unique(wanted.to_owned(), &mut self.0);
        self.0.insert(name.clone());
        name
    }
}

// === helpers ===

/// `wanted`, or `wanted_2`, `wanted_3`, … if `taken` has it; the result is added to `taken`.
fn unique(wanted: String, taken: &mut HashSet<String>) -> String {
    let mut name = wanted.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{wanted}_{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}
