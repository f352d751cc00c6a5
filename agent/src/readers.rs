//! Where in-order readers (the OCI mirror's clients) of each blob are: the chunk each
//! blob's readers wait for (the lowest, when several read one blob), so that its download
//! fetches those chunks first (`ChunkPicker::set_sequential`).
//!
//! The mirror registers and moves readers; downloads only ask. A reader may wait before
//! any order for its blob runs, so this is not part of the order table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use shoal_proto::Digest;

#[derive(Clone, Debug, Default)]
pub(crate) struct Readers {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    table: Mutex<HashMap<Digest, Vec<(u64, u32)>>>,
    next_id: AtomicU64,
    /// Readers registered, over all blobs: downloads ask on every fill, and most of the
    /// time nobody reads, so that answer needs no lock.
    count: AtomicUsize,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Digest, Vec<(u64, u32)>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Readers {
    /// The lowest chunk a reader of `blob` waits for, if any reads it.
    pub(crate) fn position(&self, blob: &Digest) -> Option<u32> {
        if self.inner.count.load(Ordering::Relaxed) == 0 {
            return None;
        }
        self.inner.lock().get(blob)?.iter().map(|(_, c)| *c).min()
    }

    /// Registers a reader at `chunk`; the guard moves it on and removes it when dropped.
    pub(crate) fn enter(&self, blob: Digest, chunk: u32) -> Reader {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().entry(blob).or_default().push((id, chunk));
        self.inner.count.fetch_add(1, Ordering::Relaxed);
        Reader {
            inner: self.inner.clone(),
            blob,
            id,
        }
    }
}

/// One registered reader.
pub(crate) struct Reader {
    inner: Arc<Inner>,
    blob: Digest,
    id: u64,
}

impl Reader {
    pub(crate) fn at(&self, chunk: u32) {
        if let Some(list) = self.inner.lock().get_mut(&self.blob) {
            for r in list.iter_mut().filter(|r| r.0 == self.id) {
                r.1 = chunk;
            }
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut table = self.inner.lock();
        self.inner.count.fetch_sub(1, Ordering::Relaxed);
        if let Some(list) = table.get_mut(&self.blob) {
            list.retain(|r| r.0 != self.id);
            if list.is_empty() {
                table.remove(&self.blob);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_reader_sets_the_position_and_leaving_forgets_it() {
        let readers = Readers::default();
        let blob = Digest::from_bytes([7; 32]);
        assert_eq!(readers.position(&blob), None);
        let a = readers.enter(blob, 3);
        let b = readers.enter(blob, 5);
        assert_eq!(readers.position(&blob), Some(3));
        a.at(9);
        assert_eq!(readers.position(&blob), Some(5));
        drop(b);
        assert_eq!(readers.position(&blob), Some(9));
        drop(a);
        assert_eq!(readers.position(&blob), None);
    }
}
