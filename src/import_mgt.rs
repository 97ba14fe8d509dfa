//! `import-mgt`: turns a WXAUTO-MGT database into a commented sidecar config plus an optional
//! `NAME=value` secrets file (mode 0600 on unix), and reports what could not be carried over.
//!
//! Secrets never reach the YAML, stdout or stderr: the YAML names environment variables, and
//! only the secrets file holds values. The result is decoded with the real decoder before
//! anything is written, so a file that `check-config` would refuse is never produced.

mod read;
mod render;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config;

/// What to import and where to write it.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// The WXAUTO-MGT database, e.g. `data/wxauto_mgt.db`.
    pub db: PathBuf,
    /// The config file to write; `None` writes the YAML to stdout.
    pub out: Option<PathBuf>,
    /// Where to write the `NAME=value` secrets, if anywhere.
    pub secrets_file: Option<PathBuf>,
    /// Overwrite existing `out` and `secrets_file`.
    pub force: bool,
}

/// What an import did; every text is free of secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportSummary {
    /// Instances, platforms, rules and fixed listeners written.
    pub instances: usize,
    /// Platforms written.
    pub platforms: usize,
    /// Rules written.
    pub rules: usize,
    /// Fixed listeners written.
    pub fixed_listeners: usize,
    /// The environment variables the config reads, in file order.
    pub variables: Vec<String>,
    /// Variables without a usable value in the database (the user must set them).
    pub unset: Vec<String>,
    /// What was skipped or changed, one line each.
    pub notes: Vec<String>,
}

/// Why an import failed. No variant carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The database file does not exist.
    #[error("no database at {}", .0.display())]
    NoDatabase(PathBuf),
    /// SQLite could not read the file.
    #[error("cannot read the database {}: {reason}", .path.display())]
    Database {
        /// The file.
        path: PathBuf,
        /// SQLite's reason.
        reason: String,
    },
    /// The file has none of the WXAUTO-MGT tables.
    #[error(
        "{} is not a WXAUTO-MGT database (no instances, service_platforms, delivery_rules or fixed_listeners table)",
        .0.display()
    )]
    NotMgt(PathBuf),
    /// An output file exists and `--force` was not given.
    #[error("{} already exists; pass --force to overwrite it", .0.display())]
    Exists(PathBuf),
    /// An output file could not be written.
    #[error("cannot write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The generated config does not decode: a bug in the importer.
    #[error("the generated configuration is invalid (please report this):\n{0}")]
    Invalid(String),
}

impl ImportError {
    /// True for problems with the input or the command line (exit 1); false for failures
    /// while writing (exit 2).
    pub fn is_input(&self) -> bool {
        !matches!(self, Self::Write { .. } | Self::Invalid(_))
    }
}

/// Runs an import; the YAML goes to `out` or, without one, to `stdout`.
pub fn run(options: &ImportOptions, stdout: &mut dyn Write) -> Result<ImportSummary, ImportError> {
    // Refuse before reading anything, so nothing is half-written.
    for path in options.out.iter().chain(&options.secrets_file) {
        if !options.force && path.exists() {
            return Err(ImportError::Exists(path.clone()));
        }
    }
    let db = read::read(&options.db)?;
    let plan = render::plan(&db, &options.db.display().to_string());
    self_check(&plan, options.out.as_deref())?;

    if let Some(path) = &options.secrets_file {
        let mut text = String::new();
        for (name, value) in &plan.secrets {
            text.push_str(name);
            text.push('=');
            text.push_str(value.expose());
            text.push('\n');
        }
        write_private(path, text.as_bytes(), options.force).map_err(|source| {
            ImportError::Write {
                path: path.clone(),
                source,
            }
        })?;
    }
    match &options.out {
        Some(path) => write_file(path, plan.yaml.as_bytes(), options.force).map_err(|source| {
            ImportError::Write {
                path: path.clone(),
                source,
            }
        })?,
        None => stdout
            .write_all(plan.yaml.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|source| ImportError::Write {
                path: PathBuf::from("<stdout>"),
                source,
            })?,
    }
    let mut variables: Vec<String> = plan.secrets.iter().map(|(name, _)| name.clone()).collect();
    variables.extend(plan.unset.iter().cloned());
    Ok(ImportSummary {
        instances: plan.counts.instances,
        platforms: plan.counts.platforms,
        rules: plan.counts.rules,
        fixed_listeners: plan.counts.fixed_listeners,
        variables,
        unset: plan.unset,
        notes: plan.notes,
    })
}

/// Decodes the YAML with the real decoder, with the secrets (and a placeholder for each unset
/// variable) as the environment. Decoder messages never quote a secret.
fn self_check(plan: &render::Plan, out: Option<&Path>) -> Result<(), ImportError> {
    let mut env: HashMap<&str, String> = plan
        .secrets
        .iter()
        .map(|(name, value)| (name.as_str(), value.expose().to_owned()))
        .collect();
    for name in &plan.unset {
        env.insert(name.as_str(), "placeholder-for-check".to_owned());
    }
    let lookup = |name: &str| env.get(name).cloned();
    match config::decode(&plan.yaml, out, &lookup) {
        Ok(_) => Ok(()),
        Err(errors) => Err(ImportError::Invalid(errors.to_string())),
    }
}

fn write_file(path: &Path, bytes: &[u8], force: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Writes a file only its owner can read: mode 0600 on unix, set before any byte is written
/// (an existing file overwritten with `--force` is narrowed too). On Windows the file takes the
/// ACL of its directory; inside the user's profile that is the user, SYSTEM and Administrators.
fn write_private(path: &Path, bytes: &[u8], force: bool) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests;
