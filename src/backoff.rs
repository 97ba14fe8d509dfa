//! Jittered exponential backoff, shared by instance actors and the supervisor.

use std::time::Duration;

use crate::config::BackoffConfig;

/// Exponential backoff with "equal jitter": each delay is uniformly drawn from
/// `[d/2, d]` where `d = min(max, initial × 2^attempt)`. The jitter keeps many instances that
/// failed together (a shared network blip) from retrying in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    /// A backoff at its first step.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0 }
    }

    /// The next delay; each call doubles the base up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let base = self
            .config
            .initial
            .saturating_mul(1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX))
            .min(self.config.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        half + half.mul_f64(fastrand::f64())
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Takes new limits, keeping the current step.
    pub fn set_config(&mut self, config: BackoffConfig) {
        self.config = config;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        });
        let expected_caps = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for cap in expected_caps {
            let delay = backoff.next_delay();
            let cap = Duration::from_secs(cap);
            assert!(
                delay <= cap && delay >= cap / 2,
                "{delay:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut backoff = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(5),
        });
        for _ in 0..200 {
            assert!(backoff.next_delay() <= Duration::from_secs(5));
        }
    }
}
