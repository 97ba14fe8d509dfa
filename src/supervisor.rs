//! The supervisor: one loop over a closed set of `Control` events owns every instance task.
//!
//! Only this loop starts, stops, restarts or re-configures actors, swaps the active config and
//! stops or starts the listener service; everything else sends it a `Control` event.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{
    BackoffConfig, Config, ConfigDiff, ConfigErrors, InstanceChange, InstanceConfig, Loaded,
};
use crate::listener::{ActorSettings, Held, InstanceActor, InstanceCommand};
use crate::message::{
    BoxFuture, Download, DownloadError, MessageSink, Reply, ReplyError, ReplySender, ReplyTicket,
};
use crate::monitor::{Component, ErrorKind, Monitor};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadSource {
    /// The file watcher or its periodic poll.
    Watcher,
    /// SIGHUP.
    Signal,
    /// `POST /-/reload` or `POST /api/v1/reload`.
    Http,
}

impl ReloadSource {
    fn as_str(self) -> &'static str {
        match self {
            Self::Watcher => "watcher",
            Self::Signal => "signal",
            Self::Http => "http",
        }
    }
}

/// The outcome of a successful reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// False when the content hash was unchanged and nothing was applied.
    pub changed: bool,
    /// One line saying what changed (never secrets).
    pub summary: String,
    /// Keys that changed but only take effect after a restart.
    pub needs_restart: Vec<&'static str>,
}

/// Every event the supervisor reacts to.
#[derive(Debug)]
pub enum Control {
    /// Load the config again and apply the difference.
    Reload {
        /// Who asked.
        source: ReloadSource,
        /// Where the answer goes, if anyone waits.
        respond: Option<oneshot::Sender<Result<ReloadReport, Vec<String>>>>,
    },
    /// Stop and start the listener service.
    Restart {
        /// Where the answer goes, if anyone waits.
        respond: Option<oneshot::Sender<()>>,
    },
    /// An instance task ended without being asked to.
    TaskExited {
        /// The instance.
        instance_id: String,
        /// Which incarnation ended (stale events are ignored).
        generation: u64,
        /// What happened.
        reason: String,
    },
    /// The backoff after a crash elapsed: start the task again.
    RestartTask {
        /// The instance.
        instance_id: String,
        /// The incarnation that crashed.
        generation: u64,
    },
}

/// Loads the config (from its file, or a built-in one).
pub type ConfigLoader = Box<dyn Fn() -> Result<Loaded, ConfigErrors> + Send + Sync>;

/// Called after every applied config (startup included) with the new config and the diff.
pub type ConfigSubscriber = Box<dyn Fn(&Arc<Config>, &ConfigDiff) + Send + Sync>;

/// How the supervisor reaches the actors to send replies; implements `ReplySender`.
///
/// An enabled instance whose actor is not running yet (start-up, a crash-restart backoff)
/// answers `InstanceDown`, so the reply waits; only an instance the config does not have
/// answers `NoInstance`, which spends the reply's attempts.
#[derive(Debug, Default)]
pub struct ReplyRouter {
    senders: RwLock<HashMap<String, mpsc::Sender<InstanceCommand>>>,
    enabled: RwLock<std::collections::HashSet<String>>,
}

impl ReplyRouter {
    /// Sets which instances the active config enables.
    pub fn set_enabled(&self, ids: impl IntoIterator<Item = String>) {
        let mut enabled = match self.enabled.write() {
            Ok(enabled) => enabled,
            Err(poisoned) => poisoned.into_inner(),
        };
        *enabled = ids.into_iter().collect();
    }

    fn is_enabled(&self, instance_id: &str) -> bool {
        match self.enabled.read() {
            Ok(enabled) => enabled.contains(instance_id),
            Err(poisoned) => poisoned.into_inner().contains(instance_id),
        }
    }

    fn set(&self, instance_id: &str, sender: Option<mpsc::Sender<InstanceCommand>>) {
        let mut senders = match self.senders.write() {
            Ok(senders) => senders,
            Err(poisoned) => poisoned.into_inner(),
        };
        match sender {
            Some(sender) => senders.insert(instance_id.to_owned(), sender),
            None => senders.remove(instance_id),
        };
    }

