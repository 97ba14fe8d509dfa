//! The durable message store: SQLite (WAL, `storage.synchronous`), a versioned schema, and every
//! state transition of a message, each one a single committed statement or transaction.
//!
//! Writes go to one thread that owns the write connection and commits them in groups
//! (`writer.rs`): every write that arrives while a commit runs goes into the next transaction,
//! each in its own savepoint, and is answered only once that transaction is committed. Reads
//! use a second, read-only connection from the blocking pool; WAL lets them run beside the
//! writer. The async runtime never waits on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use prometheus_client::metrics::gauge::Gauge;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::config::{SendMode, Synchronous};
use crate::message::{ChatHistory, InboundMessage, StoredChat, UpstreamSession};

/// Stored messages of a chat compared with a re-read of its history (for the alignment of
/// messages without ids).
const HISTORY_TAIL: usize = 50;
/// The `meta` key of the clean-stop marker.
const CLEAN_STOP: &str = "clean_stop";

mod media;
mod reader;
mod writer;

pub(crate) use self::media::MediaRow;
use self::reader::Reader;
use self::writer::Writer;

/// How long a writer waits for the database lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

/// The schema, one step per version; `PRAGMA user_version` is the number of steps applied.
///
/// Steps are append-only: a released step is never edited, a change is a new step.
const MIGRATIONS: &[&str] = &[
    // Version 1.
    r"
    CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        instance_id     TEXT    NOT NULL,
        message_id      TEXT    NOT NULL,
        synthetic_id    INTEGER NOT NULL,
        chat            TEXT    NOT NULL,
        sender          TEXT    NOT NULL,
        sender_remark   TEXT,
        msg_type        TEXT    NOT NULL,
        mtype           TEXT,
        content         TEXT    NOT NULL,
        received_ms     INTEGER NOT NULL,
        rule_id         TEXT    NOT NULL,
        platform_id     TEXT    NOT NULL,
        reply_at_sender INTEGER NOT NULL,
        state           TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN
                        ('pending', 'delivering', 'failed', 'reply_pending', 'replying',
                         'delivered', 'dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        reply_attempts  INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0,
        claimed_ms      INTEGER,
        reply_text      TEXT,
        reply_mode      TEXT CHECK (reply_mode IN ('send', 'send-typing')),
        reply_sent_ms   INTEGER,
        last_error      TEXT,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        delivered_ms    INTEGER,
        UNIQUE (instance_id, message_id)
    );
    CREATE INDEX messages_open_by_chat ON messages (instance_id, chat, id)
        WHERE state NOT IN ('delivered', 'dead');
    CREATE INDEX messages_by_state ON messages (state, next_attempt_ms);
    CREATE INDEX messages_by_chat ON messages (instance_id, chat);
    CREATE INDEX messages_delivered ON messages (delivered_ms) WHERE state = 'delivered';

    CREATE TABLE conversations (
        instance_id     TEXT    NOT NULL,
        chat            TEXT    NOT NULL,
        platform_id     TEXT    NOT NULL,
        conversation_id TEXT    NOT NULL,
        updated_ms      INTEGER NOT NULL,
        PRIMARY KEY (instance_id, chat, platform_id)
    );

    CREATE TABLE history (
        id              INTEGER PRIMARY KEY,
        instance_id     TEXT    NOT NULL,
        chat            TEXT    NOT NULL,
        platform_id     TEXT    NOT NULL,
        user_text       TEXT    NOT NULL,
        assistant_text  TEXT    NOT NULL,
        created_ms      INTEGER NOT NULL
    );
    CREATE INDEX history_by_chat ON history (instance_id, chat, platform_id, id);
    ",
    // Version 2: conversations kept per sender (Coze continuous conversation).
    r"
    CREATE TABLE sender_conversations (
        instance_id     TEXT    NOT NULL,
        chat            TEXT    NOT NULL,
        sender          TEXT    NOT NULL,
        platform_id     TEXT    NOT NULL,
        conversation_id TEXT    NOT NULL,
        updated_ms      INTEGER NOT NULL,
        PRIMARY KEY (instance_id, chat, sender, platform_id)
    );
    ",
    // Version 3: media messages. One row per message with a file; `outcome` is NULL until
    // the download was tried, so a retry of the platform call never downloads again.
    r"
    CREATE TABLE media (
        message_row   INTEGER PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
        file_path     TEXT    NOT NULL,
        outcome       TEXT,
        local_path    TEXT,
        name          TEXT    NOT NULL DEFAULT '',
        content_type  TEXT    NOT NULL DEFAULT 'application/octet-stream',
        size          INTEGER,
        sha256        TEXT,
        waits         INTEGER NOT NULL DEFAULT 0,
        updated_ms    INTEGER NOT NULL
    );
    ",
    // Version 4: upstream ids are unique per upstream session (`epoch`), not forever; dead rows
    // remember when they died (for `dead_retention_days`); counts per state are kept by
    // triggers instead of a GROUP BY after every write; the listener's chat table, its upstream
    // sessions and the clean-stop marker live here too.
    r"
    CREATE TABLE messages_v2 (
        id              INTEGER PRIMARY KEY,
        instance_id     TEXT    NOT NULL,
        epoch           INTEGER NOT NULL DEFAULT 0,
        message_id      TEXT    NOT NULL,
        synthetic_id    INTEGER NOT NULL,
        chat            TEXT    NOT NULL,
        sender          TEXT    NOT NULL,
        sender_remark   TEXT,
        msg_type        TEXT    NOT NULL,
        mtype           TEXT,
        content         TEXT    NOT NULL,
        received_ms     INTEGER NOT NULL,
        rule_id         TEXT    NOT NULL,
        platform_id     TEXT    NOT NULL,
        reply_at_sender INTEGER NOT NULL,
        state           TEXT    NOT NULL DEFAULT 'pending' CHECK (state IN
                        ('pending', 'delivering', 'failed', 'reply_pending', 'replying',
                         'delivered', 'dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        reply_attempts  INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL DEFAULT 0,
        claimed_ms      INTEGER,
        reply_text      TEXT,
        reply_mode      TEXT CHECK (reply_mode IN ('send', 'send-typing')),
        reply_sent_ms   INTEGER,
        last_error      TEXT,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        delivered_ms    INTEGER,
        dead_ms         INTEGER,
        UNIQUE (instance_id, epoch, message_id)
    );
    INSERT INTO messages_v2 (id, instance_id, epoch, message_id, synthetic_id, chat, sender,
        sender_remark, msg_type, mtype, content, received_ms, rule_id, platform_id,
        reply_at_sender, state, attempts, reply_attempts, next_attempt_ms, claimed_ms,
        reply_text, reply_mode, reply_sent_ms, last_error, created_ms, updated_ms, delivered_ms,
        dead_ms)
    SELECT id, instance_id, 0, message_id, synthetic_id, chat, sender, sender_remark, msg_type,
        mtype, content, received_ms, rule_id, platform_id, reply_at_sender, state, attempts,
        reply_attempts, next_attempt_ms, claimed_ms, reply_text, reply_mode, reply_sent_ms,
        last_error, created_ms, updated_ms, delivered_ms,
        CASE WHEN state = 'dead' THEN updated_ms END
    FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE INDEX messages_open_by_chat ON messages (instance_id, chat, id)
        WHERE state NOT IN ('delivered', 'dead');
    CREATE INDEX messages_open ON messages (id) WHERE state NOT IN ('delivered', 'dead');
    CREATE INDEX messages_by_state ON messages (state, next_attempt_ms);
    CREATE INDEX messages_by_chat ON messages (instance_id, chat, id);
    CREATE INDEX messages_delivered ON messages (delivered_ms) WHERE state = 'delivered';
    CREATE INDEX messages_dead ON messages (dead_ms) WHERE state = 'dead';

    CREATE TABLE state_counts (
        category TEXT PRIMARY KEY CHECK (category IN ('pending', 'failed', 'delivered', 'dead')),
        n        INTEGER NOT NULL
    );
    INSERT INTO state_counts (category, n) VALUES
        ('pending', 0), ('failed', 0), ('delivered', 0), ('dead', 0);
    UPDATE state_counts SET n = (
        SELECT COUNT(*) FROM messages m WHERE
        CASE WHEN m.state = 'dead' THEN 'dead'
             WHEN m.state = 'delivered' THEN 'delivered'
             WHEN m.state = 'failed' OR (m.state = 'reply_pending' AND m.reply_attempts > 0)
                  THEN 'failed'
             ELSE 'pending' END = state_counts.category);
    CREATE TRIGGER messages_counted_insert AFTER INSERT ON messages BEGIN
        UPDATE state_counts SET n = n + 1 WHERE category =
            CASE WHEN NEW.state = 'dead' THEN 'dead'
                 WHEN NEW.state = 'delivered' THEN 'delivered'
                 WHEN NEW.state = 'failed'
                      OR (NEW.state = 'reply_pending' AND NEW.reply_attempts > 0) THEN 'failed'
                 ELSE 'pending' END;
    END;
    CREATE TRIGGER messages_counted_delete AFTER DELETE ON messages BEGIN
        UPDATE state_counts SET n = n - 1 WHERE category =
            CASE WHEN OLD.state = 'dead' THEN 'dead'
                 WHEN OLD.state = 'delivered' THEN 'delivered'
                 WHEN OLD.state = 'failed'
                      OR (OLD.state = 'reply_pending' AND OLD.reply_attempts > 0) THEN 'failed'
                 ELSE 'pending' END;
    END;
    CREATE TRIGGER messages_counted_update AFTER UPDATE OF state, reply_attempts ON messages
    BEGIN
        UPDATE state_counts SET n = n - 1 WHERE category =
            CASE WHEN OLD.state = 'dead' THEN 'dead'
                 WHEN OLD.state = 'delivered' THEN 'delivered'
                 WHEN OLD.state = 'failed'
                      OR (OLD.state = 'reply_pending' AND OLD.reply_attempts > 0) THEN 'failed'
                 ELSE 'pending' END;
        UPDATE state_counts SET n = n + 1 WHERE category =
            CASE WHEN NEW.state = 'dead' THEN 'dead'
                 WHEN NEW.state = 'delivered' THEN 'delivered'
                 WHEN NEW.state = 'failed'
                      OR (NEW.state = 'reply_pending' AND NEW.reply_attempts > 0) THEN 'failed'
                 ELSE 'pending' END;
    END;

    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );

    CREATE TABLE upstream_sessions (
        instance_id TEXT PRIMARY KEY,
        epoch       INTEGER NOT NULL,
        started_ms  INTEGER,
        updated_ms  INTEGER NOT NULL
    );

    CREATE TABLE chats (
        instance_id     TEXT    NOT NULL,
        chat            TEXT    NOT NULL,
        active          INTEGER NOT NULL,
        fixed           INTEGER NOT NULL,
        added_ms        INTEGER NOT NULL,
        last_message_ms INTEGER,
        message_count   INTEGER NOT NULL DEFAULT 0,
        error_count     INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (instance_id, chat)
    );
    ",
    // Version 5: where a chat's history stood when the sidecar started listening to it (the
    // newest message id then, '' for an empty history), so a first answer lost before anything
    // of the chat was stored can still be told apart from the history before it.
    r"
    ALTER TABLE chats ADD COLUMN baseline_id TEXT;
    ",
];

/// The first release's schema, for migration tests.
#[cfg(test)]
pub(crate) const VERSION_1: &str = MIGRATIONS[0];

/// The columns a claim returns, in `Job::from_row` order.
const JOB_COLUMNS: &str = "id, instance_id, message_id, synthetic_id, chat, sender, sender_remark, \
     msg_type, mtype, content, received_ms, rule_id, platform_id, reply_at_sender, state, \
     attempts, reply_attempts, reply_text, reply_mode, epoch";

/// Whose conversation: one sender in one chat of one instance, on one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SenderKey {
    pub instance_id: String,
    pub chat: String,
    pub sender: String,
    pub platform_id: String,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory of the database file could not be created.
    #[error("cannot create the directory of the message store {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The database could not be opened or prepared.
    #[error("cannot open the message store {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer build.
    #[error("the message store has schema version {found}, newer than the supported {supported}")]
    TooNew {
        /// The file's `user_version`.
        found: i64,
        /// The newest version this build knows.
        supported: i64,
    },
    /// WAL could not be enabled (e.g. an in-memory or read-only database).
    #[error("the message store refused WAL journaling (journal_mode is {0})")]
    NoWal(String),
    /// The commit of a batch of writes failed (the write was rolled back).
    #[error("message store commit failed: {0}")]
    Commit(String),
    /// A statement failed.
    #[error("message store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The blocking task or the connection lock failed.
    #[error("message store task failed: {0}")]
    Task(String),
}

