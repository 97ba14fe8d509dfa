//! The actor against a real simulator on loopback, in paused time: how long it waits between
//! probes of a down instance, and that the wait starts over after a recovery.
//!
//! Paused time jumps only while every task is idle, so the loopback calls complete at one
//! instant; the request timeout (10 s) is longer than any step of the backoff, so it never
//! fires on its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{ActorSettings, Held, InstanceActor, InstanceCommand};
use crate::config::{BackoffConfig, InstanceConfig, KeySource, ListenerConfig};
use crate::message::{BoxFuture, InboundMessage, MessageSink, SinkError};
use crate::metrics::{Metrics, process::ProcessCollector};
use crate::monitor::Monitor;
use crate::secret::Secret;
use crate::simulator::{ApiGeneration, Fault, SimConfig, Simulator};

const KEY: &str = "paused-key-0123456789";
/// How finely the tests sample paused time.
const STEP: Duration = Duration::from_millis(5);
const SECOND: Duration = Duration::from_secs(1);
const HEALTH: &str = "GET /api/health";
const POLL: &str = "GET /api/message/get-next-new";

/// A sink that takes everything (these tests send no messages) and keeps the epochs of the
/// upstream sessions the actor saved.
#[derive(Default)]
struct Accepting {
    epochs: std::sync::Mutex<Vec<u32>>,
}

impl MessageSink for Accepting {
    fn accept(&self, _: Vec<InboundMessage>) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn save_session(
        &self,
        _instance_id: &str,
        session: crate::message::UpstreamSession,
    ) -> BoxFuture<'_, Result<(), SinkError>> {
        self.epochs.lock().expect("epochs").push(session.epoch);
        Box::pin(async { Ok(()) })
    }
}

/// How a test's actor and simulator start.
struct Options {
    backoff: BackoffConfig,
    fault: Fault,
    /// The key the actor sends (the simulator accepts `KEY` only).
    client_key: &'static str,
    fixed_chats: Vec<String>,
    health_check_interval: Duration,
    listener_timeout: Duration,
    forget_inactive_after: Duration,
    /// WeChat initialised before the actor starts (with the right key), so that
    /// `/api/health` says connected without the actor calling anything that needs a key.
    initialized: bool,
}

impl Options {
    /// A healthy simulator, a backoff from 1 s to 8 s.
    fn healthy() -> Self {
        Self::new(
            BackoffConfig {
                initial: SECOND,
                max: 8 * SECOND,
            },
            Fault::None,
        )
    }

    fn new(backoff: BackoffConfig, fault: Fault) -> Self {
        Self {
            backoff,
            fault,
            client_key: KEY,
            fixed_chats: Vec::new(),
            health_check_interval: 30 * SECOND,
            listener_timeout: 3600 * SECOND,
            forget_inactive_after: 3600 * SECOND,
            initialized: false,
        }
    }
}

/// A running actor and its simulator. The senders are kept: dropping the command sender
/// would stop the actor.
struct Running {
    sim: Simulator,
    monitor: Arc<Monitor>,
    sink: Arc<Accepting>,
    cancel: CancellationToken,
    actor: tokio::task::JoinHandle<()>,
    _commands: mpsc::Sender<InstanceCommand>,
    _settings: watch::Sender<ActorSettings>,
}

impl Running {
    async fn start(backoff: BackoffConfig, fault: Fault) -> Self {
        Self::start_with(Options::new(backoff, fault)).await
    }

