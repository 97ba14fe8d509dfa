//! The hand-written delivery families against prometheus-client's encoding of the same
//! events (the old implementation, kept here as the oracle).

use super::*;
use crate::metrics::tests::assert_same_exposition;

/// The group as it was on prometheus-client alone: the oracle.
mod reference {
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::{Arc, Mutex};

    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
    use prometheus_client::metrics::MetricType;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::ConstGauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::{Registry, Unit};

    use super::super::{DELIVERY_OUTCOMES, DROP_REASONS, DURATION_BUCKETS, REPLY_OUTCOMES};
    use crate::delivery::media::OUTCOMES as MEDIA_OUTCOMES;
    use crate::delivery::store::StoreGauges;

    /// Counters are registered without `_total`: the encoder appends it.
    const MESSAGES_PENDING: &str = "wxauto_messages_pending";
    const MESSAGES_DEAD: &str = "wxauto_messages_dead";
    const MESSAGES_DROPPED: &str = "wxauto_messages_dropped";
    const DELIVERIES: &str = "wxauto_deliveries";
    /// Registered with `Unit::Seconds`, which appends `_seconds`.
    const DELIVERY_DURATION: &str = "wxauto_delivery_duration";
    const REPLIES: &str = "wxauto_replies";
    const MEDIA_DOWNLOADS: &str = "wxauto_media_downloads";

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct DroppedLabels {
        pub instance_id: String,
        pub reason: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct DeliveryLabels {
        pub platform: String,
        pub outcome: &'static str,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct PlatformLabels {
        pub platform: String,
    }

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ReplyLabels {
        pub instance_id: String,
        pub outcome: &'static str,
    }

    /// The label set of `wxauto_media_downloads_total` (same shape as the replies').
    type MediaLabels = ReplyLabels;

    type HistogramFamily = Family<PlatformLabels, Histogram, fn() -> Histogram>;

    /// The delivery metric group.
    #[derive(Debug)]
    pub struct Reference {
        pub gauges: StoreGauges,
        dropped: Family<DroppedLabels, Counter>,
        deliveries: Family<DeliveryLabels, Counter>,
        duration: HistogramFamily,
        replies: Family<ReplyLabels, Counter>,
        media: Family<MediaLabels, Counter>,
        /// Instances whose reply series are initialised.
        instances: Mutex<HashSet<String>>,
        /// Platforms whose series are initialised.
        platforms: Mutex<HashSet<String>>,
    }

    fn new_histogram() -> Histogram {
        Histogram::new(DURATION_BUCKETS)
    }

    // === impl Reference ===

    impl Reference {
        pub fn register(registry: &mut Registry) -> Self {
            let metrics = Self {
                gauges: StoreGauges::default(),
                dropped: Family::default(),
                deliveries: Family::default(),
                duration: Family::new_with_constructor(new_histogram as fn() -> Histogram),
                replies: Family::default(),
                media: Family::default(),
                instances: Mutex::new(HashSet::new()),
                platforms: Mutex::new(HashSet::new()),
            };
            registry.register(
                MESSAGES_PENDING,
                "Messages stored and not yet delivered (waiting, retrying or in flight)",
                metrics.gauges.pending.clone(),
            );
            registry.register(
                MESSAGES_DEAD,
                "Messages that exhausted their delivery attempts or hit a permanent error",
                metrics.gauges.dead.clone(),
            );
            registry.register(
                MESSAGES_DROPPED,
                "Messages not stored for delivery, by reason",
                metrics.dropped.clone(),
            );
            registry.register(
                DELIVERIES,
                "Platform delivery attempts, by platform and outcome (success, retry, dead)",
                metrics.deliveries.clone(),
            );
            registry.register_with_unit(
                DELIVERY_DURATION,
                "Duration of platform delivery attempts",
                Unit::Seconds,
                metrics.duration.clone(),
            );
            registry.register(
                REPLIES,
                "Replies sent back to chats, by instance and outcome (success, error)",
                metrics.replies.clone(),
            );
            registry.register_collector(Box::new(OldestPending(Arc::clone(
                &metrics.gauges.oldest_open_ms,
            ))));
            registry.register(
                MEDIA_DOWNLOADS,
                "Media file downloads, by instance and outcome (success, error, too_large, \
                 disabled, unavailable)",
                metrics.media.clone(),
            );
            metrics
        }

        /// Makes the series of these platforms exist (at 0) and drops those of any other.
        pub fn set_platforms<'a>(&self, ids: impl Iterator<Item = &'a str>) {
            let wanted: HashSet<String> = ids.map(str::to_owned).collect();
            let Ok(mut known) = self.platforms.lock() else {
                return;
            };
            for gone in known.difference(&wanted) {
                for outcome in DELIVERY_OUTCOMES {
                    self.deliveries.remove(&DeliveryLabels {
                        platform: gone.clone(),
                        outcome,
                    });
                }
                self.duration.remove(&PlatformLabels {
                    platform: gone.clone(),
                });
            }
            for id in &wanted {
                for outcome in DELIVERY_OUTCOMES {
                    self.deliveries.get_or_create_owned(&DeliveryLabels {
                        platform: id.clone(),
                        outcome,
                    });
                }
                self.duration.get_or_create_owned(&PlatformLabels {
                    platform: id.clone(),
                });
            }
            *known = wanted;
        }

        /// Initialises an instance's reply and drop series (at 0) the first time it is seen.
        pub fn learn_instance(&self, instance_id: &str) {
            let Ok(mut known) = self.instances.lock() else {
                return;
            };
            if known.insert(instance_id.to_owned()) {
                for outcome in REPLY_OUTCOMES {
                    self.replies.get_or_create_owned(&ReplyLabels {
                        instance_id: instance_id.to_owned(),
                        outcome,
                    });
                }
                for reason in DROP_REASONS {
                    self.dropped.get_or_create_owned(&DroppedLabels {
                        instance_id: instance_id.to_owned(),
                        reason,
                    });
                }
                for outcome in MEDIA_OUTCOMES {
                    self.media.get_or_create_owned(&MediaLabels {
                        instance_id: instance_id.to_owned(),
                        outcome,
                    });
                }
            }
        }

        /// Removes every series of an instance.
        pub fn remove_instance(&self, instance_id: &str) {
            if let Ok(mut known) = self.instances.lock() {
                known.remove(instance_id);
            }
            for outcome in REPLY_OUTCOMES {
                self.replies.remove(&ReplyLabels {
                    instance_id: instance_id.to_owned(),
                    outcome,
                });
            }
            for reason in DROP_REASONS {
                self.dropped.remove(&DroppedLabels {
                    instance_id: instance_id.to_owned(),
                    reason,
                });
            }
            for outcome in MEDIA_OUTCOMES {
                self.media.remove(&MediaLabels {
                    instance_id: instance_id.to_owned(),
                    outcome,
                });
            }
        }

        /// Counts one media download by outcome.
        pub fn media_download(&self, instance_id: &str, outcome: &'static str) {
            self.learn_instance(instance_id);
            self.media
                .get_or_create_owned(&MediaLabels {
                    instance_id: instance_id.to_owned(),
                    outcome,
                })
                .inc();
        }

        pub fn dropped(&self, instance_id: &str, reason: &'static str, n: u64) {
            self.dropped
                .get_or_create_owned(&DroppedLabels {
                    instance_id: instance_id.to_owned(),
                    reason,
                })
                .inc_by(n);
        }

        /// Counts a platform attempt; not for a platform a reload removed (its series are gone
        /// and must not come back).
        pub fn delivery(&self, platform: &str, outcome: &'static str) {
            if !self.knows_platform(platform) {
                return;
            }
            self.deliveries
                .get_or_create_owned(&DeliveryLabels {
                    platform: platform.to_owned(),
                    outcome,
                })
                .inc();
        }

        pub fn observe_duration(&self, platform: &str, seconds: f64) {
            if !self.knows_platform(platform) {
                return;
            }
            self.duration
                .get_or_create_owned(&PlatformLabels {
                    platform: platform.to_owned(),
                })
                .observe(seconds);
        }

        fn knows_platform(&self, platform: &str) -> bool {
            self.platforms
                .lock()
                .is_ok_and(|known| known.contains(platform))
        }

        pub fn reply(&self, instance_id: &str, outcome: &'static str) {
            self.learn_instance(instance_id);
            self.replies
                .get_or_create_owned(&ReplyLabels {
                    instance_id: instance_id.to_owned(),
                    outcome,
                })
                .inc();
        }
    }

