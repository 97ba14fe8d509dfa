//! One actor per wxauto instance: connectivity state machine, chat table, polling and draining.
//!
//! The actor owns its client, its chats, its backoff and its connectivity state; nothing else
//! mutates them. It publishes a copy of its state to the monitor after every step, and talks to
//! the rest of the sidecar only through the `MessageSink` and its command channel.

pub mod filter;
pub mod recovery;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::clock::unix_seconds;
use crate::config::{InstanceConfig, ListenerConfig, SendMode};
use crate::event::{Component, ErrorKind};
use crate::message::{
    Download, DownloadError, InboundMessage, MessageSink, Reply, ReplyError, ReplyTicket,
    StoredChat, UpstreamSession,
};
use crate::metrics::Metrics;
use crate::monitor::{ChatState, Connectivity, InstanceState, Monitor};
use crate::wxauto::{ChatBatch, Client, HealthInfo, RawMessage, WxautoError};

/// Upper bound of `get-next-new` calls per poll (each returns at most one chat).
const MAX_MAIN_WINDOW_DRAIN: usize = 16;
/// Upper bound of `listen/get` calls per poll (each returns at most one chat).
const MAX_LISTEN_DRAIN: usize = 64;
/// Held messages beyond which the actor stops taking new ones until the sink recovers.
const MAX_HELD: usize = 10_000;
/// How far the server start time derived from `/api/health` `uptime` may move (whole seconds,
/// the network, the clock) before it counts as a server restart.
const RESTART_TOLERANCE_MS: i64 = 5_000;

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

/// Why a probe failed.
#[derive(Debug, Clone, thiserror::Error)]
enum ProbeError {
    #[error(transparent)]
    Upstream(#[from] WxautoError),
    #[error("WeChat is not connected (wechat_status {0:?}) and initialize did not connect it")]
    Offline(String),
}

impl ProbeError {
    fn kind(&self) -> ErrorKind {
        match self {
            Self::Upstream(error) => error.kind(),
            Self::Offline(_) => ErrorKind::Offline,
        }
    }
}

#[derive(Debug, Clone)]
struct Chat {
    active: bool,
    fixed: bool,
    /// Counted in `listeners_added` once; re-adds after a recovery are restorations.
    announced: bool,
    last_activity: Instant,
    added: SystemTime,
    last_message: Option<SystemTime>,
    last_check: SystemTime,
    message_count: u64,
    error_count: u64,
    /// Where the chat's history stood when it was first listened (see `StoredChat`).
    baseline: Option<String>,
}

impl Chat {
    fn new(fixed: bool) -> Self {
        Self {
            active: true,
            fixed,
            announced: false,
            last_activity: Instant::now(),
            added: SystemTime::now(),
            last_message: None,
            last_check: SystemTime::now(),
            message_count: 0,
            error_count: 0,
            baseline: None,
        }
    }

    /// A chat as the store kept it across a restart of the process: its idle timer runs from
    /// its last message (or from when it was added), not from now, so a chat that stays quiet
    /// still times out. Fixed-ness comes from the current settings.
    fn from_stored(stored: &StoredChat) -> Self {
        let now = SystemTime::now();
        let added = from_unix_ms(stored.added_ms);
        let last_message = stored.last_message_ms.map(from_unix_ms);
        let idle = now
            .duration_since(last_message.unwrap_or(added))
            .unwrap_or_default();
        Self {
            active: stored.active,
            fixed: false,
            announced: true,
            last_activity: Instant::now()
                .checked_sub(idle)
                .unwrap_or_else(Instant::now),
            added,
            last_message,
            last_check: now,
            message_count: stored.message_count,
            error_count: stored.error_count,
            baseline: stored.baseline.clone(),
        }
    }

