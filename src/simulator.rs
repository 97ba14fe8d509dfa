//! A stateful fake of one WXAUTO-HTTP-API server, for `simulate`, `demo` and integration tests.
//!
//! wxauto API (envelope `{code, message, data}`, `X-API-Key` on all but health; see `api`):
//! - `GET  /api/health`
//! - `POST /api/wechat/initialize`
//! - `GET  /api/message/get-next-new`
//! - `POST /api/message/listen/add`, `POST /api/message/listen/remove`, `GET /api/message/listen/get`
//! - `POST /api/chat-window/message/send`, `POST /api/chat-window/message/send-typing`
//! - `POST /api/file/download` (the bytes of a file added with `add_file`, else code 3003)
//!
//! Control surface (no auth, never faulted; see `control`):
//! - `POST /_sim/inject`, `POST /_sim/wechat`, `POST /_sim/fault`, `POST /_sim/reset`, `GET /_sim/state`
//! - `POST /_sim/media` (a media message, optionally with its file's bytes)

mod api;
mod control;
pub mod demo;
mod state;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::state::State;

/// How long `serve` keeps draining connections after cancellation before it gives up on them.
/// A `Slow` fault or a client that never closes its connection must not block shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The shortest chatter period; `tokio::time::interval` panics on zero.
const MIN_CHATTER_PERIOD: Duration = Duration::from_millis(10);

/// Demo chats: (chat name, possible senders). A private chat's only sender is the chat itself
/// (or has the chat's name as remark), which is how the sidecar tells private chats from groups.
const CHATTER_CHATS: &[(&str, &[&str])] = &[
    ("技术交流群", &["张三", "李四", "王五"]),
    ("张三", &["张三"]),
    ("客服咨询", &["客户A", "客户B"]),
    ("李四", &["李四"]),
];

/// Demo message texts.
const CHATTER_TEXTS: &[&str] = &[
    "你好",
    "在吗？",
    "今天的部署完成了吗",
    "@机器人 帮我查一下订单状态",
    "收到，谢谢",
    "下午三点开会",
    "这个问题怎么解决？",
    "👍",
];

/// How a `Simulator` is set up.
#[derive(Clone)]
pub struct SimConfig {
    /// The only key the `X-API-Key` header is accepted with.
    pub api_key: String,
    /// A label for logs and message ids (`sim-<name>-<n>`).
    pub name: String,
    /// When no fault is set, fail about 20% of API calls with HTTP 500 (for the demo).
    pub flaky: bool,
    /// Which body key `listen/add` and `listen/remove` read.
    pub api_generation: ApiGeneration,
    /// Serve `GET /api/chat/get-all-messages` (current servers do; some older ones do not).
    pub history: bool,
    /// How long the destructive reads (`get-next-new`, `listen/get`) take to answer *after*
    /// they took the messages, like a real server driving the WeChat UI: a client that dies
    /// meanwhile loses that answer.
    pub read_latency: Duration,
}

/// The two generations of the WXAUTO-HTTP-API server: before mid-2025 `listen/add` and
/// `listen/remove` read `{"who": ...}`, current ones `{"nickname": ...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiGeneration {
    /// The older body key.
    Who,
    /// The current body key.
    #[default]
    Nickname,
}

impl ApiGeneration {
    /// The body key this generation reads.
    pub fn key(self) -> &'static str {
        match self {
            Self::Who => "who",
            Self::Nickname => "nickname",
        }
    }
}

/// A failure mode applied to every wxauto API call, including `/api/health`.
///
/// A faulted call never reaches the handler, so it changes no state: a faulted
/// (destructive) `listen/get` loses no messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// HTTP 500 with the envelope `{code: 5000}`.
    Http500,
    /// HTTP 200, `Content-Type: application/json`, and a body that is not valid JSON
    /// (alternately an HTML fragment and a truncated envelope).
    Garbage,
    /// HTTP 200 with a JSON envelope whose fields have the wrong types.
    WrongTypes,
    /// Wait this long, then answer normally.
    Slow(Duration),
    /// Never answer (until the server shuts down); only the client's timeout ends the call.
    Hang,
}

/// A handle on one simulated wxauto instance. Clones share the same state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

