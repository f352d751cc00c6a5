//! The planner's side of the glue: which machine a want goes to, and what their commands
//! and notices become (orders and source updates to agents, target transitions).
//!
//! A want goes to the [`Assigner`](shoal_planner::Assigner) when some agent holds the blob
//! whole (or when no origin is known), else to the [`Seeder`](shoal_planner::Seeder), which
//! elects agents to fetch it from its origin; once its manifest is known the waiting wants
//! move to the assigner.

use std::collections::BTreeSet;

use shoal_planner::{
    BlobId, Command, Event, GiveUp, HostId, LastError, Notice, SeedCommand, SeedEvent, SeedFault,
    SeedNotice,
};
use shoal_proto::pb::v1::{self as pb, FailureReason};
use shoal_proto::{Digest, Manifest};

use super::orders::OrderKind;
use super::{Now, State, catalog};

/// The size an origin announced, 0 if unknown. A blob named by its origin counts as of
/// unknown size: it is seeded whole (its chained table needs one reader in order), never in
/// ranges.
fn origin_size(origin: &pb::Origin, blob: &Digest) -> u64 {
    match &origin.origin {
        Some(pb::origin::Origin::Http(h)) if h.name_of(blob).is_some() => 0,
        Some(pb::origin::Origin::Http(h)) => h.size,
        Some(pb::origin::Origin::Oci(o)) => o.size,
        None => 0,
    }
}

impl State {
    /// Builds and wants up to [`State::wants_per_turn`] of the targets of the jobs queued
    /// in `wanting`, in order (see [`super::job::Rest`]): a target whose agent holds the
    /// blob is built done, and one built already (a cancel, a deadline or a lost agent
    /// builds a job's targets at once) is skipped if it has ended.
    pub(super) fn want_some(&mut self, now: Now) {
        for _ in 0..self.wants_per_turn {
            let Some(job) = self.wanting.front().cloned() else {
                return;
            };
            let next = (self.jobs).want_next(&job, &self.catalog.holding(), now.wall);
            if !self.jobs.wants_more(&job) {
                self.wanting.pop_front();
            }
            let Some((host, blob, open)) = next else {
                continue;
            };
            if !open {
                continue;
            }
            self.want(&job, host, blob, now);
            if self.catalog.holds_complete(&blob, host) {
                self.blob_done(host, blob, now);
            }
        }
    }

    /// Tests only: a Distribute's targets are wanted `n` a turn.
    #[cfg(test)]
    pub(super) fn set_wants_per_turn(&mut self, n: usize) {
        self.wants_per_turn = n;
    }

    /// `job` wants `blob` on `host`: the first job to want it there tells the planner.
    pub(super) fn want(&mut self, job: &str, host: HostId, blob: Digest, now: Now) {
        if !self.jobs.want(job, host, blob) {
            // Another job wants it there already; a higher priority still counts.
            if !self.seeder.is_waiting(blob.into(), host) {
                self.want_from_peers(host, blob, now);
            }
            return;
        }
        let origin = (self.catalog.complete_holders(&blob) == 0)
            .then(|| self.jobs.origin(job, &blob))
            .flatten();
        match origin {
            Some(origin) => {
                let size = origin_size(&origin, &blob);
                self.origins.entry(blob).or_insert(origin);
                let event = SeedEvent::Wait {
                    blob: blob.into(),
                    host,
                    size,
                };
                self.seeder.handle(now.mono, event);
                // A seed already streaming: this target joins it at once.
                self.stream_to_waiting(blob, false, now);
            }
            None => self.want_from_peers(host, blob, now),
        }
    }

    /// Tells the assigner `host` wants `blob`, at the priority of its jobs.
    fn want_from_peers(&mut self, host: HostId, blob: Digest, now: Now) {
        let priority = self.jobs.priority(host, blob);
        let event = Event::Want {
            blob: blob.into(),
            host,
            priority,
        };
        self.assigner.handle(now.mono, event);
    }

    /// No job wants `blob` on `host` any more: whichever machine plans it stops.
    pub(super) fn unwanted(&mut self, host: HostId, blob: Digest, now: Now) {
        self.orders.forget_failure(host, blob);
        let id = BlobId::from(blob);
        if self.seeder.is_waiting(id, host) {
            self.seeder
                .handle(now.mono, SeedEvent::Unwait { blob: id, host });
            self.leave_stream(host, blob, "no longer wanted", now);
        } else {
            self.assigner
                .handle(now.mono, Event::Unwant { blob: id, host });
        }
    }