/// Row counts by state, for the monitor API and the gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Waiting for their first platform call, in flight, or waiting to send a reply.
    pub pending: u64,
    /// Waiting for a retry after a failed platform call or a failed reply.
    pub failed: u64,
    /// Done: the platform took it and any reply was sent.
    pub delivered: u64,
    /// Gave up: a permanent error or `max_attempts` exhausted.
    pub dead: u64,
}

impl StoreCounts {
    /// Stored and not yet delivered (the `wxauto_messages_pending` gauge).
    pub fn undelivered(&self) -> u64 {
        self.pending + self.failed
    }
}

/// A message about to be stored, with the route chosen at accept time.
#[derive(Debug, Clone)]
pub(crate) struct NewMessage {
    pub message: InboundMessage,
    pub rule_id: String,
    pub platform_id: String,
    pub reply_at_sender: bool,
}

/// Which step a claimed row is at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Call the platform (state `delivering`).
    Platform,
    /// Send the stored reply (state `replying`).
    Reply,
}

/// A claimed row: only the claiming worker touches it until it moves it on.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub id: i64,
    pub message: InboundMessage,
    pub rule_id: String,
    pub platform_id: String,
    pub reply_at_sender: bool,
    pub stage: Stage,
    /// Platform attempts so far, including this one when `stage` is `Platform` (1-based).
    pub attempts: u32,
    /// Reply attempts so far, including this one when `stage` is `Reply`.
    pub reply_attempts: u32,
    pub reply_text: Option<String>,
    pub reply_mode: SendMode,
}

