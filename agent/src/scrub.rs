//! The background scrub: every present chunk of every stored blob is read back from the disk
//! (past the page cache, so that neither what peers are being served is evicted nor a cached
//! copy is what gets checked) and hashed, one after another, at `scrub_bytes_per_sec`. A chunk
//! that rotted at rest is found before a peer is served it, or before it is the last copy; the
//! store drops it (`Store::check_chunk`), and `repair.rs` reports it and fetches it again, as
//! for a chunk a peer rejected.
//!
//! Passes run back to back, over the blobs held when each pass starts, in digest order; a pass
//! over S bytes takes S / rate. The scrub never counts as a use of a blob (eviction order is
//! unchanged).

use std::time::Duration;

use shoal_proto::{ChunkIndex, Digest};
use tokio::time::Instant;

use crate::limiter::RateLimiter;
use crate::shutdown::{Stop, stopped};
use crate::store::{ChunkCheck, Reread, Store};

/// The default `scrub_bytes_per_sec`: 16 MiB/s. About 0.9% of one core with SHA-NI (hashing
/// runs at about 1.9 GB/s per core), and a disk read stream small next to transfers; a full
/// 100 GiB store (the default quota) is read once every 1.8 hours.
pub const DEFAULT_BYTES_PER_SEC: u64 = 16 << 20;
/// The limiter's burst: one 1 MiB chunk.
const BURST: u64 = 1 << 20;
/// Pause before looking again when there was nothing to scrub.
const IDLE: Duration = Duration::from_secs(5);

/// Runs passes until the agent stops; returns at once if `bytes_per_sec` is 0.
pub(crate) async fn run(store: Store, bytes_per_sec: u64, mut stop: Stop) {
    if bytes_per_sec == 0 {
        tracing::info!("scrub off (scrub_bytes_per_sec = 0)");
        return;
    }
    let limiter = RateLimiter::new(bytes_per_sec, BURST);
    loop {
        let started = Instant::now();
        let blobs: Vec<Digest> = store.blobs().into_iter().map(|b| b.digest).collect();
        let mut pass = Pass::default();
        for blob in &blobs {
            let scrubbed = tokio::select! {
                s = scrub_blob(&store, &limiter, *blob) => s,
                () = stopped(&mut stop) => return,
            };
            pass.add(scrubbed);
        }
        if pass.bytes > 0 {
            let seconds = started.elapsed().as_secs();
            // A small store is read through every few seconds: only long passes and the ones
            // that found something are worth a line at info.
            if pass.corrupt > 0 || seconds >= 60 {
                tracing::info!(
                    blobs = blobs.len(),
                    bytes = pass.bytes,
                    corrupt = pass.corrupt,
                    seconds,
                    "scrub pass done"
                );
            } else {
                tracing::debug!(
                    blobs = blobs.len(),
                    bytes = pass.bytes,
                    seconds,
                    "scrub pass done"
                );
            }
        } else {
            tokio::select! {
                () = tokio::time::sleep(IDLE) => {}
                () = stopped(&mut stop) => return,
            }
        }
    }
}

/// What a pass (or one blob of it) read and found.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    bytes: u64,
    corrupt: u32,
}

impl Pass {
    fn add(&mut self, other: Pass) {
        self.bytes += other.bytes;
        self.corrupt += other.corrupt;
    }
}

/// Checks every chunk `blob` holds now, each as the limiter allows.
async fn scrub_blob(store: &Store, limiter: &RateLimiter, blob: Digest) -> Pass {
    let mut pass = Pass::default();
    let Some(manifest) = store.manifest(&blob) else {
        return pass; // Gone since the pass started.
    };
    for index in manifest.chunk_indices() {
        if !store.has_chunk(&blob, index) {
            continue;
        }
        let len = manifest.chunk_len(index).map_or(0, |l| l as u64);
        limiter.acquire(len).await;
        let checked = check(store, blob, index).await;
        if matches!(checked, Some(ChunkCheck::Intact | ChunkCheck::Dropped)) {
            pass.bytes += len;
            metrics::counter!(crate::metrics::SCRUBBED_BYTES).increment(len);
        }
        if checked == Some(ChunkCheck::Dropped) {
            pass.corrupt += 1;
        }
        if store.manifest(&blob).is_none() {
            break; // Removed or evicted meanwhile.
        }
    }
    pass
}

async fn check(store: &Store, blob: Digest, index: ChunkIndex) -> Option<ChunkCheck> {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.check_chunk(&blob, index, Reread::Disk)).await {
        Ok(Ok(checked)) => Some(checked),
        Ok(Err(e)) => {
            tracing::warn!(%blob, %index, error = %e, "scrub could not read a chunk back");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "scrub task failed");
            None
        }
    }
}
