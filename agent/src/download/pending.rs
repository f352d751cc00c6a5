//! A download whose manifest is provisional: its blob is being seeded right now and chunk
//! digests arrive as the seeder stores the chunks (`Control::Digests`). A chunk whose digest
//! is not known is never asked for (the store would refuse it); what sources announce of
//! such chunks waits here until the digest comes. A stream that goes quiet for
//! [`PENDING_STALL`] (no digest learned, no chunk stored, nothing in flight) has lost its
//! seed (a coordinator that restarted does not know it; a seed that died) and fails the
//! download instead of leaving it waiting forever.

use std::collections::HashMap;
use std::time::Duration;

use shoal_planner::ChunkSet;
use shoal_proto::pb::v1::FailureReason;
use shoal_proto::{ChunkIndex, Manifest};
use tokio::time::Instant;

use crate::failure::Failure;

/// How long a provisional download may go without a new digest or chunk.
pub(super) const PENDING_STALL: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub(super) struct Pending {
    /// Chunks that may be asked for: checkable by the store's manifest
    /// (`Manifest::is_checkable`: a chained chunk needs the value before it too).
    known: ChunkSet,
    /// Chunks sources announced whose digests are not known yet, by source.
    deferred: HashMap<usize, Vec<ChunkIndex>>,
    /// When a digest was last learned or a chunk last stored.
    news: Instant,
}

impl Pending {
    /// For a provisional manifest; None when every digest is known.
    pub(super) fn of(manifest: &Manifest) -> Option<Pending> {
        if !manifest.is_provisional() {
            return None;
        }
        let mut known = ChunkSet::empty(manifest.chunk_count());
        for index in manifest.chunk_indices() {
            if manifest.is_checkable(index) {
                known.insert(index);
            }
        }
        Some(Pending {
            known,
            deferred: HashMap::new(),
            news: Instant::now(),
        })
    }

    /// Of what `source` announced, the chunks that may be asked for now; the rest wait.
    pub(super) fn admit(
        &mut self,
        source: usize,
        indices: impl IntoIterator<Item = ChunkIndex>,
    ) -> Vec<ChunkIndex> {
        let (ready, wait): (Vec<ChunkIndex>, Vec<ChunkIndex>) =
            indices.into_iter().partition(|i| self.known.contains(*i));
        if !wait.is_empty() {
            self.deferred.entry(source).or_default().extend(wait);
        }
        ready
    }

    /// `manifest` (the store's) learned the values of chunks `first..first + count`: the
    /// chunks sources announced meanwhile, by source, that may be asked for now.
    pub(super) fn learned(
        &mut self,
        manifest: &Manifest,
        first: u32,
        count: u32,
    ) -> Vec<(usize, Vec<ChunkIndex>)> {
        // What became checkable: the chunks learned, and the one after the last of them.
        let end = (first + count + 1).min(manifest.chunk_count());
        for index in (first..end).map(ChunkIndex) {
            if manifest.is_checkable(index) {
                self.known.insert(index);
            }
        }
        self.news = Instant::now();
        let known = &self.known;
        let mut released = Vec::new();
        for (source, waiting) in &mut self.deferred {
            let ready: Vec<ChunkIndex> = waiting
                .iter()
                .copied()
                .filter(|i| known.contains(*i))
                .collect();
            if !ready.is_empty() {
                waiting.retain(|i| !known.contains(*i));
                released.push((*source, ready));
            }
        }
        released
    }

    /// Every digest is known: the download is an ordinary one from now on.
    pub(super) fn is_complete(&self) -> bool {
        self.known.is_full()
    }

    pub(super) fn forget_source(&mut self, source: usize) {
        self.deferred.remove(&source);
    }

    /// A chunk was stored.
    pub(super) fn stored(&mut self) {
        self.news = Instant::now();
    }

    /// Fails a stream gone quiet with nothing in flight; else when to look again.
    pub(super) fn check(&self, in_flight: usize) -> Result<Instant, Failure> {
        let due = self.news + PENDING_STALL;
        if Instant::now() >= due && in_flight == 0 {
            return Err(Failure::new(
                FailureReason::NoSource,
                format!(
                    "no chunk digests from the seed of this blob for {} s",
                    PENDING_STALL.as_secs()
                ),
            ));
        }
        Ok(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::Digest;

    #[tokio::test(start_paused = true)]
    async fn unknown_chunks_wait_for_their_digests_and_a_quiet_stream_fails() {
        let blob = Digest::of(b"blob");
        let mut m = Manifest::provisional(blob, 4 * 4096, 4096).expect("provisional");
        let mut digests: Vec<Digest> = (0..4u8).map(|i| Digest::of(&[i])).collect();
        digests[3] = blob;
        m.learn(0, &digests[..1]).expect("learn");
        let mut p = Pending::of(&m).expect("provisional");
        let ready = p.admit(7, [0, 1, 2].map(ChunkIndex));
        assert_eq!(
            ready,
            vec![ChunkIndex(0)],
            "only the chunk whose digest is known"
        );
        let mut learn = |p: &mut Pending, first: u32, values: &[Digest]| {
            m.learn(first, values).expect("learn");
            p.learned(&m, first, values.len() as u32)
        };
        assert_eq!(
            learn(&mut p, 1, &digests[1..2]),
            vec![(7, vec![ChunkIndex(1)])]
        );
        p.forget_source(7);
        assert!(
            learn(&mut p, 2, &digests[2..3]).is_empty(),
            "a removed source's wait is gone"
        );
        assert!(!p.is_complete());
        // Quiet, but a request is in flight: no failure; quiet with nothing in flight: fails.
        tokio::time::advance(PENDING_STALL).await;
        assert!(p.check(1).is_ok());
        let e = p.check(0).expect_err("a quiet stream fails");
        assert_eq!(e.reason, FailureReason::NoSource);
        p.stored();
        assert!(p.check(0).is_ok(), "a stored chunk is news");
        learn(&mut p, 3, &digests[3..]);
        assert!(p.is_complete());
        assert!(Pending::of(&Manifest::provisional(blob, 10, 4096).unwrap()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_chained_chunk_waits_for_the_value_before_it_too() {
        let mut m =
            Manifest::provisional(Digest::of(b"blob"), 4 * 4096, 4096).expect("provisional");
        assert!(m.is_chained());
        let values: Vec<Digest> = (0..3u8).map(|i| Digest::of(&[i])).collect();
        let mut p = Pending::of(&m).expect("provisional");
        let mut learn = |p: &mut Pending, first: u32, values: &[Digest]| {
            m.learn(first, values).expect("learn");
            p.learned(&m, first, values.len() as u32)
        };
        assert!(p.admit(7, [1, 2].map(ChunkIndex)).is_empty());
        // Chunk 2's value alone does not make it checkable (a batch of values was lost).
        assert!(learn(&mut p, 2, &values[2..3]).is_empty());
        assert_eq!(
            learn(&mut p, 1, &values[1..2]),
            vec![(7, vec![ChunkIndex(2)])],
            "2 is checkable from 1's value; 1 needs 0's"
        );
        assert_eq!(
            learn(&mut p, 0, &values[..1]),
            vec![(7, vec![ChunkIndex(1)])]
        );
    }
}
