//! Seeding: bringing a blob that no agent holds in from its origin (an OCI registry or an
//! HTTP URL), once for the whole cluster; and single flight for URLs pulled without a
//! digest. IO-free, like the [`Assigner`](crate::Assigner): events in, commands and notices
//! out through `poll_*`, time passed in.
//!
//! The chunk digests of such a blob are unknown until someone has read all of it, so one
//! target, the seeder, is told to fetch it from the origin, check it against its digest and
//! register the manifest it built. Until then the other targets wait here, not in the
//! assigner; once the manifest is known they become ordinary wants ([`SeedNotice::Seeded`])
//! and get their chunks from the seeder and from each other. Every byte therefore leaves
//! the origin once, whatever the number of targets or of jobs that ask for the blob.
//!
//! A large blob of known size that several ready targets wait for is seeded in ranges: up
//! to `max_seeders_per_blob` of them each fetch one chunk-aligned range and report its
//! chunk digests ([`SeedEvent::RangeSeeded`]), keeping the bytes; with every range in, the
//! manifest is assembled ([`SeedNotice::Assembled`]) and the blob spreads as usual, every
//! seeder holding its range. The whole blob's digest, which no single seeder could check,
//! is checked by every target at the end.
//!
//! Failover: a seeder that fails or is lost is replaced by another ready waiting target
//! that has not tried that range. After `max_attempts` failed attempts at one range (or
//! once every waiting target has tried it) the blob's targets fail; an answer another
//! seeder would get too (the origin lacks the blob, or serves other bytes) fails them at
//! once. A seeder's own disk fault excludes that agent but says nothing about the origin,
//! so it does not count as an attempt.
//!
//! Elections run lazily, at the next `poll_*`, for the blobs that events touched: a job's
//! targets arriving in one batch are all seen before the first election decides whether
//! to stripe, and an event costs nothing for blobs it does not concern.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::{BlobId, HostId, Time};
use shoal_proto::Digest;

#[cfg(test)]
mod tests;
mod urls;

pub use urls::{UrlAnswer, UrlKey};

/// Tunables. [`Default`] gives the production policy.
#[derive(Clone, Debug)]
pub struct SeederConfig {
    /// A blob at least this large (when its size is known) with several ready targets is
    /// seeded in ranges. 0 = never.
    pub stripe_min_bytes: u64,
    /// The most agents that seed one blob at once.
    pub max_seeders_per_blob: usize,
    /// Failed attempts at one range (origin failures and lost seeders, on different
    /// agents) before the blob's targets fail.
    pub max_attempts: usize,
    /// Chunk size of manifests assembled from ranges (ranges are aligned to it).
    pub chunk_size: u32,
    /// A URL fetcher that has not reported after this long is presumed stuck: the next
    /// agent to ask fetches instead.
    pub url_fetch_timeout: Duration,
    /// URL identities kept at most; the least recently asked go first.
    pub max_urls: usize,
}

impl Default for SeederConfig {
    fn default() -> Self {
        Self {
            stripe_min_bytes: 256 << 20,
            max_seeders_per_blob: 4,
            max_attempts: 3,
            chunk_size: shoal_proto::CHUNK_SIZE,
            url_fetch_timeout: Duration::from_secs(30 * 60),
            max_urls: 10_000,
        }
    }
}

/// Why a seeder's order failed, as far as the origin is concerned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SeedFault {
    /// The origin failed in a way another agent may not meet (unreachable, 5xx, cut short).
    Transient,
    /// The origin does not have the blob, or serves something that cannot be it (wrong
    /// size, not a blob): every agent would meet it.
    Missing,
    /// The origin's content does not hash to the blob's digest: every agent would meet it.
    Mismatch,
    /// The seeder's own disk or store failed: nothing is known about the origin.
    Local,
}

impl SeedFault {
    fn definitive(self) -> bool {
        matches!(self, SeedFault::Missing | SeedFault::Mismatch)
    }
}

