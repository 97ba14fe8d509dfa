//! Delivery metrics (docs/reference.md, "Metrics"): pending/dead gauges kept in sync with the store, drops,
//! deliveries and replies by closed outcome, and the delivery duration histogram.
//!
//! The per-instance and per-platform families are atomics in `metrics::series` tables, written
//! by the hand-written encoder (`metrics::text`); the two store gauges stay prometheus-client
//! `Gauge`s (the store sets them).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::media::OUTCOMES as MEDIA_OUTCOMES;
use super::store::StoreGauges;
use crate::metrics::series::{AtomicHistogram, Presence, Table};
use crate::metrics::text::{Bounds, Descriptor, Encoder};
use crate::metrics::{Registry, Source};

/// Delivery duration buckets, 10 ms to 60 s.
const DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The `outcome` values of `wxauto_deliveries_total`.
pub(crate) const DELIVERY_OUTCOMES: [&str; 3] = ["success", "retry", "dead"];
/// The `outcome` values of `wxauto_replies_total`.
pub(crate) const REPLY_OUTCOMES: [&str; 2] = ["success", "error"];
/// Every `reason` of `wxauto_messages_dropped_total` (for removing an instance's series).
pub(crate) const DROP_REASONS: [&str; 5] = ["no_rule", "at_filter", "duplicate", "echo", "cap"];

static MESSAGES_DROPPED: Descriptor = Descriptor::counter(
    "wxauto_messages_dropped",
    "Messages not stored for delivery, by reason.",
);
static DELIVERIES: Descriptor = Descriptor::counter(
    "wxauto_deliveries",
    "Platform delivery attempts, by platform and outcome (success, retry, dead).",
);
static DELIVERY_DURATION: Descriptor = Descriptor::histogram(
    "wxauto_delivery_duration_seconds",
    "Duration of platform delivery attempts.",
    Some("seconds"),
);
static REPLIES: Descriptor = Descriptor::counter(
    "wxauto_replies",
    "Replies sent back to chats, by instance and outcome (success, error).",
);
static OLDEST_PENDING: Descriptor = Descriptor::gauge(
    "wxauto_messages_oldest_pending_age_seconds",
    "Age of the oldest message stored and not yet delivered (0 when none): how long \
     the most delayed chat has waited.",
    Some("seconds"),
);
static MEDIA_DOWNLOADS: Descriptor = Descriptor::counter(
    "wxauto_media_downloads",
    "Media file downloads, by instance and outcome (success, error, too_large, \
     disabled, unavailable).",
);

/// An instance's counters, one slot per series: drops by reason, replies and media downloads
/// by outcome. Its `Presence` bit is the slot.
const DROPPED: usize = 0;
const REPLIED: usize = DROPPED + DROP_REASONS.len();
const MEDIA: usize = REPLIED + REPLY_OUTCOMES.len();
const SLOTS: usize = MEDIA + MEDIA_OUTCOMES.len();
/// Every series of an instance (what `learn_instance` creates at 0).
const ALL_SLOTS: u64 = (1 << SLOTS) - 1;

#[derive(Debug)]
struct InstanceSeries {
    present: Presence,
    counters: [AtomicU64; SLOTS],
}

impl Default for InstanceSeries {
    fn default() -> Self {
        Self {
            present: Presence::default(),
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A configured platform's series; all exist while the platform does.
#[derive(Debug)]
struct PlatformSeries {
    deliveries: [AtomicU64; DELIVERY_OUTCOMES.len()],
    duration: AtomicHistogram<{ DURATION_BUCKETS.len() + 1 }>,
}

impl Default for PlatformSeries {
    fn default() -> Self {
        Self {
            deliveries: std::array::from_fn(|_| AtomicU64::new(0)),
            duration: AtomicHistogram::default(),
        }
    }
}

/// The tables behind `DeliveryMetrics` and its source.
#[derive(Debug)]
struct Shared {
    instances: Table<InstanceSeries>,
    /// Exactly the configured platforms (`set_platforms`).
    platforms: Table<PlatformSeries>,
    bounds: Bounds,
    /// `StoreGauges::oldest_open_ms`.
    oldest_open_ms: Arc<AtomicI64>,
}

/// The delivery metric group.
#[derive(Debug)]
pub(crate) struct DeliveryMetrics {
    pub gauges: StoreGauges,
    shared: Arc<Shared>,
}

// === impl DeliveryMetrics ===

impl DeliveryMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let gauges = StoreGauges::default();
        registry.register(
            "wxauto_messages_pending",
            "Messages stored and not yet delivered (waiting, retrying or in flight)",
            gauges.pending.clone(),
        );
        registry.register(
            "wxauto_messages_dead",
            "Messages that exhausted their delivery attempts or hit a permanent error",
            gauges.dead.clone(),
        );
        let shared = Arc::new(Shared {
            instances: Table::default(),
            platforms: Table::default(),
            bounds: Bounds::new(&DURATION_BUCKETS),
            oldest_open_ms: Arc::clone(&gauges.oldest_open_ms),
        });
        registry.register_source(Box::new(DeliveryFamilies(Arc::clone(&shared))));
        Self { gauges, shared }
    }

    /// Makes the series of these platforms exist (at 0) and drops those of any other.
    pub(crate) fn set_platforms<'a>(&self, ids: impl Iterator<Item = &'a str>) {
        self.shared.platforms.set_keys(ids);
    }

