//! YAML tags (`!duration 1s`, `!!binary …`) have no meaning in this config: a tagged scalar
//! is an error instead of being read as if the tag were not there.

use super::node::{Node, NodeKind};
use super::reader::{Ctx, field, index};

/// Records an error for every tagged scalar under `node`.
pub(super) fn check(ctx: &mut Ctx<'_>, node: &Node, text: &str) {
    walk(ctx, node, text, "");
}

fn walk(ctx: &mut Ctx<'_>, node: &Node, text: &str, path: &str) {
    match &node.kind {
        NodeKind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(ctx, item, text, &index(path, i));
            }
        }
        NodeKind::Map(entries) => {
            for (key, value) in entries {
                let name = match &key.kind {
                    NodeKind::Str(name) => name.clone(),
                    _ => String::from("?"),
                };
                let child = field(path, &name);
                if let Some(tag) = tag_of(key, text) {
                    ctx.error(
                        key,
                        &child,
                        format!("unknown YAML tag {tag}: tags are not supported"),
                    );
                }
                walk(ctx, value, text, &child);
            }
        }
        _ => {
            if let Some(tag) = tag_of(node, text) {
                ctx.error(
                    node,
                    path,
                    format!("unknown YAML tag {tag}: tags are not supported"),
                );
            }
        }
    }
}

/// The tag written before a scalar, if any.
fn tag_of<'t>(node: &Node, text: &'t str) -> Option<&'t str> {
    let (offset, _) = node.span?;
    let own = node.source_text(text).unwrap_or("");
    if own.starts_with('!') {
        return own.split_whitespace().next();
    }
    // The text between the previous indicator on this line and the scalar.
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    let line = &before[line_start..];
    let start = line
        .rfind([':', '-', '[', ',', '{', '?'])
        .map_or(0, |at| at + 1);
    let token = line[start..].trim();
    (token.starts_with('!')).then_some(token)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn errors(text: &str) -> Vec<String> {
        match super::super::decode(text, Some(Path::new("c.yaml")), &|_| None) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn tagged_scalars_are_errors() {
        let errors = errors("instances: []\nlistener:\n  poll_interval: !duration 1s\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("listener.poll_interval: unknown YAML tag !duration"),
            "{errors:?}"
        );
        assert!(errors[0].starts_with("c.yaml:3:"), "{errors:?}");
    }

    #[test]
    fn exclamation_marks_in_values_are_not_tags() {
        assert!(
            errors("instances: []\nlogging:\n  file_prefix: \"wow!\"\n  level: info\n").is_empty()
        );
    }
}
