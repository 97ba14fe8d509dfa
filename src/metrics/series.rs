//! Series storage for the hand-written families: counters and histograms as atomics, grouped
//! per key (an instance or a platform) in a sorted map that the encoder walks in key order.
//!
//! Recording is a read lock, a map lookup and an atomic add; creating or removing a key takes
//! the write lock. Which series of a key exist is a bit mask (`Presence`), so a series can be
//! created at 0 before its first event and a removed key takes all its series with it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

/// A histogram of `B` buckets (the bounds, then `+Inf`), its sum kept as `f64` bits.
///
/// The count is the sum of the buckets when read, so `_count` and the `+Inf` bucket always
/// agree; `_sum` may trail an observation in flight by that observation.
#[derive(Debug)]
pub struct AtomicHistogram<const B: usize> {
    buckets: [AtomicU64; B],
    sum: AtomicU64,
}

impl<const B: usize> Default for AtomicHistogram<B> {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }
}

impl<const B: usize> AtomicHistogram<B> {
    /// Counts `value` in `bucket` (from `text::Bounds::bucket`).
    pub fn observe(&self, bucket: usize, value: f64) {
        if let Some(count) = self.buckets.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + value).to_bits())
            });
    }

    /// The non-cumulative bucket counts and the sum.
    pub fn load(&self) -> ([u64; B], f64) {
        let buckets = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        (buckets, f64::from_bits(self.sum.load(Ordering::Relaxed)))
    }
}

/// Which series of a key exist, one bit each.
#[derive(Debug, Default)]
pub struct Presence(AtomicU64);

impl Presence {
    /// Marks the series of `mask` as existing.
    pub fn add(&self, mask: u64) {
        if self.0.load(Ordering::Relaxed) & mask != mask {
            self.0.fetch_or(mask, Ordering::Relaxed);
        }
    }

    /// Whether series `bit` exists.
    pub fn has(&self, bit: u32) -> bool {
        self.0.load(Ordering::Relaxed) & (1 << bit) != 0
    }

    /// Whether any series of `mask` exists.
    pub fn any(&self, mask: u64) -> bool {
        self.0.load(Ordering::Relaxed) & mask != 0
    }
}

/// `S` per key, in key order.
#[derive(Debug)]
pub struct Table<S> {
    map: RwLock<BTreeMap<String, Arc<S>>>,
}

impl<S> Default for Table<S> {
    fn default() -> Self {
        Self {
            map: RwLock::new(BTreeMap::new()),
        }
    }
}

impl<S: Default> Table<S> {
    /// The entry of `key`, created if it is missing.
    pub fn get_or_create(&self, key: &str) -> Arc<S> {
        if let Some(entry) = self.get(key) {
            return entry;
        }
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(map.entry(key.to_owned()).or_default())
    }

    /// Keeps the entries of `keys` (creating the missing ones) and drops every other, in one
    /// step: no reader sees a state in between.
    pub fn set_keys<'a>(&self, keys: impl IntoIterator<Item = &'a str>) {
        let wanted: BTreeSet<&str> = keys.into_iter().collect();
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.retain(|key, _| wanted.contains(key.as_str()));
        for key in wanted {
            if !map.contains_key(key) {
                map.insert(key.to_owned(), Arc::default());
            }
        }
    }
}

impl<S> Table<S> {
    /// The entry of `key`, if any.
    pub fn get(&self, key: &str) -> Option<Arc<S>> {
        self.read().get(key).map(Arc::clone)
    }

    /// Drops the entry of `key` and so every series it holds.
    /// Removes an entry; returns it, if there was one.
    pub fn remove(&self, key: &str) -> Option<Arc<S>> {
        self.map
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key)
    }

    /// Every entry, in key order, for a scrape.
    pub fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Arc<S>>> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_per_bucket_and_sums() {
        let histogram = AtomicHistogram::<3>::default();
        histogram.observe(0, 0.25);
        histogram.observe(2, 4.0);
        histogram.observe(2, 1.5);
        histogram.observe(9, 1.0); // out of range: only the sum sees it
        assert_eq!(histogram.load(), ([1, 0, 2], 6.75));
    }

    #[test]
    fn removing_a_key_drops_its_entry_and_recreating_starts_fresh() {
        let table = Table::<Presence>::default();
        table.get_or_create("b").add(0b11);
        table.get_or_create("a").add(0b1);
        assert_eq!(
            table.read().keys().cloned().collect::<Vec<_>>(),
            ["a", "b"],
            "walked in key order"
        );
        assert!(table.get("b").is_some_and(|p| p.has(1)));
        table.remove("b");
        assert!(table.get("b").is_none());
        assert!(!table.get_or_create("b").any(u64::MAX));
    }

    #[test]
    fn set_keys_keeps_the_wanted_entries_with_their_series() {
        let table = Table::<Presence>::default();
        table.get_or_create("kept").add(0b100);
        table.get_or_create("dropped").add(0b1);
        table.set_keys(["new", "kept"]);
        assert_eq!(
            table.read().keys().cloned().collect::<Vec<_>>(),
            ["kept", "new"]
        );
        assert!(
            table.get("kept").is_some_and(|p| p.has(2)),
            "kept as it was"
        );
    }
}