/// What the driver tells the seeder.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SeedEvent {
    /// `host` wants `blob`, which no agent holds: it waits for the blob to be seeded from
    /// its origin. `size` is the origin's size if known, else 0 (then never striped).
    Wait {
        blob: BlobId,
        host: HostId,
        size: u64,
    },
    /// No job wants `blob` on `host` any more.
    Unwait { blob: BlobId, host: HostId },
    /// The host's session is open: it can be sent orders.
    HostReady { host: HostId },
    /// The host's session closed, its lease still runs: a seed order it holds stays its.
    HostAway { host: HostId },
    /// The host's lease expired: its seed orders are lost.
    HostGone { host: HostId },
    /// The seed order of `blob` on `host` failed. Ignored unless `host` seeds it now.
    Failed {
        blob: BlobId,
        host: HostId,
        fault: SeedFault,
        message: String,
    },
    /// The range seeder `host` fetched its range: the chunk digests from `first_chunk` on.
    /// Ignored unless `host` seeds a range of `blob` now; a range that does not fit counts
    /// as a failed attempt.
    RangeSeeded {
        blob: BlobId,
        host: HostId,
        first_chunk: u32,
        digests: Vec<Digest>,
    },
    /// The blob's manifest is known now: `by` registered it (its seeder, whose order ends
    /// with that, or an agent it was pushed on), or the driver took an assembled one
    /// (`by: None`). Seeders still fetching stop; the waiting hosts become ordinary wants.
    Known { blob: BlobId, by: Option<HostId> },
    /// The driver could not use what was seeded (e.g. an assembled manifest it cannot
    /// build): the waiting hosts' targets fail.
    Abandon { blob: BlobId, message: String },
}

/// An order for one agent.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SeedCommand {
    /// Fetch `blob` from its origin: the whole blob (then register its manifest), or only
    /// the bytes `range` = [start, end) (then report the range's digests of `chunk_size`
    /// chunks).
    Seed {
        host: HostId,
        blob: BlobId,
        range: Option<(u64, u64)>,
        chunk_size: u32,
    },
    /// Stop the seed order of `blob` on `host` (nobody needs it, or the blob is known).
    Stop { host: HostId, blob: BlobId },
}

/// Why the seeder gave up on a blob.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum GiveUp {
    /// A seeder met a failure every agent would meet.
    Definitive {
        host: HostId,
        fault: SeedFault,
        message: String,
    },
    /// `attempts` agents failed to fetch one range from the origin.
    Exhausted {
        attempts: usize,
        last: Option<LastError>,
    },
    /// Every target waiting for the blob tried and failed.
    NobodyLeft { last: Option<LastError> },
    /// The driver abandoned it.
    Abandoned { message: String },
}

/// The last failure of a blob's seeders, for messages.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum LastError {
    Failed { host: HostId, message: String },
    Lost { host: HostId },
}

/// Outcomes for the job layer and the catalog.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SeedNotice {
    /// Every range is in: the manifest (not yet verified whole: every target checks the
    /// blob digest at the end), and what each seeder holds (first chunk, chunk count).
    /// Answer with [`SeedEvent::Known`] (`by: None`) once the blob is in the catalog, or
    /// [`SeedEvent::Abandon`].
    Assembled {
        blob: BlobId,
        size: u64,
        chunk_size: u32,
        digests: Vec<Digest>,
        held: Vec<(HostId, u32, u32)>,
    },
    /// The manifest is known: these hosts waited for it and now want the blob from peers.
    Seeded { blob: BlobId, waiting: Vec<HostId> },
    /// Seeding gave up: these hosts' targets fail.
    Failed {
        blob: BlobId,
        cause: GiveUp,
        waiting: Vec<HostId>,
    },
}

