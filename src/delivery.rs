//! Durable delivery: store → rules → platform → reply.
//!
//! `Delivery::sink()` commits routed messages to SQLite before the listener forgets them;
//! a bounded pool of workers claims rows atomically, delivers them, retries with capped
//! exponential backoff, and sends replies back through the `ReplySender`. See
//! the README's "Delivery" section for the guarantees.

mod media;
mod metrics;
mod platforms;
mod rules;
mod store;
mod worker;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{DeliveryConfig, StorageConfig};
use crate::event::{Component, ErrorKind, ErrorSink};
use crate::message::{
    BoxFuture, ChatHistory, InboundMessage, MessageSink, ReplySender, SinkError, StoredChat,
    UpstreamSession,
};
use crate::metrics::Registry;

use self::metrics::DeliveryMetrics;
use self::store::{NewMessage, Store};

pub use self::media::MediaSettings;
pub use self::rules::{DropReason, RouteDecision, Routing};
pub use self::store::{DeadLetter, StoreCounts, StoreError};

/// How often delivered rows past `storage.retention_days` are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a sent reply may come back as an echo.
const ECHO_WINDOW: Duration = Duration::from_secs(120);
/// Sent replies remembered per chat for the echo guard.
const ECHO_PER_CHAT: usize = 16;
/// Milliseconds in a day.
const DAY_MS: i64 = 86_400_000;

/// The running delivery service; cheap to clone.
#[derive(Clone)]
pub struct Delivery {
    inner: Arc<Inner>,
}

/// State shared by the handle, the sink and the workers.
struct Inner {
    store: Store,
    /// The current routing snapshot; a worker clones the `Arc` when it claims a row, so a
    /// swap never changes a delivery in flight.
    routing: RwLock<Arc<Routing>>,
    config: RwLock<DeliveryConfig>,
    retention_days: u32,
    dead_retention_days: u32,
    /// Read once at start, before this run cleared the marker.
    last_stop_clean: bool,
    metrics: DeliveryMetrics,
    replies: Arc<dyn ReplySender>,
    errors: Arc<dyn ErrorSink>,
    /// Wakes idle workers: new rows, or a finished row that unblocks its chat.
    notify: Notify,
    echo: Mutex<EchoGuard>,
    /// `media:` and the download log's place; swapped on reload.
    media: RwLock<MediaSettings>,
    /// `file_processing.log` (its directory is fixed at start, like the main log's).
    file_log: media::FileLog,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// What workers schedule attempts by.
    clock: Clock,
}

/// The time a row's `next_attempt_ms` is set and compared by.
#[derive(Debug, Clone, Copy)]
enum Clock {
    /// The wall clock: stored times outlive the process.
    Wall,
    /// Paused-time tests: the wall clock at `origin`, moved on by tokio's (paused) clock, so
    /// that retries come due when paused time reaches them.
    #[cfg(test)]
    Tokio {
        origin_ms: i64,
        origin: tokio::time::Instant,
    },
}

impl Clock {
    fn now_ms(self) -> i64 {
        match self {
            Self::Wall => store::now_ms(),
            #[cfg(test)]
            Self::Tokio { origin_ms, origin } => {
                origin_ms + i64::try_from(origin.elapsed().as_millis()).unwrap_or(i64::MAX / 2)
            }
        }
    }
}

/// The `MessageSink` handed to the listener.
struct DeliverySink {
    inner: Arc<Inner>,
}

/// Replies sent recently, per (instance, chat), so their echo is not taken as a new message.
#[derive(Default)]
struct EchoGuard {
    sent: HashMap<(String, String), VecDeque<SentReply>>,
}

#[derive(Debug, Clone)]
struct SentReply {
    text: String,
    /// The sender of the message we replied to: they are not the echo's author.
    to_sender: String,
    at: Instant,
}

// === impl Delivery ===

