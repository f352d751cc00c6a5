//! Which chunk to ask which source for next, for one download.
//!
//! This is the agent's swap point for the planner's `ChunkPicker`: the download loop only
//! calls the methods below. The policy here is the one the design asks for, in its simplest
//! form: a few random chunks first (so peers soon hold different chunks to trade), then
//! rarest-first among what the source holds, and endgame duplicates for the last chunks.
//! Picking scans the chunk table (O(chunks) per pick): fine for blobs of thousands of chunks.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_proto::ChunkIndex;

/// A source of one download, numbered by the download loop.
pub(crate) type SourceKey = usize;

/// Chunks picked at random before switching to rarest-first.
const RANDOM_FIRST: u32 = 4;
/// With this many chunks or fewer missing, a chunk in flight from one source may also be
/// asked of another.
const ENDGAME_CHUNKS: u32 = 8;
/// Copies of one chunk in flight at most (endgame).
const MAX_DUPLICATES: u8 = 2;

#[derive(Debug)]
pub(crate) struct Picker {
    /// Verified locally.
    have: Vec<bool>,
    missing: u32,
    /// Requests in flight per chunk.
    requested: Vec<u8>,
    /// Sources holding each chunk.
    availability: Vec<u16>,
    sources: Vec<Option<SourceChunks>>,
    picks: u32,
    window: usize,
    rng: SmallRng,
}

#[derive(Debug)]
struct SourceChunks {
    has: Vec<bool>,
    in_flight: Vec<u32>,
}

