//! `instances:` (ids, URLs, API keys) and `fixed_listeners:`.

use super::super::keys;
use super::super::node::{Node, NodeKind};
use super::super::reader::{Ctx, index};
use std::collections::BTreeMap;

use super::{KnownIds, http_url, listener_over};
use crate::config::{FixedListener, InstanceConfig, InstanceSelector, ListenerConfig};

const INSTANCE_KEYS: &[&str] = &[
    "id",
    "base_url",
    "api_key_env",
    "api_key_file",
    "api_key",
    "enabled",
    "listener",
];
const FIXED_LISTENER_KEYS: &[&str] = &["chat", "instances"];

/// The instances, their ids, and the listener settings of those with `listener:` keys of
/// their own (over `global`).
pub(super) fn instances(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    global: &ListenerConfig,
) -> (
    Vec<InstanceConfig>,
    KnownIds,
    BTreeMap<String, ListenerConfig>,
) {
    let mut known = KnownIds::new();
    let mut listeners = BTreeMap::new();
    let Some(items) = ctx.seq(node, path) else {
        return (Vec::new(), known, listeners);
    };
    let mut instances = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        if let Some((instance, own)) = instance(ctx, item, &index(path, i), &mut known, global) {
            if let Some(own) = own {
                listeners.insert(instance.id.clone(), own);
            }
            instances.push(instance);
        }
    }
    (instances, known, listeners)
}

/// One instance, and its own listener settings when it has a `listener:` map.
fn instance(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    known: &mut KnownIds,
    global: &ListenerConfig,
) -> Option<(InstanceConfig, Option<ListenerConfig>)> {
    let fields = ctx.map(node, path)?;
    fields.check_allowed(ctx, INSTANCE_KEYS, "");
    let id = fields.required(ctx, "id").and_then(|id_node| {
        let id_path = fields.path_of("id");
        let id = ctx.string(id_node, &id_path)?;
        if let Some(first) = known.get(&id) {
            let message = format!("duplicate instance id {id:?} (first defined at line {first})");
            ctx.error(id_node, &id_path, message);
            return None;
        }
        known.insert(id.clone(), id_node.line);
        if !valid_id(&id) {
            let message = format!(
                "invalid instance id {id:?}: use 1 to 64 characters from A-Z a-z 0-9 _ . -"
            );
            ctx.error(id_node, &id_path, message);
            return None;
        }
        Some(id)
    });
    let base_url = fields
        .required(ctx, "base_url")
        .and_then(|url_node| http_url(ctx, url_node, &fields.path_of("base_url")));
    let key = keys::api_key(ctx, &fields);
    let enabled = fields.bool_or(ctx, "enabled", true);
    let listener = fields
        .get_raw("listener")
        .map(|node| listener_over(ctx, Some(node), &fields.path_of("listener"), global));
    let (api_key, api_key_source) = key?;
    let instance = InstanceConfig {
        id: id?,
        base_url: base_url?,
        api_key,
        api_key_source,
        enabled,
    };
    Some((instance, listener))
}

/// `[A-Za-z0-9_.-]{1,64}`: ids become metric label values and file-name parts.
fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

// === fixed listeners ===

pub(super) fn fixed_listeners(
    ctx: &mut Ctx<'_>,
    node: Option<&Node>,
    known: &KnownIds,
) -> Vec<FixedListener> {
    let path = "fixed_listeners";
    let Some(items) = node.and_then(|node| ctx.seq(node, path)) else {
        return Vec::new();
    };
    let mut fixed = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        let Some(fields) = ctx.map(item, &item_path) else {
            continue;
        };
        fields.check_allowed(ctx, FIXED_LISTENER_KEYS, "");
        let chat = fields
            .required(ctx, "chat")
            .and_then(|chat| ctx.non_empty_string(chat, &fields.path_of("chat")));
        let instances = match fields.get("instances") {
            Some(node) => instance_list(ctx, node, &fields.path_of("instances"), known),
            None => Some(InstanceSelector::All),
        };
        if let (Some(chat), Some(instances)) = (chat, instances) {
            fixed.push(FixedListener { chat, instances });
        }
    }
    fixed
}

/// `"*"`, or a list of known instance ids (a `"*"` item selects all).
fn instance_list(
    ctx: &mut Ctx<'_>,
    node: &Node,
    path: &str,
    known: &KnownIds,
) -> Option<InstanceSelector> {
    if let NodeKind::Str(text) = &node.kind {
        if text.trim() == "*" {
            return Some(InstanceSelector::All);
        }
        ctx.error(node, path, "expected \"*\" or a list of instance ids");
        return None;
    }
    let NodeKind::Seq(items) = &node.kind else {
        ctx.type_error(node, path, "\"*\" or a list of instance ids");
        return None;
    };
    if items.is_empty() {
        ctx.error(
            node,
            path,
            "must not be empty; use \"*\" for every instance",
        );
        return None;
    }
    let mut ids = Vec::with_capacity(items.len());
    let mut all = false;
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = index(path, i);
        let Some(id) = ctx.string(item, &item_path) else {
            ok = false;
            continue;
        };
        if id == "*" {
            all = true;
        } else if known.contains_key(&id) {
            ids.push(id);
        } else {
            ctx.error(item, &item_path, format!("unknown instance id {id:?}"));
            ok = false;
        }
    }
    match (ok, all) {
        (false, _) => None,
        (true, true) => Some(InstanceSelector::All),
        (true, false) => Some(InstanceSelector::Ids(ids)),
    }
}
