//! The coordinator's state and the one task that owns it. The gRPC layer sends it
//! [`Request`]s; nothing else touches it, so there are no locks.
//!
//! Who owns what:
//! - [`agents::Agents`]: who joined, sessions, leases (soft);
//! - [`catalog::Catalog`]: manifests, who vouches for each (durable unless seeded), and who
//!   holds what (soft);
//! - [`jobs::Jobs`]: jobs and their targets, which jobs want which blob where, watchers, and
//!   their persistence; every target transition is a method there;
//! - [`orders::Orders`]: the one order out per (agent, blob), its kind, and the durable
//!   order-id counter;
//! - the planner's [`Assigner`] (who fetches from whom) and [`Seeder`] (who fetches what
//!   nobody holds from its origin, and URL single flight);
//! - [`streams::Streams`]: blobs seeded whole whose other targets fetch them while the
//!   seed runs (provisional manifests, `streaming.rs` is their glue);
//! - [`secrets::Secrets`]: the hashes of agents' secrets (durable);
//! - [`vetting::Vetting`]: agents quarantined for a wrong manifest, and blobs the catalog
//!   asks their holders to register again (soft).
//!
//! The durable owners read the database once, in [`State::new`], and from then on queue
//! their writes for the writer thread (`crate::writer`) and never wait for the disk; what a
//! user asked is answered by the writer once it is stored (see [`when_stored`]).
//!
//! `State` itself is the glue: it turns requests and agent reports into events for those
//! owners, and the planner's commands into messages to agents (`planning.rs`). It never
//! reads a clock: every entry point takes [`Now`], so tests drive it on a fake clock. The
//! driver (`crate::driver`) calls [`State::step`] for each request and
//! [`State::handle_timeout`] when [`State::poll_timeout`] comes.

mod admin;
mod agents;
mod api;
mod catalog;
mod export;
mod job;
mod jobs;
mod orders;
mod planning;
mod reports;
mod secrets;
mod sessions;
mod stranded;
mod streaming;
mod streams;
mod vetting;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shoal_planner::{Assigner, AssignerConfig, HostId, Seeder, SeederConfig, Time};
use shoal_proto::pb::v1::{self as pb, agent_message};
use tokio::sync::{mpsc, oneshot};

use crate::db::{Db, DbError};
use crate::writer::{Stopped, Then, Writer};
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
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Unavailable(String),
}

/// Who submitted a job, and the image reference for a job made by Preheat.
#[derive(Clone, Debug, Default)]
pub struct Submitted {
    /// `token:<name>` or `agent:<id>`; empty on an insecure coordinator.
    pub creator: String,
    pub image: String,
}

pub type Reply<T> = oneshot::Sender<Result<T, ApiError>>;
/// Where a session's outgoing messages go.
pub type SessionTx = mpsc::Sender<Result<pb::CoordinatorMessage, tonic::Status>>;
pub type WatchRx = mpsc::Receiver<Result<pb::JobProgress, tonic::Status>>;

/// The time, as the state sees it: monotonic for leases and the planner, wall-clock for
/// what users read (job times, deadlines).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Now {
    pub mono: Time,
    pub wall: SystemTime,
}

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
    /// A Distribute request, with who sent it (and the image, for Preheat).
    Distribute(
        pb::DistributeRequest,
        Submitted,
        Reply<pb::DistributeResponse>,
    ),
    GetJob(pb::GetJobRequest, Reply<pb::GetJobResponse>),
    WatchJob(pb::WatchJobRequest, Reply<WatchRx>),
    /// A CancelJob; with a creator, only a job that creator made may be cancelled.
    CancelJob(
        pb::CancelJobRequest,
        Option<String>,
        Reply<pb::CancelJobResponse>,
    ),
    ListJobs(pb::ListJobsRequest, Reply<pb::ListJobsResponse>),
    ListAgents(pb::ListAgentsRequest, Reply<pb::ListAgentsResponse>),
    ListBlobs(pb::ListBlobsRequest, Reply<pb::ListBlobsResponse>),
    GetBlob(pb::GetBlobRequest, Reply<pb::GetBlobResponse>),
    ResolveUrl(pb::ResolveUrlRequest, Reply<pb::ResolveUrlResponse>),
    /// A new certificate for the agent (named by the one it presented) for `csr_der`.
    RenewCertificate {
        agent_id: String,
        csr_der: Vec<u8>,
        reply: Reply<pb::RenewCertificateResponse>,
    },
    RemoveBlob(pb::RemoveBlobRequest, Reply<pb::RemoveBlobResponse>),
    DrainAgent(pb::DrainAgentRequest, Reply<pb::DrainAgentResponse>),
    RemoveAgent(pb::RemoveAgentRequest, Reply<pb::RemoveAgentResponse>),
    /// The health watchdog's probe: answered at once, so an answer says the state task
    /// runs and keeps up with its queue.
    Ping(oneshot::Sender<()>),
    /// Tests only: makes the state task misbehave.
    #[cfg(test)]
    Fault(Fault),
}

