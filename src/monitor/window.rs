//! A sliding-window event count with one-second buckets, exact to the second.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Counts events inside a sliding window. Memory is bounded by the window in seconds.
#[derive(Debug, Default)]
pub struct Window {
    buckets: VecDeque<(u64, u64)>,
}

fn second(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0)
}

impl Window {
    /// Adds `count` events at `now`.
    pub fn add(&mut self, now: SystemTime, count: u64, window: Duration) {
        let now = second(now);
        match self.buckets.back_mut() {
            Some((at, total)) if *at == now => *total += count,
            _ => self.buckets.push_back((now, count)),
        }
        self.prune(now, window);
    }

    /// Events whose second lies inside the last `window` (inclusive of the current second).
    pub fn count(&mut self, now: SystemTime, window: Duration) -> u64 {
        let now = second(now);
        self.prune(now, window);
        self.buckets.iter().map(|(_, count)| count).sum()
    }

    fn prune(&mut self, now: u64, window: Duration) {
        let oldest = now.saturating_sub(window.as_secs().max(1) - 1);
        while self.buckets.front().is_some_and(|(at, _)| *at < oldest) {
            self.buckets.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_only_inside_the_window() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let window = Duration::from_secs(60);
        let mut w = Window::default();
        w.add(start, 3, window);
        w.add(start + Duration::from_secs(30), 2, window);
        assert_eq!(w.count(start + Duration::from_secs(30), window), 5);
        assert_eq!(w.count(start + Duration::from_secs(59), window), 5);
        assert_eq!(w.count(start + Duration::from_secs(60), window), 2);
        assert_eq!(w.count(start + Duration::from_secs(90), window), 0);
    }
}
