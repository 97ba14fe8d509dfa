//! What changed between two validated configs, so a reload restarts only what it must.
//!
//! Startup is a diff from an empty config. Platforms and rules hold `Regex`es (no `PartialEq`),
//! so they are compared field by field here, regexes by their source pattern.

use std::collections::HashSet;

use super::{
    ChatPattern, Config, InstanceConfig, KeywordEntry, PlatformConfig, PlatformKind, ProcessConfig,
    RuleConfig,
};

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Per-instance changes, in new-file order then removed ones.
    pub instances: Vec<(String, InstanceChange)>,
    /// `listener:` settings changed (every actor takes the new settings).
    pub listener_changed: bool,
    /// `fixed_listeners:` changed.
    pub fixed_listeners_changed: bool,
    /// `rules:` changed.
    pub rules_changed: bool,
    /// `platforms:` changed.
    pub platforms_changed: bool,
    /// `delivery:` changed.
    pub delivery_changed: bool,
    /// `health:` changed.
    pub health_changed: bool,
    /// `logging.level` changed (the filter is swapped live).
    pub log_level_changed: bool,
    /// Keys whose change only takes effect after a restart, e.g. `server.listen`.
    pub needs_restart: Vec<&'static str>,
    /// Per-process changes (`processes:`), in new-file order then removed ones.
    pub processes: Vec<(String, ProcessChange)>,
}

/// How one supervised process changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessChange {
    /// New in the new config: start it.
    Added,
    /// Gone from the new config: stop it.
    Removed,
    /// command, args, cwd or env changed: restart it.
    Restart,
    /// Only supervision settings changed (restart policy, backoff, stop...): applied in place.
    Settings,
}

/// The process changes from `old` to `new`, matched by name.
pub fn process_changes(
    old: &[ProcessConfig],
    new: &[ProcessConfig],
) -> Vec<(String, ProcessChange)> {
    let mut changes = Vec::new();
    for process in new {
        match old.iter().find(|previous| previous.name == process.name) {
            None => changes.push((process.name.clone(), ProcessChange::Added)),
            Some(previous) if previous.needs_restart_for(process) => {
                changes.push((process.name.clone(), ProcessChange::Restart));
            }
            Some(previous) if previous != process => {
                changes.push((process.name.clone(), ProcessChange::Settings));
            }
            Some(_) => {}
        }
    }
    for process in old {
        if !new.iter().any(|next| next.name == process.name) {
            changes.push((process.name.clone(), ProcessChange::Removed));
        }
    }
    changes
}

/// How one instance changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceChange {
    /// New in the new config.
    Added,
    /// Gone from the new config.
    Removed,
    /// base_url, key or enabled changed: restart its actor.
    Changed,
}

// === impl ConfigDiff ===

impl ConfigDiff {
    /// Compares two configs.
    ///
    /// Values read live wherever they are used (`server.enable_lifecycle`, the retention days)
    /// are not tracked: the caller swaps in the new config whatever the diff says.
    pub fn between(old: &Config, new: &Config) -> Self {
        let mut instances = Vec::new();
        for instance in &new.instances {
            match old.instance(&instance.id) {
                None => instances.push((instance.id.clone(), InstanceChange::Added)),
                Some(previous) if !same_instance(previous, instance) => {
                    instances.push((instance.id.clone(), InstanceChange::Changed));
                }
                Some(_) => {}
            }
        }
        let new_ids: HashSet<&str> = new.instances.iter().map(|i| i.id.as_str()).collect();
        for instance in &old.instances {
            if !new_ids.contains(instance.id.as_str()) {
                instances.push((instance.id.clone(), InstanceChange::Removed));
            }
        }

        let mut needs_restart = Vec::new();
        let restart_keys = [
            ("server.listen", old.server.listen != new.server.listen),
            (
                "server.web_config_file",
                old.server.web_config_file != new.server.web_config_file,
            ),
            (
                "server.open_probes",
                old.server.open_probes != new.server.open_probes,
            ),
            (
                "server.header_read_timeout",
                old.server.limits.header_read_timeout != new.server.limits.header_read_timeout,
            ),
            (
                "server.idle_timeout",
                old.server.limits.idle_timeout != new.server.limits.idle_timeout,
            ),
            (
                "server.max_connections",
                old.server.limits.max_connections != new.server.limits.max_connections,
            ),
            (
                "server.max_request_body_bytes",
                old.server.limits.max_request_body_bytes
                    != new.server.limits.max_request_body_bytes,
            ),
            ("storage.path", old.storage.path != new.storage.path),
            (
                "storage.synchronous",
                old.storage.synchronous != new.storage.synchronous,
            ),
            ("logging.dir", old.logging.dir != new.logging.dir),
            (
                "logging.file_prefix",
                old.logging.file_prefix != new.logging.file_prefix,
            ),
            ("logging.format", old.logging.format != new.logging.format),
        ];
        for (key, changed) in restart_keys {
            if changed {
                needs_restart.push(key);
            }
        }

        Self {
            instances,
            listener_changed: old.listener != new.listener
                || old.instance_listeners != new.instance_listeners,
            fixed_listeners_changed: old.fixed_listeners != new.fixed_listeners,
            rules_changed: !same_list(&old.rules, &new.rules, same_rule),
            platforms_changed: !same_list(&old.platforms, &new.platforms, same_platform),
            delivery_changed: old.delivery != new.delivery,
            health_changed: old.health != new.health,
            log_level_changed: old.logging.level != new.logging.level,
            needs_restart,
            processes: process_changes(&old.processes, &new.processes),
        }
    }