/// Counters, read by the driver.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct SeederStats {
    /// Seed orders sent (whole blobs and ranges).
    pub seed_orders: u64,
    /// Of those, range orders.
    pub range_orders: u64,
    /// Ranges whose digests came in.
    pub ranges_seeded: u64,
    /// Seed orders that failed (any fault) or whose seeder was lost.
    pub failed_seeds: u64,
    /// Of those, the seeder's own disk.
    pub local_faults: u64,
    /// Blobs whose manifest became known while being seeded.
    pub seeded: u64,
    /// Blobs given up.
    pub gave_up: u64,
    /// URL resolutions answered with a known digest.
    pub url_hits: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum HostState {
    Ready,
    Away,
    Gone,
}

/// One range of a blob to seed; the whole blob when not striped (`end == 0`).
#[derive(Debug)]
struct Range {
    start: u64,
    end: u64,
    /// Its current seeder (kept after its digests came in: it holds the range).
    seeder: Option<HostId>,
    /// Agents that tried this range and failed: never asked again.
    tried: BTreeSet<HostId>,
    /// Failed attempts that count against the origin (not the seeders' own disk faults).
    attempts: usize,
    digests: Option<Vec<Digest>>,
}

impl Range {
    fn fetching(&self) -> Option<HostId> {
        self.seeder.filter(|_| self.digests.is_none())
    }
}

#[derive(Debug, Default)]
struct Blob {
    size: u64,
    waiting: BTreeSet<HostId>,
    /// Planned at the first election: one whole range unless striped.
    ranges: Vec<Range>,
    last_error: Option<LastError>,
    /// Every range is in and the manifest went out: waiting for `Known` or `Abandon`.
    assembled: bool,
}

/// The seeding state machine. Drive it like the [`Assigner`](crate::Assigner): feed
/// [`Seeder::handle`] (and [`Seeder::resolve_url`]), call [`Seeder::handle_timeout`] when
/// [`Seeder::poll_timeout`] is reached, and after each call drain [`Seeder::poll_command`]
/// and [`Seeder::poll_notice`]. Deterministic: same inputs, same outputs.
#[derive(Debug)]
pub struct Seeder {
    config: SeederConfig,
    hosts: BTreeMap<HostId, HostState>,
    blobs: BTreeMap<BlobId, Blob>,
    /// Blobs touched since the last election.
    dirty: BTreeSet<BlobId>,
    urls: urls::Urls,
    commands: VecDeque<SeedCommand>,
    notices: VecDeque<SeedNotice>,
    stats: SeederStats,
}

impl Seeder {
    pub fn new(config: SeederConfig) -> Self {
        Self {
            config,
            hosts: BTreeMap::new(),
            blobs: BTreeMap::new(),
            dirty: BTreeSet::new(),
            urls: urls::Urls::default(),
            commands: VecDeque::new(),
            notices: VecDeque::new(),
            stats: SeederStats::default(),
        }
    }

    pub fn config(&self) -> &SeederConfig {
        &self.config
    }

    pub fn stats(&self) -> &SeederStats {
        &self.stats
    }

    /// Whether `host` waits for `blob` to be seeded.
    pub fn is_waiting(&self, blob: BlobId, host: HostId) -> bool {
        (self.blobs.get(&blob)).is_some_and(|b| b.waiting.contains(&host))
    }

    /// The hosts waiting for `blob` to be seeded (its seeders among them).
    pub fn waiting(&self, blob: BlobId) -> Vec<HostId> {
        (self.blobs.get(&blob)).map_or_else(Vec::new, |b| b.waiting.iter().copied().collect())
    }

    /// Whether `blob` is being seeded (someone waits for it).
    pub fn is_seeding(&self, blob: BlobId) -> bool {
        self.blobs.contains_key(&blob)
    }

    /// The range `host` fetches of `blob` now: `Some(None)` for the whole blob.
    pub fn seeding_range(&self, blob: BlobId, host: HostId) -> Option<Option<(u64, u64)>> {
        let b = self.blobs.get(&blob)?;
        let r = b.ranges.iter().find(|r| r.fetching() == Some(host))?;
        Some((r.end > 0).then_some((r.start, r.end)))
    }

