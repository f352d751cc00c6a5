//! The blob catalog: manifests (persisted once verified) and who holds what (soft). Its
//! writes go to the writer (`crate::writer`) and are not waited for: a verified manifest
//! the disk lost is registered again by the agents that hold the blob.
//!
//! A manifest assembled from seeded ranges is provisional until one agent has read the
//! whole blob and checked its digest: kept in memory only, and dropped if a target finds
//! that the blob does not match (the origin serves other bytes).

use std::collections::BTreeMap;
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
    pub registered_by: String,
    pub registered_at: Option<prost_types::Timestamp>,
    /// Someone checked the whole blob against its digest (and it is persisted).
    pub verified: bool,
    pub holders: BTreeMap<HostId, Holding>,
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
                    manifest: Arc::new(m),
                    registered_by: stored.registered_by,
                    registered_at: stored.registered_at,
                    verified: true,
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

    /// Records a manifest new to the catalog and returns true; a known one is kept (and
    /// becomes verified if this one is). A verified manifest is persisted.
    pub fn insert(
        &mut self,
        manifest: Manifest,
        by: String,
        now: SystemTime,
        verified: bool,
    ) -> bool {
        let digest = manifest.digest();
        if let Some(entry) = self.blobs.get(&digest) {
            if verified && !entry.verified {
                self.mark_verified(&digest);
            }
            return false;
        }
        self.blobs.insert(
            digest,
            Entry {
                manifest: Arc::new(manifest),
                registered_by: by,
                registered_at: Some(now.into()),
                verified: false,
                holders: BTreeMap::new(),
            },
        );
        if verified {
            self.mark_verified(&digest);
        }
        true
    }

    /// One agent read the whole blob and checked its digest: the manifest is persisted (queued
    /// for the writer; a failed write is logged).
    pub fn mark_verified(&mut self, blob: &Digest) {
        let Some(entry) = self.blobs.get_mut(blob) else {
            return;
        };
        if entry.verified {
            return;
        }
        let stored = StoredBlob {
            manifest: Some(pb::Manifest::from(entry.manifest.as_ref())),
            registered_by: entry.registered_by.clone(),
            registered_at: entry.registered_at,
        };
        entry.verified = true;
        self.writer.write(Write::Blob(*blob.as_bytes(), stored));
    }

    pub fn is_provisional(&self, blob: &Digest) -> bool {
        self.blobs.get(blob).is_some_and(|e| !e.verified)
    }

    pub fn entry(&self, blob: &Digest) -> Option<&Entry> {
        self.blobs.get(blob)
    }

    /// Forgets a blob (a manifest that turned out not to describe it, or one an operator
    /// removed), in the database too: it does not come back at the next start. `then`, if
    /// given, runs once that is stored.
    pub fn remove(&mut self, blob: &Digest, then: Option<Then>) {
        let persisted = self.blobs.remove(blob).is_some_and(|e| e.verified);
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

    pub fn holds_complete(&self, blob: &Digest, host: HostId) -> bool {
        self.blobs
            .get(blob)
            .and_then(|e| e.holders.get(&host))
            .is_some_and(|h| h.complete)
    }

    pub fn complete_holders(&self, blob: &Digest) -> usize {
        self.blobs
            .get(blob)
            .map_or(0, |e| e.holders.values().filter(|h| h.complete).count())
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

    pub fn list(&self, req: pb::ListBlobsRequest) -> pb::ListBlobsResponse {
        let blobs = (self.blobs.iter())
            .map(|(d, e)| (d.to_string(), e))
            .collect();
        let (page, next_page_token) = super::page(blobs, req.page_size, &req.page_token);
        pb::ListBlobsResponse {
            blobs: page.into_iter().map(|e| self.info(e)).collect(),
            next_page_token,
        }
    }
}
