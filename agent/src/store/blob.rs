//! One stored blob at run time: its open data and journal files, which chunks are present, and
//! the group commit that makes them durable. What becomes of a chunk found corrupt, and of a
//! blob whose fdatasync failed, is in `store/damage.rs`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, TryLockError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use shoal_proto::wire::{bitfield_get, bitfield_set};
use shoal_proto::{BlobVerifier, ChunkIndex, Manifest};
use tokio::sync::broadcast;

use super::files::BlobPaths;
use super::journal::{RECORD_LEN, Record};
use super::{PutOutcome, StoreError, io_err};

/// Group commit: fdatasync after this many new chunk records of one blob (64 MiB with 1 MiB
/// chunks), so a power loss costs at most this many re-hashes (and possibly re-fetches) per blob.
pub(crate) const SYNC_EVERY: u32 = 64;
/// Chunk events buffered per subscriber before it lags (it then re-reads the bitfield).
const EVENTS_CAPACITY: usize = 1024;

/// Which chunks are present and what the journal says of them. Changed only together, under
/// one short lock that is never held across data IO (only across an 8-byte journal append, and
/// the rare journal rewrite that drops chunks).
///
/// Invariant: the data of every present chunk not in `unsynced` was fdatasynced after it was
/// written, and the journal never vouches for (covers with a sync record) a chunk that is not
/// present or whose data is not durable. The journal may lack records of present chunks (after
/// a failed rewrite): those are simply fetched again after a restart.
#[derive(Debug)]
pub(super) struct ChunkState {
    pub(super) bits: Vec<u8>,
    pub(super) present: u32,
    /// Well-formed records in the journal: the next record goes at `records * RECORD_LEN`.
    pub(super) records: u32,
    /// Present chunks whose data may not be durable yet (no group commit covered their record),
    /// with their record's position in the journal, in journal order.
    pub(super) unsynced: Vec<(u32, ChunkIndex)>,
    /// The journal file. Replaced (under this lock and the commit lock) when dropped chunks are
    /// written out of it.
    pub(super) journal: Arc<File>,
    /// No sync record is appended to the journal again, so it never vouches for anything more
    /// (chunks recorded later are re-hashed on open): a data fdatasync failed (the blob is
    /// being dropped), or a dropped chunk's record could not be written out of the journal
    /// (it is found again by a scrub or a peer's rejection).
    pub(super) sealed: bool,
}

/// A blob in the store. Shared as `Arc<BlobEntry>`: readers and writers of different chunks
/// proceed in parallel through positional IO on the one open data file.
#[derive(Debug)]
pub(crate) struct BlobEntry {
    /// Changed only while provisional (digests learned); size, digest and chunk size never
    /// change.
    manifest: RwLock<Arc<Manifest>>,
    /// Chunk digests of the manifest still unknown (0 unless provisional).
    unknown: AtomicU32,
    pub paths: BlobPaths,
    pub(super) data: File,
    state: Mutex<ChunkState>,
    /// Serialises group commits of this blob and the journal rewrites that drop chunks (not
    /// puts or gets).
    pub(super) commit: Mutex<()>,
    events: broadcast::Sender<ChunkIndex>,
    /// Where chunks found corrupt are reported (see `store/damage.rs`), for the agent to
    /// report and repair.
    pub(super) damage: broadcast::Sender<super::Damage>,
    pub pinned: AtomicBool,
    /// Running orders using the blob ([`super::Hold`]s): kept from eviction like a pin, but
    /// counted, and separate from the user's pin.
    pub holds: AtomicU32,
    /// Out of the store's index (removed or evicted): holds on it hold nothing.
    pub(super) removed: AtomicBool,
    /// The whole blob was read back and matched its digest in this process. A complete
    /// blob's chunks are never written again unless one is dropped, which clears this.
    pub(super) verified: AtomicBool,
    /// Held while the blob is read back: a second caller waits for the first read instead
    /// of reading the whole blob again beside it (an order's end and a pull's both verify).
    verifying: Mutex<()>,
    /// Logical clock value of the last use; eviction order.
    recency: AtomicU64,
    /// Wall-clock time of the last use, for reports and the data file's mtime.
    last_used_nanos: AtomicU64,
}

