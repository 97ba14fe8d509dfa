//! The chat table: one entry per chat the actor listens (or listened) to, with its idle
//! timer, counters and history baseline, and the actor's operations on it (re-adds after a
//! recovery, listen/add and its baseline read, reactivation, idle expiry).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use super::InstanceActor;
use super::filter;
use crate::event::Component;
use crate::message::StoredChat;
use crate::monitor::ChatState;
use crate::wxauto::WxautoError;

#[derive(Debug, Clone)]
pub(super) struct Chat {
    pub(super) active: bool,
    pub(super) fixed: bool,
    /// Counted in `listeners_added` once; re-adds after a recovery are restorations.
    pub(super) announced: bool,
    pub(super) last_activity: Instant,
    pub(super) added: SystemTime,
    pub(super) last_message: Option<SystemTime>,
    pub(super) last_check: SystemTime,
    pub(super) message_count: u64,
    pub(super) error_count: u64,
    /// Where the chat's history stood when it was first listened (see `StoredChat`).
    pub(super) baseline: Option<String>,
    /// The server refused to listen to it (a chat this account does not have): recorded as
    /// an error once, then retried quietly at every passing probe while it stays active
    /// (a fixed chat), until a `listen/add` succeeds.
    pub(super) refused: bool,
    /// When it last became inactive; an inactive chat is forgotten
    /// `listener.forget_inactive_after` later.
    pub(super) inactive_since: Option<Instant>,
}

impl Chat {
    pub(super) fn new(fixed: bool) -> Self {
        Self {
            active: true,
            fixed,
            announced: false,
            last_activity: Instant::now(),
            added: SystemTime::now(),
            last_message: None,
            last_check: SystemTime::now(),
            message_count: 0,
            error_count: 0,
            baseline: None,
            refused: false,
            inactive_since: None,
        }
    }

    /// A chat as the store kept it across a restart of the process: its idle timer runs from
    /// its last message (or from when it was added), not from now, so a chat that stays quiet
    /// still times out. Fixed-ness comes from the current settings.
    pub(super) fn from_stored(stored: &StoredChat) -> Self {
        let now = SystemTime::now();
        let added = from_unix_ms(stored.added_ms);
        let last_message = stored.last_message_ms.map(from_unix_ms);
        let idle = now
            .duration_since(last_message.unwrap_or(added))
            .unwrap_or_default();
        Self {
            active: stored.active,
            fixed: false,
            announced: true,
            last_activity: Instant::now()
                .checked_sub(idle)
                .unwrap_or_else(Instant::now),
            added,
            last_message,
            last_check: now,
            message_count: stored.message_count,
            error_count: stored.error_count,
            baseline: stored.baseline.clone(),
            refused: false,
            inactive_since: (!stored.active).then(Instant::now),
        }
    }

    pub(super) fn stored(&self, name: &str) -> StoredChat {
        StoredChat {
            chat: name.to_owned(),
            active: self.active,
            fixed: self.fixed,
            added_ms: unix_ms(self.added),
            last_message_ms: self.last_message.map(unix_ms),
            message_count: self.message_count,
            error_count: self.error_count,
            baseline: self.baseline.clone(),
        }
    }

    /// A chat as a previous actor left it. Fixed-ness comes from the current settings.
    pub(super) fn restored(state: &ChatState) -> Self {
        let now = SystemTime::now();
        let last_message = state.last_message_time.map(|seconds| {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(seconds.max(0.0))
        });
        let idle = last_message
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or_default();
        Self {
            active: state.active,
            fixed: false,
            announced: true,
            last_activity: Instant::now()
                .checked_sub(idle)
                .unwrap_or_else(Instant::now),
            added: last_message.unwrap_or(now),
            last_message,
            last_check: now,
            message_count: state.message_count,
            error_count: state.error_count,
            baseline: None,
            refused: false,
            inactive_since: (!state.active).then(Instant::now),
        }
    }

    /// Listened, not fixed, and without a message for `timeout`: due for listen/remove.
    pub(super) fn is_idle(&self, now: Instant, timeout: Duration) -> bool {
        self.active && !self.fixed && now.duration_since(self.last_activity) >= timeout
    }

    /// Not listened any more (timed out, refused, no longer fixed): its forgetting timer
    /// starts now.
    pub(super) fn deactivate(&mut self) {
        self.active = false;
        self.inactive_since = Some(Instant::now());
    }

    /// Inactive for `after`: due to be dropped from the table.
    pub(super) fn is_forgotten(&self, now: Instant, after: Duration) -> bool {
        !self.active
            && !self.fixed
            && self
                .inactive_since
                .is_some_and(|since| now.duration_since(since) >= after)
    }