    pub fn handle(&mut self, _now: Time, event: SeedEvent) {
        match event {
            SeedEvent::Wait { blob, host, size } => {
                let b = self.blobs.entry(blob).or_default();
                if b.size == 0 {
                    b.size = size;
                }
                b.waiting.insert(host);
                self.dirty.insert(blob);
            }
            SeedEvent::Unwait { blob, host } => {
                if let Some(b) = self.blobs.get_mut(&blob) {
                    if b.waiting.remove(&host) {
                        self.dirty.insert(blob);
                    }
                }
            }
            SeedEvent::HostReady { host } => {
                self.hosts.insert(host, HostState::Ready);
                // It may be the candidate an election waited for.
                for (blob, b) in &self.blobs {
                    if b.waiting.contains(&host) {
                        self.dirty.insert(*blob);
                    }
                }
            }
            SeedEvent::HostAway { host } => {
                self.hosts.insert(host, HostState::Away);
            }
            SeedEvent::HostGone { host } => {
                self.hosts.insert(host, HostState::Gone);
                for (blob, b) in &self.blobs {
                    if b.ranges.iter().any(|r| r.fetching() == Some(host)) {
                        self.dirty.insert(*blob);
                    }
                }
            }
            SeedEvent::Failed {
                blob,
                host,
                fault,
                message,
            } => self.failed(blob, host, fault, message),
            SeedEvent::RangeSeeded {
                blob,
                host,
                first_chunk,
                digests,
            } => self.range_seeded(blob, host, first_chunk, digests),
            SeedEvent::Known { blob, by } => self.known(blob, by),
            SeedEvent::Abandon { blob, message } => {
                self.give_up(blob, GiveUp::Abandoned { message });
            }
        }
    }

    /// Answers a URL resolution: see [`UrlAnswer`].
    pub fn resolve_url(
        &mut self,
        now: Time,
        key: UrlKey,
        host: HostId,
        fetched: Option<Digest>,
        gave_up: bool,
    ) -> UrlAnswer {
        let hosts = &self.hosts;
        let alive = |h: HostId| hosts.get(&h) != Some(&HostState::Gone);
        let answer = self
            .urls
            .resolve(&self.config, now, key, host, fetched, gave_up, alive);
        if matches!(answer, UrlAnswer::Known(_)) {
            self.stats.url_hits += 1;
        }
        answer
    }

    /// Forgets URL fetchers that have not reported within the timeout.
    pub fn handle_timeout(&mut self, now: Time) {
        self.urls.expire(&self.config, now);
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        self.urls.next_expiry(&self.config)
    }

    /// The next command for an agent.
    pub fn poll_command(&mut self) -> Option<SeedCommand> {
        self.elect_dirty();
        self.commands.pop_front()
    }

    /// The next outcome for the job layer and the catalog.
    pub fn poll_notice(&mut self) -> Option<SeedNotice> {
        self.elect_dirty();
        self.notices.pop_front()
    }

    fn elect_dirty(&mut self) {
        while let Some(blob) = self.dirty.pop_first() {
            self.elect(blob);
        }
    }

    fn ready(&self, host: HostId) -> bool {
        self.hosts.get(&host) == Some(&HostState::Ready)
    }

