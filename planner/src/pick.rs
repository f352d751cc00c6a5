//! Agent side: which chunk to request from which assigned source, and how many at once.
//!
//! Policy (v1): the first `random_first` picks are uniformly-ish random among what the
//! source has (so early chunks differ between peers and everybody soon has something to
//! trade); after that, rarest first among what the source has, where rarity is how many of
//! *our* sources hold the chunk, ties broken by the seeded RNG. A chunk held or in flight is
//! never picked, except in endgame: once every missing chunk is in flight,
//! a source with spare window may duplicate one of them (at most
//! `endgame_max_requests` requests per chunk); the first copy to arrive wins and the others
//! are returned for cancelling.
//!
//! Chunks available but not in flight live in one bitmap per rarity, so a pick is a
//! word-wise AND over at most `sources + 1` bitmaps and a have event is O(1).

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::{ChunkIndex, ChunkSet, HostId, Time};

/// Tunables. [`Default`] gives the v1 policy.
#[derive(Clone, Debug)]
pub struct PickerConfig {
    /// Bytes per chunk (the manifest's chunk size); converts rate × RTT into chunks.
    pub chunk_size: u32,
    /// How many first picks are random rather than rarest-first.
    pub random_first: u32,
    /// Window of a source until its rate and RTT are known.
    pub initial_window: u32,
    /// Bounds of the per-source window.
    pub min_window: u32,
    pub max_window: u32,
    /// In endgame, most requests outstanding for one chunk (over all sources).
    pub endgame_max_requests: u8,
    /// For the driver: a source with requests in flight that sends nothing for this long is
    /// stalled; the downloader drops it and reports `SourceStalled` (the simulator's agents
    /// and the real one apply the same rule).
    pub stall_timeout: Duration,
}

impl Default for PickerConfig {
    fn default() -> Self {
        Self {
            chunk_size: shoal_proto::CHUNK_SIZE,
            random_first: 4,
            initial_window: 4,
            min_window: 2,
            max_window: 64,
            endgame_max_requests: 2,
            stall_timeout: Duration::from_secs(1),
        }
    }
}

/// Counters for the driver to export.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct PickerStats {
    /// Requests handed out by `next_request`, including endgame duplicates.
    pub requests: u64,
    /// Endgame duplicate requests.
    pub duplicate_requests: u64,
    /// Chunks completed (first copy).
    pub chunks_done: u64,
    /// Chunks that arrived when already held (lost endgame races, late replies).
    pub wasted_chunks: u64,
    /// Requests that failed and went back to the pool.
    pub failed_requests: u64,
}

#[derive(Debug)]
struct Source {
    has: ChunkSet,
    /// Request time, and whether the request went out on an idle pipeline (a clean RTT
    /// sample: no queueing behind our own earlier requests).
    in_flight: BTreeMap<ChunkIndex, (Time, bool)>,
    /// EWMA of delivered bytes per microsecond.
    rate: Option<f64>,
    rtt_sampled: Option<Duration>,
    rtt_given: Option<Duration>,
    last_done: Time,
    /// Chunks to prefer from this source (its stripe), if the driver gave one.
    preferred: Option<ChunkSet>,
    /// Ask this source for its stripe only (outside the endgame), see `set_stripe_only`.
    stripe_only: bool,
}

/// Chunk picking for one blob download: per-chunk decisions across its assigned sources.
///
/// The driver adds the sources from its fetch order with their have-bitfields, forwards
/// have-deltas, and keeps calling [`ChunkPicker::next_request`] for each source until it
/// returns `None` (window full or nothing useful), again after every completion or failure.
/// Every request handed out must end in exactly one of `on_chunk_done`, `on_chunk_failed`,
/// or the source's removal. Same seed and inputs give the same picks.
#[derive(Debug)]
pub struct ChunkPicker {
    config: PickerConfig,
    rng: SmallRng,
    have: ChunkSet,
    /// Outstanding requests per chunk, and the same chunks as a bitmap for word-wise ops.
    in_flight: BTreeMap<ChunkIndex, u8>,
    in_flight_bits: ChunkSet,
    /// How many of our sources hold each chunk.
    rarity: Vec<u16>,
    /// `buckets[r]`: chunks neither held nor in flight that exactly `r >= 1` sources hold.
    buckets: Vec<ChunkSet>,
    sources: BTreeMap<HostId, Source>,
    picks: u32,
    stats: PickerStats,
    /// A reader streams the blob in order from this chunk (see `set_sequential`).
    sequential: Option<ChunkIndex>,
}

