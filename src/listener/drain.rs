//! Taking messages: one poll drains the main window and the listened chats, hands each
//! answer to the sink before the next destructive read, and holds what the sink refused.

use std::sync::MutexGuard;

use super::InstanceActor;
use super::chat::Chat;
use super::filter;
use crate::event::{Component, ErrorKind};
use crate::message::InboundMessage;
use crate::wxauto::{ChatBatch, WxautoError};

/// Upper bound of `get-next-new` calls per poll (each returns at most one chat).
const MAX_MAIN_WINDOW_DRAIN: usize = 16;
/// Upper bound of `listen/get` calls per poll (each returns at most one chat).
const MAX_LISTEN_DRAIN: usize = 64;
/// Held messages beyond which the actor stops taking new ones until the sink recovers.
const MAX_HELD: usize = 10_000;

impl InstanceActor {
    /// One poll: the main window, then the listened chats, then idle chats time out.
    /// Messages taken before a failure are still handed to the sink.
    pub(super) async fn poll(&mut self) -> Result<(), WxautoError> {
        if self.held_count() > 0 {
            self.flush_held().await;
            if self.held_count() >= MAX_HELD {
                // The sink is failing and we hold plenty: taking more from upstream would only
                // grow memory. Upstream keeps them for us meanwhile.
                return Ok(());
            }
        }
        self.drain().await?;
        self.expire_idle_chats().await
    }

    /// Both reads are destructive, so the messages of each answer are handed to the sink (which
    /// commits them) before the next request: a crash then loses at most the answer in flight,
    /// not everything a drain has taken so far.
    pub(super) async fn drain(&mut self) -> Result<(), WxautoError> {
        for _ in 0..MAX_MAIN_WINDOW_DRAIN {
            if self.stopping.is_cancelled() {
                return Ok(());
            }
            let answer = self.client.get_next_new().await;
            if answer.is_ok() {
                // The instance answers a message poll: an outage is over, even if a later
                // call of this poll fails (a flaky server is retried at once, not backed off).
                self.poll_answered();
            }
            match answer {
                Ok(batches) if batches.is_empty() => break,
                Ok(batches) => {
                    let mut taken = Vec::new();
                    let chats: Vec<(String, u64)> = batches
                        .iter()
                        .map(|batch| (batch.chat.clone(), self.accept_batch(batch, &mut taken)))
                        .collect();
                    self.hand_over(taken).await;
                    for (chat, count) in chats {
                        self.listen_main_window_chat(chat, count).await?;
                    }
                    if self.held_count() > 0 {
                        // The sink refused: leave the rest upstream until it recovers.
                        return Ok(());
                    }
                }
                Err(error) if error.is_instance_failure() => return Err(error),
                Err(error) => {
                    self.record_client_error(&error);
                    break;
                }
            }
        }
        // A chat listened just now must be in the stored table before its first destructive
        // read, or a crash during that read would leave nothing to re-read it from.
        self.save_chats().await;
        let limit = (self.active_count() + 2).clamp(4, MAX_LISTEN_DRAIN);
        for _ in 0..limit {
            if self.stopping.is_cancelled() {
                return Ok(());
            }
            match self.client.listen_get().await {
                Ok(batches) if batches.is_empty() => break,
                Ok(batches) => {
                    let mut taken = Vec::new();
                    for batch in batches {
                        self.take_listened(batch, &mut taken);
                    }
                    self.hand_over(taken).await;
                    if self.held_count() > 0 {
                        return Ok(());
                    }
                }
                Err(error) if error.is_instance_failure() => return Err(error),
                Err(error) => {
                    self.record_client_error(&error);
                    break;
                }
            }
        }
        Ok(())
    }

    /// Records a refused or malformed answer; the instance stays up.
    pub(super) fn record_client_error(&self, error: &WxautoError) {
        self.monitor.record_error(
            Component::Client,
            error.kind(),
            Some(&self.instance.id),
            &error.to_string(),
        );
    }