    fn get(&self, instance_id: &str) -> Option<mpsc::Sender<InstanceCommand>> {
        let senders = match self.senders.read() {
            Ok(senders) => senders,
            Err(poisoned) => poisoned.into_inner(),
        };
        senders.get(instance_id).cloned()
    }
}

impl ReplySender for ReplyRouter {
    fn send_reply(&self, reply: Reply, wait: Duration) -> BoxFuture<'_, Result<(), ReplyError>> {
        Box::pin(async move {
            let id = reply.instance_id.clone();
            let sender = self.get(&id).ok_or_else(|| {
                if self.is_enabled(&id) {
                    ReplyError::InstanceDown(id.clone())
                } else {
                    ReplyError::NoInstance(id.clone())
                }
            })?;
            let deadline = tokio::time::Instant::now() + wait;
            let ticket = ReplyTicket::default();
            let (respond, mut answer) = oneshot::channel();
            let command = InstanceCommand::Reply {
                reply,
                ticket: ticket.clone(),
                respond,
            };
            match tokio::time::timeout_at(deadline, sender.send(command)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(ReplyError::NoInstance(id)),
                // Never queued, so never sent.
                Err(_) => return Err(ReplyError::NotTaken(id, wait)),
            }
            let outcome = match tokio::time::timeout_at(deadline, &mut answer).await {
                Ok(outcome) => outcome,
                // Queued behind a long poll: give up unless the actor has started sending, in
                // which case the outcome must be known before anyone tries again.
                Err(_) if ticket.abandon() => return Err(ReplyError::NotTaken(id, wait)),
                Err(_) => answer.await,
            };
            outcome.map_err(|_| ReplyError::NoInstance(id))?
        })
    }

    fn download_file(
        &self,
        instance_id: &str,
        file_path: &str,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<Download, DownloadError>> {
        let (id, file_path) = (instance_id.to_owned(), file_path.to_owned());
        Box::pin(async move {
            let sender = self.get(&id).ok_or_else(|| {
                if self.is_enabled(&id) {
                    DownloadError::InstanceDown(id.clone())
                } else {
                    DownloadError::NoInstance(id.clone())
                }
            })?;
            let (respond, answer) = oneshot::channel();
            sender
                .send(InstanceCommand::Download {
                    file_path,
                    max_bytes,
                    respond,
                })
                .await
                .map_err(|_| DownloadError::NoInstance(id.clone()))?;
            answer.await.map_err(|_| DownloadError::NoInstance(id))?
        })
    }
}

struct Task {
    generation: u64,
    cancel: CancellationToken,
    commands: mpsc::Sender<InstanceCommand>,
    crash_backoff: Backoff,
}

/// The supervisor's state; run it with [`Supervisor::run`].
pub struct Supervisor {
    config: Arc<Config>,
    loader: ConfigLoader,
    monitor: Arc<Monitor>,
    sink: Arc<dyn MessageSink>,
    replies: Arc<ReplyRouter>,
    subscribers: Vec<ConfigSubscriber>,
    active: watch::Sender<Arc<Config>>,
    control: mpsc::Sender<Control>,
    tasks: HashMap<String, Task>,
    /// Per instance, what its actors took and the sink has not accepted yet; outlives every
    /// actor of the instance (a panic loses none of it).
    held: HashMap<String, Held>,
    /// Instances whose first actor of this process has started (the one that re-reads chat
    /// histories after an unclean stop).
    started_once: HashSet<String>,
    service: CancellationToken,
    tracker: TaskTracker,
    running: bool,
    next_generation: u64,
    grace: Duration,
}

/// Crash restarts back off from 1 s to 60 s per instance.
const CRASH_BACKOFF: BackoffConfig = BackoffConfig {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(60),
};

// === impl Supervisor ===

