//! The blob catalog: manifests and who holds what (soft). Its writes go to the writer
//! (`crate::writer`) and are not waited for: a manifest the disk lost is registered again by
//! the agents that hold the blob (`super::vetting`).
//!
//! A manifest is only as good as who vouches for it ([`Trust`]). One assembled from seeded
//! ranges is provisional: memory only, and dropped if a target finds that the blob does not
//! match (the origin serves other bytes). One an agent registers (it ingested the blob) is
//! that agent's word: persisted and used, but every target reads the blob whole against its
//! digest until an agent other than its registrant has done so, and one that two targets
//! find wrong is dropped and its registrant quarantined (`super::reports`). Only a verified
//! manifest lets targets skip that read.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use shoal_planner::{Event, HostId};
use shoal_proto::pb::v1 as pb;
use shoal_proto::{Digest, Manifest};

use crate::db::{Db, StoredBlob, Write};
use crate::writer::{Then, Writer};

#[derive(Debug)]
pub struct Entry {
    pub manifest: Arc<Manifest>,
    /// `manifest` as orders carry it, made once: its chunk table is shared by every order
    /// (32 KiB per GiB of blob; a 20,000-target Distribute copied it 20,000 times).
    pub wire: pb::Manifest,
    /// `wire` without its chunk table, and the table's SHA-256, for orders that let their
    /// agent fetch the table from peers (see [`slim`]); None for a table orders carry.
    pub slim: Option<(pb::Manifest, Digest)>,
    /// The agent whose registration this is (the seeders' names for a seeded one).
    pub registered_by: String,
    pub registered_at: Option<prost_types::Timestamp>,
    pub trust: Trust,
    /// Targets that found the blob they assembled does not match the digest.
    pub mismatches: BTreeSet<HostId>,
    pub holders: BTreeMap<HostId, Holding>,
}

/// Who vouches for a manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Assembled from seeded ranges: nobody has read the blob whole yet. Memory only.
    Seeded,
    /// Its registrant says it read the blob whole and it matched. Persisted.
    Registered,
    /// An agent other than its registrant read the blob whole against its digest. Persisted.
    Verified,
}

/// What one agent holds of a blob, as it last reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// Verified chunks held.
    pub chunks: u32,
    pub complete: bool,
    /// A user pinned it on the agent (from its inventory; shown in GetBlob).
    pub pinned: bool,
}

#[derive(Debug)]
pub struct Catalog {
    writer: Writer,
    blobs: BTreeMap<Digest, Entry>,
}

pub fn known_event(m: &Manifest) -> Event {
    Event::BlobKnown {
        blob: m.blob_id(),
        size: m.size(),
        chunk_count: m.chunk_count(),
    }
}

pub fn count_bits(bits: &[u8]) -> u32 {
    bits.iter().map(|b| b.count_ones()).sum()
}

/// Chunk tables up to this many bytes (64 chunks) go in every order: one round trip to a
/// peer for the table costs more than sending it.
const INLINE_TABLE_MAX: usize = 64 * Digest::LEN;

/// `wire` without its chunk table, and the table's SHA-256: what an order carries when its
/// agent is to fetch the table from its sources (`FromPeers.table_digest`). None for a
/// table small enough to inline, or too large for one peer frame.
fn slim(wire: &pb::Manifest) -> Option<(pb::Manifest, Digest)> {
    let len = wire.chunk_digests.len();
    if len <= INLINE_TABLE_MAX || len > shoal_proto::wire::MAX_TABLE_LEN {
        return None;
    }
    let table = Digest::of(&wire.chunk_digests);
    let mut slim = wire.clone();
    slim.chunk_digests = Default::default();
    Some((slim, table))
}

impl Catalog {
    /// Loads the persisted manifests; unreadable ones are skipped with a warning.
    pub fn load(db: &Db, writer: Writer) -> Result<Self, crate::db::DbError> {
        let mut blobs = BTreeMap::new();
        for stored in db.blobs()? {
            let Some(m) = (stored.manifest.as_ref()).and_then(|m| Manifest::try_from(m).ok())
            else {
                tracing::warn!("skipping an unreadable manifest in the catalog");
                continue;
            };
            blobs.insert(
                m.digest(),
                Entry {
                    slim: slim(&pb::Manifest::from(&m)),
                    wire: pb::Manifest::from(&m),
                    manifest: Arc::new(m),
                    registered_by: stored.registered_by,
                    registered_at: stored.registered_at,
                    trust: if stored.unconfirmed {
                        Trust::Registered
                    } else {
                        Trust::Verified
                    },
                    mismatches: BTreeSet::new(),
                    holders: BTreeMap::new(),
                },
            );
        }
        Ok(Self { writer, blobs })
    }

    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn manifests(&self) -> impl Iterator<Item = &Manifest> {
        self.blobs.values().map(|e| e.manifest.as_ref())
    }