    async fn start_with(options: Options) -> Self {
        let Options {
            backoff,
            fault,
            client_key,
            fixed_chats,
            health_check_interval,
            listener_timeout,
            forget_inactive_after,
            initialized,
        } = options;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let sim = Simulator::new(SimConfig {
            api_key: KEY.to_owned(),
            name: "paused".to_owned(),
            flaky: false,
            api_generation: ApiGeneration::default(),
            history: true,
            read_latency: Duration::ZERO,
        });
        sim.set_fault(fault);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cancel = CancellationToken::new();
        tokio::spawn(sim.clone().serve(listener, cancel.clone()));
        if initialized {
            let answer = reqwest::Client::new()
                .post(format!("http://{addr}/api/wechat/initialize"))
                .header("X-API-Key", KEY)
                .send()
                .await
                .expect("initialize");
            assert!(answer.status().is_success(), "{}", answer.status());
        }
        let instance = InstanceConfig {
            id: "wx-paused".to_owned(),
            base_url: format!("http://{addr}"),
            api_key: Secret::new(client_key),
            api_key_source: KeySource::Inline,
            enabled: true,
        };
        let (settings, updates) = watch::channel(ActorSettings {
            listener: ListenerConfig {
                poll_interval: SECOND / 10,
                health_check_interval,
                listener_timeout,
                forget_inactive_after,
                max_listeners_per_instance: 10,
                request_timeout: 10 * SECOND,
                backoff,
            },
            fixed_chats,
        });
        let metrics = Metrics::register(&mut crate::metrics::Registry::default());
        let monitor = Arc::new(Monitor::new(
            metrics.clone(),
            Arc::new(ProcessCollector::new()),
            300 * SECOND,
        ));
        monitor.register_instance("wx-paused", true);
        let (commands, receiver) = mpsc::channel(4);
        let sink = Arc::new(Accepting::default());
        let actor = InstanceActor::new(
            instance,
            updates,
            metrics,
            Arc::clone(&monitor),
            Arc::clone(&sink) as Arc<dyn MessageSink>,
            receiver,
            Vec::new(),
            Held::default(),
            false,
        )
        .expect("client");
        let actor = tokio::spawn(actor.run(cancel.clone()));
        Self {
            sim,
            monitor,
            sink,
            cancel,
            actor,
            _commands: commands,
            _settings: settings,
        }
    }

    fn calls(&self, endpoint: &str) -> u64 {
        self.sim
            .snapshot()
            .calls
            .get(endpoint)
            .copied()
            .unwrap_or(0)
    }

    /// Steps paused time until `endpoint` has been called `count` times in all; returns when
    /// (to within one step) each call after the ones already seen arrived.
    async fn wait_calls(&self, endpoint: &str, count: u64, limit: Duration) -> Vec<Instant> {
        let deadline = Instant::now() + limit;
        let mut seen = self.calls(endpoint);
        let mut times = Vec::new();
        while seen < count {
            assert!(
                Instant::now() < deadline,
                "{endpoint}: {seen} of {count} calls within {limit:?}"
            );
            tokio::time::sleep(STEP).await;
            let now = self.calls(endpoint);
            for _ in seen..now {
                times.push(Instant::now());
            }
            seen = now;
        }
        times
    }

    /// The error texts recorded for the instance, oldest first.
    fn errors(&self) -> Vec<String> {
        self.monitor
            .recent_errors(100)
            .into_iter()
            .map(|record| record.error_message)
            .collect()
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.actor.await.expect("the actor ends cleanly");
    }
}

/// `gap` fits a backoff step with cap `cap` (equal jitter: `[cap / 2, cap]`), allowing one
/// sampling step either way.
fn assert_step(gap: Duration, cap: Duration, what: &str) {
    assert!(
        gap + STEP >= cap / 2 && gap <= cap + STEP,
        "{what}: {gap:?} is outside [{:?}, {cap:?}]",
        cap / 2
    );
}

