//! Seeding: bringing a blob that no agent holds in from its origin (an OCI registry or an
//! HTTP URL), once for the whole cluster.
//!
//! The chunk digests of such a blob are unknown until someone has read all of it, so one
//! target, the seeder, gets an order without a manifest: it fetches the blob from the
//! origin, checks it against its digest, and registers the manifest it built. Until then the
//! other targets wait here, not in the assigner; once the manifest is known they become
//! ordinary wants and get their chunks from the seeder and from each other. Every byte
//! therefore leaves the origin once (single flight), whatever the number of targets or of
//! jobs that ask for the blob at the same time.
//!
//! A large blob of known size that several targets wait for is seeded in ranges: up to
//! `max_seeders_per_blob` agents each fetch one chunk-aligned range and report its chunk
//! digests (`RangeSeeded`), keeping the bytes; the coordinator assembles the manifest from
//! the ranges and the blob then spreads as usual, every seeder holding its range. The whole
//! blob's digest, which no single seeder could check, is checked by every target at the
//! end, as always.
//!
//! A seeder that fails, or is lost, is replaced by another waiting target, at most
//! [`MAX_SEEDERS`] in all; an answer that another seeder would get too (the origin does not
//! have the blob, or its content does not match the digest) fails every waiting target at
//! once. The state is soft: jobs persist their origins, and a restarted coordinator seeds
//! again what they still need.

use std::collections::{BTreeMap, BTreeSet};
use std::time::SystemTime;

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, AgentState, FailureReason, TargetState};

use super::{Order, State};

/// How many different agents may try to seed one blob before its targets fail.
pub const MAX_SEEDERS: usize = 3;

/// One range of a blob to seed; the whole blob when not striped.
#[derive(Debug)]
pub struct SeedRange {
    /// Byte range; `end == 0`: the whole blob (an order without a range).
    pub start: u64,
    pub end: u64,
    /// The current seeder and its order id.
    pub seeder: Option<(HostId, u64)>,
    /// Agents that tried this range and failed.
    pub tried: BTreeSet<HostId>,
    /// The range's chunk digests, once seeded.
    pub digests: Option<Vec<Digest>>,
}

#[derive(Debug)]
pub struct Seeding {
    pub origin: pb::Origin,
    /// Targets waiting for the manifest: (job, host).
    pub waiting: BTreeSet<(String, HostId)>,
    /// Planned at the first election; one whole range unless striped.
    pub ranges: Vec<SeedRange>,
    pub last_error: String,
}

impl Seeding {
    fn size(&self) -> u64 {
        match &self.origin.origin {
            Some(pb::origin::Origin::Http(h)) => h.size,
            Some(pb::origin::Origin::Oci(o)) => o.size,
            _ => 0,
        }
    }

    fn range_of(&self, host: HostId, order_id: Option<u64>) -> Option<usize> {
        (self.ranges.iter()).position(|r| {
            r.digests.is_none()
                && r.seeder
                    .is_some_and(|(h, id)| h == host && order_id.is_none_or(|o| o == id))
        })
    }
}

/// Chunk size of manifests assembled from ranges.
const STRIPE_CHUNK: u32 = shoal_proto::CHUNK_SIZE;

