//! `keyword`: local keyword replies; no network and no artificial delay.
//!
//! The first entry with a matching keyword answers; no match means no reply (not an error).

use crate::config::{KeywordEntry, KeywordMatch, KeywordPlatform};
use crate::message::InboundMessage;

use super::super::media;

#[derive(Debug)]
pub(super) struct Keyword {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    config: KeywordEntry,
    /// Lowercased keywords, for the case-insensitive exact and contains matches.
    lowered: Vec<String>,
}

// === impl Keyword ===

impl Keyword {
    pub(super) fn new(config: &KeywordPlatform) -> Self {
        let entries = config
            .keywords
            .iter()
            .map(|entry| Entry {
                config: entry.clone(),
                lowered: entry
                    .keywords
                    .iter()
                    .map(|keyword| keyword.trim().to_lowercase())
                    .filter(|keyword| !keyword.is_empty())
                    .collect(),
            })
            .collect();
        Self { entries }
    }

    pub(super) fn deliver(&self, msg: &InboundMessage) -> Option<String> {
        // Text only: an image's path is not something to match keywords against.
        let content = media::text_of(msg).trim();
        if content.is_empty() {
            return None;
        }
        let lowered = content.to_lowercase();
        let entry = self
            .entries
            .iter()
            .find(|entry| match entry.config.match_type {
                KeywordMatch::Exact => entry.lowered.contains(&lowered),
                KeywordMatch::Contains => entry
                    .lowered
                    .iter()
                    .any(|keyword| lowered.contains(keyword.as_str())),
                KeywordMatch::Regex => entry
                    .config
                    .patterns
                    .iter()
                    .any(|pattern| pattern.is_match(content)),
            })?;
        let replies = &entry.config.replies;
        let index = if entry.config.random && replies.len() > 1 {
            fastrand::usize(..replies.len())
        } else {
            0
        };
        replies.get(index).cloned()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use regex::Regex;

    use super::*;

    fn entry(match_type: KeywordMatch, keywords: &[&str], replies: &[&str]) -> KeywordEntry {
        KeywordEntry {
            keywords: keywords.iter().map(|k| (*k).to_owned()).collect(),
            match_type,
            patterns: if match_type == KeywordMatch::Regex {
                keywords
                    .iter()
                    .map(|k| Regex::new(&format!("^(?:{k})$")).expect("valid regex"))
                    .collect()
            } else {
                vec![]
            },
            replies: replies.iter().map(|r| (*r).to_owned()).collect(),
            random: false,
        }
    }

    fn msg(content: &str) -> InboundMessage {
        InboundMessage {
            instance_id: "wx".to_owned(),
            chat: "alice".to_owned(),
            message_id: "1".to_owned(),
            synthetic_id: false,
            msg_type: "friend".to_owned(),
            sender: "alice".to_owned(),
            sender_remark: None,
            content: content.to_owned(),
            mtype: None,
            file_path: None,
            received_at: Utc::now(),
            epoch: 0,
        }
    }

    #[test]
    fn first_matching_entry_answers() {
        let mut random = entry(KeywordMatch::Contains, &["pick"], &["a", "b", "c"]);
        random.random = true;
        let platform = Keyword::new(&KeywordPlatform {
            keywords: vec![
                entry(KeywordMatch::Exact, &["Hello", "hi"], &["exact"]),
                entry(KeywordMatch::Contains, &["price"], &["contains", "never"]),
                entry(KeywordMatch::Regex, &["order [0-9]+"], &["regex"]),
                random,
            ],
        });
        let cases = [
            ("hello", Some("exact")),
            ("  HI ", Some("exact")),
            ("hello there", None),
            ("what is the PRICE?", Some("contains")),
            ("order 42", Some("regex")),
            ("my order 42", None),
            ("nothing", None),
        ];
        for (content, expected) in cases {
            assert_eq!(
                platform.deliver(&msg(content)).as_deref(),
                expected,
                "{content:?}"
            );
        }
        for _ in 0..20 {
            let reply = platform.deliver(&msg("pick one")).expect("a reply");
            assert!(["a", "b", "c"].contains(&reply.as_str()));
        }
    }
}
