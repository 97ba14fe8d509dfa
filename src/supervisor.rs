//! The supervisor: one loop over a closed set of `Control` events owns every instance task.
//!
//! Only this loop starts, stops, restarts or re-configures actors, swaps the active config and
//! stops or starts the listener service; everything else sends it a `Control` event.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::config::{BackoffConfig, Config, ConfigDiff, InstanceConfig};
use crate::event::{Component, ErrorKind};
use crate::listener::{ActorSettings, Held, InstanceActor, InstanceCommand};
use crate::message::MessageSink;
use crate::monitor::Monitor;
use crate::shutdown::Deadline;

mod control;
mod reload;
mod router;
#[cfg(test)]
mod tests;

pub use control::{ConfigLoader, ConfigSubscriber, Control, ReloadReport, ReloadSource};
pub use router::ReplyRouter;

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
            listener: self.config.listener_for(instance_id).clone(),
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
}