#[tokio::test(start_paused = true)]
async fn a_down_instance_is_probed_after_a_doubling_capped_backoff() {
    let running = Running::start(
        BackoffConfig {
            initial: SECOND,
            max: 4 * SECOND,
        },
        Fault::Http500,
    )
    .await;
    // One probe at the start, then one per backoff step: 1, 2, 4, 4, 4 s caps.
    let times = running.wait_calls(HEALTH, 6, 30 * SECOND).await;
    for (n, (pair, cap)) in times.windows(2).zip([1, 2, 4, 4, 4]).enumerate() {
        assert_step(pair[1] - pair[0], cap * SECOND, &format!("gap {}", n + 1));
    }
    assert_eq!(running.calls(POLL), 0, "a down instance is not polled");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_backoff_starts_over_after_a_recovery() {
    let running = Running::start(
        BackoffConfig {
            initial: SECOND,
            max: 4 * SECOND,
        },
        Fault::Http500,
    )
    .await;
    // Down long enough to reach the cap.
    running.wait_calls(HEALTH, 5, 30 * SECOND).await;
    running.sim.set_fault(Fault::None);
    // Up: polled every 100 ms (the health check is 30 s away).
    running.wait_calls(POLL, 3, 10 * SECOND).await;
    let probes = running.calls(HEALTH);
    running.sim.set_fault(Fault::Http500);
    let failed = Instant::now();
    // The next poll fails (within 100 ms) and the instance is down again: its first probe
    // comes after the first backoff step, not the 4 s cap the last outage reached.
    let times = running.wait_calls(HEALTH, probes + 2, 10 * SECOND).await;
    let first = times[0] - failed;
    assert!(
        first + STEP >= SECOND / 2 && first <= SECOND + SECOND / 10 + STEP,
        "first probe {first:?} after the new outage: the backoff did not start over"
    );
    assert_step(times[1] - times[0], 2 * SECOND, "second probe");
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_up_instance_is_polled_every_poll_interval_and_probed_every_health_check_interval() {
    let running = Running::start(
        BackoffConfig {
            initial: SECOND,
            max: 4 * SECOND,
        },
        Fault::None,
    )
    .await;
    // The first probe initialises WeChat (health, initialize, health) and passes; polls begin.
    let passed = running.wait_calls(HEALTH, 2, SECOND).await[1];
    let polls = running.wait_calls(POLL, 11, 10 * SECOND).await;
    for (n, pair) in polls.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        assert!(
            gap + STEP >= SECOND / 10 && gap <= SECOND / 10 + STEP,
            "poll {}: {gap:?} after the previous one, not the 100 ms poll interval",
            n + 2
        );
    }
    let next = running.wait_calls(HEALTH, 3, 60 * SECOND).await;
    let gap = next[0] - passed;
    assert!(
        gap + STEP >= 30 * SECOND && gap <= 30 * SECOND + STEP,
        "the next probe came {gap:?} later, not at the 30 s health check"
    );
    running.stop().await;
}

/// A rejected key: `/api/health` needs none, so every probe passes and every poll fails with
/// 401. Before, each passing probe ended the outage: an error, a new epoch and a backoff back
/// at its first step on every cycle (about one a second). Now the outage lasts until a poll
/// succeeds: one error, one new epoch, and probes that back off as for a dead instance.
#[tokio::test(start_paused = true)]
async fn a_rejected_key_is_one_outage_that_backs_off() {
    let running = Running::start_with(Options {
        client_key: "wrong-key-0123456789",
        initialized: true,
        ..Options::healthy()
    })
    .await;
    let times = running.wait_calls(HEALTH, 6, 60 * SECOND).await;
    for (n, (pair, cap)) in times.windows(2).zip([1, 2, 4, 8]).enumerate() {
        assert_step(pair[1] - pair[0], cap * SECOND, &format!("gap {}", n + 1));
    }
    // Every probe passed and was followed by one failing poll.
    let polls = running.calls(POLL);
    assert!((5..=6).contains(&polls), "{polls} polls for 6 probes");
    let errors = running.errors();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("API key rejected"), "{}", errors[0]);
    let epochs = running.sink.epochs.lock().expect("epochs").clone();
    assert!(
        epochs.iter().all(|epoch| *epoch <= 1),
        "one outage, one new epoch at most: {epochs:?}"
    );
    running.stop().await;
}