    /// A job ended these targets (cancel, deadline): the planner stops what no other job
    /// wants.
    pub(super) fn unwant_ended(&mut self, job: &str, ended: Vec<(String, Digest)>, now: Now) {
        for (agent, blob) in ended {
            if let Some(host) = self.agents.host_of(&agent) {
                if self.jobs.unwant(job, host, blob) {
                    self.unwanted(host, blob, now);
                }
            }
        }
    }

    /// (host, blob) cannot complete: its targets fail and the planner stops.
    pub(super) fn fail_targets(
        &mut self,
        host: HostId,
        blob: Digest,
        reason: FailureReason,
        message: &str,
        now: Now,
    ) {
        let agent = self.agents.name(host);
        if self
            .jobs
            .fail(&agent, host, blob, reason, message, now.wall)
        {
            self.unwanted(host, blob, now);
        }
    }

    /// `host` holds the whole blob: its targets are done, the planner's download too.
    pub(super) fn blob_done(&mut self, host: HostId, blob: Digest, now: Now) {
        self.holds(host, blob, u32::MAX, true, now);
        self.orders.remove(host, blob);
        self.orders.forget_failure(host, blob);
        let agent = self.agents.name(host);
        if self.jobs.finish(&agent, host, blob, now.wall) {
            let event = Event::Done {
                host,
                blob: blob.into(),
            };
            self.assigner.handle(now.mono, event);
        }
    }

    /// Records what `host` holds of `blob` (`chunks == u32::MAX` with complete = all).
    pub(super) fn holds(
        &mut self,
        host: HostId,
        blob: Digest,
        chunks: u32,
        complete: bool,
        now: Now,
    ) {
        let Some(count) = self.catalog.manifest(&blob).map(|m| m.chunk_count()) else {
            return;
        };
        if (chunks > 0 || complete) && self.is_quarantined(host) {
            return; // Its claims to hold content are not taken.
        }
        let chunks = if complete { count } else { chunks.min(count) };
        if !self.catalog.set_holder(&blob, host, chunks, complete) {
            return;
        }
        let event = Event::Holds {
            host,
            blob: blob.into(),
            chunks,
            complete,
        };
        self.assigner.handle(now.mono, event);
    }

    /// Adds a manifest to the catalog (a known one is kept); returns true if it is new.
    pub(super) fn add_to_catalog(
        &mut self,
        manifest: Manifest,
        by: String,
        trust: catalog::Trust,
        now: Now,
    ) -> bool {
        let event = catalog::known_event(&manifest);
        let digest = manifest.digest();
        if !self.catalog.insert(manifest, by, now.wall, trust) {
            return false;
        }
        let reported = self.vetting.known(&digest);
        self.assigner.handle(now.mono, event);
        tracing::info!(blob = %digest, ?trust, "blob registered");
        // Agents that reported it whole while the catalog lacked it hold it.
        for host in reported {
            self.holds(host, digest, u32::MAX, true, now);
            self.blob_done(host, digest, now);
        }
        true
    }

    /// Turns the planner's decisions into messages to agents and its notices into target
    /// transitions, until neither machine has anything more to say.
    pub(super) fn drive(&mut self, now: Now) {
        loop {
            let mut idle = true;
            while let Some(command) = self.assigner.poll_command() {
                idle = false;
                match command {
                    Command::Fetch {
                        host,
                        blob,
                        sources,
                    } => self.send_order(host, blob.0, sources, now),
                    Command::UpdateSources {
                        host,
                        blob,
                        sources,
                    } => self.send_source_update(host, blob.0, sources),
                    Command::Cancel { host, blob } => {
                        self.cancel_order(host, blob.0, "no longer wanted");
                    }
                }
            }
            while let Some(notice) = self.assigner.poll_notice() {
                idle = false;
                match notice {
                    Notice::GaveUp {
                        host,
                        blob,
                        attempts,
                    } => {
                        self.orders.remove(host, blob.0);
                        // The last failure says why, if one was reported.
                        let (reason, message) = match self.orders.last_failure(host, blob.0) {
                            Some((reason, why)) => (
                                reason,
                                format!(
                                    "gave up after {attempts} failed attempts; the last: {why}"
                                ),
                            ),
                            None => (
                                FailureReason::NoSource,
                                format!("gave up after {attempts} failed attempts"),
                            ),
                        };
                        self.fail_targets(host, blob.0, reason, &message, now);
                    }
                }
            }
            while let Some(command) = self.seeder.poll_command() {
                idle = false;
                match command {
                    SeedCommand::Seed {
                        host, blob, range, ..
                    } => self.order_seed(host, blob.0, range, now),
                    SeedCommand::Stop { host, blob } => {
                        self.streams.remove_seeder(&blob.0, host);
                        // Dropped because nobody waits: its targets left already. (Stopped
                        // because the blob is known: the Seeded notice ends it.)
                        self.streams.end_if_idle(&blob.0);
                        if self.orders.is_seed(host, blob.0) {
                            self.cancel_order(host, blob.0, "seeding stopped");
                        }
                    }
                }
            }
            while let Some(notice) = self.seeder.poll_notice() {
                idle = false;
                self.on_seed_notice(notice, now);
            }
            if idle {
                return;
            }
        }
    }

