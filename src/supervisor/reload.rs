//! Reloads: the loader on the blocking pool, validation, the diff, and applying it to the
//! running actors and the subscribers. The old config keeps running on any error.

use std::sync::Arc;

use super::{ReloadReport, ReloadSource, Supervisor};
use crate::config::{ConfigDiff, InstanceChange, Loaded};

impl Supervisor {
    /// Runs the loader on tokio's blocking pool (it reads files), giving up at shutdown.
    async fn load(&self) -> Result<Loaded, Vec<String>> {
        let loader = Arc::clone(&self.loader);
        let load = tokio::task::spawn_blocking(move || loader());
        tokio::select! {
            joined = load => match joined {
                Ok(result) => {
                    result.map_err(|errors| errors.errors.iter().map(ToString::to_string).collect())
                }
                Err(_) => Err(vec!["the configuration loader panicked".to_owned()]),
            },
            () = self.shutdown.cancelled() => {
                Err(vec!["shutting down: reload abandoned".to_owned()])
            }
        }
    }

    /// Loads, validates, diffs and applies. The old config keeps running on any error.
    pub(super) async fn reload(
        &mut self,
        source: ReloadSource,
    ) -> Result<ReloadReport, Vec<String>> {
        let loaded = match self.load().await {
            Ok(loaded) => loaded,
            Err(errors) => {
                tracing::error!(
                    source = source.as_str(),
                    errors = errors.len(),
                    "Configuration reload failed; keeping the running configuration."
                );
                self.monitor.record_reload_failure(&errors);
                return Err(errors);
            }
        };
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        let new = Arc::new(loaded.config);
        if new.source.hash == self.config.source.hash {
            tracing::debug!(source = source.as_str(), "Configuration unchanged.");
            // A manual reload of an unchanged file still counts as a successful reload, like
            // Prometheus; watcher noise (kubelet touching files) does not.
            self.monitor
                .record_reload_success(new.source.hash, source != ReloadSource::Watcher);
            return Ok(ReloadReport {
                changed: false,
                summary: "no change".to_owned(),
                needs_restart: Vec::new(),
            });
        }
        let diff = ConfigDiff::between(&self.config, &new);
        self.config = Arc::clone(&new);
        self.replies
            .set_enabled(new.enabled_instances().map(|instance| instance.id.clone()));
        self.apply(&diff);
        for subscriber in &self.subscribers {
            subscriber(&new, &diff);
        }
        self.monitor.set_window(new.health.window);
        self.monitor.record_reload_success(new.source.hash, true);
        let _ = self.active.send(Arc::clone(&new));
        let summary = diff.summary();
        tracing::info!(source = source.as_str(), changes = %summary, "Configuration reloaded.");
        if !diff.needs_restart.is_empty() {
            tracing::warn!(
                keys = ?diff.needs_restart,
                "Some changed settings only take effect after a restart."
            );
        }
        Ok(ReloadReport {
            changed: true,
            summary,
            needs_restart: diff.needs_restart.clone(),
        })
    }

    /// Applies a diff against the config already in `self.config`.
    fn apply(&mut self, diff: &ConfigDiff) {
        let config = Arc::clone(&self.config);
        for (id, change) in &diff.instances {
            match change {
                InstanceChange::Removed => {
                    self.stop_instance(id);
                    // The stopping actor keeps its own handle and flushes what it holds.
                    self.held.remove(id);
                    self.monitor.remove_instance(id);
                }
                InstanceChange::Added | InstanceChange::Changed => {
                    self.stop_instance(id);
                    let Some(instance) = config.instance(id) else {
                        continue;
                    };
                    self.monitor.register_instance(id, instance.enabled);
                    if self.running && instance.enabled {
                        self.spawn_instance(instance, false);
                    }
                }
            }
        }
        if diff.listener_changed || diff.fixed_listeners_changed {
            let touched: Vec<&str> = diff.instances.iter().map(|(id, _)| id.as_str()).collect();
            for (id, task) in &self.tasks {
                if touched.contains(&id.as_str()) {
                    continue;
                }
                // Latest wins: an actor busy with a long call takes the newest settings when it
                // is done. One in its restart backoff gets them when it is built.
                if let Some(sender) = &task.settings {
                    let settings = self.settings_for(id);
                    sender.send_if_modified(|current| {
                        let changed = *current != settings;
                        if changed {
                            *current = settings;
                        }
                        changed
                    });
                }
            }
        }
    }
}