    fn stored(&self, name: &str) -> StoredChat {
        StoredChat {
            chat: name.to_owned(),
            active: self.active,
            fixed: self.fixed,
            added_ms: unix_ms(self.added),
            last_message_ms: self.last_message.map(unix_ms),
            message_count: self.message_count,
            error_count: self.error_count,
            baseline: self.baseline.clone(),
        }
    }

    /// A chat as a previous actor left it. Fixed-ness comes from the current settings.
    fn restored(state: &ChatState) -> Self {
        let now = SystemTime::now();
        let last_message = state.last_message_time.map(|seconds| {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(seconds.max(0.0))
        });
        let idle = last_message
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or_default();
        Self {
            active: state.active,
            fixed: false,
            announced: true,
            last_activity: Instant::now()
                .checked_sub(idle)
                .unwrap_or_else(Instant::now),
            added: last_message.unwrap_or(now),
            last_message,
            last_check: now,
            message_count: state.message_count,
            error_count: state.error_count,
            baseline: None,
        }
    }

    /// Listened, not fixed, and without a message for `timeout`: due for listen/remove.
    fn is_idle(&self, now: Instant, timeout: Duration) -> bool {
        self.active && !self.fixed && now.duration_since(self.last_activity) >= timeout
    }

    fn touch(&mut self, messages: u64) {
        self.last_check = SystemTime::now();
        if messages > 0 {
            self.last_activity = Instant::now();
            self.last_message = Some(SystemTime::now());
            self.message_count += messages;
        }
    }
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
    backoff: Backoff,
    chats: HashMap<String, Chat>,
    /// The chat table as last written to the store.
    saved_chats: Vec<StoredChat>,
    held: Held,
    /// The upstream session the ids of taken messages belong to.
    session: UpstreamSession,
    /// This actor saw the instance down: the next connection starts a new epoch.
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
            backoff: Backoff::new(settings.listener.backoff),
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
        let mut next_probe = Instant::now();
        let mut next_poll = Instant::now();
        self.publish();
        // Once the supervisor drops the settings sender, only cancellation or the closed
        // command channel ends the loop.
        let mut settings_open = true;
        loop {
            let wake = if self.connectivity == Connectivity::Up {
                next_probe.min(next_poll)
            } else {
                next_probe
            };
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
            if now >= next_probe {
                next_probe = match self.probe_and_recover().await {
                    Ok(()) => Instant::now() + self.settings.listener.health_check_interval,
                    Err(error) => {
                        self.go_down(&error.to_string(), error.kind());
                        Instant::now() + self.backoff.next_delay()
                    }
                };
                next_poll = next_poll.min(Instant::now());
            }
            if self.connectivity == Connectivity::Up && Instant::now() >= next_poll {
                if let Err(error) = self.poll().await {
                    self.go_down(&error.to_string(), error.kind());
                    next_probe = Instant::now() + self.backoff.next_delay();
                }
                next_poll = Instant::now() + self.settings.listener.poll_interval;
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
        self.backoff.set_config(settings.listener.backoff);
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

    /// Probes `GET /api/health`; initialises WeChat if it is not connected; on a transition to
    /// up re-adds every active chat.
    async fn probe_and_recover(&mut self) -> Result<(), ProbeError> {
        let result = self.probe().await;
        self.last_check = Some(SystemTime::now());
        let info = result?;
        self.observe_session(&info).await;
        if self.connectivity != Connectivity::Up {
            let was = self.connectivity;
            self.connectivity = Connectivity::Recovering;
            self.publish();
            self.restore_chats().await?;
            if self.recover_pending {
                // Before the first drain: the re-read messages are older than anything the
                // listen caches hold now, and go into the store (and to platforms) first.
                self.save_chats().await;
                self.recover().await?;
                self.recover_pending = false;
            }
            self.connectivity = Connectivity::Up;
            self.outage_recorded = false;
            self.backoff.reset();
            match was {
                Connectivity::Unknown => {
                    tracing::info!(instance_id = %self.instance.id, "Instance is up.")
                }
                _ => tracing::info!(instance_id = %self.instance.id, "Instance recovered."),
            }
        }
        Ok(())
    }

    async fn probe(&mut self) -> Result<HealthInfo, ProbeError> {
        let info = self.client.health().await?;
        if info.is_connected() {
            self.initialized = true;
            return Ok(info);
        }
        self.initialized = false;
        tracing::info!(
            instance_id = %self.instance.id,
            wechat_status = %info.wechat_status,
            "WeChat is not connected; initializing."
        );
        self.client.initialize().await?;
        let info = self.client.health().await?;
        if info.is_connected() {
            self.initialized = true;
            Ok(info)
        } else {
            Err(ProbeError::Offline(info.wechat_status))
        }
    }

    /// Starts a new epoch when the upstream session changed: the server restarted (its start
    /// time, now − uptime, moved) or this actor saw the instance down (WeChat may have
    /// restarted, which resets its runtime ids without restarting the server).
    async fn observe_session(&mut self, info: &HealthInfo) {
        let started_ms = info.started_ms(unix_ms(SystemTime::now()));
        let restarted = match (self.session.started_ms, started_ms) {
            (Some(before), Some(now)) => server_restarted(before, now),
            _ => false,
        };
        let mut session = self.session;
        if restarted || self.was_down {
            session.epoch = session.epoch.saturating_add(1);
            tracing::info!(
                instance_id = %self.instance.id,
                epoch = session.epoch,
                reason = if restarted { "server restarted" } else { "instance was down" },
                "New upstream session: message ids are deduplicated within it only."
            );
        }
        self.was_down = false;
        session.started_ms = started_ms.or(session.started_ms);
        if session == self.session {
            return;
        }
        if let Err(error) = self.sink.save_session(&self.instance.id, session).await {
            tracing::warn!(instance_id = %self.instance.id, "Cannot store the upstream session: {error}");
        }
        self.session = session;
    }

    /// The listened chats, in name order (recovery and re-adds walk them the same way).
    fn active_chat_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .chats
            .iter()
            .filter(|(_, chat)| chat.active)
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// Re-reads every active chat's history and stores what was taken but never stored (an
    /// answer in flight when the sidecar or this instance's actor died).
    async fn recover(&mut self) -> Result<(), WxautoError> {
        let names = self.active_chat_names();
        let mut recovered = 0u64;
        for name in names {
            if self.stopping.is_cancelled() || self.history_missing {
                break;
            }
            let history = match self.client.get_all_messages(&name).await {
                Ok(history) => history,
                Err(error) if error.is_instance_failure() => return Err(error),
                Err(error) if error.is_missing_endpoint() => {
                    self.note_history_missing();
                    break;
                }
                Err(error) => {
                    tracing::info!(instance_id = %self.instance.id, "Chat history not readable: {error}");
                    continue;
                }
            };
            recovered += self.recover_chat(&name, &history).await;
        }
        if recovered > 0 {
            tracing::warn!(
                instance_id = %self.instance.id,
                messages = recovered,
                "Recovered messages taken from the instance but not stored before the stop."
            );
        }
        Ok(())
    }

    /// Stores the messages of one chat's history that the store does not have; returns how
    /// many it handed over.
    async fn recover_chat(&mut self, name: &str, history: &[RawMessage]) -> u64 {
        let answer = fastrand::u64(..);
        let epoch = self.session.epoch;
        let accepted: Vec<InboundMessage> = history
            .iter()
            .enumerate()
            .filter_map(|(ordinal, raw)| {
                filter::accept(&self.instance.id, name, raw, answer, ordinal).ok()
            })
            .map(|mut message| {
                message.epoch = epoch;
                message
            })
            .collect();
        let ids: Vec<String> = accepted
            .iter()
            .filter(|message| !message.synthetic_id)
            .map(|message| message.message_id.clone())
            .collect();
        let stored = match self
            .sink
            .chat_history(&self.instance.id, name, epoch, ids)
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(instance_id = %self.instance.id, "Cannot compare a chat history with the store: {error}");
                return 0;
            }
        };
        let known: HashSet<String> = stored.known_ids.into_iter().collect();
        let baseline = self.chats.get(name).and_then(|chat| chat.baseline.clone());
        let start = recovery::first_new(&accepted, &known, &stored.tail)
            .or_else(|| recovery::after_baseline(&accepted, baseline.as_deref()));
        let Some(start) = start else {
            tracing::debug!(instance_id = %self.instance.id, "Chat history shares nothing with the store; nothing recovered.");
            return 0;
        };
        let new = recovery::unstored(accepted, start, &known);
        let count = new.len() as u64;
        if count > 0 {
            self.monitor
                .metrics()
                .messages_recovered
                .get_or_create_owned(&crate::metrics::InstanceLabels {
                    instance_id: self.instance.id.clone(),
                })
                .inc_by(count);
            if let Some(chat) = self.chats.get_mut(name) {
                chat.touch(count);
            }
            self.hand_over(new).await;
        }
        count
    }

