//! Blobs being served are kept from eviction: a fresh seeder's copy may be the only complete
//! one in the cluster, and evicting it in the middle of a swarm (to make room for another
//! blob) would leave every target without a source. Each chunk served holds its blob (a
//! [`Hold`], like a running order's) until `linger` has passed without another one; a sweep
//! releases the quiet ones. While every blob the store could evict is held, a new blob is
//! refused (`QuotaExceeded`) rather than cut a swarm off: the refused order fails with a
//! clear reason and is retried, nothing already delivered is lost.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use shoal_proto::Digest;

use crate::store::{Hold, Store};

#[derive(Debug, Default)]
pub(super) struct Serving {
    holds: Mutex<HashMap<Digest, (Hold, Instant)>>,
}

impl Serving {
    /// `blob` was just served: hold it (again) until `linger` after now.
    pub(super) fn served(&self, store: &Store, blob: &Digest) {
        let now = Instant::now();
        let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((hold, at)) = holds.get_mut(blob)
            && hold.is_current()
        {
            *at = now;
            return;
        }
        // A blob removed meanwhile has nothing to hold.
        if let Ok(hold) = store.hold(blob) {
            holds.insert(*blob, (hold, now));
        }
    }

    /// Releases the blobs not served for `linger`.
    fn sweep(&self, linger: Duration) {
        let now = Instant::now();
        let released: Vec<_> = {
            let mut holds = self.holds.lock().unwrap_or_else(PoisonError::into_inner);
            let quiet: Vec<Digest> = holds
                .iter()
                .filter(|(_, (_, at))| now.duration_since(*at) >= linger)
                .map(|(d, _)| *d)
                .collect();
            quiet.iter().filter_map(|d| holds.remove(d)).collect()
        };
        // Dropped outside the lock.
        drop(released);
    }

    /// How many blobs are held for serving.
    pub(super) fn held(&self) -> usize {
        self.holds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Sweeps `serving` every quarter of `linger` until the transport is gone.
pub(super) async fn sweep_loop(inner: Weak<super::Inner>, linger: Duration) {
    let period = (linger / 4).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = inner.upgrade() else { return };
        inner.serving.sweep(linger);
    }
}
