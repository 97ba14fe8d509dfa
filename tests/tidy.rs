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