    fn send_order(&mut self, host: HostId, blob: Digest, sources: Vec<HostId>, now: Now) {
        if self.catalog.manifest(&blob).is_none() {
            tracing::warn!(%blob, "assigner ordered a blob the catalog does not hold");
            return;
        }
        let sources = (sources.into_iter())
            .map(|s| (s, self.stripe_for(host, blob, s)))
            .collect();
        // A download running already (one that began while the blob was streamed from its
        // seeder) goes on under its id: the agent takes the resend's sources and digests.
        self.orders.issue_peers(host, blob, sources);
        self.deliver_order(host, blob);
        let agent = self.agents.name(host);
        self.jobs.start(&agent, host, blob, now.wall);
    }

    fn order_seed(&mut self, host: HostId, blob: Digest, range: Option<(u64, u64)>, now: Now) {
        // A target fetching the streamed blob from peers seeds it instead.
        self.leave_stream(host, blob, "seeding it from the origin instead", now);
        self.orders.issue(host, blob, OrderKind::Seed { range });
        tracing::info!(agent = %self.agents.name(host), %blob, ?range, "seeding from the origin");
        self.deliver_order(host, blob);
        self.jobs.start_blob(blob, now.wall);
    }

    /// Sends the recorded order for (host, blob), with its current sources. Called when the
    /// order is made and again when the agent's session (re)opens: an order made while the
    /// agent had no session (it just joined, or is reconnecting) would otherwise be lost.
    /// The same order id each time: an agent that kept running it just goes on.
    pub(super) fn deliver_order(&mut self, host: HostId, blob: Digest) {
        let Some(order) = self.orders.get(host, blob) else {
            return;
        };
        let kind = match &order.kind {
            OrderKind::Peers { sources } => {
                // A large table is left to the agent's sources when one of them holds some
                // of the blob, or runs an order from peers for it, or is to (a target whose
                // order waits its turn in the planner's release): it has the manifest, or
                // will shortly (a source waits a moment for a table it is learning, and
                // nothing can come from it before it has chunks anyway; past that the
                // agent asks the coordinator). Not for a manifest assembled from seeded
                // ranges (its holders
                // are the range seeders, whose bytes wait in part files until their own
                // order brings the table), nor when the agent may be running the order
                // under a provisional manifest already and needs the table to learn what
                // it lacks.
                let has_table = |s: HostId| {
                    self.catalog.holds_some(&blob, s)
                        || match self.orders.get(s, blob) {
                            Some(o) => matches!(o.kind, OrderKind::Peers { .. }) && !o.streamed,
                            None => self.jobs.is_wanted(s, blob),
                        }
                };
                let from_sources = !order.streamed
                    && self.catalog.trust(&blob) != Some(catalog::Trust::Seeded)
                    && (sources.keys()).any(|s| self.agents.get(*s).is_some() && has_table(*s));
                let slim = from_sources
                    .then(|| self.catalog.slim_manifest(&blob))
                    .flatten();
                let (manifest, provisional, table_digest) = match slim {
                    Some((m, table)) => (m, false, table.as_bytes().to_vec()),
                    None => match self.catalog.wire_manifest(&blob) {
                        Some(m) => (m, false, Vec::new()),
                        None => match self.streams.get(&blob) {
                            Some(s) => (pb::Manifest::from(&s.manifest), true, Vec::new()),
                            None => return,
                        },
                    },
                };
                let verified =
                    !provisional && self.catalog.trust(&blob) == Some(catalog::Trust::Verified);
                pb::fetch_order::Kind::Peers(pb::FromPeers {
                    manifest: Some(manifest),
                    sources: (sources.iter())
                        .filter_map(|(s, stripe)| self.source(blob, *s, *stripe))
                        .collect(),
                    provisional,
                    verified,
                    table_digest,
                })
            }
            OrderKind::Seed { range } => {
                let origin = self.origins.get(&blob).cloned();
                match range {
                    Some((start, end)) => pb::fetch_order::Kind::OriginRange(pb::OriginRange {
                        origin,
                        start: *start,
                        end: *end,
                        chunk_size: self.seeder.config().chunk_size,
                    }),
                    None => pb::fetch_order::Kind::Origin(pb::FromOrigin { origin }),
                }
            }
        };
        let message = pb::FetchOrder {
            order_id: order.id,
            blob_digest: blob.as_bytes().to_vec(),
            priority: self.jobs.priority(host, blob),
            job_id: (self.jobs.wanting(host, blob).next())
                .unwrap_or_default()
                .to_string(),
            kind: Some(kind),
        };
        self.agents
            .send(host, pb::coordinator_message::Msg::FetchOrder(message));
    }