    /// Gives every range of `blob` a live seeder, drops it if nobody waits any more, and
    /// gives up if it cannot be seeded.
    fn elect(&mut self, blob: BlobId) {
        let Some(b) = self.blobs.get(&blob) else {
            return;
        };
        if b.assembled {
            return; // The driver decides (Known or Abandon).
        }
        if b.waiting.is_empty() {
            // Nobody needs it any more (jobs cancelled or timed out).
            if let Some(b) = self.blobs.remove(&blob) {
                self.stop_fetching(blob, &b);
            }
            return;
        }
        // Seeders whose lease expired are lost: a failed attempt each.
        let lost: Vec<(usize, HostId)> = (b.ranges.iter().enumerate())
            .filter_map(|(i, r)| r.fetching().map(|h| (i, h)))
            .filter(|(_, h)| self.hosts.get(h) == Some(&HostState::Gone))
            .collect();
        // The ready waiting hosts, in order, as far as the plan needs them.
        let max_seeders = self.config.max_seeders_per_blob;
        let plan_k = if b.ranges.is_empty() {
            let ready = (b.waiting.iter())
                .filter(|h| self.ready(**h))
                .take(max_seeders)
                .count();
            let stripe = self.config.stripe_min_bytes;
            if b.size >= stripe && stripe > 0 {
                ready
            } else {
                1
            }
        } else {
            0
        };
        let chunk = self.config.chunk_size;
        let Some(b) = self.blobs.get_mut(&blob) else {
            return;
        };
        for (i, host) in lost {
            let r = &mut b.ranges[i];
            r.seeder = None;
            r.tried.insert(host);
            r.attempts += 1;
            b.last_error = Some(LastError::Lost { host });
            self.stats.failed_seeds += 1;
        }
        if b.ranges.is_empty() {
            let spans = if plan_k > 1 {
                split(b.size, plan_k, chunk)
            } else {
                vec![(0, 0)]
            };
            b.ranges = (spans.into_iter())
                .map(|(start, end)| Range {
                    start,
                    end,
                    seeder: None,
                    tried: BTreeSet::new(),
                    attempts: 0,
                    digests: None,
                })
                .collect();
        }
        let mut busy: BTreeSet<HostId> = b.ranges.iter().filter_map(Range::fetching).collect();
        let mut orders = Vec::new();
        let mut failure = None;
        for (i, r) in b.ranges.iter().enumerate() {
            if r.digests.is_some() || r.seeder.is_some() {
                continue;
            }
            if r.attempts >= self.config.max_attempts {
                failure = Some(GiveUp::Exhausted {
                    attempts: r.attempts,
                    last: b.last_error.clone(),
                });
                break;
            }
            let candidate = (b.waiting.iter())
                .find(|h| {
                    self.hosts.get(h) == Some(&HostState::Ready)
                        && !r.tried.contains(h)
                        && !busy.contains(h)
                })
                .copied();
            match candidate {
                Some(host) => {
                    busy.insert(host);
                    orders.push((i, host));
                }
                None if b.waiting.iter().all(|h| r.tried.contains(h)) => {
                    failure = Some(GiveUp::NobodyLeft {
                        last: b.last_error.clone(),
                    });
                    break;
                }
                // An untried host is busy seeding another range or not connected: wait.
                None => {}
            }
        }
        if let Some(cause) = failure {
            self.give_up(blob, cause);
            return;
        }
        for (i, host) in orders {
            let r = &mut b.ranges[i];
            r.seeder = Some(host);
            let range = (r.end > 0).then_some((r.start, r.end));
            self.stats.seed_orders += 1;
            if range.is_some() {
                self.stats.range_orders += 1;
            }
            self.commands.push_back(SeedCommand::Seed {
                host,
                blob,
                range,
                chunk_size: chunk,
            });
        }
    }

    fn failed(&mut self, blob: BlobId, host: HostId, fault: SeedFault, message: String) {
        let Some(b) = self.blobs.get_mut(&blob) else {
            return;
        };
        let Some(r) = b.ranges.iter_mut().find(|r| r.fetching() == Some(host)) else {
            return; // Not its seeder (any more): a stale report.
        };
        r.seeder = None;
        r.tried.insert(host);
        self.stats.failed_seeds += 1;
        if fault == SeedFault::Local {
            self.stats.local_faults += 1;
        } else {
            r.attempts += 1;
            b.last_error = Some(LastError::Failed {
                host,
                message: message.clone(),
            });
        }
        if fault.definitive() {
            self.give_up(
                blob,
                GiveUp::Definitive {
                    host,
                    fault,
                    message,
                },
            );
        } else {
            self.dirty.insert(blob);
        }
    }