    /// A chat seen in the main window, whose `count` messages were handed over: make sure it
    /// is listened.
    pub(super) async fn listen_main_window_chat(
        &mut self,
        name: String,
        count: u64,
    ) -> Result<(), WxautoError> {
        match self.chats.get(&name) {
            Some(chat) if chat.active => {
                // Upstream lost the listener (or never had it): add it again.
                self.add_chat(&name).await?;
            }
            // A message for a timed-out chat reactivates it instead of being dropped.
            Some(_) => self.reactivate(&name).await?,
            None => {
                let cap = self.settings.listener.max_listeners_per_instance;
                if self.active_count() >= cap {
                    tracing::info!(
                        instance_id = %self.instance.id,
                        cap,
                        "Listener cap reached; the chat is not listened, its message is kept."
                    );
                } else if self.sink.wants_chat(&self.instance.id, &name) {
                    self.chats.insert(name.clone(), Chat::new(false));
                    self.add_chat(&name).await?;
                }
            }
        }
        if let Some(chat) = self.chats.get_mut(&name) {
            chat.touch(count);
        }
        Ok(())
    }

    /// A chat from the destructive listen/get: its messages are ours now.
    pub(super) fn take_listened(&mut self, batch: ChatBatch, taken: &mut Vec<InboundMessage>) {
        let count = self.accept_batch(&batch, taken);
        let chat = self.chats.entry(batch.chat).or_insert_with(|| {
            // Listened upstream before we started (or by someone else): adopt it.
            let mut chat = Chat::new(false);
            chat.announced = true;
            chat
        });
        chat.active = true;
        chat.touch(count);
    }

    /// Filters a batch into `taken`; returns how many messages passed. Echoes of our replies
    /// are the sink's to recognise (delivery's echo guard knows whom each reply answered): a
    /// text match here would also drop a peer who repeats our words.
    pub(super) fn accept_batch(
        &mut self,
        batch: &ChatBatch,
        taken: &mut Vec<InboundMessage>,
    ) -> u64 {
        let mut count = 0;
        // Every answer is new to us (the reads are destructive): its own number keeps the
        // made-up ids of two identical id-less messages apart.
        let answer = fastrand::u64(..);
        for (ordinal, raw) in batch.messages.iter().enumerate() {
            let Ok(mut message) =
                filter::accept(&self.instance.id, &batch.chat, raw, answer, ordinal)
            else {
                continue;
            };
            message.epoch = self.session.epoch;
            taken.push(message);
            count += 1;
        }
        count
    }

    /// Hands messages to the sink; on failure they are held and retried before the next poll.
    pub(super) async fn hand_over(&mut self, taken: Vec<InboundMessage>) {
        if taken.is_empty() {
            return;
        }
        self.monitor
            .record_messages(&self.instance.id, taken.len() as u64);
        // One line per upstream answer (one chat): ids and counts, never the text.
        tracing::info!(
            instance_id = %self.instance.id,
            chat = %crate::logging::chat(&taken[0].chat),
            messages = taken.len(),
            "Messages taken from the instance."
        );
        self.held().extend(taken);
        self.flush_held().await;
    }

    pub(super) fn held(&self) -> MutexGuard<'_, Vec<InboundMessage>> {
        // A panic while the lock was held cannot leave the list half-changed (only whole
        // pushes and drains happen under it): carry on with it.
        self.held
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn held_count(&self) -> usize {
        self.held().len()
    }

    pub(super) async fn flush_held(&mut self) {
        let batch = self.held().clone();
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        match self.sink.accept(batch).await {
            // Only this actor adds to the list, so its first `n` are what was just accepted.
            Ok(()) => drop(self.held().drain(..n)),
            Err(error) => self.monitor.record_error(
                Component::Listener,
                ErrorKind::Storage,
                Some(&self.instance.id),
                &format!("{error}; holding {n} message(s) in memory"),
            ),
        }
    }
}