/// The SQLite store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    /// Every write goes through here (group commit, `writer.rs`).
    writer: Writer,
    /// Reads only, on a thread of their own; never wait for the writer's transaction (WAL).
    reader: Reader,
}

/// The gauges kept in sync with the store after every write.
#[derive(Clone, Debug, Default)]
pub(crate) struct StoreGauges {
    pub pending: Gauge,
    pub dead: Gauge,
    /// `created_ms` of the oldest open row, 0 when none; the age is computed at scrape time.
    pub oldest_open_ms: Arc<AtomicI64>,
}

/// A dead-lettered message, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The store's row id (what `retry` and `purge` take).
    pub id: i64,
    /// The instance it came from.
    pub instance_id: String,
    /// The upstream message id.
    pub message_id: String,
    /// Its idempotency key.
    pub key: String,
    /// The chat.
    pub chat: String,
    /// The platform it was routed to.
    pub platform_id: String,
    /// Platform attempts made.
    pub attempts: u32,
    /// Reply attempts made (a reply that failed keeps the platform's answer).
    pub reply_attempts: u32,
    /// Whether the platform answered and only the reply failed.
    pub reply_pending: bool,
    /// The last error (redacted when it was recorded).
    pub last_error: Option<String>,
    /// Unix milliseconds: stored, and dead.
    pub created_ms: i64,
    /// Unix milliseconds it died.
    pub dead_ms: i64,
}

// === impl Store ===

impl Store {
    /// Opens (creating if needed) and migrates the database, starts the writer thread, opens
    /// the read connection and sets the gauges.
    pub(crate) async fn open(
        path: &Path,
        synchronous: Synchronous,
        gauges: StoreGauges,
    ) -> Result<Self, StoreError> {
        let path = path.to_path_buf();
        let (write, checkpoint, read) = tokio::task::spawn_blocking(move || {
            let write = open_blocking(&path, synchronous)?;
            let checkpoint = open_checkpointer(&path, synchronous)?;
            let read = open_reader(&path)?;
            Ok::<_, StoreError>((write, checkpoint, read))
        })
        .await
        .map_err(|err| StoreError::Task(err.to_string()))??;
        let store = Self {
            writer: Writer::start(write, checkpoint, gauges)?,
            reader: Reader::start(read)?,
        };
        store.write(|_| Ok(())).await?;
        Ok(store)
    }