    /// Records a manifest new to the catalog, vouched for by `by` as far as `trust` says
    /// (`Seeded` or `Registered`), and returns true. A known manifest is kept: the same one
    /// registered by another agent than its registrant is verified by it (two agents read the
    /// blob whole); a different one is ignored (the targets' reads decide, see `mismatch`).
    pub fn insert(
        &mut self,
        manifest: Manifest,
        by: String,
        now: SystemTime,
        trust: Trust,
    ) -> bool {
        let digest = manifest.digest();
        if let Some(entry) = self.blobs.get_mut(&digest) {
            if trust == Trust::Seeded {
                return false;
            }
            if *entry.manifest != manifest {
                tracing::warn!(blob = %digest, agent = by, registered_by = entry.registered_by, "a registration contradicts the catalog's manifest; ignored");
                return false;
            }
            match entry.trust {
                // The seeders' chunk digests and a whole read agree: the registrant vouches.
                Trust::Seeded => {
                    entry.trust = Trust::Registered;
                    entry.registered_by = by;
                    self.persist(&digest);
                }
                Trust::Registered if entry.registered_by != by => self.mark_verified(&digest, &by),
                Trust::Registered | Trust::Verified => {}
            }
            return false;
        }
        self.blobs.insert(
            digest,
            Entry {
                slim: slim(&pb::Manifest::from(&manifest)),
                wire: pb::Manifest::from(&manifest),
                manifest: Arc::new(manifest),
                registered_by: by,
                registered_at: Some(now.into()),
                trust,
                mismatches: BTreeSet::new(),
                holders: BTreeMap::new(),
            },
        );
        if trust != Trust::Seeded {
            self.persist(&digest);
        }
        true
    }

    /// Agent `by` read the whole blob and it matched the digest: a seeded manifest, or a
    /// registered one (by another agent than its registrant), is verified and persisted as
    /// such (queued for the writer; a failed write is logged).
    pub fn mark_verified(&mut self, blob: &Digest, by: &str) {
        let Some(entry) = self.blobs.get_mut(blob) else {
            return;
        };
        let vouches = match entry.trust {
            Trust::Seeded => true,
            Trust::Registered => entry.registered_by != by,
            Trust::Verified => false,
        };
        if vouches {
            entry.trust = Trust::Verified;
            self.persist(blob);
        }
    }

    fn persist(&mut self, blob: &Digest) {
        let Some(entry) = self.blobs.get(blob) else {
            return;
        };
        let stored = StoredBlob {
            manifest: Some(entry.wire.clone()),
            registered_by: entry.registered_by.clone(),
            registered_at: entry.registered_at,
            unconfirmed: entry.trust != Trust::Verified,
        };
        self.writer.write(Write::Blob(*blob.as_bytes(), stored));
    }

    /// Target `host` found that the blob it assembled does not match its digest; returns
    /// how many distinct targets have (none for a verified manifest: a target that says
    /// so about a blob another agent read whole is wrong, or its disk is).
    pub fn mismatch(&mut self, blob: &Digest, host: HostId) -> usize {
        match self.blobs.get_mut(blob) {
            Some(entry) if entry.trust != Trust::Verified => {
                entry.mismatches.insert(host);
                entry.mismatches.len()
            }
            _ => 0,
        }
    }

    pub fn trust(&self, blob: &Digest) -> Option<Trust> {
        self.blobs.get(blob).map(|e| e.trust)
    }

    pub fn entry(&self, blob: &Digest) -> Option<&Entry> {
        self.blobs.get(blob)
    }

    /// Forgets a blob (a manifest that turned out not to describe it, or one an operator
    /// removed), in the database too: it does not come back at the next start. `then`, if
    /// given, runs once that is stored.
    pub fn remove(&mut self, blob: &Digest, then: Option<Then>) {
        let persisted = self
            .blobs
            .remove(blob)
            .is_some_and(|e| e.trust != Trust::Seeded);
        let forget = Write::ForgetBlob(*blob.as_bytes());
        match then {
            Some(then) => self.writer.write_then(forget, then),
            None if persisted => self.writer.write(forget),
            None => {}
        }
    }

    pub fn manifest(&self, blob: &Digest) -> Option<Arc<Manifest>> {
        self.blobs.get(blob).map(|e| e.manifest.clone())
    }

    /// The manifest as orders carry it (cheap to clone: its chunk table is shared).
    pub fn wire_manifest(&self, blob: &Digest) -> Option<pb::Manifest> {
        self.blobs.get(blob).map(|e| e.wire.clone())
    }

    /// The manifest without its chunk table and the table's digest, if the table is large
    /// enough that orders leave it to peers.
    pub fn slim_manifest(&self, blob: &Digest) -> Option<(pb::Manifest, Digest)> {
        self.blobs.get(blob).and_then(|e| e.slim.clone())
    }

