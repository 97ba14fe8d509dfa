//! Platform conversations and chat histories kept for continuous sessions (Dify, Coze,
//! OpenAI-compatible).

use super::*;

impl Store {
    /// The Dify conversation of a chat on a platform.
    pub(crate) async fn conversation(
        &self,
        instance_id: String,
        chat: String,
        platform_id: String,
    ) -> Result<Option<String>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT conversation_id FROM conversations \
                     WHERE instance_id = ?1 AND chat = ?2 AND platform_id = ?3",
                    params![instance_id, chat, platform_id],
                    |row| row.get(0),
                )
                .optional()?)
        })
        .await
    }

    /// Sets (or, with `None`, forgets) the conversation of a chat on a platform.
    pub(crate) async fn set_conversation(
        &self,
        instance_id: String,
        chat: String,
        platform_id: String,
        conversation_id: Option<String>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            match conversation_id {
                Some(conversation_id) => conn.execute(
                    "INSERT INTO conversations \
                     (instance_id, chat, platform_id, conversation_id, updated_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5) \
                     ON CONFLICT (instance_id, chat, platform_id) DO UPDATE SET \
                     conversation_id = excluded.conversation_id, updated_ms = excluded.updated_ms",
                    params![instance_id, chat, platform_id, conversation_id, now_ms()],
                )?,
                None => conn.execute(
                    "DELETE FROM conversations \
                     WHERE instance_id = ?1 AND chat = ?2 AND platform_id = ?3",
                    params![instance_id, chat, platform_id],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// The conversation of one sender in a chat on a platform, if any.
    pub(crate) async fn sender_conversation(
        &self,
        key: SenderKey,
    ) -> Result<Option<String>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT conversation_id FROM sender_conversations \
                     WHERE instance_id = ?1 AND chat = ?2 AND sender = ?3 AND platform_id = ?4",
                    params![key.instance_id, key.chat, key.sender, key.platform_id],
                    |row| row.get(0),
                )
                .optional()?)
        })
        .await
    }

    /// Sets (or, with `None`, forgets) the conversation of one sender in a chat on a platform.
    pub(crate) async fn set_sender_conversation(
        &self,
        key: SenderKey,
        conversation_id: Option<String>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            match conversation_id {
                Some(conversation_id) => conn.execute(
                    "INSERT INTO sender_conversations \
                     (instance_id, chat, sender, platform_id, conversation_id, updated_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                     ON CONFLICT (instance_id, chat, sender, platform_id) DO UPDATE SET \
                     conversation_id = excluded.conversation_id, updated_ms = excluded.updated_ms",
                    params![
                        key.instance_id,
                        key.chat,
                        key.sender,
                        key.platform_id,
                        conversation_id,
                        now_ms()
                    ],
                )?,
                None => conn.execute(
                    "DELETE FROM sender_conversations \
                     WHERE instance_id = ?1 AND chat = ?2 AND sender = ?3 AND platform_id = ?4",
                    params![key.instance_id, key.chat, key.sender, key.platform_id],
                )?,
            };
            Ok(())
        })
        .await
    }

    /// The last `limit` exchanges (user text, assistant text) of a chat, oldest first.
    pub(crate) async fn history(
        &self,
        instance_id: String,
        chat: String,
        platform_id: String,
        limit: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT user_text, assistant_text FROM history \
                 WHERE instance_id = ?1 AND chat = ?2 AND platform_id = ?3 \
                 ORDER BY id DESC LIMIT ?4",
            )?;
            let mut rows = stmt
                .query_map(
                    params![
                        instance_id,
                        chat,
                        platform_id,
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?
                .collect::<Result<Vec<(String, String)>, _>>()?;
            rows.reverse();
            Ok(rows)
        })
        .await
    }

    /// Appends an exchange and keeps only the newest `keep` of that chat.
    pub(crate) async fn push_history(
        &self,
        instance_id: String,
        chat: String,
        platform_id: String,
        exchange: (String, String),
        keep: usize,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO history \
                 (instance_id, chat, platform_id, user_text, assistant_text, created_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    instance_id,
                    chat,
                    platform_id,
                    exchange.0,
                    exchange.1,
                    now_ms()
                ],
            )?;
            conn.execute(
                "DELETE FROM history WHERE instance_id = ?1 AND chat = ?2 AND platform_id = ?3 \
                 AND id NOT IN (SELECT id FROM history \
                   WHERE instance_id = ?1 AND chat = ?2 AND platform_id = ?3 \
                   ORDER BY id DESC LIMIT ?4)",
                params![
                    instance_id,
                    chat,
                    platform_id,
                    i64::try_from(keep).unwrap_or(i64::MAX)
                ],
            )?;
            Ok(())
        })
        .await
    }
}