    /// Re-adds every active chat after (re)connecting: upstream forgets its listeners when
    /// WeChat restarts, so the sidecar's table is the source of truth.
    async fn restore_chats(&mut self) -> Result<(), WxautoError> {
        let names = self.active_chat_names();
        for name in names {
            if self.stopping.is_cancelled() {
                break;
            }
            self.add_chat(&name).await?;
        }
        Ok(())
    }

    /// `listen/add` for a chat already marked active in the table. Instance failures propagate;
    /// a refusal of this one chat is recorded and the chat is marked inactive.
    async fn add_chat(&mut self, name: &str) -> Result<(), WxautoError> {
        match self.client.listen_add(name).await {
            Ok(()) => {
                let mut first = false;
                if let Some(chat) = self.chats.get_mut(name) {
                    chat.active = true;
                    if !chat.announced {
                        // New or reactivated: its idle timer starts now. A re-add after a
                        // recovery or restart keeps the timer it had.
                        chat.announced = true;
                        chat.last_activity = Instant::now();
                        first = chat.baseline.is_none();
                        self.monitor.record_listener_added(&self.instance.id);
                    }
                }
                if first {
                    self.read_baseline(name).await?;
                }
                Ok(())
            }
            Err(error) if error.is_instance_failure() => Err(error),
            Err(error) => {
                self.chat_error(name, &error);
                if let Some(chat) = self.chats.get_mut(name)
                    && !chat.fixed
                {
                    chat.active = false;
                }
                Ok(())
            }
        }
    }