    /// Whether nothing tracked by the diff changed.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// One line for the log, e.g. `instances added [wx-b], changed [wx-a]; rules changed;
    /// needs restart: server.listen`. Names only instance ids and keys, never values.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let mut instance_parts = Vec::new();
        for (label, change) in [
            ("added", InstanceChange::Added),
            ("removed", InstanceChange::Removed),
            ("changed", InstanceChange::Changed),
        ] {
            let ids: Vec<&str> = self
                .instances
                .iter()
                .filter(|(_, c)| *c == change)
                .map(|(id, _)| id.as_str())
                .collect();
            if !ids.is_empty() {
                instance_parts.push(format!("{label} [{}]", ids.join(", ")));
            }
        }
        if !instance_parts.is_empty() {
            parts.push(format!("instances {}", instance_parts.join(", ")));
        }
        for (name, changed) in [
            ("listener", self.listener_changed),
            ("fixed_listeners", self.fixed_listeners_changed),
            ("rules", self.rules_changed),
            ("platforms", self.platforms_changed),
            ("delivery", self.delivery_changed),
            ("health", self.health_changed),
            ("logging.level", self.log_level_changed),
        ] {
            if changed {
                parts.push(format!("{name} changed"));
            }
        }
        let mut process_parts = Vec::new();
        for (label, change) in [
            ("added", ProcessChange::Added),
            ("removed", ProcessChange::Removed),
            ("restarted", ProcessChange::Restart),
            ("updated", ProcessChange::Settings),
        ] {
            let names: Vec<&str> = self
                .processes
                .iter()
                .filter(|(_, c)| *c == change)
                .map(|(name, _)| name.as_str())
                .collect();
            if !names.is_empty() {
                process_parts.push(format!("{label} [{}]", names.join(", ")));
            }
        }
        if !process_parts.is_empty() {
            parts.push(format!("processes {}", process_parts.join(", ")));
        }
        if !self.needs_restart.is_empty() {
            parts.push(format!("needs restart: {}", self.needs_restart.join(", ")));
        }
        if parts.is_empty() {
            "no changes".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

/// An instance actor must restart when anything it was built from differs.
fn same_instance(a: &InstanceConfig, b: &InstanceConfig) -> bool {
    a.base_url == b.base_url
        && a.api_key == b.api_key
        && a.api_key_source == b.api_key_source
        && a.enabled == b.enabled
}

fn same_list<T>(a: &[T], b: &[T], same: fn(&T, &T) -> bool) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| same(x, y))
}

fn same_rule(a: &RuleConfig, b: &RuleConfig) -> bool {
    a.id == b.id
        && a.instance == b.instance
        && same_chat(&a.chat, &b.chat)
        && a.platform == b.platform
        && a.priority == b.priority
        && a.only_at == b.only_at
        && a.at_names == b.at_names
        && a.reply_at_sender == b.reply_at_sender
}

