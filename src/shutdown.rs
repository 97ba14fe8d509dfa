//! Signals: SIGTERM/SIGINT start a graceful shutdown (a second one aborts); SIGHUP reloads.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Exit code when a second signal aborts the graceful shutdown.
pub const ABORT_EXIT_CODE: i32 = 130;

/// Spawns the signal listener. The first SIGTERM/SIGINT cancels `shutdown`; a second one ends
/// the process at once. On unix, SIGHUP calls `on_hangup` (the caller asks for a reload), like
/// the watcher's `on_change`: this module knows nothing of the supervisor.
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
        let mut received = 0u32;
        loop {
            match signals.next().await {
                Signal::Terminate => {
                    received += 1;
                    if received == 1 {
                        tracing::info!(
                            "Shutdown signal received; stopping gracefully (send it again to abort)."
                        );
                        shutdown.cancel();
                    } else {
                        eprintln!("wxauto-sidecar: second signal received; aborting");
                        #[allow(
                            clippy::disallowed_methods,
                            reason = "the second signal must end the process at once, whatever main awaits"
                        )]
                        std::process::exit(ABORT_EXIT_CODE);
                    }
                }
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