    /// Notes where a newly listened chat's history stands, so that a crash during its first
    /// destructive read can be recovered even though nothing of the chat is stored yet.
    async fn read_baseline(&mut self, name: &str) -> Result<(), WxautoError> {
        if self.history_missing {
            return Ok(());
        }
        let history = match self.client.get_all_messages(name).await {
            Ok(history) => history,
            Err(error) if error.is_instance_failure() => return Err(error),
            Err(error) => {
                if error.is_missing_endpoint() {
                    self.note_history_missing();
                }
                return Ok(());
            }
        };
        let newest = history
            .iter()
            .enumerate()
            .filter_map(|(ordinal, raw)| {
                filter::accept(&self.instance.id, name, raw, 0, ordinal).ok()
            })
            .rfind(|message| !message.synthetic_id)
            .map(|message| message.message_id)
            .unwrap_or_default();
        if let Some(chat) = self.chats.get_mut(name) {
            chat.baseline = Some(newest);
        }
        Ok(())
    }

    fn note_history_missing(&mut self) {
        if !self.history_missing {
            self.history_missing = true;
            tracing::warn!(
                instance_id = %self.instance.id,
                "This wxauto server has no /api/chat/get-all-messages; messages in flight when \
                 the sidecar stops cannot be re-read from it."
            );
        }
    }

