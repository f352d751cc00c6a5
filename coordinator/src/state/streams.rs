//! Streaming seeds: a blob that one agent seeds whole from its origin is fetched by the
//! blob's other waiting targets while the seed still runs, chunk by chunk, instead of after
//! it. The seeder stores each chunk as it arrives and reports its digest (`ChunksSeeded`);
//! the targets get an order from peers with a provisional manifest (size and chunk size
//! final, digests filled in as they come, `ChunkDigests`), the seeder and each other as
//! sources, and each its own stripe of the seeder. When the seed ends (the seeder's
//! `BlobRegistered`), the targets' orders pass to the assigner under the same order ids.
//!
//! Without this, N simultaneous cold pulls of one image layer or model took one bound for
//! the seed and then a swarm, or worse, the seeder's uplink: (N − 1) × size ÷ link.
//!
//! This module owns only the streams' bookkeeping; `streaming.rs` turns it into orders.

use std::collections::{BTreeMap, BTreeSet};

use shoal_planner::HostId;
use shoal_proto::{Digest, Manifest, ManifestError};

/// Sources of an order, each with the stripe of its chunks the order is given.
pub type Stripes = Vec<(HostId, (u32, u32))>;

/// One blob being streamed.
#[derive(Debug)]
pub struct Stream {
    /// Provisional until every digest is in.
    pub manifest: Manifest,
    /// Agents seeding it whole now (one, unless a failover overlapped).
    pub seeders: BTreeSet<HostId>,
    /// Waiting targets given an order from peers for it.
    pub targets: BTreeSet<HostId>,
    /// Targets that reported the blob whole before the catalog knew its manifest.
    pub finished: BTreeSet<HostId>,
    /// Failed orders per target: after [`MAX_TARGET_FAILURES`] it waits for the seed's end.
    failures: BTreeMap<HostId, u32>,
}

/// A stream target whose orders failed this often gets no more until the seed ends.
pub const MAX_TARGET_FAILURES: u32 = 3;

impl Stream {
    /// The stripe of the seeder's chunks `host` is given: its rank among the targets, so
    /// that the seeder's uplink sends each chunk to one target and the others relay it.
    pub fn seeder_stripe(&self, host: HostId) -> (u32, u32) {
        let n = self.targets.len().max(1) as u32;
        let rank = self.targets.iter().position(|t| *t == host).unwrap_or(0) as u32;
        (rank, n)
    }

    /// The sources of `host`'s order and its stripe of each: the seeders, and the other
    /// targets (no stripe: they relay).
    pub fn sources_of(&self, host: HostId) -> Stripes {
        let stripe = self.seeder_stripe(host);
        let seeders = self.seeders.iter().map(|s| (*s, stripe));
        let peers = (self.targets.iter())
            .filter(|t| **t != host && !self.seeders.contains(t))
            .map(|t| (*t, (0, 1)));
        seeders.chain(peers).filter(|(s, _)| *s != host).collect()
    }
}

#[derive(Debug, Default)]
pub struct Streams {
    blobs: BTreeMap<Digest, Stream>,
}

impl Streams {
    pub fn get(&self, blob: &Digest) -> Option<&Stream> {
        self.blobs.get(blob)
    }

    pub fn contains(&self, blob: &Digest) -> bool {
        self.blobs.contains_key(blob)
    }

