//! Repository hygiene: module doc lines, the code map in lib.rs, no new module cycle.

use std::path::{Path, PathBuf};

/// Every `.rs` file below `dir` (none if it does not exist).
fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rs_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_source_file_starts_with_a_module_doc_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["src", "tests", "benches"] {
        rs_files(&root.join(dir), &mut files);
    }
    let seen = files.len();
    let bad: Vec<String> = files
        .iter()
        .filter(|file| !std::fs::read_to_string(file).unwrap().starts_with("//!"))
        .map(|file| file.display().to_string())
        .collect();
    assert!(seen > 20, "found only {seen} files: wrong root?");
    assert!(bad.is_empty(), "files without a leading //! line: {bad:?}");
}

/// The top-level modules `lib.rs` text declares (`pub mod <name>;`).
fn declared_modules(lib: &str) -> Vec<&str> {
    lib.lines()
        .filter_map(|line| line.strip_prefix("pub mod "))
        .map(|rest| rest.trim_end_matches(';'))
        .collect()
}

/// The lib's code map (`src/lib.rs` docs) lists every top-level module, and only those.
#[test]
fn the_code_map_in_lib_rs_lists_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared = declared_modules(&text);
    let listed: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("//! - `"))
        .filter_map(|rest| rest.split('`').next())
        .collect();
    assert!(declared.len() > 10, "found only {declared:?}");
    let mut missing: Vec<&str> = declared
        .iter()
        .copied()
        .filter(|module| !listed.contains(module))
        .collect();
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "modules missing from the code map: {missing:?}"
    );
    let stale: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|module| !declared.contains(module))
        .collect();
    assert!(
        stale.is_empty(),
        "code map names modules that do not exist: {stale:?}"
    );
}

/// Module dependency edges (`crate::<module>` in a module's files) that lie on a cycle today.
/// Issue 16 step 1 is to break them (`metrics` naming `wxauto::Endpoint` is the last one);
/// until then, this list may only shrink.
const KNOWN_CYCLE_EDGES: [(&str, &str); 2] = [("metrics", "wxauto"), ("wxauto", "metrics")];

/// Every `.rs` file of a top-level module except its `tests.rs` files.
fn module_files(root: &Path, module: &str) -> Vec<PathBuf> {
    let mut files = vec![root.join(format!("src/{module}.rs"))];
    rs_files(&root.join("src").join(module), &mut files);
    files.retain(|file| file.is_file() && !file.ends_with("tests.rs"));
    files
}

/// The modules `text` names as `crate::<module>`, or inside `use crate::{...}`.
fn referenced_modules<'a>(text: &str, modules: &[&'a str]) -> Vec<&'a str> {
    let mut found = Vec::new();
    let mut words = |chunk: &str| {
        for word in chunk.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if let Some(module) = modules.iter().find(|module| **module == word) {
                found.push(*module);
            }
        }
    };
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Up to the brace that closes the group.
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(end, _)| end);
            // Only the first segment of each path names a module.
            for path in group[..end].split(',') {
                words(path.trim().split("::").next().unwrap_or(""));
            }
        } else {
            words(rest.split("::").next().unwrap_or(""));
        }
    }
    found
}

/// No new dependency cycle between top-level modules: an edge on a cycle must be a known one.
#[test]
fn no_new_module_cycle() {
    use std::collections::{BTreeMap, BTreeSet};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let modules = declared_modules(&lib);
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for module in &modules {
        let targets = edges.entry(module).or_default();
        for file in module_files(root, module) {
            let text = std::fs::read_to_string(&file).unwrap();
            targets.extend(
                referenced_modules(&text, &modules)
                    .into_iter()
                    .filter(|target| target != module),
            );
        }
    }
    let reaches = |from: &str, to: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(at) = stack.pop() {
            if at == to {
                return true;
            }
            if seen.insert(at) {
                stack.extend(edges.get(at).into_iter().flatten().copied());
            }
        }
        false
    };
    assert!(
        reaches("app", "secret"),
        "the graph is empty: wrong root? {edges:?}"
    );
    let mut new_edges = Vec::new();
    for (from, targets) in &edges {
        for to in targets {
            if reaches(to, from) && !KNOWN_CYCLE_EDGES.contains(&(*from, *to)) {
                new_edges.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        new_edges.is_empty(),
        "new module dependency cycle(s) through {new_edges:?} (the layering in ARCHITECTURE.md)"
    );
    // The list only shrinks: an edge that no longer lies on a cycle must leave it.
    let stale: Vec<String> = KNOWN_CYCLE_EDGES
        .iter()
        .filter(|(from, to)| {
            !(edges.get(from).is_some_and(|targets| targets.contains(to)) && reaches(to, from))
        })
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(
        stale.is_empty(),
        "KNOWN_CYCLE_EDGES lists edges that are no longer on a cycle: {stale:?}"
    );
    // The shared vocabulary stays at the bottom, so every layer can name it.
    for leaf in ["secret", "event", "clock"] {
        let targets = edges.get(leaf).cloned().unwrap_or_default();
        assert!(
            targets.is_empty(),
            "the leaf module `{leaf}` depends on {targets:?} (ARCHITECTURE.md, Layering)"
        );
    }
}
