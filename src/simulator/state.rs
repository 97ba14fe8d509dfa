//! The simulated server's state machine: WeChat status, the main-window queue, listen windows.
//! It is synchronous and knows nothing of HTTP beyond status codes, so every wxauto rule lives
//! here once and the HTTP layer only parses requests and renders envelopes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::mem;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};

use super::{Fault, ListenAction, ListenEvent, SentMessage, SimSnapshot};

/// The content of the marker wxauto puts in front of a batch of new messages.
pub(super) const NEW_MESSAGES_MARKER: &str = "以下为新消息";

/// Messages of a chat's history that `get-all-messages` shows (its window's visible part).
const HISTORY_WINDOW: usize = 200;

/// Bodies returned by `Fault::Garbage`, in turn: not JSON at all, then JSON cut off mid-body.
const GARBAGE_BODIES: [&str; 2] = [
    "<html>oops",
    r#"{"code":0,"message":"success","data":{"mess"#,
];

/// A failed wxauto call: the HTTP status and the envelope's `code` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WxError {
    pub status: StatusCode,
    pub code: i64,
    pub message: String,
}

/// What the fault layer does with one API request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Pass,
    Http500,
    Garbage(&'static str),
    WrongTypes,
    Slow(Duration),
    Hang,
}

/// A send request, already parsed from the body. Empty strings count as missing, as on the
/// real server (`if not who or not message`).
#[derive(Debug, Clone, Default)]
pub(super) struct SendRequest {
    pub who: Option<String>,
    pub message: Option<String>,
    pub at_list: Vec<String>,
    pub typing: bool,
}

pub(super) struct State {
    /// Prefix of message ids: `sim-<name>-`.
    id_prefix: String,
    /// Never reset, so ids stay unique for the simulator's lifetime.
    next_id: u64,
    started_at: Instant,
    online: bool,
    /// Invariant: `initialized` implies `online`.
    initialized: bool,
    fault: Fault,
    /// Flips on every garbage answer, to alternate the two bodies.
    garbage_turn: usize,
    /// Listened chats in insertion order, which is the order `listen/get` scans them in.
    listened: Vec<String>,
    /// Invariant: has a key exactly for each chat in `listened`.
    caches: HashMap<String, Vec<Value>>,
    /// Unread main-window messages of all chats, oldest first.
    main: VecDeque<Unread>,
    /// Every chat's visible history (what its window shows, our own messages included),
    /// oldest first; WeChat keeps it across restarts of the server.
    history: HashMap<String, VecDeque<Value>>,
    sent: Vec<SentMessage>,
    calls: BTreeMap<String, u64>,
    listen_log: Vec<ListenEvent>,
    initialize_calls: u64,
    /// Chats this WeChat account does not have (a group it is not in): `listen/add` of one
    /// fails as the real server fails it, HTTP 500 with code 3001. Kept by `reset` and
    /// `restart`: the account is the same.
    missing: BTreeSet<String>,
}

struct Unread {
    chat: String,
    message: Value,
}

// === impl WxError ===

impl WxError {
    fn new(status: StatusCode, code: i64, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_initialized() -> Self {
        Self::new(StatusCode::BAD_REQUEST, 2001, "微信未初始化")
    }

    fn missing_params() -> Self {
        Self::new(StatusCode::BAD_REQUEST, 1002, "缺少必要参数")
    }
}

// === impl State ===

impl State {
    pub fn new(name: &str) -> Self {
        Self {
            id_prefix: format!("sim-{name}-"),
            next_id: 1,
            started_at: Instant::now(),
            online: true,
            initialized: false,
            fault: Fault::None,
            garbage_turn: 0,
            listened: Vec::new(),
            caches: HashMap::new(),
            main: VecDeque::new(),
            history: HashMap::new(),
            sent: Vec::new(),
            calls: BTreeMap::new(),
            listen_log: Vec::new(),
            initialize_calls: 0,
            missing: BTreeSet::new(),
        }
    }

