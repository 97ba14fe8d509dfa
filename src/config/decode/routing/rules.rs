//! `rules:`: each rule's instance, chat pattern and platform reference, and the matching order.

use std::cmp::Reverse;

use super::super::node::Node;
use super::super::reader::{Ctx, IntRange, index};
use super::super::sections::KnownIds;
use super::{anchored_regex, unique_id};
use crate::config::{ChatPattern, InstanceSelector, RuleConfig};

const RULE_KEYS: &[&str] = &[
    "id",
    "instance",
    "chat",
    "platform",
    "priority",
    "only_at",
    "at_names",
    "reply_at_sender",
];

/// Decodes `rules:` and sorts them into matching order.
pub(in crate::config::decode) fn rules(
    ctx: &mut Ctx<'_>,
    node: Option<&Node>,
    instances: &KnownIds,
    platforms: &KnownIds,
) -> Vec<RuleConfig> {
    let path = "rules";
    let Some(items) = node.and_then(|node| ctx.seq(node, path)) else {
        return Vec::new();
    };
    let refs = Refs {
        instances,
        platforms,
    };
    let mut known = KnownIds::new();
    let mut rules = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some(rule) = rule(ctx, item, &index(path, i), &mut known, refs) {
            rules.push(rule);
        }
    }
    sort_rules(&mut rules);
    rules
}

/// Matching order: priority descending, then the more specific chat pattern, then id.
fn sort_rules(rules: &mut [RuleConfig]) {
    rules.sort_by(|a, b| {
        (Reverse(a.priority), Reverse(a.chat.specificity()), &a.id).cmp(&(
            Reverse(b.priority),
            Reverse(b.chat.specificity()),
            &b.id,
        ))
    });
}

/// The ids a rule may refer to.
#[derive(Clone, Copy)]
struct Refs<'a> {
    instances: &'a KnownIds,
    platforms: &'a KnownIds,
}

fn rule(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    known: &mut KnownIds,
    refs: Refs<'_>,
) -> Option<RuleConfig> {
    let fields = ctx.map(node, path)?;
    fields.check_allowed(ctx, RULE_KEYS, "");
    let id = fields
        .required(ctx, "id")
        .and_then(|id_node| unique_id(ctx, id_node, &fields.path_of("id"), known, "rule"));
    let instance = match fields.get("instance") {
        Some(node) => {
            let instance_path = fields.path_of("instance");
            ctx.string(node, &instance_path)
                .and_then(|text| match text.trim() {
                    "*" => Some(InstanceSelector::All),
                    id if refs.instances.contains_key(id) => {
                        Some(InstanceSelector::Ids(vec![id.to_owned()]))
                    }
                    _ => {
                        let message = format!("unknown instance id {text:?}");
                        ctx.error(node, &instance_path, message);
                        None
                    }
                })
        }
        None => Some(InstanceSelector::All),
    };
    let chat = match fields.get("chat") {
        Some(node) => chat_pattern(ctx, node, &fields.path_of("chat")),
        None => Some(ChatPattern::Any),
    };
    let platform = fields.required(ctx, "platform").and_then(|node| {
        let platform_path = fields.path_of("platform");
        let text = ctx.non_empty_string(node, &platform_path)?;
        if refs.platforms.contains_key(&text) {
            return Some(text);
        }
        ctx.error(node, &platform_path, format!("unknown platform {text:?}"));
        None
    });
    let priority = fields.int_or(
        ctx,
        "priority",
        IntRange::between(i128::from(i64::MIN), i128::from(i64::MAX)),
        0,
    );
    let only_at = fields.bool_or(ctx, "only_at", false);
    let at_names = match fields.get("at_names") {
        Some(node) => ctx.nonblank_list(node, &fields.path_of("at_names"), false),
        None => Some(Vec::new()),
    };
    if only_at && at_names.as_ref().is_some_and(Vec::is_empty) {
        let at = fields
            .get("at_names")
            .or_else(|| fields.get("only_at"))
            .unwrap_or(fields.node());
        let message = "must name at least one name when only_at is true";
        ctx.error(at, &fields.path_of("at_names"), message);
        return None;
    }
    let reply_at_sender = fields.bool_or(ctx, "reply_at_sender", false);
    Some(RuleConfig {
        id: id?,
        instance: instance?,
        chat: chat?,
        platform: platform?,
        priority: i64::try_from(priority).unwrap_or_default(),
        only_at,
        at_names: at_names?,
        reply_at_sender,
    })
}

/// `*`, `regex:<pattern>`, `"a, b, c"` or an exact chat name.
fn chat_pattern(ctx: &mut Ctx<'_>, node: &Node, path: &str) -> Option<ChatPattern> {
    let text = ctx.non_empty_string(node, path)?;
    if text.trim() == "*" {
        return Some(ChatPattern::Any);
    }
    if let Some(pattern) = text.strip_prefix("regex:") {
        if pattern.is_empty() {
            ctx.error(node, path, "empty pattern after \"regex:\"");
            return None;
        }
        return anchored_regex(ctx, node, path, pattern).map(ChatPattern::Regex);
    }
    if text.contains(',') {
        let names: Vec<String> = text.split(',').map(|name| name.trim().to_owned()).collect();
        if names.iter().any(String::is_empty) {
            let message = format!("empty name in chat list {text:?}");
            ctx.error(node, path, message);
            return None;
        }
        return Some(ChatPattern::List(names));
    }
    Some(ChatPattern::Exact(text))
}
