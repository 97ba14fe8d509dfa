//! The real binary's command line: usage errors exit 64 (never restarted by the shipped unit),
//! log-level typos, `check-config --no-secrets`, `service` off Windows, and a relative
//! `--config` watched live.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::util::*;

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("WXAUTO_SIDECAR_CONFIG")
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn usage_errors_exit_64_and_help_and_version_exit_0() {
    for args in [
        &["--bogus"][..],
        &["run", "--listen", "not-an-address"],
        &["check-config"],
        &["no-such-command"],
        &["simulate"],
        &["service"],
    ] {
        let output = run(args);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{args:?}: {}",
            stderr(&output)
        );
        let text = stderr(&output);
        assert!(
            text.contains("Usage") || text.contains("try '--help'"),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    for args in [&["--help"][..], &["--version"], &["check-config", "--help"]] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(0), "{args:?}");
        assert!(!output.stdout.is_empty(), "{args:?} prints to stdout");
    }
    let version = run(&["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn a_log_level_typo_is_an_error_not_silence() {
    // `tracing` takes a bare word for a target name: `--log-level bogus` would log nothing.
    // The config file does not exist: an accepted level would end in exit 1, not 64.
    for level in ["bogus", "warnn", "info,wxauto_sidecar"] {
        let output = run(&["run", "--config", "missing.yaml", "--log-level", level]);
        let text = stderr(&output);
        assert_eq!(output.status.code(), Some(64), "{level}: {text}");
        for part in [
            "--log-level",
            "unknown log level",
            "trace, debug, info, warn, error, off, or target=level",
        ] {
            assert!(text.contains(part), "{level}: {text}");
        }
    }

    // In the file: a located error, from the decoder `run` and every reload use too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let config = path.to_str().unwrap();
    std::fs::write(&path, "instances: []\nlogging:\n  level: bogus\n").unwrap();
    let output = run(&["check-config", "--config", config]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let expected = format!("{config}:3:10: logging.level: unknown log level \"bogus\"");
    assert!(stderr(&output).contains(&expected), "{}", stderr(&output));

    // Levels in any case and `target=level` lists still pass.
    std::fs::write(
        &path,
        "instances: []\nlogging:\n  level: \"WARN, wxauto_sidecar=debug\"\n",
    )
    .unwrap();
    let output = run(&["check-config", "--config", config]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[test]
fn the_shipped_systemd_unit_does_not_restart_on_config_or_usage_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/systemd/wxauto-sidecar.service")).unwrap();
    let line = unit
        .lines()
        .find(|line| line.starts_with("RestartPreventExitStatus="))
        .expect("RestartPreventExitStatus= line");
    let codes: Vec<&str> = line["RestartPreventExitStatus=".len()..]
        .split_whitespace()
        .collect();
    assert!(codes.contains(&"1") && codes.contains(&"64"), "{line}");
    assert!(
        !codes.contains(&"2"),
        "runtime failures must restart: {line}"
    );
}

#[cfg(not(windows))]
#[test]
fn service_is_a_windows_only_usage_error_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, "instances: []\n").unwrap();
    let config = config.to_str().unwrap();
    for args in [
        &["service", "install", "--config", config][..],
        &["service", "uninstall"],
        &["service", "run", "--config", config, "--name", "wx"],
    ] {
        let output = run(args);
        assert_eq!(output.status.code(), Some(64), "{args:?}");
        assert!(
            stderr(&output).contains("Windows only"),
            "{}",
            stderr(&output)
        );
    }
    // Argument handling is still checked: `install` needs --config.
    let output = run(&["service", "install"]);
    assert_eq!(output.status.code(), Some(64));
    assert!(stderr(&output).contains("--config"), "{}", stderr(&output));
}

#[test]
fn check_config_no_secrets_validates_without_reading_keys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The example names three key variables; none is set, and the header's command passes.
    let output = Command::new(BIN)
        .args(["check-config", "--no-secrets", "--config"])
        .arg(root.join("examples/config.yaml"))
        .env_remove("WXAUTO_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .env_remove("DIFY_API_KEY")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("secrets not resolved"));
    let header = std::fs::read_to_string(root.join("examples/config.yaml")).unwrap();
    assert!(
        header
            .lines()
            .take(5)
            .any(|line| line.contains("check-config --no-secrets")),
        "the example's header shows the CI command"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    // A key variable holding a value that would be rejected (too short) and a key file that
    // does not exist: neither is read.
    std::fs::write(
        &config,
        "instances:\n  - id: a\n    base_url: http://127.0.0.1:5000\n    api_key_env: SHORT_KEY\n  - id: b\n    base_url: http://127.0.0.1:5001\n    api_key_file: missing.key\nplatforms:\n  - id: hook\n    type: webhook\n    url: http://127.0.0.1:9/x\n    headers_from_env:\n      Authorization: UNSET_HEADER_VAR\n",
    )
    .unwrap();
    let check = |no_secrets: bool| {
        let mut command = Command::new(BIN);
        command.arg("check-config");
        if no_secrets {
            command.arg("--no-secrets");
        }
        command
            .arg("--config")
            .arg(&config)
            .env("SHORT_KEY", "ab")
            .env_remove("UNSET_HEADER_VAR")
            .output()
            .unwrap()
    };
    let output = check(true);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    // The same file with secrets resolved fails on exactly those three.
    let output = check(false);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    for needle in ["SHORT_KEY", "missing.key", "UNSET_HEADER_VAR"] {
        assert!(text.contains(needle), "{needle}: {text}");
    }
    assert!(!text.contains("\"ab\""), "the value never appears");

    // Syntax, types and references are still checked.
    std::fs::write(
        &config,
        "listener:\n  poll_interval: fast\ninstances:\n  - id: a\n    base_url: http://127.0.0.1:5000\n    api_key_env: K\nrules:\n  - id: r\n    instance: a\n    chat: \"*\"\n    platform: nowhere\n",
    )
    .unwrap();
    let output = check(true);
    assert_eq!(output.status.code(), Some(1));
    let text = stderr(&output);
    assert!(text.contains("poll_interval"), "{text}");
    assert!(text.contains("nowhere"), "{text}");
    std::fs::write(&config, "instances: [\n").unwrap();
    assert_eq!(check(true).status.code(), Some(1));
}

#[test]
fn check_config_checks_the_web_config_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        "instances: []\nserver:\n  web_config_file: web.yml\n",
    )
    .unwrap();
    let web = dir.path().join("web.yml");
    let check = |extra: &[&str]| {
        let mut command = Command::new(BIN);
        command
            .arg("check-config")
            .args(extra)
            .arg("--config")
            .arg(&config);
        let output = command
            .env_remove("WXAUTO_SIDECAR_CONFIG")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout).into_owned();
        (output.status.code(), out, stderr(&output))
    };
    let web_name = web.display().to_string();

    // Valid: TLS with real files, a bcrypt user, headers; relative to the web config's directory.
    crate::security::write_certificates(dir.path());
    std::fs::write(&web, crate::security::web_config_text("prometheus", "pw-1")).unwrap();
    let (code, out, err) = check(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("{web_name}: valid web config")),
        "{out}"
    );

    // A missing key file: the web config file, the line, the key and the missing file.
    std::fs::remove_file(dir.path().join("server.key")).unwrap();
    let (code, _, err) = check(&[]);
    assert_eq!(code, Some(1), "{err}");
    let expected = format!("{web_name}:3:13: tls_server_config.key_file: cannot read ");
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("server.key"), "{err}");
    assert!(
        err.contains(&format!("{web_name}: invalid web config")),
        "{err}"
    );
    // `--no-secrets` reads no TLS file (the key is a secret; CI has none of them).
    let (code, out, err) = check(&["--no-secrets"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("valid web config (TLS files not read)"),
        "{out}"
    );

    // An invalid bcrypt hash is an error in both modes, at its line.
    std::fs::write(
        &web,
        "http_server_config:\n  headers:\n    X-Frame-Options: deny\nbasic_auth_users:\n  alice: '$2y$10$tooshort'\n",
    )
    .unwrap();
    for mode in [&[][..], &["--no-secrets"]] {
        let (code, _, err) = check(mode);
        assert_eq!(code, Some(1), "{mode:?}: {err}");
        let expected = format!("{web_name}:5:10: basic_auth_users.alice: not a bcrypt hash");
        assert!(err.contains(&expected), "{mode:?}: {err}");
        assert!(!err.contains("tooshort"), "the hash is not quoted: {err}");
    }

    // Bad YAML and unknown keys: located.
    std::fs::write(&web, "basic_auth_users:\n  alice: [\n").unwrap();
    let (code, _, err) = check(&["--no-secrets"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&format!("{web_name}:")), "{err}");
    assert!(err.contains("invalid YAML"), "{err}");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: a\n  key_file: b\n  min_version: TLS10\n",
    )
    .unwrap();
    let (code, _, err) = check(&["--no-secrets"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{web_name}:4:16: tls_server_config.min_version: unsupported version"
        )),
        "{err}"
    );
    std::fs::write(&web, "basic_auth_user: {}\n").unwrap();
    let (code, _, err) = check(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{web_name}:1:1: invalid YAML: unknown field")),
        "{err}"
    );

    // `--web.config.file` wins over `server.web_config_file`; a missing file is named.
    let missing = dir.path().join("nope.yml");
    let (code, _, err) = check(&["--web.config.file", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{}: cannot read", missing.display())),
        "{err}"
    );
    // An invalid config still fails with exit 1 when its web config is fine.
    std::fs::write(&web, "").unwrap();
    std::fs::write(&config, "server:\n  web_config_file: web.yml\n").unwrap();
    let (code, _, err) = check(&[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("instances"), "{err}");
}

#[tokio::test]
async fn a_relative_config_path_is_reloaded_on_a_file_event() {
    // The quick start's `--config my-config.yaml`, run from the config's directory. The hash
    // poll runs every 30 s, so a reload within the deadline here came from a native event.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("my-config.yaml"), "instances: []\n").unwrap();
    let binary = Binary::start(dir.path(), Path::new("my-config.yaml"), &[]).await;
    let reloads = |text: String| metric_value(&text, "wxauto_config_reloads_total");
    assert_eq!(reloads(binary.metrics().await), Some(0.0));
    // The watcher is armed once the first write is seen; rewrite until then, with new content
    // each time so every write is a real change.
    let started = tokio::time::Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let text = format!("instances: []\nlistener:\n  poll_interval: {n}s\n");
        std::fs::write(dir.path().join("my-config.yaml"), text).unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        if reloads(binary.metrics().await).is_some_and(|value| value >= 1.0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no reload from a file event:\n{}",
            binary.stderr_text()
        );
    }
}