/// What a recovered or new blob starts with.
#[derive(Debug)]
pub(crate) struct Opened {
    pub manifest: Manifest,
    pub paths: BlobPaths,
    pub data: File,
    pub journal: File,
    pub present: Vec<ChunkIndex>,
    /// Well-formed records in the journal as it stands.
    pub journal_records: u32,
    /// Chunk records in it not vouched for by a sync record (their data was re-verified), with
    /// their positions, in journal order.
    pub unsynced: Vec<(u32, ChunkIndex)>,
    pub last_used: SystemTime,
}

impl BlobEntry {
    pub(crate) fn new(
        opened: Opened,
        recency: u64,
        damage: broadcast::Sender<super::Damage>,
    ) -> Self {
        let Opened {
            manifest,
            paths,
            data,
            journal,
            present,
            journal_records,
            unsynced,
            last_used,
        } = opened;
        let mut bits = vec![0u8; (manifest.chunk_count() as usize).div_ceil(8)];
        for &index in &present {
            bitfield_set(&mut bits, index);
        }
        let state = ChunkState {
            bits,
            present: present.len() as u32,
            records: journal_records,
            unsynced,
            journal: Arc::new(journal),
            sealed: false,
        };
        let (events, _) = broadcast::channel(EVENTS_CAPACITY);
        let unknown = manifest.chunk_count() - manifest.known_count();
        Self {
            unknown: AtomicU32::new(unknown),
            manifest: RwLock::new(Arc::new(manifest)),
            paths,
            data,
            state: Mutex::new(state),
            commit: Mutex::new(()),
            events,
            damage,
            pinned: AtomicBool::new(false),
            holds: AtomicU32::new(0),
            removed: AtomicBool::new(false),
            verified: AtomicBool::new(false),
            verifying: Mutex::new(()),
            recency: AtomicU64::new(recency),
            last_used_nanos: AtomicU64::new(nanos_since_epoch(last_used)),
        }
    }