    /// Resends every order the agent on `host` should be running.
    pub(super) fn redeliver_orders(&mut self, host: HostId) {
        for blob in self.orders.of_host(host) {
            self.deliver_order(host, blob);
        }
    }

    fn send_source_update(&mut self, host: HostId, blob: Digest, sources: Vec<HostId>) {
        let stripes: Vec<(HostId, (u32, u32))> = (sources.iter())
            .map(|s| (*s, self.stripe_for(host, blob, *s)))
            .collect();
        self.tell_sources(host, blob, stripes);
    }

    /// Tells the agent on `host` the sources of its order for `blob` that changed (each
    /// with its stripe), and those that are gone; nothing if nothing changed.
    pub(super) fn tell_sources(
        &mut self,
        host: HostId,
        blob: Digest,
        stripes: Vec<(HostId, (u32, u32))>,
    ) {
        let sources: Vec<HostId> = stripes.iter().map(|(s, _)| *s).collect();
        let Some(order) = self.orders.get_mut(host, blob) else {
            return;
        };
        let OrderKind::Peers { sources: told } = &mut order.kind else {
            return;
        };
        let order_id = order.id;
        let new: BTreeSet<HostId> = sources.iter().copied().collect();
        let removed: Vec<HostId> = (told.keys())
            .filter(|s| !new.contains(s))
            .copied()
            .collect();
        // New sources, and kept ones whose stripe changed (a co-downloader came or went):
        // the agent takes a source it already has as a stripe update.
        let changed: Vec<(HostId, (u32, u32))> = (stripes.into_iter())
            .filter(|(s, stripe)| told.get(s) != Some(stripe))
            .collect();
        for (s, stripe) in &changed {
            told.insert(*s, *stripe);
        }
        told.retain(|s, _| !removed.contains(s));
        let add = (changed.iter())
            .filter_map(|(s, stripe)| self.source(blob, *s, *stripe))
            .collect();
        let remove: Vec<String> = (removed.iter())
            .filter_map(|s| self.agents.get(*s).map(|a| a.id.clone()))
            .collect();
        if changed.is_empty() && remove.is_empty() {
            return;
        }
        self.agents.send(
            host,
            pb::coordinator_message::Msg::SourceUpdate(pb::SourceUpdate {
                order_id,
                add,
                remove,
            }),
        );
    }

    /// Forgets the order for (host, blob) and tells the agent to stop it.
    pub(super) fn cancel_order(&mut self, host: HostId, blob: Digest, reason: &str) {
        if let Some(order) = self.orders.remove(host, blob) {
            self.agents.send(
                host,
                pb::coordinator_message::Msg::Cancel(pb::Cancel {
                    order_id: order.id,
                    reason: reason.into(),
                }),
            );
        }
    }

    /// The stripe the planner gave (host, blob) on `source`, and how many there are.
    fn stripe_for(&self, host: HostId, blob: Digest, source: HostId) -> (u32, u32) {
        self.assigner
            .stripe(BlobId(blob), host, source)
            .unwrap_or((0, 1))
    }

    /// `host` as a source of `blob`, with the order's stripe of it.
    fn source(&self, blob: Digest, host: HostId, stripe: (u32, u32)) -> Option<pb::Source> {
        let agent = self.agents.get(host)?;
        Some(pb::Source {
            agent_id: agent.id.clone(),
            quic_addresses: agent.addrs.clone(),
            stripe: stripe.0,
            stripes: stripe.1,
            stripe_only: (self.streams.get(&blob)).is_some_and(|s| s.seeders.contains(&host)),
        })
    }

    // ---- seeding ----

