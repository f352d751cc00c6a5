//! Job operations: Distribute, Get/Watch/Cancel/List, and how agent events move targets.

use std::time::{Duration, SystemTime};

use shoal_planner::{Event, HostId};
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, AgentState, FailureReason, JobState, TargetState};
use tokio::sync::mpsc;

use super::{ApiError, State, WatchRx, Watcher};
use crate::jobs::{Job, Target};

impl State {
    pub(super) fn distribute(
        &mut self,
        req: pb::DistributeRequest,
        image: String,
    ) -> Result<pb::DistributeResponse, ApiError> {
        if req.blobs.is_empty() {
            return Err(ApiError::InvalidArgument(
                "blobs: at least one digest is required".into(),
            ));
        }
        let mut blobs = Vec::new();
        // Blobs that no agent holds whole, with the origin to seed them from.
        let mut origins = std::collections::BTreeMap::new();
        for key in req.origins.keys() {
            key.parse::<Digest>()
                .map_err(|e| ApiError::InvalidArgument(format!("origins: key {key:?}: {e}")))?;
        }
        for b in &req.blobs {
            let d: Digest = b
                .parse()
                .map_err(|e| ApiError::InvalidArgument(format!("blobs: {b:?}: {e}")))?;
            if blobs.contains(&d) {
                continue;
            }
            let held = self.catalog.complete_holders(&d) > 0;
            if !held {
                let origin = req.origins.get(&d.to_string()).ok_or_else(|| {
                    if self.catalog.manifest(&d).is_none() {
                        ApiError::NotFound(format!(
                            "blob {d} is not in the catalog: push it on an agent first, or give an origin"
                        ))
                    } else {
                        ApiError::FailedPrecondition(format!(
                            "blob {d}: no live agent holds it completely, and no origin was given"
                        ))
                    }
                })?;
                super::seeding::check_origin(&d, origin).map_err(ApiError::InvalidArgument)?;
                origins.insert(d, origin.clone());
            }
            blobs.push(d);
        }
        let targets = self.resolve(req.targets.as_ref())?;
        let now = SystemTime::now();
        let deadline = (req.deadline_ms > 0).then(|| now + Duration::from_millis(req.deadline_ms));
        let job_id = format!("job-{}", super::agents::random_hex(6));
        let record = pb::Job {
            job_id: job_id.clone(),
            state: JobState::Pending as i32,
            blobs: blobs.iter().map(|b| b.to_string()).collect(),
            targets: req.targets.clone(),
            priority: req.priority,
            deadline: deadline.map(Into::into),
            created_at: Some(now.into()),
            finished_at: None,
            description: req.description.clone(),
            image,
            progress: None,
            origins: (origins.iter())
                .map(|(d, o)| (d.to_string(), o.clone()))
                .collect(),
        };
        let mut job = Job::new(record, deadline);
        for host in &targets {
            let agent = self.agents.name(*host);
            for blob in &blobs {
                let size = self.catalog.manifest(blob).map_or(0, |m| m.size());
                let done = self.catalog.holds_complete(blob, *host);
                job.targets.insert(
                    (agent.clone(), *blob),
                    Target {
                        state: if done {
                            TargetState::Done
                        } else {
                            TargetState::Pending
                        },
                        reason: FailureReason::Unspecified,
                        message: String::new(),
                        bytes_done: if done { size } else { 0 },
                        bytes_total: size,
                        rate: 0,
                        version: 0,
                    },
                );
            }
        }
        job.refresh_state(now);
        let target_count = targets.len() as u32;
        self.jobs.insert(job_id.clone(), job);
        if let Err(e) = self.persist_now(&job_id) {
            self.jobs.remove(&job_id);
            return Err(e);
        }
        for host in targets {
            for blob in &blobs {
                if self.catalog.holds_complete(blob, host) {
                    continue;
                }
                match origins.get(blob) {
                    Some(origin) => self.wait_for_seed(&job_id, host, *blob, origin),
                    None => self.want(&job_id, host, *blob),
                }
            }
        }
        tracing::info!(job = %job_id, targets = target_count, blobs = blobs.len(), "job accepted");
        Ok(pb::DistributeResponse {
            job_id,
            target_count,
        })
    }

