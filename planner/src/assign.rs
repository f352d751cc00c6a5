//! Coordinator side: which hosts each target pulls a blob from.
//!
//! Policy (v1): a target gets up to K sources among hosts that hold the blob, complete or
//! partial (partial holders are how a swarm forms: targets become sources for later
//! targets). Complete holders are taken same rack first, then same zone, then anywhere.
//! Then the target splits random edges of downloads that have nothing yet (s -> u becomes
//! s -> t -> u, see `split_edges`), which keeps a swarm that arrives at once a shallow
//! random graph; then partial holders with room, drawn at random weighted by progress. A
//! source serves at most F downloads and at most its `upload_bps`, where each download is
//! expected to take `download_bps / K` of it. Targets short of K sources are topped up when
//! capacity frees, a new holder appears (nearest hungry target first, higher priority and
//! fewer sources first within a tier) or a new download brings edges to split.
//!
//! Cost per event is O(log n) index updates plus the handful of hosts touched; a host's
//! holdings are re-indexed only when it crosses between "has spare upload" and "full".

mod api;
mod hosts;
mod intake;
mod plan;
mod split;
mod stripes;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::by_host::{ByHost, HostHashMap};
use crate::tiered::Tiered;
use crate::{BlobId, HostId, RackId, Time, ZoneId};

pub use api::{AssignerConfig, AssignerStats, Command, Event, Notice, Priority};

/// Hungry targets an offered source looks at before giving up: keeps a free slot from
/// costing a scan of every waiting target when none of them fits.
const OFFER_SCAN_LIMIT: usize = 256;

/// Partial holders a target's top-up draws its sources from at random (nearest first).
const TOP_UP_SCAN: usize = 64;

/// Available holders a target's top-up looks at before it settles for what it found: a
/// holder with spare upload too small for this target's share stays in the index (it may
/// fit a target with a smaller share), and without a limit every top-up walked all of them.
const TOP_UP_SCAN_LIMIT: usize = 512;

/// A host with at most this fraction of its upload free (1/1024) counts as full: shares are
/// the downlink divided by K, so K shares leave a few bits per second of rounding free, and
/// a host with that left is full, not a source nobody fits.
const FULL_SLACK: u64 = 1024;

/// Targets short of sources that a new download of their blob lets try again.
const HUNGRY_RETRY: usize = 4;

/// How long a download shuns a source it reported stalled. Not for ever: a stall is as often
/// the reporter's own link (pulled, congested) as the source's, and a download that shunned
/// every holder for good would wait for ever once its link came back.
pub const STALL_EXCLUSION: std::time::Duration = std::time::Duration::from_secs(5);

/// Order among available holders of one blob: complete first, then more chunks, then salt.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct HolderKey {
    incomplete: bool,
    chunks: Reverse<u32>,
    salt: u64,
    host: HostId,
}

/// Order among targets short of sources: higher priority, then fewer sources, then age.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct HungryKey {
    priority: Reverse<Priority>,
    sources: usize,
    seq: u64,
    host: HostId,
}

#[derive(Clone, Copy, Debug)]
struct Holding {
    chunks: u32,
    complete: bool,
    /// The key under which this holding sits in the blob's `available` index, if it does.
    indexed: Option<HolderKey>,
}

#[derive(Debug)]
struct Host {
    zone: ZoneId,
    rack: RackId,
    upload_bps: u64,
    download_bps: u64,
    alive: bool,
    lease_expiry: Time,
    salt: u64,
    holdings: BTreeMap<BlobId, Holding>,
    /// Downloads this host serves, with the upload rate reserved for each.
    serving: BTreeMap<(BlobId, HostId), Serve>,
    /// What it had committed when its capacity fell below that (`Event::HostCapacity`), until
    /// its commitments fit again; 0 otherwise.
    committed_before_cut: u64,
    /// The stripe slots of the downloads it serves, per blob (see `stripes`).
    stripes: BTreeMap<BlobId, stripes::Slots>,
    committed_bps: u64,
    wants: BTreeSet<BlobId>,
}

/// One download a source serves: the upload rate reserved for it.
#[derive(Clone, Copy, Debug)]
struct Serve {
    rate: u64,
}

