//! Where the imported rules route differently: in WXAUTO-MGT the first matching rule took a
//! message even when its @-filter then dropped it; the sidecar lets the message fall through to
//! the rules tried after it. Each @-only rule with such a rule behind it gets a note.

use crate::config::{self, ChatPattern, InstanceSelector, RuleConfig};

/// Notes for the rules of `yaml` (the generated config so far), in matching order. The rules
/// come from the real decoder, so the order and the patterns are the sidecar's own; every
/// environment variable gets a placeholder (the import's self-check does the same).
pub(super) fn notes(yaml: &str) -> Vec<String> {
    let lookup = |_: &str| Some("placeholder-for-check".to_owned());
    // A YAML that does not decode is refused by the self-check, with the decoder's errors.
    let Ok(loaded) = config::decode(yaml, None, &lookup) else {
        return Vec::new();
    };
    let rules = &loaded.config.rules;
    let mut notes = Vec::new();
    for (n, rule) in rules.iter().enumerate() {
        if !rule.only_at {
            continue;
        }
        let behind: Vec<String> = rules[n + 1..]
            .iter()
            .filter(|later| may_share_chats(rule, later))
            .map(|later| format!("{:?}", later.id))
            .collect();
        let takers = match behind.as_slice() {
            [] => continue,
            [one] => format!("rule {one}, which may match the same chats"),
            many => format!("rules {}, which may match the same chats", many.join(", ")),
        };
        notes.push(format!(
            "rule {:?} answers only @-mentions: WXAUTO-MGT dropped the other messages of its \
             chats, here they fall through to {takers}",
            rule.id
        ));
    }
    notes
}

/// Whether some message could match both rules' instance and chat.
fn may_share_chats(a: &RuleConfig, b: &RuleConfig) -> bool {
    let instances = match (&a.instance, &b.instance) {
        (InstanceSelector::All, _) | (_, InstanceSelector::All) => true,
        (InstanceSelector::Ids(x), InstanceSelector::Ids(y)) => x.iter().any(|id| y.contains(id)),
    };
    instances && may_share_chat(&a.chat, &b.chat)
}

fn may_share_chat(a: &ChatPattern, b: &ChatPattern) -> bool {
    match (a, b) {
        (ChatPattern::Any, _) | (_, ChatPattern::Any) => true,
        (ChatPattern::Exact(name), other) | (other, ChatPattern::Exact(name)) => {
            other.matches(name)
        }
        (ChatPattern::List(names), other) | (other, ChatPattern::List(names)) => {
            names.iter().any(|name| other.matches(name))
        }
        // Whether two regexes share a match is not worth deciding here: say they may.
        (ChatPattern::Regex(_), ChatPattern::Regex(_)) => true,
    }
}