    /// The live agents a selector names. Unknown explicit ids are NotFound; an empty result
    /// is InvalidArgument (a job with no target would be "done" and mean nothing).
    fn resolve(&self, selector: Option<&pb::TargetSelector>) -> Result<Vec<HostId>, ApiError> {
        use pb::target_selector::Selector;
        let live = |a: &&super::agents::Agent| a.state == AgentState::Ready;
        let hosts: Vec<HostId> = match selector.and_then(|s| s.selector.as_ref()) {
            None => {
                return Err(ApiError::InvalidArgument(
                    "targets: a selector (all, labels or agents) is required".into(),
                ));
            }
            Some(Selector::All(_)) => self.agents.iter().filter(live).map(|a| a.host).collect(),
            Some(Selector::Labels(l)) => self
                .agents
                .iter()
                .filter(live)
                .filter(|a| {
                    l.match_labels
                        .iter()
                        .all(|(k, v)| a.labels.get(k) == Some(v))
                })
                .map(|a| a.host)
                .collect(),
            Some(Selector::Agents(list)) => {
                let mut out = Vec::new();
                for id in &list.agent_ids {
                    let host = self.agents.host_of(id).filter(|h| {
                        self.agents
                            .get(*h)
                            .is_some_and(|a| a.state != AgentState::Gone)
                    });
                    match host {
                        Some(h) if !out.contains(&h) => out.push(h),
                        Some(_) => {}
                        None => {
                            return Err(ApiError::NotFound(format!("agent {id:?} is not known")));
                        }
                    }
                }
                out
            }
        };
        if hosts.is_empty() {
            return Err(ApiError::InvalidArgument(
                "targets: the selector matches no live agent".into(),
            ));
        }
        Ok(hosts)
    }

    pub(super) fn want(&mut self, job_id: &str, host: HostId, blob: Digest) {
        let jobs = self.wants.entry((host, blob)).or_default();
        let first = jobs.is_empty();
        jobs.insert(job_id.to_string());
        if first {
            let now = self.now();
            let priority = self.jobs.get(job_id).map_or(0, |j| j.record.priority);
            self.assigner.handle(
                now,
                Event::Want {
                    blob: blob.into(),
                    host,
                    priority,
                },
            );
        }
    }

    fn unwant(&mut self, job_id: &str, host: HostId, blob: Digest) {
        let Some(jobs) = self.wants.get_mut(&(host, blob)) else {
            return;
        };
        jobs.remove(job_id);
        if jobs.is_empty() {
            self.wants.remove(&(host, blob));
            let now = self.now();
            self.assigner.handle(
                now,
                Event::Unwant {
                    blob: blob.into(),
                    host,
                },
            );
        }
    }