/// A fixed chat the account does not have: the server refuses its `listen/add` with HTTP 500
/// and code 3001. Before, that took the whole instance down at every recovery, so no other
/// chat was ever polled. Now it is one error naming the chat; the instance is polled; the chat
/// is tried again at each passing probe and listened once the account has it.
#[tokio::test(start_paused = true)]
async fn a_chat_the_account_lacks_does_not_stop_the_instance() {
    let running = Running::start_with(Options {
        fixed_chats: vec!["ghost".to_owned(), "real".to_owned()],
        health_check_interval: 5 * SECOND,
        ..Options::healthy()
    })
    .await;
    running.sim.set_missing_chats(&["ghost"]);
    running.wait_calls(POLL, 20, 10 * SECOND).await;
    assert_eq!(running.sim.snapshot().listened, ["real"]);
    // Through two more passing probes: tried again, quietly.
    let probes = running.calls(HEALTH);
    running.wait_calls(HEALTH, probes + 2, 20 * SECOND).await;
    let errors = running.errors();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(
        errors[0].contains("code 3001") && errors[0].contains("(chat ghost)"),
        "{}",
        errors[0]
    );
    // `real` once; `ghost` at the start and at each of the two probes since.
    let adds = running.calls("POST /api/message/listen/add");
    assert!(
        adds >= 4,
        "ghost was not tried again: {adds} listen/add calls"
    );
    // The account joins the chat: the next probe listens to it.
    running.sim.set_missing_chats(&[]);
    let probes = running.calls(HEALTH);
    running.wait_calls(HEALTH, probes + 1, 10 * SECOND).await;
    tokio::time::sleep(SECOND).await;
    assert_eq!(running.sim.snapshot().listened, ["ghost", "real"]);
    assert_eq!(running.errors().len(), 1);
    running.stop().await;
}

/// A chat that went quiet: inactive (removed upstream) after `listener_timeout`, still shown as
/// inactive, then forgotten `forget_inactive_after` later, so the health score's `listeners`
/// part, which counts inactive chats, does not keep its deduction for chats that simply went
/// quiet. A later message brings it back as a new chat.
#[tokio::test(start_paused = true)]
async fn a_quiet_chat_times_out_and_is_forgotten_later() {
    let running = Running::start_with(Options {
        listener_timeout: 10 * SECOND,
        forget_inactive_after: 20 * SECOND,
        ..Options::healthy()
    })
    .await;
    let chats = |running: &Running| running.monitor.chats_of("wx-paused");
    let deduction = |running: &Running| running.monitor.snapshot().health.deductions.listeners;
    running.sim.inject("quiet", "alice", "hello");
    let listened = Instant::now();
    running
        .wait_calls("POST /api/message/listen/add", 1, 5 * SECOND)
        .await;
    assert_eq!(running.sim.snapshot().listened, ["quiet"]);
    // Timed out: removed upstream, still in the table as inactive (a deduction of 20: one chat,
    // inactive).
    running
        .wait_calls("POST /api/message/listen/remove", 1, 20 * SECOND)
        .await;
    let removed = Instant::now() - listened;
    assert!(removed >= 10 * SECOND, "removed after {removed:?}");
    tokio::time::sleep(SECOND).await;
    let now = chats(&running);
    assert_eq!(now.len(), 1);
    assert!(!now[0].1.active);
    assert_eq!(deduction(&running), 20);
    // Forgotten 20 s after it became inactive, not before.
    tokio::time::sleep(15 * SECOND).await;
    assert_eq!(chats(&running).len(), 1, "forgotten too early");
    tokio::time::sleep(5 * SECOND).await;
    assert!(chats(&running).is_empty(), "{:?}", chats(&running));
    assert_eq!(deduction(&running), 0);
    // It writes again: a new chat, listened again.
    running.sim.inject("quiet", "alice", "back");
    running
        .wait_calls("POST /api/message/listen/add", 2, 5 * SECOND)
        .await;
    tokio::time::sleep(SECOND).await;
    assert!(
        chats(&running)
            .first()
            .is_some_and(|(name, chat)| name == "quiet" && chat.active)
    );
    running.stop().await;
}