impl Picker {
    /// `have` lists the chunks already held locally; `window` is the requests to keep in
    /// flight per source.
    pub(crate) fn new(have: Vec<bool>, window: usize, seed: u64) -> Self {
        let n = have.len();
        let missing = have.iter().filter(|h| !**h).count() as u32;
        Self {
            have,
            missing,
            requested: vec![0; n],
            availability: vec![0; n],
            sources: Vec::new(),
            picks: 0,
            window: window.max(1),
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    pub(crate) fn missing(&self) -> u32 {
        self.missing
    }

    /// Requests to keep in flight to `source`.
    pub(crate) fn window(&self, _source: SourceKey) -> usize {
        self.window
    }

    pub(crate) fn in_flight(&self, source: SourceKey) -> usize {
        self.source(source).map_or(0, |s| s.in_flight.len())
    }

    fn source(&self, source: SourceKey) -> Option<&SourceChunks> {
        self.sources.get(source).and_then(Option::as_ref)
    }

    pub(crate) fn add_source(&mut self, source: SourceKey) {
        if self.sources.len() <= source {
            self.sources.resize_with(source + 1, || None);
        }
        if self.sources[source].is_none() {
            self.sources[source] = Some(SourceChunks {
                has: vec![false; self.have.len()],
                in_flight: Vec::new(),
            });
        }
    }

    /// Forgets the source; its requests in flight no longer count (their results may still
    /// arrive and are handled by [`Picker::finished`]).
    pub(crate) fn remove_source(&mut self, source: SourceKey) {
        let Some(s) = self.sources.get_mut(source).and_then(Option::take) else {
            return;
        };
        for (i, has) in s.has.iter().enumerate() {
            if *has {
                self.availability[i] -= 1;
            }
        }
        for i in s.in_flight {
            self.requested[i as usize] = self.requested[i as usize].saturating_sub(1);
        }
    }

    /// The source's full picture (bit `i` of `bits`, LSB-first, = holds chunk `i`).
    pub(crate) fn set_bitfield(&mut self, source: SourceKey, bits: &[u8]) {
        let Some(s) = self.sources.get_mut(source).and_then(Option::as_mut) else {
            return;
        };
        for i in 0..s.has.len() {
            let now = bits.get(i / 8).is_some_and(|b| (b >> (i % 8)) & 1 == 1);
            if now != s.has[i] {
                s.has[i] = now;
                if now {
                    self.availability[i] += 1;
                } else {
                    self.availability[i] -= 1;
                }
            }
        }
    }

    pub(crate) fn source_has(&mut self, source: SourceKey, index: ChunkIndex) {
        let Some(s) = self.sources.get_mut(source).and_then(Option::as_mut) else {
            return;
        };
        let i = index.0 as usize;
        if i < s.has.len() && !s.has[i] {
            s.has[i] = true;
            self.availability[i] += 1;
        }
    }

    /// The next chunk to request from `source`, marked in flight; `None` if it has nothing
    /// useful (or its window is full).
    pub(crate) fn next(&mut self, source: SourceKey) -> Option<ChunkIndex> {
        let window = self.window(source);
        let n = self.have.len();
        let start = self.rng.random_range(0..n.max(1));
        let s = self.source(source)?;
        if s.in_flight.len() >= window || self.missing == 0 {
            return None;
        }
        let fresh = |i: usize| !self.have[i] && self.requested[i] == 0 && s.has[i];
        let mut best: Option<usize> = None;
        if self.picks < RANDOM_FIRST {
            best = (0..n).map(|k| (start + k) % n).find(|&i| fresh(i));
        } else {
            for k in 0..n {
                let i = (start + k) % n;
                if fresh(i) && best.is_none_or(|b| self.availability[i] < self.availability[b]) {
                    best = Some(i);
                }
            }
        }
        if best.is_none() && self.missing <= ENDGAME_CHUNKS {
            best = (0..n).map(|k| (start + k) % n).find(|&i| {
                !self.have[i]
                    && s.has[i]
                    && self.requested[i] < MAX_DUPLICATES
                    && !s.in_flight.contains(&(i as u32))
            });
        }
        let i = best?;
        self.picks += 1;
        self.requested[i] += 1;
        if let Some(s) = self.sources.get_mut(source).and_then(Option::as_mut) {
            s.in_flight.push(i as u32);
        }
        Some(ChunkIndex(i as u32))
    }

    /// A request ended; `stored` if the chunk is now held locally.
    pub(crate) fn finished(&mut self, source: SourceKey, index: ChunkIndex, stored: bool) {
        let i = index.0 as usize;
        if let Some(s) = self.sources.get_mut(source).and_then(Option::as_mut) {
            if let Some(pos) = s.in_flight.iter().position(|&c| c == index.0) {
                s.in_flight.swap_remove(pos);
                self.requested[i] = self.requested[i].saturating_sub(1);
            }
        }
        if stored && i < self.have.len() && !self.have[i] {
            self.have[i] = true;
            self.missing -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(n: usize) -> Vec<u8> {
        vec![0xff; n.div_ceil(8)]
    }

    #[test]
    fn picks_every_missing_chunk_once_then_nothing() {
        let mut p = Picker::new(vec![false, true, false, false], 8, 1);
        p.add_source(0);
        p.set_bitfield(0, &all(4));
        let mut got: Vec<u32> = std::iter::from_fn(|| p.next(0)).map(|c| c.0).collect();
        got.sort_unstable();
        // Three missing: the endgame may add duplicates only from other sources.
        assert_eq!(got, vec![0, 2, 3]);
        for c in got {
            p.finished(0, ChunkIndex(c), true);
        }
        assert_eq!(p.missing(), 0);
        assert_eq!(p.next(0), None);
    }

    #[test]
    fn window_bounds_requests_per_source() {
        let mut p = Picker::new(vec![false; 100], 3, 1);
        p.add_source(0);
        p.set_bitfield(0, &all(100));
        assert!(p.next(0).is_some() && p.next(0).is_some() && p.next(0).is_some());
        assert_eq!(p.next(0), None);
        assert_eq!(p.in_flight(0), 3);
    }

    #[test]
    fn rarest_first_after_the_random_start() {
        let mut p = Picker::new(vec![false; 16], 100, 7);
        p.add_source(0);
        p.add_source(1);
        p.set_bitfield(0, &all(16));
        // Source 1 holds chunks 0..8 only: those are less rare than 8..16.
        p.set_bitfield(1, &[0xff, 0x00]);
        for _ in 0..RANDOM_FIRST {
            p.next(0).expect("random pick");
        }
        for _ in 0..4 {
            let c = p.next(0).expect("pick");
            assert!(c.0 >= 8, "picked {c}, which two sources hold");
        }
    }

    #[test]
    fn endgame_duplicates_across_sources_and_removal_frees_requests() {
        let mut p = Picker::new(vec![false; 2], 8, 3);
        p.add_source(0);
        p.add_source(1);
        p.set_bitfield(0, &all(2));
        p.set_bitfield(1, &all(2));
        let a = p.next(0).expect("a");
        let b = p.next(0).expect("b");
        assert_eq!(p.next(0), None, "no chunk twice from one source");
        // Endgame: source 1 may duplicate what source 0 has in flight.
        let c = p.next(1).expect("dup");
        assert!(c == a || c == b);
        p.remove_source(0);
        p.finished(1, c, true);
        assert_eq!(p.missing(), 1);
        assert!(p.next(1).is_some());
    }
}
