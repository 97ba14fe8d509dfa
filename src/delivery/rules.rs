//! Routing: which rule, hence which platform, takes a message; an immutable snapshot that
//! hot reload swaps as a whole.
//!
//! Order: priority (higher first), then chat-pattern specificity (exact > list > regex > `*`),
//! then rule id. The first rule whose instance and chat match and whose `only_at` condition
//! holds wins; a rule whose `only_at` fails falls through to the next one.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{PlatformConfig, RuleConfig};
use crate::message::InboundMessage;

use super::platforms::Platform;

/// Rules plus the platforms they name: the routing configuration of one config generation.
pub struct Routing {
    rules: Vec<RuleConfig>,
    platforms: HashMap<String, Arc<Platform>>,
}

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteDecision {
    /// Store it and deliver it to `platform_id`.
    Deliver {
        /// The rule that matched.
        rule_id: String,
        /// Its platform.
        platform_id: String,
    },
    /// Count it as dropped and forget it.
    Drop {
        /// Why.
        reason: DropReason,
    },
}

/// Why routing dropped a message (the `reason` label of `wxauto_messages_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No rule matches its instance and chat.
    NoRule,
    /// A rule matched, but its `only_at` condition failed and no later rule took it.
    AtFilter,
}

// === impl Routing ===

impl Routing {
    /// Builds the snapshot. `rules` normally arrive sorted already; they are sorted again
    /// (stably, by the same key) so that matching never depends on the caller's order.
    /// A rule naming an unknown platform is skipped with a warning (validation rejects it).
    pub fn new(rules: &[RuleConfig], platforms: &[PlatformConfig], http: reqwest::Client) -> Self {
        let platforms: HashMap<String, Arc<Platform>> = platforms
            .iter()
            .map(|config| (config.id.clone(), Arc::new(Platform::new(config, &http))))
            .collect();
        let mut rules: Vec<RuleConfig> = rules
            .iter()
            .filter(|rule| {
                let known = platforms.contains_key(&rule.platform);
                if !known {
                    tracing::warn!(rule = %rule.id, platform = %rule.platform,
                        "Rule names an unknown platform; skipped.");
                }
                known
            })
            .cloned()
            .collect();
        rules.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| b.chat.specificity().cmp(&a.chat.specificity()))
                .then_with(|| a.id.cmp(&b.id))
        });
        Self { rules, platforms }
    }

    /// Decides where a message goes.
    pub fn route(&self, msg: &InboundMessage) -> RouteDecision {
        match self.matching_rule(msg) {
            Ok(rule) => RouteDecision::Deliver {
                rule_id: rule.id.clone(),
                platform_id: rule.platform.clone(),
            },
            Err(reason) => RouteDecision::Drop { reason },
        }
    }

    /// The rule that takes `msg`, or why none does.
    pub(crate) fn matching_rule(&self, msg: &InboundMessage) -> Result<&RuleConfig, DropReason> {
        let mut reason = DropReason::NoRule;
        for rule in &self.rules {
            if !rule.instance.matches(&msg.instance_id) || !rule.chat.matches(&msg.chat) {
                continue;
            }
            if rule.only_at && !mentions_any(&msg.content, &rule.at_names) {
                reason = DropReason::AtFilter;
                continue;
            }
            return Ok(rule);
        }
        Err(reason)
    }

    /// Whether some rule could take messages of this chat (ignoring `only_at`, which depends
    /// on each message's content).
    ///
    /// With no rules at all the sidecar runs as a pure listener (monitoring only): every chat
    /// is worth listening to, and its messages are counted as dropped with reason `no_rule`.
    pub fn wants_chat(&self, instance_id: &str, chat: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        self.rules
            .iter()
            .any(|rule| rule.instance.matches(instance_id) && rule.chat.matches(chat))
    }

    /// A platform by id.
    pub(crate) fn platform(&self, id: &str) -> Option<&Arc<Platform>> {
        self.platforms.get(id)
    }

    /// The configured platform ids.
    pub(crate) fn platform_ids(&self) -> impl Iterator<Item = &str> {
        self.platforms.keys().map(String::as_str)
    }

    /// The rules in matching order.
    #[cfg(test)]
    pub(crate) fn rule_ids(&self) -> Vec<&str> {
        self.rules.iter().map(|rule| rule.id.as_str()).collect()
    }
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field(
                "rules",
                &self.rules.iter().map(|r| &r.id).collect::<Vec<_>>(),
            )
            .field("platforms", &self.platforms.keys().collect::<Vec<_>>())
            .finish()
    }
}

