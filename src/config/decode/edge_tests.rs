//! Edge cases of the decoder: ranges the runtime can honour, unreadable and non-UTF-8 files.

use std::path::Path;

use super::*;

fn errors(text: &str) -> Vec<String> {
    match decode(text, Some(Path::new("c.yaml")), &|_| None) {
        Ok(_) => Vec::new(),
        Err(errors) => errors.errors.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn retention_days_that_would_overflow_date_arithmetic_are_located_errors() {
    for section in ["logging", "storage", "media"] {
        let text = format!("instances: []\n{section}:\n  retention_days: 100000000\n");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&format!("c.yaml:3:19: {section}.retention_days: ")),
            "{errors:?}"
        );
        assert!(errors[0].contains("36500"), "{errors:?}");
    }
    assert!(errors("instances: []\nlogging:\n  retention_days: 36500\n").is_empty());
}

#[test]
fn durations_beyond_a_year_are_errors() {
    let errors = errors(
        "instances: []\nlistener:\n  poll_interval: 1000000000y\n  listener_timeout: 366d\n  request_timeout: 365d\n",
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors[0].starts_with("c.yaml:3:18: listener.poll_interval: must be at most 365d"));
    assert!(errors[1].starts_with("c.yaml:4:21: listener.listener_timeout: must be at most 365d"));
}

#[test]
fn an_unreadable_file_is_named_without_a_fake_position() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let error = load_file(&missing).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("{}: cannot read config file", missing.display())),
        "{error}"
    );
    assert!(!error.contains(":0:0"), "{error}");
}

#[test]
fn non_utf8_input_reports_the_byte_offset_and_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, b"instances: []\nlogging:\n  level: in\xfffo\n").unwrap();
    let error = load_file(&path).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("{}:3:12: ", path.display())),
        "{error}"
    );
    assert!(
        error.contains("not valid UTF-8 (invalid byte at offset 34)"),
        "{error}"
    );
}
