//! Buffers for the chunks the store reads out (to serve a peer, the mirror, a pull), reused.
//!
//! A fresh 1 MiB allocation per chunk read is, with glibc, an `mmap` and an `munmap`, 256
//! page faults and the kernel zeroing each page, and then the read's own zeroing of the
//! buffer: about 4% of the CPU of a shaped swarm (`perf` on `netns --systems distribute`). A
//! chunk's bytes leave as [`Bytes`] that live until QUIC has the peer's acknowledgement, so
//! the buffer goes back to the pool when the last clone of them is dropped.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Buffers kept for reuse at most (32 MiB of 1 MiB chunks): about what a source has in
/// flight on a 10 Gbit/s link (its upload queue is short, see `transport/uplink.rs`).
/// Beyond it a returned buffer is freed.
const KEPT: usize = 32;

#[derive(Debug, Default)]
pub(crate) struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    /// Fills a buffer of `len` bytes with `fill` and hands it out as [`Bytes`]; on error the
    /// buffer goes back at once.
    pub(crate) fn read<E>(
        self: &Arc<Self>,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        let mut buf = self.take(len);
        if let Err(e) = fill(&mut buf[..len]) {
            self.give_back(buf);
            return Err(e);
        }
        Ok(Bytes::from_owner(Lent {
            buf,
            len,
            pool: Arc::clone(self),
        }))
    }

    /// A buffer of at least `len` bytes (its contents are whatever it last held).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
            let at = free.iter().rposition(|b| b.len() >= len);
            at.map(|i| free.swap_remove(i))
        };
        reused.unwrap_or_else(|| vec![0; len])
    }

    /// Keeps `buf` if there is room, or in place of a smaller one (blobs of another chunk
    /// size must not fill the pool with buffers too short for the usual chunks).
    fn give_back(&self, buf: Vec<u8>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < KEPT {
            free.push(buf);
        } else if let Some(small) = free.iter_mut().find(|b| b.len() < buf.len()) {
            *small = buf;
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// A pooled buffer lent out as [`Bytes`]: the first `len` bytes are the chunk.
struct Lent {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<Buffers>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_clone_is_dropped_and_is_reused() {
        let pool = Arc::new(Buffers::default());
        let a = pool
            .read(8, |b| {
                b.copy_from_slice(b"abcdefgh");
                Ok::<(), ()>(())
            })
            .expect("read");
        let clone = a.slice(2..4);
        drop(a);
        assert_eq!(pool.kept(), 0, "a clone still holds it");
        assert_eq!(&clone[..], b"cd");
        drop(clone);
        assert_eq!(pool.kept(), 1);
        // Reused for a shorter chunk: only its first bytes are the chunk.
        let b = pool
            .read(3, |b| {
                b.copy_from_slice(b"xyz");
                Ok::<(), ()>(())
            })
            .expect("read");
        assert_eq!(pool.kept(), 0);
        assert_eq!(&b[..], b"xyz");
        // A failed read gives the buffer back at once.
        drop(b);
        assert!(pool.read(4, |_| Err("no")).is_err());
        assert_eq!(pool.kept(), 1);
    }

    #[test]
    fn at_most_kept_buffers_are_kept() {
        let pool = Arc::new(Buffers::default());
        let lent: Vec<Bytes> = (0..KEPT + 5)
            .map(|_| pool.read(16, |_| Ok::<(), ()>(())).expect("read"))
            .collect();
        drop(lent);
        assert_eq!(pool.kept(), KEPT);
        // A longer buffer takes a short one's place when the pool is full.
        let long = pool.read(64, |_| Ok::<(), ()>(())).expect("read");
        let more: Vec<Bytes> = (0..KEPT)
            .map(|_| pool.read(16, |_| Ok::<(), ()>(())).expect("read"))
            .collect();
        let extra = pool.read(16, |_| Ok::<(), ()>(())).expect("read");
        drop(more);
        drop(extra);
        drop(long);
        assert_eq!(pool.kept(), KEPT);
        let again = pool.read(64, |_| Ok::<(), ()>(())).expect("read");
        assert_eq!(pool.kept(), KEPT - 1, "the long one was kept and reused");
        drop(again);
    }
}
