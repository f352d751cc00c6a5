//! The content store: verified chunks of blobs, written in place, surviving restarts.
//!
//! # On disk
//! `<root>/lock` is `flock`ed while a store is open. Everything else lives in `<root>/blobs/`,
//! three files per blob named by its digest's hex:
//! - `<hex>.manifest`: the protobuf `shoal.v1.Manifest`, written to `<hex>.manifest.tmp`,
//!   fsynced, renamed, directory fsynced. Its rename commits an insert; deleting it first
//!   commits a removal. Data or journal files without a manifest are orphans, deleted on open.
//! - `<hex>.data`: the blob, each chunk written in place at its offset. Its whole size is
//!   reserved with `fallocate` at insert (so a full disk fails the insert, not a transfer), or
//!   made sparse with `set_len` where the filesystem cannot. Its mtime carries the last-used
//!   time across restarts ([`Store::flush`] stamps it).
//! - `<hex>.chunks`: the journal of present chunks, 8-byte records (see `store/journal.rs`):
//!   `[index u32 LE][!index u32 LE]` per chunk, `[u32::MAX][covered u32 LE]` per group commit.
//!
//! # Crash safety
//! *No verified chunk is lost and no unverified or torn chunk is ever marked present.*
//! - A chunk is hashed against the manifest before anything is written; a bad one is refused
//!   with [`StoreError::Verify`] and leaves no trace.
//! - Its journal record is appended only after its data write returned. A process crash keeps
//!   both in the page cache in that order, so after a restart every recorded chunk is intact
//!   and nothing unrecorded is present. Data written without a record (crash in between) is
//!   simply not present.
//! - Power loss can drop any page not yet fsynced, in any order. Group commit: after every
//!   `SYNC_EVERY` (64) new records of a blob, on its completion and on [`Store::flush`], the
//!   data file is fdatasynced, then a sync record is appended and the journal fdatasynced. A
//!   sync record says "records before position `covered`" (where the journal ended when the
//!   data fdatasync began) rather than "all records before me": that way puts are never blocked
//!   behind an fdatasync, and a record appended while it ran is not wrongly vouched for.
//! - On open, records below the last `covered` are trusted; later ones are re-verified by
//!   hashing their chunk (at most about `SYNC_EVERY` per blob), and dropped if their data did not
//!   survive. Replay stops at the first malformed record (complement mismatch, out-of-range
//!   index, partial tail). If anything was dropped or unvouched, the data file is fdatasynced
//!   and the journal is replaced by a compacted one (all present chunks plus one sync),
//!   durably, which also truncates any torn tail. If the disk is too full even for that, the
//!   journal is instead cut in place (no space needed) just before the first dropped record, so
//!   no later sync record can vouch for it; chunks recorded after that point are forgotten.
//! - Journal space is reserved too (`fallocate` with `KEEP_SIZE`, 16 bytes per chunk bounds
//!   it), so with both reservations a full disk surfaces as [`StoreError::DiskFull`] from
//!   [`Store::insert_manifest`]. Where reservation is not possible, an ENOSPC from the data
//!   write or the record append is `DiskFull` from [`Store::put_chunk`], and the chunk is not
//!   marked present.
//!
//! After power loss the chunks written since a blob's last group commit may have to be fetched
//! again; after a process crash nothing is.
//!
//! # Failed writes and rot
//! *A sync record never vouches for bytes that are not on disk, and a chunk found bad is never
//! served again.*
//! - A failed data fdatasync is never retried and trusted: on Linux the pages it could not write
//!   may be dropped and marked clean, and a second fdatasync then succeeds without them; on
//!   ext4 the failed range even stays unwritten on disk after later writes to it succeed. The
//!   blob's journal is sealed at once (no sync record ever again), the put or flush fails with
//!   [`StoreError::LostWrite`], and the whole blob is dropped: files deleted, reported on
//!   [`Store::removals`] and, as a lost write, on [`Store::damage`], to be fetched again into
//!   new files.
//! - [`Store::check_chunk`] reads a chunk back from the disk (past the page cache) and hashes it:
//!   the agent calls it for a chunk a peer rejected and for every chunk in turn (the scrub). A
//!   chunk that no longer matches is marked absent, written out of the journal and reported on
//!   [`Store::damage`] as corrupt; the rest of the blob stays.
//! - Writing a chunk out of the journal rewrites it (durably, like a compaction on open) so that
//!   it records the remaining chunks only: no later sync record can cover the dropped one, and
//!   a restart does not bring it back. If the disk cannot take the rewrite, the journal is
//!   emptied in place: the remaining chunks are then fetched again after a restart, never
//!   wrongly trusted.
//!
//! # Concurrency
//! One short index lock finds a blob's `Arc<BlobEntry>`; no lock is held across data IO. Each
//! blob has one open data file used with positional reads and writes, and a short lock over
//! its bitmap and journal tail (held across an 8-byte journal append). Inserts, removals and
//! evictions are serialised among themselves by a separate lock, so file creation never blocks
//! readers or writers. Pins (the user's) and holds (running orders', counted) live in memory
//! only; last-used times in memory, persisted as the data file's mtime by [`Store::flush`].