    pub(crate) fn manifest(&self) -> Arc<Manifest> {
        Arc::clone(&self.manifest.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Fills in chunk digests of a provisional manifest (see [`Manifest::learn`]); when the
    /// last one is known, the manifest file is rewritten (until then it stays provisional on
    /// disk, and a provisional blob is dropped at the next open). Returns how many were new.
    /// In place (a reader holding the manifest meanwhile costs one copy), so learning a
    /// blob's digests one by one costs O(chunks), not O(chunks²).
    pub(crate) fn learn(
        &self,
        first: u32,
        digests: &[shoal_proto::Digest],
    ) -> Result<u32, StoreError> {
        let mut cell = self
            .manifest
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let learned = Arc::make_mut(&mut *cell)
            .learn(first, digests)
            .map_err(|e| StoreError::DigestConflict(e.to_string()))?;
        if learned == 0 {
            return Ok(0);
        }
        let before = self.unknown.fetch_sub(learned, Ordering::Relaxed);
        if before == learned {
            // The last one: under the lock, so the file is never older than the entry.
            super::files::rewrite_manifest(&self.paths, &cell)?;
        }
        Ok(learned)
    }

    pub(super) fn state(&self) -> MutexGuard<'_, ChunkState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn has(&self, index: ChunkIndex) -> bool {
        bitfield_get(&self.state().bits, index)
    }

    pub(crate) fn present_count(&self) -> u32 {
        self.state().present
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.present_count() == self.manifest().chunk_count()
    }

    pub(crate) fn bitfield(&self) -> Bytes {
        Bytes::copy_from_slice(&self.state().bits)
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<ChunkIndex> {
        self.events.subscribe()
    }

    pub(crate) fn touch(&self, recency: u64) {
        self.recency.fetch_max(recency, Ordering::Relaxed);
        self.last_used_nanos
            .store(nanos_since_epoch(SystemTime::now()), Ordering::Relaxed);
    }

    pub(crate) fn recency(&self) -> u64 {
        self.recency.load(Ordering::Relaxed)
    }

    pub(crate) fn last_used(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.last_used_nanos.load(Ordering::Relaxed))
    }

    /// Verifies, writes in place, then records and marks the chunk. The record is appended only
    /// after the data write returned, so a crash in between leaves the chunk absent.
    pub(crate) fn put(&self, index: ChunkIndex, data: &[u8]) -> Result<PutOutcome, StoreError> {
        let manifest = self.manifest();
        let range = manifest.chunk_range(index)?;
        if self.has(index) {
            return Ok(PutOutcome::AlreadyPresent);
        }
        manifest.verify_chunk(index, data)?;
        self.data
            .write_all_at(data, range.start)
            .map_err(io_err("writing chunk to", &self.paths.data))?;

        let (complete, due) = {
            let mut state = self.state();
            // A concurrent put of the same chunk won: it wrote the same verified bytes.
            if bitfield_get(&state.bits, index) {
                return Ok(PutOutcome::AlreadyPresent);
            }
            // On failure the position is not advanced: a partial record is overwritten by the
            // next append, or cut off as a torn tail on open.
            let position = state.records;
            state
                .journal
                .write_all_at(
                    &Record::Chunk(index).encode(),
                    u64::from(position) * RECORD_LEN,
                )
                .map_err(io_err("recording chunk in", &self.paths.journal))?;
            state.records += 1;
            state.unsynced.push((position, index));
            state.present += 1;
            bitfield_set(&mut state.bits, index);
            let complete = state.present == manifest.chunk_count();
            let due = complete || state.unsynced.len() >= SYNC_EVERY as usize;
            (complete, due && !state.sealed)
        };
        // No receivers is fine.
        let _ = self.events.send(index);
        if due {
            // A failed data fdatasync is a lost write of the whole blob, this chunk included
            // (see `commit`).
            self.commit(complete)?;
        }
        Ok(PutOutcome::Stored)
    }

    /// The bytes of a present chunk: one read into a buffer lent from `buffers`.
    pub(crate) fn get(
        &self,
        index: ChunkIndex,
        buffers: &Arc<super::buffers::Buffers>,
    ) -> Result<Bytes, StoreError> {
        let manifest = self.manifest();
        let range = manifest.chunk_range(index)?;
        if !self.has(index) {
            return Err(StoreError::ChunkMissing {
                blob: manifest.digest(),
                index,
            });
        }
        buffers.read((range.end - range.start) as usize, |buf| {
            self.read_at(buf, range.start)
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.data.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt {
                    path: self.paths.data.clone(),
                    reason: format!("data file ends before offset {}", offset + buf.len() as u64),
                }
            } else {
                StoreError::io("reading chunk from", &self.paths.data, e)
            }
        })
    }

