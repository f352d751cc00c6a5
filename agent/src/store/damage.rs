//! What leaves the store although nobody removed it: a chunk found corrupt when read back (a
//! peer rejected it, or the scrub), and a blob whose data fdatasync failed. A corrupt chunk is
//! marked absent and written out of the journal so that no sync record vouches for it; a blob
//! with a lost write is dropped whole. Both are announced on [`Store::damage`] for the agent to
//! report and fetch again.
//!
//! Nothing here runs on the serving path: a chunk is hashed again only when someone asks
//! ([`Store::check_chunk`]).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use shoal_proto::wire::{bitfield_get, bitfield_set};
use shoal_proto::{ChunkIndex, Digest};
use tokio::sync::broadcast;

use super::blob::{BlobEntry, ChunkState};
use super::uncached::{self, Reread};
use super::{Store, StoreError, files, journal, lock};

/// Damage reports queued for a slow [`Store::damage`] receiver.
pub const DAMAGE_QUEUED: usize = 1024;

/// Why chunks were dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DamageCause {
    /// Read back, the chunk no longer matched its digest (or could not be read at all). The
    /// blob stays, without it.
    Corrupt,
    /// An fdatasync of the blob's data failed: the whole blob was dropped from the store (and
    /// reported on [`Store::removals`] too).
    LostWrite,
}

/// Chunks of one blob that were present and are not any more.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Damage {
    pub blob: Digest,
    /// The chunks dropped (for a lost write, every chunk the blob had).
    pub chunks: Vec<ChunkIndex>,
    pub cause: DamageCause,
    /// The blob was complete before: the coordinator counts this agent as a complete holder.
    pub was_complete: bool,
    /// A user had pinned it: it is wanted here, and must be fetched again.
    pub pinned: bool,
}

/// What [`Store::check_chunk`] found.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ChunkCheck {
    /// Read from the disk, the chunk matches its digest.
    Intact,
    /// It did not (or could not be read): it is dropped and reported on [`Store::damage`].
    Dropped,
    /// The store does not hold it (never did, or it was dropped or removed meanwhile).
    Absent,
}

impl Store {
    /// From now on, in order: chunks found corrupt and dropped, and blobs dropped after a
    /// failed fdatasync. A receiver that falls [`DAMAGE_QUEUED`] behind gets `Lagged`.
    pub fn damage(&self) -> broadcast::Receiver<Damage> {
        self.inner.damage.subscribe()
    }

    /// Reads chunk `index` of `blob` back from the disk (as `how` says: see [`Reread`]) and
    /// hashes it. A chunk that does not match its digest, or that the disk cannot read (EIO),
    /// or that lies past the data file's end, is dropped: marked absent, written out of the
    /// journal, and reported on [`Store::damage`]. Costs one chunk read and one SHA-256; does
    /// not count as a use of the blob (eviction order is unchanged). Blocking.
    pub fn check_chunk(
        &self,
        blob: &Digest,
        index: ChunkIndex,
        how: Reread,
    ) -> Result<ChunkCheck, StoreError> {
        let Some(entry) = self.entry(blob) else {
            return Ok(ChunkCheck::Absent);
        };
        match entry.read_back(index, how)? {
            ReadBack::Bad => {}
            ReadBack::Intact => return Ok(ChunkCheck::Intact),
            ReadBack::Absent => return Ok(ChunkCheck::Absent),
        }
        // Serialised with removals and evictions, so that a blob deleted meanwhile does not
        // get its journal written again.
        let _admin = lock(&self.inner.admin);
        if !self.entry(blob).is_some_and(|e| Arc::ptr_eq(&e, &entry)) {
            return Ok(ChunkCheck::Absent);
        }
        if entry.forget(&[index]).is_empty() {
            return Ok(ChunkCheck::Absent);
        }
        tracing::warn!(%blob, %index, "chunk corrupt on disk: dropped");
        Ok(ChunkCheck::Dropped)
    }

    /// Drops the blob of `entry` after an operation on it failed with `error`, if that was a
    /// lost write (see `BlobEntry::commit`): out of the index and its files deleted, reported
    /// on [`Store::removals`] and [`Store::damage`].
    pub(super) fn after_error(&self, entry: &Arc<BlobEntry>, error: &StoreError) {
        let StoreError::LostWrite { blob, source, .. } = error else {
            return;
        };
        let _admin = lock(&self.inner.admin);
        let removed = {
            let mut index = lock(&self.inner.index);
            if !index.blobs.get(blob).is_some_and(|e| Arc::ptr_eq(e, entry)) {
                return; // Already dropped, by this or by a concurrent failure.
            }
            index.remove(blob)
        };
        let Some(removed) = removed else { return };
        let (chunks, was_complete) = {
            let state = removed.state();
            let manifest = removed.manifest();
            let chunks: Vec<ChunkIndex> = (manifest.chunk_indices())
                .filter(|&i| bitfield_get(&state.bits, i))
                .collect();
            let complete = chunks.len() as u32 == manifest.chunk_count();
            (chunks, complete)
        };
        tracing::error!(%blob, chunks = chunks.len(), error = %source,
            "fdatasync of a blob's data failed: its bytes may not be on disk; the blob is dropped (never synced again and trusted), to be fetched again");
        let _ = self.inner.removals.send(*blob);
        if let Err(e) = removed.paths.remove() {
            // Its manifest stays: the blob comes back at the next open, its journal sealed
            // since the failure, so every chunk recorded after its last good commit is
            // re-hashed there.
            tracing::warn!(%blob, error = %e, "deleting a blob with a lost write failed");
        }
        let _ = self.inner.damage.send(Damage {
            blob: *blob,
            chunks,
            cause: DamageCause::LostWrite,
            was_complete,
            pinned: removed.pinned.load(Ordering::Relaxed),
        });
    }
}

