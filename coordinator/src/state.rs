//! The one task that owns the coordinator's state: agents and their sessions, the blob
//! catalog, jobs, and the planner's `Assigner`. The gRPC layer sends it [`Request`]s; nothing
//! else touches the state, so there are no locks.

mod agents;
mod catalog;
mod job_ops;
mod seeding;
mod urls;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use shoal_planner::{Assigner, AssignerConfig, BlobId, Command, Event, HostId, Notice, Time};
use shoal_proto::pb::v1::{self as pb, agent_message};
use shoal_proto::{Digest, Manifest};
use tokio::sync::{mpsc, oneshot};

use crate::db::Db;
use crate::jobs::Job;
use shoal_pki::ClusterCa;

/// Why a request was refused; the service layer maps each kind to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Internal(String),
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;
/// Where a session's outgoing messages go.
pub type SessionTx = mpsc::Sender<Result<pb::CoordinatorMessage, tonic::Status>>;
pub type WatchRx = mpsc::Receiver<Result<pb::JobProgress, tonic::Status>>;

/// A session: the agent's host id and a generation that tells reconnects apart.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SessionId {
    pub host: HostId,
    pub generation: u64,
}

#[derive(Debug)]
pub enum Request {
    Join(pb::JoinRequest, Reply<pb::JoinResponse>),
    OpenSession {
        hello: pb::Hello,
        tx: SessionTx,
        reply: Reply<SessionId>,
    },
    FromAgent {
        session: SessionId,
        msg: agent_message::Msg,
    },
    SessionClosed {
        session: SessionId,
    },
    /// A Distribute request, and the image reference for a job made by Preheat.
    Distribute(pb::DistributeRequest, String, Reply<pb::DistributeResponse>),
    GetJob(pb::GetJobRequest, Reply<pb::GetJobResponse>),
    WatchJob(pb::WatchJobRequest, Reply<WatchRx>),
    CancelJob(pb::CancelJobRequest, Reply<pb::CancelJobResponse>),
    ListJobs(pb::ListJobsRequest, Reply<pb::ListJobsResponse>),
    ListAgents(pb::ListAgentsRequest, Reply<pb::ListAgentsResponse>),
    ListBlobs(pb::ListBlobsRequest, Reply<pb::ListBlobsResponse>),
    GetBlob(pb::GetBlobRequest, Reply<pb::GetBlobResponse>),
    ResolveUrl(pb::ResolveUrlRequest, Reply<pb::ResolveUrlResponse>),
}

/// Settings the state task needs.
#[derive(Clone, Debug)]
pub struct StateConfig {
    pub join_token: String,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Finished jobs are dropped this long after they end.
    pub job_retention: Duration,
    pub assigner: AssignerConfig,
    pub seed: u64,
    /// Blobs at least this large, with several targets waiting, are seeded in ranges by
    /// several agents at once (see `seeding.rs`).
    pub stripe_seed_min_bytes: u64,
    /// The most agents that seed one blob at once.
    pub max_seeders_per_blob: usize,
}

/// A running fetch order: what we told the agent, so updates can be sent as differences.
#[derive(Debug)]
struct Order {
    id: u64,
    /// Each source with the stripe this download asks it for (see `Assigner::stripe`).
    sources: BTreeMap<HostId, (u32, u32)>,
}

struct Watcher {
    tx: mpsc::Sender<Result<pb::JobProgress, tonic::Status>>,
    with_targets: bool,
    sent_version: u64,
}