mod blob;
mod buffers;
mod damage;
mod error;
mod eviction;
mod files;
mod import;
mod journal;
mod uncached;

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use shoal_proto::{ChunkIndex, Digest, Manifest};
use tokio::sync::broadcast;

use self::blob::BlobEntry;
pub use self::damage::{ChunkCheck, DAMAGE_QUEUED, Damage, DamageCause};
pub use self::error::StoreError;
use self::error::io_err;
use self::eviction::Candidate;
pub use self::import::{ImportError, read_full};
pub use self::uncached::Reread;

/// Where the store lives and how much it may hold.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Directory of the store; created if missing.
    pub root: PathBuf,
    /// The most bytes of blobs (sum of blob sizes, present or not) the store may hold.
    pub quota_bytes: u64,
}

/// Whether [`Store::put_chunk`] stored the chunk or already had it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PutOutcome {
    Stored,
    AlreadyPresent,
}

/// One blob as [`Store::blobs`] reports it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct BlobSummary {
    pub digest: Digest,
    pub size: u64,
    pub present: u32,
    pub chunk_count: u32,
    pub pinned: bool,
    pub last_used: SystemTime,
}

/// A blob kept from eviction (see [`Store::hold`]); released on drop.
#[derive(Debug)]
pub struct Hold {
    entry: Arc<BlobEntry>,
}

