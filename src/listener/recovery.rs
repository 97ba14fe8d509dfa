//! After an unclean stop or an actor crash: which messages of a re-read chat history were
//! taken from the instance but never stored (an answer in flight when the process died).
//!
//! The history (`get-all-messages`) is non-destructive and carries the same ids `listen/get`
//! hands out. The newest message the store knows anchors it: everything after the anchor is
//! new. Ids are matched within the current upstream session only; where none matches (ids
//! missing, or a new session), the stored tail of the chat is aligned on (sender, content).

use std::collections::HashSet;

use super::{InstanceActor, filter};
use crate::message::InboundMessage;
use crate::wxauto::{RawMessage, WxautoError};

/// Where the new messages of `history` (oldest first, already filtered like a poll) start, or
/// `None` when nothing in it is known, so old and new cannot be told apart (a chat with no
/// stored message, or a history that does not reach back to anything stored).
pub fn first_new(
    history: &[InboundMessage],
    known_ids: &HashSet<String>,
    tail: &[(String, String)],
) -> Option<usize> {
    let by_id = history
        .iter()
        .rposition(|message| !message.synthetic_id && known_ids.contains(&message.message_id));
    if let Some(anchor) = by_id {
        return Some(anchor + 1);
    }
    // No id anchor: the longest run of history ending at `end` that equals the end of the
    // stored tail; on a tie the latest end wins (a repeat of the same text is then taken as
    // the copy we have, not as new).
    let mut best: Option<(usize, usize)> = None;
    for end in 0..history.len() {
        let run = (0..=end)
            .take(tail.len())
            .take_while(|back| {
                let message = &history[end - back];
                let (sender, content) = &tail[tail.len() - 1 - back];
                message.sender == *sender && message.content == *content
            })
            .count();
        if run > 0 && best.is_none_or(|(_, longest)| run >= longest) {
            best = Some((end, run));
        }
    }
    best.map(|(end, _)| end + 1)
}

/// Where the new messages start when nothing stored anchors the history: after the newest
/// message the history had when the chat was first listened (all of it when it was empty).
pub fn after_baseline(history: &[InboundMessage], baseline: Option<&str>) -> Option<usize> {
    match baseline? {
        "" => Some(0),
        id => history
            .iter()
            .rposition(|message| !message.synthetic_id && message.message_id == id)
            .map(|anchor| anchor + 1),
    }
}

/// The messages of `history` from `start` on that the store does not have.
pub fn unstored(
    history: Vec<InboundMessage>,
    start: usize,
    known_ids: &HashSet<String>,
) -> Vec<InboundMessage> {
    history
        .into_iter()
        .skip(start)
        .filter(|message| message.synthetic_id || !known_ids.contains(&message.message_id))
        .collect()
}

// === the actor's side: re-reading the listened chats ===

impl InstanceActor {
    /// Re-reads every active chat's history and stores what was taken but never stored (an
    /// answer in flight when the sidecar or this instance's actor died).
    pub(super) async fn recover(&mut self) -> Result<(), WxautoError> {
        let names = self.active_chat_names();
        let mut recovered = 0u64;
        for name in names {
            if self.stopping.is_cancelled() || self.history_missing {
                break;
            }
            let history = match self.client.get_all_messages(&name).await {
                Ok(history) => history,
                Err(error) if error.is_instance_failure_for_chat() => return Err(error),
                Err(error) if error.is_missing_endpoint() => {
                    self.note_history_missing();
                    break;
                }
                Err(error) => {
                    tracing::info!(instance_id = %self.instance.id, "Chat history not readable: {error}");
                    continue;
                }
            };
            recovered += self.recover_chat(&name, &history).await;
        }
        if recovered > 0 {
            tracing::warn!(
                instance_id = %self.instance.id,
                messages = recovered,
                "Recovered messages taken from the instance but not stored before the stop."
            );
        }
        Ok(())
    }

