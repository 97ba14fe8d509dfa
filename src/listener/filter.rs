//! Which upstream messages are chat messages, and the ids of those upstream sent without one.
//!
//! The old listener also dropped any message whose *id* contained `self` or `time` as a
//! substring; ids are opaque, so only the `type` field and the marker text are checked here.

use chrono::Utc;

use crate::message::InboundMessage;
use crate::wxauto::RawMessage;

/// Message types that are not chat messages: our own, time separators, system and base notes.
pub const SKIPPED_TYPES: [&str; 4] = ["self", "time", "sys", "base"];

/// The marker wxauto puts before a batch of unread messages ("new messages below").
pub const NEW_MESSAGES_MARKER: &str = "以下为新消息";

/// Why a raw message did not become an `InboundMessage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// self, time, sys or base.
    Type,
    /// The unread marker.
    Marker,
}

/// Filters one raw message of `chat`. `answer` identifies the upstream answer it came in and
/// `ordinal` its position there; both only matter for messages without an id (see
/// [`synthetic_id`]).
pub fn accept(
    instance_id: &str,
    chat: &str,
    raw: &RawMessage,
    answer: u64,
    ordinal: usize,
) -> Result<InboundMessage, Skip> {
    if SKIPPED_TYPES
        .iter()
        .any(|skipped| raw.msg_type.eq_ignore_ascii_case(skipped))
    {
        return Err(Skip::Type);
    }
    if raw.content.trim() == NEW_MESSAGES_MARKER {
        return Err(Skip::Marker);
    }
    let (message_id, synthetic) = match &raw.id {
        Some(id) => (id.clone(), false),
        None => (synthetic_id(answer, ordinal), true),
    };
    Ok(InboundMessage {
        instance_id: instance_id.to_owned(),
        chat: chat.to_owned(),
        message_id,
        synthetic_id: synthetic,
        msg_type: raw.msg_type.clone(),
        sender: if raw.sender.is_empty() {
            chat.to_owned()
        } else {
            raw.sender.clone()
        },
        sender_remark: raw.sender_remark.clone(),
        content: strip_parser_prefix(raw.mtype.as_deref(), &raw.content).to_owned(),
        mtype: raw.mtype.clone(),
        file_path: raw.file_path.clone(),
        received_at: Utc::now(),
        epoch: 0,
    })
}

/// wxauto's parser prefixes, by `mtype`: removed so platforms and rules see the text itself.
const PARSER_PREFIXES: [(&str, &str); 2] = [
    ("voice", "[wxauto语音解析]"),
    ("card", "[wxauto卡片链接解析]"),
];

/// The content without wxauto's `[wxauto语音解析]` (voice) or `[wxauto卡片链接解析]` (card)
/// prefix.
pub fn strip_parser_prefix<'a>(mtype: Option<&str>, content: &'a str) -> &'a str {
    PARSER_PREFIXES
        .iter()
        .find(|(kind, _)| mtype == Some(*kind))
        .and_then(|(_, prefix)| content.strip_prefix(prefix))
        .map_or(content, str::trim_start)
}

/// The id of a message upstream sent without one: the answer it came in and its position.
///
/// Both reads are destructive, so no message is handed out twice by a poll; an id made from
/// the content would merge a person's second "1" into their first. A re-read of a chat's
/// history after a crash tells new from stored by alignment, not by these ids.
pub fn synthetic_id(answer: u64, ordinal: usize) -> String {
    format!("syn-{answer:016x}-{ordinal}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(id: Option<&str>, msg_type: &str, content: &str) -> RawMessage {
        RawMessage {
            id: id.map(str::to_owned),
            msg_type: msg_type.to_owned(),
            content: content.to_owned(),
            sender: "alice".to_owned(),
            sender_remark: None,
            mtype: None,
            time: Some("2026-11-29 10:00:00".to_owned()),
            file_path: None,
        }
    }

    #[test]
    fn filters_by_type_and_marker_only() {
        let cases = [
            (raw(Some("1"), "friend", "hi"), Ok(())),
            (raw(Some("2"), "self", "my reply"), Err(Skip::Type)),
            (raw(Some("3"), "time", "10:00"), Err(Skip::Type)),
            (raw(Some("4"), "sys", "以下为新消息"), Err(Skip::Type)),
            (raw(Some("5"), "base", "x"), Err(Skip::Type)),
            (
                raw(Some("6"), "friend", " 以下为新消息 "),
                Err(Skip::Marker),
            ),
            // The old listener dropped these because the id contained "self"/"time".
            (raw(Some("selfie-123"), "friend", "photo"), Ok(())),
            (raw(Some("time-42"), "friend", "what time?"), Ok(())),
        ];
        for (i, (message, expected)) in cases.iter().enumerate() {
            let got = accept("wx", "alice", message, 7, 0).map(drop);
            assert_eq!(&got, expected, "case {i}");
        }
    }

    #[test]
    fn synthetic_ids_tell_two_polls_and_two_positions_apart() {
        // The same text twice, in two answers: two messages, never one deduplicated away.
        let message = raw(None, "friend", "1");
        let first = accept("wx", "alice", &message, 1, 0).unwrap();
        let second = accept("wx", "alice", &message, 2, 0).unwrap();
        let same_answer = accept("wx", "alice", &message, 1, 1).unwrap();
        assert!(first.synthetic_id);
        assert!(first.message_id.starts_with("syn-"));
        assert_ne!(first.message_id, second.message_id);
        assert_ne!(first.message_id, same_answer.message_id);
        // An upstream id is kept as it is.
        let with_id = accept("wx", "alice", &raw(Some("m1"), "friend", "1"), 1, 0).unwrap();
        assert_eq!(with_id.message_id, "m1");
        assert!(!with_id.synthetic_id);
    }

    #[test]
    fn parser_prefixes_are_stripped_for_their_type_only() {
        assert_eq!(
            strip_parser_prefix(Some("voice"), "[wxauto语音解析]今天开会"),
            "今天开会"
        );
        assert_eq!(
            strip_parser_prefix(Some("card"), "[wxauto卡片链接解析] 标题 https://x"),
            "标题 https://x"
        );
        // Another type keeps its text, prefix-looking or not.
        assert_eq!(
            strip_parser_prefix(Some("image"), "[wxauto语音解析]x"),
            "[wxauto语音解析]x"
        );
        assert_eq!(
            strip_parser_prefix(None, "[wxauto卡片链接解析]x"),
            "[wxauto卡片链接解析]x"
        );
        assert_eq!(strip_parser_prefix(Some("voice"), "no prefix"), "no prefix");
    }
}
