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

#[derive(Debug)]
pub struct Seeding {
    pub origin: pb::Origin,
    /// Targets waiting for the manifest: (job, host).
    pub waiting: BTreeSet<(String, HostId)>,
    /// The current seeder and its order id.
    pub seeder: Option<(HostId, u64)>,
    /// Agents that tried and failed.
    pub tried: BTreeSet<HostId>,
    pub last_error: String,
}

/// Checks an origin given by a user; returns a message for INVALID_ARGUMENT.
pub fn check_origin(blob: &Digest, origin: &pb::Origin) -> Result<(), String> {
    use pb::origin::Origin as O;
    match &origin.origin {
        None => Err(format!("origins[{blob}]: no origin kind is set")),
        Some(O::Peer(_)) => Err(format!(
            "origins[{blob}]: peer origins are chosen by the coordinator; give an http or oci origin"
        )),
        Some(O::Http(h)) => {
            let rest = (h.url.strip_prefix("https://"))
                .or_else(|| h.url.strip_prefix("http://"))
                .ok_or_else(|| {
                    format!(
                        "origins[{blob}]: url {:?} is not an absolute http(s) URL",
                        h.url
                    )
                })?;
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("origins[{blob}]: url {:?} has no host", h.url));
            }
            Ok(())
        }
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
            seeder: None,
            tried: BTreeSet::new(),
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

    /// Gives every blob being seeded a live seeder, drops targets that ended, and fails the
    /// targets of blobs that cannot be seeded. Called after each request and tick.
    pub(super) fn elect_seeders(&mut self) {
        let blobs: Vec<Digest> = self.seeding.keys().copied().collect();
        for blob in blobs {
            let Some(seeding) = self.seeding.get(&blob) else {
                continue;
            };
            let waiting: BTreeSet<(String, HostId)> = (seeding.waiting.iter())
                .filter(|(job, host)| self.target_open(job, *host, blob))
                .cloned()
                .collect();
            let seeder = seeding.seeder;
            let live =
                |s: &Self, h: HostId| s.agents.get(h).is_some_and(|a| a.state != AgentState::Gone);
            let mut lost = None;
            if let Some((host, order_id)) = seeder {
                let still_ordered = self.orders.get(&(host, blob)).map(|o| o.id) == Some(order_id);
                if live(self, host) && still_ordered {
                    if let Some(s) = self.seeding.get_mut(&blob) {
                        s.waiting = waiting;
                    }
                    continue;
                }
                lost = Some(host);
            }
            if waiting.is_empty() {
                // Nobody needs it any more (jobs cancelled or timed out).
                if let Some((host, _)) = seeder {
                    self.cancel_order(host, blob, "no target needs the blob any more");
                }
                self.seeding.remove(&blob);
                continue;
            }
            let Some(seeding) = self.seeding.get_mut(&blob) else {
                continue;
            };
            seeding.waiting = waiting;
            seeding.seeder = None;
            if let Some(host) = lost {
                seeding.tried.insert(host);
                seeding.last_error = format!("seeder {} was lost", self.agents.name(host));
            }
            if seeding.tried.len() >= MAX_SEEDERS {
                let message = format!(
                    "fetching from the origin failed on {} agents; last: {}",
                    seeding.tried.len(),
                    seeding.last_error
                );
                self.fail_seeding(blob, FailureReason::OriginError, &message);
                continue;
            }
            let candidate = (seeding.waiting.iter())
                .map(|(_, h)| *h)
                .filter(|h| !seeding.tried.contains(h))
                .find(|h| {
                    self.agents
                        .get(*h)
                        .is_some_and(|a| a.state == AgentState::Ready)
                });
            let all_tried = (seeding.waiting.iter()).all(|(_, h)| seeding.tried.contains(h));
            match candidate {
                Some(host) => self.order_seed(host, blob),
                None if all_tried => {
                    let message = format!(
                        "fetching from the origin failed on every agent that needs it; last: {}",
                        seeding.last_error
                    );
                    self.fail_seeding(blob, FailureReason::OriginError, &message);
                }
                // An untried agent is disconnected: wait for it to come back (or for the
                // lease and deadline rules to end its targets).
                None => {}
            }
        }
    }

    fn order_seed(&mut self, host: HostId, blob: Digest) {
        let id = self.next_order;
        self.next_order += 1;
        let Some(seeding) = self.seeding.get_mut(&blob) else {
            return;
        };
        seeding.seeder = Some((host, id));
        self.orders.insert(
            (host, blob),
            Order {
                id,
                sources: BTreeMap::new(),
            },
        );
        tracing::info!(agent = %self.agents.name(host), %blob, "seeding from the origin");
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
        let Some((seeder, id)) = seeding.seeder.filter(|(h, _)| *h == host) else {
            return;
        };
        let job_id = (seeding.waiting.iter())
            .find(|(_, h)| *h == seeder)
            .map(|(j, _)| j.clone())
            .unwrap_or_default();
        let priority =
            (self.jobs.get(&job_id)).map_or(pb::Priority::Normal as i32, |j| j.record.priority);
        let order = pb::FetchOrder {
            order_id: id,
            blob_digest: blob.as_bytes().to_vec(),
            manifest: None,
            sources: Vec::new(),
            origin: Some(seeding.origin.clone()),
            priority,
            deadline_ms: 0,
            job_id,
            pin: false,
        };
        self.agents
            .send(host, pb::coordinator_message::Msg::FetchOrder(order));
    }

    /// Resends the seed orders of `host` (its session reopened).
    pub(super) fn redeliver_seeds(&mut self, host: HostId) {
        let mine: Vec<Digest> = (self.seeding.iter())
            .filter(|(_, s)| s.seeder.is_some_and(|(h, _)| h == host))
            .map(|(b, _)| *b)
            .collect();
        for blob in mine {
            self.send_seed_order(host, blob);
        }
    }

    /// Whether `host` is seeding `blob` (its order carries no manifest).
    pub(super) fn is_seeding(&self, host: HostId, blob: &Digest) -> bool {
        (self.seeding.get(blob)).is_some_and(|s| s.seeder.is_some_and(|(h, _)| h == host))
    }

    fn cancel_order(&mut self, host: HostId, blob: Digest, reason: &str) {
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
        if seeding.seeder != Some((host, order_id)) {
            return false;
        }
        tracing::warn!(agent = %self.agents.name(host), %blob, message, "seeding failed");
        self.orders.remove(&(host, blob));
        seeding.seeder = None;
        seeding.tried.insert(host);
        seeding.last_error = format!("{}: {message}", self.agents.name(host));
        if definitive(reason) {
            let message = format!("the origin cannot provide {blob}: {message}");
            self.fail_seeding(blob, reason, &message);
        } else {
            self.elect_seeders();
        }
        true
    }

    fn fail_seeding(&mut self, blob: Digest, reason: FailureReason, message: &str) {
        let Some(seeding) = self.seeding.remove(&blob) else {
            return;
        };
        tracing::warn!(%blob, message, "giving up seeding");
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
        if let Some((host, _)) = seeding.seeder {
            self.orders.remove(&(host, blob));
        }
        let size = self.catalog.manifest(&blob).map_or(0, |m| m.size());
        self.set_seed_targets(blob, |t| t.bytes_total = size);
        for (job_id, host) in seeding.waiting {
            if !self.target_open(&job_id, host, blob) {
                continue;
            }
            if self.catalog.holds_complete(&blob, host) {
                self.want(&job_id, host, blob);
                self.blob_done(host, blob);
            } else {
                self.want(&job_id, host, blob);
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