impl Supervisor {
    /// A supervisor for an already loaded and validated config.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        loader: ConfigLoader,
        monitor: Arc<Monitor>,
        sink: Arc<dyn MessageSink>,
        replies: Arc<ReplyRouter>,
        active: watch::Sender<Arc<Config>>,
        control: mpsc::Sender<Control>,
        grace: Duration,
    ) -> Self {
        replies.set_enabled(
            config
                .enabled_instances()
                .map(|instance| instance.id.clone()),
        );
        Self {
            config,
            loader,
            monitor,
            sink,
            replies,
            subscribers: Vec::new(),
            active,
            control,
            tasks: HashMap::new(),
            held: HashMap::new(),
            started_once: HashSet::new(),
            service: CancellationToken::new(),
            tracker: TaskTracker::new(),
            running: false,
            next_generation: 0,
            grace,
        }
    }

    /// Adds a config subscriber (delivery routing, the watcher's file list, the log filter).
    pub fn subscribe(&mut self, subscriber: ConfigSubscriber) {
        self.subscribers.push(subscriber);
    }

    /// Runs until `shutdown` fires, then stops every task within the grace period. Returns
    /// whether the stop was clean: every actor stopped in time and none holds messages the
    /// sink did not accept (only then may the next start skip re-reading chat histories).
    pub async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> bool {
        let empty = ConfigDiff::default();
        for subscriber in &self.subscribers {
            subscriber(&self.config, &empty);
        }
        self.monitor.set_window(self.config.health.window);
        self.monitor
            .record_reload_success(self.config.source.hash, false);
        self.start_service();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                event = control.recv() => match event {
                    Some(event) => self.handle(event).await,
                    None => break,
                },
            }
        }
        let stopped = self.stop_service().await;
        let holding: usize = self
            .held
            .values()
            .map(|held| held.lock().map_or(1, |held| held.len()))
            .sum();
        if holding > 0 {
            tracing::warn!(
                messages = holding,
                "Stopping with messages the store did not accept; they are re-read from the \
                 chat histories at the next start."
            );
        }
        stopped && holding == 0
    }

    async fn handle(&mut self, event: Control) {
        match event {
            Control::Reload { source, respond } => {
                let result = self.reload(source);
                if let Some(respond) = respond {
                    let _ = respond.send(result);
                }
            }
            Control::Restart { respond } => {
                tracing::info!("Restarting the listener service.");
                self.stop_service().await;
                self.monitor.metrics().listener_restarts.inc();
                self.start_service();
                if let Some(respond) = respond {
                    let _ = respond.send(());
                }
            }
            Control::TaskExited {
                instance_id,
                generation,
                reason,
            } => self.task_exited(instance_id, generation, reason),
            Control::RestartTask {
                instance_id,
                generation,
            } => {
                let crashed = self
                    .tasks
                    .get(&instance_id)
                    .is_some_and(|task| task.generation == generation);
                if crashed
                    && self.running
                    && let Some(instance) = self.config.instance(&instance_id).cloned()
                {
                    // The crashed actor may have died with an answer in hand: re-read.
                    self.spawn_instance(&instance, true);
                }
            }
        }
    }

    fn task_exited(&mut self, instance_id: String, generation: u64, reason: String) {
        let Some(task) = self.tasks.get_mut(&instance_id) else {
            return;
        };
        if task.generation != generation || task.cancel.is_cancelled() || !self.running {
            return;
        }
        self.replies.set(&instance_id, None);
        let delay = task.crash_backoff.next_delay();
        self.monitor.record_task_restart(
            &instance_id,
            &format!(
                "instance task ended unexpectedly ({reason}); restarting in {}",
                humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
            ),
        );
        let control = self.control.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = control
                .send(Control::RestartTask {
                    instance_id,
                    generation,
                })
                .await;
        });
        self.update_task_count();
    }

    fn start_service(&mut self) {
        self.service = CancellationToken::new();
        self.tracker = TaskTracker::new();
        self.running = true;
        self.monitor.listener_started();
        let config = Arc::clone(&self.config);
        for instance in &config.instances {
            self.monitor
                .register_instance(&instance.id, instance.enabled);
            if instance.enabled {
                self.spawn_instance(instance, false);
            }
        }
        tracing::info!(
            instances = config.enabled_instances().count(),
            "Listener service started."
        );
    }

    /// Stops every actor; false if some did not stop within the grace period.
    async fn stop_service(&mut self) -> bool {
        self.running = false;
        self.service.cancel();
        self.tracker.close();
        for (id, _) in self.tasks.drain() {
            self.replies.set(&id, None);
        }
        let stopped = tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_ok();
        if !stopped {
            tracing::warn!(grace = ?self.grace, "Instance tasks did not stop within the grace period.");
        }
        self.monitor.listener_stopped();
        self.update_task_count();
        tracing::info!("Listener service stopped.");
        stopped
    }

    fn settings_for(&self, instance_id: &str) -> ActorSettings {
        ActorSettings {
            listener: self.config.listener.clone(),
            fixed_chats: self
                .config
                .fixed_chats_for(instance_id)
                .map(str::to_owned)
                .collect(),
        }
    }

    /// Starts an actor for `instance`. It re-reads its active chats' histories when `crashed`
    /// (its predecessor died), or when it is the instance's first actor of a process whose
    /// previous run did not stop cleanly.
    fn spawn_instance(&mut self, instance: &InstanceConfig, crashed: bool) {
        let (commands, receiver) = mpsc::channel(64);
        let first = self.started_once.insert(instance.id.clone());
        let recover = crashed || (first && !self.sink.last_stop_clean());
        let held = Arc::clone(self.held.entry(instance.id.clone()).or_default());
        let actor = match InstanceActor::new(
            instance.clone(),
            self.settings_for(&instance.id),
            self.monitor.metrics().clone(),
            Arc::clone(&self.monitor),
            Arc::clone(&self.sink),
            receiver,
            self.monitor.chats_of(&instance.id),
            held,
            recover,
        ) {
            Ok(actor) => actor,
            Err(error) => {
                self.monitor.record_error(
                    Component::Listener,
                    ErrorKind::Task,
                    Some(&instance.id),
                    &format!("cannot build the HTTP client: {error}"),
                );
                return;
            }
        };
        self.next_generation += 1;
        let generation = self.next_generation;
        let cancel = self.service.child_token();
        let crash_backoff = self
            .tasks
            .remove(&instance.id)
            .map(|task| {
                task.cancel.cancel();
                task.crash_backoff
            })
            .unwrap_or_else(|| Backoff::new(CRASH_BACKOFF));
        let span = tracing::info_span!("listener", instance_id = %instance.id);
        let handle = self
            .tracker
            .spawn(actor.run(cancel.clone()).instrument(span));
        let control = self.control.clone();
        let monitor = Arc::clone(&self.monitor);
        let instance_id = instance.id.clone();
        let watched = cancel.clone();
        tokio::spawn(async move {
            let reason = match handle.await {
                Ok(()) => "returned".to_owned(),
                Err(error) if error.is_panic() => "panicked".to_owned(),
                Err(error) => format!("aborted: {error}"),
            };
            if watched.is_cancelled() {
                // A call in flight when the instance was removed returns after its series were
                // dropped, and records into new ones: drop them again now that nothing of the
                // actor runs (a no-op unless the instance is gone from the config).
                monitor.drop_series_if_removed(&instance_id);
            } else {
                let _ = control
                    .send(Control::TaskExited {
                        instance_id,
                        generation,
                        reason,
                    })
                    .await;
            }
        });
        self.replies.set(&instance.id, Some(commands.clone()));
        self.tasks.insert(
            instance.id.clone(),
            Task {
                generation,
                cancel,
                commands,
                crash_backoff,
            },
        );
        self.update_task_count();
    }

    fn stop_instance(&mut self, instance_id: &str) {
        if let Some(task) = self.tasks.remove(instance_id) {
            task.cancel.cancel();
        }
        self.replies.set(instance_id, None);
        self.update_task_count();
    }

    fn update_task_count(&self) {
        let live = self
            .tasks
            .values()
            .filter(|task| !task.cancel.is_cancelled())
            .count();
        self.monitor.set_tasks(live);
    }

    /// Loads, validates, diffs and applies. The old config keeps running on any error.
    fn reload(&mut self, source: ReloadSource) -> Result<ReloadReport, Vec<String>> {
        let loaded = match (self.loader)() {
            Ok(loaded) => loaded,
            Err(errors) => {
                let errors: Vec<String> = errors.errors.iter().map(ToString::to_string).collect();
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
                let settings = self.settings_for(id);
                if task
                    .commands
                    .try_send(InstanceCommand::Settings(settings))
                    .is_err()
                {
                    tracing::warn!(instance_id = %id, "Could not hand new settings to the instance actor.");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SendMode;

    fn reply(instance_id: &str) -> Reply {
        Reply {
            instance_id: instance_id.to_owned(),
            chat: "alice".to_owned(),
            text: "hi".to_owned(),
            at: Vec::new(),
            mode: SendMode::Normal,
        }
    }

    #[tokio::test]
    async fn replies_wait_for_enabled_instances_and_fail_for_unknown_ones() {
        let router = ReplyRouter::default();
        router.set_enabled(["wx-a".to_owned()]);
        // Enabled but its actor is not registered yet: wait (no attempt spent).
        let wait = Duration::from_secs(5);
        assert_eq!(
            router.send_reply(reply("wx-a"), wait).await,
            Err(ReplyError::InstanceDown("wx-a".to_owned()))
        );
        // Not in the config: give up eventually.
        assert_eq!(
            router.send_reply(reply("wx-gone"), wait).await,
            Err(ReplyError::NoInstance("wx-gone".to_owned()))
        );
        // A registered actor gets the command.
        let (sender, mut receiver) = mpsc::channel(1);
        router.set("wx-a", Some(sender));
        let send = tokio::spawn(async move { router.send_reply(reply("wx-a"), wait).await });
        match receiver.recv().await {
            Some(InstanceCommand::Reply {
                reply,
                ticket,
                respond,
            }) => {
                assert_eq!(reply.chat, "alice");
                assert!(ticket.start());
                let _ = respond.send(Ok(()));
            }
            other => panic!("unexpected command: {other:?}"),
        }
        assert_eq!(send.await.unwrap(), Ok(()));
    }

    /// The requester's deadline passes while the reply waits in the actor's queue: it is
    /// abandoned, and the actor (coming to it later) must not send it, or the retry would make
    /// the chat get it twice. Once the actor has started, the outcome is awaited instead.
    #[tokio::test(start_paused = true)]
    async fn a_reply_is_sent_by_the_actor_or_abandoned_by_the_worker_never_both() {
        let router = Arc::new(ReplyRouter::default());
        router.set_enabled(["wx-a".to_owned()]);
        let (sender, mut receiver) = mpsc::channel(4);
        router.set("wx-a", Some(sender));
        let wait = Duration::from_secs(30);

        let pending = tokio::spawn({
            let router = Arc::clone(&router);
            async move { router.send_reply(reply("wx-a"), wait).await }
        });
        // The actor is busy past the deadline; paused time jumps there.
        let answer = pending.await.unwrap();
        assert!(
            matches!(answer, Err(ReplyError::NotTaken(..))),
            "{answer:?}"
        );
        let Some(InstanceCommand::Reply { ticket, .. }) = receiver.recv().await else {
            panic!("the command was queued");
        };
        assert!(!ticket.start(), "an abandoned reply must not be sent");

        // Started before the deadline: the worker waits for the outcome past it.
        let pending = tokio::spawn({
            let router = Arc::clone(&router);
            async move { router.send_reply(reply("wx-a"), wait).await }
        });
        let Some(InstanceCommand::Reply {
            ticket, respond, ..
        }) = receiver.recv().await
        else {
            panic!("the command was queued");
        };
        assert!(ticket.start());
        tokio::time::sleep(wait * 2).await;
        assert!(!pending.is_finished(), "gave up on a reply being sent");
        let _ = respond.send(Ok(()));
        assert_eq!(pending.await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn downloads_go_to_the_instance_actor_like_replies() {
        let router = ReplyRouter::default();
        router.set_enabled(["wx-a".to_owned()]);
        assert_eq!(
            router.download_file("wx-a", r"C:\a.png", 10).await,
            Err(DownloadError::InstanceDown("wx-a".to_owned()))
        );
        assert_eq!(
            router.download_file("wx-gone", r"C:\a.png", 10).await,
            Err(DownloadError::NoInstance("wx-gone".to_owned()))
        );
        let (sender, mut receiver) = mpsc::channel(1);
        router.set("wx-a", Some(sender));
        let download =
            tokio::spawn(async move { router.download_file("wx-a", r"C:\a.png", 10).await });
        match receiver.recv().await {
            Some(InstanceCommand::Download {
                file_path,
                max_bytes,
                respond,
            }) => {
                assert_eq!((file_path.as_str(), max_bytes), (r"C:\a.png", 10));
                let _ = respond.send(Ok(Download::Bytes(b"x".to_vec())));
            }
            other => panic!("unexpected command: {other:?}"),
        }
        assert_eq!(download.await.unwrap(), Ok(Download::Bytes(b"x".to_vec())));
    }
}