/// What `Simulator::snapshot` and `GET /_sim/state` report.
#[derive(Debug, Clone, Serialize)]
pub struct SimSnapshot {
    /// Whether `/api/wechat/initialize` succeeded since WeChat last came online.
    pub initialized: bool,
    /// Whether WeChat is running and logged in.
    pub online: bool,
    /// Listened chats, sorted.
    pub listened: Vec<String>,
    /// Chat → unread messages waiting in the main window (chats with none are absent).
    pub pending_main: BTreeMap<String, usize>,
    /// Listened chat → messages waiting in its listen cache (chats with none are absent).
    pub pending_listen: BTreeMap<String, usize>,
    /// Every message accepted by the send endpoints, in order.
    pub sent: Vec<SentMessage>,
    /// Requests received per API endpoint (`"POST /api/message/listen/add"`), counted before
    /// auth and faults, so faulted and rejected calls count too.
    pub calls: BTreeMap<String, u64>,
    /// Every successful listen add/remove, in order.
    pub listen_log: Vec<ListenEvent>,
    /// Authenticated, unfaulted calls to `/api/wechat/initialize`, successful or not.
    pub initialize_calls: u64,
}

/// A message accepted by `/api/chat-window/message/send` or `/send-typing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentMessage {
    /// The chat it was sent to.
    pub who: String,
    /// The text, as the client sent it.
    pub message: String,
    /// Names to @-mention.
    pub at_list: Vec<String>,
    /// True when it came through `/send-typing`.
    pub typing: bool,
}

/// One successful listen add or remove.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenEvent {
    /// Add or remove.
    pub action: ListenAction,
    /// The chat.
    pub nickname: String,
}

/// The kind of a `ListenEvent`; serialised as `"add"` / `"remove"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenAction {
    /// `POST /api/message/listen/add` succeeded (also when the chat was already listened).
    Add,
    /// `POST /api/message/listen/remove` succeeded.
    Remove,
}

/// Shared by every clone of a `Simulator`.
struct Inner {
    config: SimConfig,
    /// Held only for short, synchronous sections, never across `.await`.
    state: Mutex<State>,
    /// Wakes requests stuck in `Fault::Hang` (or `Slow`) when a server shuts down, so the
    /// graceful drain does not wait for them.
    release: Notify,
    /// Files `POST /api/file/download` serves, by path; they survive `reset`, as files on
    /// disk survive a server restart.
    files: Mutex<HashMap<String, Vec<u8>>>,
}

// === impl SimConfig ===

impl Default for SimConfig {
    /// `test-key-2` is the key the real server falls back to when its config has none.
    fn default() -> Self {
        Self {
            api_key: "test-key-2".to_owned(),
            name: "sim".to_owned(),
            flaky: false,
            api_generation: ApiGeneration::Nickname,
            history: true,
            read_latency: Duration::ZERO,
        }
    }
}

// The key is only a test credential, but keep the habit of never printing keys.
impl fmt::Debug for SimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimConfig")
            .field("api_key", &"<redacted>")
            .field("name", &self.name)
            .field("flaky", &self.flaky)
            .field("api_generation", &self.api_generation)
            .field("history", &self.history)
            .field("read_latency", &self.read_latency)
            .finish()
    }
}

// === impl Fault ===

impl Fault {
    /// The control-surface name of this mode (`none`, `http500`, `garbage`, `wrong_types`,
    /// `slow`, `hang`).
    pub fn mode(&self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::Http500 => "http500",
            Fault::Garbage => "garbage",
            Fault::WrongTypes => "wrong_types",
            Fault::Slow(_) => "slow",
            Fault::Hang => "hang",
        }
    }
}

// === impl Simulator ===