impl Host {
    /// A host known only by id (wanted before it came up): down, nowhere, no capacity.
    fn unknown() -> Host {
        Host {
            zone: ZoneId(u32::MAX),
            rack: RackId(u32::MAX),
            upload_bps: 0,
            download_bps: 0,
            alive: false,
            lease_expiry: Time::ZERO,
            salt: 0,
            holdings: BTreeMap::new(),
            serving: BTreeMap::new(),
            stripes: BTreeMap::new(),
            committed_bps: 0,
            committed_before_cut: 0,
            wants: BTreeSet::new(),
        }
    }
}

impl Download {
    /// Whether it must not take `source` now: reported corrupt, or stalled recently.
    fn shuns(&self, source: HostId, now: Time) -> bool {
        self.excluded.contains(&source) || self.stalled.get(&source).is_some_and(|u| *u > now)
    }
}

#[derive(Debug)]
struct Download {
    priority: Priority,
    seq: u64,
    sources: Vec<HostId>,
    /// The source list the agent was last told; `None` while no order is outstanding.
    sent: Option<Vec<HostId>>,
    /// The stripes it was last told, one per source in `sent`.
    sent_stripes: Vec<(u32, u32)>,
    /// Sources it reported corrupt: never again, for this blob.
    excluded: BTreeSet<HostId>,
    /// Sources it reported stalled, shunned until the time given (see [`STALL_EXCLUSION`]).
    stalled: BTreeMap<HostId, Time>,
    attempts: u32,
    retry_at: Option<Time>,
    hungry: Option<HungryKey>,
    /// When it last made progress (its order, or more chunks reported).
    progress_at: Time,
    /// No progress for `stuck_after` without a complete source: it may be in an island of
    /// partial holders that all lack the same chunks, so it wants a complete holder.
    stuck: bool,
    /// (when, chunks held) at the last rate check.
    mark: (Time, u32),
    /// A check is scheduled in `stuck_checks`.
    checking: bool,
    /// A stripe update is scheduled in `restripes`.
    restripe_pending: bool,
    /// Where it sits in its blob's `members`: the zone it was filed under, and its index.
    member: (ZoneId, usize),
}

#[derive(Debug, Default)]
struct Blob {
    size: u64,
    chunk_count: u32,
    available: Tiered<HolderKey>,
    hungry: Hungry,
    downloads: HostHashMap<Download>,
    /// The keys of `downloads` by zone: for drawing one at random.
    members: Members,
    corrupt: BTreeSet<HostId>,
    /// Who reported each source corrupt, until [`CORRUPT_QUORUM`] distinct reporters make
    /// it corrupt for everyone.
    corrupt_reports: BTreeMap<HostId, BTreeSet<HostId>>,
}

/// A blob's hungry downloads (see `sync_hungry`), in two indexes by what can feed them.
#[derive(Debug, Default)]
struct Hungry {
    /// Short of K sources: any holder with room may feed them.
    short: Tiered<HungryKey>,
    /// K sources but stuck without a complete one: only a complete holder helps them, so a
    /// partial holder's offer does not walk past them (under load, when progress reports
    /// queue, thousands of downloads look stuck at once).
    starved: Tiered<HungryKey>,
}

impl Hungry {
    /// The index a download with `key` sits in, given K.
    fn tier(&mut self, key: &HungryKey, k: usize) -> &mut Tiered<HungryKey> {
        if key.sources >= k {
            &mut self.starved
        } else {
            &mut self.short
        }
    }

    fn insert(&mut self, zone: ZoneId, rack: RackId, key: HungryKey, k: usize) {
        self.tier(&key, k).insert(zone, rack, key);
    }

    fn remove(&mut self, zone: ZoneId, rack: RackId, key: &HungryKey, k: usize) {
        self.tier(key, k).remove(zone, rack, key);
    }

    fn is_empty(&self) -> bool {
        self.short.is_empty() && self.starved.is_empty()
    }
}

/// Distinct downloaders that must report a source corrupt before no one uses it for the
/// blob: one reporter (which may itself be lying) only stops using it itself.
pub const CORRUPT_QUORUM: usize = 2;