impl Request {
    /// Whether it may be handled ahead of requests queued before it: calls that only read
    /// (GetJob, the lists, GetBlob, WatchJob's start) and certificate renewals. Such a call
    /// sees the state as if it had arrived a moment sooner, which a caller cannot tell from
    /// network timing; a client that waited for its Distribute's answer still sees its job.
    /// Everything else keeps its order: the agents' session traffic, joins (a rejoin must
    /// not overtake what its agent's previous session still has queued), calls that change
    /// jobs, blobs or agents, and the health probe that measures the wait.
    pub fn may_overtake(&self) -> bool {
        matches!(
            self,
            Request::GetJob(..)
                | Request::WatchJob(..)
                | Request::ListJobs(..)
                | Request::ListAgents(..)
                | Request::ListBlobs(..)
                | Request::GetBlob(..)
                | Request::RenewCertificate { .. }
        )
    }
}

/// What [`Request::Fault`] does to the state task.
#[cfg(test)]
#[derive(Debug)]
pub enum Fault {
    /// Blocks its thread this long, as a deadlock or a runaway step would.
    Stall(Duration),
    Panic,
    /// Wants for this many hosts that never joined, as a big Distribute gives the planner
    /// (answered when its step is done).
    Burst(u32, oneshot::Sender<()>),
    /// Answers how many wants wait for the planner's next slice.
    QueuedWants(oneshot::Sender<usize>),
    /// Every timer turn from now on stalls this long on top of its work.
    SlowTimers(Duration),
}

/// Settings the state needs.
#[derive(Clone, Debug)]
pub struct StateConfig {
    pub join_token: String,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Finished jobs are dropped this long after they end.
    pub job_retention: Duration,
    pub assigner: AssignerConfig,
    pub seeder: SeederConfig,
    pub seed: u64,
    /// The most targets (agents × blobs) one job may have.
    pub max_targets_per_job: u64,
    /// An agent's registration counts as verified (see `CoordinatorConfig`).
    pub trust_registrations: bool,
    /// Targets of a blob nobody holds whole and nothing seeds fail after this long without
    /// a chunk gained by any holder (see `stranded.rs`).
    pub stranded_after: Duration,
    /// How long an agent certificate is valid (agents renew at half of it); none: as long
    /// as the CA (an insecure coordinator, whose agents cannot renew over gRPC).
    pub certificate_validity: Option<Duration>,
}

/// How often leases, deadlines, watchers and job writes are looked at. The planner's own
/// timers (stripe updates, retries, stuck checks) run at their own times.
pub const HOUSEKEEPING: Duration = Duration::from_millis(250);

/// A Distribute's targets wanted in one turn of the state task at most: the wants of
/// 20,000 targets in the Distribute's own turn held every message behind it ~30 ms.
const WANTS_PER_TURN: usize = 2_000;

