//! The jobs: their records and targets, which jobs want which blob on which agent, who
//! watches them, and their persistence (`jobs/stored.rs`). Every target transition goes
//! through a method here (see [`Transition`]); each says what the planner must hear of.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::SystemTime;

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, FailureReason, JobState};
use tokio::sync::mpsc;

use super::job::{Job, TargetKey, Transition};
use super::{ApiError, WatchRx};
use crate::db::{Db, Write};
use crate::writer::{Then, Writer};

mod stored;
use stored::Unconfirmed;

struct Watcher {
    tx: mpsc::Sender<Result<pb::JobProgress, tonic::Status>>,
    with_targets: bool,
    sent_version: u64,
}

/// Targets a job's periodic flush scans at most (see [`Job::record_some_changes`]): a
/// 20,000-target job's changes are written in eight flushes, 2 s, at most ~3 ms each.
const FLUSH_SLICE: usize = 2_500;

pub struct Jobs {
    writer: Writer,
    jobs: BTreeMap<String, Job>,
    /// Every job's id by its place in ListJobs' order ([`list_key`]).
    by_age: BTreeMap<String, String>,
    /// The unfinished jobs with a target of each blob.
    by_blob: BTreeMap<Digest, BTreeSet<String>>,
    /// Which jobs want (host, blob): the planner is told once, when the first one does,
    /// and again when the last one stops.
    wants: BTreeMap<(HostId, Digest), BTreeSet<String>>,
    watchers: HashMap<String, Vec<Watcher>>,
    /// Jobs changed since the last write.
    dirty: BTreeSet<String>,
    unconfirmed: Vec<Unconfirmed>,
    /// [`FLUSH_SLICE`], but in tests.
    flush_slice: usize,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs")
            .field("jobs", &self.jobs.len())
            .field("wants", &self.wants.len())
            .finish_non_exhaustive()
    }
}

/// A job's targets were ended by the job (cancel, deadline): the planner stops planning
/// those of them no other job wants.
pub type Ended = Vec<(String, Digest)>;

impl Jobs {
    pub fn load(db: &Db, writer: Writer) -> Result<Self, crate::db::DbError> {
        let mut jobs = Self {
            writer,
            jobs: BTreeMap::new(),
            by_age: BTreeMap::new(),
            by_blob: BTreeMap::new(),
            wants: BTreeMap::new(),
            watchers: HashMap::new(),
            dirty: BTreeSet::new(),
            unconfirmed: Vec::new(),
            flush_slice: FLUSH_SLICE,
        };
        for record in db.jobs()? {
            if let Some(job) = Job::from_pb(record) {
                jobs.insert(job);
            }
        }
        Ok(jobs)
    }

    fn index(&mut self, job: &Job) {
        if job.is_terminal() {
            return;
        }
        for blob in job.blobs() {
            (self.by_blob.entry(blob).or_default()).insert(job.id().to_string());
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Tests only: a periodic flush scans `n` targets of a job at most.
    #[cfg(test)]
    pub fn set_flush_slice(&mut self, n: usize) {
        self.flush_slice = n;
    }

    /// Job `id`'s next target not wanted yet, built if it was not (see [`Job::want_next`]):
    /// its host, blob and whether it is open. `None` once all are wanted, or if the job is
    /// gone or has ended.
    pub fn want_next(
        &mut self,
        id: &str,
        held: &dyn Fn(HostId, Digest) -> bool,
        now: SystemTime,
    ) -> Option<(HostId, Digest, bool)> {
        let job = self.jobs.get_mut(id).filter(|j| !j.is_terminal())?;
        let before = job.version();
        let next = job.want_next(held);
        self.built(id, before, now);
        next
    }

    /// Whether job `id` has targets to want (it exists and has not ended).
    pub fn wants_more(&self, id: &str) -> bool {
        (self.jobs.get(id)).is_some_and(|j| j.wants_more() && !j.is_terminal())
    }

    /// Builds every target of job `id` not built yet; they are wanted in their turn.
    fn build_all(&mut self, id: &str, held: &dyn Fn(HostId, Digest) -> bool, now: SystemTime) {
        let Some(job) = self.jobs.get_mut(id).filter(|j| !j.is_terminal()) else {
            return;
        };
        let before = job.version();
        while job.build_next(held) {}
        self.built(id, before, now);
    }

    /// Targets of job `id` were built: stored if one was built done (its job's version
    /// was `before`), and the job ends if that was its last.
    fn built(&mut self, id: &str, before: u64, now: SystemTime) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.version() != before {
            self.dirty.insert(id.to_string());
        }
        if job.refresh_state(now) {
            self.dirty.insert(id.to_string());
            self.ended(id);
        }
    }

    pub fn get(&self, id: &str) -> Result<&Job, ApiError> {
        if id.is_empty() {
            return Err(ApiError::InvalidArgument("job_id is required".into()));
        }
        self.jobs
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("job {id:?} does not exist")))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// The agents that unfinished jobs have targets on.
    pub fn open_agents(&self) -> BTreeSet<String> {
        (self.jobs.values())
            .filter(|j| !j.is_terminal())
            .flat_map(|j| j.keys().map(|(agent, _, _)| agent.to_string()))
            .collect()
    }