/// Splits `size` bytes into `k` chunk-aligned ranges (the first ones a chunk longer).
fn split(size: u64, k: usize) -> Vec<(u64, u64)> {
    let chunk = u64::from(STRIPE_CHUNK);
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

/// Checks an origin given by a user; returns a message for INVALID_ARGUMENT.
pub fn check_origin(blob: &Digest, origin: &pb::Origin) -> Result<(), String> {
    use pb::origin::Origin as O;
    match &origin.origin {
        None => Err(format!("origins[{blob}]: no origin kind is set")),
        Some(O::Http(h)) => shoal_origin::parse_http_url(&h.url)
            .map(|_| ())
            .map_err(|e| format!("origins[{blob}]: {e}")),
        Some(O::Oci(o)) => {
            if o.registry.is_empty() || o.registry.contains('/') {
                return Err(format!(
                    "origins[{blob}]: registry {:?} is not a host[:port]",
                    o.registry
                ));
            }
            shoal_origin::validate_repository(&o.repository)
                .map_err(|e| format!("origins[{blob}]: {e}"))
        }
    }
}

/// The failures another seeder would meet as well.
fn definitive(reason: FailureReason) -> bool {
    matches!(
        reason,
        FailureReason::Invalid | FailureReason::DigestMismatch
    )
}

impl State {
    /// Makes (job, host) wait for `blob` to be seeded from `origin`.
    pub(super) fn wait_for_seed(
        &mut self,
        job_id: &str,
        host: HostId,
        blob: Digest,
        origin: &pb::Origin,
    ) {
        let seeding = self.seeding.entry(blob).or_insert_with(|| Seeding {
            origin: origin.clone(),
            waiting: BTreeSet::new(),
            ranges: Vec::new(),
            last_error: String::new(),
        });
        seeding.waiting.insert((job_id.to_string(), host));
    }

    /// Whether (job, host) still needs `blob`: the job runs and the target is not finished.
    fn target_open(&self, job_id: &str, host: HostId, blob: Digest) -> bool {
        let agent = self.agents.name(host);
        (self.jobs.get(job_id))
            .filter(|j| !j.is_terminal())
            .and_then(|j| j.targets.get(&(agent, blob)))
            .is_some_and(|t| !t.is_terminal())
    }

    /// Gives every range of every blob being seeded a live seeder, drops targets that
    /// ended, and fails the targets of blobs that cannot be seeded. Called after each
    /// request and tick.
    pub(super) fn elect_seeders(&mut self) {
        let blobs: Vec<Digest> = self.seeding.keys().copied().collect();
        for blob in blobs {
            self.elect_for(blob);
        }
    }

    fn elect_for(&mut self, blob: Digest) {
        let Some(seeding) = self.seeding.get(&blob) else {
            return;
        };
        let waiting: BTreeSet<(String, HostId)> = (seeding.waiting.iter())
            .filter(|(job, host)| self.target_open(job, *host, blob))
            .cloned()
            .collect();
        if waiting.is_empty() {
            // Nobody needs it any more (jobs cancelled or timed out).
            if let Some(seeding) = self.seeding.remove(&blob) {
                self.stop_seeders(blob, &seeding, "no target needs the blob any more");
            }
            return;
        }
        // Seeders lost (gone, or their order dropped with them) count as failed attempts.
        let mut lost = Vec::new();
        for (i, r) in seeding.ranges.iter().enumerate() {
            if let (None, Some((host, id))) = (&r.digests, r.seeder) {
                let ordered = self.orders.get(&(host, blob)).map(|o| o.id) == Some(id);
                let live = (self.agents.get(host)).is_some_and(|a| a.state != AgentState::Gone);
                if !(ordered && live) {
                    lost.push((i, host));
                }
            }
        }
        let max_seeders = self.config.max_seeders_per_blob;
        let stripe_min = self.config.stripe_seed_min_bytes;
        let ready: Vec<HostId> = (waiting.iter())
            .map(|(_, h)| *h)
            .filter(|h| {
                self.agents
                    .get(*h)
                    .is_some_and(|a| a.state == AgentState::Ready)
            })
            .collect();
        let Some(seeding) = self.seeding.get_mut(&blob) else {
            return;
        };
        seeding.waiting = waiting;
        for (i, host) in lost {
            let r = &mut seeding.ranges[i];
            r.seeder = None;
            r.tried.insert(host);
            seeding.last_error = format!("seeder {} was lost", self.agents.name(host));
        }
        if seeding.ranges.is_empty() {
            let size = seeding.size();
            let hosts: BTreeSet<HostId> = ready.iter().copied().collect();
            let k = if size >= stripe_min && stripe_min > 0 {
                max_seeders.min(hosts.len())
            } else {
                1
            };
            let ranges = if k > 1 { split(size, k) } else { vec![(0, 0)] };
            seeding.ranges = (ranges.into_iter())
                .map(|(start, end)| SeedRange {
                    start,
                    end,
                    seeder: None,
                    tried: BTreeSet::new(),
                    digests: None,
                })
                .collect();
        }
        let mut orders = Vec::new();
        let mut failure = None;
        let mut busy: BTreeSet<HostId> = (seeding.ranges.iter())
            .filter(|r| r.digests.is_none())
            .filter_map(|r| r.seeder.map(|(h, _)| h))
            .collect();
        for (i, r) in seeding.ranges.iter().enumerate() {
            if r.digests.is_some() || r.seeder.is_some() {
                continue;
            }
            if r.tried.len() >= MAX_SEEDERS {
                failure = Some(format!(
                    "fetching from the origin failed on {} agents; last: {}",
                    r.tried.len(),
                    seeding.last_error
                ));
                break;
            }
            let candidate = (ready.iter())
                .find(|h| !r.tried.contains(h) && !busy.contains(h))
                .copied();
            let all_tried = (seeding.waiting.iter()).all(|(_, h)| r.tried.contains(h));
            match candidate {
                Some(host) => {
                    busy.insert(host);
                    orders.push((i, host));
                }
                None if all_tried => {
                    failure = Some(format!(
                        "fetching from the origin failed on every agent that needs it; last: {}",
                        seeding.last_error
                    ));
                    break;
                }
                // An untried agent is busy seeding another range or disconnected: wait.
                None => {}
            }
        }
        if let Some(message) = failure {
            self.fail_seeding(blob, FailureReason::OriginError, &message);
            return;
        }
        for (i, host) in orders {
            self.order_seed(host, blob, i);
        }
    }

    fn order_seed(&mut self, host: HostId, blob: Digest, range: usize) {
        let id = self.next_order;
        self.next_order += 1;
        let Some(seeding) = self.seeding.get_mut(&blob) else {
            return;
        };
        seeding.ranges[range].seeder = Some((host, id));
        self.orders.insert(
            (host, blob),
            Order {
                id,
                sources: BTreeMap::new(),
            },
        );
        tracing::info!(agent = %self.agents.name(host), %blob, range, "seeding from the origin");
        self.send_seed_order(host, blob);
        self.set_seed_targets(blob, |t| {
            if t.state == TargetState::Pending {
                t.state = TargetState::Running;
            }
        });
    }

    /// Sends (again) the seed order of `blob` to its seeder `host`. The same order id each
    /// time: an agent that kept running it across a reconnect just goes on.
    fn send_seed_order(&mut self, host: HostId, blob: Digest) {
        let Some(seeding) = self.seeding.get(&blob) else {
            return;
        };
        let Some(range) = seeding.range_of(host, None).map(|i| &seeding.ranges[i]) else {
            return;
        };
        let Some((seeder, id)) = range.seeder else {
            return;
        };
        let job_id = (seeding.waiting.iter())
            .find(|(_, h)| *h == seeder)
            .map(|(j, _)| j.clone())
            .unwrap_or_default();
        let priority =
            (self.jobs.get(&job_id)).map_or(pb::Priority::Normal as i32, |j| j.record.priority);
        let origin = Some(seeding.origin.clone());
        let kind = if range.end > 0 {
            pb::fetch_order::Kind::OriginRange(pb::OriginRange {
                origin,
                start: range.start,
                end: range.end,
                chunk_size: STRIPE_CHUNK,
            })
        } else {
            pb::fetch_order::Kind::Origin(pb::FromOrigin { origin })
        };
        let order = pb::FetchOrder {
            order_id: id,
            blob_digest: blob.as_bytes().to_vec(),
            priority,
            job_id,
            kind: Some(kind),
        };
        self.agents
            .send(host, pb::coordinator_message::Msg::FetchOrder(order));
    }

    /// Resends the seed orders of `host` (its session reopened).
    pub(super) fn redeliver_seeds(&mut self, host: HostId) {
        let mine: Vec<Digest> = (self.seeding.iter())
            .filter(|(_, s)| s.range_of(host, None).is_some())
            .map(|(b, _)| *b)
            .collect();
        for blob in mine {
            self.send_seed_order(host, blob);
        }
    }

    /// Whether `host` is seeding `blob` (its order carries no manifest).
    pub(super) fn is_seeding(&self, host: HostId, blob: &Digest) -> bool {
        (self.seeding.get(blob)).is_some_and(|s| s.range_of(host, None).is_some())
    }

    /// Forgets the order for (host, blob) and tells the agent to stop it.
    pub(super) fn cancel_order(&mut self, host: HostId, blob: Digest, reason: &str) {
        if let Some(order) = self.orders.remove(&(host, blob)) {
            self.agents.send(
                host,
                pb::coordinator_message::Msg::Cancel(pb::Cancel {
                    order_id: order.id,
                    blob_digest: blob.as_bytes().to_vec(),
                    reason: reason.into(),
                }),
            );
        }
    }

    /// The seeder's order failed. Returns false if `order_id` is not a seed order.
    pub(super) fn seed_failed(
        &mut self,
        host: HostId,
        blob: Digest,
        order_id: u64,
        reason: FailureReason,
        message: &str,
    ) -> bool {
        let Some(seeding) = self.seeding.get_mut(&blob) else {
            return false;
        };
        let Some(i) = seeding.range_of(host, Some(order_id)) else {
            return false;
        };
        tracing::warn!(agent = %self.agents.name(host), %blob, message, "seeding failed");
        self.orders.remove(&(host, blob));
        let r = &mut seeding.ranges[i];
        r.seeder = None;
        r.tried.insert(host);
        seeding.last_error = format!("{}: {message}", self.agents.name(host));
        if definitive(reason) {
            let message = format!("the origin cannot provide {blob}: {message}");
            self.fail_seeding(blob, reason, &message);
        } else {
            self.elect_for(blob);
        }
        true
    }

    /// A seeder fetched its range: keep its chunk digests; with every range in, the
    /// manifest is complete and the blob spreads like any other.
    pub(super) fn range_seeded(&mut self, host: HostId, msg: pb::RangeSeeded) {
        let Ok(blob) = Digest::from_slice(&msg.blob_digest) else {
            return;
        };
        // Seeders whose own target is still open: they will get the blob's order, and move
        // their range into their store with it. Others would hold their range nowhere.
        let open: BTreeSet<HostId> = (self.seeding.get(&blob).into_iter())
            .flat_map(|s| s.waiting.iter())
            .filter(|(job, h)| self.target_open(job, *h, blob))
            .map(|(_, h)| *h)
            .collect();
        let Some(seeding) = self.seeding.get_mut(&blob) else {
            return;
        };
        let Some(i) = seeding.range_of(host, Some(msg.order_id)) else {
            return; // Stale: not the current seeder of any range.
        };
        let r = &mut seeding.ranges[i];
        let chunk = u64::from(STRIPE_CHUNK);
        let expected = (r.end - r.start).div_ceil(chunk) as usize;
        let digests: Vec<Digest> = (msg.chunk_digests.iter())
            .filter_map(|d| Digest::from_slice(d).ok())
            .collect();
        if u64::from(msg.first_chunk) * chunk != r.start || digests.len() != expected {
            tracing::warn!(agent = %self.agents.name(host), %blob, "a seeder reported a range that does not fit");
            r.seeder = None;
            r.tried.insert(host);
            self.orders.remove(&(host, blob));
            self.elect_for(blob);
            return;
        }
        r.digests = Some(digests);
        self.orders.remove(&(host, blob));
        if seeding.ranges.iter().any(|r| r.digests.is_none()) {
            return;
        }
        let mut orphaned = false;
        for r in &mut seeding.ranges {
            if r.seeder.is_some_and(|(h, _)| !open.contains(&h)) {
                r.seeder = None;
                r.digests = None;
                orphaned = true;
            }
        }
        if orphaned {
            self.elect_for(blob); // Seed those ranges again, on agents that will keep them.
            return;
        }
        let size = seeding.size();
        let chunks: Vec<Digest> = (seeding.ranges.iter())
            .flat_map(|r| r.digests.clone().unwrap_or_default())
            .collect();
        // Each seeder holds its range (it moves it into its store on its order): the
        // assigner counts it as a partial source from now on.
        let held: Vec<(HostId, u32)> = (seeding.ranges.iter())
            .filter_map(|r| Some((r.seeder?.0, r.digests.as_ref()?.len() as u32)))
            .collect();
        let seeders: Vec<String> = held.iter().map(|(h, _)| self.agents.name(*h)).collect();
        match shoal_proto::Manifest::new(blob, size, STRIPE_CHUNK, chunks) {
            Ok(manifest) => {
                tracing::info!(%blob, ranges = seeders.len(), "manifest assembled from seeded ranges");
                self.add_to_catalog(manifest, seeders.join(","), false);
                for (host, chunks) in held {
                    self.holds(host, blob, chunks, false);
                }
                self.seeded(blob);
            }
            Err(e) => {
                let message = format!("the seeded ranges do not make a manifest: {e}");
                self.fail_seeding(blob, FailureReason::Internal, &message);
            }
        }
    }

    /// Cancels the seed orders of `seeding` still running.
    fn stop_seeders(&mut self, blob: Digest, seeding: &Seeding, reason: &str) {
        for r in &seeding.ranges {
            if let (None, Some((host, id))) = (&r.digests, r.seeder) {
                if self.orders.get(&(host, blob)).map(|o| o.id) == Some(id) {
                    self.cancel_order(host, blob, reason);
                }
            }
        }
    }

    fn fail_seeding(&mut self, blob: Digest, reason: FailureReason, message: &str) {
        let Some(seeding) = self.seeding.remove(&blob) else {
            return;
        };
        tracing::warn!(%blob, message, "giving up seeding");
        self.stop_seeders(blob, &seeding, "seeding failed");
        let mut changed = BTreeSet::new();
        for (job_id, host) in &seeding.waiting {
            let agent = self.agents.name(*host);
            if let Some(job) = self.jobs.get_mut(job_id) {
                job.update(&(agent, blob), |t| {
                    if !t.is_terminal() {
                        t.state = TargetState::Failed;
                        t.reason = reason;
                        t.message = message.to_string();
                        t.rate = 0;
                    }
                });
                changed.insert(job_id.clone());
            }
        }
        let now = SystemTime::now();
        for job_id in changed {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.refresh_state(now);
            }
            self.persist(&job_id);
        }
    }

    /// A manifest for `blob` is now known (its seeder, or anyone, registered it): the
    /// waiting targets become ordinary wants.
    pub(super) fn seeded(&mut self, blob: Digest) {
        let Some(seeding) = self.seeding.remove(&blob) else {
            return;
        };
        // Seeders still fetching (another agent registered the blob first) stop.
        self.stop_seeders(blob, &seeding, "the blob is known now");
        let size = self.catalog.manifest(&blob).map_or(0, |m| m.size());
        self.set_seed_targets(blob, |t| t.bytes_total = size);
        for (job_id, host) in seeding.waiting {
            if !self.target_open(&job_id, host, blob) {
                continue;
            }
            self.want(&job_id, host, blob);
            if self.catalog.holds_complete(&blob, host) {
                self.blob_done(host, blob);
            }
        }
    }

    /// Applies `f` to every target of `blob` in unfinished jobs.
    fn set_seed_targets(&mut self, blob: Digest, f: impl Fn(&mut crate::jobs::Target)) {
        let now = SystemTime::now();
        for job in self.jobs.values_mut().filter(|j| !j.is_terminal()) {
            let keys: Vec<_> = (job.targets.keys())
                .filter(|(_, b)| *b == blob)
                .cloned()
                .collect();
            for key in keys {
                job.update(&key, &f);
            }
            job.refresh_state(now);
        }
    }

    /// The origin a job recorded for `blob`, if any.
    pub(super) fn job_origin(&self, job_id: &str, blob: &Digest) -> Option<pb::Origin> {
        (self.jobs.get(job_id))
            .and_then(|j| j.record.origins.get(&blob.to_string()))
            .cloned()
    }
}