fn same_chat(a: &ChatPattern, b: &ChatPattern) -> bool {
    match (a, b) {
        (ChatPattern::Any, ChatPattern::Any) => true,
        (ChatPattern::Exact(x), ChatPattern::Exact(y)) => x == y,
        (ChatPattern::List(x), ChatPattern::List(y)) => x == y,
        (ChatPattern::Regex(x), ChatPattern::Regex(y)) => x.as_str() == y.as_str(),
        _ => false,
    }
}

fn same_platform(a: &PlatformConfig, b: &PlatformConfig) -> bool {
    a.id == b.id
        && a.send_mode == b.send_mode
        && a.timeout == b.timeout
        && same_kind(&a.kind, &b.kind)
}

fn same_kind(a: &PlatformKind, b: &PlatformKind) -> bool {
    match (a, b) {
        (PlatformKind::Keyword(x), PlatformKind::Keyword(y)) => {
            same_list(&x.keywords, &y.keywords, same_keyword_entry)
        }
        (PlatformKind::Webhook(x), PlatformKind::Webhook(y)) => {
            x.url == y.url && x.headers == y.headers
        }
        (PlatformKind::OpenAi(x), PlatformKind::OpenAi(y)) => {
            x.api_base == y.api_base
                && x.api_key == y.api_key
                && x.model == y.model
                && x.system_prompt == y.system_prompt
                && x.temperature == y.temperature
                && x.max_tokens == y.max_tokens
                && x.history == y.history
                && x.vision == y.vision
        }
        (PlatformKind::Dify(x), PlatformKind::Dify(y)) => {
            x.api_base == y.api_base && x.api_key == y.api_key && x.user_id == y.user_id
        }
        (PlatformKind::Coze(x), PlatformKind::Coze(y)) => {
            x.api_base == y.api_base
                && x.api_key == y.api_key
                && x.bot_id == y.bot_id
                && x.workspace_id == y.workspace_id
                && x.continuous_conversation == y.continuous_conversation
        }
        _ => false,
    }
}