    pub fn reset(&mut self) {
        let next_id = self.next_id;
        *self = Self {
            id_prefix: mem::take(&mut self.id_prefix),
            next_id,
            missing: mem::take(&mut self.missing),
            ..Self::new("")
        };
    }

    /// A server restart: ids start over (UI runtime ids repeat); unread messages and chat
    /// histories survive, as WeChat itself keeps them.
    pub fn restart(&mut self) {
        let main = mem::take(&mut self.main);
        let history = mem::take(&mut self.history);
        *self = Self {
            id_prefix: mem::take(&mut self.id_prefix),
            main,
            history,
            missing: mem::take(&mut self.missing),
            ..Self::new("")
        };
    }

    pub fn set_fault(&mut self, fault: Fault) {
        self.fault = fault;
    }

    pub fn set_missing(&mut self, chats: BTreeSet<String>) {
        self.missing = chats;
    }

    pub fn set_online(&mut self, online: bool) {
        self.online = online;
        if !online {
            // A WeChat restart closes the listen windows and the server's callbacks with them;
            // unread main-window messages survive because WeChat itself keeps them unread.
            self.initialized = false;
            self.listened.clear();
            self.caches.clear();
        }
    }

    /// Counts an API request and decides what the fault layer does with it.
    pub fn begin_call(&mut self, endpoint: String, flaky: bool) -> Action {
        *self.calls.entry(endpoint).or_default() += 1;
        match self.fault {
            Fault::None if flaky && fastrand::u8(..5) == 0 => Action::Http500,
            Fault::None => Action::Pass,
            Fault::Http500 => Action::Http500,
            Fault::Garbage => {
                let body = GARBAGE_BODIES[self.garbage_turn % GARBAGE_BODIES.len()];
                self.garbage_turn += 1;
                Action::Garbage(body)
            }
            Fault::WrongTypes => Action::WrongTypes,
            Fault::Slow(delay) => Action::Slow(delay),
            Fault::Hang => Action::Hang,
        }
    }

    // --- message sources ---

    pub fn inject_text(&mut self, chat: &str, sender: &str, content: &str) {
        let message = self.message("friend", sender, content);
        self.queue(chat, message);
    }

    pub fn inject_raw(&mut self, chat: &str, mut message: Value) {
        if let Value::Object(fields) = &mut message
            && !fields.contains_key("id")
        {
            fields.insert("id".to_owned(), Value::String(self.next_id()));
        }
        self.queue(chat, message);
    }

    pub fn inject_time_separator(&mut self, chat: &str) {
        let content = chrono::Local::now().format("%H:%M").to_string();
        let message = self.message("time", "SYS", &content);
        self.queue(chat, message);
    }

    /// A listened chat's messages go to its listen window's cache; every other chat's wait
    /// unread in the main window.
    fn queue(&mut self, chat: &str, message: Value) {
        let history = self.history.entry(chat.to_owned()).or_default();
        history.push_back(message.clone());
        while history.len() > HISTORY_WINDOW {
            history.pop_front();
        }
        match self.caches.get_mut(chat) {
            Some(cache) => cache.push(message),
            None => self.main.push_back(Unread {
                chat: chat.to_owned(),
                message,
            }),
        }
    }

    // --- wxauto endpoints ---

    pub fn health(&self) -> Value {
        let wechat_status = if self.online && self.initialized {
            "connected"
        } else {
            "disconnected"
        };
        json!({
            "status": "ok",
            "wechat_status": wechat_status,
            "uptime": self.started_at.elapsed().as_secs(),
            "wx_lib": "wxauto",
        })
    }

    pub fn initialize(&mut self) -> Result<Value, WxError> {
        self.initialize_calls += 1;
        if !self.online {
            return Err(WxError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                2001,
                "初始化失败: 未找到已登录的微信窗口",
            ));
        }
        self.initialized = true;
        Ok(json!({ "status": "connected", "window_name": "微信" }))
    }