impl Delivery {
    /// Opens/migrates the store, resets rows left `delivering` by a crash to pending,
    /// registers metrics, spawns `workers` tasks and the pruner.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        storage: &StorageConfig,
        delivery: &DeliveryConfig,
        media: MediaSettings,
        routing: Routing,
        replies: Arc<dyn ReplySender>,
        errors: Arc<dyn ErrorSink>,
        registry: &mut Registry,
        cancel: CancellationToken,
    ) -> Result<Delivery, StoreError> {
        Self::start_with_clock(
            storage,
            delivery,
            media,
            routing,
            replies,
            errors,
            registry,
            cancel,
            Clock::Wall,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_with_clock(
        storage: &StorageConfig,
        delivery: &DeliveryConfig,
        media: MediaSettings,
        routing: Routing,
        replies: Arc<dyn ReplySender>,
        errors: Arc<dyn ErrorSink>,
        registry: &mut Registry,
        cancel: CancellationToken,
        clock: Clock,
    ) -> Result<Delivery, StoreError> {
        let metrics = DeliveryMetrics::register(registry);
        let store = Store::open(&storage.path, storage.synchronous, metrics.gauges.clone()).await?;
        let last_stop_clean = store.begin_run().await?;
        if !last_stop_clean {
            tracing::warn!(
                "The previous run did not stop cleanly; listened chats will be re-read for \
                 messages taken but not stored."
            );
        }
        let recovered = store.recover().await?;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "Messages left in flight by an unclean stop go back to the queue."
            );
        }
        metrics.set_platforms(routing.platform_ids());
        let inner = Arc::new(Inner {
            store,
            routing: RwLock::new(Arc::new(routing)),
            config: RwLock::new(delivery.clone()),
            retention_days: storage.retention_days,
            dead_retention_days: storage.dead_retention_days,
            last_stop_clean,
            metrics,
            replies,
            errors,
            notify: Notify::new(),
            echo: Mutex::new(EchoGuard::default()),
            file_log: media::FileLog::new(&media.log_dir, media.log_retention_days),
            media: RwLock::new(media),
            tracker: TaskTracker::new(),
            cancel: cancel.child_token(),
            clock,
        });
        inner
            .tracker
            .spawn(worker::run(Arc::clone(&inner), delivery.workers.max(1)));
        inner.tracker.spawn(prune_loop(Arc::clone(&inner)));
        inner.tracker.close();
        tracing::info!(
            workers = delivery.workers.max(1),
            path = %storage.path.display(),
            "Delivery started."
        );
        Ok(Delivery { inner })
    }

    /// The sink for the listener.
    pub fn sink(&self) -> Arc<dyn MessageSink> {
        Arc::new(DeliverySink {
            inner: Arc::clone(&self.inner),
        })
    }

    /// Hot reload of rules and platforms: atomic; deliveries in flight finish with the
    /// snapshot they started with, rows not yet claimed use the new one.
    pub fn swap_routing(&self, routing: Routing) {
        self.inner.metrics.set_platforms(routing.platform_ids());
        match self.inner.routing.write() {
            Ok(mut current) => *current = Arc::new(routing),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(routing),
        }
        self.inner.notify.notify_waiters();
    }

    /// Hot reload of `max_attempts`, `backoff` and `attempt_timeout`, used from the next
    /// attempt on. The worker count is fixed at `start`; a change applies at the next start.
    pub fn set_config(&self, delivery: &DeliveryConfig) {
        match self.inner.config.write() {
            Ok(mut current) => *current = delivery.clone(),
            Err(poisoned) => *poisoned.into_inner() = delivery.clone(),
        }
    }

    /// Hot reload of `media:`, used from the next download on.
    pub fn set_media(&self, media: MediaSettings) {
        match self.inner.media.write() {
            Ok(mut current) => *current = media,
            Err(poisoned) => *poisoned.into_inner() = media,
        }
    }

    /// Messages stored for one chat (any state); 0 if the store cannot answer (the error is
    /// recorded).
    pub async fn message_count(&self, instance_id: &str, chat: &str) -> u64 {
        let key = (instance_id.to_owned(), chat.to_owned());
        self.message_counts(vec![key.clone()])
            .await
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Messages stored for each of `chats` (any state), for the listeners JSON, in one store
    /// call; empty if the store cannot answer (the error is recorded).
    pub async fn message_counts(
        &self,
        chats: Vec<(String, String)>,
    ) -> HashMap<(String, String), u64> {
        match self.inner.store.message_counts(chats).await {
            Ok(counts) => counts,
            Err(err) => {
                self.inner.storage_error(&err);
                HashMap::new()
            }
        }
    }

    /// Row counts by state; all zero if the store cannot answer (the error is recorded).
    pub async fn counts(&self) -> StoreCounts {
        match self.inner.store.counts().await {
            Ok(counts) => counts,
            Err(err) => {
                self.inner.storage_error(&err);
                StoreCounts::default()
            }
        }
    }

    /// Creates the reply, drop and media series of these instances at 0. `app` passes every
    /// configured instance at start and after each reload, so `rate()` and the reply alert see
    /// the first message's counts, and the families exist before any message.
    pub fn add_instances<'a>(&self, instance_ids: impl IntoIterator<Item = &'a str>) {
        for instance_id in instance_ids {
            self.inner.metrics.learn_instance(instance_id);
        }
    }

    /// Drops the metric series of a removed instance.
    pub fn remove_instance(&self, instance_id: &str) {
        self.inner.metrics.remove_instance(instance_id);
        if let Ok(mut echo) = self.inner.echo.lock() {
            echo.sent.retain(|(instance, _), _| instance != instance_id);
        }
    }

    /// Deletes delivered rows older than `storage.retention_days` now (the pruner also runs
    /// hourly); returns how many.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        self.inner.prune().await
    }

    /// The oldest dead letters, at most `limit`.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.inner.store.dead_letters(limit).await
    }

    /// Puts dead letters (all, or `ids`) back in the queue with fresh attempts; they go through
    /// the normal path again. Returns how many.
    pub async fn retry_dead(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        let n = self.inner.store.retry_dead(ids).await?;
        if n > 0 {
            tracing::info!(messages = n, "Dead letters queued for another delivery.");
            self.inner.notify.notify_waiters();
        }
        Ok(n)
    }

    /// Deletes dead letters (all, or `ids`); returns how many.
    pub async fn purge_dead(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        let n = self.inner.store.purge_dead(ids).await?;
        if n > 0 {
            tracing::info!(messages = n, "Dead letters purged.");
        }
        Ok(n)
    }

    /// Records that this run stopped cleanly: call only once every actor handed over what it
    /// took, so the next start need not re-read chat histories.
    pub async fn mark_clean_stop(&self) -> Result<(), StoreError> {
        self.inner.store.mark_clean_stop().await
    }

    /// Stops claiming and waits for the work in flight; the caller bounds the wait with its
    /// grace period. A row still in flight when the process exits is delivered again at the
    /// next start.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        self.inner.tracker.wait().await;
        tracing::info!("Delivery stopped.");
    }

    #[cfg(test)]
    fn store(&self) -> &Store {
        &self.inner.store
    }
}

