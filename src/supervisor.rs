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
use crate::event::{Component, ErrorKind};
use crate::listener::{ActorSettings, Held, InstanceActor, InstanceCommand};
use crate::message::{
    BoxFuture, Download, DownloadError, MessageSink, Reply, ReplyError, ReplySender, ReplyTicket,
};
use crate::monitor::Monitor;
use crate::shutdown::Deadline;

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

/// One instance's slot: its running actor, or the backoff before the next attempt at one.
struct Task {
    generation: u64,
    cancel: CancellationToken,
    /// The actor's settings channel; `None` while no actor runs (it could not be built).
    settings: Option<watch::Sender<ActorSettings>>,
    crash_backoff: Backoff,
    /// No actor runs: it ended unexpectedly or could not be built, and a `RestartTask` is due.
    waiting: bool,
    /// The next actor re-reads chat histories (its predecessor died with answers in hand).
    recover: bool,
}

/// The supervisor's state; run it with [`Supervisor::run`].
pub struct Supervisor {
    config: Arc<Config>,
    /// Called on tokio's blocking pool: it reads files, which may hang (a network share).
    loader: Arc<ConfigLoader>,
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
    /// `run`'s shutdown token: a reload waiting for a hung file gives up when it fires.
    shutdown: CancellationToken,
    tracker: TaskTracker,
    running: bool,
    next_generation: u64,
    /// The shutdown deadline shared with delivery and HTTP; its grace also bounds the stop of a
    /// listener restart.
    deadline: Deadline,
    /// Actor builds that fail before `InstanceActor::new` is called (tests of the retry).
    #[cfg(test)]
    failing_builds: usize,
}

