//! Group commit: one thread owns the store's write connection and runs every write.
//!
//! A write is a closure sent over a channel. The thread takes the first one, then everything
//! else already queued (up to `MAX_BATCH`), and runs them in one `IMMEDIATE` transaction, each
//! inside its own savepoint, so one failing write is rolled back alone and the others still
//! commit. Only after the one commit does any caller get its answer: with
//! `storage.synchronous: full` an answer means the change is durable. Nothing waits to fill a
//! batch: writes that arrive while a commit runs simply go into the next one, so an idle store
//! commits a lone write at once and a busy one commits many per fsync.
//!
//! Checkpoints (copying the WAL back into the database file, with its fsyncs) never run on
//! this thread: the write connection has SQLite's automatic checkpoint turned off, and a
//! second thread with its own connection runs a `PASSIVE` checkpoint after commits, at most
//! once per `CHECKPOINT_PAUSE`. A passive checkpoint takes no lock that writers wait for, so
//! a commit is never held up by one (with the automatic checkpoint, every thousandth page
//! written made one commit wait for the whole copy and its fsyncs).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::oneshot;

use super::{
    StoreError, StoreGauges, answer, counts_blocking, oldest_open_blocking, run_caught, stopped,
    to_i64,
};

/// Most writes committed together; bounds how long one commit keeps the others waiting.
const MAX_BATCH: usize = 256;

/// Least time between two checkpoints: the WAL grows by at most what this much writing adds.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(250);

/// One queued write: runs on the connection (or is told why it cannot), and says whether
/// its savepoint is kept and how to answer once the batch's commit is known.
type Op = Box<dyn FnOnce(Result<&Connection, &str>) -> Outcome + Send>;

/// Tells one caller the result of its write, given the batch's commit result.
type Answer = Box<dyn FnOnce(Result<(), &str>) + Send>;

struct Outcome {
    keep: bool,
    answer: Answer,
}

/// The sending side; cheap to clone. The thread ends when the last clone is dropped.
#[derive(Clone)]
pub(super) struct Writer {
    ops: mpsc::Sender<Op>,
    /// Checkpoints completed so far (tests watch it).
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the store's tests"))]
    checkpoints: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the writer thread on `conn` (already migrated, automatic checkpoints off) and
    /// the checkpoint thread on `checkpointer`, a second connection to the same file.
    pub(super) fn start(
        conn: Connection,
        checkpointer: Connection,
        gauges: StoreGauges,
    ) -> Result<Self, StoreError> {
        let (ops, queue) = mpsc::channel::<Op>();
        // One slot: a commit while a checkpoint is due adds nothing.
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let checkpoints = Arc::new(AtomicU64::new(0));
        let done = Arc::clone(&checkpoints);
        std::thread::Builder::new()
            .name("store-checkpoint".to_owned())
            .spawn(move || checkpoint_loop(&checkpointer, &woken, &done))
            .map_err(|err| {
                StoreError::Task(format!("cannot start the store checkpointer: {err}"))
            })?;
        std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || run(conn, &queue, &gauges, &wake))
            .map_err(|err| StoreError::Task(format!("cannot start the store writer: {err}")))?;
        Ok(Self { ops, checkpoints })
    }

    /// Checkpoints completed since the store was opened.
    #[cfg(test)]
    pub(super) fn checkpoints(&self) -> u64 {
        self.checkpoints.load(Ordering::Relaxed)
    }

    /// Runs `f` in the next batch and answers once that batch is committed.
    pub(super) async fn write<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let op: Op = Box::new(move |conn| {
            let result = match conn {
                Ok(conn) => run_caught(f, conn, "write"),
                Err(why) => Err(StoreError::Commit(why.to_owned())),
            };
            Outcome {
                keep: result.is_ok(),
                answer: Box::new(move |commit| {
                    let answer = match commit {
                        Ok(()) => result,
                        Err(why) => result.and(Err(StoreError::Commit(why.to_owned()))),
                    };
                    // The caller may have gone (a cancelled task); the write stands anyway.
                    let _ = tx.send(answer);
                }),
            }
        });
        self.ops.send(op).map_err(|_| stopped("writer"))?;
        answer(rx, "writer").await
    }
}

fn run(
    mut conn: Connection,
    queue: &mpsc::Receiver<Op>,
    gauges: &StoreGauges,
    wake: &mpsc::SyncSender<()>,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let answers = commit_batch(&mut conn, batch);
        let committed = answers.0.is_ok();
        for answer in answers.1 {
            answer(answers.0.as_ref().copied().map_err(String::as_str));
        }
        if committed {
            refresh_gauges(&conn, gauges);
            // Full means a checkpoint is already due; the checkpointer sees this commit too.
            let _ = wake.try_send(());
        }
    }
}

/// Runs a passive checkpoint after commits, at most once per `CHECKPOINT_PAUSE`; ends with
/// the writer (its end of the channel dropped).
fn checkpoint_loop(conn: &Connection, woken: &mpsc::Receiver<()>, done: &AtomicU64) {
    while woken.recv().is_ok() {
        // (busy, frames in the WAL, frames checkpointed); a passive checkpoint that meets a
        // reader still copies what it can, and the next one takes the rest.
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            Ok(()) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(error = %err, "Could not checkpoint the message store."),
        }
        std::thread::sleep(CHECKPOINT_PAUSE);
    }
}

/// Runs one batch in one transaction; the commit's result and the answers to send with it.
type Answers = (Result<(), String>, Vec<Answer>);

fn commit_batch(conn: &mut Connection, batch: Vec<Op>) -> Answers {
    let mut answers = Vec::with_capacity(batch.len());
    let mut tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(err) => {
            let why = err.to_string();
            for op in batch {
                answers.push(op(Err(&why)).answer);
            }
            return (Err(why), answers);
        }
    };
    let mut ops = batch.into_iter();
    while let Some(op) = ops.next() {
        match tx.savepoint() {
            Ok(savepoint) => {
                let outcome = op(Ok(&savepoint));
                answers.push(outcome.answer);
                // Dropping an unkept savepoint rolls it back.
                if outcome.keep
                    && let Err(err) = savepoint.commit()
                {
                    // Releasing a savepoint does not fail in practice; if it does, the whole
                    // batch is rolled back (`tx` dropped) and every caller hears why.
                    let why = err.to_string();
                    for op in ops {
                        answers.push(op(Err(&why)).answer);
                    }
                    return (Err(why), answers);
                }
            }
            Err(err) => answers.push(op(Err(&err.to_string())).answer),
        }
    }
    (tx.commit().map_err(|err| err.to_string()), answers)
}

/// The pending, dead and oldest-open gauges from the committed state, once per batch.
fn refresh_gauges(conn: &Connection, gauges: &StoreGauges) {
    match counts_blocking(conn) {
        Ok(counts) => {
            gauges.pending.set(to_i64(counts.undelivered()));
            gauges.dead.set(to_i64(counts.dead));
        }
        Err(err) => tracing::warn!(error = %err, "Could not read the store's counts."),
    }
    match oldest_open_blocking(conn) {
        Ok(oldest) => gauges
            .oldest_open_ms
            .store(oldest.unwrap_or(0), Ordering::Relaxed),
        Err(err) => tracing::warn!(error = %err, "Could not read the store's oldest message."),
    }
}
