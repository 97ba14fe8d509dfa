//! One actor per wxauto instance: connectivity state machine, chat table, polling and draining.
//!
//! The actor owns its client, its chats, its backoff and its connectivity state; nothing else
//! mutates them. It publishes a copy of its state to the monitor after every step, and talks to
//! the rest of the sidecar only through the `MessageSink` and its command channel.

mod chat;
mod drain;
pub mod filter;
mod probe;
pub mod recovery;
mod schedule;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::clock::unix_seconds;
use crate::config::{InstanceConfig, ListenerConfig, SendMode};
use crate::message::{
    Download, DownloadError, InboundMessage, MessageSink, Reply, ReplyError, ReplyTicket,
    StoredChat, UpstreamSession,
};
use crate::metrics::Metrics;
use crate::monitor::{ChatState, Connectivity, InstanceState, Monitor};
use crate::wxauto::Client;
use chat::Chat;
use schedule::Schedule;

/// Messages an actor took from its instance that the sink has not accepted yet. The
/// supervisor owns one per instance and hands it to each actor it starts, so a panic or a
/// restart of the actor loses none of them.
pub type Held = Arc<Mutex<Vec<InboundMessage>>>;

/// Settings an actor takes live, without a restart. They come over a `watch` channel of their
/// own, not the command queue: the latest value wins, and a full queue cannot lose them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActorSettings {
    /// `listener:` section.
    pub listener: ListenerConfig,
    /// The fixed chats of this instance.
    pub fixed_chats: Vec<String>,
}

/// Commands to a running actor.
#[derive(Debug)]
pub enum InstanceCommand {
    /// Send a reply to a chat of this instance.
    Reply {
        /// What to send.
        reply: Reply,
        /// Sent only if the requester has not given up on it first.
        ticket: ReplyTicket,
        /// Where the outcome goes.
        respond: oneshot::Sender<Result<(), ReplyError>>,
    },
    /// Fetch a media file (`POST /api/file/download`), keeping at most `max_bytes`.
    Download {
        /// The path on the instance's machine.
        file_path: String,
        /// The size cap (`media.max_bytes`).
        max_bytes: u64,
        /// Where the outcome goes.
        respond: oneshot::Sender<Result<Download, DownloadError>>,
    },
}

/// The actor for one instance.
pub struct InstanceActor {
    instance: InstanceConfig,
    settings: ActorSettings,
    /// Where new settings come from (the supervisor keeps the sender).
    settings_updates: watch::Receiver<ActorSettings>,
    client: Client,
    monitor: Arc<Monitor>,
    sink: Arc<dyn MessageSink>,
    commands: mpsc::Receiver<InstanceCommand>,
    connectivity: Connectivity,
    initialized: bool,
    last_check: Option<SystemTime>,
    /// When it probes and polls next, and its backoff while the instance is down.
    schedule: Schedule,
    chats: HashMap<String, Chat>,
    /// The chat table as last written to the store.
    saved_chats: Vec<StoredChat>,
    held: Held,
    /// The upstream session the ids of taken messages belong to.
    session: UpstreamSession,
    /// An outage began and no probe has passed since: the next connection starts a new epoch
    /// (once per outage, however often a passing probe is followed by a failing poll).
    was_down: bool,
    /// Re-read the active chats' histories at the next connection (after an unclean stop or
    /// an actor crash).
    recover_pending: bool,
    /// The server answered that it has no history endpoint; said once per actor.
    history_missing: bool,
    /// Checked between upstream calls (never during one: aborting a destructive listen/get
    /// mid-flight could lose the messages it returns), so shutdown waits at most one call.
    stopping: CancellationToken,
    /// The current outage already recorded its one error.
    outage_recorded: bool,
    /// From the first failure until a message poll is answered: an outage ends when messages
    /// can be taken again, not when `/api/health` (which needs no key) answers.
    in_outage: bool,
    /// A poll has succeeded since the actor started ("Instance is up." once, then "recovered").
    polled_once: bool,
}

