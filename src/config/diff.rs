//! STUB (to be replaced): what changed between two configs.

use super::Config;

/// What a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Per-instance changes, in new-file order then removed ones.
    pub instances: Vec<(String, InstanceChange)>,
    /// `listener:` settings changed (every actor takes the new settings).
    pub listener_changed: bool,
    /// `fixed_listeners:` changed.
    pub fixed_listeners_changed: bool,
    /// `rules:` changed.
    pub rules_changed: bool,
    /// `platforms:` changed.
    pub platforms_changed: bool,
    /// `delivery:` changed.
    pub delivery_changed: bool,
    /// `health:` changed.
    pub health_changed: bool,
    /// `logging.level` changed (the filter is swapped live).
    pub log_level_changed: bool,
    /// Keys whose change only takes effect after a restart, e.g. `server.listen`.
    pub needs_restart: Vec<&'static str>,
}

/// How one instance changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceChange {
    /// New in the new config.
    Added,
    /// Gone from the new config.
    Removed,
    /// base_url, key or enabled changed: restart its actor.
    Changed,
}

impl ConfigDiff {
    /// Compares two configs.
    pub fn summary(&self) -> String {
        todo!("summary")
    }

    /// Compares two configs.
    pub fn between(old: &Config, new: &Config) -> Self {
        let _ = (old, new);
        todo!("config diff")
    }
}