/// How many missing chunks ahead of an in-order reader go before any other pick.
pub const SEQUENTIAL_AHEAD: u32 = 8;

impl ChunkPicker {
    /// `have` is what is already verified locally; its length is the blob's chunk count.
    pub fn new(have: ChunkSet, seed: u64, config: PickerConfig) -> Self {
        let n = have.len();
        Self {
            config,
            rng: SmallRng::seed_from_u64(seed),
            in_flight: BTreeMap::new(),
            in_flight_bits: ChunkSet::empty(n),
            rarity: vec![0; n as usize],
            buckets: vec![ChunkSet::empty(n)],
            sources: BTreeMap::new(),
            picks: 0,
            stats: PickerStats::default(),
            sequential: None,
            have,
        }
    }

    /// A reader (the OCI mirror streaming to a client) waits for the chunks from `from` on,
    /// in order: the first `SEQUENTIAL_AHEAD` missing ones go before rarest-first, from
    /// any source that holds them, so the reader's first byte need not wait for the rest of
    /// the blob. `None`: nobody reads in order.
    pub fn set_sequential(&mut self, from: Option<ChunkIndex>) {
        self.sequential = from;
    }

    /// Adds (or replaces) a source with the chunks it announced.
    pub fn add_source(&mut self, source: HostId, has: ChunkSet) {
        self.remove_source(source);
        let n = self.have.len();
        self.sources.insert(
            source,
            Source {
                has: ChunkSet::empty(n),
                in_flight: BTreeMap::new(),
                rate: None,
                rtt_sampled: None,
                rtt_given: None,
                last_done: Time::ZERO,
                preferred: None,
                stripe_only: false,
            },
        );
        self.source_have(source, has.iter());
    }

    /// The source announced more chunks. Unknown sources and repeats are ignored.
    pub fn source_have(&mut self, source: HostId, indices: impl IntoIterator<Item = ChunkIndex>) {
        let Some(s) = self.sources.get_mut(&source) else {
            return;
        };
        let mut added = Vec::new();
        for i in indices {
            if s.has.insert(i) {
                added.push(i);
            }
        }
        for i in added {
            self.change_rarity(i, 1);
        }
    }

    /// Drops a source. Returns the chunks it had in flight: they are back in the pool, and
    /// the driver should abandon those requests.
    pub fn remove_source(&mut self, source: HostId) -> Vec<ChunkIndex> {
        let Some(s) = self.sources.remove(&source) else {
            return Vec::new();
        };
        let abandoned: Vec<ChunkIndex> = s.in_flight.keys().copied().collect();
        for &i in &abandoned {
            self.release_request(i);
        }
        for i in s.has.iter() {
            self.change_rarity(i, -1);
        }
        abandoned
    }

    /// Prefer, from `source`, chunks `i` with `i % stripes == stripe` while any is eligible.
    /// The coordinator gives each downloader of one source its own stripe, so that they ask
    /// it for different chunks: a source's upload (a seeder's above all) then injects new
    /// chunks into the swarm instead of the same chunk to several downloaders, which peers
    /// could have relayed. `stripes == 0` clears the preference.
    pub fn set_stripe(&mut self, source: HostId, stripe: u32, stripes: u32) {
        let n = self.have.len();
        let Some(s) = self.sources.get_mut(&source) else {
            return;
        };
        s.preferred = (stripes > 1).then(|| {
            let mut set = ChunkSet::empty(n);
            for i in (stripe % stripes..n).step_by(stripes as usize) {
                set.insert(ChunkIndex(i));
            }
            set
        });
    }