/// The downloads of one blob by the zone of their target, for drawing one at random
/// (see `split_edges`).
#[derive(Debug, Default)]
struct Members {
    by_zone: BTreeMap<ZoneId, Vec<HostId>>,
    len: usize,
}

impl Members {
    /// Files `host` under `zone`; returns where it sits.
    fn insert(&mut self, zone: ZoneId, host: HostId) -> (ZoneId, usize) {
        let v = self.by_zone.entry(zone).or_default();
        v.push(host);
        self.len += 1;
        (zone, v.len() - 1)
    }

    /// Removes the entry at `at`; returns the host moved into its place, if any.
    fn remove(&mut self, at: (ZoneId, usize)) -> Option<HostId> {
        let v = self.by_zone.get_mut(&at.0)?;
        v.swap_remove(at.1);
        self.len -= 1;
        let moved = v.get(at.1).copied();
        if v.is_empty() {
            self.by_zone.remove(&at.0);
        }
        moved
    }

    fn in_zone(&self, zone: ZoneId) -> &[HostId] {
        self.by_zone.get(&zone).map_or(&[], Vec::as_slice)
    }

    /// The `x`-th over all zones (`x < len`).
    fn nth(&self, mut x: usize) -> Option<HostId> {
        for v in self.by_zone.values() {
            if x < v.len() {
                return Some(v[x]);
            }
            x -= v.len();
        }
        None
    }
}

/// The coordinator's source-assignment state machine.
///
/// Drive it like `quinn-proto`: feed [`Assigner::handle`], call [`Assigner::handle_timeout`]
/// when [`Assigner::poll_timeout`] is reached, and after each call drain
/// [`Assigner::poll_command`] (for agents) and [`Assigner::poll_notice`] (for the job layer).
/// `now` must never decrease. Same seed, config and inputs give the same outputs.
#[derive(Debug)]
pub struct Assigner {
    config: AssignerConfig,
    rng: SmallRng,
    hosts: ByHost<Host>,
    blobs: BTreeMap<BlobId, Blob>,
    leases: BTreeSet<(Time, HostId)>,
    retries: BTreeSet<(Time, BlobId, HostId)>,
    /// When to check whether a download is stuck: (progress_at + stuck_after, blob, host).
    stuck_checks: BTreeSet<(Time, BlobId, HostId)>,
    /// The latest `now` passed in.
    now: Time,
    dirty: BTreeSet<(BlobId, HostId)>,
    /// Downloads whose stripes changed, due to be told at the time (see `restripe`).
    restripes: BTreeSet<(Time, BlobId, HostId)>,
    /// Sources whose stripes of a blob have an empty slot, due to close ranks at the time
    /// unless a new download took it (see `free_slot`).
    compactions: BTreeSet<(Time, BlobId, HostId)>,
    /// Downloads changed since the last commands went out, in order (see `flush`).
    touched: Vec<(BlobId, HostId)>,
    touched_set: BTreeSet<(BlobId, HostId)>,
    /// Inside `begin_batch`..`end_batch`: commands wait for the end.
    batching: bool,
    /// Wants beyond one slice, waiting to be planned (see `intake`).
    intake: intake::Intake,
    /// Blobs with at least one hungry target: what freed capacity is offered to.
    hungry_blobs: BTreeSet<BlobId>,
    commands: VecDeque<Command>,
    notices: VecDeque<Notice>,
    next_seq: u64,
    stats: AssignerStats,
}

impl Assigner {
    /// `seed` drives the only randomness (tie-breaking salts between equal sources).
    pub fn new(config: AssignerConfig, seed: u64) -> Self {
        assert!(
            config.max_sources > 0 && config.max_uploads > 0,
            "K and F must be positive"
        );
        Self {
            config,
            rng: SmallRng::seed_from_u64(seed),
            hosts: ByHost::default(),
            blobs: BTreeMap::new(),
            leases: BTreeSet::new(),
            retries: BTreeSet::new(),
            stuck_checks: BTreeSet::new(),
            now: Time::ZERO,
            dirty: BTreeSet::new(),
            restripes: BTreeSet::new(),
            compactions: BTreeSet::new(),
            touched: Vec::new(),
            touched_set: BTreeSet::new(),
            batching: false,
            intake: intake::Intake::default(),
            hungry_blobs: BTreeSet::new(),
            commands: VecDeque::new(),
            notices: VecDeque::new(),
            next_seq: 0,
            stats: AssignerStats::default(),
        }
    }