    /// Listens to a chat that is inactive or unknown: a new listener as far as the metrics and
    /// its idle timer are concerned.
    async fn reactivate(&mut self, name: &str) -> Result<(), WxautoError> {
        let chat = self
            .chats
            .entry(name.to_owned())
            .or_insert_with(|| Chat::new(false));
        chat.active = true;
        chat.announced = false;
        self.add_chat(name).await
    }

    fn chat_error(&mut self, name: &str, error: &WxautoError) {
        if let Some(chat) = self.chats.get_mut(name) {
            chat.error_count += 1;
        }
        self.record_client_error(error);
    }

    fn set_inactive(&mut self, name: &str) {
        if let Some(chat) = self.chats.get_mut(name) {
            chat.active = false;
        }
    }

    /// Marks the instance down. Only the transition records an error; retries of a known-down
    /// instance show in `wxauto_api_requests_total` alone.
    fn go_down(&mut self, message: &str, kind: ErrorKind) {
        // `Recovering` after `Down` is still the same outage: a probe that passes while the
        // re-adds fail (a rejected key, where only /api/health is unauthenticated) must not
        // record an error per retry.
        // Down while its supervised process restarts is expected: no new outage error.
        let expected = self.monitor.processes().expected_down(&self.instance.id);
        if !self.outage_recorded && !expected {
            self.outage_recorded = true;
            self.monitor.record_error(
                Component::Client,
                kind,
                Some(&self.instance.id),
                &format!("instance down: {message}"),
            );
        } else {
            tracing::debug!(instance_id = %self.instance.id, "Instance still down: {message}");
        }
        self.connectivity = Connectivity::Down;
        self.was_down = true;
    }

    /// One poll: the main window, then the listened chats, then idle chats time out.
    /// Messages taken before a failure are still handed to the sink.
    async fn poll(&mut self) -> Result<(), WxautoError> {
        if self.held_count() > 0 {
            self.flush_held().await;
            if self.held_count() >= MAX_HELD {
                // The sink is failing and we hold plenty: taking more from upstream would only
                // grow memory. Upstream keeps them for us meanwhile.
                return Ok(());
            }
        }
        self.drain().await?;
        self.expire_idle_chats().await
    }