    /// `seeder` seeds `blob` whole and reported its first digests: the stream starts (or
    /// gains a seeder). Refused if the blob cannot have that shape, or a stream of another
    /// shape runs.
    pub fn start(
        &mut self,
        blob: Digest,
        name: Option<&str>,
        size: u64,
        chunk_size: u32,
        seeder: HostId,
    ) -> Result<&mut Stream, ManifestError> {
        if let Some(s) = self.blobs.get(&blob) {
            if s.manifest.name() != name {
                return Err(ManifestError::NotItsName { digest: blob });
            }
            if s.manifest.size() != size || s.manifest.chunk_size() != chunk_size {
                return Err(ManifestError::ChunkCountMismatch {
                    size,
                    chunk_size,
                    got: u64::from(s.manifest.chunk_count()),
                    want: size.div_ceil(u64::from(chunk_size.max(1))),
                });
            }
        } else {
            let manifest = Manifest::provisional_named(blob, name, size, chunk_size)?;
            self.blobs.insert(
                blob,
                Stream {
                    manifest,
                    seeders: BTreeSet::new(),
                    targets: BTreeSet::new(),
                    finished: BTreeSet::new(),
                    failures: BTreeMap::new(),
                },
            );
        }
        let s = self.blobs.get_mut(&blob).expect("inserted above");
        s.seeders.insert(seeder);
        s.targets.remove(&seeder);
        Ok(s)
    }

    /// Digests of chunks `first..`; how many were new.
    pub fn learn(
        &mut self,
        blob: &Digest,
        first: u32,
        digests: &[Digest],
    ) -> Result<u32, ManifestError> {
        match self.blobs.get_mut(blob) {
            Some(s) => s.manifest.learn(first, digests),
            None => Ok(0),
        }
    }

    /// `host` gets an order for the streamed blob; false if it has one, seeds it, or no
    /// stream runs.
    pub fn add_target(&mut self, blob: &Digest, host: HostId) -> bool {
        match self.blobs.get_mut(blob) {
            Some(s)
                if !s.seeders.contains(&host)
                    && s.failures.get(&host).copied().unwrap_or(0) < MAX_TARGET_FAILURES =>
            {
                s.targets.insert(host)
            }
            _ => false,
        }
    }

    /// The order of target `host` failed: it leaves, and may be given another; true if it
    /// was a target.
    pub fn target_failed(&mut self, blob: &Digest, host: HostId) -> bool {
        let Some(s) = self.blobs.get_mut(blob) else {
            return false;
        };
        if !s.targets.remove(&host) {
            return false;
        }
        *s.failures.entry(host).or_default() += 1;
        true
    }

    /// Whether a running stream of `blob` has a seeder.
    pub fn has_seeder(&self, blob: &Digest) -> bool {
        self.blobs.get(blob).is_some_and(|s| !s.seeders.is_empty())
    }

    /// `host` no longer takes part (it seeds instead, or is no longer wanted).
    pub fn remove_target(&mut self, blob: &Digest, host: HostId) -> bool {
        (self.blobs.get_mut(blob)).is_some_and(|s| s.targets.remove(&host))
    }

    /// A seeder stopped (failed, lost, cancelled).
    pub fn remove_seeder(&mut self, blob: &Digest, host: HostId) {
        if let Some(s) = self.blobs.get_mut(blob) {
            s.seeders.remove(&host);
        }
    }

    /// Forgets a stream nobody takes part in any more (its seed stopped, its targets left);
    /// true if it ended.
    pub fn end_if_idle(&mut self, blob: &Digest) -> bool {
        let idle =
            (self.blobs.get(blob)).is_some_and(|s| s.seeders.is_empty() && s.targets.is_empty());
        if idle {
            self.blobs.remove(blob);
        }
        idle
    }

    /// `host` is gone (its lease expired): it seeds nothing and is no target any more.
    /// Returns the blobs whose streams it took part in.
    pub fn drop_host(&mut self, host: HostId) -> Vec<Digest> {
        let mut touched = Vec::new();
        for (blob, s) in &mut self.blobs {
            if s.seeders.remove(&host) | s.targets.remove(&host) {
                touched.push(*blob);
            }
        }
        touched
    }

    /// A target holds the blob whole: remembered until the catalog knows the manifest.
    pub fn finished(&mut self, blob: &Digest, host: HostId) {
        if let Some(s) = self.blobs.get_mut(blob) {
            s.finished.insert(host);
        }
    }