    /// Applies one event. Leases that ran out by `now` expire first, so a lapsed host gets
    /// nothing even if the driver is late calling `handle_timeout`.
    pub fn handle(&mut self, now: Time, event: Event) {
        self.now = self.now.max(now);
        self.expire_leases(now);
        if !self.batching {
            self.refill_intake();
        }
        match event {
            Event::HostUp {
                host,
                zone,
                rack,
                upload_bps,
                download_bps,
            } => self.host_up(now, host, zone, rack, upload_bps, download_bps),
            Event::HostCapacity {
                host,
                upload_bps,
                download_bps,
            } => self.host_capacity(host, upload_bps, download_bps),
            Event::HostDown { host } => self.host_down(host),
            Event::Heartbeat { host } => self.renew(now, host),
            Event::BlobKnown {
                blob,
                size,
                chunk_count,
            } => {
                let b = self.blobs.entry(blob).or_default();
                b.size = size;
                b.chunk_count = chunk_count;
            }
            Event::Holds {
                host,
                blob,
                chunks,
                complete,
            } => self.holds(host, blob, chunks, complete),
            Event::Want {
                blob,
                host,
                priority,
            } => self.intake_want(blob, host, priority),
            Event::Unwant { blob, host } => {
                self.intake_unwant(blob, host);
                self.unwant(blob, host);
            }
            Event::Done { host, blob } => self.holds(host, blob, u32::MAX, true),
            Event::Failed { host, blob } => self.failed(now, host, blob),
            Event::SourceStalled { host, blob, source } => self.stalled(host, blob, source),
            Event::SourceCorrupt { host, blob, source } => self.corrupt(host, blob, source),
            Event::ManifestReplaced { blob } => self.manifest_replaced(blob),
        }
        self.flush();
    }