    /// Asks `source` for chunks of its stripe only (endgame duplicates aside), not merely
    /// first. For a source seeding the blob right now: every chunk reaches it once, from
    /// its origin, and each other chunk of it reaches this downloader sooner through the
    /// downloader whose stripe it is than through the seeder's uplink, which all of them
    /// share. No effect without a stripe.
    pub fn set_stripe_only(&mut self, source: HostId, only: bool) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.stripe_only = only;
        }
    }

    /// Sets the RTT to `source` as measured by the transport (e.g. QUIC's smoothed RTT);
    /// overrides the picker's own estimate.
    pub fn set_rtt(&mut self, source: HostId, rtt: Duration) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.rtt_given = Some(rtt);
        }
    }

    /// The next chunk to request from `source`, or `None` if its window is full or it has
    /// nothing we may request. The chunk counts as in flight from `source` until done,
    /// failed, or the source is removed.
    pub fn next_request(&mut self, now: Time, source: HostId) -> Option<ChunkIndex> {
        let window = self.window(source) as usize;
        let s = self.sources.get(&source)?;
        if s.in_flight.len() >= window || self.have.is_full() {
            return None;
        }
        let nwords = self.have.words().len();
        let has = s.has.words();
        // The source's stripe first (all ones when it has none), then anything.
        let preferred = s.preferred.as_ref().map(ChunkSet::words);
        let masks: [&dyn Fn(usize) -> u64; 2] =
            [&|w| preferred.map_or(u64::MAX, |p| p[w]), &|_| u64::MAX];
        let strict = s.stripe_only && s.preferred.is_some();
        let masks = if strict {
            &masks[..1]
        } else if preferred.is_some() {
            &masks[..]
        } else {
            &masks[1..]
        };
        let in_stripe =
            |i: ChunkIndex| !strict || s.preferred.as_ref().is_some_and(|p| p.contains(i));
        let sequential = self.sequential.and_then(|from| {
            (from.get()..self.have.len())
                .map(ChunkIndex)
                .filter(|i| !self.have.contains(*i))
                .take(SEQUENTIAL_AHEAD as usize)
                .find(|i| !self.in_flight_bits.contains(*i) && s.has.contains(*i) && in_stripe(*i))
        });
        let pick = if sequential.is_some() {
            sequential
        } else if self.picks < self.config.random_first {
            let (have, busy) = (self.have.words(), self.in_flight_bits.words());
            let rng = &mut self.rng;
            masks
                .iter()
                .find_map(|m| random_bit(rng, nwords, |w| has[w] & !have[w] & !busy[w] & m(w)))
        } else {
            // The whole stripe, rarest first, before anything outside it: a rare chunk
            // outside our stripe is most likely on its way to the downloader whose stripe
            // it is, who will relay it.
            let rng = &mut self.rng;
            let buckets = &self.buckets;
            masks.iter().find_map(|m| {
                (buckets.iter().skip(1))
                    .filter(|b| !b.is_empty())
                    .find_map(|b| random_bit(rng, nwords, |w| b.words()[w] & has[w] & m(w)))
            })
        };
        let (index, duplicate) = match pick {
            Some(i) => {
                self.picks += 1;
                (i, false)
            }
            None => (self.endgame_pick(source)?, true),
        };
        if !duplicate {
            let r = self.rarity[index.as_usize()];
            self.buckets[usize::from(r)].remove(index);
        }
        let s = self.sources.get_mut(&source).expect("checked above");
        let clean = s.in_flight.is_empty();
        s.in_flight.insert(index, (now, clean));
        *self.in_flight.entry(index).or_insert(0) += 1;
        self.in_flight_bits.insert(index);
        self.stats.requests += 1;
        self.stats.duplicate_requests += u64::from(duplicate);
        Some(index)
    }

    /// Whether every missing chunk is requested. Only then may a source duplicate a request:
    /// while some missing chunk is not held by any source yet (a swarm waiting for the next
    /// chunks to arrive), duplicates would spend upload on data already on its way.
    pub fn in_endgame(&self) -> bool {
        !self.have.is_full() && self.in_flight.len() as u64 == u64::from(self.missing())
    }

    fn endgame_pick(&mut self, source: HostId) -> Option<ChunkIndex> {
        if !self.in_endgame() {
            return None;
        }
        let s = &self.sources[&source];
        let max = self.config.endgame_max_requests;
        let mut best: Vec<ChunkIndex> = Vec::new();
        let mut best_count = u8::MAX;
        for (&i, &count) in &self.in_flight {
            if count >= max || count > best_count || !s.has.contains(i) {
                continue;
            }
            if s.in_flight.contains_key(&i) {
                continue;
            }
            if count < best_count {
                best.clear();
                best_count = count;
            }
            best.push(i);
        }
        if best.is_empty() {
            return None;
        }
        Some(best[self.rng.random_range(0..best.len())])
    }

    /// `source` delivered chunk `index` (`bytes` long), verified. Returns the other sources
    /// that still had a request out for it (endgame duplicates): cancel those; they no
    /// longer count against their windows.
    pub fn on_chunk_done(
        &mut self,
        now: Time,
        source: HostId,
        index: ChunkIndex,
        bytes: u64,
    ) -> Vec<HostId> {
        if index.0 >= self.have.len() {
            return Vec::new();
        }
        if let Some(s) = self.sources.get_mut(&source)
            && let Some((sent, clean)) = s.in_flight.get(&index).copied()
        {
            // Pipelined requests queue behind each other: the source worked on this one
            // only since the later of its request and the previous delivery.
            let busy = now
                .saturating_since(sent.max(s.last_done))
                .as_micros()
                .max(1) as f64;
            let sample = bytes as f64 / busy;
            s.rate = Some(s.rate.map_or(sample, |r| r + (sample - r) / 4.0));
            if clean {
                let rtt = now.saturating_since(sent);
                s.rtt_sampled = Some(s.rtt_sampled.map_or(rtt, |old| old.min(rtt)));
            }
            s.last_done = now;
        }
        if self.have.contains(index) {
            self.stats.wasted_chunks += 1;
            self.drop_request(source, index);
            return Vec::new();
        }
        if !self.in_flight_bits.contains(index) {
            // Unrequested (or already given up on): it was in the pool.
            let r = self.rarity[index.as_usize()];
            self.buckets[usize::from(r)].remove(index);
        }
        self.have.insert(index);
        self.stats.chunks_done += 1;
        self.drop_request(source, index);
        let others: Vec<HostId> = (self.sources.iter())
            .filter(|(_, s)| s.in_flight.contains_key(&index))
            .map(|(id, _)| *id)
            .collect();
        for &other in &others {
            self.drop_request(other, index);
        }
        others
    }

    /// The request for `index` from `source` failed (error, timeout, bad data): the chunk
    /// goes back to the pool unless another request for it is still out.
    pub fn on_chunk_failed(&mut self, _now: Time, source: HostId, index: ChunkIndex) {
        if self.drop_request(source, index) {
            self.stats.failed_requests += 1;
        }
    }

    /// Requests in flight to `source` may reach this: `ceil(rate × rtt / chunk) + 2`,
    /// clamped to `[min_window, max_window]`; `initial_window` until both are known.
    pub fn window(&self, source: HostId) -> u32 {
        let c = &self.config;
        let Some(s) = self.sources.get(&source) else {
            return 0;
        };
        let (Some(rate), Some(rtt)) = (s.rate, s.rtt_given.or(s.rtt_sampled)) else {
            return c.initial_window.clamp(c.min_window, c.max_window);
        };
        let bdp = rate * rtt.as_micros() as f64 / f64::from(c.chunk_size.max(1));
        let w = bdp.ceil().min(f64::from(u32::MAX - 2)) as u32 + 2;
        w.clamp(c.min_window, c.max_window)
    }

    /// Whether every chunk is verified.
    pub fn is_complete(&self) -> bool {
        self.have.is_full()
    }

    /// The verified chunks.
    pub fn have(&self) -> &ChunkSet {
        &self.have
    }

    /// Chunks not verified yet.
    pub fn missing(&self) -> u32 {
        self.have.len() - self.have.count()
    }

    /// Requests outstanding, to every source.
    pub fn in_flight_total(&self) -> usize {
        self.in_flight.len()
    }

    /// Requests outstanding to `source`.
    pub fn in_flight(&self, source: HostId) -> usize {
        self.sources.get(&source).map_or(0, |s| s.in_flight.len())
    }

    /// How many of our sources hold `index`.
    pub fn rarity(&self, index: ChunkIndex) -> u32 {
        self.rarity
            .get(index.as_usize())
            .map_or(0, |&r| u32::from(r))
    }

    /// Current sources, in order.
    pub fn sources(&self) -> impl Iterator<Item = HostId> + '_ {
        self.sources.keys().copied()
    }

    pub fn stats(&self) -> &PickerStats {
        &self.stats
    }

    // ---- mechanics ----

    fn pooled(&self, i: ChunkIndex) -> bool {
        !self.have.contains(i) && !self.in_flight_bits.contains(i)
    }

    fn change_rarity(&mut self, i: ChunkIndex, delta: i32) {
        let Some(r) = self.rarity.get_mut(i.as_usize()) else {
            return;
        };
        let old = *r;
        let new = (i32::from(old) + delta).clamp(0, i32::from(u16::MAX)) as u16;
        *r = new;
        // Grow the buckets even for a chunk in flight: it returns to the pool under its
        // rarity then (`release_request`), which may be higher than any pooled chunk's.
        while self.buckets.len() <= usize::from(new) {
            self.buckets.push(ChunkSet::empty(self.have.len()));
        }
        if self.pooled(i) {
            self.buckets[usize::from(old)].remove(i);
            self.buckets[usize::from(new)].insert(i);
        }
    }

    /// Removes one request; returns whether there was one.
    fn drop_request(&mut self, source: HostId, index: ChunkIndex) -> bool {
        let removed = self
            .sources
            .get_mut(&source)
            .and_then(|s| s.in_flight.remove(&index))
            .is_some();
        if removed {
            self.release_request(index);
        }
        removed
    }

    /// One fewer request out for `index`; back to the pool when none is left.
    fn release_request(&mut self, index: ChunkIndex) {
        let Some(count) = self.in_flight.get_mut(&index) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.in_flight.remove(&index);
        self.in_flight_bits.remove(index);
        if !self.have.contains(index) {
            let r = self.rarity[index.as_usize()];
            self.buckets[usize::from(r)].insert(index);
        }
    }
}

/// A random set bit among words `f(0..nwords)`: a random starting word, the first
/// non-zero word from there (wrapping), a random bit of it. Not exactly uniform over the
/// set, but spread and reproducible from the seed.
fn random_bit(rng: &mut SmallRng, nwords: usize, f: impl Fn(usize) -> u64) -> Option<ChunkIndex> {
    if nwords == 0 {
        return None;
    }
    let start = rng.random_range(0..nwords);
    for k in 0..nwords {
        let w = (start + k) % nwords;
        let mut bits = f(w);
        if bits == 0 {
            continue;
        }
        for _ in 0..rng.random_range(0..bits.count_ones()) {
            bits &= bits - 1;
        }
        return Some(ChunkIndex(w as u32 * 64 + bits.trailing_zeros()));
    }
    None
}