/// `patterns` are compiled from `keywords` and `match_type`, so they need no comparison.
fn same_keyword_entry(a: &KeywordEntry, b: &KeywordEntry) -> bool {
    a.keywords == b.keywords
        && a.match_type == b.match_type
        && a.replies == b.replies
        && a.random == b.random
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::decode;

    const KEY: &str = "diff-secret-Tk77";

    fn config(text: &str) -> Config {
        let env = |name: &str| match name {
            "KEY" => Some(KEY.to_owned()),
            "OTHER_KEY" => Some("other-secret-Rr55".to_owned()),
            _ => None,
        };
        match decode(text, None, &env) {
            Ok(loaded) => loaded.config,
            Err(errors) => panic!("{errors}"),
        }
    }

    const BASE: &str = "instances:
  - {id: wx-a, base_url: http://a, api_key_env: KEY}
  - {id: wx-b, base_url: http://b, api_key_env: KEY}
fixed_listeners:
  - chat: ops
platforms:
  - {id: p, type: webhook, url: http://hook, headers: {X-T: header-secret-Hh12}}
  - id: k
    type: keyword
    keywords:
      - {keywords: ['a.*'], match_type: regex, replies: [x]}
rules:
  - {id: r, platform: p, chat: 'regex:a.*'}
";

    /// BASE with `from` replaced by `to` (which must occur).
    fn changed(from: &str, to: &str) -> Config {
        assert!(BASE.contains(from), "{from:?} not in BASE");
        config(&BASE.replacen(from, to, 1))
    }

    #[test]
    fn identical_configs_differ_in_nothing() {
        let diff = ConfigDiff::between(&config(BASE), &config(BASE));
        assert!(diff.is_empty(), "{diff:?}");
        assert_eq!(diff.summary(), "no changes");
    }

    #[test]
    fn startup_is_a_diff_from_an_empty_config() {
        let diff = ConfigDiff::between(&config("instances: []\n"), &config(BASE));
        assert_eq!(
            diff.instances,
            [
                ("wx-a".to_owned(), InstanceChange::Added),
                ("wx-b".to_owned(), InstanceChange::Added)
            ]
        );
        assert!(diff.fixed_listeners_changed && diff.rules_changed && diff.platforms_changed);
        assert_eq!(
            diff.summary(),
            "instances added [wx-a, wx-b]; fixed_listeners changed; rules changed; platforms changed"
        );
    }

    #[test]
    fn instance_changes() {
        let old = config(BASE);
        // (replace this, with this, expected instance changes)
        type Case<'a> = (&'a str, &'a str, &'a [(&'a str, InstanceChange)]);
        let cases: &[Case<'_>] = &[
            (
                "{id: wx-a, base_url: http://a,",
                "{id: wx-a, base_url: http://a2,",
                &[("wx-a", InstanceChange::Changed)],
            ),
            (
                "{id: wx-b, base_url: http://b, api_key_env: KEY}",
                "{id: wx-b, base_url: http://b, api_key_env: OTHER_KEY}",
                &[("wx-b", InstanceChange::Changed)],
            ),
            (
                "{id: wx-b, base_url: http://b, api_key_env: KEY}",
                "{id: wx-b, base_url: http://b, api_key_env: KEY, enabled: false}",
                &[("wx-b", InstanceChange::Changed)],
            ),
            (
                // Same key value from another source: the source is part of the identity.
                "{id: wx-b, base_url: http://b, api_key_env: KEY}",
                "{id: wx-b, base_url: http://b, api_key: diff-secret-Tk77}",
                &[("wx-b", InstanceChange::Changed)],
            ),
            (
                "  - {id: wx-b, base_url: http://b, api_key_env: KEY}\n",
                "  - {id: wx-c, base_url: http://b, api_key_env: KEY}\n",
                &[
                    ("wx-c", InstanceChange::Added),
                    ("wx-b", InstanceChange::Removed),
                ],
            ),
        ];
        for (from, to, expected) in cases {
            let diff = ConfigDiff::between(&old, &changed(from, to));
            let actual: Vec<(&str, InstanceChange)> = diff
                .instances
                .iter()
                .map(|(id, change)| (id.as_str(), *change))
                .collect();
            assert_eq!(&actual, expected, "{from:?} -> {to:?}");
            assert!(!diff.rules_changed && !diff.platforms_changed, "{diff:?}");
        }
    }

    #[test]
    fn section_changes() {
        let old = config(BASE);
        let cases: &[(&str, &str, &str)] = &[
            (
                "instances:",
                "listener: {poll_interval: 1s}\ninstances:",
                "listener changed",
            ),
            ("chat: ops", "chat: dev", "fixed_listeners changed"),
            ("chat: 'regex:a.*'", "chat: 'regex:b.*'", "rules changed"),
            ("platform: p,", "platform: k,", "rules changed"),
            (
                "header-secret-Hh12",
                "header-secret-Hh13",
                "platforms changed",
            ),
            (
                "keywords: ['a.*']",
                "keywords: ['b.*']",
                "platforms changed",
            ),
            (
                "instances:",
                "delivery: {workers: 2}\ninstances:",
                "delivery changed",
            ),
            (
                "instances:",
                "health: {window: 2h}\ninstances:",
                "health changed",
            ),
            (
                "instances:",
                "logging: {level: debug}\ninstances:",
                "logging.level changed",
            ),
            (
                "instances:",
                "server: {listen: '127.0.0.1:9999'}\ninstances:",
                "needs restart: server.listen",
            ),
            (
                "instances:",
                "storage: {path: x.db}\nlogging: {dir: logs, file_prefix: x}\ninstances:",
                "needs restart: storage.path, logging.dir, logging.file_prefix",
            ),
            (
                "instances:",
                "logging: {format: json}\ninstances:",
                "needs restart: logging.format",
            ),
        ];
        for (from, to, summary) in cases {
            let diff = ConfigDiff::between(&old, &changed(from, to));
            assert!(diff.instances.is_empty(), "{diff:?}");
            assert_eq!(diff.summary(), *summary, "{from:?} -> {to:?}");
            assert!(!diff.is_empty());
        }
    }

    /// An instance's own listener keys are settings: changing them sends every actor its
    /// settings (`listener_changed`) and restarts no instance.
    #[test]
    fn an_instance_listener_change_is_a_live_setting() {
        let own = changed(
            "api_key_env: KEY}\n  - {id: wx-b",
            "api_key_env: KEY, listener: {poll_interval: 1s}}\n  - {id: wx-b",
        );
        let diff = ConfigDiff::between(&config(BASE), &own);
        assert!(diff.listener_changed, "{diff:?}");
        assert!(diff.instances.is_empty(), "{diff:?}");
        assert_eq!(
            own.listener_for("wx-a").poll_interval,
            std::time::Duration::from_secs(1)
        );
        assert_eq!(
            own.listener_for("wx-b").poll_interval,
            std::time::Duration::from_secs(5)
        );
        let slower = changed(
            "api_key_env: KEY}\n  - {id: wx-b",
            "api_key_env: KEY, listener: {poll_interval: 2s}}\n  - {id: wx-b",
        );
        assert!(ConfigDiff::between(&own, &slower).listener_changed);
        assert!(ConfigDiff::between(&own, &own).is_empty());
    }

    #[test]
    fn live_settings_are_not_restarts() {
        let new = changed(
            "instances:",
            "server: {enable_lifecycle: true}\nstorage: {retention_days: 30}\nlogging: {redact_chat_names: true}\ninstances:",
        );
        let diff = ConfigDiff::between(&config(BASE), &new);
        assert!(diff.needs_restart.is_empty(), "{diff:?}");
    }

    #[test]
    fn summary_lists_everything_and_no_secret() {
        let old = config(BASE);
        let new = config(
            "server: {listen: '0.0.0.0:1'}
instances:
  - {id: wx-a, base_url: http://a, api_key_env: OTHER_KEY}
  - {id: wx-new, base_url: http://n, api_key_env: KEY}
platforms:
  - {id: p, type: webhook, url: http://hook, headers: {X-T: header-secret-Hh99}}
",
        );
        let summary = ConfigDiff::between(&old, &new).summary();
        assert_eq!(
            summary,
            "instances added [wx-new], removed [wx-b], changed [wx-a]; fixed_listeners changed; \
             rules changed; platforms changed; needs restart: server.listen"
        );
        for secret in [
            KEY,
            "other-secret-Rr55",
            "header-secret-Hh12",
            "header-secret-Hh99",
        ] {
            assert!(!summary.contains(secret));
        }
    }

    #[test]
    fn process_changes_restart_only_what_they_must() {
        let base = "instances: []
processes:
  - {name: api, command: python, args: [run.py], env: {A: '1'}}
  - {name: keep, command: sleep, args: ['60']}
  - {name: gone, command: sleep, args: ['60']}
";
        let next = "instances: []
processes:
  - {name: api, command: python, args: [run.py], env: {A: '2'}}
  - {name: keep, command: sleep, args: ['60'], restart: always, stop_timeout: 3s}
  - {name: new, command: sleep, args: ['1']}
";
        let diff = ConfigDiff::between(&config(base), &config(next));
        assert_eq!(
            diff.processes,
            [
                ("api".to_owned(), ProcessChange::Restart),
                ("keep".to_owned(), ProcessChange::Settings),
                ("new".to_owned(), ProcessChange::Added),
                ("gone".to_owned(), ProcessChange::Removed),
            ]
        );
        assert_eq!(
            diff.summary(),
            "processes added [new], removed [gone], restarted [api], updated [keep]"
        );
        assert!(ConfigDiff::between(&config(base), &config(base)).is_empty());
    }

    #[test]
    fn every_coze_setting_is_a_platform_change() {
        let coze = |extra: &str| {
            config(&format!(
                "instances: []\nplatforms:\n  - {{id: c, type: coze, api_key_env: KEY, bot_id: b{extra}}}\n"
            ))
        };
        let base = coze("");
        assert!(ConfigDiff::between(&base, &coze("")).is_empty());
        for extra in [
            ", api_base: 'https://api.coze.com'",
            ", workspace_id: w",
            ", continuous_conversation: true",
            ", timeout: 3s",
        ] {
            let diff = ConfigDiff::between(&base, &coze(extra));
            assert!(diff.platforms_changed, "{extra}");
        }
        let other_bot = config(
            "instances: []\nplatforms:\n  - {id: c, type: coze, api_key_env: KEY, bot_id: b2}\n",
        );
        assert!(ConfigDiff::between(&base, &other_bot).platforms_changed);
        let other_key = config(
            "instances: []\nplatforms:\n  - {id: c, type: coze, api_key_env: OTHER_KEY, bot_id: b}\n",
        );
        assert!(ConfigDiff::between(&base, &other_key).platforms_changed);
    }
}
