//! The blob catalog: manifests (persisted) and who holds what (soft).

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal_planner::{Event, FailReason, HostId};
use shoal_proto::pb::v1 as pb;
use shoal_proto::{Digest, Manifest};

use super::{ApiError, State};

#[derive(Debug)]
pub struct Entry {
    pub manifest: Arc<Manifest>,
    pub registered_by: String,
    pub registered_at: Option<prost_types::Timestamp>,
    /// host -> (chunks held, complete)
    pub holders: BTreeMap<HostId, (u32, bool)>,
}

#[derive(Debug, Default)]
pub struct Catalog {
    blobs: BTreeMap<Digest, Entry>,
}

pub fn known_event(m: &Manifest) -> Event {
    Event::BlobKnown {
        blob: m.blob_id(),
        size: m.size(),
        chunk_count: m.chunk_count(),
    }
}

pub fn fail_reason(r: pb::FailureReason) -> FailReason {
    match r {
        pb::FailureReason::DigestMismatch => FailReason::BlobDigest,
        pb::FailureReason::DiskFull | pb::FailureReason::IoError => FailReason::Storage,
        _ => FailReason::Other,
    }
}

pub fn count_bits(bits: &[u8]) -> u32 {
    bits.iter().map(|b| b.count_ones()).sum()
}

impl Catalog {
    pub fn len(&self) -> usize {
        self.blobs.len()
    }

    pub fn insert(
        &mut self,
        manifest: Arc<Manifest>,
        registered_by: String,
        registered_at: Option<prost_types::Timestamp>,
    ) {
        self.blobs.entry(manifest.digest()).or_insert(Entry {
            manifest,
            registered_by,
            registered_at,
            holders: BTreeMap::new(),
        });
    }

    pub fn entry(&self, blob: &Digest) -> Option<&Entry> {
        self.blobs.get(blob)
    }

    /// Forgets a blob (a manifest that turned out not to describe it).
    pub fn remove(&mut self, blob: &Digest) {
        self.blobs.remove(blob);
    }

    pub fn manifest(&self, blob: &Digest) -> Option<Arc<Manifest>> {
        self.blobs.get(blob).map(|e| e.manifest.clone())
    }

    pub fn holds_complete(&self, blob: &Digest, host: HostId) -> bool {
        self.blobs
            .get(blob)
            .and_then(|e| e.holders.get(&host))
            .is_some_and(|h| h.1)
    }

    pub fn complete_holders(&self, blob: &Digest) -> usize {
        self.blobs
            .get(blob)
            .map_or(0, |e| e.holders.values().filter(|h| h.1).count())
    }

    /// Sets a holder; returns whether anything changed.
    pub fn set_holder(&mut self, blob: &Digest, host: HostId, chunks: u32, complete: bool) -> bool {
        let Some(entry) = self.blobs.get_mut(blob) else {
            return false;
        };
        if chunks == 0 && !complete {
            return entry.holders.remove(&host).is_some();
        }
        let new = (chunks, complete);
        entry.holders.insert(host, new) != Some(new)
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
            match e.holders.get(&host) {
                Some((_, true)) => out.0 += 1,
                Some((_, false)) => out.1 += 1,
                None => {}
            }
        }
        out
    }

    fn info(&self, e: &Entry) -> pb::BlobInfo {
        pb::BlobInfo {
            digest: e.manifest.digest().to_string(),
            size: e.manifest.size(),
            chunk_size: e.manifest.chunk_size(),
            chunk_count: e.manifest.chunk_count(),
            complete_holders: e.holders.values().filter(|h| h.1).count() as u32,
            partial_holders: e.holders.values().filter(|h| !h.1).count() as u32,
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

impl State {
    pub(super) fn get_blob(
        &self,
        req: pb::GetBlobRequest,
    ) -> Result<pb::GetBlobResponse, ApiError> {
        let digest: Digest = req
            .digest
            .parse()
            .map_err(|e| ApiError::InvalidArgument(format!("digest: {e}")))?;
        let Some(entry) = self.catalog.blobs.get(&digest) else {
            return Err(ApiError::NotFound(format!(
                "blob {digest} is not in the catalog"
            )));
        };
        let holders = entry
            .holders
            .iter()
            .map(|(host, (chunks, complete))| pb::BlobHolder {
                agent_id: self.agents.name(*host),
                complete: *complete,
                chunks_held: *chunks,
                pinned: false,
            })
            .collect();
        Ok(pb::GetBlobResponse {
            blob: Some(self.catalog.info(entry)),
            holders,
            manifest: req
                .include_manifest
                .then(|| pb::Manifest::from(entry.manifest.as_ref())),
        })
    }
}
