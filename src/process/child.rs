//! One process's actor: spawns the child into its own group, captures its output, reacts to its
//! exit with the restart policy, and stops the whole group (signal, `stop_timeout`, kill).
//!
//! The actor is the only writer of its `Entry`'s status; commands are handled one at a time, so
//! a stop or restart is never interleaved with another.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

use super::output::{self, Stream};
use super::policy::{Decision, Tracker};
use super::{
    Action, ActorHandle, Entry, ProcessError, ProcessState, ProcessTable, STARTUP_GRACE, sys,
};
use crate::config::ProcessConfig;

/// A run counts as `running` (not `starting`) after this long.
const STARTING: Duration = Duration::from_secs(1);
/// How often a stop checks whether the group is gone.
const POLL: Duration = Duration::from_millis(20);
/// After a kill, how long to wait for the group's members to vanish.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// What the manager sends an actor.
pub(super) enum ActorMsg {
    /// An API command; answered once it took effect.
    Command(Action, oneshot::Sender<Result<(), ProcessError>>),
    /// A reloaded config for this process; `restart` when command, args, cwd or env changed.
    Update {
        config: Box<ProcessConfig>,
        restart: bool,
        respond: oneshot::Sender<()>,
    },
    /// Stop the group and end the actor.
    Shutdown(oneshot::Sender<()>),
}

/// Starts the actor, which spawns the process at once. The receiver fires after that spawn.
pub(super) fn spawn_actor(
    config: ProcessConfig,
    entry: Arc<Entry>,
    table: Arc<ProcessTable>,
) -> (ActorHandle, oneshot::Receiver<()>) {
    let (inbox, receiver) = mpsc::unbounded_channel();
    let (started, started_rx) = oneshot::channel();
    let span = tracing::info_span!("process", process = %config.name);
    let actor = Actor {
        config,
        entry,
        table,
        tracker: Tracker::default(),
        running: None,
        wake: None,
        started_once: false,
    };
    let done = tokio::spawn(actor.run(receiver, started).instrument(span));
    (ActorHandle { inbox, done }, started_rx)
}

/// A live child and its group.
struct Running {
    child: Child,
    group: sys::Group,
    started: Instant,
}

struct Actor {
    config: ProcessConfig,
    entry: Arc<Entry>,
    table: Arc<ProcessTable>,
    tracker: Tracker,
    running: Option<Running>,
    /// `starting` → `running`, or the end of a backoff delay.
    wake: Option<Instant>,
    started_once: bool,
}

enum Event {
    Message(ActorMsg),
    Closed,
    Exited(io::Result<ExitStatus>),
    Wake,
}