    /// `wxauto_messages_oldest_pending_age_seconds`, computed at scrape time from the store's
    /// oldest open row, so a queue stuck without writes still shows its age growing.
    #[derive(Debug)]
    struct OldestPending(Arc<AtomicI64>);

    impl Collector for OldestPending {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            let created_ms = self.0.load(Ordering::Relaxed);
            let age = if created_ms > 0 {
                (crate::delivery::store::now_ms() - created_ms).max(0) as f64 / 1000.0
            } else {
                0.0
            };
            ConstGauge::new(age).encode(encoder.encode_descriptor(
                "wxauto_messages_oldest_pending_age",
                "Age of the oldest message stored and not yet delivered (0 when none): how long \
                 the most delayed chat has waited.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?)
        }
    }
}

const NASTY: &str = "p-\"q\"\\back\nline é";

#[test]
fn the_hand_written_families_expose_what_prometheus_client_exposed() {
    let mut registry = Registry::default();
    let ours = DeliveryMetrics::register(&mut registry);
    let mut their_registry = prometheus_client::registry::Registry::default();
    let theirs = reference::Reference::register(&mut their_registry);
    let both = |f: &dyn Fn(&DeliveryMetrics), g: &dyn Fn(&reference::Reference)| {
        f(&ours);
        g(&theirs);
    };
    both(
        &|m| m.set_platforms(["hook", NASTY, "gone"].into_iter()),
        &|m| m.set_platforms(["hook", NASTY, "gone"].into_iter()),
    );
    for (platform, outcome, seconds) in [
        ("hook", "success", 0.01),
        ("hook", "retry", 0.0101),
        (NASTY, "dead", 1.0),
        (NASTY, "success", 75.0),
        ("gone", "success", 0.2),
        ("unknown", "success", 0.2),
    ] {
        both(
            &|m| {
                m.delivery(platform, outcome);
                m.observe_duration(platform, seconds);
            },
            &|m| {
                m.delivery(platform, outcome);
                m.observe_duration(platform, seconds);
            },
        );
    }
    // A reload drops a platform; later attempts for it are not counted.
    both(
        &|m| m.set_platforms(["hook", NASTY, "new"].into_iter()),
        &|m| m.set_platforms(["hook", NASTY, "new"].into_iter()),
    );
    both(&|m| m.delivery("gone", "dead"), &|m| {
        m.delivery("gone", "dead")
    });
    both(&|m| m.learn_instance("wx1"), &|m| m.learn_instance("wx1"));
    both(&|m| m.dropped("wx1", "echo", 3), &|m| {
        m.dropped("wx1", "echo", 3)
    });
    // Never learned: only the series counted appear.
    both(&|m| m.dropped("wx2", "cap", 1), &|m| {
        m.dropped("wx2", "cap", 1)
    });
    both(&|m| m.reply("wx3", "error"), &|m| m.reply("wx3", "error"));
    both(&|m| m.media_download("wx1", "too_large"), &|m| {
        m.media_download("wx1", "too_large")
    });
    both(&|m| m.learn_instance("wx-gone"), &|m| {
        m.learn_instance("wx-gone")
    });
    both(&|m| m.remove_instance("wx-gone"), &|m| {
        m.remove_instance("wx-gone")
    });
    both(&|m| m.learn_instance("wx-late"), &|m| {
        m.learn_instance("wx-late")
    });
    both(&|m| m.remove_instance("wx-late"), &|m| {
        m.remove_instance("wx-late")
    });
    // A drop counted after the instance was removed brings back that series only.
    both(&|m| m.dropped("wx-late", "duplicate", 2), &|m| {
        m.dropped("wx-late", "duplicate", 2)
    });
    ours.gauges.pending.set(4);
    theirs.gauges.pending.set(4);

    let (text, _) = crate::metrics::encode(&registry, false);
    let mut reference = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut reference, &their_registry).unwrap();
    assert_same_exposition(&text, &reference, false);
    let (openmetrics, _) = crate::metrics::encode(&registry, true);
    let mut reference = String::new();
    prometheus_client::encoding::text::encode(&mut reference, &their_registry).unwrap();
    assert_same_exposition(&openmetrics, &reference, true);
    assert!(
        !text.contains("wx-gone") && !text.contains("\"gone\""),
        "{text}"
    );
}

#[test]
fn the_oldest_pending_age_grows_from_the_stores_oldest_row() {
    let mut registry = Registry::default();
    let metrics = DeliveryMetrics::register(&mut registry);
    let (text, _) = crate::metrics::encode(&registry, false);
    assert!(
        text.contains("\nwxauto_messages_oldest_pending_age_seconds 0.0\n"),
        "{text}"
    );
    metrics.gauges.oldest_open_ms.store(
        crate::delivery::store::now_ms() - 90_000,
        std::sync::atomic::Ordering::Relaxed,
    );
    let (text, _) = crate::metrics::encode(&registry, false);
    let age: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("wxauto_messages_oldest_pending_age_seconds "))
        .and_then(|value| value.parse().ok())
        .expect("the age gauge");
    assert!(age >= 90.0, "{age}");
}
