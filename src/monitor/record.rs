//! The recorder: every `record_*` writes the log line, bumps the metric and updates the error
//! ring, the windows and the totals together, under one lock.

use std::time::SystemTime;

use serde::Serialize;

use super::{ERROR_RING_CAPACITY, Monitor};
use crate::clock::{rfc3339, unix_seconds};
use crate::event::{Component, ErrorKind};
use crate::metrics::{ErrorLabels, InstanceLabels, ReasonLabels};

/// One entry of the error ring.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorRecord {
    /// RFC 3339.
    pub timestamp: String,
    /// RFC 3339 (the seed's field name).
    pub datetime: String,
    /// The seed's service name.
    pub service_name: &'static str,
    /// `component.kind`.
    pub error_type: String,
    /// Redacted text.
    pub error_message: String,
    /// The instance, when the error belongs to one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The component label.
    pub component: &'static str,
    /// The kind label.
    pub kind: &'static str,
    /// Unix seconds.
    pub time: f64,
}

impl Monitor {
    /// Records an error: log line, `wxauto_errors_total`, the ring and the windows together.
    ///
    /// `message` must already be free of secrets; it is truncated to 500 characters.
    pub fn record_error(
        &self,
        component: Component,
        kind: ErrorKind,
        instance_id: Option<&str>,
        message: &str,
    ) {
        // A last pass through the redactor: no registered secret form is logged or kept.
        let message: String = crate::secret::redact(message).chars().take(500).collect();
        match component {
            Component::Config => {
                tracing::error!(
                    component = component.as_str(),
                    kind = kind.as_str(),
                    "{message}"
                )
            }
            _ => tracing::warn!(
                component = component.as_str(),
                kind = kind.as_str(),
                instance_id = instance_id.unwrap_or("-"),
                "{message}"
            ),
        }
        self.metrics
            .errors
            .get_or_create_owned(&ErrorLabels {
                component: component.as_str(),
                kind: kind.as_str(),
            })
            .inc();
        let instance_error = matches!(component, Component::Client | Component::Listener);
        if let Some(id) = instance_id.filter(|_| instance_error) {
            self.metrics
                .client_errors
                .get_or_create_owned(&InstanceLabels {
                    instance_id: id.to_owned(),
                })
                .inc();
        }
        let now = SystemTime::now();
        let stamp = rfc3339(now);
        let record = ErrorRecord {
            timestamp: stamp.clone(),
            datetime: stamp,
            service_name: component.service_name(),
            error_type: format!("{}.{}", component.as_str(), kind.as_str()),
            error_message: message.clone(),
            instance_id: instance_id.map(str::to_owned),
            component: component.as_str(),
            kind: kind.as_str(),
            time: unix_seconds(now),
        };
        let mut inner = self.lock();
        let window = inner.window;
        inner.total_errors += 1;
        inner.errors_all.add(now, 1, window);
        if component != Component::Config {
            inner.errors_listener.add(now, 1, window);
        }
        if inner.ring.len() == ERROR_RING_CAPACITY {
            inner.ring.pop_front();
        }
        inner.ring.push_back(record);
        if let Some(state) = instance_id
            .filter(|_| instance_error)
            .and_then(|id| inner.instances.get_mut(id))
        {
            state.error_count += 1;
            state.last_error = Some(message);
        }
    }

    /// Records messages that passed the filters.
    pub fn record_messages(&self, instance_id: &str, count: u64) {
        if count == 0 {
            return;
        }
        self.metrics
            .messages_processed
            .get_or_create_owned(&InstanceLabels {
                instance_id: instance_id.to_owned(),
            })
            .inc_by(count);
        let now = SystemTime::now();
        let mut inner = self.lock();
        let window = inner.window;
        inner.messages.add(now, count, window);
        inner.totals.messages_processed += count;
    }

    /// Records a listen/add of a new or reactivated chat.
    pub fn record_listener_added(&self, instance_id: &str) {
        tracing::debug!(instance_id, "Chat added as a listener.");
        self.metrics
            .listeners_added
            .get_or_create_owned(&InstanceLabels {
                instance_id: instance_id.to_owned(),
            })
            .inc();
        self.lock().totals.listeners_added += 1;
    }

    /// Records that a supervised instance task ended on its own and will be restarted: the
    /// error, `wxauto_listener_restarts_total` and `wxauto_listener_task_restarts_total`.
    pub fn record_task_restart(&self, instance_id: &str, message: &str) {
        self.record_error(
            Component::Listener,
            ErrorKind::Task,
            Some(instance_id),
            message,
        );
        self.metrics.listener_restarts.inc();
        self.metrics
            .task_restarts
            .get_or_create_owned(&InstanceLabels {
                instance_id: instance_id.to_owned(),
            })
            .inc();
    }

    /// Records a listen/remove.
    pub fn record_listener_removed(&self, instance_id: &str, reason: &'static str) {
        self.metrics
            .listeners_removed
            .get_or_create_owned(&ReasonLabels {
                instance_id: instance_id.to_owned(),
                reason,
            })
            .inc();
        self.lock().totals.listeners_removed += 1;
    }

    /// Records a successful load or reload. `counted` is false for the first load and for a
    /// watcher signal whose content had not changed: those are not reloads.
    pub fn record_reload_success(&self, hash: u64, counted: bool) {
        if counted {
            self.metrics.config_reloads.inc();
        }
        let mut inner = self.lock();
        inner.reload.last_reload_successful = true;
        inner.reload.last_success_time = unix_seconds(SystemTime::now());
        inner.reload.config_hash = hash;
        if counted {
            inner.reload.reloads += 1;
        }
    }

    /// Records a failed reload; the errors are also logged and put in the ring.
    pub fn record_reload_failure(&self, errors: &[String]) {
        // The state first, then the counter: a scrape that sees the failure counted never sees
        // the configuration still marked as successfully loaded (once the state is read after
        // the counter).
        {
            let mut inner = self.lock();
            inner.reload.last_reload_successful = false;
            inner.reload.failures += 1;
        }
        self.metrics.config_reload_failures.inc();
        let summary = match errors {
            [] => "configuration reload failed".to_owned(),
            [only] => format!("configuration reload failed: {only}"),
            [first, rest @ ..] => format!(
                "configuration reload failed: {first} (and {} more)",
                rest.len()
            ),
        };
        for error in errors {
            tracing::error!(component = "config", "Invalid configuration: {error}");
        }
        self.record_error(Component::Config, ErrorKind::Reload, None, &summary);
    }

    /// The newest `limit` errors, oldest first.
    pub fn recent_errors(&self, limit: usize) -> Vec<ErrorRecord> {
        let inner = self.lock();
        let skip = inner.ring.len().saturating_sub(limit);
        inner.ring.iter().skip(skip).cloned().collect()
    }
}

impl crate::event::ErrorSink for Monitor {
    fn record_error(
        &self,
        component: Component,
        kind: ErrorKind,
        instance_id: Option<&str>,
        message: &str,
    ) {
        Monitor::record_error(self, component, kind, instance_id, message);
    }
}
