//! The live-state registry: each instance's published state (connectivity, chats), the
//! listener service's running flag and task count, and the registration that creates and
//! removes an instance's series.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use super::Monitor;

/// Connectivity of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Connectivity {
    /// Not probed yet.
    #[default]
    Unknown,
    /// Connected.
    Up,
    /// Failing; retried with backoff.
    Down,
    /// Came back; re-initialising and re-adding chats.
    Recovering,
}

/// One chat as the listener tracks it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatState {
    /// Listened (counts against the cap) or timed out.
    pub active: bool,
    /// From `fixed_listeners`; never times out.
    pub fixed: bool,
    /// Unix seconds of the last message, if any.
    pub last_message_time: Option<f64>,
    /// Unix seconds of the last poll that covered this chat.
    pub last_check_time: f64,
    /// Messages received since the listener started.
    pub message_count: u64,
    /// Failed listen/add or listen/remove calls for this chat.
    pub error_count: u64,
}

/// One instance as its actor last published it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InstanceState {
    /// The configured id.
    pub instance_id: String,
    /// `enabled` in the config. A disabled instance is not polled: it is left out of the health
    /// score, the clients and listeners documents and the connectivity and chat gauges.
    pub enabled: bool,
    /// WeChat reported connected at the last probe (initialised upstream).
    pub initialized: bool,
    /// Connected as docs/reference.md ("Health score") defines it.
    pub connected: bool,
    /// The state machine.
    pub state: Connectivity,
    /// Unix seconds of the last health probe.
    pub last_check_time: Option<f64>,
    /// Errors recorded for this instance since the sidecar started.
    pub error_count: u64,
    /// The last error's text.
    pub last_error: Option<String>,
    /// Chats by name.
    pub chats: BTreeMap<String, ChatState>,
}

impl InstanceState {
    /// A fresh, unprobed instance.
    pub fn new(instance_id: &str, enabled: bool) -> Self {
        Self {
            instance_id: instance_id.to_owned(),
            enabled,
            initialized: false,
            connected: false,
            state: Connectivity::Unknown,
            last_check_time: None,
            error_count: 0,
            last_error: None,
            chats: BTreeMap::new(),
        }
    }

    /// Active chats.
    pub fn active_chats(&self) -> usize {
        self.chats.values().filter(|chat| chat.active).count()
    }
}

impl Monitor {
    /// The listener service started: uptime counts from now.
    pub fn listener_started(&self) {
        let mut inner = self.lock();
        inner.running = true;
        inner.listener_start = Some(SystemTime::now());
    }

    /// The listener service stopped.
    pub fn listener_stopped(&self) {
        self.lock().running = false;
    }

    /// Whether the listener service runs (cheap; for readiness).
    pub fn is_running(&self) -> bool {
        self.lock().running
    }

    /// Sets the number of live supervised tasks.
    pub fn set_tasks(&self, tasks: usize) {
        self.lock().tasks = tasks;
    }

    /// Adds or replaces an instance's published state, creating its series at 0.
    pub fn register_instance(&self, instance_id: &str, enabled: bool) {
        // Under the lock, so `drop_series_if_removed` never sees the series without the entry.
        let mut inner = self.lock();
        self.metrics.init_instance(instance_id);
        inner
            .instances
            .entry(instance_id.to_owned())
            .and_modify(|state| state.enabled = enabled)
            .or_insert_with(|| InstanceState::new(instance_id, enabled));
    }

    /// Publishes an instance's state (from its actor). Counts kept by the monitor are kept.
    pub fn publish_instance(&self, mut state: InstanceState) {
        let mut inner = self.lock();
        if let Some(old) = inner.instances.get(&state.instance_id) {
            state.error_count = old.error_count;
            state.last_error.clone_from(&old.last_error);
            state.enabled = old.enabled;
        } else {
            // The instance was removed while its actor was still stopping: do not resurrect it.
            return;
        }
        inner.instances.insert(state.instance_id.clone(), state);
    }

    /// The chats an instance's last actor published, to seed its successor.
    pub fn chats_of(&self, instance_id: &str) -> Vec<(String, ChatState)> {
        self.lock()
            .instances
            .get(instance_id)
            .map(|state| {
                state
                    .chats
                    .iter()
                    .map(|(name, chat)| (name.clone(), chat.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets a removed instance: its JSON rows and every metric series disappear.
    pub fn remove_instance(&self, instance_id: &str) {
        self.metrics.remove_instance(instance_id);
        self.lock().instances.remove(instance_id);
    }

    /// Drops the series of an instance that is not registered (any more). The supervisor calls
    /// it once a stopped actor has really ended, since its last call may land after
    /// `remove_instance`.
    pub fn drop_series_if_removed(&self, instance_id: &str) {
        let inner = self.lock();
        if !inner.instances.contains_key(instance_id) {
            self.metrics.remove_instance(instance_id);
        }
    }
}
