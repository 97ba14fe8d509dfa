//! The `media` table: the file of a media message and the outcome of its one download.

use rusqlite::{OptionalExtension, params};

use super::{Store, StoreError, expect_one, now_ms};

/// What the store knows about a message's file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MediaRow {
    /// The path on the instance's machine.
    pub file_path: String,
    /// `None` until the download was tried; then one of the download outcomes.
    pub outcome: Option<String>,
    /// Where the file was kept, when it was downloaded.
    pub local_path: Option<String>,
    /// The file name shown to platforms.
    pub name: String,
    pub content_type: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// How often delivery waited for the instance to come back for this download.
    pub waits: u32,
}

// === impl Store ===

impl Store {
    /// The media row of a message row, if it has one.
    pub(crate) async fn media(&self, message_row: i64) -> Result<Option<MediaRow>, StoreError> {
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT file_path, outcome, local_path, name, content_type, size, sha256, \
                     waits FROM media WHERE message_row = ?1",
                    params![message_row],
                    |row| {
                        let size: Option<i64> = row.get(5)?;
                        Ok(MediaRow {
                            file_path: row.get(0)?,
                            outcome: row.get(1)?,
                            local_path: row.get(2)?,
                            name: row.get(3)?,
                            content_type: row.get(4)?,
                            size: size.and_then(|size| u64::try_from(size).ok()),
                            sha256: row.get(6)?,
                            waits: row.get(7)?,
                        })
                    },
                )
                .optional()?)
        })
        .await
    }

    /// Records (inserts or replaces) the outcome of a message's download.
    pub(crate) async fn set_media(
        &self,
        message_row: i64,
        media: MediaRow,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO media (message_row, file_path, outcome, local_path, name, \
                 content_type, size, sha256, waits, updated_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
                 ON CONFLICT (message_row) DO UPDATE SET file_path = excluded.file_path, \
                 outcome = excluded.outcome, local_path = excluded.local_path, \
                 name = excluded.name, content_type = excluded.content_type, \
                 size = excluded.size, sha256 = excluded.sha256, waits = excluded.waits, \
                 updated_ms = excluded.updated_ms",
                params![
                    message_row,
                    media.file_path,
                    media.outcome,
                    media.local_path,
                    media.name,
                    media.content_type,
                    media.size.and_then(|size| i64::try_from(size).ok()),
                    media.sha256,
                    media.waits,
                    now_ms()
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// Puts a `delivering` row back to `pending` without counting the attempt, because the
    /// instance that has its file is down; counts the wait on the media row.
    pub(crate) async fn mark_waiting_for_media(
        &self,
        id: i64,
        file_path: String,
        next_attempt_ms: i64,
        note: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let changed = conn.execute(
                "UPDATE messages SET state = 'pending', attempts = MAX(attempts - 1, 0), \
                 next_attempt_ms = ?2, last_error = ?3, claimed_ms = NULL, updated_ms = ?4 \
                 WHERE id = ?1 AND state = 'delivering'",
                params![id, next_attempt_ms, note, now],
            )?;
            expect_one(changed, id, "mark_waiting_for_media");
            conn.execute(
                "INSERT INTO media (message_row, file_path, waits, updated_ms) \
                 VALUES (?1, ?2, 1, ?3) \
                 ON CONFLICT (message_row) DO UPDATE SET waits = waits + 1, \
                 updated_ms = excluded.updated_ms",
                params![id, file_path, now],
            )?;
            Ok(())
        })
        .await
    }
}