pub struct State {
    config: StateConfig,
    ca: Arc<ClusterCa>,
    assigner: Assigner,
    seeder: Seeder,
    agents: agents::Agents,
    catalog: catalog::Catalog,
    jobs: jobs::Jobs,
    orders: orders::Orders,
    /// The origin each blob being seeded is fetched from (the first job's that named one).
    origins: BTreeMap<shoal_proto::Digest, pb::Origin>,
    /// Blobs seeded whole that their other targets fetch while the seed runs.
    streams: streams::Streams,
    /// When housekeeping is due next.
    housekeeping_at: Time,
    /// Each unfinished job's bound, computed a slice at a time (see `export_metrics`).
    bounds: std::collections::HashMap<String, export::BoundScan>,
    /// The jobs with targets not wanted yet, in the order of their Distributes: taken
    /// [`State::wants_per_turn`] targets at a time (see `State::want_some`).
    wanting: std::collections::VecDeque<std::sync::Arc<str>>,
    /// [`WANTS_PER_TURN`], but in tests.
    wants_per_turn: usize,
    /// How long each timer turn stalls on top of its work (`Fault::SlowTimers`).
    #[cfg(test)]
    slow_timers: Duration,
    secrets: secrets::Secrets,
    vetting: vetting::Vetting,
    /// Blobs with waiting targets and no whole copy, watched for progress.
    stranded: stranded::Stranded,
    /// The queue to the database writer: the durable owners keep their own handle; this one
    /// tells how far behind the disk is.
    writer: Writer,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("jobs", &self.jobs.len())
            .finish_non_exhaustive()
    }
}

/// The keys after page token `token` (a key from the previous page; every key if empty), as
/// a range of an index in key order.
fn after_token(token: &str) -> (std::ops::Bound<&str>, std::ops::Bound<&str>) {
    use std::ops::Bound;
    let from = if token.is_empty() {
        Bound::Unbounded
    } else {
        Bound::Excluded(token)
    };
    (from, Bound::Unbounded)
}

/// One page of `items`, already in the order of their keys and after the page token (a key
/// from the previous page): at most `size` (0 = 100), taking only the page and one more
/// item. Returns the page and the token for the next one (empty when none is left). Keys
/// are stable, so inserts between pages skip or repeat nothing.
fn page_in_order<K: AsRef<str>, T>(
    mut items: impl Iterator<Item = (K, T)>,
    size: u32,
) -> (Vec<T>, String) {
    let size = if size == 0 { 100 } else { size as usize };
    let page: Vec<(K, T)> = items.by_ref().take(size).collect();
    let next = match (items.next(), page.last()) {
        (Some(_), Some((key, _))) => key.as_ref().to_string(),
        _ => String::new(),
    };
    (page.into_iter().map(|(_, t)| t).collect(), next)
}

fn db_error(e: DbError) -> ApiError {
    ApiError::Internal(e.to_string())
}

/// Writes queued past this refuse what a user asks that needs one (UNAVAILABLE), rather
/// than queue without bound behind a stuck disk. Agents' reports are never refused.
const MAX_QUEUED_WRITES: usize = 10_000;

/// A [`Then`] that answers `reply` with `value` once its write is stored, or INTERNAL with
/// the write's error, naming `what`.
fn when_stored<T: Send + 'static>(reply: Reply<T>, value: T, what: String) -> Then {
    Box::new(move |stored: Result<(), DbError>| {
        let answer = stored
            .map(|()| value)
            .map_err(|e| ApiError::Internal(format!("{what}: {e}")));
        let _ = reply.send(answer);
    })
}