pub struct State {
    config: StateConfig,
    db: Db,
    ca: Arc<ClusterCa>,
    epoch: Instant,
    assigner: Assigner,
    agents: agents::Agents,
    catalog: catalog::Catalog,
    jobs: BTreeMap<String, Job>,
    /// Which jobs want (host, blob); the assigner is told Want once and Unwant when empty.
    wants: BTreeMap<(HostId, Digest), BTreeSet<String>>,
    orders: BTreeMap<(HostId, Digest), Order>,
    /// Blobs being brought in from their origin (see `seeding.rs`).
    seeding: BTreeMap<Digest, seeding::Seeding>,
    /// URLs pulled without a digest (see `urls.rs`).
    urls: urls::Urls,
    /// Manifests assembled from seeded ranges that no agent has verified whole yet: kept in
    /// memory only, and dropped if a target finds the blob does not match its digest.
    provisional: BTreeSet<Digest>,
    next_order: u64,
    watchers: HashMap<String, Vec<Watcher>>,
    /// Jobs changed since the last write (see `persist`).
    dirty: BTreeSet<String>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

/// One page of `items` in the order of their keys: those after `token` (a key from the
/// previous page), at most `size` (0 = 100). Returns the page and the token for the next
/// one (empty when none is left). Keys are stable, so inserts between pages skip or
/// repeat nothing.
fn page<T>(mut items: Vec<(String, T)>, size: u32, token: &str) -> (Vec<T>, String) {
    items.sort_by(|a, b| a.0.cmp(&b.0));
    let size = if size == 0 { 100 } else { size as usize };
    let mut rest = items
        .into_iter()
        .skip_while(|(key, _)| !token.is_empty() && key.as_str() <= token);
    let page: Vec<(String, T)> = rest.by_ref().take(size).collect();
    let next = match (rest.next(), page.last()) {
        (Some(_), Some((key, _))) => key.clone(),
        _ => String::new(),
    };
    (page.into_iter().map(|(_, t)| t).collect(), next)
}

/// How often the state task looks at leases, deadlines and watchers.
const TICK: Duration = Duration::from_millis(250);

impl State {
    pub fn new(config: StateConfig, db: Db, ca: Arc<ClusterCa>) -> Result<Self, ApiError> {
        let assigner = Assigner::new(config.assigner.clone(), config.seed);
        let mut state = Self {
            config,
            db,
            ca,
            epoch: Instant::now(),
            assigner,
            agents: Default::default(),
            catalog: Default::default(),
            jobs: BTreeMap::new(),
            wants: BTreeMap::new(),
            orders: BTreeMap::new(),
            seeding: BTreeMap::new(),
            urls: Default::default(),
            provisional: BTreeSet::new(),
            // Unique across restarts: agents tell orders apart by id, and an agent may still
            // run an order of the previous incarnation when this one starts.
            next_order: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64),
            watchers: HashMap::new(),
            dirty: BTreeSet::new(),
        };
        state.load()?;
        Ok(state)
    }

    fn load(&mut self) -> Result<(), ApiError> {
        let internal = |e: crate::db::DbError| ApiError::Internal(e.to_string());
        for stored in self.db.blobs().map_err(internal)? {
            let Some(m) = stored
                .manifest
                .as_ref()
                .and_then(|m| Manifest::try_from(m).ok())
            else {
                tracing::warn!("skipping an unreadable manifest in the catalog");
                continue;
            };
            let now = self.now();
            self.assigner.handle(now, catalog::known_event(&m));
            self.catalog
                .insert(Arc::new(m), stored.registered_by, stored.registered_at);
        }
        for record in self.db.jobs().map_err(internal)? {
            if let Some(job) = Job::from_pb(record) {
                self.jobs.insert(job.id().to_string(), job);
            }
        }
        let expected: BTreeSet<String> = (self.jobs.values())
            .filter(|j| !j.is_terminal())
            .flat_map(|j| j.targets.keys().map(|(agent, _)| agent.clone()))
            .collect();
        self.expect_agents(expected);
        tracing::info!(
            blobs = self.catalog.len(),
            jobs = self.jobs.len(),
            "state loaded"
        );
        Ok(())
    }

    fn now(&self) -> Time {
        Time::from_micros(self.epoch.elapsed().as_micros() as u64)
    }

