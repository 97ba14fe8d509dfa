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

mod conversations;
mod dead;
mod listener_state;
mod media;
mod reader;
mod schema;
mod transitions;
mod writer;

pub(crate) use self::media::MediaRow;
use self::reader::Reader;
#[cfg(test)]
use self::schema::MIGRATIONS;
#[cfg(test)]
pub(crate) use self::schema::{VERSION_1, schema_version};
use self::schema::{open_blocking, open_checkpointer, open_reader};
use self::writer::Writer;

/// How long a writer waits for the database lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_millis(5000);

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

/// Runs a caller's closure on a store thread's connection: a panic in it becomes that
/// caller's error (`what`: "read", "write"), and the thread goes on with the next one.
fn run_caught<R>(
    f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    conn: &Connection,
    what: &str,
) -> Result<R, StoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(conn)))
        .unwrap_or_else(|_| Err(StoreError::Task(format!("a message store {what} panicked"))))
}

/// The error of a call whose store thread (`thread`: "reader", "writer") is gone.
fn stopped(thread: &str) -> StoreError {
    StoreError::Task(format!("the message store {thread} stopped"))
}

/// Waits for a store thread's answer; `stopped(thread)` when the thread dropped the request.
///
/// In the crate's own tests the wait runs on the blocking pool: tokio's paused clock
/// (`start_paused`) does not move while a blocking task is in flight, but it would jump to the
/// next timer while a task only awaits another thread's answer, and the delivery timing tests
/// would then see retries fall due before the write that schedules them is answered.
async fn answer<R: Send + 'static>(
    rx: tokio::sync::oneshot::Receiver<Result<R, StoreError>>,
    thread: &str,
) -> Result<R, StoreError> {
    #[cfg(test)]
    let answer = tokio::task::spawn_blocking(move || rx.blocking_recv().ok())
        .await
        .ok()
        .flatten();
    #[cfg(not(test))]
    let answer = rx.await.ok();
    answer.unwrap_or_else(|| Err(stopped(thread)))
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
mod tests;