impl State {
    /// Loads the catalog, the jobs, the order-id counter and the agents' secrets, and hands
    /// the database to a new writer thread, which [`Stopped`] watches; agents named by
    /// unfinished jobs are expected back within a lease.
    pub fn new(
        config: StateConfig,
        db: Db,
        ca: Arc<ClusterCa>,
        now: Now,
    ) -> Result<(Self, Stopped), ApiError> {
        let db = Arc::new(db);
        let (writer, stopped) = Writer::spawn(db.clone())
            .map_err(|e| ApiError::Internal(format!("starting the state writer: {e}")))?;
        let stranded = stranded::Stranded::new(now.mono + config.lease);
        let mut assigner = Assigner::new(config.assigner.clone(), config.seed);
        let catalog = catalog::Catalog::load(&db, writer.clone()).map_err(db_error)?;
        for m in catalog.manifests() {
            assigner.handle(now.mono, catalog::known_event(m));
        }
        let jobs = jobs::Jobs::load(&db, writer.clone()).map_err(db_error)?;
        let orders = orders::Orders::load(&db, writer.clone(), now.wall).map_err(db_error)?;
        let secrets = secrets::Secrets::load(&db, writer.clone()).map_err(db_error)?;
        // The writer's is the last handle: the file closes when it ends.
        drop(db);
        let mut state = Self {
            seeder: Seeder::new(config.seeder.clone()),
            config,
            ca,
            assigner,
            agents: Default::default(),
            catalog,
            jobs,
            orders,
            origins: BTreeMap::new(),
            streams: streams::Streams::default(),
            housekeeping_at: now.mono,
            bounds: Default::default(),
            wanting: Default::default(),
            wants_per_turn: WANTS_PER_TURN,
            #[cfg(test)]
            slow_timers: Duration::ZERO,
            secrets,
            vetting: Default::default(),
            stranded,
            writer,
        };
        state.agents.expect(state.jobs.open_agents(), now);
        tracing::info!(
            blobs = state.catalog.len(),
            jobs = state.jobs.len(),
            "state loaded"
        );
        Ok((state, stopped))
    }

    /// UNAVAILABLE if the writer is too far behind to take a user's write.
    fn writer_has_room(&self) -> Result<(), ApiError> {
        let queued = self.writer.queued();
        if queued >= MAX_QUEUED_WRITES {
            return Err(ApiError::Unavailable(format!(
                "the coordinator's state database is {queued} writes behind (a slow or stuck disk): try again later"
            )));
        }
        Ok(())
    }

    /// Handles one request, as one planner batch: a job's targets, or a report that
    /// re-plans many downloads, give each download one order with its final sources.
    pub fn step(&mut self, request: Request, now: Now) {
        self.step_many([request], || now);
    }

    /// Handles several requests as one planner batch (each at the time `now` gives when
    /// its turn comes): a download re-planned by several of them gets one command with its
    /// final sources, and the commands go out once, after the last.
    pub fn step_many(
        &mut self,
        requests: impl IntoIterator<Item = Request>,
        now: impl Fn() -> Now,
    ) {
        self.assigner.begin_batch();
        let mut at = None;
        for request in requests {
            let t = now();
            self.handle(request, t);
            at = Some(t);
        }
        self.assigner.end_batch();
        if let Some(t) = at {
            self.drive(t);
        }
    }

    /// Runs what is due by `now`: the planner's timers, and housekeeping.
    pub fn handle_timeout(&mut self, now: Now) {
        #[cfg(test)]
        std::thread::sleep(self.slow_timers);
        self.assigner.begin_batch();
        self.want_some(now);
        if self.assigner.poll_timeout().is_some_and(|t| t <= now.mono) {
            self.assigner.handle_timeout(now.mono);
        }
        if self.seeder.poll_timeout().is_some_and(|t| t <= now.mono) {
            self.seeder.handle_timeout(now.mono);
        }
        if self.housekeeping_at <= now.mono {
            self.housekeeping_at = now.mono + HOUSEKEEPING;
            self.housekeeping(now);
        }
        self.assigner.end_batch();
        self.drive(now);
    }

