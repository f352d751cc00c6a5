//! What the agent is fetching right now: one entry per running fetch order, updated by the
//! order's task, read by the session (batched progress) and the local API (status, pull).

use std::collections::BTreeMap;
use std::sync::Mutex;

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use tokio::sync::broadcast;
use tokio::time::Instant;

/// The end of a fetch order, announced to local pulls waiting on the blob.
#[derive(Clone, Debug)]
pub(crate) struct Finished {
    pub digest: Digest,
    /// The job the order belonged to (a pull waits on its own job's order only).
    pub job_id: String,
    pub result: Result<(), String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Transfer {
    pub digest: Digest,
    pub job_id: String,
    pub priority: i32,
    pub chunk_count: u32,
    pub chunks_verified: u32,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub active_sources: u32,
    pub rate_bytes_per_sec: u64,
    /// Changed since the last progress report.
    dirty: bool,
    rate_mark: (Instant, u64),
}

#[derive(Debug)]
pub(crate) struct Transfers {
    running: Mutex<BTreeMap<u64, Transfer>>,
    finished: broadcast::Sender<Finished>,
}

impl Default for Transfers {
    fn default() -> Self {
        Self {
            running: Mutex::default(),
            finished: broadcast::channel(256).0,
        }
    }
}

impl Transfers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Transfer>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn start(
        &self,
        order_id: u64,
        digest: Digest,
        job_id: String,
        priority: i32,
        chunk_count: u32,
        bytes_total: u64,
    ) {
        self.lock().insert(
            order_id,
            Transfer {
                digest,
                job_id,
                priority,
                chunk_count,
                chunks_verified: 0,
                bytes_total,
                bytes_done: 0,
                active_sources: 0,
                rate_bytes_per_sec: 0,
                dirty: true,
                rate_mark: (Instant::now(), 0),
            },
        );
    }

    pub(crate) fn update(
        &self,
        order_id: u64,
        chunks_verified: u32,
        bytes_done: u64,
        active_sources: u32,
    ) {
        if let Some(t) = self.lock().get_mut(&order_id) {
            t.chunks_verified = chunks_verified;
            t.bytes_done = bytes_done;
            t.active_sources = active_sources;
            t.dirty = true;
        }
    }

    pub(crate) fn finish(
        &self,
        order_id: u64,
        digest: Digest,
        job_id: String,
        result: Result<(), String>,
    ) {
        self.lock().remove(&order_id);
        let _ = self.finished.send(Finished {
            digest,
            job_id,
            result,
        });
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Finished> {
        self.finished.subscribe()
    }

    pub(crate) fn snapshot(&self) -> Vec<Transfer> {
        self.lock().values().cloned().collect()
    }

    pub(crate) fn running_for(&self, digest: &Digest) -> Option<Transfer> {
        self.lock().values().find(|t| t.digest == *digest).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Progress of the orders that changed since the last call (rates refreshed), or `None`.
    pub(crate) fn progress_batch(&self) -> Option<pb::ProgressBatch> {
        let now = Instant::now();
        let mut running = self.lock();
        let mut items = Vec::new();
        for (order_id, t) in running.iter_mut() {
            let (mark_at, mark_bytes) = t.rate_mark;
            let dt = now.saturating_duration_since(mark_at).as_secs_f64();
            if dt >= 0.2 {
                t.rate_bytes_per_sec = (t.bytes_done.saturating_sub(mark_bytes) as f64 / dt) as u64;
                t.rate_mark = (now, t.bytes_done);
            }
            if !t.dirty {
                continue;
            }
            t.dirty = false;
            items.push(pb::BlobProgress {
                order_id: *order_id,
                blob_digest: t.digest.as_bytes().to_vec(),
                chunks_verified: t.chunks_verified,
                chunk_count: t.chunk_count,
                bytes_done: t.bytes_done,
                rate_bytes_per_sec: t.rate_bytes_per_sec,
                active_sources: t.active_sources,
            });
        }
        (!items.is_empty()).then_some(pb::ProgressBatch { items })
    }

    /// Sum of the current receive rates.
    pub(crate) fn download_rate(&self) -> u64 {
        self.lock().values().map(|t| t.rate_bytes_per_sec).sum()
    }
}