impl Simulator {
    /// A simulator with WeChat online, not yet initialised, and nothing queued.
    pub fn new(config: SimConfig) -> Self {
        let state = State::new(&config.name);
        Self {
            inner: Arc::new(Inner {
                config,
                state: Mutex::new(state),
                release: Notify::new(),
                files: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The wxauto API plus the `/_sim/` control surface.
    pub fn router(&self) -> axum::Router {
        api::routes(self)
            .merge(axum::Router::new().nest("/_sim", control::routes()))
            .with_state(self.clone())
    }

    /// Serves `router()` on `listener` until `cancel` fires, then drains connections for at
    /// most a short grace period.
    pub async fn serve(
        self,
        listener: TcpListener,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        let name = self.inner.config.name.clone();
        info!(name = %name, %addr, "Simulator listening.");

        let inner = Arc::clone(&self.inner);
        let shutdown = {
            let cancel = cancel.clone();
            async move {
                cancel.cancelled().await;
                inner.release.notify_waiters();
            }
        };
        let server = axum::serve(listener, self.router()).with_graceful_shutdown(shutdown);
        let give_up = async {
            cancel.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };

        tokio::select! {
            res = server => {
                info!(name = %name, "Simulator stopped.");
                res
            }
            () = give_up => {
                warn!(name = %name, "Simulator stopped with connections still open.");
                Ok(())
            }
        }
    }

    /// Spawns a task that injects one random demo message every `every` (at least 10 ms)
    /// until `cancel` fires. About one in ten is a `type: "time"` separator, as in WeChat.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like `tokio::spawn`.
    pub fn spawn_chatter(&self, every: Duration, cancel: CancellationToken) {
        let sim = self.clone();
        let period = every.max(MIN_CHATTER_PERIOD);
        tokio::spawn(async move {
            let mut interval =
                tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            // A demo does not need to catch up on missed ticks; bursts would only look odd.
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    _ = interval.tick() => sim.chatter_once(),
                }
            }
            debug!(name = %sim.inner.config.name, "Chatter stopped.");
        });
    }

    /// Queues a normal text message (`type: "friend"`) from `sender` in `chat`.
    pub fn inject(&self, chat: &str, sender: &str, content: &str) {
        self.lock().inject_text(chat, sender, content);
    }

    /// Queues a raw message object as is; only a missing `id` is filled in.
    pub fn inject_message(&self, chat: &str, message: serde_json::Value) {
        self.lock().inject_raw(chat, message);
    }

    /// Makes `POST /api/file/download` serve `bytes` for `file_path`.
    pub fn add_file(&self, file_path: &str, bytes: Vec<u8>) {
        self.files().insert(file_path.to_owned(), bytes);
    }

    /// The bytes served for `file_path`, if any.
    pub fn file(&self, file_path: &str) -> Option<Vec<u8>> {
        self.files().get(file_path).cloned()
    }

    /// Queues a media message as wxauto sends it: `mtype` (`image`, `file`, `video`, `voice`,
    /// `card`, ...), `file_path` when it has a file, and `content` (for files wxauto puts the
    /// path there; for voice and cards its parser prefix and the text).
    pub fn inject_media(
        &self,
        chat: &str,
        sender: &str,
        mtype: &str,
        file_path: Option<&str>,
        content: &str,
    ) {
        let mut message = serde_json::json!({
            "type": "friend",
            "sender": sender,
            "content": content,
            "mtype": mtype,
        });
        if let Some(file_path) = file_path {
            message["file_path"] = serde_json::json!(file_path);
        }
        self.inject_message(chat, message);
    }

    fn files(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        self.inner
            .files
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes WeChat offline or brings it back. Going offline drops the initialisation, the
    /// listened chats and their caches; coming back online still needs `initialize`.
    pub fn set_online(&self, online: bool) {
        self.lock().set_online(online);
        info!(name = %self.inner.config.name, online, "Simulated WeChat status changed.");
    }

    /// Sets the fault applied to every following API call.
    pub fn set_fault(&self, fault: Fault) {
        self.lock().set_fault(fault);
        info!(name = %self.inner.config.name, fault = ?fault, "Simulated fault set.");
    }

    /// The chats this simulated WeChat account does not have: `listen/add` of one answers
    /// HTTP 500 with code 3001, as the real server does (an empty list: every chat exists).
    pub fn set_missing_chats(&self, chats: &[&str]) {
        self.lock()
            .set_missing(chats.iter().map(|chat| (*chat).to_owned()).collect());
        info!(name = %self.inner.config.name, chats = chats.len(), "Simulated missing chats set.");
    }

    /// Back to a fresh state, as after a server restart: online, not initialised, nothing
    /// queued, no fault, counters at zero, uptime from zero. The configuration is kept, and
    /// message ids keep counting so they stay unique.
    pub fn reset(&self) {
        self.lock().reset();
        info!(name = %self.inner.config.name, "Simulator reset.");
    }

    /// A restart of the wxauto server (and of WeChat's UI state with it): like `reset`, and
    /// message ids start again from 1, so ids handed out before come back for new messages.
    /// What was unread and every chat's history stay (WeChat keeps them).
    pub fn restart(&self) {
        self.lock().restart();
        info!(name = %self.inner.config.name, "Simulated server restarted; ids start over.");
    }

    /// A copy of the observable state.
    pub fn snapshot(&self) -> SimSnapshot {
        self.lock().snapshot()
    }

    /// The configuration this simulator was built with.
    pub fn config(&self) -> &SimConfig {
        &self.inner.config
    }

    fn chatter_once(&self) {
        let (chat, senders) = CHATTER_CHATS[fastrand::usize(..CHATTER_CHATS.len())];
        let sender = senders[fastrand::usize(..senders.len())];
        // WeChat interleaves time separators with real messages; one in ten keeps the demo's
        // filters busy without drowning the real traffic.
        if fastrand::u8(..10) == 0 {
            self.lock().inject_time_separator(chat);
            return;
        }
        let content = CHATTER_TEXTS[fastrand::usize(..CHATTER_TEXTS.len())];
        self.inject(chat, sender, content);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code panics while holding the lock, so a poisoned state is still consistent.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