/// Why the listener service stops.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// A restart (`/api/v1/restart`): the stop gets the whole grace period.
    Restart,
    /// The sidecar's shutdown: by the deadline shared with delivery and HTTP.
    Shutdown,
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
        deadline: Deadline,
    ) -> Self {
        replies.set_enabled(
            config
                .enabled_instances()
                .map(|instance| instance.id.clone()),
        );
        Self {
            config,
            loader: Arc::new(loader),
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
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            running: false,
            next_generation: 0,
            deadline,
            #[cfg(test)]
            failing_builds: 0,
        }
    }

    /// Adds a config subscriber (delivery routing, the watcher's file list, the log filter).
    pub fn subscribe(&mut self, subscriber: ConfigSubscriber) {
        self.subscribers.push(subscriber);
    }

    /// Runs until `shutdown` fires, then stops every task by the shared deadline. Returns
    /// whether the stop was clean: every actor stopped in time and none holds messages the
    /// sink did not accept (only then may the next start skip re-reading chat histories).
    pub async fn run(
        mut self,
        mut control: mpsc::Receiver<Control>,
        shutdown: CancellationToken,
    ) -> bool {
        self.shutdown = shutdown.clone();
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
        let stopped = self.stop_service(Stop::Shutdown).await;
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
                let result = self.reload(source).await;
                if let Some(respond) = respond {
                    let _ = respond.send(result);
                }
            }
            Control::Restart { respond } => {
                tracing::info!("Restarting the listener service.");
                self.stop_service(Stop::Restart).await;
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
                let due = self
                    .tasks
                    .get(&instance_id)
                    .filter(|task| task.generation == generation && task.waiting);
                if let Some(task) = due
                    && self.running
                    && let Some(instance) = self.config.instance(&instance_id).cloned()
                {
                    // A crashed actor may have died with an answer in hand: re-read.
                    let recover = task.recover;
                    self.spawn_instance(&instance, recover);
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
        task.waiting = true;
        task.recover = true;
        task.settings = None;
        let delay = task.crash_backoff.next_delay();
        self.monitor.record_task_restart(
            &instance_id,
            &format!(
                "instance task ended unexpectedly ({reason}); restarting in {}",
                humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
            ),
        );
        self.schedule_restart(instance_id, generation, delay);
        self.update_task_count();
    }

    /// Sends `RestartTask` for this incarnation once `delay` has passed.
    fn schedule_restart(&self, instance_id: String, generation: u64, delay: Duration) {
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

    /// Stops every actor; false if some did not stop in time: within the grace period for a
    /// restart, by the shared deadline at shutdown.
    async fn stop_service(&mut self, stop: Stop) -> bool {
        self.running = false;
        self.service.cancel();
        self.tracker.close();
        for (id, _) in self.tasks.drain() {
            self.replies.set(&id, None);
        }
        let grace = self.deadline.grace();
        let stopped = match stop {
            Stop::Restart => tokio::time::timeout(grace, self.tracker.wait())
                .await
                .is_ok(),
            Stop::Shutdown => self.deadline.bound(self.tracker.wait()).await.is_some(),
        };
        if !stopped {
            tracing::warn!(
                ?grace,
                "Instance tasks did not stop within the grace period."
            );
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
        let (settings, settings_updates) = watch::channel(self.settings_for(&instance.id));
        let first = !self.started_once.contains(&instance.id);
        let recover = crashed || (first && !self.sink.last_stop_clean());
        let held = Arc::clone(self.held.entry(instance.id.clone()).or_default());
        self.next_generation += 1;
        let generation = self.next_generation;
        let cancel = self.service.child_token();
        let mut crash_backoff = self
            .tasks
            .remove(&instance.id)
            .map(|task| {
                task.cancel.cancel();
                task.crash_backoff
            })
            .unwrap_or_else(|| Backoff::new(CRASH_BACKOFF));
        let actor = match self.build_actor(instance, settings_updates, receiver, held, recover) {
            Ok(actor) => actor,
            Err(error) => {
                // Tried again with the crash backoff, like an actor that died: the instance
                // must not stay stopped until the next reload.
                let delay = crash_backoff.next_delay();
                self.monitor.record_error(
                    Component::Listener,
                    ErrorKind::Task,
                    Some(&instance.id),
                    &format!(
                        "cannot build the HTTP client: {error}; retrying in {}",
                        humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
                    ),
                );
                self.tasks.insert(
                    instance.id.clone(),
                    Task {
                        generation,
                        cancel,
                        settings: None,
                        crash_backoff,
                        waiting: true,
                        recover,
                    },
                );
                self.schedule_restart(instance.id.clone(), generation, delay);
                self.update_task_count();
                return;
            }
        };
        self.started_once.insert(instance.id.clone());
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
        self.replies.set(&instance.id, Some(commands));
        self.tasks.insert(
            instance.id.clone(),
            Task {
                generation,
                cancel,
                settings: Some(settings),
                crash_backoff,
                waiting: false,
                recover: false,
            },
        );
        self.update_task_count();
    }

    fn build_actor(
        &mut self,
        instance: &InstanceConfig,
        settings: watch::Receiver<ActorSettings>,
        commands: mpsc::Receiver<InstanceCommand>,
        held: Held,
        recover: bool,
    ) -> Result<InstanceActor, String> {
        #[cfg(test)]
        if self.failing_builds > 0 {
            self.failing_builds -= 1;
            return Err("injected failure (test)".to_owned());
        }
        InstanceActor::new(
            instance.clone(),
            settings,
            self.monitor.metrics().clone(),
            Arc::clone(&self.monitor),
            Arc::clone(&self.sink),
            commands,
            self.monitor.chats_of(&instance.id),
            held,
            recover,
        )
        .map_err(|error| error.to_string())
    }

    fn stop_instance(&mut self, instance_id: &str) {
        if let Some(task) = self.tasks.remove(instance_id) {
            task.cancel.cancel();
        }
        self.replies.set(instance_id, None);
        self.update_task_count();
    }

    fn update_task_count(&self) {
        // A crashed actor in its restart backoff is not live.
        let live = self
            .tasks
            .values()
            .filter(|task| !task.cancel.is_cancelled() && !task.waiting)
            .count();
        self.monitor.set_tasks(live);
    }

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
    async fn reload(&mut self, source: ReloadSource) -> Result<ReloadReport, Vec<String>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SendMode;
    use crate::message::{InboundMessage, SinkError, StoredChat, UpstreamSession};
    use crate::metrics::{Metrics, process::ProcessCollector};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A sink with no store. Its `load_listener` (the first thing an actor does) can panic
    /// once, or wait for the test to open a gate, so an actor can crash or be kept busy
    /// without any upstream.
    #[derive(Default)]
    struct TestSink {
        loads: AtomicUsize,
        panic_once: AtomicBool,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl MessageSink for TestSink {
        fn accept(&self, _: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>> {
            Box::pin(async { Ok(()) })
        }

        fn load_listener(
            &self,
            _: &str,
        ) -> BoxFuture<'_, Result<(Vec<StoredChat>, UpstreamSession), SinkError>> {
            self.loads.fetch_add(1, Ordering::SeqCst);
            if self.panic_once.swap(false, Ordering::SeqCst) {
                panic!("sink bug (test)");
            }
            let gate = self.gate.clone();
            Box::pin(async move {
                if let Some(gate) = gate {
                    let _ = gate.acquire().await;
                }
                Ok((Vec::new(), UpstreamSession::default()))
            })
        }
    }

    /// One instance on a port nothing listens on, with these fixed chats.
    fn config_text(fixed: &[&str]) -> String {
        let mut text = String::from(
            "instances:\n  - id: wx-a\n    base_url: http://127.0.0.1:9\n    api_key_env: KEY_A\n",
        );
        if !fixed.is_empty() {
            text.push_str("fixed_listeners:\n");
            for chat in fixed {
                text.push_str(&format!("  - chat: {chat}\n    instances: [\"*\"]\n"));
            }
        }
        text
    }

    struct Harness {
        monitor: Arc<Monitor>,
        replies: Arc<ReplyRouter>,
        control: mpsc::Sender<Control>,
        text: Arc<Mutex<String>>,
        shutdown: CancellationToken,
        run: tokio::task::JoinHandle<bool>,
    }

    fn start(sink: Arc<TestSink>, fixed: &[&str], failing_builds: usize) -> Harness {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let text = Arc::new(Mutex::new(config_text(fixed)));
        let decode = |text: &str| {
            crate::config::decode(text, None, &|name: &str| {
                (name == "KEY_A").then(|| "key-a-0123456789".to_owned())
            })
        };
        let loaded = decode(&text.lock().unwrap()).expect("valid config");
        let current = Arc::clone(&text);
        let loader: ConfigLoader = Box::new(move || decode(&current.lock().unwrap()));
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let monitor = Arc::new(Monitor::new(
            metrics,
            Arc::new(ProcessCollector::new()),
            Duration::from_secs(300),
        ));
        let replies = Arc::new(ReplyRouter::default());
        let config = Arc::new(loaded.config);
        let (active, _) = watch::channel(Arc::clone(&config));
        let (control, receiver) = mpsc::channel(64);
        let mut supervisor = Supervisor::new(
            config,
            loader,
            Arc::clone(&monitor),
            sink,
            Arc::clone(&replies),
            active,
            control.clone(),
            Deadline::new(Duration::from_secs(5)),
        );
        supervisor.failing_builds = failing_builds;
        let shutdown = CancellationToken::new();
        let run = tokio::spawn(supervisor.run(receiver, shutdown.clone()));
        Harness {
            monitor,
            replies,
            control,
            text,
            shutdown,
            run,
        }
    }

    /// Polls `check` every 10 ms of (paused) time until it holds; false after `limit`.
    async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        check()
    }

    fn restarts(monitor: &Monitor) -> usize {
        monitor
            .recent_errors(100)
            .iter()
            .filter(|error| error.error_message.contains("ended unexpectedly"))
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_task_in_its_restart_backoff_is_not_counted_live() {
        let sink = Arc::new(TestSink::default());
        sink.panic_once.store(true, Ordering::SeqCst);
        let harness = start(Arc::clone(&sink), &[], 0);
        // The first actor panics at once; the restart waits 0.5 to 1 s (jittered).
        assert!(
            within(Duration::from_millis(400), || restarts(&harness.monitor)
                == 1)
            .await,
            "the crash was not recorded"
        );
        assert_eq!(
            harness.monitor.snapshot().tasks,
            0,
            "a crashed task in its backoff counted as live"
        );
        assert!(
            within(Duration::from_secs(2), || sink.loads.load(Ordering::SeqCst)
                == 2)
            .await,
            "the task was not restarted"
        );
        assert_eq!(harness.monitor.snapshot().tasks, 1);
        harness.shutdown.cancel();
        assert!(harness.run.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_actor_that_cannot_be_built_is_retried_with_backoff() {
        let sink = Arc::new(TestSink::default());
        let harness = start(Arc::clone(&sink), &[], 2);
        let failures = |monitor: &Monitor| {
            monitor
                .recent_errors(100)
                .iter()
                .filter(|error| error.error_message.contains("cannot build the HTTP client"))
                .count()
        };
        assert!(
            within(Duration::from_millis(100), || failures(&harness.monitor)
                == 1)
            .await
        );
        assert_eq!(harness.monitor.snapshot().tasks, 0);
        assert_eq!(sink.loads.load(Ordering::SeqCst), 0);
        // The second try (after 0.5 to 1 s) fails too, the third (1 to 2 s later) builds it.
        assert!(
            within(Duration::from_secs(4), || sink.loads.load(Ordering::SeqCst)
                == 1)
            .await,
            "the instance stayed stopped after a failed build"
        );
        assert_eq!(failures(&harness.monitor), 2);
        assert_eq!(harness.monitor.snapshot().tasks, 1);
        harness.shutdown.cancel();
        assert!(harness.run.await.unwrap());
    }

    /// The actor's command queue is full (it is stuck in a long call) when a reload changes
    /// its fixed chats: the new settings still reach it once it is free.
    #[tokio::test(start_paused = true)]
    async fn settings_reach_an_actor_whose_command_queue_is_full() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let sink = Arc::new(TestSink {
            gate: Some(Arc::clone(&gate)),
            ..TestSink::default()
        });
        let harness = start(Arc::clone(&sink), &["alice"], 0);
        assert!(
            within(Duration::from_secs(1), || sink.loads.load(Ordering::SeqCst)
                == 1)
            .await
        );
        // More replies than the queue holds; each waits an hour for its answer.
        let mut pending = Vec::new();
        for _ in 0..70 {
            let replies = Arc::clone(&harness.replies);
            pending.push(tokio::spawn(async move {
                replies
                    .send_reply(reply("wx-a"), Duration::from_secs(3600))
                    .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        *harness.text.lock().unwrap() = config_text(&["alice", "bob"]);
        let (respond, answer) = oneshot::channel();
        harness
            .control
            .send(Control::Reload {
                source: ReloadSource::Http,
                respond: Some(respond),
            })
            .await
            .unwrap();
        let report = answer.await.unwrap().expect("reload");
        assert!(report.changed, "{report:?}");
        gate.add_permits(1);
        let has_bob = || {
            harness
                .monitor
                .chats_of("wx-a")
                .iter()
                .any(|(chat, state)| chat == "bob" && state.fixed)
        };
        assert!(
            within(Duration::from_secs(10), has_bob).await,
            "the new fixed chat never reached the actor: {:?}",
            harness.monitor.chats_of("wx-a")
        );
        for reply in pending {
            assert!(reply.await.unwrap().is_err(), "the instance is down");
        }
        harness.shutdown.cancel();
        harness.run.await.unwrap();
    }

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
