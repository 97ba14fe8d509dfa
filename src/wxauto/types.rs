//! Wire types of the wxauto HTTP API: the `{code, message, data}` envelope, health, messages.
//!
//! Parsing is lenient where upstream libraries differ (ids as numbers, missing optional fields)
//! and strict where the structure itself is wrong (that is a `Decode` error, never a panic).

use serde::Deserialize;
use serde_json::{Map, Value};

/// The `{code, message, data}` envelope.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// 0 is success.
    pub code: i64,
    /// Human text (often Chinese).
    pub message: String,
    /// The payload (`null` becomes `{}`).
    pub data: Value,
}

/// Parses an envelope, refusing anything that is not one.
pub fn parse_envelope(bytes: &[u8]) -> Result<Envelope, String> {
    let value: Value = serde_json::from_slice(bytes).map_err(|error| {
        let preview: String = String::from_utf8_lossy(bytes).chars().take(40).collect();
        format!("not JSON ({error}); body starts with {preview:?}")
    })?;
    let Value::Object(mut object) = value else {
        return Err("the answer is not a JSON object".to_owned());
    };
    let code = match object.get("code") {
        Some(Value::Number(number)) => number
            .as_i64()
            .ok_or_else(|| format!("`code` is not an integer: {number}"))?,
        Some(other) => return Err(format!("`code` is not a number: {}", type_name(other))),
        None => return Err("the envelope has no `code`".to_owned()),
    };
    let message = match object.remove("message") {
        Some(Value::String(text)) => text,
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    };
    let data = match object.remove("data") {
        Some(Value::Null) | None => Value::Object(Map::new()),
        Some(data) => data,
    };
    Ok(Envelope {
        code,
        message,
        data,
    })
}

/// `GET /api/health` data.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct HealthInfo {
    /// `ok` when the server runs.
    #[serde(default)]
    pub status: String,
    /// `connected` only when WeChat is initialised and reachable.
    #[serde(default)]
    pub wechat_status: String,
    /// Server uptime in seconds.
    #[serde(default)]
    pub uptime: Option<u64>,
}

impl HealthInfo {
    /// The contract's definition of a connected instance (docs/reference.md, "Health score").
    pub fn is_connected(&self) -> bool {
        self.wechat_status == "connected"
    }

    /// When the server started, in Unix milliseconds (`now_ms` − `uptime`), if it reports its
    /// uptime. Saturating: an absurd uptime gives the earliest time, never an overflow.
    pub fn started_ms(&self, now_ms: i64) -> Option<i64> {
        let uptime_ms = i64::try_from(self.uptime?.saturating_mul(1000)).unwrap_or(i64::MAX);
        Some(now_ms.saturating_sub(uptime_ms))
    }
}

/// One chat's messages from `get-next-new` or `listen/get`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatBatch {
    /// The chat name (`who`).
    pub chat: String,
    /// Messages in upstream order.
    pub messages: Vec<RawMessage>,
}

/// A message object as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMessage {
    /// Runtime id; `None` when upstream sent none or an empty one.
    pub id: Option<String>,
    /// Library message type (`friend`, `self`, `time`, `sys`, `base`, ...).
    pub msg_type: String,
    /// Text content.
    pub content: String,
    /// Sender name.
    pub sender: String,
    /// Sender remark, if any.
    pub sender_remark: Option<String>,
    /// Media type (`image`, `file`, ...), null for text.
    pub mtype: Option<String>,
    /// Upstream time string (wxauto only).
    pub time: Option<String>,
    /// The file of a media message, a path on the instance's machine.
    pub file_path: Option<String>,
}

/// Parses `{messages: {<chat>: [msg, ...]}}`. An empty map means "nothing new".
pub fn parse_batches(data: &Value) -> Result<Vec<ChatBatch>, String> {
    let messages = match data.get("messages") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(messages)) => messages,
        Some(other) => {
            return Err(format!(
                "`messages` is {}, expected an object",
                type_name(other)
            ));
        }
    };
    let mut batches = Vec::with_capacity(messages.len());
    for (chat, list) in messages {
        let Value::Array(list) = list else {
            return Err(format!(
                "messages of {chat:?} are {}, expected a list",
                type_name(list)
            ));
        };
        let mut parsed = Vec::with_capacity(list.len());
        for item in list {
            parsed.push(parse_message(item)?);
        }
        batches.push(ChatBatch {
            chat: chat.clone(),
            messages: parsed,
        });
    }
    Ok(batches)
}

/// Parses the history answer `{who, messages: [msg, ...]}` of `get-all-messages`.
pub fn parse_history(data: &Value) -> Result<Vec<RawMessage>, String> {
    match data.get("messages") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list.iter().map(parse_message).collect(),
        Some(other) => Err(format!(
            "`messages` is {}, expected a list",
            type_name(other)
        )),
    }
}

fn parse_message(value: &Value) -> Result<RawMessage, String> {
    let Value::Object(object) = value else {
        return Err(format!(
            "a message is {}, expected an object",
            type_name(value)
        ));
    };
    let text = |key: &str| -> Option<String> {
        match object.get(key) {
            Some(Value::String(text)) => Some(text.clone()),
            Some(Value::Number(number)) => Some(number.to_string()),
            Some(Value::Bool(flag)) => Some(flag.to_string()),
            _ => None,
        }
    };
    Ok(RawMessage {
        id: text("id").filter(|id| !id.is_empty()),
        msg_type: text("type").unwrap_or_default(),
        content: text("content").unwrap_or_default(),
        sender: text("sender").unwrap_or_default(),
        sender_remark: text("sender_remark").filter(|remark| !remark.is_empty()),
        mtype: text("mtype"),
        time: text("time"),
        file_path: text("file_path").filter(|path| !path.is_empty()),
    })
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_rejects_what_is_not_an_envelope() {
        let cases: &[(&[u8], &str)] = &[
            (b"<html>oops", "not JSON"),
            (b"{\"code\":0,\"data\":{\"mess", "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (b"{\"code\":\"zero\"}", "`code` is not a number"),
            (b"{\"message\":\"x\"}", "no `code`"),
            (b"{\"code\":1.5}", "not an integer"),
        ];
        for (body, expected) in cases {
            let error = parse_envelope(body).expect_err("must be rejected");
            assert!(
                error.contains(expected),
                "{error:?} should contain {expected:?}"
            );
        }
    }

    #[test]
    fn envelope_null_data_becomes_empty_object() {
        let envelope = parse_envelope(br#"{"code":0,"message":null,"data":null}"#).unwrap();
        assert_eq!(envelope.code, 0);
        assert_eq!(envelope.data, serde_json::json!({}));
    }

    #[test]
    fn batches_parse_leniently_inside_a_strict_structure() {
        let data = serde_json::json!({"messages": {"alice": [
            {"id": 42, "type": "friend", "content": "hi", "sender": "alice", "sender_remark": ""},
            {"type": "sys", "content": "以下为新消息"}
        ]}});
        let batches = parse_batches(&data).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].chat, "alice");
        assert_eq!(batches[0].messages[0].id.as_deref(), Some("42"));
        assert_eq!(batches[0].messages[0].sender_remark, None);
        assert_eq!(batches[0].messages[1].id, None);

        assert!(parse_batches(&serde_json::json!({"messages": [1, 2]})).is_err());
        assert!(parse_batches(&serde_json::json!({"messages": {"a": "x"}})).is_err());
        assert!(parse_batches(&serde_json::json!({"messages": {"a": [1]}})).is_err());
        assert!(parse_batches(&serde_json::json!({})).unwrap().is_empty());
    }
}
