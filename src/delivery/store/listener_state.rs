//! What the listeners keep across a restart: the clean-stop marker, the chat tables,
//! the upstream sessions and the chat histories that recovery anchors on.

use super::*;

impl Store {
    /// Whether the previous run stopped cleanly, then marks this run as running (a kill from
    /// now on leaves the marker cleared). A new store counts as clean; an older store without
    /// a marker counts as clean only when it holds no messages.
    pub(crate) async fn begin_run(&self) -> Result<bool, StoreError> {
        self.write(|conn| {
            let marker: Option<String> = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    params![CLEAN_STOP],
                    |row| row.get(0),
                )
                .optional()?;
            let clean = match marker.as_deref() {
                Some(value) => value == "1",
                None => !conn.query_row("SELECT EXISTS (SELECT 1 FROM messages)", [], |row| {
                    row.get::<_, bool>(0)
                })?,
            };
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, '0') \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![CLEAN_STOP],
            )?;
            Ok(clean)
        })
        .await
    }

    /// Marks the run as stopped cleanly: nothing taken from an instance was left unstored.
    pub(crate) async fn mark_clean_stop(&self) -> Result<(), StoreError> {
        self.write(|conn| {
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, '1') \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![CLEAN_STOP],
            )?;
            Ok(())
        })
        .await
    }

    /// An instance's stored chat table and upstream session.
    pub(crate) async fn load_listener(
        &self,
        instance_id: String,
    ) -> Result<(Vec<StoredChat>, UpstreamSession), StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT chat, active, fixed, added_ms, last_message_ms, message_count, \
                 error_count, baseline_id FROM chats WHERE instance_id = ?1 ORDER BY chat",
            )?;
            let chats = stmt
                .query_map(params![instance_id], |row| {
                    Ok(StoredChat {
                        chat: row.get(0)?,
                        active: row.get(1)?,
                        fixed: row.get(2)?,
                        added_ms: row.get(3)?,
                        last_message_ms: row.get(4)?,
                        message_count: row.get::<_, i64>(5)?.try_into().unwrap_or(0),
                        error_count: row.get::<_, i64>(6)?.try_into().unwrap_or(0),
                        baseline: row.get(7)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let session = conn
                .query_row(
                    "SELECT epoch, started_ms FROM upstream_sessions WHERE instance_id = ?1",
                    params![instance_id],
                    |row| {
                        Ok(UpstreamSession {
                            epoch: row.get(0)?,
                            started_ms: row.get(1)?,
                        })
                    },
                )
                .optional()?
                .unwrap_or_default();
            Ok((chats, session))
        })
        .await
    }

    /// Replaces an instance's chat table in one transaction.
    pub(crate) async fn save_chats(
        &self,
        instance_id: String,
        chats: Vec<StoredChat>,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM chats WHERE instance_id = ?1",
                params![instance_id],
            )?;
            {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO chats (instance_id, chat, active, fixed, added_ms, \
                     last_message_ms, message_count, error_count, baseline_id) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for chat in &chats {
                    stmt.execute(params![
                        instance_id,
                        chat.chat,
                        chat.active,
                        chat.fixed,
                        chat.added_ms,
                        chat.last_message_ms,
                        to_i64(chat.message_count),
                        to_i64(chat.error_count),
                        chat.baseline,
                    ])?;
                }
            }
            Ok(())
        })
        .await
    }

    /// Stores an instance's upstream session.
    pub(crate) async fn save_session(
        &self,
        instance_id: String,
        session: UpstreamSession,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO upstream_sessions (instance_id, epoch, started_ms, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4) ON CONFLICT (instance_id) DO UPDATE SET \
                 epoch = excluded.epoch, started_ms = excluded.started_ms, \
                 updated_ms = excluded.updated_ms",
                params![instance_id, session.epoch, session.started_ms, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// Which of `ids` are stored for the chat in `epoch`, and the chat's newest stored
    /// messages (any epoch), oldest first.
    pub(crate) async fn chat_history(
        &self,
        instance_id: String,
        chat: String,
        epoch: u32,
        ids: Vec<String>,
    ) -> Result<ChatHistory, StoreError> {
        self.read(move |conn| {
            let mut known_ids = Vec::new();
            {
                let mut stmt = conn.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM messages \
                     WHERE instance_id = ?1 AND epoch = ?2 AND message_id = ?3)",
                )?;
                for id in ids {
                    if stmt
                        .query_row(params![instance_id, epoch, id], |row| row.get::<_, bool>(0))?
                    {
                        known_ids.push(id);
                    }
                }
            }
            let mut stmt = conn.prepare_cached(
                "SELECT sender, content FROM messages WHERE instance_id = ?1 AND chat = ?2 \
                 ORDER BY id DESC LIMIT ?3",
            )?;
            let mut tail = stmt
                .query_map(
                    params![instance_id, chat, i64::try_from(HISTORY_TAIL).unwrap_or(50)],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?
                .collect::<Result<Vec<(String, String)>, _>>()?;
            tail.reverse();
            Ok(ChatHistory { known_ids, tail })
        })
        .await
    }
}