    /// Whether `host` holds some of `blob` (hence its manifest), as far as it told.
    pub fn holds_some(&self, blob: &Digest, host: HostId) -> bool {
        (self.blobs.get(blob)).is_some_and(|e| e.holders.contains_key(&host))
    }

    pub fn holds_complete(&self, blob: &Digest, host: HostId) -> bool {
        self.blobs
            .get(blob)
            .and_then(|e| e.holders.get(&host))
            .is_some_and(|h| h.complete)
    }

    /// [`Catalog::holds_complete`] as a function of (host, blob), for what builds a job's
    /// targets (`Jobs::want_next` and its kin).
    pub fn holding(&self) -> impl Fn(HostId, Digest) -> bool + '_ {
        |host, blob| self.holds_complete(&blob, host)
    }

    pub fn complete_holders(&self, blob: &Digest) -> usize {
        self.blobs
            .get(blob)
            .map_or(0, |e| e.holders.values().filter(|h| h.complete).count())
    }

    /// The chunks all holders of `blob` have verified, summed, if none holds it whole
    /// (`None` if one does, or the blob is unknown).
    pub fn held_if_none_whole(&self, blob: &Digest) -> Option<u64> {
        let e = self.blobs.get(blob)?;
        if e.holders.values().any(|h| h.complete) {
            return None;
        }
        Some(e.holders.values().map(|h| u64::from(h.chunks)).sum())
    }

    /// Sets what a holder holds (its pin is kept); returns whether that changed.
    pub fn set_holder(&mut self, blob: &Digest, host: HostId, chunks: u32, complete: bool) -> bool {
        let Some(entry) = self.blobs.get_mut(blob) else {
            return false;
        };
        if chunks == 0 && !complete {
            return entry.holders.remove(&host).is_some();
        }
        let holding = entry.holders.entry(host).or_default();
        let old = (holding.chunks, holding.complete);
        (holding.chunks, holding.complete) = (chunks, complete);
        old != (chunks, complete)
    }

    /// Records whether a holder pinned the blob; nothing if it holds none of it.
    pub fn set_pinned(&mut self, blob: &Digest, host: HostId, pinned: bool) {
        if let Some(holding) = (self.blobs.get_mut(blob)).and_then(|e| e.holders.get_mut(&host)) {
            holding.pinned = pinned;
        }
    }

    /// The blobs `host` holds, complete or partial.
    pub fn held_by(&self, host: HostId) -> Vec<Digest> {
        (self.blobs.iter())
            .filter(|(_, e)| e.holders.contains_key(&host))
            .map(|(d, _)| *d)
            .collect()
    }

    /// Drops every holding of `host`, returning the blobs it held.
    pub fn forget_host(&mut self, host: HostId) -> Vec<Digest> {
        let mut out = Vec::new();
        for (digest, entry) in &mut self.blobs {
            if entry.holders.remove(&host).is_some() {
                out.push(*digest);
            }
        }
        out
    }

    /// (complete, partial) blob counts of one host.
    pub fn counts_for(&self, host: HostId) -> (u32, u32) {
        let mut out = (0, 0);
        for e in self.blobs.values() {
            match e.holders.get(&host).map(|h| h.complete) {
                Some(true) => out.0 += 1,
                Some(false) => out.1 += 1,
                None => {}
            }
        }
        out
    }

    pub fn info(&self, e: &Entry) -> pb::BlobInfo {
        pb::BlobInfo {
            digest: e.manifest.digest().to_string(),
            size: e.manifest.size(),
            chunk_size: e.manifest.chunk_size(),
            chunk_count: e.manifest.chunk_count(),
            complete_holders: e.holders.values().filter(|h| h.complete).count() as u32,
            partial_holders: e.holders.values().filter(|h| !h.complete).count() as u32,
            registered_at: e.registered_at,
            registered_by: e.registered_by.clone(),
        }
    }

    /// One page of blobs in digest order, taken from the map (a digest's bytes sort as its
    /// lowercase hex does), not by sorting every blob for each page.
    pub fn list(&self, req: pb::ListBlobsRequest) -> pb::ListBlobsResponse {
        use std::ops::Bound;
        let token = req.page_token.as_str();
        let after = token.parse::<Digest>().ok();
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let blobs = (self.blobs.range((from, Bound::Unbounded)))
            .map(|(d, e)| (d.to_string(), e))
            // A token that is no digest: whatever sorts after it, as before.
            .skip_while(|(key, _)| after.is_none() && !token.is_empty() && key.as_str() <= token);
        let (page, next_page_token) = super::page_in_order(blobs, req.page_size);
        pb::ListBlobsResponse {
            blobs: page.into_iter().map(|e| self.info(e)).collect(),
            next_page_token,
        }
    }
}