    /// The seed ended, one way or the other.
    pub fn end(&mut self, blob: &Digest) -> Option<Stream> {
        self.blobs.remove(blob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_share_the_seeder_in_stripes_and_relay_to_each_other() {
        let blob = Digest::of(b"blob");
        let mut streams = Streams::default();
        streams
            .start(blob, None, 10 << 20, 1 << 20, HostId(0))
            .unwrap();
        assert!(streams.add_target(&blob, HostId(1)));
        assert!(streams.add_target(&blob, HostId(2)));
        assert!(!streams.add_target(&blob, HostId(2)), "already a target");
        assert!(
            !streams.add_target(&blob, HostId(0)),
            "the seeder is no target"
        );
        let s = streams.get(&blob).unwrap();
        assert_eq!(
            s.sources_of(HostId(1)),
            vec![(HostId(0), (0, 2)), (HostId(2), (0, 1))]
        );
        assert_eq!(
            s.sources_of(HostId(2)),
            vec![(HostId(0), (1, 2)), (HostId(1), (0, 1))]
        );
        // A stream of another shape for the same blob is refused.
        assert!(
            streams
                .start(blob, None, 11 << 20, 1 << 20, HostId(3))
                .is_err()
        );
        // A target elected seeder stops being a target.
        streams
            .start(blob, None, 10 << 20, 1 << 20, HostId(2))
            .unwrap();
        let s = streams.get(&blob).unwrap();
        assert_eq!(
            s.sources_of(HostId(1)),
            vec![(HostId(0), (0, 1)), (HostId(2), (0, 1))]
        );
    }

    #[test]
    fn a_target_that_keeps_failing_gets_no_more_orders() {
        let blob = Digest::of(b"blob");
        let mut streams = Streams::default();
        streams
            .start(blob, None, 10 << 20, 1 << 20, HostId(0))
            .unwrap();
        for _ in 0..MAX_TARGET_FAILURES {
            assert!(streams.add_target(&blob, HostId(1)));
            assert!(streams.target_failed(&blob, HostId(1)));
        }
        assert!(!streams.add_target(&blob, HostId(1)));
        assert!(!streams.target_failed(&blob, HostId(2)), "not a target");
    }

    #[test]
    fn a_lost_host_leaves_every_stream_and_an_idle_stream_ends() {
        let blob = Digest::of(b"blob");
        let mut streams = Streams::default();
        streams
            .start(blob, None, 10 << 20, 1 << 20, HostId(0))
            .unwrap();
        streams.add_target(&blob, HostId(1));
        assert_eq!(streams.drop_host(HostId(0)), vec![blob]);
        assert!(!streams.end_if_idle(&blob), "a target is left");
        assert!(streams.remove_target(&blob, HostId(1)));
        assert!(streams.end_if_idle(&blob));
        assert!(!streams.contains(&blob));
    }

    #[test]
    fn digests_are_learned_once_and_contradictions_refused() {
        let blob = Digest::of(b"blob");
        let mut streams = Streams::default();
        streams
            .start(blob, None, 3 << 12, 1 << 12, HostId(0))
            .unwrap();
        let d = [Digest::of(b"0"), Digest::of(b"1")];
        assert_eq!(streams.learn(&blob, 0, &d), Ok(2));
        assert_eq!(streams.learn(&blob, 1, &d[1..]), Ok(0));
        assert!(streams.learn(&blob, 1, &d[..1]).is_err());
        assert!(streams.get(&blob).unwrap().manifest.is_provisional());
        // A stream's manifest is chained: its last value is the blob digest, nothing else.
        assert!(streams.learn(&blob, 2, &[Digest::of(b"2")]).is_err());
        assert_eq!(streams.learn(&blob, 2, &[blob]), Ok(1));
        assert!(!streams.get(&blob).unwrap().manifest.is_provisional());
        assert_eq!(streams.learn(&Digest::of(b"other"), 0, &d), Ok(0));
    }
}
