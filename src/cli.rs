//! The CLI's commands that need no running sidecar of their own: `check-config`,
//! `import-mgt`, and `health` (a short report from a running sidecar's `/api/v1/health`); the
//! exit codes; `Output`, how they and `dead` write stdout; `HttpAccess`, how `health` and
//! `dead` reach a sidecar behind a web config (TLS CA, basic auth). The argument parsing stays
//! in `main.rs`.

use std::fmt::Display;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config;
use crate::import_mgt::ImportOptions;

/// Exit code for success.
pub const EXIT_OK: u8 = 0;
/// Exit code for an invalid configuration (docs/reference.md, "Exit codes").
pub const EXIT_CONFIG: u8 = 1;
/// Exit code for a runtime failure (docs/reference.md, "Exit codes").
pub const EXIT_RUNTIME: u8 = 2;
/// Exit code for a command-line usage error (sysexits' `EX_USAGE`): a typo in a unit file is
/// not fixed by restarting, so the shipped systemd unit lists it in `RestartPreventExitStatus=`.
pub const EXIT_USAGE: u8 = 64;

/// The standard output of `check-config`, `health` and `dead`. A reader that went away (`| head`
/// closed the pipe) has seen what it wanted: later lines are dropped and the command keeps its
/// exit code, as `git log | head` does. Any other write failure (a full disk) is reported on
/// stderr and the command fails with `EXIT_RUNTIME`. `println!` would panic in both cases.
#[derive(Debug, Default)]
pub struct Output {
    /// The first write error; nothing more is written after one.
    error: Option<io::Error>,
}

impl Output {
    /// Writes one line.
    pub fn line(&mut self, line: impl Display) {
        if self.error.is_some() {
            return;
        }
        let mut stdout = io::stdout().lock();
        if let Err(error) = writeln!(stdout, "{line}") {
            self.error = Some(error);
        }
    }

    /// Flushes, and answers the exit code: `code`, or `EXIT_RUNTIME` after a write failure
    /// other than a closed pipe.
    pub fn finish(mut self, code: u8) -> u8 {
        if self.error.is_none()
            && let Err(error) = io::stdout().lock().flush()
        {
            self.error = Some(error);
        }
        match self.error {
            None => code,
            Some(error) if error.kind() == io::ErrorKind::BrokenPipe => code,
            Some(error) => {
                eprintln!("wxauto-sidecar: cannot write to stdout: {error}");
                EXIT_RUNTIME
            }
        }
    }
}

/// `import-mgt`: the YAML goes to `--out` or stdout, the report to stderr (never a secret).
pub fn import_mgt(options: &ImportOptions) -> u8 {
    let summary = match crate::import_mgt::run(options, &mut std::io::stdout().lock()) {
        Ok(summary) => summary,
        Err(error) => {
            eprintln!("wxauto-sidecar import-mgt: {error}");
            let code = if error.is_input() {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            };
            return code;
        }
    };
    let plural = |n: usize, what: &str| {
        if n == 1 {
            format!("{n} {what}")
        } else {
            format!("{n} {what}s")
        }
    };
    let target = options
        .out
        .as_ref()
        .map_or_else(|| "stdout".to_owned(), |path| path.display().to_string());
    eprintln!(
        "import-mgt: read {}; wrote {target}: {}, {}, {}, {}",
        options.db.display(),
        plural(summary.instances, "instance"),
        plural(summary.platforms, "platform"),
        plural(summary.rules, "rule"),
        plural(summary.fixed_listeners, "fixed listener"),
    );
    let written = summary.variables.len() - summary.unset.len();
    if let Some(path) = &options.secrets_file {
        let mode = if cfg!(unix) { " (mode 0600)" } else { "" };
        eprintln!(
            "import-mgt: wrote {}: {}{mode}",
            path.display(),
            plural(written, "secret")
        );
    }
    if !summary.notes.is_empty() {
        eprintln!("import-mgt: not imported or changed:");
        for note in &summary.notes {
            eprintln!("  - {note}");
        }
    }
    if !summary.variables.is_empty() {
        let source = match &options.secrets_file {
            Some(path) => format!(" (values in {})", path.display()),
            None => " (values not written: pass --secrets-file FILE to get them)".to_owned(),
        };
        eprintln!(
            "import-mgt: the config reads these environment variables{source}: {}",
            summary.variables.join(", ")
        );
    }
    if !summary.unset.is_empty() {
        eprintln!(
            "import-mgt: no usable value in the database, set them yourself: {}",
            summary.unset.join(", ")
        );
    }
    if let Some(path) = &options.out {
        eprintln!(
            "import-mgt: next: set the variables, then wxauto-sidecar check-config --config {}",
            path.display()
        );
    }
    EXIT_OK
}

