//! When an actor probes its instance and polls it next: the health-check period while the
//! instance is up, a jittered exponential backoff (`crate::backoff`) while it is down, back at
//! its first step after the first message poll answered (a probe that passes while the polls
//! fail, as with a rejected key, keeps backing off).
//!
//! Pure bookkeeping on `Instant`s the actor passes in, so the timing can be tested without an
//! instance; the actor's own paused-time tests (`listener/tests.rs`) check it drives the real
//! loop the same way.

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::config::BackoffConfig;

/// The actor's next probe and next poll.
#[derive(Debug, Clone)]
pub(super) struct Schedule {
    backoff: Backoff,
    next_probe: Instant,
    next_poll: Instant,
}

impl Schedule {
    /// Probe and poll both due at `now`.
    pub(super) fn new(backoff: BackoffConfig, now: Instant) -> Self {
        Self {
            backoff: Backoff::new(backoff),
            next_probe: now,
            next_poll: now,
        }
    }

    /// When the actor wakes next: the probe, and the poll too while the instance is up (a
    /// down instance is only probed).
    pub(super) fn wake(&self, up: bool) -> Instant {
        if up {
            self.next_probe.min(self.next_poll)
        } else {
            self.next_probe
        }
    }

    /// The probe is due at `now`.
    pub(super) fn probe_due(&self, now: Instant) -> bool {
        now >= self.next_probe
    }

    /// The poll is due at `now` (the actor polls only an instance that is up).
    pub(super) fn poll_due(&self, now: Instant) -> bool {
        now >= self.next_poll
    }

    /// When the next probe is due.
    #[cfg(test)]
    pub(super) fn next_probe(&self) -> Instant {
        self.next_probe
    }

    /// A probe passed at `now`: the next one after `interval`. When the instance was not up
    /// before it (`came_up`), the poll is due at once; an instance that stays up keeps its own
    /// poll period, even one longer than the health check's. The backoff keeps its step until
    /// a message poll is answered (`recovered`).
    pub(super) fn probe_passed(&mut self, now: Instant, interval: Duration, came_up: bool) {
        self.next_probe = now + interval;
        if came_up {
            self.next_poll = self.next_poll.min(now);
        }
    }

    /// A poll succeeded after an outage: the next outage backs off from the first step.
    pub(super) fn recovered(&mut self) {
        self.backoff.reset();
    }

    /// A probe failed at `now`: the instance is down; the next probe waits out the next
    /// backoff step, which this returns.
    pub(super) fn probe_failed(&mut self, now: Instant) -> Duration {
        let delay = self.backoff.next_delay();
        self.next_probe = now + delay;
        self.next_poll = self.next_poll.min(now);
        delay
    }

    /// A poll ended at `now`, after which the next one is due after `interval`.
    pub(super) fn polled(&mut self, now: Instant, interval: Duration) {
        self.next_poll = now + interval;
    }

    /// A poll failed at `now` because the instance is down: like a failed probe, the next
    /// probe waits out the next backoff step (returned).
    pub(super) fn poll_failed(&mut self, now: Instant) -> Duration {
        let delay = self.backoff.next_delay();
        self.next_probe = now + delay;
        delay
    }