    /// Runs a read-only `f` on the read connection's thread (`reader.rs`).
    async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.reader.read(f).await
    }

    /// Runs a write in the writer's next batch (atomic on its own: a savepoint); answers once
    /// the batch is committed, after which the gauges show it.
    async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        self.writer.write(f).await
    }

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

    /// The oldest dead letters first, at most `limit`.
    pub(crate) async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, instance_id, message_id, epoch, chat, platform_id, attempts, \
                 reply_attempts, reply_text IS NOT NULL, last_error, created_ms, \
                 COALESCE(dead_ms, updated_ms) FROM messages WHERE state = 'dead' \
                 ORDER BY id LIMIT ?1",
            )?;
            let rows = stmt
                .query_map(params![i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                    let instance_id: String = row.get(1)?;
                    let message_id: String = row.get(2)?;
                    let epoch: u32 = row.get(3)?;
                    let key = InboundMessage {
                        instance_id: instance_id.clone(),
                        message_id: message_id.clone(),
                        epoch,
                        ..InboundMessage::default()
                    }
                    .idempotency_key();
                    Ok(DeadLetter {
                        id: row.get(0)?,
                        instance_id,
                        message_id,
                        key,
                        chat: row.get(4)?,
                        platform_id: row.get(5)?,
                        attempts: row.get(6)?,
                        reply_attempts: row.get(7)?,
                        reply_pending: row.get(8)?,
                        last_error: row.get(9)?,
                        created_ms: row.get(10)?,
                        dead_ms: row.get(11)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// Puts dead rows (all, or those of `ids`) back in the queue with fresh attempt budgets:
    /// a row whose platform already answered only re-sends its reply (`reply_pending`), any
    /// other is delivered to its platform again (`pending`). Returns how many.
    pub(crate) async fn retry_dead(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let sql = "UPDATE messages SET \
                 state = CASE WHEN reply_text IS NOT NULL THEN 'reply_pending' ELSE 'pending' END, \
                 attempts = CASE WHEN reply_text IS NOT NULL THEN attempts ELSE 0 END, \
                 reply_attempts = 0, next_attempt_ms = ?1, claimed_ms = NULL, dead_ms = NULL, \
                 updated_ms = ?1 WHERE state = 'dead'";
            let n = match ids {
                None => conn.execute(sql, params![now])?,
                Some(ids) => {
                    let mut stmt = conn.prepare(&format!("{sql} AND id = ?2"))?;
                    let mut n = 0;
                    for id in ids {
                        n += stmt.execute(params![now, id])?;
                    }
                    n
                }
            };
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Deletes dead rows (all, or those of `ids`); returns how many.
    pub(crate) async fn purge_dead(&self, ids: Option<Vec<i64>>) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let sql = "DELETE FROM messages WHERE state = 'dead'";
            let n = match ids {
                None => conn.execute(sql, [])?,
                Some(ids) => {
                    let mut stmt = conn.prepare(&format!("{sql} AND id = ?1"))?;
                    let mut n = 0;
                    for id in ids {
                        n += stmt.execute(params![id])?;
                    }
                    n
                }
            };
            Ok(u64::try_from(n).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Puts rows a crash left in flight back in their queue: `delivering` → `pending` (the
    /// platform is called again) and `replying` → `reply_pending` (only the reply is re-sent).
    pub(crate) async fn recover(&self) -> Result<u64, StoreError> {
        self.write(|conn| {
            let now = now_ms();
            let platform = conn.execute(
                "UPDATE messages SET state = 'pending', claimed_ms = NULL, updated_ms = ?1 \
                 WHERE state = 'delivering'",
                params![now],
            )?;
            let reply = conn.execute(
                "UPDATE messages SET state = 'reply_pending', claimed_ms = NULL, updated_ms = ?1 \
                 WHERE state = 'replying'",
                params![now],
            )?;
            Ok(u64::try_from(platform + reply).unwrap_or(u64::MAX))
        })
        .await
    }

    /// Inserts a batch in one transaction; returns, per message, whether it was new (false:
    /// a row with the same `(instance_id, message_id)` already exists).
    pub(crate) async fn insert_batch(
        &self,
        rows: Vec<NewMessage>,
    ) -> Result<Vec<bool>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        self.write(move |conn| {
            let now = now_ms();
            let mut inserted = Vec::with_capacity(rows.len());
            {
                let mut stmt = conn.prepare_cached(
                    "INSERT OR IGNORE INTO messages (instance_id, message_id, synthetic_id, chat, \
                     sender, sender_remark, msg_type, mtype, content, received_ms, rule_id, \
                     platform_id, reply_at_sender, state, next_attempt_ms, created_ms, updated_ms, \
                     epoch) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 'pending', \
                     ?14, ?14, ?14, ?15)",
                )?;
                for row in &rows {
                    let msg = &row.message;
                    let n = stmt.execute(params![
                        msg.instance_id,
                        msg.message_id,
                        msg.synthetic_id,
                        msg.chat,
                        msg.sender,
                        msg.sender_remark,
                        msg.msg_type,
                        msg.mtype,
                        msg.content,
                        msg.received_at.timestamp_millis(),
                        row.rule_id,
                        row.platform_id,
                        row.reply_at_sender,
                        now,
                        msg.epoch,
                    ])?;
                    if n == 1
                        && let Some(file_path) = &msg.file_path
                    {
                        conn.execute(
                            "INSERT INTO media (message_row, file_path, updated_ms) \
                             VALUES (?1, ?2, ?3)",
                            params![conn.last_insert_rowid(), file_path, now],
                        )?;
                    }
                    inserted.push(n == 1);
                }
            }
            Ok(inserted)
        })
        .await
    }

    /// Claims the next due row, if any (`claim_batch` of one).
    #[cfg(test)]
    pub(crate) async fn claim(&self, now: i64) -> Result<Option<Job>, StoreError> {
        Ok(self.claim_batch(now, 1).await?.pop())
    }

    /// Claims up to `limit` due rows in one write, oldest first, each the head of its chat
    /// (no earlier row of the same instance and chat is still open), so a chat is delivered
    /// in order and never by two workers at once: at most one row per chat is in flight.
    pub(crate) async fn claim_batch(&self, now: i64, limit: usize) -> Result<Vec<Job>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.write(move |conn| {
            let mut heads = chat_heads(conn, now)?;
            heads.sort_unstable();
            heads.truncate(limit);
            let mut stmt = conn.prepare_cached(&format!(
                "UPDATE messages SET \
                   state = CASE state WHEN 'reply_pending' THEN 'replying' \
                           ELSE 'delivering' END, \
                   attempts = attempts + (state IN ('pending', 'failed')), \
                   reply_attempts = reply_attempts + (state = 'reply_pending'), \
                   claimed_ms = ?2, updated_ms = ?2 \
                 WHERE id = ?1 AND state IN ('pending', 'failed', 'reply_pending') \
                 RETURNING {JOB_COLUMNS}"
            ))?;
            let mut jobs = Vec::with_capacity(heads.len());
            for id in heads {
                if let Some(job) = stmt.query_row(params![id, now], Job::from_row).optional()? {
                    jobs.push(job);
                }
            }
            Ok(jobs)
        })
        .await
    }

    /// The earliest future retry time, to sleep until it.
    pub(crate) async fn next_due(&self, now: i64) -> Result<Option<i64>, StoreError> {
        self.read(move |conn| {
            Ok(conn.query_row(
                "SELECT MIN(next_attempt_ms) FROM messages \
                 WHERE state IN ('pending', 'failed', 'reply_pending') AND next_attempt_ms > ?1",
                params![now],
                |row| row.get::<_, Option<i64>>(0),
            )?)
        })
        .await
    }

    /// Moves a `delivering` row to a new platform after a reload removed its old one.
    pub(crate) async fn reroute(
        &self,
        id: i64,
        rule_id: String,
        platform_id: String,
        reply_at_sender: bool,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET rule_id = ?2, platform_id = ?3, reply_at_sender = ?4, \
                 updated_ms = ?5 WHERE id = ?1 AND state = 'delivering'",
                params![id, rule_id, platform_id, reply_at_sender, now_ms()],
            )?;
            expect_one(changed, id, "reroute");
            Ok(())
        })
        .await
    }

    /// The platform took the message and answered without a reply: `delivering` → `delivered`.
    pub(crate) async fn mark_delivered(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let changed = conn.execute(
                "UPDATE messages SET state = 'delivered', delivered_ms = ?2, updated_ms = ?2, \
                 claimed_ms = NULL, last_error = NULL WHERE id = ?1 AND state = 'delivering'",
                params![id, now],
            )?;
            expect_one(changed, id, "mark_delivered");
            Ok(())
        })
        .await
    }

    /// The platform answered with a reply: store it and keep the row claimed for the reply,
    /// `delivering` → `replying` (the first reply attempt), in one statement.
    pub(crate) async fn store_reply(
        &self,
        id: i64,
        text: String,
        mode: SendMode,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET state = 'replying', reply_text = ?2, reply_mode = ?3, \
                 reply_attempts = 1, last_error = NULL, updated_ms = ?4 \
                 WHERE id = ?1 AND state = 'delivering'",
                params![id, text, mode_str(mode), now_ms()],
            )?;
            expect_one(changed, id, "store_reply");
            Ok(())
        })
        .await
    }

    /// The reply was sent: `replying` → `delivered`.
    pub(crate) async fn mark_replied(&self, id: i64) -> Result<(), StoreError> {
        self.write(move |conn| {
            let now = now_ms();
            let changed = conn.execute(
                "UPDATE messages SET state = 'delivered', reply_sent_ms = ?2, delivered_ms = ?2, \
                 updated_ms = ?2, claimed_ms = NULL, last_error = NULL \
                 WHERE id = ?1 AND state = 'replying'",
                params![id, now],
            )?;
            expect_one(changed, id, "mark_replied");
            Ok(())
        })
        .await
    }

    /// A retryable failure: back to the queue at `next_attempt_ms`. A platform failure goes
    /// to `failed`, a reply failure to `reply_pending` (the platform is not called again).
    pub(crate) async fn mark_retry(
        &self,
        id: i64,
        stage: Stage,
        next_attempt_ms: i64,
        error: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let (to, from) = match stage {
                Stage::Platform => ("failed", "delivering"),
                Stage::Reply => ("reply_pending", "replying"),
            };
            let changed = conn.execute(
                "UPDATE messages SET state = ?2, next_attempt_ms = ?3, last_error = ?4, \
                 claimed_ms = NULL, updated_ms = ?5 WHERE id = ?1 AND state = ?6",
                params![id, to, next_attempt_ms, error, now_ms(), from],
            )?;
            expect_one(changed, id, "mark_retry");
            Ok(())
        })
        .await
    }

    /// Puts a `replying` row back to `reply_pending` without counting the attempt: the
    /// instance is down, so the reply waits for it instead of using up its budget.
    pub(crate) async fn mark_waiting_for_instance(
        &self,
        id: i64,
        next_attempt_ms: i64,
        note: String,
    ) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET state = 'reply_pending', \
                 reply_attempts = MAX(reply_attempts - 1, 0), next_attempt_ms = ?2, \
                 last_error = ?3, claimed_ms = NULL, updated_ms = ?4 \
                 WHERE id = ?1 AND state = 'replying'",
                params![id, next_attempt_ms, note, now_ms()],
            )?;
            expect_one(changed, id, "mark_waiting_for_instance");
            Ok(())
        })
        .await
    }

    /// Gives up on a claimed row: → `dead`. Dead rows are kept for the operator (until
    /// `storage.dead_retention_days`) and no longer block their chat.
    pub(crate) async fn mark_dead(&self, id: i64, error: String) -> Result<(), StoreError> {
        self.write(move |conn| {
            let changed = conn.execute(
                "UPDATE messages SET state = 'dead', last_error = ?2, claimed_ms = NULL, \
                 updated_ms = ?3, dead_ms = ?3 WHERE id = ?1 AND state IN ('delivering', 'replying')",
                params![id, error, now_ms()],
            )?;
            expect_one(changed, id, "mark_dead");
            Ok(())
        })
        .await
    }

    /// Deletes delivered rows delivered before `delivered_cutoff_ms` and dead rows that died
    /// before `dead_cutoff_ms`; returns how many of each.
    pub(crate) async fn prune(
        &self,
        delivered_cutoff_ms: i64,
        dead_cutoff_ms: i64,
    ) -> Result<(u64, u64), StoreError> {
        self.write(move |conn| {
            let delivered = conn.execute(
                "DELETE FROM messages WHERE state = 'delivered' AND delivered_ms < ?1",
                params![delivered_cutoff_ms],
            )?;
            let dead = conn.execute(
                "DELETE FROM messages WHERE state = 'dead' AND dead_ms < ?1",
                params![dead_cutoff_ms],
            )?;
            Ok((
                u64::try_from(delivered).unwrap_or(u64::MAX),
                u64::try_from(dead).unwrap_or(u64::MAX),
            ))
        })
        .await
    }

    /// Messages stored per chat (any state), for the listeners JSON.
    pub(crate) async fn message_counts(
        &self,
        chats: Vec<(String, String)>,
    ) -> Result<HashMap<(String, String), u64>, StoreError> {
        // One blocking call and one prepared statement for the whole list, not one per chat.
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT COUNT(*) FROM messages WHERE instance_id = ?1 AND chat = ?2",
            )?;
            let mut counts = HashMap::with_capacity(chats.len());
            for (instance_id, chat) in chats {
                let n: i64 = statement.query_row(params![instance_id, chat], |row| row.get(0))?;
                counts.insert((instance_id, chat), u64::try_from(n).unwrap_or(0));
            }
            Ok(counts)
        })
        .await
    }

    /// Row counts by state (kept by triggers: O(1), whatever the backlog).
    pub(crate) async fn counts(&self) -> Result<StoreCounts, StoreError> {
        self.read(counts_blocking).await
    }

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

    /// Test helper: the state, attempts and reply text of one message.
    #[cfg(test)]
    pub(crate) async fn row_state(
        &self,
        instance_id: &str,
        message_id: &str,
    ) -> Option<(String, u32, Option<String>)> {
        let (instance_id, message_id) = (instance_id.to_owned(), message_id.to_owned());
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT state, attempts, reply_text FROM messages \
                     WHERE instance_id = ?1 AND message_id = ?2",
                    params![instance_id, message_id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?)
        })
        .await
        .ok()
        .flatten()
    }

    /// Test helper: runs raw SQL (e.g. to age rows).
    #[cfg(test)]
    pub(crate) async fn exec(&self, sql: &'static str) {
        self.write(move |conn| Ok(conn.execute_batch(sql)?))
            .await
            .expect("test SQL runs");
    }
}

