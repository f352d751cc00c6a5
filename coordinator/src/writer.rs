//! The one thread that writes the state database, so that no disk write ever holds up the
//! state task: lease renewals, planning and every answer that needs no write go on while
//! the disk is slow.
//!
//! The state's owners (jobs, catalog, orders, secrets) queue [`Write`]s here, in the order
//! they decide them, and go on at once. The thread takes every write queued so far, applies
//! them in that order in one transaction and commits it (one fsync for the lot), then runs
//! each write's `then` with the outcome. One queue and one thread keep the order of writes,
//! so two writes of one key land in the order they were queued.
//!
//! What must be durable before it is answered (a Distribute's job, a CancelJob, a blob
//! forgotten by RemoveBlob, an agent's new secret) passes its answer through here: its
//! `then` sends the reply once the write is stored, or an error if it failed. The state
//! never waits for that.
//!
//! The queue is unbounded, so queueing never blocks the state; what bounds its length is
//! where writes come from: one job flush out at a time (`state/jobs.rs`), one order-id
//! reservation at a time, a catalog or secret write per new blob or agent, and what users
//! ask, refused past `MAX_QUEUED_WRITES` (`state.rs`).
//!
//! The thread ends once every [`Writer`] is dropped (the state with it) and the queue is
//! empty; [`Stopped`] says when, and whether it ended by a panic.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::db::{Db, DbError, Write};

/// What runs once a write is stored (`Ok`) or failed, on the writer's thread: it must not
/// block (send a reply, a confirmation).
pub type Then = Box<dyn FnOnce(Result<(), DbError>) + Send>;

/// Writes applied in one transaction at most: a long queue is drained in a few commits, and
/// a reply is not held back by an unbounded batch.
const MAX_BATCH: usize = 1024;

struct Op {
    write: Write,
    then: Option<Then>,
}

/// A handle to queue writes. Cloning it is cheap; the thread runs while one is alive.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Op>,
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("queued", &self.queued())
            .finish_non_exhaustive()
    }
}

/// Whether a write was stored, once the writer knows.
#[derive(Debug)]
pub struct Ticket(oneshot::Receiver<Result<(), DbError>>);

impl Ticket {
    /// `None` while the write is queued or being applied; its outcome once it is done. A
    /// writer that stopped before storing it counts as a failure.
    pub fn poll(&mut self) -> Option<Result<(), DbError>> {
        match self.0.try_recv() {
            Ok(result) => Some(result),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(stopped())),
        }
    }
}

/// Resolves when the writer's thread has ended: `Ok` once every queued write is applied and
/// every handle dropped, `Err` if it panicked.
#[derive(Debug)]
pub struct Stopped(oneshot::Receiver<()>);

impl Stopped {
    pub async fn wait(&mut self) -> Result<(), String> {
        (&mut self.0)
            .await
            .map_err(|_| "the state database writer panicked".to_string())
    }

    /// The same, blocking the calling thread (which must not be a runtime's).
    #[cfg(test)]
    pub fn wait_blocking(self) -> Result<(), String> {
        (self.0.blocking_recv()).map_err(|_| "the state database writer panicked".to_string())
    }
}

fn stopped() -> DbError {
    DbError::from_message("the state database writer has stopped")
}

impl Writer {
    /// Starts the thread that writes `db` from now on (the state reads it at load, before it
    /// queues anything, then drops its handle: the file closes when the thread ends).
    pub fn spawn(db: Arc<Db>) -> std::io::Result<(Writer, Stopped)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = oneshot::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let count = queued.clone();
        std::thread::Builder::new()
            .name("shoal-state-writer".into())
            .spawn(move || {
                run(db, rx, &count);
                // Not sent if `run` panicked: the receiver then sees the sender dropped.
                let _ = done_tx.send(());
            })?;
        Ok((Writer { tx, queued }, Stopped(done_rx)))
    }

    /// Queues `write`; a failure is logged and counted by the writer.
    pub fn write(&self, write: Write) {
        self.send(Op { write, then: None });
    }

    /// Queues `write`; `then` runs with its outcome.
    pub fn write_then(
        &self,
        write: Write,
        then: impl FnOnce(Result<(), DbError>) + Send + 'static,
    ) {
        self.send(Op {
            write,
            then: Some(Box::new(then)),
        });
    }

    /// Queues `write`; the ticket tells its outcome, and `then`, if any, runs with it too.
    pub fn write_ticket(&self, write: Write, then: Option<Then>) -> Ticket {
        let (tx, rx) = oneshot::channel();
        self.write_then(write, move |result| {
            let _ = tx.send(result.clone());
            if let Some(then) = then {
                then(result);
            }
        });
        Ticket(rx)
    }

    /// Writes queued and not yet applied.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn send(&self, op: Op) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(mpsc::error::SendError(op)) = self.tx.send(op) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("a state write after the writer stopped is lost");
            if let Some(then) = op.then {
                then(Err(stopped()));
            }
        }
    }
}

fn run(db: Arc<Db>, mut rx: mpsc::UnboundedReceiver<Op>, queued: &AtomicUsize) {
    let mut batch = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = db.apply(batch.iter().map(|op| &op.write));
        metrics::histogram!(crate::metrics::STATE_COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => finish(std::mem::take(&mut batch), &Ok(()), queued),
            Err(e) if batch.len() == 1 => {
                failed(&batch[0].write, &e);
                finish(std::mem::take(&mut batch), &Err(e), queued);
            }
            // One bad write fails the transaction: apply them one by one, in order, so
            // that it fails alone.
            Err(e) => {
                tracing::warn!(writes = batch.len(), error = %e, "a batch of state writes failed; applying them one by one");
                for op in std::mem::take(&mut batch) {
                    let result = db.apply([&op.write]);
                    if let Err(e) = &result {
                        failed(&op.write, e);
                    }
                    finish(vec![op], &result, queued);
                }
            }
        }
    }
}

/// Counts the ops as applied and runs their `then`s.
fn finish(ops: Vec<Op>, result: &Result<(), DbError>, queued: &AtomicUsize) {
    let left = (queued.fetch_sub(ops.len(), Ordering::Relaxed)).saturating_sub(ops.len());
    metrics::gauge!(crate::metrics::STATE_WRITES_QUEUED).set(left as f64);
    for op in ops {
        if let Some(then) = op.then {
            then(result.clone());
        }
    }
}

fn failed(write: &Write, e: &DbError) {
    let what = match write {
        Write::Jobs(jobs) => format!(
            "jobs {}",
            (jobs.iter().map(|j| j.job.job_id.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Write::ForgetJob(id) => format!("forgetting job {id}"),
        Write::Blob(d, _) => format!("blob {}", hex::encode(d)),
        Write::ForgetBlob(d) => format!("forgetting blob {}", hex::encode(d)),
        Write::OrderCeiling(c) => format!("order id ceiling {c}"),
        Write::AgentSecret(id, _) => format!("secret of agent {id}"),
        Write::RevokeAgent(id, _) => format!("revocation of agent {id}"),
    };
    tracing::error!(write = %what, error = %e, "a state write failed");
    metrics::counter!(crate::metrics::STATE_WRITE_FAILURES).increment(1);
}