    pub(super) fn touch(&mut self, messages: u64) {
        self.last_check = SystemTime::now();
        if messages > 0 {
            self.last_activity = Instant::now();
            self.last_message = Some(SystemTime::now());
            self.message_count += messages;
        }
    }
}

impl InstanceActor {
    /// The names of the chats `keep` selects, in name order (recovery, re-adds, retries and
    /// expiry all walk the table the same way).
    fn chat_names(&self, keep: impl Fn(&Chat) -> bool) -> Vec<String> {
        let mut names: Vec<String> = self
            .chats
            .iter()
            .filter(|(_, chat)| keep(chat))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// The listened chats, in name order.
    pub(super) fn active_chat_names(&self) -> Vec<String> {
        self.chat_names(|chat| chat.active)
    }

    /// Re-adds every active chat after (re)connecting: upstream forgets its listeners when
    /// WeChat restarts, so the sidecar's table is the source of truth.
    pub(super) async fn restore_chats(&mut self) -> Result<(), WxautoError> {
        let names = self.active_chat_names();
        for name in names {
            if self.stopping.is_cancelled() {
                break;
            }
            self.add_chat(&name).await?;
        }
        Ok(())
    }

    /// Tries again to listen to the active chats the server refused (fixed chats it did not
    /// have yet: the account may have joined the group since). Quiet: each was recorded as an
    /// error when first refused.
    pub(super) async fn retry_refused_chats(&mut self) -> Result<(), WxautoError> {
        for name in self.chat_names(|chat| chat.active && chat.refused) {
            if self.stopping.is_cancelled() {
                break;
            }
            self.add_chat(&name).await?;
        }
        Ok(())
    }

    /// `listen/add` for a chat already marked active in the table. Instance failures propagate;
    /// a refusal of this one chat (even with HTTP 500: a chat the account does not have) is
    /// recorded once, naming the chat, and the chat is marked inactive, unless it is fixed:
    /// then it stays active and is retried at every passing probe.
    pub(super) async fn add_chat(&mut self, name: &str) -> Result<(), WxautoError> {
        match self.client.listen_add(name).await {
            Ok(()) => {
                let mut first = false;
                if let Some(chat) = self.chats.get_mut(name) {
                    if chat.refused {
                        chat.refused = false;
                        tracing::info!(
                            instance_id = %self.instance.id,
                            chat = %crate::logging::chat(name),
                            "The server listens to the chat it refused before."
                        );
                    }
                    chat.active = true;
                    if !chat.announced {
                        // New or reactivated: its idle timer starts now. A re-add after a
                        // recovery or restart keeps the timer it had.
                        chat.announced = true;
                        chat.last_activity = Instant::now();
                        first = chat.baseline.is_none();
                        self.monitor.record_listener_added(&self.instance.id);
                    }
                }
                if first {
                    self.read_baseline(name).await?;
                }
                Ok(())
            }
            Err(error) if error.is_instance_failure_for_chat() => Err(error),
            Err(error) => {
                let again = self.chats.get(name).is_some_and(|chat| chat.refused);
                if again {
                    if let Some(chat) = self.chats.get_mut(name) {
                        chat.error_count += 1;
                    }
                    tracing::debug!(instance_id = %self.instance.id, "listen/add refused again: {error}");
                } else {
                    self.chat_error(name, &error);
                }
                if let Some(chat) = self.chats.get_mut(name) {
                    if chat.fixed {
                        chat.refused = true;
                    } else {
                        chat.deactivate();
                    }
                }
                Ok(())
            }
        }
    }

    /// Notes where a newly listened chat's history stands, so that a crash during its first
    /// destructive read can be recovered even though nothing of the chat is stored yet.
    pub(super) async fn read_baseline(&mut self, name: &str) -> Result<(), WxautoError> {
        if self.history_missing {
            return Ok(());
        }
        let history = match self.client.get_all_messages(name).await {
            Ok(history) => history,
            Err(error) if error.is_instance_failure_for_chat() => return Err(error),
            Err(error) => {
                if error.is_missing_endpoint() {
                    self.note_history_missing();
                }
                return Ok(());
            }
        };
        let newest = history
            .iter()
            .enumerate()
            .filter_map(|(ordinal, raw)| {
                filter::accept(&self.instance.id, name, raw, 0, ordinal).ok()
            })
            .rfind(|message| !message.synthetic_id)
            .map(|message| message.message_id)
            .unwrap_or_default();
        if let Some(chat) = self.chats.get_mut(name) {
            chat.baseline = Some(newest);
        }
        Ok(())
    }

    pub(super) fn note_history_missing(&mut self) {
        if !self.history_missing {
            self.history_missing = true;
            tracing::warn!(
                instance_id = %self.instance.id,
                "This wxauto server has no /api/chat/get-all-messages; messages in flight when \
                 the sidecar stops cannot be re-read from it."
            );
        }
    }

    /// Listens to a chat that is inactive or unknown: a new listener as far as the metrics and
    /// its idle timer are concerned.
    pub(super) async fn reactivate(&mut self, name: &str) -> Result<(), WxautoError> {
        let chat = self
            .chats
            .entry(name.to_owned())
            .or_insert_with(|| Chat::new(false));
        chat.active = true;
        chat.announced = false;
        self.add_chat(name).await
    }

    /// Records a refusal about one chat, naming it (as log lines name chats, so
    /// `logging.redact_chat_names` applies), and counts it on the chat.
    pub(super) fn chat_error(&mut self, name: &str, error: &WxautoError) {
        if let Some(chat) = self.chats.get_mut(name) {
            chat.error_count += 1;
        }
        self.monitor.record_error(
            Component::Client,
            error.kind(),
            Some(&self.instance.id),
            &format!("{error} (chat {})", crate::logging::chat(name)),
        );
    }

    pub(super) fn set_inactive(&mut self, name: &str) {
        if let Some(chat) = self.chats.get_mut(name) {
            chat.deactivate();
        }
    }

    /// Drops the chats inactive for `listener.forget_inactive_after`: a chat that timed out
    /// (or was refused, or is no longer fixed) stays visible as inactive for that long, then
    /// leaves the table, the store, the monitor API and the health score. If it writes again
    /// it comes back through the main window as a new chat.
    pub(super) fn forget_inactive_chats(&mut self) {
        let after = self.settings.listener.forget_inactive_after;
        let now = Instant::now();
        let before = self.chats.len();
        self.chats.retain(|_, chat| !chat.is_forgotten(now, after));
        let forgotten = before - self.chats.len();
        if forgotten > 0 {
            tracing::debug!(instance_id = %self.instance.id, chats = forgotten, "Inactive chats forgotten.");
        }
    }

    /// Chats idle past `listener_timeout` become inactive and are removed upstream.
    pub(super) async fn expire_idle_chats(&mut self) -> Result<(), WxautoError> {
        let timeout = self.settings.listener.listener_timeout;
        let now = Instant::now();
        for name in self.chat_names(|chat| chat.is_idle(now, timeout)) {
            if self.stopping.is_cancelled() {
                return Ok(());
            }
            match self.client.listen_remove(&name).await {
                Ok(()) => {}
                Err(error) if error.is_instance_failure_for_chat() => return Err(error),
                // "Not listened" upstream: it is gone already, which is what we wanted.
                Err(error) => {
                    tracing::debug!(instance_id = %self.instance.id, "listen/remove refused: {error}")
                }
            }
            self.set_inactive(&name);
            self.monitor
                .record_listener_removed(&self.instance.id, "timeout");
            tracing::debug!(instance_id = %self.instance.id, "Chat timed out and was removed.");
        }
        self.forget_inactive_chats();
        Ok(())
    }
}

pub(super) fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    })
}

pub(super) fn from_unix_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused time: the idle timer runs from the last message, not from the add, and a fixed
    /// or inactive chat never expires.
    #[tokio::test(start_paused = true)]
    async fn a_chat_expires_listener_timeout_after_its_last_message() {
        let timeout = Duration::from_secs(600);
        let mut chat = Chat::new(false);
        tokio::time::advance(timeout - Duration::from_millis(1)).await;
        assert!(!chat.is_idle(Instant::now(), timeout));
        // A poll without messages does not count as activity.
        chat.touch(0);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(chat.is_idle(Instant::now(), timeout));
        // A message restarts the timer.
        chat.touch(2);
        assert_eq!(chat.message_count, 2);
        tokio::time::advance(timeout / 2).await;
        assert!(!chat.is_idle(Instant::now(), timeout));
        tokio::time::advance(timeout / 2).await;
        assert!(chat.is_idle(Instant::now(), timeout));

        let fixed = Chat::new(true);
        let mut inactive = Chat::new(false);
        inactive.active = false;
        tokio::time::advance(timeout * 10).await;
        assert!(!fixed.is_idle(Instant::now(), timeout));
        assert!(!inactive.is_idle(Instant::now(), timeout));
    }
}