    /// Initialises an instance's reply, drop and media series (at 0).
    pub(crate) fn learn_instance(&self, instance_id: &str) {
        self.shared
            .instances
            .get_or_create(instance_id)
            .present
            .add(ALL_SLOTS);
    }

    /// Removes every series of an instance.
    pub(crate) fn remove_instance(&self, instance_id: &str) {
        self.shared.instances.remove(instance_id);
    }

    /// Adds `n` to the series in `slot`, creating it (alone) if it is missing.
    fn count(&self, instance_id: &str, slot: Option<usize>, n: u64) {
        let Some(slot) = slot else {
            debug_assert!(false, "a label value outside its closed set");
            return;
        };
        let series = self.shared.instances.get_or_create(instance_id);
        series.present.add(1 << slot);
        series.counters[slot].fetch_add(n, Ordering::Relaxed);
    }

    /// Counts one media download by outcome.
    pub(crate) fn media_download(&self, instance_id: &str, outcome: &'static str) {
        self.learn_instance(instance_id);
        let slot = MEDIA_OUTCOMES.iter().position(|o| *o == outcome);
        self.count(instance_id, slot.map(|i| MEDIA + i), 1);
    }

    pub(crate) fn dropped(&self, instance_id: &str, reason: &'static str, n: u64) {
        let slot = DROP_REASONS.iter().position(|r| *r == reason);
        self.count(instance_id, slot.map(|i| DROPPED + i), n);
    }

    /// Counts a platform attempt; not for a platform a reload removed (its series are gone
    /// and must not come back).
    pub(crate) fn delivery(&self, platform: &str, outcome: &'static str) {
        let Some(series) = self.shared.platforms.get(platform) else {
            return;
        };
        if let Some(i) = DELIVERY_OUTCOMES.iter().position(|o| *o == outcome) {
            series.deliveries[i].fetch_add(1, Ordering::Relaxed);
        } else {
            debug_assert!(false, "unknown delivery outcome {outcome}");
        }
    }

    pub(crate) fn observe_duration(&self, platform: &str, seconds: f64) {
        if let Some(series) = self.shared.platforms.get(platform) {
            series
                .duration
                .observe(self.shared.bounds.bucket(seconds), seconds);
        }
    }

    pub(crate) fn reply(&self, instance_id: &str, outcome: &'static str) {
        self.learn_instance(instance_id);
        let slot = REPLY_OUTCOMES.iter().position(|o| *o == outcome);
        self.count(instance_id, slot.map(|i| REPLIED + i), 1);
    }
}

/// The hand-written delivery families, per instance and per platform in key order.
#[derive(Debug)]
struct DeliveryFamilies(Arc<Shared>);

impl DeliveryFamilies {
    /// One counter family over the instance slots `first..first + values.len()`.
    fn instance_family(
        &self,
        encoder: &mut Encoder<'_>,
        family: &'static Descriptor,
        label: &str,
        values: &[&str],
        first: usize,
    ) {
        encoder.family(family);
        for (id, series) in self.0.instances.read().iter() {
            for (i, value) in values.iter().copied().enumerate() {
                let slot = first + i;
                if series.present.has(slot as u32) {
                    encoder.counter(
                        &[("instance_id", id.as_str()), (label, value)],
                        series.counters[slot].load(Ordering::Relaxed),
                    );
                }
            }
        }
    }
}

impl Source for DeliveryFamilies {
    fn encode(&self, encoder: &mut Encoder<'_>) {
        self.instance_family(encoder, &MESSAGES_DROPPED, "reason", &DROP_REASONS, DROPPED);
        {
            let platforms = self.0.platforms.read();
            encoder.family(&DELIVERIES);
            for (id, series) in platforms.iter() {
                for (i, outcome) in DELIVERY_OUTCOMES.into_iter().enumerate() {
                    encoder.counter(
                        &[("platform", id.as_str()), ("outcome", outcome)],
                        series.deliveries[i].load(Ordering::Relaxed),
                    );
                }
            }
            encoder.family(&DELIVERY_DURATION);
            for (id, series) in platforms.iter() {
                let (buckets, sum) = series.duration.load();
                encoder.histogram(&[("platform", id.as_str())], &self.0.bounds, &buckets, sum);
            }
        }
        self.instance_family(encoder, &REPLIES, "outcome", &REPLY_OUTCOMES, REPLIED);
        // Computed at scrape time from the store's oldest open row, so a queue stuck without
        // writes still shows its age growing.
        let created_ms = self.0.oldest_open_ms.load(Ordering::Relaxed);
        let age = if created_ms > 0 {
            (super::store::now_ms() - created_ms).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        encoder.family(&OLDEST_PENDING);
        encoder.gauge(&[], age);
        self.instance_family(encoder, &MEDIA_DOWNLOADS, "outcome", &MEDIA_OUTCOMES, MEDIA);
    }
}

#[cfg(test)]
mod tests;