/// A chunk read back from the disk.
enum ReadBack {
    Intact,
    /// It does not match its digest, or cannot be read.
    Bad,
    Absent,
}

impl BlobEntry {
    /// Re-reads chunk `index` from the disk and hashes it.
    fn read_back(&self, index: ChunkIndex, how: Reread) -> Result<ReadBack, StoreError> {
        let manifest = self.manifest();
        let range = manifest.chunk_range(index)?;
        if !self.has(index) {
            return Ok(ReadBack::Absent);
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        match uncached::read(&self.data, &self.paths.data, range.start, &mut buf, how) {
            Ok(()) if manifest.verify_chunk(index, &buf).is_ok() => Ok(ReadBack::Intact),
            Ok(()) => Ok(ReadBack::Bad),
            // The data file ends early, or the disk cannot read the chunk: it cannot be served.
            Err(e)
                if e.kind() == io::ErrorKind::UnexpectedEof
                    || e.raw_os_error() == Some(libc::EIO) =>
            {
                Ok(ReadBack::Bad)
            }
            Err(e) => Err(StoreError::io(
                "reading back a chunk of",
                &self.paths.data,
                e,
            )),
        }
    }

    /// Marks the present ones of `chunks` absent (corrupt), rewrites the journal without them,
    /// and reports them; returns the ones dropped.
    fn forget(&self, chunks: &[ChunkIndex]) -> Vec<ChunkIndex> {
        // No group commit meanwhile: its sync record could vouch for a record being dropped.
        let _commit = self.commit.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = self.state();
        let manifest = self.manifest();
        let was_complete = state.present == manifest.chunk_count();
        let mut gone = vec![0u8; state.bits.len()];
        let mut dropped = Vec::new();
        for &index in chunks {
            if bitfield_get(&state.bits, index) {
                clear_bit(&mut state.bits, index);
                bitfield_set(&mut gone, index);
                dropped.push(index);
            }
        }
        if dropped.is_empty() {
            return dropped;
        }
        state.present -= dropped.len() as u32;
        state.unsynced.retain(|&(_, i)| !bitfield_get(&gone, i));
        // Its chunks will be written again: the whole blob must be read before it is vouched
        // for again.
        self.verified.store(false, Ordering::Relaxed);
        dropped.extend(self.rewrite_journal(&mut state));
        let _ = self.damage.send(Damage {
            blob: manifest.digest(),
            chunks: dropped.clone(),
            cause: DamageCause::Corrupt,
            was_complete,
            pinned: self.pinned.load(Ordering::Relaxed),
        });
        dropped
    }

    /// Replaces the journal with one that records exactly the present chunks: those with
    /// durable data vouched for by one sync record, the unsynced ones after it. If it cannot
    /// be written (a full or failing disk), empties the journal in place instead (that needs
    /// no space): the chunks with durable data stay present, unrecorded (fetched again after
    /// a restart), and the unsynced ones are dropped as well, since nothing could ever vouch
    /// for them; returns those. If even that fails, seals the journal (see
    /// `ChunkState::sealed`).
    fn rewrite_journal(&self, state: &mut ChunkState) -> Vec<ChunkIndex> {
        let manifest = self.manifest();
        let mut is_unsynced = vec![0u8; state.bits.len()];
        for &(_, index) in &state.unsynced {
            bitfield_set(&mut is_unsynced, index);
        }
        let durable: Vec<ChunkIndex> = (manifest.chunk_indices())
            .filter(|&i| bitfield_get(&state.bits, i) && !bitfield_get(&is_unsynced, i))
            .collect();
        let unsynced: Vec<ChunkIndex> = state.unsynced.iter().map(|&(_, i)| i).collect();
        let bytes = journal::rewritten(&durable, &unsynced);
        let error = match files::replace_journal(&self.paths, &bytes, manifest.chunk_count()) {
            Ok(file) => {
                let first = durable.len() as u32 + 1;
                state.journal = Arc::new(file);
                state.records = first + unsynced.len() as u32;
                state.unsynced = (unsynced.into_iter().enumerate())
                    .map(|(k, i)| (first + k as u32, i))
                    .collect();
                return Vec::new();
            }
            Err(e) => e,
        };
        let blob = manifest.digest();
        tracing::warn!(%blob, %error, "could not rewrite the chunk journal without the dropped chunks; emptying it");
        match state
            .journal
            .set_len(0)
            .and_then(|()| state.journal.sync_data())
        {
            Ok(()) => {
                state.records = 0;
                for &index in &unsynced {
                    clear_bit(&mut state.bits, index);
                }
                state.present -= unsynced.len() as u32;
                state.unsynced.clear();
                unsynced
            }
            Err(e) => {
                tracing::error!(%blob, error = %e, "could not empty the chunk journal either: no more group commits for this blob");
                state.sealed = true;
                Vec::new()
            }
        }
    }
}

fn clear_bit(bits: &mut [u8], index: ChunkIndex) {
    bits[index.as_usize() / 8] &= !(1 << (index.0 % 8));
}