    /// A failed order of `host` for `blob` was its seed order: the seeder hears why.
    pub(super) fn seed_failed(
        &mut self,
        host: HostId,
        blob: Digest,
        reason: FailureReason,
        message: &str,
        now: Now,
    ) {
        tracing::warn!(agent = %self.agents.name(host), %blob, message, "seeding failed");
        self.orders.remove(host, blob);
        self.streams.remove_seeder(&blob, host);
        if self.streams.contains(&blob) && !self.streams.has_seeder(&blob) {
            // What it streamed is not to be trusted for the next seeder's stream (its origin
            // may have served other bytes before failing): the targets drop it and start
            // over with the next seed.
            self.end_stream(blob, false, now);
        }
        let fault = match reason {
            FailureReason::Invalid => SeedFault::Missing,
            FailureReason::DigestMismatch => SeedFault::Mismatch,
            FailureReason::DiskFull | FailureReason::IoError => SeedFault::Local,
            _ => SeedFault::Transient,
        };
        let event = SeedEvent::Failed {
            blob: blob.into(),
            host,
            fault,
            message: message.to_string(),
        };
        self.seeder.handle(now.mono, event);
    }

    fn on_seed_notice(&mut self, notice: SeedNotice, now: Now) {
        match notice {
            SeedNotice::Assembled {
                blob,
                size,
                chunk_size,
                digests,
                held,
            } => {
                let seeders: Vec<String> =
                    held.iter().map(|(h, _, _)| self.agents.name(*h)).collect();
                match Manifest::new(blob.0, size, chunk_size, digests) {
                    Ok(manifest) => {
                        tracing::info!(%blob, ranges = held.len(), "manifest assembled from seeded ranges");
                        self.add_to_catalog(
                            manifest,
                            seeders.join(","),
                            catalog::Trust::Seeded,
                            now,
                        );
                        // Each seeder holds its range (it moves it into its store with its
                        // order for the blob): a partial source from now on.
                        let mut counts: std::collections::BTreeMap<HostId, u32> =
                            Default::default();
                        for (host, _, n) in held {
                            *counts.entry(host).or_default() += n;
                        }
                        for (host, n) in counts {
                            self.holds(host, blob.0, n, false, now);
                        }
                        self.seeder
                            .handle(now.mono, SeedEvent::Known { blob, by: None });
                    }
                    Err(e) => {
                        let message = format!("the seeded ranges do not make a manifest: {e}");
                        self.seeder
                            .handle(now.mono, SeedEvent::Abandon { blob, message });
                    }
                }
            }
            SeedNotice::Seeded { blob, waiting } => {
                let blob = blob.0;
                self.origins.remove(&blob);
                self.end_stream(blob, true, now);
                let size = self.catalog.manifest(&blob).map_or(0, |m| m.size());
                self.jobs.set_size(blob, size, now.wall);
                for host in waiting {
                    if !self.jobs.is_wanted(host, blob) {
                        continue;
                    }
                    self.want_from_peers(host, blob, now);
                    if self.catalog.holds_complete(&blob, host) {
                        self.blob_done(host, blob, now);
                    }
                }
            }
            SeedNotice::Failed {
                blob,
                cause,
                waiting,
            } => {
                let blob = blob.0;
                self.origins.remove(&blob);
                self.end_stream(blob, false, now);
                let name = |h: HostId| self.agents.name(h);
                let last = |l: &Option<LastError>| match l {
                    Some(LastError::Failed { host, message }) => {
                        format!("{}: {message}", name(*host))
                    }
                    Some(LastError::Lost { host }) => format!("seeder {} was lost", name(*host)),
                    None => String::new(),
                };
                let (reason, message) = match &cause {
                    GiveUp::Definitive { fault, message, .. } => (
                        if *fault == SeedFault::Mismatch {
                            FailureReason::DigestMismatch
                        } else {
                            FailureReason::Invalid
                        },
                        format!("the origin cannot provide {blob}: {message}"),
                    ),
                    GiveUp::Exhausted { attempts, last: l } => (
                        FailureReason::OriginError,
                        format!(
                            "fetching from the origin failed on {attempts} agents; last: {}",
                            last(l)
                        ),
                    ),
                    GiveUp::NobodyLeft { last: l } => (
                        FailureReason::OriginError,
                        format!(
                            "fetching from the origin failed on every agent that needs it; last: {}",
                            last(l)
                        ),
                    ),
                    GiveUp::Abandoned { message } => (FailureReason::Internal, message.clone()),
                };
                tracing::warn!(%blob, message, "giving up seeding");
                for host in waiting {
                    self.fail_targets(host, blob, reason, &message, now);
                }
            }
        }
    }
}