impl Hold {
    /// Whether the held blob is still in the store (not removed or evicted since; its digest
    /// may have come back as a new blob, which this does not hold).
    pub fn is_current(&self) -> bool {
        !self.entry.removed.load(Ordering::Relaxed)
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.entry.holds.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The content store. Cheap to clone; all clones share one store. Methods block on file IO:
/// call them from `spawn_blocking` in async code.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Holds an exclusive `flock` on `<root>/lock` while the store is open: two agents
    /// writing one journal would corrupt it.
    _lock_file: fs::File,
    blobs_dir: PathBuf,
    quota: u64,
    index: Mutex<Index>,
    /// Serialises inserts, removals and evictions (the operations that create or delete files).
    admin: Mutex<()>,
    /// Logical clock for eviction order.
    clock: AtomicU64,
    /// Every blob that leaves the store (removed, evicted), for the coordinator.
    removals: broadcast::Sender<Digest>,
    /// Chunks found corrupt and dropped, and blobs dropped after a failed fdatasync; every
    /// blob's entry holds a clone.
    damage: broadcast::Sender<Damage>,
    /// Buffers the chunks read out are lent in.
    buffers: Arc<buffers::Buffers>,
}

#[derive(Debug, Default)]
struct Index {
    blobs: HashMap<Digest, Arc<BlobEntry>>,
    /// Sum of the sizes of `blobs`.
    usage: u64,
}

/// Removals queued for a slow [`Store::removals`] receiver.
pub const REMOVALS_QUEUED: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// Opens (or creates) the store at `config.root`, recovering every blob found there.
    /// Blobs with an unreadable manifest or data file are deleted with a warning. The root is
    /// locked until the last clone is dropped ([`StoreError::Locked`] if already open).
    pub fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let blobs_dir = config.root.join("blobs");
        fs::create_dir_all(&blobs_dir).map_err(io_err("creating", &blobs_dir))?;
        let lock_file = files::lock_root(&config.root)?;
        let mut recovered = files::recover_all(&blobs_dir)?;
        // Oldest first, so logical recency follows the persisted last-used times.
        recovered.sort_by_key(|o| o.last_used);
        let mut index = Index::default();
        let mut clock = 0;
        let damage = broadcast::channel(DAMAGE_QUEUED).0;
        for opened in recovered {
            clock += 1;
            let entry = BlobEntry::new(opened, clock, damage.clone());
            index.usage += entry.manifest().size();
            index
                .blobs
                .insert(entry.manifest().digest(), Arc::new(entry));
        }
        Ok(Store {
            inner: Arc::new(Inner {
                _lock_file: lock_file,
                blobs_dir,
                quota: config.quota_bytes,
                index: Mutex::new(index),
                admin: Mutex::new(()),
                clock: AtomicU64::new(clock),
                removals: broadcast::channel(REMOVALS_QUEUED).0,
                damage,
                buffers: Arc::default(),
            }),
        })
    }

    /// Blobs that leave the store from now on (removed or evicted), in order. A receiver
    /// that falls [`REMOVALS_QUEUED`] behind gets `Lagged`.
    pub fn removals(&self) -> broadcast::Receiver<Digest> {
        self.inner.removals.subscribe()
    }

    fn entry(&self, blob: &Digest) -> Option<Arc<BlobEntry>> {
        lock(&self.inner.index).blobs.get(blob).cloned()
    }

    fn known(&self, blob: &Digest) -> Result<Arc<BlobEntry>, StoreError> {
        self.entry(blob).ok_or(StoreError::UnknownBlob(*blob))
    }

    fn touch(&self, entry: &BlobEntry) {
        entry.touch(self.inner.clock.fetch_add(1, Ordering::Relaxed) + 1);
    }

    /// Registers a blob so its chunks can be put. Idempotent: the same manifest again is `Ok`
    /// (a different one for the same digest is [`StoreError::ManifestConflict`]). A
    /// provisional manifest (some chunk digests unknown, see [`Manifest::provisional`])
    /// registers a blob being seeded; its chunks can be put once their digests are learned
    /// ([`Store::learn_digests`]), and a manifest for it that agrees with what is known
    /// teaches the rest. Evicts
    /// least-recently-used unpinned blobs if it would not fit under the quota; if it still does
    /// not, evicts nothing and returns [`StoreError::QuotaExceeded`]. A full disk is
    /// [`StoreError::DiskFull`] (the blob's space is reserved here).
    pub fn insert_manifest(&self, manifest: &Manifest) -> Result<(), StoreError> {
        let digest = manifest.digest();
        let _admin = lock(&self.inner.admin);
        let victims = {
            let mut index = lock(&self.inner.index);
            if let Some(existing) = index.blobs.get(&digest) {
                let existing = Arc::clone(existing);
                drop(index);
                let known = existing.manifest();
                if *known != *manifest {
                    let same_blob = known.size() == manifest.size()
                        && known.chunk_size() == manifest.chunk_size()
                        && known.is_chained() == manifest.is_chained()
                        && known.name() == manifest.name();
                    if !same_blob || !(known.is_provisional() || manifest.is_provisional()) {
                        return Err(StoreError::ManifestConflict(digest));
                    }
                    existing
                        .learn(0, manifest.chunk_digests())
                        .map_err(|_| StoreError::ManifestConflict(digest))?;
                }
                self.touch(&existing);
                return Ok(());
            }
            let candidates: Vec<Candidate> = index
                .blobs
                .values()
                .map(|e| Candidate {
                    digest: e.manifest().digest(),
                    size: e.manifest().size(),
                    recency: e.recency(),
                    pinned: e.protected(),
                })
                .collect();
            let plan = eviction::plan(&candidates, index.usage, manifest.size(), self.inner.quota)
                .map_err(|s| StoreError::QuotaExceeded {
                    blob: digest,
                    needed: manifest.size(),
                    quota: self.inner.quota,
                    pinned: s.pinned,
                })?;
            // Out of the index under the same lock that `pin` takes: a blob is either pinned
            // before it was chosen, or gone when `pin` looks.
            plan.iter()
                .filter_map(|d| index.remove(d))
                .collect::<Vec<_>>()
        };
        for victim in victims {
            tracing::info!(blob = %victim.manifest().digest(), "evicting least recently used blob");
            let _ = self.inner.removals.send(victim.manifest().digest());
            // Already out of the index and the usage: finish every deletion rather than stop
            // at the first error and leave the rest behind. A blob whose manifest could not
            // be deleted comes back at the next open, where eviction meets it again.
            if let Err(e) = victim.paths.remove() {
                tracing::warn!(blob = %victim.manifest().digest(), error = %e, "deleting an evicted blob failed");
            }
        }

        let opened = files::create(&self.inner.blobs_dir, manifest)?;
        let entry = BlobEntry::new(opened, 0, self.inner.damage.clone());
        self.touch(&entry);
        let mut index = lock(&self.inner.index);
        index.usage += manifest.size();
        index.blobs.insert(digest, Arc::new(entry));
        Ok(())
    }

    /// The manifest of a stored blob (provisional while its digests are being learned).
    pub fn manifest(&self, blob: &Digest) -> Option<Arc<Manifest>> {
        self.entry(blob).map(|e| e.manifest())
    }

    /// Learns digests of chunks `first..` of a blob registered with a provisional manifest;
    /// how many were new. Digests that contradict known ones, or do not fit, are
    /// [`StoreError::DigestConflict`] and change nothing.
    pub fn learn_digests(
        &self,
        blob: &Digest,
        first: u32,
        digests: &[Digest],
    ) -> Result<u32, StoreError> {
        self.known(blob)?.learn(first, digests)
    }

    /// Verifies `data` (length and SHA-256) against the manifest, writes it in place and marks
    /// it present. An already present chunk is not written again. On [`StoreError::Verify`] or
    /// [`StoreError::DiskFull`] the chunk is not marked present. A put that completes a group
    /// commit whose data fdatasync fails returns [`StoreError::LostWrite`]: the whole blob was
    /// dropped.
    pub fn put_chunk(
        &self,
        blob: &Digest,
        index: ChunkIndex,
        data: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        let entry = self.known(blob)?;
        self.touch(&entry);
        entry
            .put(index, data)
            .inspect_err(|e| self.after_error(&entry, e))
    }

    /// The bytes of a present (verified) chunk; [`StoreError::ChunkMissing`] otherwise.
    pub fn get_chunk(&self, blob: &Digest, index: ChunkIndex) -> Result<Bytes, StoreError> {
        let entry = self.known(blob)?;
        self.touch(&entry);
        entry.get(index, &self.inner.buffers)
    }

    pub fn has_chunk(&self, blob: &Digest, index: ChunkIndex) -> bool {
        self.entry(blob).is_some_and(|e| e.has(index))
    }

    /// A snapshot of the present chunks in the wire format: `(chunk_count, bits)`, bit `i` in
    /// byte `i / 8`, least significant bit first.
    pub fn bitfield(&self, blob: &Digest) -> Option<(u32, Bytes)> {
        self.entry(blob)
            .map(|e| (e.manifest().chunk_count(), e.bitfield()))
    }

    /// Yields each chunk index of `blob` as it becomes present. Subscribe, then read
    /// [`Store::bitfield`], to miss nothing; on `Lagged`, read the bitfield again.
    pub fn subscribe(&self, blob: &Digest) -> Option<broadcast::Receiver<ChunkIndex>> {
        self.entry(blob).map(|e| e.subscribe())
    }

    pub fn present_count(&self, blob: &Digest) -> Option<u32> {
        self.entry(blob).map(|e| e.present_count())
    }

    pub fn is_complete(&self, blob: &Digest) -> bool {
        self.entry(blob).is_some_and(|e| e.is_complete())
    }

    /// Re-reads the whole blob and checks it against its digest:
    /// [`StoreError::ChunkMissing`] if incomplete, `Verify(WrongBlobDigest)` if altered.
    pub fn verify_blob(&self, blob: &Digest) -> Result<(), StoreError> {
        self.known(blob)?.verify()
    }

    /// Like [`Store::verify_blob`], but done at most once per blob per process: a blob that
    /// passed is not read again (until one of its chunks is dropped and written again). A
    /// complete blob with a chained manifest is not read at all: its chunks' checks were the
    /// blob's.
    /// Changes made to the data file behind the store's back after that are only found by
    /// `verify_blob` and [`Store::check_chunk`].
    pub fn ensure_verified(&self, blob: &Digest) -> Result<(), StoreError> {
        self.known(blob)?.ensure_verified()
    }

    /// Records that a complete blob matches its digest without reading it: its every chunk
    /// matched a manifest that was itself checked against the blob digest (by whoever read
    /// the whole blob). [`StoreError::ChunkMissing`] if it is not complete.
    pub fn trust_verified(&self, blob: &Digest) -> Result<(), StoreError> {
        self.known(blob)?.trust_verified()
    }

    /// The blob's data file. Its content is the blob only once [`Store::is_complete`].
    pub fn data_path(&self, blob: &Digest) -> Option<PathBuf> {
        self.entry(blob).map(|e| e.paths.data.clone())
    }

    /// Protects the blob from eviction until [`Store::unpin`]. Not persisted across restarts.
    pub fn pin(&self, blob: &Digest) -> Result<(), StoreError> {
        self.set_pinned(blob, true)
    }

    pub fn unpin(&self, blob: &Digest) -> Result<(), StoreError> {
        self.set_pinned(blob, false)
    }

    /// Whether the user pinned the blob (`None` if unknown). Holds do not count.
    pub fn is_pinned(&self, blob: &Digest) -> Option<bool> {
        self.entry(blob).map(|e| e.pinned.load(Ordering::Relaxed))
    }

    /// Keeps the blob from eviction while the returned [`Hold`] lives, e.g. while an order
    /// fetches it. Holds are counted and independent of [`Store::pin`]: releasing one never
    /// unpins what a user pinned meanwhile.
    pub fn hold(&self, blob: &Digest) -> Result<Hold, StoreError> {
        // Under the index lock, like `pin`: eviction sees either the hold or no blob.
        let index = lock(&self.inner.index);
        let entry = index
            .blobs
            .get(blob)
            .ok_or(StoreError::UnknownBlob(*blob))?;
        entry.holds.fetch_add(1, Ordering::Relaxed);
        Ok(Hold {
            entry: Arc::clone(entry),
        })
    }

    fn set_pinned(&self, blob: &Digest, pinned: bool) -> Result<(), StoreError> {
        // Under the index lock, which eviction holds while it picks and unlinks its victims.
        let index = lock(&self.inner.index);
        let entry = index
            .blobs
            .get(blob)
            .ok_or(StoreError::UnknownBlob(*blob))?;
        entry.pinned.store(pinned, Ordering::Relaxed);
        Ok(())
    }

    /// Deletes the blob and its files (pinned or not). Reads already under way finish.
    pub fn remove(&self, blob: &Digest) -> Result<(), StoreError> {
        let _admin = lock(&self.inner.admin);
        let entry = lock(&self.inner.index)
            .remove(blob)
            .ok_or(StoreError::UnknownBlob(*blob))?;
        let _ = self.inner.removals.send(*blob);
        entry.paths.remove()
    }

    pub fn blobs(&self) -> Vec<BlobSummary> {
        let entries: Vec<_> = lock(&self.inner.index).blobs.values().cloned().collect();
        let mut out: Vec<BlobSummary> = entries
            .iter()
            .map(|e| BlobSummary {
                digest: e.manifest().digest(),
                size: e.manifest().size(),
                present: e.present_count(),
                chunk_count: e.manifest().chunk_count(),
                pinned: e.pinned.load(Ordering::Relaxed),
                last_used: e.last_used(),
            })
            .collect();
        out.sort_by_key(|b| b.digest);
        out
    }

    /// Sum of the sizes of all stored blobs, complete or not.
    pub fn usage_bytes(&self) -> u64 {
        lock(&self.inner.index).usage
    }

    /// The most the store may hold (`quota_bytes`).
    pub fn quota_bytes(&self) -> u64 {
        self.inner.quota
    }

    /// What the store may still take under its quota.
    pub fn free_bytes(&self) -> u64 {
        self.inner.quota.saturating_sub(self.usage_bytes())
    }

    /// Makes every present chunk durable (fdatasync of data files, then sync records and
    /// journals) and persists last-used times. Call on shutdown. Tries every blob and returns
    /// the first error. A blob whose data fdatasync fails is dropped ([`StoreError::LostWrite`]).
    pub fn flush(&self) -> Result<(), StoreError> {
        let entries: Vec<_> = lock(&self.inner.index).blobs.values().cloned().collect();
        let mut first_error = None;
        for entry in entries {
            if let Err(e) = entry.flush() {
                tracing::warn!(blob = %entry.manifest().digest(), error = %e, "flush failed");
                self.after_error(&entry, &e);
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Index {
    fn remove(&mut self, digest: &Digest) -> Option<Arc<BlobEntry>> {
        let entry = self.blobs.remove(digest)?;
        entry.removed.store(true, Ordering::Relaxed);
        self.usage -= entry.manifest().size();
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_shareable_across_threads() {
        fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
        assert_shareable::<Store>();
    }

    #[test]
    fn one_store_per_root_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StoreConfig {
            root: dir.path().join("store"),
            quota_bytes: 1 << 20,
        };
        let store = Store::open(config.clone()).expect("open");
        let clone = store.clone();
        drop(store);
        assert!(matches!(
            Store::open(config.clone()),
            Err(StoreError::Locked { .. })
        ));
        drop(clone);
        Store::open(config).expect("reopen after the last clone is dropped");
    }
}