    /// Expires leases and starts retries due by `now`.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = self.now.max(now);
        self.expire_leases(now);
        while let Some(&(at, blob, host)) = self.stuck_checks.first() {
            if at > now {
                break;
            }
            self.stuck_checks.pop_first();
            self.check_stuck(blob, host);
        }
        while let Some(&(at, blob, host)) = self.restripes.first() {
            if at > now {
                break;
            }
            self.restripes.pop_first();
            if let Some(d) = self.download_mut(blob, host) {
                d.restripe_pending = false;
                self.dirty.insert((blob, host));
            }
        }
        while let Some(&(at, blob, source)) = self.compactions.first() {
            if at > now {
                break;
            }
            self.compactions.pop_first();
            self.compact(blob, source);
        }
        while let Some(&(at, blob, host)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            if let Some(d) = self.download_mut(blob, host) {
                // This entry may be a stall exclusion ending, not the retry's own time.
                if d.retry_at.is_some_and(|t| t <= now) {
                    d.retry_at = None;
                }
                self.sync_hungry(blob, host);
                self.top_up(blob, host);
            }
        }
        if !self.batching {
            self.refill_intake();
        }
        self.plan_queued();
        self.flush();
    }

    /// Withholds commands until [`Assigner::end_batch`]: feed a job's wants for many
    /// targets between the two and each download gets one command with its final
    /// sources, not a `Fetch` followed by `UpdateSources` as later targets arrive and
    /// re-plan it. Decisions are the same as without the batch.
    pub fn begin_batch(&mut self) {
        self.batching = true;
        self.refill_intake();
    }

    /// Ends a batch: one command per download changed in it.
    pub fn end_batch(&mut self) {
        self.batching = false;
        self.flush();
    }

    /// When `handle_timeout` must next be called, if ever.
    pub fn poll_timeout(&self) -> Option<Time> {
        let lease = self.leases.first().map(|&(t, _)| t);
        let retry = self.retries.first().map(|&(t, _, _)| t);
        let stuck = self.stuck_checks.first().map(|&(t, _, _)| t);
        let restripe = self.restripes.first().map(|&(t, _, _)| t);
        let compaction = self.compactions.first().map(|&(t, _, _)| t);
        (lease.into_iter())
            .chain(self.intake_due())
            .chain(retry)
            .chain(stuck)
            .chain(restripe)
            .chain(compaction)
            .min()
    }

    /// The next command for an agent, in the order they were decided.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next outcome for the job layer.
    pub fn poll_notice(&mut self) -> Option<Notice> {
        self.notices.pop_front()
    }

    pub fn stats(&self) -> &AssignerStats {
        &self.stats
    }

    /// The sources currently assigned to `host` for `blob` (what the last command said, or
    /// will say once drained).
    pub fn sources(&self, blob: BlobId, host: HostId) -> Option<&[HostId]> {
        self.blobs
            .get(&blob)?
            .downloads
            .get(&host)
            .map(|d| d.sources.as_slice())
    }

    /// Downloads `host` is serving right now, over all blobs.
    pub fn uploads(&self, host: HostId) -> usize {
        self.hosts.get(&host).map_or(0, |h| h.serving.len())
    }

    pub fn is_up(&self, host: HostId) -> bool {
        self.hosts.get(&host).is_some_and(|h| h.alive)
    }

    /// Sources reported corrupt, per blob, in order.
    pub fn corrupt_sources(&self) -> impl Iterator<Item = (BlobId, HostId)> + '_ {
        self.blobs
            .iter()
            .flat_map(|(b, blob)| blob.corrupt.iter().map(move |h| (*b, *h)))
    }

    // ---- events ----

    fn holds(&mut self, id: HostId, blob: BlobId, chunks: u32, complete: bool) {
        if !self.is_up(id) {
            return;
        }
        let chunk_count = self.blobs.entry(blob).or_default().chunk_count;
        let chunks = if complete && chunk_count > 0 {
            chunk_count
        } else {
            chunks
        };
        let before = self.hosts[&id].holdings.get(&blob).copied();
        if chunks == 0 && !complete {
            // A running download is a source from its order on (see `flush`): nothing
            // verified yet is not an eviction.
            let running = self
                .download_mut(blob, id)
                .is_some_and(|d| d.sent.is_some());
            if !running {
                self.evict(id, blob);
            }
            return;
        }
        let complete = complete || before.is_some_and(|h| h.complete);
        if chunks > before.map_or(0, |h| h.chunks) && !complete {
            self.progressed(blob, id);
        }
        let chunks = chunks.max(before.map_or(0, |h| h.chunks));
        self.set_holding(id, blob, Some((chunks, complete)));
        let newly_complete = complete && !before.is_some_and(|h| h.complete);
        if newly_complete {
            // Its downloaders now have an upstream: they may stop being hungry.
            let served: Vec<HostId> = (self.hosts[&id].serving.keys())
                .filter(|(b, _)| *b == blob)
                .map(|(_, t)| *t)
                .collect();
            for target in served {
                self.sync_hungry(blob, target);
            }
        }
        if complete && self.download_mut(blob, id).is_some() {
            self.finish_download(blob, id);
        }
        if before.is_none() || newly_complete {
            self.offer(id, blob);
        }
    }

    /// `id` no longer holds any of `blob`: its downloaders need other sources.
    pub(super) fn evict(&mut self, id: HostId, blob: BlobId) {
        self.set_holding(id, blob, None);
        let served: Vec<HostId> = (self.hosts[&id].serving.keys())
            .filter(|(b, _)| *b == blob)
            .map(|(_, t)| *t)
            .collect();
        for target in served {
            self.drop_source(blob, target, id);
        }
    }

    fn want(&mut self, blob: BlobId, id: HostId, priority: Priority) {
        let host = self.hosts.get_or_insert_with(id, Host::unknown);
        if host.holdings.get(&blob).is_some_and(|h| h.complete) {
            return;
        }
        host.wants.insert(blob);
        let b = self.blobs.entry(blob).or_default();
        if let Some(d) = b.downloads.get_mut(&id) {
            d.priority = priority;
        } else {
            self.next_seq += 1;
            let member = b.members.insert(host.zone, id);
            b.downloads.insert(
                id,
                Download {
                    priority,
                    seq: self.next_seq,
                    sources: Vec::new(),
                    sent: None,
                    sent_stripes: Vec::new(),
                    excluded: BTreeSet::new(),
                    stalled: BTreeMap::new(),
                    attempts: 0,
                    retry_at: None,
                    hungry: None,
                    progress_at: self.now,
                    stuck: false,
                    mark: (self.now, 0),
                    checking: false,
                    restripe_pending: false,
                    member,
                },
            );
        }
        self.sync_hungry(blob, id);
        self.top_up(blob, id);
        self.top_up_hungry(blob, id);
    }

    fn unwant(&mut self, blob: BlobId, id: HostId) {
        if let Some(sent) = self.forget_download(blob, id)
            && sent
            && self.is_up(id)
        {
            self.commands.push_back(Command::Cancel { host: id, blob });
            self.stats.cancels += 1;
        }
        self.drop_empty_holding(blob, id);
    }

    fn failed(&mut self, now: Time, id: HostId, blob: BlobId) {
        self.stats.failures += 1;
        let backoff = self.config.retry_backoff;
        let max_attempts = self.config.max_attempts;
        let Some(d) = self.download_mut(blob, id) else {
            return;
        };
        d.attempts += 1;
        let attempts = d.attempts;
        if attempts >= max_attempts {
            self.forget_download(blob, id);
            self.drop_empty_holding(blob, id);
            self.stats.gave_up += 1;
            self.notices.push_back(Notice::GaveUp {
                host: id,
                blob,
                attempts,
            });
            return;
        }
        let d = self.download_mut(blob, id).expect("checked above");
        let at = now + backoff.saturating_mul(1 << (attempts - 1).min(16));
        d.retry_at = Some(at);
        d.sent = None;
        let sources = std::mem::take(&mut d.sources);
        self.retries.insert((at, blob, id));
        self.sync_hungry(blob, id);
        for s in sources {
            self.release(blob, id, s);
            self.offer_everything(s, blob);
        }
        self.drop_empty_holding(blob, id);
    }

    fn stalled(&mut self, id: HostId, blob: BlobId, source: HostId) {
        self.stats.stalls += 1;
        let until = self.now + STALL_EXCLUSION;
        let Some(d) = self.download_mut(blob, id) else {
            return;
        };
        d.stalled.insert(source, until);
        // Look again when the exclusion ends, in case nothing else wakes this download.
        self.retries.insert((until, blob, id));
        self.drop_source(blob, id, source);
    }

    fn manifest_replaced(&mut self, blob: BlobId) {
        let Some(b) = self.blobs.get_mut(&blob) else {
            return;
        };
        b.corrupt_reports.clear();
        let cleared = std::mem::take(&mut b.corrupt);
        for source in cleared {
            self.sync_holder(source, blob);
        }
    }

    fn corrupt(&mut self, reporter: HostId, blob: BlobId, source: HostId) {
        self.stats.corrupt_reports += 1;
        // The reporter never uses it again for this blob, whatever the others say. Its
        // report counts towards the quorum only if it was downloading the blob from that
        // source: anyone else's report is noise.
        let Some(d) = self.download_mut(blob, reporter) else {
            return;
        };
        d.excluded.insert(source);
        let was_source = d.sources.contains(&source);
        self.drop_source(blob, reporter, source);
        if !was_source {
            return;
        }
        let b = self.blobs.entry(blob).or_default();
        let reporters = b.corrupt_reports.entry(source).or_default();
        reporters.insert(reporter);
        if reporters.len() < CORRUPT_QUORUM || !b.corrupt.insert(source) {
            return;
        }
        let mut targets: Vec<HostId> = (b.downloads.iter())
            .filter(|(_, d)| d.sources.contains(&source))
            .map(|(t, _)| *t)
            .collect();
        targets.sort_unstable();
        self.sync_holder(source, blob);
        for target in targets {
            self.drop_source(blob, target, source);
        }
    }
}