    fn range_seeded(&mut self, blob: BlobId, host: HostId, first_chunk: u32, digests: Vec<Digest>) {
        let chunk = u64::from(self.config.chunk_size);
        let Some(b) = self.blobs.get_mut(&blob) else {
            return;
        };
        let Some(r) = b.ranges.iter_mut().find(|r| r.fetching() == Some(host)) else {
            return; // Stale: not the current seeder of any range.
        };
        let expected = (r.end - r.start).div_ceil(chunk) as usize;
        if r.end == 0 || u64::from(first_chunk) * chunk != r.start || digests.len() != expected {
            r.seeder = None;
            r.tried.insert(host);
            r.attempts += 1;
            b.last_error = Some(LastError::Failed {
                host,
                message: "reported a range that does not fit".into(),
            });
            self.stats.failed_seeds += 1;
            self.dirty.insert(blob);
            return;
        }
        r.digests = Some(digests);
        self.stats.ranges_seeded += 1;
        if b.ranges.iter().any(|r| r.digests.is_none()) {
            // Its seeder is free again: it may take a range that lost its own.
            self.dirty.insert(blob);
            return;
        }
        // Seeders that no longer wait for the blob would hold their range nowhere (they
        // move it into their store with the blob's order, which they will not get): seed
        // those ranges again on agents that will keep them.
        let mut orphaned = false;
        for r in &mut b.ranges {
            if r.seeder.is_some_and(|h| !b.waiting.contains(&h)) {
                r.seeder = None;
                r.digests = None;
                orphaned = true;
            }
        }
        if orphaned {
            self.dirty.insert(blob);
            return;
        }
        b.assembled = true;
        let digests: Vec<Digest> = (b.ranges.iter())
            .flat_map(|r| r.digests.clone().unwrap_or_default())
            .collect();
        let held = (b.ranges.iter())
            .filter_map(|r| {
                let n = r.digests.as_ref()?.len() as u32;
                Some((r.seeder?, (r.start / chunk) as u32, n))
            })
            .collect();
        self.notices.push_back(SeedNotice::Assembled {
            blob,
            size: b.size,
            chunk_size: self.config.chunk_size,
            digests,
            held,
        });
    }

    /// The manifest is known: seeders still fetching stop (but `by`, whose order ended by
    /// registering it), the waiting hosts are released.
    fn known(&mut self, blob: BlobId, by: Option<HostId>) {
        self.dirty.remove(&blob);
        let Some(mut b) = self.blobs.remove(&blob) else {
            return;
        };
        for r in b.ranges.iter_mut().filter(|r| r.fetching() == by) {
            r.seeder = None;
        }
        self.stop_fetching(blob, &b);
        self.stats.seeded += 1;
        self.notices.push_back(SeedNotice::Seeded {
            blob,
            waiting: b.waiting.into_iter().collect(),
        });
    }

    fn give_up(&mut self, blob: BlobId, cause: GiveUp) {
        self.dirty.remove(&blob);
        let Some(b) = self.blobs.remove(&blob) else {
            return;
        };
        self.stop_fetching(blob, &b);
        self.stats.gave_up += 1;
        self.notices.push_back(SeedNotice::Failed {
            blob,
            cause,
            waiting: b.waiting.into_iter().collect(),
        });
    }

    fn stop_fetching(&mut self, blob: BlobId, b: &Blob) {
        for host in b.ranges.iter().filter_map(Range::fetching) {
            self.commands.push_back(SeedCommand::Stop { host, blob });
        }
    }
}

/// Splits `size` bytes into `k` ranges aligned to `chunk` (the first ones a chunk longer).
fn split(size: u64, k: usize, chunk: u32) -> Vec<(u64, u64)> {
    let chunk = u64::from(chunk);
    let chunks = size.div_ceil(chunk);
    let k = (k as u64).clamp(1, chunks.max(1));
    let (base, extra) = (chunks / k, chunks % k);
    let mut out = Vec::new();
    let mut first = 0;
    for i in 0..k {
        let n = base + u64::from(i < extra);
        let (start, end) = (first * chunk, ((first + n) * chunk).min(size));
        out.push((start, end));
        first += n;
    }
    out
}
