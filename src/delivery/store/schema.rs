//! Opening the file: the three connections and the versioned schema.

use super::*;

/// The schema, one step per version; `PRAGMA user_version` is the number of steps applied.
///
/// Steps are append-only: a released step is never edited, a change is a new step.
pub(super) const MIGRATIONS: &[&str] = &[
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

#[allow(clippy::disallowed_methods, reason = "runs on the store's own thread")]
pub(super) fn open_blocking(
    path: &Path,
    synchronous: Synchronous,
) -> Result<Connection, StoreError> {
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
pub(super) fn open_checkpointer(
    path: &Path,
    synchronous: Synchronous,
) -> Result<Connection, StoreError> {
    open_beside_writer(path, "synchronous", synchronous.pragma())
}

/// The read connection: opened after the writer migrated the file, refuses writes.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    open_beside_writer(path, "query_only", "ON")
}

/// A second connection to the writer's (migrated, WAL) file, with one pragma of its own.
fn open_beside_writer(path: &Path, pragma: &str, value: &str) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.pragma_update(None, pragma, value).map_err(open_err)?;
    Ok(conn)
}

/// Applies the missing migration steps, each in its own transaction with its version bump.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
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

/// Test helper: the schema version a fully migrated file has.
#[cfg(test)]
pub(crate) fn schema_version() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}
