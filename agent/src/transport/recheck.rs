//! The serving side's answer to a rejection notice (`Frame::ChunkRejected`): a peer says a
//! chunk we sent did not match the manifest, so we read our copy back from the disk and hash
//! it (`Store::check_chunk`), which drops it if it rotted. Serving never hashes; this costs one
//! chunk read and one SHA-256 per notice, and only when a peer complains.
//!
//! A notice costs the peer 42 bytes and us a chunk's hash, so notices are bounded: one check at
//! a time, at most [`MAX_WAITING`] distinct chunks waiting, a chunk waiting or being checked is
//! not queued twice, and one found intact is not checked again for [`QUIET`] (a peer whose own
//! memory flips bits would otherwise have us hash the same chunk for every copy it receives).
//! That is less than a chunk request costs (the peer could make us read and send the chunk
//! instead).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use shoal_proto::{ChunkIndex, Digest};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::store::{ChunkCheck, Reread, Store};

/// Distinct chunks that may wait for a check; notices beyond are dropped (the scrub finds
/// those chunks later, and the next rejection of one queues it again).
pub(super) const MAX_WAITING: usize = 256;
/// A chunk found intact is not checked again for this long.
pub(super) const QUIET: Duration = Duration::from_secs(60);
/// Intact chunks remembered at most (the oldest are forgotten first).
const REMEMBERED: usize = 4096;

type Key = (Digest, ChunkIndex);

/// Rechecks requested by peers, owned by the endpoint's serving side.
#[derive(Debug)]
pub(super) struct Rechecks {
    state: Mutex<State>,
    /// One check at a time.
    running: Semaphore,
}

#[derive(Debug, Default)]
struct State {
    /// Waiting or being checked.
    pending: HashSet<Key>,
    /// Found intact, and when.
    intact: HashMap<Key, Instant>,
}

impl Default for Rechecks {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            running: Semaphore::new(1),
        }
    }
}

impl Rechecks {
    /// `peer` rejected chunk `index` of `blob`, which we served: check our copy unless it was
    /// just found intact or is queued already. Runs in the background.
    pub(super) fn rejected(
        self: &Arc<Self>,
        store: &Store,
        peer: SocketAddr,
        blob: Digest,
        index: ChunkIndex,
    ) {
        if !store.has_chunk(&blob, index) {
            return; // Dropped already (or never held): nothing to check.
        }
        let key = (blob, index);
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            if state.intact.get(&key).is_some_and(|at| now < *at + QUIET) {
                return;
            }
            if state.pending.len() >= MAX_WAITING || !state.pending.insert(key) {
                return;
            }
        }
        let (this, store) = (Arc::clone(self), store.clone());
        tokio::spawn(async move {
            let outcome = {
                let _turn = this.running.acquire().await;
                let s = store.clone();
                tokio::task::spawn_blocking(move || s.check_chunk(&blob, index, Reread::Served))
                    .await
            };
            let mut state = this.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.pending.remove(&key);
            match outcome {
                Ok(Ok(ChunkCheck::Intact)) => {
                    tracing::warn!(%peer, %blob, %index, "a peer rejected a chunk that is intact here: the copy was damaged on its way or at the peer");
                    if state.intact.len() >= REMEMBERED {
                        let now = Instant::now();
                        state.intact.retain(|_, at| now < *at + QUIET);
                        if state.intact.len() >= REMEMBERED {
                            state.intact.clear();
                        }
                    }
                    state.intact.insert(key, Instant::now());
                }
                Ok(Ok(ChunkCheck::Dropped)) => {
                    tracing::warn!(%peer, %blob, %index, "a peer rejected a chunk that rotted here: dropped");
                }
                Ok(Ok(ChunkCheck::Absent)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(%peer, %blob, %index, error = %e, "checking a rejected chunk failed");
                }
                Err(e) => tracing::warn!(error = %e, "chunk check task failed"),
            }
        });
    }
}