    /// The unread messages of the one chat whose oldest unread message is the oldest overall,
    /// like wxauto `GetNextNewMessage`.
    pub fn get_next_new(&mut self) -> Result<Value, WxError> {
        self.ensure_ready()?;
        let Some(chat) = self.main.front().map(|unread| unread.chat.clone()) else {
            return Ok(json!({ "messages": {} }));
        };
        let (batch, rest): (VecDeque<Unread>, VecDeque<Unread>) = mem::take(&mut self.main)
            .into_iter()
            .partition(|unread| unread.chat == chat);
        self.main = rest;

        let mut messages = Vec::with_capacity(batch.len() + 1);
        if batch.len() > 1 {
            messages.push(self.message("sys", "SYS", NEW_MESSAGES_MARKER));
        }
        messages.extend(batch.into_iter().map(|unread| unread.message));
        Ok(json!({ "messages": { chat: messages } }))
    }

    pub fn listen_add(&mut self, nickname: Option<String>) -> Result<Value, WxError> {
        self.ensure_ready()?;
        let nickname = nickname.ok_or_else(WxError::missing_params)?;
        if self.missing.contains(&nickname) {
            return Err(WxError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                3001,
                format!("添加监听失败: 找不到会话 {nickname}"),
            ));
        }
        // Adding twice is fine on the real server: the window just stays open. Unread
        // main-window messages stay where they are; they were already unread.
        if !self.caches.contains_key(&nickname) {
            self.listened.push(nickname.clone());
            self.caches.insert(nickname.clone(), Vec::new());
        }
        self.listen_log.push(ListenEvent {
            action: ListenAction::Add,
            nickname: nickname.clone(),
        });
        Ok(json!({ "nickname": nickname, "library": "wxauto" }))
    }

    pub fn listen_remove(&mut self, nickname: Option<String>) -> Result<Value, WxError> {
        self.ensure_ready()?;
        // The real server answers a missing nickname with 1001, not 1002.
        let nickname = nickname
            .ok_or_else(|| WxError::new(StatusCode::BAD_REQUEST, 1001, "缺少nickname参数"))?;
        if self.caches.remove(&nickname).is_none() {
            return Err(WxError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                3003,
                format!("移除监听失败: {nickname} 未在监听列表中"),
            ));
        }
        self.listened.retain(|who| *who != nickname);
        self.listen_log.push(ListenEvent {
            action: ListenAction::Remove,
            nickname: nickname.clone(),
        });
        Ok(json!({ "nickname": nickname, "library": "wxauto" }))
    }

    /// Non-destructive: the visible history of a listened chat's window. Like the real server,
    /// a chat that is not listened is a 404 with code 3001.
    pub fn get_all_messages(&mut self, who: Option<String>) -> Result<Value, WxError> {
        self.ensure_ready()?;
        let who = who.ok_or_else(WxError::missing_params)?;
        if !self.caches.contains_key(&who) {
            return Err(WxError::new(
                StatusCode::NOT_FOUND,
                3001,
                format!("获取消息失败: {who} 未在监听列表中"),
            ));
        }
        let messages: Vec<Value> = self
            .history
            .get(&who)
            .map(|history| history.iter().cloned().collect())
            .unwrap_or_default();
        Ok(json!({ "who": who, "messages": messages }))
    }

    /// Destructive: hands out, and forgets, the cache of the first listened chat that has any.
    pub fn listen_get(&mut self) -> Result<Value, WxError> {
        self.ensure_ready()?;
        let found = self
            .listened
            .iter()
            .find(|who| self.caches.get(*who).is_some_and(|cache| !cache.is_empty()));
        let Some(who) = found.cloned() else {
            return Ok(json!({ "messages": {} }));
        };
        let messages = self.caches.get_mut(&who).map(mem::take).unwrap_or_default();
        Ok(json!({ "messages": { who: messages } }))
    }

    pub fn send(&mut self, request: SendRequest) -> Result<Value, WxError> {
        self.ensure_ready()?;
        let (Some(who), Some(message)) = (request.who, request.message) else {
            return Err(WxError::missing_params());
        };
        if !self.caches.contains_key(&who) {
            return Err(WxError::new(
                StatusCode::NOT_FOUND,
                3001,
                format!("发送失败: {who} 未在监听列表中"),
            ));
        }
        // The listen window sees our own message too, exactly like a real one does: the
        // sidecar has to recognise it as its own and not answer it.
        let echo = self.message("self", "Self", &message);
        self.queue(&who, echo);
        self.sent.push(SentMessage {
            who,
            message,
            at_list: request.at_list,
            typing: request.typing,
        });
        Ok(json!({ "message_id": "success" }))
    }

    pub fn snapshot(&self) -> SimSnapshot {
        let mut listened = self.listened.clone();
        listened.sort();
        let mut pending_main = BTreeMap::new();
        for unread in &self.main {
            *pending_main.entry(unread.chat.clone()).or_default() += 1;
        }
        let pending_listen = self
            .caches
            .iter()
            .filter(|(_, cache)| !cache.is_empty())
            .map(|(who, cache)| (who.clone(), cache.len()))
            .collect();
        SimSnapshot {
            initialized: self.initialized,
            online: self.online,
            listened,
            pending_main,
            pending_listen,
            sent: self.sent.clone(),
            calls: self.calls.clone(),
            listen_log: self.listen_log.clone(),
            initialize_calls: self.initialize_calls,
        }
    }

    fn ensure_ready(&self) -> Result<(), WxError> {
        if self.online && self.initialized {
            Ok(())
        } else {
            Err(WxError::not_initialized())
        }
    }

    fn message(&mut self, kind: &str, sender: &str, content: &str) -> Value {
        json!({
            "id": self.next_id(),
            "type": kind,
            "content": content,
            "sender": sender,
            "sender_remark": null,
            "mtype": null,
            "file_path": null,
            "time": chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string(),
        })
    }

    fn next_id(&mut self) -> String {
        let id = format!("{}{}", self.id_prefix, self.next_id);
        self.next_id += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_state() -> State {
        let mut state = State::new("t");
        state.initialize().expect("online state initialises");
        state
    }

    fn batch(answer: &Value) -> (Option<String>, Vec<Value>) {
        let messages = answer["messages"]
            .as_object()
            .expect("messages is an object");
        assert!(messages.len() <= 1, "at most one chat per call: {answer}");
        match messages.iter().next() {
            Some((chat, list)) => (
                Some(chat.clone()),
                list.as_array().expect("a list of messages").clone(),
            ),
            None => (None, Vec::new()),
        }
    }

    fn contents(messages: &[Value]) -> Vec<&str> {
        messages
            .iter()
            .map(|m| m["content"].as_str().unwrap_or("<none>"))
            .collect()
    }

    #[test]
    fn get_next_new_serves_the_chat_with_the_oldest_unread_first() {
        let mut state = ready_state();
        state.inject_text("b", "b", "b1");
        state.inject_text("a", "a", "a1");
        state.inject_text("b", "b", "b2");

        let (chat, messages) = batch(&state.get_next_new().expect("ready"));
        assert_eq!(chat.as_deref(), Some("b"));
        assert_eq!(contents(&messages), [NEW_MESSAGES_MARKER, "b1", "b2"]);
        assert_eq!(messages[0]["type"], "sys");

        let (chat, messages) = batch(&state.get_next_new().expect("ready"));
        assert_eq!(chat.as_deref(), Some("a"));
        // A single message comes without the marker.
        assert_eq!(contents(&messages), ["a1"]);

        assert_eq!(batch(&state.get_next_new().expect("ready")).0, None);
    }

    #[test]
    fn ids_are_unique_and_survive_reset() {
        let mut state = ready_state();
        state.inject_text("a", "a", "1");
        state.inject_text("a", "a", "2");
        state.reset();
        state.initialize().expect("online after reset");
        state.inject_text("a", "a", "3");
        state.inject_text("b", "b", "4");
        let mut ids = Vec::new();
        for _ in 0..2 {
            let (_, messages) = batch(&state.get_next_new().expect("ready"));
            ids.extend(
                messages
                    .iter()
                    .map(|m| m["id"].as_str().unwrap_or("").to_owned()),
            );
        }
        assert_eq!(ids, ["sim-t-3", "sim-t-4"]);
    }

    #[test]
    fn raw_messages_keep_their_fields_and_get_an_id_only_when_missing() {
        let mut state = ready_state();
        state.inject_raw("a", json!({ "type": "time", "content": "12:00" }));
        state.inject_raw("a", json!({ "id": "", "type": "base" }));
        let (_, messages) = batch(&state.get_next_new().expect("ready"));
        assert_eq!(messages[1]["type"], "time");
        assert!(
            messages[1]["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("sim-t-"))
        );
        assert_eq!(messages[2], json!({ "id": "", "type": "base" }));
    }

    #[test]
    fn listened_chats_are_read_in_insertion_order_and_destructively() {
        let mut state = ready_state();
        state.listen_add(Some("z".into())).expect("add z");
        state.listen_add(Some("a".into())).expect("add a");
        state
            .listen_add(Some("z".into()))
            .expect("re-adding is fine");
        state.inject_text("a", "a", "a1");
        state.inject_text("z", "z", "z1");

        let (chat, messages) = batch(&state.listen_get().expect("ready"));
        assert_eq!(
            (chat.as_deref(), contents(&messages)),
            (Some("z"), vec!["z1"])
        );
        let (chat, _) = batch(&state.listen_get().expect("ready"));
        assert_eq!(chat.as_deref(), Some("a"));
        assert_eq!(batch(&state.listen_get().expect("ready")).0, None);

        let snapshot = state.snapshot();
        assert_eq!(snapshot.listened, ["a", "z"]);
        assert_eq!(snapshot.listen_log.len(), 3);
    }

    #[test]
    fn removing_a_chat_forgets_its_cache_and_unknown_chats_fail() {
        let mut state = ready_state();
        state.listen_add(Some("a".into())).expect("add");
        state.inject_text("a", "a", "lost");
        state.listen_remove(Some("a".into())).expect("remove");
        assert!(state.snapshot().pending_listen.is_empty());

        let err = state
            .listen_remove(Some("a".into()))
            .expect_err("not listened");
        assert_eq!(
            (err.status, err.code),
            (StatusCode::INTERNAL_SERVER_ERROR, 3003)
        );
        let err = state.listen_remove(None).expect_err("missing nickname");
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, 1001));
        let err = state.listen_add(None).expect_err("missing nickname");
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, 1002));
    }

    #[test]
    fn going_offline_drops_listens_but_keeps_the_main_window() {
        let mut state = ready_state();
        state.listen_add(Some("a".into())).expect("add");
        state.inject_text("a", "a", "in cache");
        state.inject_text("b", "b", "unread");
        state.set_online(false);
        state.inject_text("a", "a", "while offline");

        let snapshot = state.snapshot();
        assert!(!snapshot.initialized);
        assert!(snapshot.listened.is_empty());
        assert!(snapshot.pending_listen.is_empty());
        assert_eq!(snapshot.pending_main.get("b"), Some(&1));
        assert_eq!(snapshot.pending_main.get("a"), Some(&1));

        let err = state.get_next_new().expect_err("offline");
        assert_eq!((err.status, err.code), (StatusCode::BAD_REQUEST, 2001));
        let err = state.initialize().expect_err("offline");
        assert_eq!(
            (err.status, err.code),
            (StatusCode::INTERNAL_SERVER_ERROR, 2001)
        );

        state.set_online(true);
        assert!(state.get_next_new().is_err(), "online is not initialised");
        state.initialize().expect("online again");
        assert_eq!(
            batch(&state.get_next_new().expect("ready")).0.as_deref(),
            Some("b")
        );
        assert_eq!(state.snapshot().initialize_calls, 3);
    }

    #[test]
    fn garbage_alternates_between_its_bodies() {
        let mut state = State::new("t");
        state.set_fault(Fault::Garbage);
        let first = state.begin_call("GET /api/health".into(), false);
        let second = state.begin_call("GET /api/health".into(), false);
        assert_ne!(first, second);
        assert_eq!(state.snapshot().calls.get("GET /api/health"), Some(&2));
    }
}