/// Test helper: the schema version a fully migrated file has.
#[cfg(test)]
pub(crate) fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

// === impl Job ===

impl Job {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        let received_ms: i64 = row.get(10)?;
        let state: String = row.get(14)?;
        let reply_mode: Option<String> = row.get(18)?;
        Ok(Self {
            id: row.get(0)?,
            message: InboundMessage {
                instance_id: row.get(1)?,
                message_id: row.get(2)?,
                synthetic_id: row.get(3)?,
                chat: row.get(4)?,
                sender: row.get(5)?,
                sender_remark: row.get(6)?,
                msg_type: row.get(7)?,
                mtype: row.get(8)?,
                content: row.get(9)?,
                // Kept in the `media` table; the worker loads it with the download's result.
                file_path: None,
                received_at: from_ms(received_ms),
                epoch: row.get(19)?,
            },
            rule_id: row.get(11)?,
            platform_id: row.get(12)?,
            reply_at_sender: row.get(13)?,
            stage: if state == "replying" {
                Stage::Reply
            } else {
                Stage::Platform
            },
            attempts: row.get(15)?,
            reply_attempts: row.get(16)?,
            reply_text: row.get(17)?,
            reply_mode: match reply_mode.as_deref() {
                Some("send-typing") => SendMode::Typing,
                _ => SendMode::Normal,
            },
        })
    }
}

// === helpers ===

#[allow(clippy::disallowed_methods, reason = "runs on the store's own thread")]
fn open_blocking(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::NoWal(mode));
    }
    conn.pragma_update(None, "synchronous", synchronous.pragma())
        .map_err(open_err)?;
    // The checkpoint thread checkpoints (writer.rs); this connection's commits never wait for one.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(open_err)?;
    // Migrations run with foreign keys off, as SQLite's procedure for rebuilding a table asks:
    // dropping the old `messages` must not cascade into the tables that reference it. (The
    // bundled SQLite turns them on by default, so say it.)
    conn.pragma_update(None, "foreign_keys", "OFF")
        .map_err(open_err)?;
    migrate(&mut conn)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    Ok(conn)
}

