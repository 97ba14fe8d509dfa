//! The read connection's own thread.
//!
//! Reads are closures sent over a channel and run one after another on the thread that owns
//! the read connection. Before, each read took a thread of tokio's blocking pool and then
//! waited there for the one connection: a burst of reads (every instance loading its chat
//! table at start, a dead-letter listing during a backlog) grew the pool by a thread per
//! waiting read, each with its own stack and allocator arena, kept for seconds after. Now the
//! reads wait in the channel, and the process has one reader thread however many ask.

use std::sync::mpsc;

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{StoreError, answer, run_caught, stopped};

/// One queued read.
type Job = Box<dyn FnOnce(&Connection) + Send>;

/// The sending side; cheap to clone. The thread ends when the last clone is dropped.
#[derive(Clone)]
pub(super) struct Reader {
    jobs: mpsc::Sender<Job>,
}

impl Reader {
    /// Starts the reader thread on `conn` (read-only, opened after the migrations).
    pub(super) fn start(conn: Connection) -> Result<Self, StoreError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("store-reader".to_owned())
            .spawn(move || {
                while let Ok(job) = queue.recv() {
                    job(&conn);
                }
            })
            .map_err(|err| StoreError::Task(format!("cannot start the store reader: {err}")))?;
        Ok(Self { jobs })
    }

    /// Runs `f` on the read connection once the reads queued before it are done. WAL lets it
    /// run beside the writer's transaction; it sees every write that was answered before it.
    pub(super) async fn read<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R, StoreError>>();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone (a cancelled task).
            let _ = tx.send(run_caught(f, conn, "read"));
        });
        self.jobs.send(job).map_err(|_| stopped("reader"))?;
        answer(rx, "reader").await
    }
}