    /// Stores the messages of one chat's history that the store does not have; returns how
    /// many it handed over.
    pub(super) async fn recover_chat(&mut self, name: &str, history: &[RawMessage]) -> u64 {
        let answer = fastrand::u64(..);
        let epoch = self.session.epoch;
        let accepted: Vec<InboundMessage> = history
            .iter()
            .enumerate()
            .filter_map(|(ordinal, raw)| {
                filter::accept(&self.instance.id, name, raw, answer, ordinal).ok()
            })
            .map(|mut message| {
                message.epoch = epoch;
                message
            })
            .collect();
        let ids: Vec<String> = accepted
            .iter()
            .filter(|message| !message.synthetic_id)
            .map(|message| message.message_id.clone())
            .collect();
        let stored = match self
            .sink
            .chat_history(&self.instance.id, name, epoch, ids)
            .await
        {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(instance_id = %self.instance.id, "Cannot compare a chat history with the store: {error}");
                return 0;
            }
        };
        let known: HashSet<String> = stored.known_ids.into_iter().collect();
        let baseline = self.chats.get(name).and_then(|chat| chat.baseline.clone());
        let start = first_new(&accepted, &known, &stored.tail)
            .or_else(|| after_baseline(&accepted, baseline.as_deref()));
        let Some(start) = start else {
            tracing::debug!(instance_id = %self.instance.id, "Chat history shares nothing with the store; nothing recovered.");
            return 0;
        };
        let new = unstored(accepted, start, &known);
        let count = new.len() as u64;
        if count > 0 {
            self.monitor
                .metrics()
                .messages_recovered
                .get_or_create_owned(&crate::metrics::InstanceLabels {
                    instance_id: self.instance.id.clone(),
                })
                .inc_by(count);
            if let Some(chat) = self.chats.get_mut(name) {
                chat.touch(count);
            }
            self.hand_over(new).await;
        }
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: Option<&str>, sender: &str, content: &str) -> InboundMessage {
        InboundMessage {
            instance_id: "wx".to_owned(),
            chat: "team".to_owned(),
            message_id: id.map_or_else(|| format!("syn-{content}"), str::to_owned),
            synthetic_id: id.is_none(),
            sender: sender.to_owned(),
            content: content.to_owned(),
            ..InboundMessage::default()
        }
    }

    fn ids(known: &[&str]) -> HashSet<String> {
        known.iter().map(|id| (*id).to_owned()).collect()
    }

    fn tail(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(sender, content)| ((*sender).to_owned(), (*content).to_owned()))
            .collect()
    }

    #[test]
    fn the_newest_known_id_anchors_the_history() {
        let history = vec![
            message(Some("1"), "a", "x"),
            message(Some("2"), "b", "y"),
            message(Some("3"), "a", "lost"),
            message(Some("4"), "b", "lost too"),
        ];
        let known = ids(&["1", "2"]);
        let start = first_new(&history, &known, &[]).unwrap();
        let new = unstored(history, start, &known);
        let contents: Vec<&str> = new.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, ["lost", "lost too"]);
    }

    #[test]
    fn a_stored_message_after_a_gap_still_anchors() {
        // 3 was stored again by a listen/get that ran before the re-read: only 2 is new.
        let history = vec![
            message(Some("1"), "a", "x"),
            message(Some("2"), "a", "lost"),
            message(Some("3"), "a", "z"),
        ];
        let known = ids(&["1", "3"]);
        assert_eq!(first_new(&history, &known, &[]), Some(3));
        let known = ids(&["1"]);
        let start = first_new(&history, &known, &[]).unwrap();
        assert_eq!(unstored(history, start, &known).len(), 2);
    }

    #[test]
    fn without_ids_the_stored_tail_is_aligned() {
        let history = vec![
            message(None, "a", "hello"),
            message(None, "b", "1"),
            message(None, "a", "ok"),
            message(None, "b", "1"),
        ];
        // The store has up to the first "1" and "ok": the repeated "1" after it is new.
        let stored = tail(&[("a", "hello"), ("b", "1"), ("a", "ok")]);
        let start = first_new(&history, &HashSet::new(), &stored).unwrap();
        assert_eq!(start, 3);
        let new = unstored(history, start, &HashSet::new());
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].content, "1");
    }

    #[test]
    fn nothing_known_means_nothing_is_recovered() {
        let history = vec![message(Some("9"), "a", "x")];
        assert_eq!(first_new(&history, &HashSet::new(), &[]), None);
        let stored = tail(&[("z", "never seen")]);
        assert_eq!(first_new(&history, &HashSet::new(), &stored), None);
        assert_eq!(first_new(&[], &HashSet::new(), &stored), None);
    }

    #[test]
    fn a_chat_with_nothing_stored_is_anchored_at_its_baseline() {
        let history = vec![
            message(Some("old"), "a", "before we listened"),
            message(Some("n1"), "a", "first answer, lost"),
        ];
        assert_eq!(after_baseline(&history, Some("old")), Some(1));
        assert_eq!(after_baseline(&history, Some("")), Some(0));
        assert_eq!(after_baseline(&history, None), None);
        assert_eq!(after_baseline(&history, Some("gone")), None);
    }

    #[test]
    fn everything_stored_recovers_nothing() {
        let history = vec![message(Some("1"), "a", "x"), message(Some("2"), "a", "y")];
        let known = ids(&["1", "2"]);
        let start = first_new(&history, &known, &[]).unwrap();
        assert!(unstored(history, start, &known).is_empty());
    }
}