    /// Adds a new job and queues its write; `then` runs once it is stored. If it cannot be
    /// written, [`Jobs::confirm`] hands it back to be dropped.
    pub fn create(&mut self, mut job: Job, now: SystemTime, then: Then) {
        let id = job.id().to_string();
        let write = Write::Jobs(vec![job.record_whole(now)]);
        let ticket = self.writer.write_ticket(write, Some(then));
        self.unconfirmed.push(Unconfirmed::create(id, ticket));
        self.insert(job);
    }

    fn insert(&mut self, job: Job) {
        self.index(&job);
        self.by_age.insert(list_key(&job), job.id().to_string());
        self.jobs.insert(job.id().to_string(), job);
    }

    /// Forgets job `id` (its wants are the caller's to have ended).
    fn remove(&mut self, id: &str) {
        if let Some(job) = self.jobs.remove(id) {
            self.by_age.remove(&list_key(&job));
        }
    }

    // ---- wants ----

    /// `job` wants `blob` on `host`; true if it is the first job to.
    pub fn want(&mut self, job: &str, host: HostId, blob: Digest) -> bool {
        let jobs = self.wants.entry((host, blob)).or_default();
        let first = jobs.is_empty();
        jobs.insert(job.to_string());
        first
    }

    /// `job` no longer wants `blob` on `host`; true if no job does any more.
    pub fn unwant(&mut self, job: &str, host: HostId, blob: Digest) -> bool {
        let Some(jobs) = self.wants.get_mut(&(host, blob)) else {
            return false;
        };
        if !jobs.remove(job) {
            return false;
        }
        if jobs.is_empty() {
            self.wants.remove(&(host, blob));
            return true;
        }
        false
    }

    pub fn is_wanted(&self, host: HostId, blob: Digest) -> bool {
        self.wants.contains_key(&(host, blob))
    }

    /// The jobs that want `blob` on `host`.
    pub fn wanting(&self, host: HostId, blob: Digest) -> impl Iterator<Item = &str> {
        (self.wants.get(&(host, blob)).into_iter()).flat_map(|j| j.iter().map(String::as_str))
    }

    /// The highest priority among the jobs that want `blob` on `host`.
    pub fn priority(&self, host: HostId, blob: Digest) -> i32 {
        (self.wanting(host, blob))
            .filter_map(|j| self.jobs.get(j))
            .map(|j| j.record.priority)
            .max()
            .unwrap_or(pb::Priority::Normal as i32)
    }

