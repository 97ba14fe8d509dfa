//! Repository hygiene: every source file opens with a `//!` line saying what it owns.

use std::path::Path;

fn visit(dir: &Path, bad: &mut Vec<String>, seen: &mut usize) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            visit(&path, bad, seen);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            *seen += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            if !text.starts_with("//!") {
                bad.push(path.display().to_string());
            }
        }
    }
}

#[test]
fn every_source_file_starts_with_a_module_doc_line() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut bad = Vec::new();
    let mut seen = 0;
    for dir in ["src", "tests", "benches"] {
        let dir = root.join(dir);
        if dir.is_dir() {
            visit(&dir, &mut bad, &mut seen);
        }
    }
    assert!(seen > 20, "found only {seen} files: wrong root?");
    assert!(bad.is_empty(), "files without a leading //! line: {bad:?}");
}

/// The lib's code map (`src/lib.rs` docs) lists every top-level module, and only those.
#[test]
fn the_code_map_in_lib_rs_lists_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("pub mod "))
        .map(|rest| rest.trim_end_matches(';'))
        .collect();
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
