//! Signals: SIGTERM/SIGINT start a graceful shutdown (a second one aborts); SIGHUP reloads.
//! `Deadline`: the one instant by which every stage of a graceful stop has to be done.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The end of a graceful stop, shared by the stages that stop one after another (the
/// supervisor's actors, the deliveries, the HTTP drain): the clock starts once, at the first
/// `start`, and each stage waits only for what is left, so the whole stop takes at most `grace`
/// however many stages there are. Clones share the clock.
#[derive(Debug, Clone)]
pub struct Deadline {
    grace: Duration,
    at: Arc<OnceLock<Instant>>,
}

impl Deadline {
    /// A deadline `grace` after whichever stage starts stopping first.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            at: Arc::default(),
        }
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Starts the clock if no stage did yet; returns the shared deadline.
    pub fn start(&self) -> Instant {
        *self.at.get_or_init(|| Instant::now() + self.grace)
    }

    /// Runs `work` until it finishes or the deadline passes (`None`); starts the clock if
    /// nothing did. Work that is already done finishes even when the deadline has passed.
    pub async fn bound<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::time::timeout_at(self.start(), work).await.ok()
    }
}

/// Exit code when a second signal aborts the graceful shutdown.
pub const ABORT_EXIT_CODE: i32 = 130;

/// A signal this soon after the first is the same request, not a second one: `timeout(1)`
/// signals its command and then its whole process group, and a terminal's Ctrl-C reaches a
/// wrapper script and the sidecar at once, so one stop can arrive twice within microseconds.
/// A person asking again to abort a slow stop takes longer than this.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// What a SIGTERM/SIGINT means, given when the first one came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The first: stop gracefully.
    Graceful,
    /// Within `REPEAT_WINDOW` of the first: the same request delivered twice.
    Repeat,
    /// Later: abort the graceful stop.
    Abort,
}

fn classify(first: Option<Instant>, now: Instant) -> Stop {
    match first {
        None => Stop::Graceful,
        Some(first) if now.duration_since(first) < REPEAT_WINDOW => Stop::Repeat,
        Some(_) => Stop::Abort,
    }
}

/// Spawns the signal listener. The first SIGTERM/SIGINT cancels `shutdown`; a second one, at
/// least `REPEAT_WINDOW` later, ends the process at once. On unix, SIGHUP calls `on_hangup`
/// (the caller asks for a reload), like the watcher's `on_change`: this module knows nothing
/// of the supervisor.
pub fn spawn(shutdown: CancellationToken, on_hangup: Arc<dyn Fn() + Send + Sync>) {
    // Installed before returning, not in the task: the caller reports ready next, and until a
    // handler is installed SIGHUP's default action ends the process.
    let mut signals = match Signals::new() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::warn!("Cannot listen for signals: {error}");
            return;
        }
    };
    // Windows has no SIGHUP, so nothing here sends reloads (the watcher and the API still do).
    #[cfg(not(unix))]
    drop(on_hangup);
    tokio::spawn(async move {
        let mut first = None;
        loop {
            match signals.next().await {
                Signal::Terminate => match classify(first, Instant::now()) {
                    Stop::Graceful => {
                        first = Some(Instant::now());
                        tracing::info!(
                            "Shutdown signal received; stopping gracefully (send it again to abort)."
                        );
                        shutdown.cancel();
                    }
                    Stop::Repeat => tracing::info!(
                        "Shutdown signal received again within a second: the same stop, still graceful."
                    ),
                    Stop::Abort => {
                        eprintln!("wxauto-sidecar: second signal received; aborting");
                        #[allow(
                            clippy::disallowed_methods,
                            reason = "the second signal must end the process at once, whatever main awaits"
                        )]
                        std::process::exit(ABORT_EXIT_CODE);
                    }
                },
                #[cfg(unix)]
                Signal::Hangup => {
                    tracing::info!("SIGHUP received; reloading the configuration.");
                    on_hangup();
                }
            }
        }
    });
}

enum Signal {
    Terminate,
    /// SIGHUP; Windows has no such signal (reload there via the watcher or the lifecycle API).
    #[cfg(unix)]
    Hangup,
}

#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Terminate,
            _ = self.hup.recv() => Signal::Hangup,
        }
    }
}

#[cfg(not(unix))]
struct Signals {
    ctrl_c: tokio::signal::windows::CtrlC,
    ctrl_break: tokio::signal::windows::CtrlBreak,
}

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            ctrl_c: tokio::signal::windows::ctrl_c()?,
            ctrl_break: tokio::signal::windows::ctrl_break()?,
        })
    }

    async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.ctrl_c.recv() => Signal::Terminate,
            _ = self.ctrl_break.recv() => Signal::Terminate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_within_a_second_of_the_first_is_the_same_stop() {
        let first = Instant::now();
        assert_eq!(classify(None, first), Stop::Graceful);
        assert_eq!(classify(Some(first), first), Stop::Repeat);
        let just_before = first + REPEAT_WINDOW - Duration::from_millis(1);
        assert_eq!(classify(Some(first), just_before), Stop::Repeat);
        assert_eq!(classify(Some(first), first + REPEAT_WINDOW), Stop::Abort);
    }

    /// Three stages that never finish take the grace once, not once each.
    #[tokio::test(start_paused = true)]
    async fn stages_share_one_deadline() {
        let deadline = Deadline::new(Duration::from_secs(10));
        let began = Instant::now();
        for _ in 0..3 {
            let stage = deadline.clone();
            assert_eq!(stage.bound(std::future::pending::<()>()).await, None);
        }
        assert_eq!(began.elapsed(), Duration::from_secs(10));
        // Finished work is not lost once the deadline has passed.
        assert_eq!(deadline.bound(async { 7 }).await, Some(7));
    }

    /// The clock starts at the first stage, not when the deadline is made.
    #[tokio::test(start_paused = true)]
    async fn the_clock_starts_at_the_first_stage() {
        let deadline = Deadline::new(Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let began = Instant::now();
        assert_eq!(deadline.start(), began + Duration::from_secs(2));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(deadline.clone().start(), began + Duration::from_secs(2));
        assert_eq!(deadline.bound(std::future::pending::<()>()).await, None);
        assert_eq!(began.elapsed(), Duration::from_secs(2));
    }
}