    /// New backoff limits (a reload), keeping the current step.
    pub(super) fn set_backoff(&mut self, config: BackoffConfig) {
        self.backoff.set_config(config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn config() -> BackoffConfig {
        BackoffConfig {
            initial: SECOND,
            max: 8 * SECOND,
        }
    }

    /// `delay` lies in the equal-jitter window `[cap / 2, cap]` of a step whose cap is `cap`.
    fn in_step(delay: Duration, cap: Duration) -> bool {
        delay >= cap / 2 && delay <= cap
    }

    #[test]
    fn a_down_instance_is_probed_after_a_doubling_capped_backoff() {
        let start = Instant::now();
        let mut schedule = Schedule::new(config(), start);
        assert!(schedule.probe_due(start) && schedule.poll_due(start));
        let mut now = start;
        for cap in [1, 2, 4, 8, 8, 8] {
            let delay = schedule.probe_failed(now);
            assert!(in_step(delay, cap * SECOND), "{delay:?} for a {cap} s step");
            assert_eq!(schedule.next_probe(), now + delay);
            assert!(!schedule.probe_due(now + delay - Duration::from_millis(1)));
            assert!(schedule.probe_due(now + delay));
            // Down: only the probe wakes the actor, however early the poll would be.
            assert_eq!(schedule.wake(false), now + delay);
            now += delay;
        }
    }

    #[test]
    fn a_passing_probe_makes_the_poll_due_and_a_passing_poll_resets_the_backoff() {
        let start = Instant::now();
        let mut schedule = Schedule::new(config(), start);
        let mut now = start;
        for _ in 0..3 {
            now += schedule.probe_failed(now);
        }
        schedule.polled(now, 60 * SECOND);
        schedule.probe_passed(now, 30 * SECOND, true);
        assert_eq!(schedule.next_probe(), now + 30 * SECOND);
        assert!(
            schedule.poll_due(now),
            "a passing probe makes the poll due at once"
        );
        assert_eq!(schedule.wake(true), now);
        // The poll fails (a rejected key passes the probe): the same outage, whose backoff
        // goes on from its fourth step instead of starting over.
        let delay = schedule.poll_failed(now);
        assert!(
            in_step(delay, 8 * SECOND),
            "{delay:?}: the backoff started over"
        );
        now += delay;
        schedule.probe_passed(now, 30 * SECOND, true);
        // This time the poll succeeds: the next outage (seen by a poll) starts again at the
        // first step.
        schedule.recovered();
        schedule.polled(now, SECOND / 10);
        let later = now + SECOND / 10;
        let delay = schedule.poll_failed(later);
        assert!(
            in_step(delay, SECOND),
            "{delay:?}: the backoff was not reset"
        );
        assert_eq!(schedule.next_probe(), later + delay);
        let delay = schedule.probe_failed(later + delay);
        assert!(in_step(delay, 2 * SECOND), "{delay:?}");
    }

    /// Polling every minute with a health check every 30 s: a probe that passes while the
    /// instance stays up does not bring the poll forward.
    #[test]
    fn a_probe_of_an_instance_that_stays_up_keeps_the_poll_period() {
        let start = Instant::now();
        let mut schedule = Schedule::new(config(), start);
        schedule.probe_passed(start, 30 * SECOND, true);
        schedule.polled(start, 60 * SECOND);
        let probe = start + 30 * SECOND;
        schedule.probe_passed(probe, 30 * SECOND, false);
        assert!(!schedule.poll_due(probe));
        assert_eq!(schedule.wake(true), start + 60 * SECOND);
    }

    #[test]
    fn while_up_the_earlier_of_probe_and_poll_wakes_the_actor() {
        let start = Instant::now();
        let mut schedule = Schedule::new(config(), start);
        schedule.probe_passed(start, 30 * SECOND, true);
        schedule.polled(start, SECOND);
        assert_eq!(schedule.wake(true), start + SECOND);
        assert_eq!(schedule.wake(false), start + 30 * SECOND);
        schedule.polled(start, 60 * SECOND);
        assert_eq!(schedule.wake(true), start + 30 * SECOND);
    }

    #[test]
    fn new_limits_apply_from_the_current_step() {
        let start = Instant::now();
        let mut schedule = Schedule::new(config(), start);
        let mut now = start;
        for _ in 0..3 {
            now += schedule.probe_failed(now);
        }
        // Step four of a backoff from 100 ms: 800 ms, under the new 500 ms cap.
        schedule.set_backoff(BackoffConfig {
            initial: SECOND / 10,
            max: SECOND / 2,
        });
        let delay = schedule.probe_failed(now);
        assert!(in_step(delay, SECOND / 2), "{delay:?}");
    }
}