    /// Both reads are destructive, so the messages of each answer are handed to the sink (which
    /// commits them) before the next request: a crash then loses at most the answer in flight,
    /// not everything a drain has taken so far.
    async fn drain(&mut self) -> Result<(), WxautoError> {
        for _ in 0..MAX_MAIN_WINDOW_DRAIN {
            if self.stopping.is_cancelled() {
                return Ok(());
            }
            match self.client.get_next_new().await {
                Ok(batches) if batches.is_empty() => break,
                Ok(batches) => {
                    let mut taken = Vec::new();
                    let chats: Vec<(String, u64)> = batches
                        .iter()
                        .map(|batch| (batch.chat.clone(), self.accept_batch(batch, &mut taken)))
                        .collect();
                    self.hand_over(taken).await;
                    for (chat, count) in chats {
                        self.listen_main_window_chat(chat, count).await?;
                    }
                    if self.held_count() > 0 {
                        // The sink refused: leave the rest upstream until it recovers.
                        return Ok(());
                    }
                }
                Err(error) if error.is_instance_failure() => return Err(error),
                Err(error) => {
                    self.record_client_error(&error);
                    break;
                }
            }
        }
        // A chat listened just now must be in the stored table before its first destructive
        // read, or a crash during that read would leave nothing to re-read it from.
        self.save_chats().await;
        let limit = (self.active_count() + 2).clamp(4, MAX_LISTEN_DRAIN);
        for _ in 0..limit {
            if self.stopping.is_cancelled() {
                return Ok(());
            }
            match self.client.listen_get().await {
                Ok(batches) if batches.is_empty() => break,
                Ok(batches) => {
                    let mut taken = Vec::new();
                    for batch in batches {
                        self.take_listened(batch, &mut taken);
                    }
                    self.hand_over(taken).await;
                    if self.held_count() > 0 {
                        return Ok(());
                    }
                }
                Err(error) if error.is_instance_failure() => return Err(error),
                Err(error) => {
                    self.record_client_error(&error);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Records a refused or malformed answer; the instance stays up.
    fn record_client_error(&self, error: &WxautoError) {
        self.monitor.record_error(
            Component::Client,
            error.kind(),
            Some(&self.instance.id),
            &error.to_string(),
        );
    }

    /// A chat seen in the main window, whose `count` messages were handed over: make sure it
    /// is listened.
    async fn listen_main_window_chat(
        &mut self,
        name: String,
        count: u64,
    ) -> Result<(), WxautoError> {
        match self.chats.get(&name) {
            Some(chat) if chat.active => {
                // Upstream lost the listener (or never had it): add it again.
                self.add_chat(&name).await?;
            }
            // A message for a timed-out chat reactivates it instead of being dropped.
            Some(_) => self.reactivate(&name).await?,
            None => {
                let cap = self.settings.listener.max_listeners_per_instance;
                if self.active_count() >= cap {
                    tracing::info!(
                        instance_id = %self.instance.id,
                        cap,
                        "Listener cap reached; the chat is not listened, its message is kept."
                    );
                } else if self.sink.wants_chat(&self.instance.id, &name) {
                    self.chats.insert(name.clone(), Chat::new(false));
                    self.add_chat(&name).await?;
                }
            }
        }
        if let Some(chat) = self.chats.get_mut(&name) {
            chat.touch(count);
        }
        Ok(())
    }

    /// A chat from the destructive listen/get: its messages are ours now.
    fn take_listened(&mut self, batch: ChatBatch, taken: &mut Vec<InboundMessage>) {
        let count = self.accept_batch(&batch, taken);
        let chat = self.chats.entry(batch.chat).or_insert_with(|| {
            // Listened upstream before we started (or by someone else): adopt it.
            let mut chat = Chat::new(false);
            chat.announced = true;
            chat
        });
        chat.active = true;
        chat.touch(count);
    }

    /// Filters a batch into `taken`; returns how many messages passed. Echoes of our replies
    /// are the sink's to recognise (delivery's echo guard knows whom each reply answered): a
    /// text match here would also drop a peer who repeats our words.
    fn accept_batch(&mut self, batch: &ChatBatch, taken: &mut Vec<InboundMessage>) -> u64 {
        let mut count = 0;
        // Every answer is new to us (the reads are destructive): its own number keeps the
        // made-up ids of two identical id-less messages apart.
        let answer = fastrand::u64(..);
        for (ordinal, raw) in batch.messages.iter().enumerate() {
            let Ok(mut message) =
                filter::accept(&self.instance.id, &batch.chat, raw, answer, ordinal)
            else {
                continue;
            };
            message.epoch = self.session.epoch;
            taken.push(message);
            count += 1;
        }
        count
    }

    /// Hands messages to the sink; on failure they are held and retried before the next poll.
    async fn hand_over(&mut self, taken: Vec<InboundMessage>) {
        if taken.is_empty() {
            return;
        }
        self.monitor
            .record_messages(&self.instance.id, taken.len() as u64);
        // One line per upstream answer (one chat): ids and counts, never the text.
        tracing::info!(
            instance_id = %self.instance.id,
            chat = %crate::logging::chat(&taken[0].chat),
            messages = taken.len(),
            "Messages taken from the instance."
        );
        self.held().extend(taken);
        self.flush_held().await;
    }

    fn held(&self) -> MutexGuard<'_, Vec<InboundMessage>> {
        // A panic while the lock was held cannot leave the list half-changed (only whole
        // pushes and drains happen under it): carry on with it.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn held_count(&self) -> usize {
        self.held().len()
    }

    async fn flush_held(&mut self) {
        let batch = self.held().clone();
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        match self.sink.accept(batch).await {
            // Only this actor adds to the list, so its first `n` are what was just accepted.
            Ok(()) => drop(self.held().drain(..n)),
            Err(error) => self.monitor.record_error(
                Component::Listener,
                ErrorKind::Storage,
                Some(&self.instance.id),
                &format!("{error}; holding {n} message(s) in memory"),
            ),
        }
    }

    /// Chats idle past `listener_timeout` become inactive and are removed upstream.
    async fn expire_idle_chats(&mut self) -> Result<(), WxautoError> {
        let timeout = self.settings.listener.listener_timeout;
        let now = Instant::now();
        let mut idle: Vec<String> = self
            .chats
            .iter()
            .filter(|(_, chat)| chat.is_idle(now, timeout))
            .map(|(name, _)| name.clone())
            .collect();
        idle.sort();
        for name in idle {
            if self.stopping.is_cancelled() {
                return Ok(());
            }
            match self.client.listen_remove(&name).await {
                Ok(()) => {}
                Err(error) if error.is_instance_failure() => return Err(error),
                // "Not listened" upstream: it is gone already, which is what we wanted.
                Err(error) => {
                    tracing::debug!(instance_id = %self.instance.id, "listen/remove refused: {error}")
                }
            }
            self.set_inactive(&name);
            self.monitor
                .record_listener_removed(&self.instance.id, "timeout");
            tracing::debug!(instance_id = %self.instance.id, "Chat timed out and was removed.");
        }
        Ok(())
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
                if error.is_instance_failure() {
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

/// Unix milliseconds of a time (0 before the epoch).
/// Whether the server start time moved by more than the tolerance. `abs_diff`, because the
/// times come from upstream answers: any two `i64`s must compare without overflow.
fn server_restarted(before_ms: i64, now_ms: i64) -> bool {
    now_ms.abs_diff(before_ms) > RESTART_TOLERANCE_MS.unsigned_abs()
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    })
}

fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused time: the idle timer runs from the last message, not from the add, and a fixed
    /// or inactive chat never expires.
    #[tokio::test(start_paused = true)]
    async fn a_chat_expires_listener_timeout_after_its_last_message() {
        let timeout = Duration::from_secs(600);
        let mut chat = Chat::new(false);
        tokio::time::advance(timeout - Duration::from_millis(1)).await;
        assert!(!chat.is_idle(Instant::now(), timeout));
        // A poll without messages does not count as activity.
        chat.touch(0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(chat.is_idle(Instant::now(), timeout));
        // A message restarts the timer.
        chat.touch(2);
        assert_eq!(chat.message_count, 2);
        tokio::time::advance(timeout / 2).await;
        assert!(!chat.is_idle(Instant::now(), timeout));
        tokio::time::advance(timeout / 2).await;
        assert!(chat.is_idle(Instant::now(), timeout));

        let fixed = Chat::new(true);
        let mut inactive = Chat::new(false);
        inactive.active = false;
        tokio::time::advance(timeout * 10).await;
        assert!(!fixed.is_idle(Instant::now(), timeout));
        assert!(!inactive.is_idle(Instant::now(), timeout));
    }

    /// Found by the fuzz suite's health property: an uptime near `u64::MAX / 1000` puts the
    /// start time near `i64::MIN`, and `(now - before).abs()` overflowed (a panic in debug
    /// builds, a wrong answer in release).
    #[test]
    fn start_times_from_absurd_uptimes_compare_without_overflow() {
        assert!(server_restarted(i64::MIN, i64::MAX));
        assert!(server_restarted(i64::MAX, i64::MIN));
        assert!(!server_restarted(i64::MIN, i64::MIN + 5_000));
        assert!(server_restarted(0, 5_001));
        assert!(!server_restarted(1_000, -4_000));
    }
}