    /// Blobs some unfinished job has a target of, each with whether one of those jobs
    /// names an origin for it.
    pub fn open_blobs(&self) -> impl Iterator<Item = (Digest, bool)> + '_ {
        self.by_blob.iter().map(|(blob, ids)| {
            let origin = ids.iter().any(|id| self.origin(id, blob).is_some());
            (*blob, origin)
        })
    }

    /// The hosts some job wants `blob` on. Looks at every want: for rare events.
    pub fn hosts_wanting(&self, blob: &Digest) -> Vec<HostId> {
        (self.wants.keys())
            .filter(|(_, b)| b == blob)
            .map(|(h, _)| *h)
            .collect()
    }

    /// The origin a job recorded for `blob`, if any.
    pub fn origin(&self, job: &str, blob: &Digest) -> Option<pb::Origin> {
        (self.jobs.get(job))
            .and_then(|j| j.record.origins.get(&blob.to_string()))
            .cloned()
    }

    // ---- transitions ----

    /// Applies `t` to the target (agent, blob) of every job that wants `blob` on `host`.
    fn apply_wanting(
        &mut self,
        agent: &str,
        host: HostId,
        blob: Digest,
        t: Transition<'_>,
        now: SystemTime,
        durable: bool,
    ) {
        let key = (agent.to_string(), blob);
        let ids: Vec<String> = self.wanting(host, blob).map(str::to_string).collect();
        for id in ids {
            self.apply(&id, &key, t, now, durable);
        }
    }

    fn apply(
        &mut self,
        id: &str,
        key: &TargetKey,
        t: Transition<'_>,
        now: SystemTime,
        durable: bool,
    ) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        let changed = job.apply(key, t, now);
        let ended = job.refresh_state(now);
        if ended {
            self.ended(id);
        }
        if durable && (changed || ended) {
            self.dirty.insert(id.to_string());
        }
    }

    /// A job became terminal: it no longer counts for its blobs.
    fn ended(&mut self, id: &str) {
        let Some(job) = self.jobs.get(id) else {
            return;
        };
        for blob in job.blobs() {
            if let Some(ids) = self.by_blob.get_mut(&blob) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_blob.remove(&blob);
                }
            }
        }
    }

    /// An order for (host, blob) went out: its pending targets run. Not durable (a restart
    /// makes running targets pending again).
    pub fn start(&mut self, agent: &str, host: HostId, blob: Digest, now: SystemTime) {
        self.apply_wanting(agent, host, blob, Transition::Start, now, false);
    }

    /// A seed order for `blob` went out: every pending target of it runs.
    pub fn start_blob(&mut self, blob: Digest, now: SystemTime) {
        self.apply_blob(blob, Transition::Start, now, false);
    }

    /// The blob's size is known now: every unfinished target of it shows it.
    pub fn set_size(&mut self, blob: Digest, size: u64, now: SystemTime) {
        for id in self.by_blob.get(&blob).into_iter().flatten() {
            if let Some(job) = self.jobs.get_mut(id) {
                job.set_rest_size(&blob, size);
            }
        }
        self.apply_blob(blob, Transition::SetTotal(size), now, true);
    }

    fn apply_blob(&mut self, blob: Digest, t: Transition<'_>, now: SystemTime, durable: bool) {
        let ids: Vec<String> = (self.by_blob.get(&blob).into_iter().flatten())
            .cloned()
            .collect();
        for id in ids {
            let keys: Vec<TargetKey> = (self.jobs.get(&id).into_iter())
                .flat_map(|j| j.targets().map(|(k, _)| k.clone()))
                .filter(|(_, b)| *b == blob)
                .collect();
            for key in keys {
                self.apply(&id, &key, t, now, durable);
            }
        }
    }

    /// Progress of (host, blob): its targets run, with these bytes and rate. Not durable.
    pub fn progress(
        &mut self,
        agent: &str,
        host: HostId,
        blob: Digest,
        bytes_done: u64,
        rate: u64,
        now: SystemTime,
    ) {
        let t = Transition::Progress { bytes_done, rate };
        self.apply_wanting(agent, host, blob, t, now, false);
    }

    /// The agent holds the whole blob: every job that wanted it there is done with it.
    /// True if any job wanted it (the planner's download is done).
    pub fn finish(&mut self, agent: &str, host: HostId, blob: Digest, now: SystemTime) -> bool {
        let key = (agent.to_string(), blob);
        let Some(ids) = self.wants.remove(&(host, blob)) else {
            return false;
        };
        for id in ids {
            self.apply(&id, &key, Transition::Finish, now, true);
        }
        true
    }

    /// (host, blob) cannot complete: the targets of every job that wants it fail. True if
    /// any job wanted it (the planner must stop planning it).
    pub fn fail(
        &mut self,
        agent: &str,
        host: HostId,
        blob: Digest,
        reason: FailureReason,
        message: &str,
        now: SystemTime,
    ) -> bool {
        let key = (agent.to_string(), blob);
        let Some(ids) = self.wants.remove(&(host, blob)) else {
            return false;
        };
        for id in ids {
            self.apply(&id, &key, Transition::Fail(reason, message), now, true);
        }
        true
    }

    /// The agent's lease expired: each of its unfinished targets, in every job, fails with
    /// AGENT_LOST. Works from the jobs, not from the wants, so it also covers targets loaded
    /// after a restart that were never wanted again, and those not built yet (a job with
    /// any of the agent's is built whole first, `held` telling which are done). Returns the
    /// (host, blob) pairs no job wants any more.
    pub fn lose_agent(
        &mut self,
        agent: &str,
        host: Option<HostId>,
        message: &str,
        held: &dyn Fn(HostId, Digest) -> bool,
        now: SystemTime,
    ) -> Vec<Digest> {
        let waiting: Vec<String> = (self.jobs.values())
            .filter(|j| !j.is_terminal() && j.waits_to_build(agent))
            .map(|j| j.id().to_string())
            .collect();
        for id in waiting {
            self.build_all(&id, held, now);
        }
        let mut open = Vec::new();
        for job in self.jobs.values().filter(|j| !j.is_terminal()) {
            for (key, t) in job.targets() {
                if key.0 == agent && !t.is_terminal() {
                    open.push((job.id().to_string(), key.clone()));
                }
            }
        }
        let mut unwanted = Vec::new();
        for (id, key) in open {
            let t = Transition::Fail(FailureReason::AgentLost, message);
            self.apply(&id, &key, t, now, true);
            if let Some(host) = host {
                if self.unwant(&id, host, key.1) {
                    unwanted.push(key.1);
                }
            }
        }
        unwanted
    }

    /// The agent (re)connected: the (job, blob) pairs unfinished jobs still need of it,
    /// targets it lost pending again.
    pub fn resume(&mut self, agent: &str) -> Vec<(String, Digest)> {
        let mut out = Vec::new();
        let mut changed = Vec::new();
        for job in self.jobs.values_mut().filter(|j| !j.is_terminal()) {
            let keys: Vec<TargetKey> = (job.targets())
                .filter(|((a, _), _)| a == agent)
                .map(|(k, _)| k.clone())
                .collect();
            let before = job.version();
            for key in keys {
                if job.resume(&key) {
                    out.push((job.id().to_string(), key.1));
                }
            }
            if job.version() != before {
                changed.push(job.id().to_string());
            }
        }
        self.dirty.extend(changed);
        out
    }

    /// Ends every unfinished target of a job (cancel: the job is cancelled; deadline: the
    /// targets fail), built first if they are not (`held` telling which are done). Returns
    /// the ended targets.
    fn end(
        &mut self,
        id: &str,
        cancel: bool,
        message: &str,
        held: &dyn Fn(HostId, Digest) -> bool,
        now: SystemTime,
    ) -> Ended {
        self.build_all(id, held, now);
        let Some(job) = self.jobs.get_mut(id) else {
            return Vec::new();
        };
        let open: Vec<TargetKey> = (job.targets())
            .filter(|(_, t)| !t.is_terminal())
            .map(|(k, _)| k.clone())
            .collect();
        for key in &open {
            let t = if cancel {
                Transition::Cancel(message)
            } else {
                Transition::Fail(FailureReason::DeadlineExceeded, message)
            };
            job.apply(key, t, now);
        }
        let ended = if cancel {
            job.set_state(JobState::Cancelled, now)
        } else {
            job.refresh_state(now)
        };
        if ended {
            self.ended(id);
        }
        self.dirty.insert(id.to_string());
        open
    }

    /// CancelJob: ends the job's unfinished targets. Returns its state, the ended targets,
    /// and whether it changed (then it must be stored before the answer: [`Jobs::store`]).
    pub fn cancel(
        &mut self,
        id: &str,
        owner: Option<&str>,
        reason: &str,
        held: &dyn Fn(HostId, Digest) -> bool,
        now: SystemTime,
    ) -> Result<(JobState, Ended, bool), ApiError> {
        let job = self.get(id)?;
        if let Some(owner) = owner
            && job.creator() != owner
        {
            return Err(ApiError::PermissionDenied(format!(
                "job {id} was created by {:?}: only its creator or an admin may cancel it",
                job.creator()
            )));
        }
        if job.is_terminal() {
            return Ok((job.state(), Vec::new(), false));
        }
        let reason = if reason.is_empty() {
            "cancelled"
        } else {
            reason
        };
        let ended = self.end(id, true, reason, held, now);
        Ok((self.get(id)?.state(), ended, true))
    }

    /// A job whose first write failed: its unfinished targets end (returned, for the
    /// planner) and it is forgotten, on disk too (a flush may have written it meanwhile).
    pub fn discard(&mut self, id: &str, now: SystemTime) -> Ended {
        // It is forgotten: whether a target not built yet would have been done matters not.
        let ended = self.end(id, true, "the job could not be stored", &|_, _| false, now);
        self.remove(id);
        self.dirty.remove(id);
        self.watchers.remove(id);
        self.writer.write(Write::ForgetJob(id.to_string()));
        ended
    }

    /// Jobs past their deadline: their unfinished targets fail with DEADLINE_EXCEEDED.
    pub fn expire_deadlines(
        &mut self,
        held: &dyn Fn(HostId, Digest) -> bool,
        now: SystemTime,
    ) -> Vec<(String, Ended)> {
        let expired: Vec<String> = (self.jobs.values())
            .filter(|j| !j.is_terminal() && j.deadline.is_some_and(|d| d <= now))
            .map(|j| j.id().to_string())
            .collect();
        (expired.into_iter())
            .map(|id| {
                let ended = self.end(&id, false, "deadline passed", held, now);
                (id, ended)
            })
            .collect()
    }

    // ---- watchers ----

    pub fn watch(
        &mut self,
        req: pb::WatchJobRequest,
        now: SystemTime,
    ) -> Result<WatchRx, ApiError> {
        let job = self.get(&req.job_id)?;
        let (tx, rx) = mpsc::channel(16);
        let first = job.progress(req.include_targets, 0, now);
        let version = job.version();
        let terminal = job.is_terminal();
        // The first message always fits: the channel is new.
        let _ = tx.try_send(Ok(first));
        if !terminal {
            self.watchers.entry(req.job_id).or_default().push(Watcher {
                tx,
                with_targets: req.include_targets,
                sent_version: version,
            });
        }
        Ok(rx)
    }

    /// Sends each watcher what changed; ends streams of finished jobs.
    pub fn push_watchers(&mut self, now: SystemTime) {
        let jobs = &self.jobs;
        self.watchers.retain(|job_id, watchers| {
            let Some(job) = jobs.get(job_id) else {
                return false;
            };
            watchers.retain_mut(|w| {
                if job.version() == w.sent_version && !job.is_terminal() {
                    return !w.tx.is_closed();
                }
                let update = job.progress(w.with_targets, w.sent_version, now);
                match w.tx.try_send(Ok(update)) {
                    Ok(()) => w.sent_version = job.version(),
                    Err(mpsc::error::TrySendError::Full(_)) => return true, // slow reader: next time
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
                !job.is_terminal()
            });
            !watchers.is_empty()
        });
    }

    // ---- reading ----

    pub fn get_pb(
        &self,
        req: pb::GetJobRequest,
        now: SystemTime,
    ) -> Result<pb::GetJobResponse, ApiError> {
        let job = self.get(&req.job_id)?;
        Ok(pb::GetJobResponse {
            job: Some(job.to_pb_redacted(req.include_targets, now)),
        })
    }

    /// A page of the jobs, most recent first, from their index: a page costs its own jobs,
    /// not a sort of every job kept (a week's, by default).
    pub fn list(&self, req: pb::ListJobsRequest, now: SystemTime) -> pb::ListJobsResponse {
        let jobs = (self
            .by_age
            .range::<str, _>(super::after_token(&req.page_token)))
        .filter_map(|(key, id)| Some((key, self.jobs.get(id)?)))
        .filter(|(_, j)| req.state == 0 || j.record.state == req.state);
        let (page, next_page_token) = super::page_in_order(jobs, req.page_size);
        pb::ListJobsResponse {
            jobs: (page.into_iter())
                .map(|j| j.to_pb_redacted(false, now))
                .collect(),
            next_page_token,
        }
    }
}

/// Where `job` goes in ListJobs' order, most recent first: the key inverts the creation
/// time, then the id breaks ties. It is also the page token.
fn list_key(job: &Job) -> String {
    let t = job.record.created_at.unwrap_or_default();
    let age = i64::MAX - t.seconds;
    format!("{age:020}{:09}{}", 999_999_999 - t.nanos.max(0), job.id())
}