/// `check-config`: the config, then the web config (`--web.config.file`, else the config's
/// `server.web_config_file`); exit 1 when either is invalid.
pub fn check_config(path: &Path, no_secrets: bool, web_config_file: Option<PathBuf>) -> u8 {
    let checked = if no_secrets {
        config::check_file_without_secrets(path)
            .map(|unresolved| (unresolved.warnings, unresolved.web_config_file))
    } else {
        config::load_file(path)
            .map(|loaded| (loaded.warnings, loaded.config.server.web_config_file))
    };
    let suffix = if no_secrets {
        " (secrets not resolved)"
    } else {
        ""
    };
    let mut out = Output::default();
    let (config_ok, from_config) = match checked {
        Ok((warnings, web_config_file)) => {
            for warning in &warnings {
                eprintln!("warning: {warning}");
            }
            out.line(format_args!("{}: valid{suffix}", path.display()));
            (true, web_config_file)
        }
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("{}: {} error(s)", path.display(), errors.errors.len());
            (false, None)
        }
    };
    let mut web_ok = true;
    if let Some(web) = web_config_file.or(from_config) {
        match crate::http::web_config::check_file(&web, !no_secrets) {
            Ok(()) => {
                let suffix = if no_secrets {
                    " (TLS files not read)"
                } else {
                    ""
                };
                out.line(format_args!("{}: valid web config{suffix}", web.display()));
            }
            Err(error) => {
                eprintln!("{}", crate::secret::redact(&error.to_string()));
                eprintln!("{}: invalid web config", web.display());
                web_ok = false;
            }
        }
    }
    out.finish(if config_ok && web_ok {
        EXIT_OK
    } else {
        EXIT_CONFIG
    })
}

/// `wxauto-sidecar health --url`: prints a short report; returns the exit code.
pub async fn health_command(url: &str) -> i32 {
    health_command_with(url, &HttpAccess::default()).await
}

/// How the CLI reaches a sidecar behind a web config: `--ca-file`, `--user`/`--password-file`.
#[derive(Debug, Clone, Default)]
pub struct HttpAccess {
    /// The CA of the sidecar's certificate (PEM).
    pub ca_file: Option<std::path::PathBuf>,
    /// Basic-auth user.
    pub user: Option<String>,
    /// The file holding the basic-auth password.
    pub password_file: Option<std::path::PathBuf>,
}

impl HttpAccess {
    /// A client trusting `ca_file` (only it, when given), and the basic-auth password.
    #[allow(
        clippy::disallowed_methods,
        reason = "CLI commands (`health`, `dead`), once before their request"
    )]
    pub fn client(&self) -> Result<(reqwest::Client, Option<crate::secret::Secret>), String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy();
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|error| format!("{}: not a PEM certificate: {error}", path.display()))?;
            builder = builder.tls_certs_only(certs);
        }
        let password = match &self.password_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
                Some(crate::secret::Secret::new(
                    text.trim_end_matches(['\r', '\n']),
                ))
            }
            None => None,
        };
        let client = builder
            .build()
            .map_err(|error| format!("cannot build an HTTP client: {error}"))?;
        Ok((client, password))
    }

    /// `request` with basic auth when a user is given.
    pub fn authorize(
        &self,
        request: reqwest::RequestBuilder,
        password: Option<&crate::secret::Secret>,
    ) -> reqwest::RequestBuilder {
        match (&self.user, password) {
            (Some(user), Some(password)) => request.basic_auth(user, Some(password.expose())),
            _ => request,
        }
    }
}

/// `health` with TLS and basic-auth options.
pub async fn health_command_with(url: &str, access: &HttpAccess) -> i32 {
    let mut out = Output::default();
    let code = health_report(url, access, &mut out).await;
    i32::from(out.finish(code))
}

/// Writes the report line; answers 0 healthy, 1 warning, 2 critical or unreachable.
async fn health_report(url: &str, access: &HttpAccess, out: &mut Output) -> u8 {
    let url = format!("{}/api/v1/health", url.trim_end_matches('/'));
    let (client, password) = match access.client() {
        Ok(client) => client,
        Err(error) => {
            eprintln!("critical: {error}");
            return 2;
        }
    };
    let request = access.authorize(client.get(&url), password.as_ref());
    let body: serde_json::Value = match request.send().await {
        Ok(response) => match response.json().await {
            Ok(body) => body,
            Err(error) => {
                out.line(format_args!(
                    "critical: {url} did not answer with JSON: {error}"
                ));
                return 2;
            }
        },
        Err(error) => {
            out.line(format_args!("critical: {url} is unreachable: {error}"));
            return 2;
        }
    };
    let data = &body["data"];
    let Some(score) = data["health_score"].as_u64() else {
        out.line(format_args!(
            "critical: {url} answered without a health_score"
        ));
        return 2;
    };
    let status = data["overall_status"].as_str().unwrap_or("critical");
    let deductions = &data["deductions"];
    let lost: Vec<String> = ["listener", "clients", "listeners", "error_rate"]
        .iter()
        .filter_map(|name| {
            let points = deductions[*name].as_u64().unwrap_or(0);
            (points > 0).then(|| format!("{name} -{points}"))
        })
        .collect();
    let clients = &data["api_clients_summary"];
    let chats = &data["listeners_summary"];
    let disabled = match clients["disabled_instances"].as_array().map(Vec::len) {
        Some(n) if n > 0 => format!(" ({n} disabled)"),
        _ => String::new(),
    };
    out.line(format_args!(
        "{status}: score {score}/100 (lost: {}); clients {}/{} connected{disabled}; listeners {}/{} active; listener {}",
        if lost.is_empty() {
            "none".to_owned()
        } else {
            lost.join(", ")
        },
        clients["connected_count"],
        clients["total_count"],
        chats["active_count"],
        chats["total_count"],
        data["message_listener"]["status"]
            .as_str()
            .unwrap_or("unknown"),
    ));
    match status {
        "healthy" => 0,
        "warning" => 1,
        _ => 2,
    }
}