/// The checkpoint thread's connection: opened after the writer migrated the file; its
/// `synchronous` decides the checkpoint's fsyncs, so it is the store's.
fn open_checkpointer(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.pragma_update(None, "synchronous", synchronous.pragma())
        .map_err(open_err)?;
    Ok(conn)
}

/// The read connection: opened after the writer migrated the file, refuses writes.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.pragma_update(None, "query_only", "ON")
        .map_err(open_err)?;
    Ok(conn)
}

/// Applies the missing migration steps, each in its own transaction with its version bump.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let supported = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let found: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > supported {
        return Err(StoreError::TooNew { found, supported });
    }
    for (version, step) in (1..)
        .zip(MIGRATIONS)
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
        tracing::info!(version, "Message store migrated.");
    }
    Ok(())
}

/// The ids of the claimable heads of chats: for every chat with an open row, its oldest open
/// row, if that row waits for a platform call or a reply and is due. One index seek per chat
/// with open rows (a skip scan of `messages_open_by_chat`), whatever the backlog behind them.
fn chat_heads(conn: &Connection, now: i64) -> Result<Vec<i64>, StoreError> {
    const HEAD: &str = "SELECT id, instance_id, chat, \
         state IN ('pending', 'failed', 'reply_pending') AND next_attempt_ms <= ?1 \
         FROM messages INDEXED BY messages_open_by_chat \
         WHERE state NOT IN ('delivered', 'dead')";
    let mut first =
        conn.prepare_cached(&format!("{HEAD} ORDER BY instance_id, chat, id LIMIT 1"))?;
    let mut next_chat = conn.prepare_cached(&format!(
        "{HEAD} AND instance_id = ?2 AND chat > ?3 ORDER BY instance_id, chat, id LIMIT 1"
    ))?;
    let mut next_instance = conn.prepare_cached(&format!(
        "{HEAD} AND instance_id > ?2 ORDER BY instance_id, chat, id LIMIT 1"
    ))?;
    type Head = (i64, String, String, bool);
    let head = |row: &Row<'_>| -> rusqlite::Result<Head> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    };
    let mut ids = Vec::new();
    let mut current = first.query_row(params![now], head).optional()?;
    while let Some((id, instance_id, chat, claimable)) = current {
        if claimable {
            ids.push(id);
        }
        current = match next_chat
            .query_row(params![now, instance_id, chat], head)
            .optional()?
        {
            Some(next) => Some(next),
            None => next_instance
                .query_row(params![now, instance_id], head)
                .optional()?,
        };
    }
    Ok(ids)
}

/// The counts the triggers of schema version 2 keep: four rows, whatever the table holds.
fn counts_blocking(conn: &Connection) -> Result<StoreCounts, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT category, n FROM state_counts")?;
    let mut counts = StoreCounts::default();
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let category: String = row.get(0)?;
        let n = u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0);
        match category.as_str() {
            "failed" => counts.failed = n,
            "dead" => counts.dead = n,
            "delivered" => counts.delivered = n,
            _ => counts.pending = n,
        }
    }
    Ok(counts)
}

/// `created_ms` of the oldest open row (through the partial index `messages_open`).
fn oldest_open_blocking(conn: &Connection) -> Result<Option<i64>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT created_ms FROM messages WHERE state NOT IN ('delivered', 'dead') \
         ORDER BY id LIMIT 1",
    )?;
    Ok(stmt.query_row([], |row| row.get(0)).optional()?)
}

/// Logs a transition that found its row in an unexpected state (a bug, or a row changed by
/// hand); the worker carries on, as the row is then no longer its to move.
fn expect_one(changed: usize, id: i64, transition: &str) {
    if changed != 1 {
        tracing::warn!(id, transition, "Message row was not in the expected state.");
    }
}