// === impl DropReason ===

impl DropReason {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoRule => "no_rule",
            Self::AtFilter => "at_filter",
        }
    }
}

/// Whether `content` @-mentions one of `names`: `@name` followed by the end of the text or
/// whitespace (WeChat puts U+2005 after a mention), so `@bob` does not match `@bobby`.
///
/// An empty `names` list imposes no condition, as in WXAUTO-MGT.
fn mentions_any(content: &str, names: &[String]) -> bool {
    let names: Vec<&str> = names
        .iter()
        .map(|name| name.trim())
        .filter(|name| !name.is_empty())
        .collect();
    if names.is_empty() {
        return true;
    }
    names.iter().any(|name| {
        let needle = format!("@{name}");
        content.match_indices(&needle).any(|(at, _)| {
            content[at + needle.len()..]
                .chars()
                .next()
                .is_none_or(char::is_whitespace)
        })
    })
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use regex::Regex;

    use super::*;
    use crate::config::{ChatPattern, InstanceSelector, KeywordPlatform, PlatformKind, SendMode};

    fn platform(id: &str) -> PlatformConfig {
        PlatformConfig {
            id: id.to_owned(),
            send_mode: SendMode::Normal,
            timeout: std::time::Duration::from_secs(1),
            kind: PlatformKind::Keyword(KeywordPlatform { keywords: vec![] }),
        }
    }

    fn rule(id: &str, instance: &str, chat: ChatPattern, priority: i64) -> RuleConfig {
        RuleConfig {
            id: id.to_owned(),
            instance: if instance == "*" {
                InstanceSelector::All
            } else {
                InstanceSelector::Ids(vec![instance.to_owned()])
            },
            chat,
            platform: format!("p-{id}"),
            priority,
            only_at: false,
            at_names: vec![],
            reply_at_sender: false,
        }
    }

    fn at(mut rule: RuleConfig, names: &[&str]) -> RuleConfig {
        rule.only_at = true;
        rule.at_names = names.iter().map(|n| (*n).to_owned()).collect();
        rule
    }

    fn msg(instance: &str, chat: &str, content: &str) -> InboundMessage {
        InboundMessage {
            instance_id: instance.to_owned(),
            chat: chat.to_owned(),
            message_id: "m".to_owned(),
            synthetic_id: false,
            msg_type: "friend".to_owned(),
            sender: "alice".to_owned(),
            sender_remark: None,
            content: content.to_owned(),
            mtype: None,
            file_path: None,
            received_at: Utc::now(),
            epoch: 0,
        }
    }

    fn anchored(pattern: &str) -> ChatPattern {
        ChatPattern::Regex(Regex::new(&format!("^(?:{pattern})$")).expect("valid regex"))
    }

    fn routing(rules: Vec<RuleConfig>) -> Routing {
        let platforms: Vec<PlatformConfig> =
            rules.iter().map(|rule| platform(&rule.platform)).collect();
        let _ = rustls::crypto::ring::default_provider().install_default();
        Routing::new(&rules, &platforms, reqwest::Client::new())
    }

    fn routing_without_rules() -> Routing {
        routing(Vec::new())
    }

    #[test]
    fn order_is_priority_then_specificity_then_id() {
        // Deliberately shuffled input.
        let routing = routing(vec![
            rule("z-any", "*", ChatPattern::Any, 0),
            rule("b-regex", "*", anchored("team-.*"), 0),
            rule(
                "a-list",
                "*",
                ChatPattern::List(vec!["x".into(), "y".into()]),
                0,
            ),
            rule("c-exact", "*", ChatPattern::Exact("x".into()), 0),
            rule("high-any", "*", ChatPattern::Any, 10),
            rule("a-any", "*", ChatPattern::Any, 0),
        ]);
        assert_eq!(
            routing.rule_ids(),
            ["high-any", "c-exact", "a-list", "b-regex", "a-any", "z-any"]
        );
    }

    #[test]
    fn routes_table() {
        let routing = routing(vec![
            at(
                rule("vip-at", "wx1", ChatPattern::Exact("vip".into()), 5),
                &["bot"],
            ),
            rule("team", "*", anchored("team-[0-9]+"), 1),
            rule(
                "pair",
                "wx2",
                ChatPattern::List(vec!["a".into(), "b".into()]),
                1,
            ),
            at(
                rule("group-at", "*", ChatPattern::Exact("g".into()), 1),
                &["bot", "助手"],
            ),
            rule("fallback-wx1", "wx1", ChatPattern::Any, 0),
        ]);
        let deliver = |rule: &str| RouteDecision::Deliver {
            rule_id: rule.to_owned(),
            platform_id: format!("p-{rule}"),
        };
        let drop = |reason| RouteDecision::Drop { reason };
        let cases = [
            // (instance, chat, content, expected)
            ("wx1", "vip", "@bot hi", deliver("vip-at")),
            ("wx1", "vip", "@bot\u{2005}hi", deliver("vip-at")),
            ("wx1", "vip", "hi @bot", deliver("vip-at")),
            // The @-filter fails: fall through to the catch-all of wx1.
            ("wx1", "vip", "hi", deliver("fallback-wx1")),
            ("wx1", "vip", "@bobby hi", deliver("fallback-wx1")),
            ("wx1", "team-12", "x", deliver("team")),
            // Fully anchored: no prefix or suffix match.
            ("wx2", "team-12x", "x", drop(DropReason::NoRule)),
            ("wx2", "my-team-12", "x", drop(DropReason::NoRule)),
            ("wx2", "a", "x", deliver("pair")),
            ("wx2", "c", "x", drop(DropReason::NoRule)),
            ("wx3", "a", "x", drop(DropReason::NoRule)),
            // Matched a rule whose @-filter failed, and nothing later took it.
            ("wx2", "g", "hello", drop(DropReason::AtFilter)),
            ("wx2", "g", "@助手 hello", deliver("group-at")),
            ("wx1", "g", "hello", deliver("fallback-wx1")),
        ];
        for (instance, chat, content, expected) in cases {
            assert_eq!(
                routing.route(&msg(instance, chat, content)),
                expected,
                "{instance}/{chat}/{content:?}"
            );
        }
    }

    #[test]
    fn wants_chat_ignores_only_at() {
        let routing = routing(vec![
            at(
                rule("g", "wx1", ChatPattern::Exact("g".into()), 0),
                &["bot"],
            ),
            rule("t", "*", anchored("t.*"), 0),
        ]);
        assert!(routing.wants_chat("wx1", "g"));
        assert!(!routing.wants_chat("wx2", "g"));
        assert!(routing.wants_chat("wx2", "tea"));
        assert!(!routing.wants_chat("wx2", "x"));
        assert!(
            routing_without_rules().wants_chat("wx2", "x"),
            "no rules: listen to all"
        );
    }

    #[test]
    fn empty_at_names_impose_nothing() {
        assert!(mentions_any("hello", &[]));
        assert!(mentions_any("hello", &[" ".to_owned()]));
        assert!(!mentions_any("hello", &["bot".to_owned()]));
        assert!(mentions_any("@bot", &["bot".to_owned()]));
    }

    #[test]
    fn rule_with_unknown_platform_is_skipped() {
        let mut orphan = rule("orphan", "*", ChatPattern::Any, 9);
        orphan.platform = "missing".to_owned();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let routing = Routing::new(
            &[orphan, rule("ok", "*", ChatPattern::Any, 0)],
            &[platform("p-ok")],
            reqwest::Client::new(),
        );
        assert_eq!(routing.rule_ids(), ["ok"]);
    }
}