    /// Fetch orders sent to agents so far.
    pub fn orders_sent(&self) -> u64 {
        self.agents.orders_sent()
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Time {
        [
            self.assigner.poll_timeout(),
            self.seeder.poll_timeout(),
            Some(self.housekeeping_at),
            (!self.wanting.is_empty()).then_some(Time::ZERO),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.housekeeping_at)
    }

    fn handle(&mut self, request: Request, now: Now) {
        match request {
            Request::Join(req, reply) => self.join(req, now, reply),
            Request::OpenSession { hello, tx, reply } => {
                let _ = reply.send(self.open_session(hello, tx, now));
            }
            Request::FromAgent { session, msg } => self.on_agent_message(session, msg, now),
            Request::SessionClosed { session } => self.session_closed(session, now),
            Request::Distribute(req, submitted, reply) => {
                self.distribute(req, submitted, now, reply)
            }
            Request::GetJob(req, reply) => {
                let _ = reply.send(self.jobs.get_pb(req, now.wall));
            }
            Request::WatchJob(req, reply) => {
                let _ = reply.send(self.jobs.watch(req, now.wall));
            }
            Request::CancelJob(req, owner, reply) => self.cancel_job(req, owner, now, reply),
            Request::ListJobs(req, reply) => {
                let _ = reply.send(Ok(self.jobs.list(req, now.wall)));
            }
            Request::ListAgents(req, reply) => {
                let (catalog, vetting) = (&self.catalog, &self.vetting);
                let list = self.agents.list(
                    req,
                    |h| catalog.counts_for(h),
                    |id| vetting.quarantined(id).unwrap_or_default().to_string(),
                );
                let _ = reply.send(Ok(list));
            }
            Request::ListBlobs(req, reply) => {
                let _ = reply.send(Ok(self.catalog.list(req)));
            }
            Request::GetBlob(req, reply) => {
                let _ = reply.send(self.get_blob(req));
            }
            Request::ResolveUrl(req, reply) => {
                let _ = reply.send(self.resolve_url(req, now));
            }
            Request::RenewCertificate {
                agent_id,
                csr_der,
                reply,
            } => {
                let _ = reply.send(self.renew_certificate(&agent_id, &csr_der, now));
            }
            Request::RemoveBlob(req, reply) => self.remove_blob(req, now, reply),
            Request::DrainAgent(req, reply) => {
                let _ = reply.send(self.drain_agent(req, now));
            }
            Request::RemoveAgent(req, reply) => {
                let _ = reply.send(self.remove_agent(req, now));
            }
            Request::Ping(reply) => {
                let _ = reply.send(());
            }
            #[cfg(test)]
            Request::Fault(Fault::Stall(d)) => std::thread::sleep(d),
            #[cfg(test)]
            Request::Fault(Fault::Panic) => panic!("a fault injected by a test"),
            #[cfg(test)]
            Request::Fault(Fault::Burst(hosts, reply)) => {
                let blob = shoal_planner::BlobId(shoal_proto::Digest::of(b"burst"));
                // Hosts that never joined, numbered past the tests' agents (host ids are
                // dense: the planner keeps its hosts in a vector indexed by them).
                for host in 0..hosts {
                    let want = shoal_planner::Event::Want {
                        blob,
                        host: HostId(1_000 + host),
                        priority: 0,
                    };
                    self.assigner.handle(now.mono, want);
                }
                let _ = reply.send(());
            }
            #[cfg(test)]
            Request::Fault(Fault::QueuedWants(reply)) => {
                let _ = reply.send(self.assigner.queued_wants());
            }
            #[cfg(test)]
            Request::Fault(Fault::SlowTimers(stall)) => self.slow_timers = stall,
        }
    }

    /// Leases, deadlines, watchers, job writes, old jobs, metrics.
    fn housekeeping(&mut self, now: Now) {
        self.expire_leases(now);
        for job_id in self.jobs.confirm() {
            tracing::error!(job = %job_id, "a new job could not be stored: dropped (its caller was told)");
            let ended = self.jobs.discard(&job_id, now.wall);
            self.unwant_ended(&job_id, ended, now);
        }
        let expired = (self.jobs).expire_deadlines(&self.catalog.holding(), now.wall);
        for (job_id, ended) in expired {
            self.unwant_ended(&job_id, ended, now);
        }
        self.jobs.push_watchers(now.wall);
        self.jobs.flush(now.wall);
        self.jobs.forget_old(self.config.job_retention, now.wall);
        self.vetting.expire(now.mono);
        self.fail_stranded(now);
        self.export_metrics();
    }
}

#[cfg(test)]
pub(crate) mod tests;