    /// Group commit: fdatasync the data file, then append a sync record vouching for the records
    /// that were in the journal before the fdatasync began, then fdatasync the journal. Puts keep
    /// going meanwhile. With `wait == false` it gives way to a commit already running.
    ///
    /// A failed data fdatasync is a lost write, never retried: Linux may have dropped the pages
    /// it could not write back and marked them clean, so a second fdatasync would succeed
    /// without them and a sync record would vouch for bytes that are not on disk. Writing the
    /// chunks again does not help either: ext4 leaves the fallocated range it failed to write
    /// "unwritten" (it reads back as zeros after a remount) even once later writes to it
    /// succeed (`tests/store_failing_disk.rs` shows both). So the journal is sealed at once
    /// and the error is [`StoreError::LostWrite`]: the store then drops the whole blob (see
    /// `Store::after_error`), to be fetched again into new files. A failed journal fdatasync
    /// needs no such care: replay stops at the first record that did not reach the disk, so a
    /// lost journal page can only make chunks absent, never vouch for one.
    pub(crate) fn commit(&self, wait: bool) -> Result<(), StoreError> {
        let _commit = if wait {
            self.commit.lock().unwrap_or_else(PoisonError::into_inner)
        } else {
            match self.commit.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => return Ok(()),
            }
        };
        let covered = {
            let state = self.state();
            if state.unsynced.is_empty() || state.sealed {
                return Ok(());
            }
            state.records
        };
        // Every record below `covered` was appended after its data write returned, so before
        // this call: fdatasync makes that data durable.
        if let Err(source) = self.data.sync_data() {
            self.state().sealed = true;
            return Err(StoreError::LostWrite {
                blob: self.manifest().digest(),
                path: self.paths.data.clone(),
                source,
            });
        }
        let journal = {
            let mut state = self.state();
            state
                .journal
                .write_all_at(
                    &Record::Sync { covered }.encode(),
                    u64::from(state.records) * RECORD_LEN,
                )
                .map_err(io_err("recording sync in", &self.paths.journal))?;
            state.records += 1;
            let vouched = state.unsynced.partition_point(|&(p, _)| p < covered);
            state.unsynced.drain(..vouched);
            Arc::clone(&state.journal)
        };
        journal
            .sync_data()
            .map_err(io_err("syncing", &self.paths.journal))
    }

    /// Re-reads the whole blob and checks it against the blob digest.
    pub(crate) fn verify(&self) -> Result<(), StoreError> {
        let manifest = self.manifest();
        let blob = manifest.digest();
        if let Some(index) = manifest.chunk_indices().find(|&i| !self.has(i)) {
            return Err(StoreError::ChunkMissing { blob, index });
        }
        metrics::counter!(crate::metrics::WHOLE_READS).increment(1);
        let mut verifier = BlobVerifier::default();
        let mut buf = vec![0u8; manifest.chunk_size() as usize];
        for index in manifest.chunk_indices() {
            let range = manifest.chunk_range(index)?;
            let piece = &mut buf[..(range.end - range.start) as usize];
            self.read_at(piece, range.start)?;
            verifier.update(piece);
        }
        // A named blob's content is its chain's last value, known once the blob is complete.
        let content = manifest.content_digest().unwrap_or(blob);
        verifier.finish(content).map_err(StoreError::Verify)?;
        self.verified.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// See [`super::Store::trust_verified`].
    pub(crate) fn trust_verified(&self) -> Result<(), StoreError> {
        let manifest = self.manifest();
        if let Some(index) = manifest.chunk_indices().find(|&i| !self.has(i)) {
            return Err(StoreError::ChunkMissing {
                blob: manifest.digest(),
                index,
            });
        }
        if manifest.is_provisional() {
            return Err(StoreError::DigestConflict(
                "a provisional manifest vouches for nothing".into(),
            ));
        }
        self.verified.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// [`BlobEntry::verify`], unless it already passed in this process, or the manifest is
    /// chained: then every chunk matched its chaining value when it was put, and chunks that
    /// all do make a blob that matches its digest (`shoal_proto`'s `manifest/chain.rs`).
    pub(crate) fn ensure_verified(&self) -> Result<(), StoreError> {
        if self.verified.load(Ordering::Relaxed) {
            return Ok(());
        }
        let manifest = self.manifest();
        if manifest.is_chained() && !manifest.is_provisional() {
            return self.trust_verified();
        }
        let _one_reader = self.verifying.lock().unwrap_or_else(|e| e.into_inner());
        if self.verified.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.verify()
    }

    /// Kept from eviction: pinned by the user or held by an order.
    pub(crate) fn protected(&self) -> bool {
        self.pinned.load(Ordering::Relaxed) || self.holds.load(Ordering::Relaxed) > 0
    }

    /// Commits, then stamps the data file's mtime with the last use so eviction order survives
    /// a restart.
    pub(crate) fn flush(&self) -> Result<(), StoreError> {
        self.commit(true)?;
        self.data
            .set_modified(self.last_used())
            .map_err(io_err("setting last-used time of", &self.paths.data))
    }
}

fn nanos_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