// === impl InstanceActor ===

impl InstanceActor {
    /// Builds an actor; `commands` is the receiving end of its command channel and `settings_updates`
    /// of its settings channel (the current value is the one it starts with). `seed` is the
    /// chat table a predecessor published (after a restart or crash): those chats are re-added
    /// on the first connection and keep their idle timers; without one, the table the store
    /// kept from the previous run is used. `held` holds what a predecessor took and the sink
    /// has not accepted yet. With `recover`, the active chats' histories are re-read at the
    /// first connection for messages taken but never stored.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        instance: InstanceConfig,
        mut settings_updates: watch::Receiver<ActorSettings>,
        metrics: Metrics,
        monitor: Arc<Monitor>,
        sink: Arc<dyn MessageSink>,
        commands: mpsc::Receiver<InstanceCommand>,
        seed: Vec<(String, ChatState)>,
        held: Held,
        recover: bool,
    ) -> Result<Self, reqwest::Error> {
        let settings = settings_updates.borrow_and_update().clone();
        let client = Client::new(
            &instance.id,
            &instance.base_url,
            instance.api_key.clone(),
            settings.listener.request_timeout,
            metrics,
        )?;
        let mut chats: HashMap<String, Chat> = seed
            .iter()
            .map(|(name, state)| (name.clone(), Chat::restored(state)))
            .collect();
        for chat in &settings.fixed_chats {
            let entry = chats.entry(chat.clone()).or_insert_with(|| Chat::new(true));
            entry.fixed = true;
            entry.active = true;
        }
        Ok(Self {
            schedule: Schedule::new(settings.listener.backoff, Instant::now()),
            instance,
            settings,
            settings_updates,
            client,
            monitor,
            sink,
            commands,
            connectivity: Connectivity::Unknown,
            initialized: false,
            last_check: None,
            chats,
            saved_chats: Vec::new(),
            held,
            session: UpstreamSession::default(),
            was_down: false,
            recover_pending: recover,
            history_missing: false,
            stopping: CancellationToken::new(),
            outage_recorded: false,
            in_outage: false,
            polled_once: false,
        })
    }

    /// The chat table and upstream session the store kept: the session always, the chats only
    /// when no predecessor in this process left a table (which is newer).
    async fn load_stored_state(&mut self) {
        let (stored, session) = match self.sink.load_listener(&self.instance.id).await {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(instance_id = %self.instance.id, "Cannot read the stored chat table: {error}");
                return;
            }
        };
        self.session = session;
        let seeded = self
            .chats
            .values()
            .any(|chat| !chat.fixed || chat.announced);
        if !seeded {
            for chat in &stored {
                let entry = Chat::from_stored(chat);
                let fixed = self.settings.fixed_chats.contains(&chat.chat);
                // A fixed chat already has a fresh placeholder from the settings: the stored
                // row replaces it, or its baseline would be read again and messages taken (and
                // lost in flight) before this start would lie behind the new baseline.
                let slot = self
                    .chats
                    .entry(chat.chat.clone())
                    .and_modify(|existing| {
                        if !existing.announced {
                            *existing = Chat::from_stored(chat);
                        }
                    })
                    .or_insert(entry);
                slot.fixed = fixed;
                if fixed {
                    slot.active = true;
                }
            }
            if !stored.is_empty() {
                tracing::info!(
                    instance_id = %self.instance.id,
                    chats = stored.len(),
                    active = stored.iter().filter(|chat| chat.active).count(),
                    "Chat table restored from the store."
                );
            }
        }
        self.saved_chats = stored;
    }

    /// Writes the chat table to the store when it changed since the last write. A failure is
    /// retried at the next call.
    async fn save_chats(&mut self) {
        let mut chats: Vec<StoredChat> = self
            .chats
            .iter()
            .map(|(name, chat)| chat.stored(name))
            .collect();
        chats.sort_by(|a, b| a.chat.cmp(&b.chat));
        if chats == self.saved_chats {
            return;
        }
        match self.sink.save_chats(&self.instance.id, chats.clone()).await {
            Ok(()) => self.saved_chats = chats,
            Err(error) => {
                tracing::warn!(instance_id = %self.instance.id, "Cannot store the chat table: {error}")
            }
        }
    }

    /// Runs until `cancel` fires. Messages already taken from the instance are handed to the
    /// sink before it returns.
    pub async fn run(mut self, cancel: CancellationToken) {
        self.stopping = cancel.clone();
        let id = self.instance.id.clone();
        tracing::info!(instance_id = %id, base_url = %self.instance.display_url(), "Instance actor started.");
        self.load_stored_state().await;
        self.publish();
        // Once the supervisor drops the settings sender, only cancellation or the closed
        // command channel ends the loop.
        let mut settings_open = true;
        loop {
            let wake = self.schedule.wake(self.connectivity == Connectivity::Up);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => {
                        self.handle(command).await;
                        self.publish();
                        continue;
                    }
                    // Every sender is gone: the supervisor dropped us.
                    None => break,
                },
                changed = self.settings_updates.changed(), if settings_open => {
                    if changed.is_err() {
                        settings_open = false;
                        continue;
                    }
                    let settings = self.settings_updates.borrow_and_update().clone();
                    self.apply_settings(settings).await;
                    self.publish();
                    continue;
                }
                () = sleep_until(wake) => {}
            }
            let now = Instant::now();
            if self.schedule.probe_due(now) {
                let came_up = self.connectivity != Connectivity::Up;
                match self.probe_and_recover().await {
                    Ok(()) => self.schedule.probe_passed(
                        Instant::now(),
                        self.settings.listener.health_check_interval,
                        came_up,
                    ),
                    Err(error) => {
                        self.go_down(&error.to_string(), error.kind());
                        self.schedule.probe_failed(Instant::now());
                    }
                }
            }
            if self.connectivity == Connectivity::Up && self.schedule.poll_due(Instant::now()) {
                // An answered message poll ends an outage (`drain` calls `poll_answered`); a
                // poll that only flushed held messages asked upstream nothing.
                if let Err(error) = self.poll().await {
                    self.go_down(&error.to_string(), error.kind());
                    self.schedule.poll_failed(Instant::now());
                }
                self.schedule
                    .polled(Instant::now(), self.settings.listener.poll_interval);
            }
            self.publish();
            self.save_chats().await;
        }
        if self.held_count() > 0 {
            // Last chance for messages the sink refused earlier.
            self.flush_held().await;
        }
        self.save_chats().await;
        tracing::info!(instance_id = %id, "Instance actor stopped.");
    }

    async fn handle(&mut self, command: InstanceCommand) {
        match command {
            InstanceCommand::Reply {
                reply,
                ticket,
                respond,
            } => {
                if !ticket.start() {
                    // The worker gave up waiting and will try again: sending now would make
                    // the chat get this reply twice.
                    tracing::debug!(instance_id = %self.instance.id, "Reply abandoned by its worker; not sent.");
                    return;
                }
                let result = self.send_reply(&reply).await;
                let _ = respond.send(result);
            }
            InstanceCommand::Download {
                file_path,
                max_bytes,
                respond,
            } => {
                if self.connectivity != Connectivity::Up {
                    let _ =
                        respond.send(Err(DownloadError::InstanceDown(self.instance.id.clone())));
                    return;
                }
                // On its own task: a large file must not hold up the destructive reads.
                let client = self.client.clone();
                tokio::spawn(async move {
                    let result = client
                        .download_file(&file_path, max_bytes)
                        .await
                        .map_err(|error| DownloadError::Upstream(error.to_string()));
                    let _ = respond.send(result);
                });
            }
        }
    }

    async fn apply_settings(&mut self, settings: ActorSettings) {
        self.schedule.set_backoff(settings.listener.backoff);
        if settings.listener.request_timeout != self.settings.listener.request_timeout
            && let Ok(client) = Client::new(
                &self.instance.id,
                &self.instance.base_url,
                self.instance.api_key.clone(),
                settings.listener.request_timeout,
                self.monitor.metrics().clone(),
            )
        {
            self.client = client;
        }
        let old_fixed = std::mem::take(&mut self.settings.fixed_chats);
        for chat in &old_fixed {
            if settings.fixed_chats.contains(chat) {
                continue;
            }
            // No longer fixed: stop listening to it, as the user removed it from the config.
            if let Some(entry) = self.chats.get_mut(chat) {
                entry.fixed = false;
            }
            if self.connectivity == Connectivity::Up
                && self.chats.get(chat).is_some_and(|entry| entry.active)
            {
                match self.client.listen_remove(chat).await {
                    Ok(()) => {
                        self.set_inactive(chat);
                        self.monitor
                            .record_listener_removed(&self.instance.id, "config");
                    }
                    Err(error) => self.chat_error(chat, &error),
                }
            }
        }
        for chat in &settings.fixed_chats {
            let entry = self
                .chats
                .entry(chat.clone())
                .or_insert_with(|| Chat::new(true));
            entry.fixed = true;
            if !entry.active || !entry.announced {
                entry.active = true;
                if self.connectivity == Connectivity::Up {
                    let chat = chat.clone();
                    let _ = self.add_chat(&chat).await;
                }
            }
        }
        self.settings = settings;
    }

    async fn send_reply(&mut self, reply: &Reply) -> Result<(), ReplyError> {
        if self.connectivity != Connectivity::Up {
            return Err(ReplyError::InstanceDown(self.instance.id.clone()));
        }
        // Replies only reach listened chats: make sure this one is.
        let listened = self.chats.get(&reply.chat).is_some_and(|chat| chat.active);
        if !listened {
            self.reactivate(&reply.chat)
                .await
                .map_err(|error| ReplyError::Upstream(error.to_string()))?;
        }
        let typing = reply.mode == SendMode::Typing;
        let mut result = self
            .client
            .send(&reply.chat, &reply.text, &reply.at, typing)
            .await;
        if let Err(error) = &result
            && error.is_not_listened()
        {
            self.add_chat(&reply.chat)
                .await
                .map_err(|error| ReplyError::Upstream(error.to_string()))?;
            result = self
                .client
                .send(&reply.chat, &reply.text, &reply.at, typing)
                .await;
        }
        match result {
            Ok(()) => {
                if let Some(chat) = self.chats.get_mut(&reply.chat) {
                    chat.last_activity = Instant::now();
                }
                Ok(())
            }
            Err(error) => {
                if error.is_instance_failure_for_chat() {
                    self.go_down(&error.to_string(), error.kind());
                }
                Err(ReplyError::Upstream(error.to_string()))
            }
        }
    }

    fn active_count(&self) -> usize {
        self.chats.values().filter(|chat| chat.active).count()
    }

    fn publish(&self) {
        let chats = self
            .chats
            .iter()
            .map(|(name, chat)| {
                (
                    name.clone(),
                    ChatState {
                        active: chat.active,
                        fixed: chat.fixed,
                        last_message_time: chat.last_message.map(unix_seconds),
                        last_check_time: unix_seconds(chat.last_check),
                        message_count: chat.message_count,
                        error_count: chat.error_count,
                    },
                )
            })
            .collect();
        let mut state = InstanceState::new(&self.instance.id, self.instance.enabled);
        state.initialized = self.initialized;
        state.connected = self.connectivity == Connectivity::Up;
        state.state = self.connectivity;
        state.last_check_time = self.last_check.map(unix_seconds);
        state.chats = chats;
        self.monitor.publish_instance(state);
    }
}