fn mode_str(mode: SendMode) -> &'static str {
    match mode {
        SendMode::Normal => "send",
        SendMode::Typing => "send-typing",
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Milliseconds since the epoch, the store's clock.
pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_message(id: &str, chat: &str, epoch: u32) -> NewMessage {
        NewMessage {
            message: InboundMessage {
                instance_id: "wx".to_owned(),
                chat: chat.to_owned(),
                message_id: id.to_owned(),
                msg_type: "friend".to_owned(),
                sender: "alice".to_owned(),
                content: format!("text {id}"),
                epoch,
                ..InboundMessage::default()
            },
            rule_id: "r".to_owned(),
            platform_id: "p".to_owned(),
            reply_at_sender: false,
        }
    }

    async fn open(path: &Path) -> Store {
        Store::open(path, Synchronous::Normal, StoreGauges::default())
            .await
            .expect("store opens")
    }

    /// Checkpoints run off the writer (its automatic checkpoint is off), and they keep the
    /// WAL from growing: the log is reused from its start once a checkpoint has copied it.
    /// Without the checkpoint thread the WAL would hold every page written here (about
    /// 20 x 100 pages); with it, about two rounds' worth at most.
    #[tokio::test]
    async fn the_checkpoint_thread_keeps_the_wal_small() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wal.db");
        let store = open(&path).await;
        store
            .write(|conn| {
                conn.execute_batch("CREATE TABLE scratch (b BLOB)")?;
                Ok(())
            })
            .await
            .unwrap();
        let wal = dir.path().join("wal.db-wal");
        let round_bytes: u64 = 400_000;
        for round in 0..20 {
            let before = store.writer.checkpoints();
            store
                .write(move |conn| {
                    conn.execute("DELETE FROM scratch", [])?;
                    conn.execute(
                        "INSERT INTO scratch (b) VALUES (zeroblob(?1))",
                        params![i64::try_from(round_bytes).unwrap()],
                    )?;
                    Ok(())
                })
                .await
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while store.writer.checkpoints() == before {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no checkpoint after round {round}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let size = tokio::fs::metadata(&wal).await.unwrap().len();
        assert!(
            size < 3 * round_bytes,
            "the WAL grew to {size} bytes over 20 rounds of {round_bytes}"
        );
    }

    /// A file written by the first release (schema version 1) keeps its rows, their states
    /// and their dedupe, and gets correct counts from the new triggers.
    #[tokio::test]
    async fn version_1_files_migrate_with_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            for (id, state) in [("a", "pending"), ("b", "dead"), ("c", "delivered")] {
                conn.execute(
                    "INSERT INTO messages (instance_id, message_id, synthetic_id, chat, sender, \
                     msg_type, content, received_ms, rule_id, platform_id, reply_at_sender, \
                     state, created_ms, updated_ms) \
                     VALUES ('wx', ?1, 0, 'c', 's', 'friend', 'x', 1, 'r', 'p', 0, ?2, 5, 7)",
                    params![id, state],
                )
                .unwrap();
            }
        }
        let store = open(&path).await;
        let counts = store.counts().await.unwrap();
        assert_eq!(
            (counts.pending, counts.dead, counts.delivered),
            (1, 1, 1),
            "{counts:?}"
        );
        // Old rows are epoch 0: the same id again is a duplicate there, new in epoch 1.
        let inserted = store
            .insert_batch(vec![new_message("a", "c", 0), new_message("a", "c", 1)])
            .await
            .unwrap();
        assert_eq!(inserted, vec![false, true]);
        let dead = store.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].message_id, "b");
        assert_eq!(
            dead[0].dead_ms, 7,
            "a migrated dead row died at its last update"
        );
    }

    /// Rebuilding `messages` (step 4) keeps the rows of tables that reference it.
    #[tokio::test]
    async fn the_messages_rebuild_keeps_media_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v3.db");
        {
            let conn = Connection::open(&path).unwrap();
            for step in &MIGRATIONS[..3] {
                conn.execute_batch(step).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                "INSERT INTO messages (id, instance_id, message_id, synthetic_id, chat, sender, \
                 msg_type, content, received_ms, rule_id, platform_id, reply_at_sender, \
                 created_ms, updated_ms) \
                 VALUES (7, 'wx', 'img', 0, 'c', 's', 'friend', '', 1, 'r', 'p', 0, 5, 5)",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO media (message_row, file_path, updated_ms) VALUES (7, 'C:\\a.png', 5)",
                [],
            )
            .unwrap();
        }
        let store = open(&path).await;
        let media: i64 = store
            .read(|conn| {
                Ok(conn.query_row(
                    "SELECT COUNT(*) FROM media JOIN messages ON messages.id = media.message_row",
                    [],
                    |row| row.get(0),
                )?)
            })
            .await
            .unwrap();
        assert_eq!(media, 1);
    }

    /// The trigger-kept counts match a full count after every kind of transition.
    #[tokio::test]
    async fn counts_follow_every_transition() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("c.db")).await;
        let rows: Vec<NewMessage> = (0..6)
            .map(|n| new_message(&format!("m{n}"), &format!("chat{n}"), 0))
            .collect();
        store.insert_batch(rows).await.unwrap();
        let check = |store: &Store| {
            let store = store.clone();
            async move {
                let fast = store.counts().await.unwrap();
                let slow = store
                    .read(|conn| {
                        let count = |sql: &str| -> Result<u64, StoreError> {
                            Ok(conn.query_row(sql, [], |row| row.get::<_, i64>(0))? as u64)
                        };
                        Ok(StoreCounts {
                            pending: count(
                                "SELECT COUNT(*) FROM messages WHERE state IN ('pending', \
                                 'delivering', 'replying') OR (state = 'reply_pending' AND \
                                 reply_attempts = 0)",
                            )?,
                            failed: count(
                                "SELECT COUNT(*) FROM messages WHERE state = 'failed' OR \
                                 (state = 'reply_pending' AND reply_attempts > 0)",
                            )?,
                            delivered: count(
                                "SELECT COUNT(*) FROM messages WHERE state = 'delivered'",
                            )?,
                            dead: count("SELECT COUNT(*) FROM messages WHERE state = 'dead'")?,
                        })
                    })
                    .await
                    .unwrap();
                assert_eq!(fast, slow);
                fast
            }
        };
        assert_eq!(check(&store).await.pending, 6);
        let now = now_ms();
        let mut jobs = Vec::new();
        while let Some(job) = store.claim(now).await.unwrap() {
            jobs.push(job);
        }
        assert_eq!(jobs.len(), 6);
        store.mark_delivered(jobs[0].id).await.unwrap();
        store
            .mark_retry(jobs[1].id, Stage::Platform, now + 60_000, "x".to_owned())
            .await
            .unwrap();
        store
            .store_reply(jobs[2].id, "r".to_owned(), SendMode::Normal)
            .await
            .unwrap();
        store
            .mark_retry(jobs[2].id, Stage::Reply, now + 60_000, "y".to_owned())
            .await
            .unwrap();
        store.mark_dead(jobs[3].id, "z".to_owned()).await.unwrap();
        store.mark_dead(jobs[4].id, "z".to_owned()).await.unwrap();
        let counts = check(&store).await;
        assert_eq!(
            (counts.pending, counts.failed, counts.delivered, counts.dead),
            (1, 2, 1, 2)
        );
        assert_eq!(store.retry_dead(Some(vec![jobs[3].id])).await.unwrap(), 1);
        assert_eq!(check(&store).await.dead, 1);
        assert_eq!(store.purge_dead(None).await.unwrap(), 1);
        let counts = check(&store).await;
        assert_eq!(counts.dead, 0);
        let later = now_ms() + 1_000;
        store.prune(later, later).await.unwrap();
        assert_eq!(check(&store).await.delivered, 0);
    }

    /// A retried dead letter starts over; one whose platform already answered only re-sends
    /// its reply (calling the platform again would answer the person twice).
    #[tokio::test]
    async fn retried_dead_letters_resume_where_they_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("d.db")).await;
        store
            .insert_batch(vec![new_message("p", "a", 0), new_message("q", "b", 0)])
            .await
            .unwrap();
        let now = now_ms();
        let first = store.claim(now).await.unwrap().unwrap();
        let second = store.claim(now).await.unwrap().unwrap();
        store
            .mark_dead(first.id, "platform said 400".to_owned())
            .await
            .unwrap();
        store
            .store_reply(second.id, "hi".to_owned(), SendMode::Normal)
            .await
            .unwrap();
        store
            .mark_dead(second.id, "reply failed".to_owned())
            .await
            .unwrap();
        let dead = store.dead_letters(10).await.unwrap();
        assert_eq!(dead.len(), 2);
        assert_eq!(dead[0].last_error.as_deref(), Some("platform said 400"));
        assert!(!dead[0].reply_pending);
        assert!(dead[1].reply_pending);
        assert_eq!(dead[0].key, "wx:p");

        assert_eq!(store.retry_dead(None).await.unwrap(), 2);
        let now = now_ms();
        let again: Vec<Job> = [
            store.claim(now).await.unwrap(),
            store.claim(now).await.unwrap(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let platform = again.iter().find(|job| job.id == first.id).unwrap();
        assert_eq!((platform.stage, platform.attempts), (Stage::Platform, 1));
        let reply = again.iter().find(|job| job.id == second.id).unwrap();
        assert_eq!(reply.stage, Stage::Reply);
        assert_eq!(reply.reply_text.as_deref(), Some("hi"));
        assert_eq!(reply.reply_attempts, 1);
        assert!(store.dead_letters(10).await.unwrap().is_empty());
    }

    /// Batched claims take at most one row per chat, always the chat's oldest open row, never
    /// a row of a chat that has one in flight or one waiting for its retry; completions sent
    /// together (one commit) all land.
    #[tokio::test]
    async fn batched_claims_take_each_chats_head_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("b.db")).await;
        let chats = ["a", "b", "c", "d"];
        let rows: Vec<NewMessage> = (0..40)
            .map(|n| new_message(&format!("m{n}"), chats[n % chats.len()], 0))
            .collect();
        store.insert_batch(rows).await.unwrap();
        let now = now_ms();
        // Chat d's head failed and waits for a retry: the whole chat waits behind it.
        let first = store.claim_batch(now, 4).await.unwrap();
        assert_eq!(first.len(), 4, "one head per chat");
        let d = first.iter().find(|job| job.message.chat == "d").unwrap();
        store
            .mark_retry(d.id, Stage::Platform, now + 3_600_000, "later".to_owned())
            .await
            .unwrap();
        let mut in_flight: HashMap<String, i64> = first
            .iter()
            .filter(|job| job.message.chat != "d")
            .map(|job| (job.message.chat.clone(), job.id))
            .collect();
        let mut done: HashMap<String, Vec<i64>> = HashMap::new();
        for round in 0.. {
            assert!(round < 100, "the queue drains");
            let jobs = store.claim_batch(now, 8).await.unwrap();
            for job in &jobs {
                assert_ne!(job.message.chat, "d", "a chat waits behind its failed head");
                assert!(
                    in_flight.insert(job.message.chat.clone(), job.id).is_none(),
                    "two rows of chat {} in flight",
                    job.message.chat
                );
            }
            if in_flight.is_empty() {
                break;
            }
            // Finish every other chat's row, all at once (they share commits).
            let finishing: Vec<(String, i64)> = in_flight
                .iter()
                .filter(|(chat, _)| round % 2 == 0 || chat.as_str() != "a")
                .map(|(chat, id)| (chat.clone(), *id))
                .collect();
            let marks: Vec<_> = finishing
                .iter()
                .map(|(_, id)| {
                    let (store, id) = (store.clone(), *id);
                    tokio::spawn(async move { store.mark_delivered(id).await })
                })
                .collect();
            for mark in marks {
                mark.await.unwrap().unwrap();
            }
            for (chat, id) in finishing {
                in_flight.remove(&chat);
                done.entry(chat).or_default().push(id);
            }
        }
        for chat in ["a", "b", "c"] {
            let ids = &done[chat];
            assert_eq!(ids.len(), 10, "chat {chat}");
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "chat {chat}: {ids:?}");
        }
        let counts = store.counts().await.unwrap();
        assert_eq!(
            (counts.delivered, counts.failed, counts.pending),
            (30, 1, 9)
        );
    }

    /// A write that fails inside a batch is rolled back alone; the writes committed with it
    /// stand.
    #[tokio::test]
    async fn a_failing_write_does_not_take_its_batch_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir.path().join("f.db")).await;
        store
            .insert_batch(vec![new_message("x", "a", 0), new_message("y", "b", 0)])
            .await
            .unwrap();
        let jobs = store.claim_batch(now_ms(), 2).await.unwrap();
        let failing = store.write(|conn| {
            conn.execute("UPDATE messages SET state = 'delivered'", [])?;
            conn.execute("INSERT INTO no_such_table VALUES (1)", [])?;
            Ok(())
        });
        let (failed, first, second) = tokio::join!(
            failing,
            store.mark_delivered(jobs[0].id),
            store.mark_retry(jobs[1].id, Stage::Platform, 0, "e".to_owned()),
        );
        assert!(failed.is_err());
        first.unwrap();
        second.unwrap();
        let counts = store.counts().await.unwrap();
        assert_eq!((counts.delivered, counts.failed), (1, 1), "{counts:?}");
    }

    /// The clean-stop marker: a new store is clean, a run that was not marked is not.
    #[tokio::test]
    async fn the_clean_stop_marker_tells_a_kill_from_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let store = open(&path).await;
        assert!(
            store.begin_run().await.unwrap(),
            "a new store has nothing to recover"
        );
        drop(store);
        // Killed: never marked.
        let store = open(&path).await;
        assert!(!store.begin_run().await.unwrap());
        store.mark_clean_stop().await.unwrap();
        drop(store);
        let store = open(&path).await;
        assert!(store.begin_run().await.unwrap());
        drop(store);
        let store = open(&path).await;
        assert!(
            !store.begin_run().await.unwrap(),
            "each run clears the marker"
        );
    }

    #[tokio::test]
    async fn chat_tables_sessions_and_history_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let store = open(&path).await;
        let chats = vec![
            StoredChat {
                chat: "群 A".to_owned(),
                active: true,
                fixed: false,
                added_ms: 1_000,
                last_message_ms: Some(2_000),
                message_count: 3,
                error_count: 1,
                baseline: Some("b-7".to_owned()),
            },
            StoredChat {
                chat: "bob".to_owned(),
                active: false,
                fixed: false,
                added_ms: 5,
                last_message_ms: None,
                message_count: 0,
                error_count: 0,
                baseline: None,
            },
        ];
        store
            .save_chats("wx".to_owned(), chats.clone())
            .await
            .unwrap();
        let session = UpstreamSession {
            epoch: 3,
            started_ms: Some(42),
        };
        store.save_session("wx".to_owned(), session).await.unwrap();
        drop(store);
        let store = open(&path).await;
        let (loaded, loaded_session) = store.load_listener("wx".to_owned()).await.unwrap();
        let mut expected = chats;
        expected.sort_by(|a, b| a.chat.cmp(&b.chat));
        assert_eq!(loaded, expected);
        assert_eq!(loaded_session, session);
        let (none, default) = store.load_listener("other".to_owned()).await.unwrap();
        assert!(none.is_empty());
        assert_eq!(default, UpstreamSession::default());

        store
            .insert_batch(vec![
                new_message("1", "群 A", 3),
                new_message("2", "群 A", 3),
                new_message("3", "群 A", 2),
            ])
            .await
            .unwrap();
        let history = store
            .chat_history(
                "wx".to_owned(),
                "群 A".to_owned(),
                3,
                vec!["1".to_owned(), "3".to_owned(), "9".to_owned()],
            )
            .await
            .unwrap();
        assert_eq!(
            history.known_ids,
            vec!["1".to_owned()],
            "3 is of another epoch"
        );
        let contents: Vec<&str> = history.tail.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(contents, ["text 1", "text 2", "text 3"]);
    }
}