async fn wait(running: &mut Option<Running>) -> io::Result<ExitStatus> {
    match running {
        Some(running) => running.child.wait().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Actor {
    async fn run(
        mut self,
        mut inbox: mpsc::UnboundedReceiver<ActorMsg>,
        started: oneshot::Sender<()>,
    ) {
        self.start().await;
        let _ = started.send(());
        loop {
            let event = tokio::select! {
                message = inbox.recv() => match message {
                    Some(message) => Event::Message(message),
                    None => Event::Closed,
                },
                status = wait(&mut self.running) => Event::Exited(status),
                () = sleep_until(self.wake) => Event::Wake,
            };
            match event {
                Event::Message(ActorMsg::Command(action, respond)) => {
                    self.command(action).await;
                    let _ = respond.send(Ok(()));
                }
                Event::Message(ActorMsg::Update {
                    config,
                    restart,
                    respond,
                }) => {
                    self.update(*config, restart).await;
                    let _ = respond.send(());
                }
                Event::Message(ActorMsg::Shutdown(respond)) => {
                    self.stop().await;
                    let _ = respond.send(());
                    return;
                }
                Event::Closed => {
                    self.stop().await;
                    return;
                }
                Event::Exited(status) => self.exited(status).await,
                Event::Wake => self.on_wake().await,
            }
        }
    }

    fn state(&self) -> ProcessState {
        self.entry.lock().state
    }

    fn set_state(&self, state: ProcessState) {
        self.entry.lock().state = state;
    }

    // === starting ===

    /// One start, subject to the crash-loop window; a spawn failure counts as a failed run.
    async fn start(&mut self) {
        let now = Instant::now();
        if !self.tracker.may_start(&self.config, now) {
            self.go_fatal(now);
            return;
        }
        self.tracker.record_start(now);
        let restart = u64::from(self.started_once);
        self.started_once = true;
        match self.spawn() {
            Ok(running) => {
                let pid = running.child.id();
                self.entry.set_members(Some(running.group.members()));
                {
                    // One critical section per transition: readers never see a mix.
                    let mut status = self.entry.lock();
                    status.restarts += restart;
                    status.state = ProcessState::Starting;
                    status.pid = pid;
                    status.start_time = Some(SystemTime::now());
                    status.started = Some(running.started);
                    status.last_error = None;
                }
                self.running = Some(running);
                self.wake = Some(now + STARTING);
                if let Some(instance) = &self.config.instance {
                    self.table.expect_down(instance, Some(now + STARTUP_GRACE));
                }
                tracing::info!(
                    process = %self.config.name,
                    pid = pid.unwrap_or_default(),
                    command = %self.config.command,
                    "Process started."
                );
            }
            Err(error) => {
                let message = format!("cannot start {:?}: {error}", self.config.command);
                tracing::warn!(process = %self.config.name, "{message}");
                {
                    let mut status = self.entry.lock();
                    status.restarts += restart;
                    status.last_error = Some(message);
                }
                self.after_exit(Duration::ZERO, None, false);
            }
        }
    }

    fn spawn(&self) -> io::Result<Running> {
        let program = resolve(&self.config)?;
        let mut command = Command::new(&program);
        command
            .args(&self.config.args)
            .envs(self.config.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = &self.config.cwd {
            command.current_dir(cwd);
        }
        sys::configure(&mut command);
        let mut child = command.spawn()?;
        let group = match sys::Group::attach(&child) {
            Ok(group) => group,
            Err(error) => {
                let _ = child.start_kill();
                return Err(error);
            }
        };
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(output::forward(
                Arc::clone(&self.entry),
                Stream::Stdout,
                stdout,
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(output::forward(
                Arc::clone(&self.entry),
                Stream::Stderr,
                stderr,
            ));
        }
        Ok(Running {
            child,
            group,
            started: Instant::now(),
        })
    }

    async fn on_wake(&mut self) {
        self.wake = None;
        match self.state() {
            ProcessState::Starting if self.running.is_some() => {
                self.set_state(ProcessState::Running);
            }
            ProcessState::Backoff => self.start().await,
            _ => {}
        }
    }

    fn go_fatal(&mut self, now: Instant) {
        let starts = self.tracker.starts_in_window(&self.config, now);
        let message = format!(
            "{starts} starts within {}: crash loop, giving up (start it again through the API or change its command)",
            humantime::format_duration(self.config.crash_loop.window)
        );
        tracing::error!(process = %self.config.name, "{message}");
        {
            let mut status = self.entry.lock();
            status.state = ProcessState::Fatal;
            status.pid = None;
            status.last_error = Some(message);
        }
        self.wake = None;
        self.clear_expected();
    }

    // === exits ===

    async fn exited(&mut self, status: io::Result<ExitStatus>) {
        let Some(mut running) = self.running.take() else {
            return;
        };
        let status = status.ok();
        let uptime = running.started.elapsed();
        // The leader is gone; whatever it left in its group goes the same way as on a stop.
        let status = self.terminate(&mut running, status).await;
        self.entry.set_members(None);
        let code = status.and_then(exit_code);
        tracing::warn!(
            process = %self.config.name,
            exit_code = code.unwrap_or_default(),
            uptime = %humantime::format_duration(Duration::from_millis(uptime.as_millis() as u64)),
            "Process exited."
        );
        self.after_exit(uptime, code, true);
    }

    /// The policy's decision after a run ended (`ran`: with `code`; otherwise the spawn failed).
    fn after_exit(&mut self, uptime: Duration, code: Option<i32>, ran: bool) {
        let decision = self.tracker.on_exit(&self.config, uptime, code);
        {
            let mut status = self.entry.lock();
            status.pid = None;
            if ran {
                status.last_exit_code = code;
            }
            status.state = match decision {
                Decision::Restart(_) => ProcessState::Backoff,
                Decision::Exited => ProcessState::Exited,
            };
        }
        match decision {
            Decision::Restart(delay) => {
                self.wake = Some(Instant::now() + delay);
                if let Some(instance) = &self.config.instance {
                    self.table.expect_down(instance, None);
                }
                tracing::info!(
                    process = %self.config.name,
                    delay = %humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                    "Restarting after the backoff delay."
                );
            }
            Decision::Exited => {
                self.wake = None;
                self.clear_expected();
            }
        }
    }

    // === stopping ===

    /// Stops the running group (if any); the state becomes `stopped`.
    async fn stop(&mut self) {
        self.stop_running(ProcessState::Stopped).await;
        self.clear_expected();
    }

    /// Stops the running group (if any), then shows `next`: `stopped`, or `starting` when a
    /// start follows at once.
    async fn stop_running(&mut self, next: ProcessState) {
        self.wake = None;
        let mut code = None;
        let stopped = match self.running.take() {
            Some(mut running) => {
                tracing::info!(process = %self.config.name, signal = sys::stop_signal_name(self.config.stop_signal), "Stopping the process group.");
                code = self.terminate(&mut running, None).await.and_then(exit_code);
                true
            }
            None => false,
        };
        self.entry.set_members(None);
        let mut status = self.entry.lock();
        status.pid = None;
        if stopped {
            status.last_exit_code = code;
        }
        status.state = next;
    }

    /// Ends the whole group: the stop signal to every member, up to `stop_timeout` for the
    /// leader to exit and the group to empty, then a kill of the group. `exited` is the leader's
    /// status when it ended by itself. Returns the leader's status.
    async fn terminate(
        &self,
        running: &mut Running,
        exited: Option<ExitStatus>,
    ) -> Option<ExitStatus> {
        let mut status = exited;
        if status.is_some() && running.group.is_empty() {
            return status;
        }
        if let Err(error) = running.group.signal(self.config.stop_signal) {
            tracing::debug!(process = %self.config.name, "Cannot signal the process group: {error}");
        }
        let deadline = Instant::now() + self.config.stop_timeout;
        loop {
            if status.is_none() {
                if let Ok(Ok(exit)) = tokio::time::timeout(POLL, running.child.wait()).await {
                    status = Some(exit);
                }
            } else {
                tokio::time::sleep(POLL).await;
            }
            if status.is_some() && running.group.is_empty() {
                return status;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        tracing::warn!(
            process = %self.config.name,
            timeout = %humantime::format_duration(self.config.stop_timeout),
            "The process group did not stop within stop_timeout; killing it."
        );
        if let Err(error) = running.group.kill() {
            tracing::warn!(process = %self.config.name, "Cannot kill the process group: {error}");
        }
        if status.is_none() {
            status = running.child.wait().await.ok();
        }
        let until = Instant::now() + KILL_WAIT;
        while !running.group.is_empty() && Instant::now() < until {
            tokio::time::sleep(POLL).await;
        }
        status
    }

    fn clear_expected(&self) {
        if let Some(instance) = &self.config.instance {
            self.table.clear_expected_down(instance);
        }
    }

    // === commands ===

    async fn command(&mut self, action: Action) {
        match action {
            Action::Start => match self.state() {
                ProcessState::Starting | ProcessState::Running => {}
                _ => {
                    self.wake = None;
                    self.tracker.reset();
                    self.start().await;
                }
            },
            Action::Stop => self.stop().await,
            Action::Restart => self.restart().await,
        }
    }

    async fn restart(&mut self) {
        if let Some(instance) = &self.config.instance {
            self.table.expect_down(instance, None);
        }
        self.stop_running(ProcessState::Starting).await;
        self.tracker.reset();
        self.start().await;
    }

    async fn update(&mut self, config: ProcessConfig, restart: bool) {
        if self.config.instance != config.instance {
            self.clear_expected();
        }
        self.config = config;
        {
            let mut status = self.entry.lock();
            status.command = self.config.command.clone();
            status.instance = self.config.instance.clone();
        }
        let live = matches!(
            self.state(),
            ProcessState::Starting
                | ProcessState::Running
                | ProcessState::Backoff
                | ProcessState::Fatal
        );
        if restart && live {
            tracing::info!(process = %self.config.name, "Command changed; restarting the process.");
            self.restart().await;
        }
    }
}

/// The exit code; on unix a process killed by signal N reports `-N`.
fn exit_code(status: ExitStatus) -> Option<i32> {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        status
            .code()
            .or_else(|| status.signal().map(|signal| -signal))
    }
    #[cfg(not(unix))]
    {
        status.code()
    }
}

/// The program to run: a path as given (relative to `cwd` when set), or a bare name looked up
/// on `PATH` (the process's own `env: PATH` if it sets one).
fn resolve(config: &ProcessConfig) -> io::Result<PathBuf> {
    let command = Path::new(&config.command);
    if command.is_absolute() || command.components().count() > 1 {
        return Ok(match &config.cwd {
            Some(cwd) if command.is_relative() => cwd.join(command),
            _ => command.to_path_buf(),
        });
    }
    let path = config
        .env
        .iter()
        .rev()
        .find(|(name, _)| is_path_var(name))
        .map(|(_, value)| OsString::from(value))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.as_os_str().is_empty() {
            continue;
        }
        for candidate in candidates(&dir, &config.command) {
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, "not found on PATH"))
}

#[cfg(unix)]
fn is_path_var(name: &str) -> bool {
    name == "PATH"
}

#[cfg(not(unix))]
fn is_path_var(name: &str) -> bool {
    name.eq_ignore_ascii_case("PATH")
}

#[cfg(unix)]
fn candidates(dir: &Path, name: &str) -> Vec<PathBuf> {
    vec![dir.join(name)]
}

#[cfg(not(unix))]
fn candidates(dir: &Path, name: &str) -> Vec<PathBuf> {
    let mut candidates = vec![dir.join(name)];
    if Path::new(name).extension().is_none() {
        let exts = std::env::var("PATHEXT").unwrap_or_else(|_| ".COM;.EXE;.BAT;.CMD".to_owned());
        for ext in exts.split(';').filter(|ext| !ext.is_empty()) {
            candidates.push(dir.join(format!("{name}{ext}")));
        }
    }
    candidates
}

#[cfg(unix)]
#[allow(
    clippy::disallowed_methods,
    reason = "a PATH lookup before a spawn, as `Command::spawn` itself does"
)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}
