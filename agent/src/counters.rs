//! What the agent has moved, for [`crate::AgentStats`] and the local status call. Downloads
//! count what they verify and reject; the session measures the upload rate at each load
//! report.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    bytes_from_peers: AtomicU64,
    chunks_verified: AtomicU64,
    chunks_rejected: AtomicU64,
    /// Bytes per second served to peers, as of the last load report.
    upload_rate: AtomicU64,
    /// Chunk tables of orders that came without them, learned from a source and from the
    /// coordinator.
    tables_from_peers: AtomicU64,
    tables_from_coordinator: AtomicU64,
}

impl Counters {
    /// A chunk of `len` bytes fetched from a peer, verified and stored.
    pub(crate) fn verified(&self, len: u64) {
        self.inner
            .bytes_from_peers
            .fetch_add(len, Ordering::Relaxed);
        self.inner.chunks_verified.fetch_add(1, Ordering::Relaxed);
    }

    /// A chunk from a peer that failed verification.
    pub(crate) fn rejected(&self) {
        self.inner.chunks_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// An order's chunk table, learned from a source (`from_peer`) or the coordinator.
    pub(crate) fn table_learned(&self, from_peer: bool) {
        let (counter, from) = if from_peer {
            (&self.inner.tables_from_peers, "peer")
        } else {
            (&self.inner.tables_from_coordinator, "coordinator")
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::CHUNK_TABLES, "from" => from).increment(1);
    }

    /// (tables learned from peers, tables learned from the coordinator).
    pub(crate) fn tables(&self) -> (u64, u64) {
        (
            self.inner.tables_from_peers.load(Ordering::Relaxed),
            self.inner.tables_from_coordinator.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn set_upload_rate(&self, bytes_per_sec: u64) {
        self.inner
            .upload_rate
            .store(bytes_per_sec, Ordering::Relaxed);
    }

    pub(crate) fn upload_rate(&self) -> u64 {
        self.inner.upload_rate.load(Ordering::Relaxed)
    }

    /// (bytes from peers, chunks verified, chunks rejected).
    pub(crate) fn fetched(&self) -> (u64, u64, u64) {
        let i = &self.inner;
        (
            i.bytes_from_peers.load(Ordering::Relaxed),
            i.chunks_verified.load(Ordering::Relaxed),
            i.chunks_rejected.load(Ordering::Relaxed),
        )
    }
}
