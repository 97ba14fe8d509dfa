//! The restart decision of one process: restart policy, exponential backoff and the crash-loop
//! window. Pure state driven by the caller's clock, so it is tested with paused tokio time.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{ProcessConfig, RestartPolicy};

/// A run that lasted this long resets the backoff to its initial delay.
pub const STABLE_UPTIME: Duration = Duration::from_secs(60);

/// What to do after the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start again after this delay.
    Restart(Duration),
    /// Leave it `exited` (the policy says no restart).
    Exited,
}

/// The restart history of one process.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Start times inside the crash-loop window (older ones are pruned).
    starts: VecDeque<Instant>,
    /// Restarts since the last stable run; the next delay is `initial * 2^consecutive`.
    consecutive: u32,
}

impl Tracker {
    /// Forgets the history (a manual start, a changed command).
    pub fn reset(&mut self) {
        self.starts.clear();
        self.consecutive = 0;
    }

    /// Whether one more start at `now` stays within `crash_loop.max_starts` per window; every
    /// start counts, manual or automatic, short run or long.
    pub fn may_start(&mut self, config: &ProcessConfig, now: Instant) -> bool {
        self.prune(config, now);
        self.starts.len() < config.crash_loop.max_starts as usize
    }

    /// Records a start at `now`.
    pub fn record_start(&mut self, now: Instant) {
        self.starts.push_back(now);
    }

    /// Starts counted in the window at `now`.
    pub fn starts_in_window(&mut self, config: &ProcessConfig, now: Instant) -> usize {
        self.prune(config, now);
        self.starts.len()
    }

    fn prune(&mut self, config: &ProcessConfig, now: Instant) {
        while let Some(first) = self.starts.front() {
            if now.saturating_duration_since(*first) >= config.crash_loop.window {
                self.starts.pop_front();
            } else {
                break;
            }
        }
    }

    /// The decision after a run of `uptime` ended with `code` (`None`: killed by a signal, or
    /// the start itself failed).
    pub fn on_exit(
        &mut self,
        config: &ProcessConfig,
        uptime: Duration,
        code: Option<i32>,
    ) -> Decision {
        let success = code.is_some_and(|code| config.success_exit_codes.contains(&code));
        let restart = match config.restart {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => !success,
            RestartPolicy::Always => true,
        };
        if !restart {
            return Decision::Exited;
        }
        if uptime >= STABLE_UPTIME {
            self.consecutive = 0;
        }
        let delay = backoff_delay(config, self.consecutive);
        self.consecutive = self.consecutive.saturating_add(1);
        Decision::Restart(delay)
    }
}

/// `initial * 2^n`, capped at `max`.
fn backoff_delay(config: &ProcessConfig, n: u32) -> Duration {
    let factor = 2u32.checked_pow(n).unwrap_or(u32::MAX);
    config
        .backoff
        .initial
        .checked_mul(factor)
        .unwrap_or(config.backoff.max)
        .min(config.backoff.max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackoffConfig, CrashLoopConfig, StopSignal};

    fn config(restart: RestartPolicy) -> ProcessConfig {
        ProcessConfig {
            name: "p".to_owned(),
            command: "true".to_owned(),
            args: Vec::new(),
            cwd: None,
            env: Vec::new(),
            restart,
            success_exit_codes: vec![0, 2],
            backoff: BackoffConfig {
                initial: Duration::from_secs(1),
                max: Duration::from_secs(5),
            },
            crash_loop: CrashLoopConfig {
                max_starts: 3,
                window: Duration::from_secs(30),
            },
            stop_signal: StopSignal::Term,
            stop_timeout: Duration::from_secs(1),
            instance: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_its_cap_and_resets_after_a_stable_run() {
        let config = config(RestartPolicy::Always);
        let mut tracker = Tracker::default();
        let short = Duration::from_millis(100);
        let delays: Vec<Decision> = (0..5)
            .map(|_| tracker.on_exit(&config, short, Some(3)))
            .collect();
        let secs = |s| Decision::Restart(Duration::from_secs(s));
        assert_eq!(delays, [secs(1), secs(2), secs(4), secs(5), secs(5)]);
        // A run of a minute starts the doubling again.
        assert_eq!(tracker.on_exit(&config, STABLE_UPTIME, Some(3)), secs(1));
        assert_eq!(tracker.on_exit(&config, short, Some(3)), secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_policies_and_success_codes() {
        let mut tracker = Tracker::default();
        let up = Duration::from_secs(1);
        let on_failure = config(RestartPolicy::OnFailure);
        assert_eq!(tracker.on_exit(&on_failure, up, Some(0)), Decision::Exited);
        assert_eq!(tracker.on_exit(&on_failure, up, Some(2)), Decision::Exited);
        assert!(matches!(
            tracker.on_exit(&on_failure, up, Some(3)),
            Decision::Restart(_)
        ));
        // Killed by a signal is a failure.
        assert!(matches!(
            tracker.on_exit(&on_failure, up, None),
            Decision::Restart(_)
        ));
        let never = config(RestartPolicy::Never);
        assert_eq!(tracker.on_exit(&never, up, Some(3)), Decision::Exited);
        let always = config(RestartPolicy::Always);
        assert!(matches!(
            tracker.on_exit(&always, up, Some(0)),
            Decision::Restart(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn the_crash_loop_window_counts_every_start_and_slides() {
        let config = config(RestartPolicy::Always);
        let mut tracker = Tracker::default();
        for _ in 0..3 {
            assert!(tracker.may_start(&config, Instant::now()));
            tracker.record_start(Instant::now());
            tokio::time::advance(Duration::from_secs(5)).await;
        }
        // Three starts within 30 s: a fourth is refused.
        assert!(!tracker.may_start(&config, Instant::now()));
        assert_eq!(tracker.starts_in_window(&config, Instant::now()), 3);
        // The first start leaves the window 30 s after it happened (15 s have passed).
        tokio::time::advance(Duration::from_secs(15)).await;
        assert!(tracker.may_start(&config, Instant::now()));
        assert_eq!(tracker.starts_in_window(&config, Instant::now()), 2);
        tracker.reset();
        assert_eq!(tracker.starts_in_window(&config, Instant::now()), 0);
    }
}