    pub(super) fn mark_running(&mut self, host: HostId, blob: Digest) {
        let agent = self.agents.name(host);
        for job_id in self.wants.get(&(host, blob)).cloned().unwrap_or_default() {
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.update(&(agent.clone(), blob), |t| {
                    if t.state == TargetState::Pending {
                        t.state = TargetState::Running;
                    }
                });
                // Running is not durable (a restart resets it to pending): no write.
                job.refresh_state(SystemTime::now());
            }
        }
    }

    pub(super) fn fail_targets(
        &mut self,
        host: HostId,
        blob: Digest,
        reason: FailureReason,
        message: &str,
    ) {
        let agent = self.agents.name(host);
        for job_id in self.wants.get(&(host, blob)).cloned().unwrap_or_default() {
            self.unwant(&job_id, host, blob);
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            job.update(&(agent.clone(), blob), |t| {
                t.state = TargetState::Failed;
                t.reason = reason;
                t.message = message.to_string();
                t.rate = 0;
            });
            job.refresh_state(SystemTime::now());
            self.persist(&job_id);
        }
    }

    /// The agent's lease expired: each of its unfinished targets, in every job, fails with
    /// AGENT_LOST (see `jobs.rs` for the rule). Works from the jobs, not from `wants`, so it
    /// also covers targets loaded after a restart that were never wanted again.
    pub(super) fn fail_agent_targets(&mut self, agent: &str, message: &str) {
        let host = self.agents.host_of(agent);
        let now = SystemTime::now();
        let mut changed = Vec::new();
        for job in self.jobs.values_mut().filter(|j| !j.is_terminal()) {
            let open: Vec<_> = (job.targets.iter())
                .filter(|((a, _), t)| a == agent && !t.is_terminal())
                .map(|(k, _)| k.clone())
                .collect();
            for key in &open {
                job.update(key, |t| {
                    t.state = TargetState::Failed;
                    t.reason = FailureReason::AgentLost;
                    t.message = message.to_string();
                    t.rate = 0;
                });
            }
            if !open.is_empty() {
                job.refresh_state(now);
                changed.push((job.id().to_string(), open));
            }
        }
        for (job_id, keys) in changed {
            if let Some(host) = host {
                for (_, blob) in keys {
                    self.unwant(&job_id, host, blob);
                }
            }
            self.persist(&job_id);
        }
    }

    /// An agent (re)connected: want again what unfinished jobs still need from it, including
    /// targets that failed because it was lost.
    pub(super) fn resume_targets(&mut self, host: HostId) {
        let agent = self.agents.name(host);
        let mut wanted = Vec::new();
        for job in self.jobs.values_mut().filter(|j| !j.is_terminal()) {
            let keys: Vec<_> = job
                .targets
                .keys()
                .filter(|(a, _)| *a == agent)
                .cloned()
                .collect();
            for key in keys {
                let resumable = job.targets.get(&key).is_some_and(|t| {
                    matches!(t.state, TargetState::Pending | TargetState::Running)
                        || (t.state == TargetState::Failed && t.reason == FailureReason::AgentLost)
                });
                if resumable {
                    job.update(&key, |t| {
                        if t.state == TargetState::Failed {
                            t.state = TargetState::Pending;
                            t.reason = FailureReason::Unspecified;
                            t.message.clear();
                        }
                    });
                    wanted.push((job.id().to_string(), key.1));
                }
            }
        }
        for (job_id, blob) in wanted {
            let held = self.catalog.complete_holders(&blob) > 0;
            if self.catalog.holds_complete(&blob, host) {
                self.blob_done(host, blob);
            } else if let Some(origin) = (!held).then(|| self.job_origin(&job_id, &blob)).flatten()
            {
                // Nobody holds it (yet, or any more, e.g. after a coordinator restart).
                self.wait_for_seed(&job_id, host, blob, &origin);
            } else {
                self.want(&job_id, host, blob);
            }
        }
    }

    pub(super) fn expire_deadlines(&mut self) {
        let now = SystemTime::now();
        let expired: Vec<String> = self
            .jobs
            .values()
            .filter(|j| !j.is_terminal() && j.deadline.is_some_and(|d| d <= now))
            .map(|j| j.id().to_string())
            .collect();
        for job_id in expired {
            self.end_targets(
                &job_id,
                TargetState::Failed,
                FailureReason::DeadlineExceeded,
                "deadline passed",
            );
        }
    }

    /// Ends every unfinished target of a job (cancel, deadline).
    fn end_targets(
        &mut self,
        job_id: &str,
        state: TargetState,
        reason: FailureReason,
        message: &str,
    ) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        let open: Vec<_> = job
            .targets
            .iter()
            .filter(|(_, t)| !t.is_terminal())
            .map(|(k, _)| k.clone())
            .collect();
        for key in &open {
            job.update(key, |t| {
                t.state = state;
                t.reason = reason;
                t.message = message.to_string();
                t.rate = 0;
            });
        }
        let now = SystemTime::now();
        if state == TargetState::Cancelled {
            job.set_state(JobState::Cancelled, now);
        } else {
            job.refresh_state(now);
        }
        for (agent, blob) in open {
            if let Some(host) = self.agents.host_of(&agent) {
                self.unwant(job_id, host, blob);
            }
        }
        self.persist(job_id);
    }

    pub(super) fn get_job(&self, req: pb::GetJobRequest) -> Result<pb::GetJobResponse, ApiError> {
        let job = self.job(&req.job_id)?;
        Ok(pb::GetJobResponse {
            job: Some(job.to_pb(req.include_targets, SystemTime::now())),
        })
    }

    fn job(&self, id: &str) -> Result<&Job, ApiError> {
        if id.is_empty() {
            return Err(ApiError::InvalidArgument("job_id is required".into()));
        }
        self.jobs
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("job {id:?} does not exist")))
    }

    pub(super) fn watch_job(&mut self, req: pb::WatchJobRequest) -> Result<WatchRx, ApiError> {
        let job = self.job(&req.job_id)?;
        let (tx, rx) = mpsc::channel(16);
        let first = job.progress(req.include_targets, 0, SystemTime::now());
        let version = job.version;
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
    pub(super) fn push_watchers(&mut self) {
        let now = SystemTime::now();
        let jobs = &self.jobs;
        self.watchers.retain(|job_id, watchers| {
            let Some(job) = jobs.get(job_id) else {
                return false;
            };
            watchers.retain_mut(|w| {
                if job.version == w.sent_version && !job.is_terminal() {
                    return !w.tx.is_closed();
                }
                let update = job.progress(w.with_targets, w.sent_version, now);
                match w.tx.try_send(Ok(update)) {
                    Ok(()) => w.sent_version = job.version,
                    Err(mpsc::error::TrySendError::Full(_)) => return true, // slow reader: next tick
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                }
                !job.is_terminal()
            });
            !watchers.is_empty()
        });
    }

    pub(super) fn cancel_job(
        &mut self,
        req: pb::CancelJobRequest,
    ) -> Result<pb::CancelJobResponse, ApiError> {
        let job = self.job(&req.job_id)?;
        if !job.is_terminal() {
            let reason = if req.reason.is_empty() {
                "cancelled".to_string()
            } else {
                req.reason
            };
            self.end_targets(
                &req.job_id,
                TargetState::Cancelled,
                FailureReason::Cancelled,
                &reason,
            );
            self.persist_now(&req.job_id)?;
        }
        Ok(pb::CancelJobResponse {
            state: self.job(&req.job_id)?.record.state,
        })
    }

    pub(super) fn list_jobs(&self, req: pb::ListJobsRequest) -> pb::ListJobsResponse {
        let now = SystemTime::now();
        // Most recent first: the key inverts the creation time, then the id breaks ties.
        let jobs = (self.jobs.values())
            .filter(|j| req.state == 0 || j.record.state == req.state)
            .map(|j| {
                let t = j.record.created_at.unwrap_or_default();
                let age = i64::MAX - t.seconds;
                let key = format!("{age:020}{:09}{}", 999_999_999 - t.nanos.max(0), j.id());
                (key, j)
            })
            .collect();
        let (page, next_page_token) = super::page(jobs, req.page_size, &req.page_token);
        pb::ListJobsResponse {
            jobs: page.into_iter().map(|j| j.to_pb(false, now)).collect(),
            next_page_token,
        }
    }

    /// Marks a job for writing at the next tick. Agent-driven changes are batched so a job
    /// with many targets is written a few times a second, not once per target; what a crash
    /// loses in between, the agents' inventories restore.
    pub(super) fn persist(&mut self, job_id: &str) {
        self.dirty.insert(job_id.to_string());
    }

    /// Writes a job now: for what a user asked (Distribute, CancelJob), which must not be
    /// acknowledged unless it is durable.
    pub(super) fn persist_now(&mut self, job_id: &str) -> Result<(), ApiError> {
        self.dirty.remove(job_id);
        let Some(job) = self.jobs.get(job_id) else {
            return Ok(());
        };
        self.db
            .put_job(&job.to_pb(true, SystemTime::now()))
            .map_err(|e| ApiError::Internal(format!("storing job {job_id}: {e}")))
    }

    /// Drops jobs that ended longer than the retention ago, from memory and disk, so a
    /// long-running coordinator does not grow without bound.
    pub(super) fn forget_old_jobs(&mut self) {
        let Some(cutoff) = SystemTime::now().checked_sub(self.config.job_retention) else {
            return;
        };
        let old: Vec<String> = (self.jobs.values())
            .filter(|j| j.is_terminal())
            .filter(|j| {
                (j.record.finished_at)
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .is_some_and(|t| t <= cutoff)
            })
            .map(|j| j.id().to_string())
            .collect();
        for job_id in old {
            match self.db.delete_job(&job_id) {
                Ok(()) => {
                    self.jobs.remove(&job_id);
                    self.dirty.remove(&job_id);
                }
                Err(e) => tracing::error!(job = %job_id, error = %e, "deleting an old job failed"),
            }
        }
    }

    pub(super) fn flush_jobs(&mut self) {
        for job_id in std::mem::take(&mut self.dirty) {
            if let Err(e) = self.persist_now(&job_id) {
                tracing::error!(job = %job_id, error = %e, "persisting job failed; retrying");
                self.dirty.insert(job_id);
            }
        }
    }
}