// === impl Inner ===

impl Inner {
    fn routing(&self) -> Arc<Routing> {
        match self.routing.read() {
            Ok(routing) => Arc::clone(&routing),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn config(&self) -> DeliveryConfig {
        match self.config.read() {
            Ok(config) => config.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn media(&self) -> MediaSettings {
        match self.media.read() {
            Ok(media) => media.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn record(&self, kind: ErrorKind, instance_id: Option<&str>, message: &str) {
        self.errors
            .record_error(Component::Delivery, kind, instance_id, message);
    }

    /// Now, as `next_attempt_ms` counts it.
    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn storage_error(&self, err: &StoreError) {
        tracing::error!(error = %err, "Message store failed.");
        self.record(ErrorKind::Storage, None, &err.to_string());
    }

    /// A store failure the listener sees (it records its own error and retries).
    fn sink_error(&self, err: &StoreError) -> SinkError {
        tracing::warn!(error = %err, "Message store failed.");
        SinkError(err.to_string())
    }

    async fn prune(&self) -> Result<u64, StoreError> {
        let now = store::now_ms();
        let delivered_cutoff = now - i64::from(self.retention_days) * DAY_MS;
        let dead_cutoff = now - i64::from(self.dead_retention_days) * DAY_MS;
        let (delivered, dead) = self.store.prune(delivered_cutoff, dead_cutoff).await?;
        if delivered > 0 {
            tracing::info!(
                pruned = delivered,
                "Pruned delivered messages past retention."
            );
        }
        if dead > 0 {
            tracing::warn!(
                pruned = dead,
                "Pruned dead letters past dead_retention_days."
            );
        }
        Ok(delivered + dead)
    }

    /// Routes, dedupes and commits one batch; the drop counters move only once it is durable.
    async fn accept(&self, messages: Vec<InboundMessage>) -> Result<(), SinkError> {
        let routing = self.routing();
        let mut rows = Vec::with_capacity(messages.len());
        let mut drops: Vec<(String, &'static str)> = Vec::new();
        let mut echoes = Vec::new();
        for mut msg in messages {
            if msg.message_id.is_empty() {
                // The listener always sets an id; a made-up one must never merge two messages.
                msg.message_id = format!("syn-{:016x}", fastrand::u64(..));
                msg.synthetic_id = true;
            }
            if let Some(echo) = self.take_echo(&msg) {
                echoes.push(echo);
                drops.push((msg.instance_id, "echo"));
                continue;
            }
            match routing.matching_rule(&msg) {
                Ok(rule) => rows.push(NewMessage {
                    rule_id: rule.id.clone(),
                    platform_id: rule.platform.clone(),
                    reply_at_sender: rule.reply_at_sender,
                    message: msg,
                }),
                Err(reason) => drops.push((msg.instance_id, reason.as_str())),
            }
        }
        let instances: Vec<String> = rows
            .iter()
            .map(|row| row.message.instance_id.clone())
            .collect();
        let inserted = match self.store.insert_batch(rows).await {
            Ok(inserted) => inserted,
            Err(err) => {
                self.storage_error(&err);
                self.restore_echoes(echoes);
                return Err(SinkError(err.to_string()));
            }
        };
        for (instance_id, new) in instances.into_iter().zip(inserted) {
            if new {
                continue;
            }
            drops.push((instance_id, "duplicate"));
        }
        for (instance_id, reason) in drops {
            tracing::debug!(instance_id = %instance_id, reason, "Message dropped.");
            self.metrics.dropped(&instance_id, reason, 1);
        }
        self.notify.notify_waiters();
        Ok(())
    }

    fn record_sent(&self, msg: &InboundMessage, text: &str) {
        let Ok(mut echo) = self.echo.lock() else {
            return;
        };
        let queue = echo
            .sent
            .entry((msg.instance_id.clone(), msg.chat.clone()))
            .or_default();
        queue.push_back(SentReply {
            text: text.trim().to_owned(),
            to_sender: msg.sender.clone(),
            at: Instant::now(),
        });
        while queue.len() > ECHO_PER_CHAT {
            queue.pop_front();
        }
    }

    /// Takes the sent reply `msg` is the echo of, if any. A private chat's peer (the chat is
    /// named after them, `InboundMessage::is_group`) and the person we replied to never count
    /// as echoes; each reply absorbs at most one echo.
    fn take_echo(&self, msg: &InboundMessage) -> Option<((String, String), SentReply)> {
        if !msg.is_group() {
            return None;
        }
        let mut echo = self.echo.lock().ok()?;
        let key = (msg.instance_id.clone(), msg.chat.clone());
        let queue = echo.sent.get_mut(&key)?;
        queue.retain(|sent| sent.at.elapsed() <= ECHO_WINDOW);
        let content = msg.content.trim();
        let index = queue.iter().position(|sent| {
            sent.to_sender != msg.sender
                && (content == sent.text
                    || (sent.text.chars().count() >= 8 && content.contains(sent.text.as_str())))
        })?;
        let sent = queue.remove(index)?;
        Some((key, sent))
    }

    fn restore_echoes(&self, echoes: Vec<((String, String), SentReply)>) {
        let Ok(mut echo) = self.echo.lock() else {
            return;
        };
        for (key, sent) in echoes {
            echo.sent.entry(key).or_default().push_back(sent);
        }
    }
}

// === impl DeliverySink ===

impl MessageSink for DeliverySink {
    fn accept(&self, messages: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(self.inner.accept(messages))
    }

    fn wants_chat(&self, instance_id: &str, chat: &str) -> bool {
        self.inner.routing().wants_chat(instance_id, chat)
    }

    fn last_stop_clean(&self) -> bool {
        self.inner.last_stop_clean
    }

    fn load_listener(
        &self,
        instance_id: &str,
    ) -> BoxFuture<'_, Result<(Vec<StoredChat>, UpstreamSession), SinkError>> {
        let instance_id = instance_id.to_owned();
        Box::pin(async move {
            self.inner
                .store
                .load_listener(instance_id)
                .await
                .map_err(|err| self.inner.sink_error(&err))
        })
    }

    fn save_chats(
        &self,
        instance_id: &str,
        chats: Vec<StoredChat>,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        let instance_id = instance_id.to_owned();
        Box::pin(async move {
            self.inner
                .store
                .save_chats(instance_id, chats)
                .await
                .map_err(|err| self.inner.sink_error(&err))
        })
    }

    fn save_session(
        &self,
        instance_id: &str,
        session: UpstreamSession,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        let instance_id = instance_id.to_owned();
        Box::pin(async move {
            self.inner
                .store
                .save_session(instance_id, session)
                .await
                .map_err(|err| self.inner.sink_error(&err))
        })
    }

    fn chat_history(
        &self,
        instance_id: &str,
        chat: &str,
        epoch: u32,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<ChatHistory, SinkError>> {
        let (instance_id, chat) = (instance_id.to_owned(), chat.to_owned());
        Box::pin(async move {
            self.inner
                .store
                .chat_history(instance_id, chat, epoch, ids)
                .await
                .map_err(|err| self.inner.sink_error(&err))
        })
    }
}

async fn prune_loop(inner: Arc<Inner>) {
    let mut interval = tokio::time::interval(PRUNE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = inner.cancel.cancelled() => return,
            _ = interval.tick() => {}
        }
        if let Err(err) = inner.prune().await {
            inner.storage_error(&err);
        }
        let media = inner.media().config;
        let dir = media.dir.clone();
        let pruned = tokio::task::spawn_blocking(move || {
            media::prune_dir(&dir, media.retention_days, std::time::SystemTime::now())
        })
        .await;
        match pruned {
            Ok(Ok(0)) => {}
            Ok(Ok(pruned)) => tracing::info!(pruned, "Pruned downloaded files past retention."),
            Ok(Err(err)) => tracing::warn!(error = %err, "Could not prune downloaded files."),
            Err(err) => tracing::warn!(error = %err, "Could not prune downloaded files."),
        }
    }
}

#[cfg(test)]
mod tests;
