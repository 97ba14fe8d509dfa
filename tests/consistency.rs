//! Repository consistency: relative links in the docs resolve, the docs cite only files in the
//! repository, and the memory alert sits below the shipped Kubernetes memory limit.

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, ARCHITECTURE.md, CHANGELOG.md and every markdown file under docs/.
fn markdown_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = ["README.md", "ARCHITECTURE.md", "CHANGELOG.md"]
        .iter()
        .map(|name| root().join(name))
        .filter(|path| path.exists())
        .collect();
    let mut dirs = vec![root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "md") {
                files.push(path);
            }
        }
    }
    files
}

/// The targets of inline links and images, `[text](target)`, outside code spans and fences.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Drop inline code spans: `[a](b)` inside backticks is not a link.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = rest[..end].split_whitespace().next().unwrap_or("");
            targets.push(target.to_owned());
            rest = &rest[end..];
        }
    }
    targets
}

/// GitHub's heading anchors: lowercase, spaces to `-`, punctuation other than `-`/`_` dropped.
fn anchors(text: &str) -> Vec<String> {
    text.lines()
        .filter(|line| line.starts_with('#'))
        .map(|line| {
            line.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn relative_markdown_links_resolve() {
    let files = markdown_files();
    assert!(files.len() >= 5, "found only {files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for target in link_targets(&text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            let name = file.strip_prefix(root()).unwrap().display().to_string();
            if !resolved.exists() {
                broken.push(format!("{name}: {target} (no such file)"));
                continue;
            }
            if let Some(anchor) = anchor
                && resolved.extension().is_some_and(|ext| ext == "md")
            {
                let target_text = std::fs::read_to_string(&resolved).unwrap();
                if !anchors(&target_text).iter().any(|known| known == anchor) {
                    broken.push(format!("{name}: {target} (no such heading)"));
                }
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} relative links: parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn docs_cite_only_files_in_the_repository() {
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        // The contract the docs rely on lives in docs/reference.md and docs/configuration.md.
        assert!(!text.contains("CONTRACT"), "{name} cites CONTRACT.md");
        assert!(
            !text.contains("../shared/") && !text.contains("/work/"),
            "{name} points outside the repository"
        );
    }
    for doc in ["docs/configuration.md", "docs/reference.md"] {
        assert!(root().join(doc).is_file(), "{doc} is missing");
    }
}

#[test]
fn the_link_parser_sees_links_and_skips_code() {
    let text = "See [a](docs/a.md#x) and `[b](nope.md)`.\n```\n[c](nope.md)\n```\n![img](docs/s.png \"t\")\n";
    assert_eq!(link_targets(text), ["docs/a.md#x", "docs/s.png"]);
    assert_eq!(
        anchors("## Running on Windows beside WeChat\n### `check-config`: exit 1\n"),
        ["running-on-windows-beside-wechat", "check-config-exit-1"]
    );
}

/// Mebibytes from a Kubernetes quantity like `256Mi` or `1Gi`.
fn mebibytes(quantity: &str) -> f64 {
    let quantity = quantity.trim();
    if let Some(n) = quantity.strip_suffix("Mi") {
        n.parse().unwrap()
    } else if let Some(n) = quantity.strip_suffix("Gi") {
        n.parse::<f64>().unwrap() * 1024.0
    } else {
        panic!("unexpected quantity {quantity}")
    }
}

#[test]
fn the_memory_alert_fires_below_the_shipped_memory_limit() {
    let deployment =
        std::fs::read_to_string(root().join("deploy/kubernetes/deployment.yaml")).unwrap();
    let after_limits = deployment
        .split("limits:")
        .nth(1)
        .expect("a limits: block in the Deployment");
    let limit = after_limits
        .lines()
        .find_map(|line| line.trim().strip_prefix("memory:"))
        .map(mebibytes)
        .expect("a memory limit");
    let rules = std::fs::read_to_string(root().join("alerts/wxauto-sidecar.rules.yml")).unwrap();
    let expr = rules
        .split("alert: WxautoHighMemory")
        .nth(1)
        .and_then(|rest| rest.lines().find(|line| line.contains("expr:")))
        .expect("WxautoHighMemory expr");
    // `process_resident_memory_bytes{...} > 200 * 1024 * 1024`
    let threshold_mib: f64 = expr
        .split('>')
        .nth(1)
        .and_then(|rhs| rhs.split('*').next())
        .map(|n| n.trim().parse().unwrap())
        .expect("threshold");
    assert!(
        threshold_mib < limit && threshold_mib >= 0.6 * limit,
        "WxautoHighMemory at {threshold_mib} MiB should sit at 60-99% of the {limit} MiB limit"
    );
}

/// The string literals of every `const *_KEYS: &[&str] = &[...]` list in the config decoder.
fn decoder_keys() -> Vec<String> {
    let mut keys = Vec::new();
    for entry in std::fs::read_dir(root().join("src/config/decode")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|ext| ext != "rs") || path.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (at, _) in text.match_indices("_KEYS: &[&str] = &[") {
            let list = &text[at..];
            let list = &list[..list.find("];").unwrap()];
            for literal in list.split('"').skip(1).step_by(2) {
                keys.push(literal.to_owned());
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

#[test]
fn every_config_key_is_in_the_configuration_reference() {
    let keys = decoder_keys();
    assert!(keys.len() > 40, "found only {keys:?}: parser broken?");
    let doc = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| {
            // `key`, `section.key` or `list[].key`, or `key.sub` for a section key.
            ![format!("`{key}`"), format!(".{key}`"), format!("`{key}.")]
                .iter()
                .any(|form| doc.contains(form.as_str()))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys the decoder accepts but docs/configuration.md does not describe: {missing:?}"
    );
}