    /// Runs until every sender of `requests` is gone.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // One batch per request: a job's targets, or a report that re-plans many
            // downloads, give each download one order or update with its final sources.
            self.assigner.begin_batch();
            tokio::select! {
                request = requests.recv() => {
                    let Some(request) = request else { return };
                    self.handle(request);
                }
                _ = tick.tick() => self.on_tick(),
            }
            if !self.seeding.is_empty() {
                self.elect_seeders();
            }
            self.assigner.end_batch();
            self.drive_assigner();
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Join(req, reply) => {
                let _ = reply.send(self.join(req));
            }
            Request::OpenSession { hello, tx, reply } => {
                let _ = reply.send(self.open_session(hello, tx));
            }
            Request::FromAgent { session, msg } => self.on_agent_message(session, msg),
            Request::SessionClosed { session } => self.session_closed(session),
            Request::Distribute(req, image, reply) => {
                let _ = reply.send(self.distribute(req, image));
            }
            Request::GetJob(req, reply) => {
                let _ = reply.send(self.get_job(req));
            }
            Request::WatchJob(req, reply) => {
                let _ = reply.send(self.watch_job(req));
            }
            Request::CancelJob(req, reply) => {
                let _ = reply.send(self.cancel_job(req));
            }
            Request::ListJobs(req, reply) => {
                let _ = reply.send(Ok(self.list_jobs(req)));
            }
            Request::ListAgents(req, reply) => {
                let _ = reply.send(Ok(self.list_agents(req)));
            }
            Request::ListBlobs(req, reply) => {
                let _ = reply.send(Ok(self.catalog.list(req)));
            }
            Request::GetBlob(req, reply) => {
                let _ = reply.send(self.get_blob(req));
            }
            Request::ResolveUrl(req, reply) => {
                let _ = reply.send(self.resolve_url(req));
            }
        }
    }

    fn on_tick(&mut self) {
        let now = self.now();
        self.expire_leases();
        self.assigner.handle_timeout(now);
        self.expire_deadlines();
        self.push_watchers();
        self.flush_jobs();
        self.forget_old_jobs();
        self.export_metrics();
    }

    fn export_metrics(&self) {
        use crate::metrics as m;
        let ready = self
            .agents
            .iter()
            .filter(|a| a.state == pb::AgentState::Ready)
            .count();
        metrics::gauge!(m::AGENTS_READY).set(ready as f64);
        metrics::gauge!(m::BLOBS).set(self.catalog.len() as f64);
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut bytes_done = 0;
        for job in self.jobs.values() {
            *by_state
                .entry(crate::jobs::state_label(job.state()))
                .or_default() += 1;
            if !job.is_terminal() {
                bytes_done += job.targets.values().map(|t| t.bytes_done).sum::<u64>();
            }
        }
        for state in ["pending", "running", "done", "failed", "cancelled"] {
            let n = by_state.get(state).copied().unwrap_or(0);
            metrics::gauge!(m::JOBS, "state" => state).set(n as f64);
        }
        metrics::gauge!(m::JOB_BYTES_DONE).set(bytes_done as f64);
        let s = self.assigner.stats();
        for (kind, v) in [
            ("order", s.orders),
            ("source_update", s.source_updates),
            ("cancel", s.cancels),
            ("replan", s.replans),
            ("corrupt_report", s.corrupt_reports),
            ("gave_up", s.gave_up),
        ] {
            metrics::counter!(m::PLANNER_DECISIONS, "kind" => kind).absolute(v);
        }
    }

    /// Turns the assigner's decisions into messages to agents and its notices into job
    /// updates.
    fn drive_assigner(&mut self) {
        while let Some(command) = self.assigner.poll_command() {
            match command {
                Command::Fetch {
                    host,
                    blob,
                    sources,
                } => self.send_order(host, blob.0, sources),
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
            match notice {
                Notice::GaveUp {
                    host,
                    blob,
                    attempts,
                } => {
                    let message = format!("gave up after {attempts} failed attempts");
                    self.orders.remove(&(host, blob.0));
                    self.fail_targets(host, blob.0, pb::FailureReason::NoSource, &message);
                }
            }
        }
    }

    fn send_order(&mut self, host: HostId, blob: Digest, sources: Vec<HostId>) {
        if self.catalog.manifest(&blob).is_none() {
            tracing::warn!(%blob, "assigner ordered a blob the catalog does not hold");
            return;
        }
        let id = self.next_order;
        self.next_order += 1;
        self.orders.insert(
            (host, blob),
            Order {
                id,
                sources: BTreeMap::new(),
            },
        );
        for source in sources {
            let stripe = self.stripe_for(host, blob, source);
            if let Some(order) = self.orders.get_mut(&(host, blob)) {
                order.sources.insert(source, stripe);
            }
        }
        self.deliver_order(host, blob);
        self.mark_running(host, blob);
    }

    /// Sends the recorded order for (host, blob) with its current sources. Called when the
    /// order is made and again when the agent's session (re)opens: an order made while the
    /// agent had no session (it just joined, or is reconnecting) would otherwise be lost.
    fn deliver_order(&mut self, host: HostId, blob: Digest) {
        if self.is_seeding(host, &blob) {
            return; // Its order carries the origin, not a manifest: see `seeding.rs`.
        }
        let (Some(order), Some(manifest)) =
            (self.orders.get(&(host, blob)), self.catalog.manifest(&blob))
        else {
            return;
        };
        let wants = self.wants.get(&(host, blob));
        let order = pb::FetchOrder {
            order_id: order.id,
            blob_digest: blob.as_bytes().to_vec(),
            priority: self.priority_of(host, blob),
            job_id: wants
                .and_then(|j| j.iter().next().cloned())
                .unwrap_or_default(),
            kind: Some(pb::fetch_order::Kind::Peers(pb::FromPeers {
                manifest: Some(pb::Manifest::from(manifest.as_ref())),
                sources: (order.sources.iter())
                    .filter_map(|(s, stripe)| self.source(*s, *stripe))
                    .collect(),
            })),
        };
        self.agents
            .send(host, pb::coordinator_message::Msg::FetchOrder(order));
    }

    /// The highest priority among the jobs that want (host, blob).
    fn priority_of(&self, host: HostId, blob: Digest) -> i32 {
        (self.wants.get(&(host, blob)).into_iter().flatten())
            .filter_map(|j| self.jobs.get(j))
            .map(|j| j.record.priority)
            .max()
            .unwrap_or(pb::Priority::Normal as i32)
    }

    /// Resends every order the agent on `host` should be running.
    fn redeliver_orders(&mut self, host: HostId) {
        let blobs: Vec<Digest> = (self.orders.keys())
            .filter(|(h, _)| *h == host)
            .map(|(_, b)| *b)
            .collect();
        for blob in blobs {
            self.deliver_order(host, blob);
        }
    }

    fn send_source_update(&mut self, host: HostId, blob: Digest, sources: Vec<HostId>) {
        let Some(order) = self.orders.get(&(host, blob)) else {
            return;
        };
        let new: BTreeSet<HostId> = sources.into_iter().collect();
        let order_id = order.id;
        let removed: Vec<HostId> = (order.sources.keys())
            .filter(|s| !new.contains(s))
            .copied()
            .collect();
        // New sources, and kept ones whose stripe changed (a co-downloader came or went):
        // the agent takes a source it already has as a stripe update.
        let added: Vec<HostId> = (new.iter())
            .filter(|s| order.sources.get(s) != Some(&self.stripe_for(host, blob, **s)))
            .copied()
            .collect();
        let mut add = Vec::new();
        for source in added {
            let stripe = self.stripe_for(host, blob, source);
            add.extend(self.source(source, stripe));
            if let Some(order) = self.orders.get_mut(&(host, blob)) {
                order.sources.insert(source, stripe);
            }
        }
        let remove = (removed.iter())
            .filter_map(|s| self.agents.get(*s).map(|a| a.id.clone()))
            .collect();
        if let Some(order) = self.orders.get_mut(&(host, blob)) {
            order.sources.retain(|s, _| !removed.contains(s));
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

    /// The stripe the planner gave (host, blob) on `source`, and how many there are.
    fn stripe_for(&self, host: HostId, blob: Digest, source: HostId) -> (u32, u32) {
        self.assigner
            .stripe(BlobId(blob), host, source)
            .unwrap_or((0, 1))
    }

    fn source(&self, host: HostId, stripe: (u32, u32)) -> Option<pb::Source> {
        let agent = self.agents.get(host)?;
        Some(pb::Source {
            agent_id: agent.id.clone(),
            quic_addresses: agent.addrs.clone(),
            stripe: stripe.0,
            stripes: stripe.1,
        })
    }

    fn on_agent_message(&mut self, session: SessionId, msg: agent_message::Msg) {
        if !self.agents.touch(session) {
            return; // A message from a replaced session.
        }
        let host = session.host;
        let now = self.now();
        self.assigner.handle(now, Event::Heartbeat { host });
        match msg {
            agent_message::Msg::Hello(_) | agent_message::Msg::Heartbeat(_) => {}
            agent_message::Msg::Inventory(inv) => self.inventory(host, inv),
            agent_message::Msg::Progress(batch) => {
                for item in batch.items {
                    self.progress(host, item);
                }
            }
            agent_message::Msg::BlobDone(done) => {
                let Ok(blob) = Digest::from_slice(&done.blob_digest) else {
                    return;
                };
                if self.provisional.remove(&blob) {
                    // One agent has read the whole blob and checked its digest.
                    self.persist_manifest(&blob);
                }
                self.blob_done(host, blob);
            }
            agent_message::Msg::BlobFailed(failed) => {
                let Ok(blob) = Digest::from_slice(&failed.blob_digest) else {
                    return;
                };
                let reason = failed.reason();
                if self.seed_failed(host, blob, failed.order_id, reason, &failed.message) {
                    return;
                }
                if reason == pb::FailureReason::DigestMismatch && self.provisional.contains(&blob) {
                    self.reject_provisional(blob, &failed.message);
                    return;
                }
                // Only the current order's failure counts: agents resend recent reports after
                // a reconnect, and a stale one must not cost the retry another attempt.
                if self.orders.get(&(host, blob)).map(|o| o.id) != Some(failed.order_id) {
                    return;
                }
                tracing::info!(agent = %self.agents.name(host), %blob, message = %failed.message, "fetch failed");
                self.orders.remove(&(host, blob));
                let reason = catalog::fail_reason(reason);
                self.assigner.handle(
                    now,
                    Event::Failed {
                        host,
                        blob: blob.into(),
                        reason,
                    },
                );
            }
            agent_message::Msg::Load(load) => self.agents.set_load(host, load),
            agent_message::Msg::BlobRegistered(reg) => self.register(host, reg),
            agent_message::Msg::RangeSeeded(range) => self.range_seeded(host, range),
            agent_message::Msg::SourceStalled(stalled) => {
                let Ok(blob) = Digest::from_slice(&stalled.blob_digest) else {
                    return;
                };
                // Only the running order's report counts (a resent one may be stale).
                if self.orders.get(&(host, blob)).map(|o| o.id) != Some(stalled.order_id) {
                    return;
                }
                if let Some(source) = self.agents.host_of(&stalled.peer_agent_id) {
                    tracing::info!(agent = %self.agents.name(host), peer = %stalled.peer_agent_id, %blob, reason = %stalled.reason, "source stalled");
                    self.assigner.handle(
                        now,
                        Event::SourceStalled {
                            host,
                            blob: blob.into(),
                            source,
                        },
                    );
                }
            }
            agent_message::Msg::ChunkRejected(rej) => {
                let Ok(blob) = Digest::from_slice(&rej.blob_digest) else {
                    return;
                };
                if let Some(source) = self.agents.host_of(&rej.peer_agent_id) {
                    tracing::warn!(agent = %self.agents.name(host), peer = %rej.peer_agent_id, %blob, "peer served a corrupted chunk");
                    self.assigner.handle(
                        now,
                        Event::SourceCorrupt {
                            host,
                            blob: blob.into(),
                            source,
                        },
                    );
                }
            }
        }
    }

    fn register(&mut self, host: HostId, reg: pb::BlobRegistered) {
        let Some(manifest) = reg
            .manifest
            .as_ref()
            .and_then(|m| Manifest::try_from(m).ok())
        else {
            tracing::warn!(agent = %self.agents.name(host), "agent registered an invalid manifest");
            return;
        };
        let digest = manifest.digest();
        let by = self.agents.name(host);
        self.add_to_catalog(manifest, by, true);
        // The agent holds it whole: if a job wanted it there, that target is done; targets
        // waiting for it to be seeded can now fetch it from peers.
        self.blob_done(host, digest);
        self.seeded(digest);
    }

    /// Records a manifest new to the catalog (a known one is kept), and persists it unless
    /// it is provisional (assembled from ranges: see `provisional`).
    fn add_to_catalog(&mut self, manifest: Manifest, by: String, verified: bool) {
        let digest = manifest.digest();
        if self.catalog.manifest(&digest).is_some() {
            if verified && self.provisional.remove(&digest) {
                self.persist_manifest(&digest);
            }
            return;
        }
        let stored = crate::db::StoredBlob {
            manifest: Some(pb::Manifest::from(&manifest)),
            registered_by: by.clone(),
            registered_at: Some(SystemTime::now().into()),
        };
        if verified {
            if let Err(e) = self.db.put_blob(digest.as_bytes(), &stored) {
                tracing::error!(error = %e, "persisting a registered blob failed");
            }
        } else {
            self.provisional.insert(digest);
        }
        let now = self.now();
        self.assigner.handle(now, catalog::known_event(&manifest));
        self.catalog
            .insert(Arc::new(manifest), by, stored.registered_at);
        tracing::info!(blob = %digest, "blob registered");
    }

    /// Writes a catalog manifest to the database.
    fn persist_manifest(&mut self, blob: &Digest) {
        let Some(entry) = self.catalog.entry(blob) else {
            return;
        };
        let stored = crate::db::StoredBlob {
            manifest: Some(pb::Manifest::from(entry.manifest.as_ref())),
            registered_by: entry.registered_by.clone(),
            registered_at: entry.registered_at,
        };
        if let Err(e) = self.db.put_blob(blob.as_bytes(), &stored) {
            tracing::error!(error = %e, "persisting a verified blob failed");
        }
    }

    /// A target found that the blob assembled from seeded ranges does not match its digest:
    /// the origin serves other bytes. The manifest is dropped and every target of the blob
    /// fails, rather than fetching it again and again.
    fn reject_provisional(&mut self, blob: Digest, message: &str) {
        if !self.provisional.remove(&blob) {
            return;
        }
        tracing::warn!(%blob, message, "the seeded blob does not match its digest");
        let message = format!("the origin's content does not match {blob}: {message}");
        let hosts: Vec<HostId> = (self.wants.keys())
            .filter(|(_, b)| *b == blob)
            .map(|(h, _)| *h)
            .collect();
        for host in hosts {
            self.cancel_order(host, blob, "the blob does not match its digest");
            self.fail_targets(host, blob, pb::FailureReason::DigestMismatch, &message);
        }
        self.catalog.remove(&blob);
    }

    /// Records what `host` holds of `blob` (`chunks == u32::MAX` with complete = all).
    fn holds(&mut self, host: HostId, blob: Digest, chunks: u32, complete: bool) {
        let Some(count) = self.catalog.manifest(&blob).map(|m| m.chunk_count()) else {
            return;
        };
        let chunks = if complete { count } else { chunks.min(count) };
        if !self.catalog.set_holder(&blob, host, chunks, complete) {
            return;
        }
        let now = self.now();
        self.assigner.handle(
            now,
            Event::Holds {
                host,
                blob: blob.into(),
                chunks,
                complete,
            },
        );
    }

    fn inventory(&mut self, host: HostId, inv: pb::Inventory) {
        // A snapshot replaces what we knew; blobs it no longer lists are dropped after it is
        // applied, so holdings that did not change cause no re-planning.
        let mut dropped: BTreeSet<Digest> = if inv.replace {
            self.catalog.held_by(host).into_iter().collect()
        } else {
            BTreeSet::new()
        };
        for removed in inv.removed {
            if let Ok(blob) = Digest::from_slice(&removed) {
                self.holds(host, blob, 0, false);
            }
        }
        for held in inv.blobs {
            let Ok(blob) = Digest::from_slice(&held.blob_digest) else {
                continue;
            };
            let chunks = held
                .chunks
                .as_ref()
                .map(|c| catalog::count_bits(&c.bits))
                .unwrap_or(0);
            dropped.remove(&blob);
            self.holds(host, blob, chunks, held.complete);
            if held.complete {
                self.blob_done(host, blob);
            }
        }
        for blob in dropped {
            self.holds(host, blob, 0, false);
        }
    }

    fn progress(&mut self, host: HostId, item: pb::BlobProgress) {
        let Ok(blob) = Digest::from_slice(&item.blob_digest) else {
            return;
        };
        // A late progress report must not make a complete holder look partial again.
        if !self.catalog.holds_complete(&blob, host) {
            self.holds(host, blob, item.chunks_verified, false);
        }
        let agent = self.agents.name(host);
        for job_id in self.wants.get(&(host, blob)).cloned().unwrap_or_default() {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.update(&(agent.clone(), blob), |t| {
                    if !t.is_terminal() {
                        t.state = pb::TargetState::Running;
                        t.bytes_done = item.bytes_done.min(t.bytes_total);
                        t.rate = item.rate_bytes_per_sec;
                    }
                });
            }
        }
    }

    fn blob_done(&mut self, host: HostId, blob: Digest) {
        self.holds(host, blob, u32::MAX, true);
        self.orders.remove(&(host, blob));
        let now = self.now();
        if self.wants.contains_key(&(host, blob)) {
            self.assigner.handle(
                now,
                Event::Done {
                    host,
                    blob: blob.into(),
                },
            );
        }
        let agent = self.agents.name(host);
        let wall = SystemTime::now();
        for job_id in self.wants.remove(&(host, blob)).unwrap_or_default() {
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            job.update(&(agent.clone(), blob), |t| {
                t.state = pb::TargetState::Done;
                t.bytes_done = t.bytes_total;
                t.rate = 0;
            });
            job.refresh_state(wall);
            self.persist(&job_id);
        }
    }
}

#[cfg(test)]
mod tests;
