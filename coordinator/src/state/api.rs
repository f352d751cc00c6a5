//! The public API's requests that change or read more than one owner: Distribute,
//! CancelJob, GetBlob, ResolveUrl. (GetJob, WatchJob, ListJobs, ListAgents and ListBlobs
//! are answered by their owner directly.)

use std::time::Duration;

use shoal_planner::{HostId, UrlAnswer, UrlKey};
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, AgentState, JobState};

use super::job::{Job, Rest};
use super::{ApiError, Now, Reply, State, Submitted, when_stored};

/// Checks an origin given by a user; returns a message for INVALID_ARGUMENT.
pub fn check_origin(blob: &Digest, origin: &pb::Origin) -> Result<(), String> {
    use pb::origin::Origin as O;
    match &origin.origin {
        None => Err(format!("origins[{blob}]: no origin kind is set")),
        Some(O::Http(h)) if h.size > shoal_proto::MAX_BLOB_SIZE => Err(format!(
            "origins[{blob}]: size {} is over the largest blob ({} bytes)",
            h.size,
            shoal_proto::MAX_BLOB_SIZE
        )),
        Some(O::Oci(o)) if o.size > shoal_proto::MAX_BLOB_SIZE => Err(format!(
            "origins[{blob}]: size {} is over the largest blob ({} bytes)",
            o.size,
            shoal_proto::MAX_BLOB_SIZE
        )),
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

impl State {
    /// Distribute: the job is planned at once and answered once it is stored. Its targets
    /// are built as they are wanted, a few thousand a turn ([`State::want_some`]), the
    /// first now.
    pub(super) fn distribute(
        &mut self,
        req: pb::DistributeRequest,
        submitted: Submitted,
        now: Now,
        reply: Reply<pb::DistributeResponse>,
    ) {
        let (job, hosts, blobs) = match self.new_job(req, submitted, now) {
            Ok(accepted) => accepted,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let job_id = job.id().to_string();
        let response = pb::DistributeResponse {
            job_id: job_id.clone(),
            target_count: hosts as u32,
        };
        let what = format!("storing job {job_id}");
        self.jobs
            .create(job, now.wall, when_stored(reply, response, what));
        tracing::info!(job = %job_id, targets = hosts, blobs, "job accepted");
        // The job's record is with the writer already.
        self.wanting.push_back(job_id.as_str().into());
        self.want_some(now);
    }

    /// Checks a Distribute and makes its job, its targets planned, not built; with how many
    /// agents and blobs it has.
    fn new_job(
        &mut self,
        req: pb::DistributeRequest,
        submitted: Submitted,
        now: Now,
    ) -> Result<(Job, usize, usize), ApiError> {
        self.writer_has_room()?;
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
                check_origin(&d, origin).map_err(ApiError::InvalidArgument)?;
                origins.insert(d, origin.clone());
            }
            blobs.push(d);
        }
        let targets = self.resolve(req.targets.as_ref())?;
        let count = (targets.len() as u64).saturating_mul(blobs.len() as u64);
        if count > self.config.max_targets_per_job {
            return Err(ApiError::InvalidArgument(format!(
                "{} agents × {} blobs = {count} targets, over the coordinator's max_targets_per_job ({}): split the job",
                targets.len(),
                blobs.len(),
                self.config.max_targets_per_job
            )));
        }
        let deadline =
            (req.deadline_ms > 0).then(|| now.wall + Duration::from_millis(req.deadline_ms));
        let job_id = format!("job-{}", super::agents::random_hex(6));
        // Unset means normal (the proto says so), so jobs rank alike whoever sent them.
        let priority = match pb::Priority::try_from(req.priority) {
            Ok(pb::Priority::Unspecified) | Err(_) => pb::Priority::Normal as i32,
            Ok(p) => p as i32,
        };
        let record = pb::Job {
            job_id,
            state: JobState::Pending as i32,
            blobs: blobs.iter().map(|b| b.to_string()).collect(),
            targets: req.targets.clone(),
            priority,
            deadline: deadline.map(Into::into),
            created_at: Some(now.wall.into()),
            finished_at: None,
            description: req.description.clone(),
            image: submitted.image,
            creator: submitted.creator,
            progress: None,
            origins: (origins.iter())
                .map(|(d, o)| (d.to_string(), o.clone()))
                .collect(),
        };
        let mut job = Job::new(record, deadline);
        let (hosts, blob_count) = (targets.len(), blobs.len());
        let agents = (targets.into_iter())
            .map(|host| (host, self.agents.name(host)))
            .collect();
        let sized = (blobs.into_iter())
            .map(|blob| (blob, self.catalog.manifest(&blob).map_or(0, |m| m.size())))
            .collect();
        job.plan(Rest::new(agents, sized));
        job.refresh_state(now.wall);
        Ok((job, hosts, blob_count))
    }

    /// The live agents a selector names. Unknown explicit ids are NotFound; an empty result
    /// is InvalidArgument (a job with no target would be "done" and mean nothing).
    pub(super) fn resolve(
        &self,
        selector: Option<&pb::TargetSelector>,
    ) -> Result<Vec<HostId>, ApiError> {
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

    /// CancelJob: the targets stop at once; answered once the job is stored.
    pub(super) fn cancel_job(
        &mut self,
        req: pb::CancelJobRequest,
        owner: Option<String>,
        now: Now,
        reply: Reply<pb::CancelJobResponse>,
    ) {
        let cancelled = (self.writer_has_room()).and_then(|()| {
            let (owner, held) = (owner.as_deref(), &self.catalog.holding());
            (self.jobs).cancel(&req.job_id, owner, &req.reason, held, now.wall)
        });
        let (state, ended, changed) = match cancelled {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        self.unwant_ended(&req.job_id, ended, now);
        let response = pb::CancelJobResponse {
            state: state as i32,
        };
        if changed {
            let what = format!("storing job {}", req.job_id);
            let then = when_stored(reply, response, what);
            self.jobs.store(&req.job_id, now.wall, then);
        } else {
            let _ = reply.send(Ok(response));
        }
    }

    pub(super) fn get_blob(
        &self,
        req: pb::GetBlobRequest,
    ) -> Result<pb::GetBlobResponse, ApiError> {
        let digest: Digest = req
            .digest
            .parse()
            .map_err(|e| ApiError::InvalidArgument(format!("digest: {e}")))?;
        let Some(entry) = self.catalog.entry(&digest) else {
            return Err(ApiError::NotFound(format!(
                "blob {digest} is not in the catalog"
            )));
        };
        let holders = entry
            .holders
            .iter()
            .map(|(host, h)| pb::BlobHolder {
                agent_id: self.agents.name(*host),
                complete: h.complete,
                chunks_held: h.chunks,
                pinned: h.pinned,
            })
            .collect();
        Ok(pb::GetBlobResponse {
            blob: Some(self.catalog.info(entry)),
            holders,
            manifest: req.include_manifest.then(|| entry.wire.clone()),
        })
    }

    /// Single flight for a URL pulled without a digest (see the planner's `Seeder`).
    pub(super) fn resolve_url(
        &mut self,
        req: pb::ResolveUrlRequest,
        now: Now,
    ) -> Result<pb::ResolveUrlResponse, ApiError> {
        shoal_origin::parse_http_url(&req.url)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if req.etag.is_empty() && req.size == 0 {
            return Err(ApiError::InvalidArgument(
                "a URL without ETag or size cannot be told apart from a changed one: give a digest"
                    .into(),
            ));
        }
        let host = self
            .agents
            .host_of(&req.agent_id)
            .ok_or_else(|| ApiError::NotFound(format!("agent {:?} is not known", req.agent_id)))?;
        let fetched = if req.fetched_digest.is_empty() {
            None
        } else {
            Some(
                req.fetched_digest
                    .parse::<Digest>()
                    .map_err(|e| ApiError::InvalidArgument(format!("fetched_digest: {e}")))?,
            )
        };
        if let Some(d) = fetched {
            // The caller's word is not enough: the agent it names must have registered that
            // blob, whole and of the URL's size, over its own session (so a caller cannot
            // make later pulls of the URL return bytes of its choosing).
            let size = self.catalog.manifest(&d).map(|m| m.size());
            let held = self.catalog.holds_complete(&d, host);
            // Without a size from the origin there is nothing to check the claim against.
            if !held || req.size == 0 || size != Some(req.size) {
                return Err(ApiError::FailedPrecondition(format!(
                    "agent {:?} has not registered a complete {d} of {} bytes: a URL's digest is taken only from the agent that fetched it, once it holds the blob",
                    req.agent_id, req.size
                )));
            }
        }
        let key = UrlKey {
            url: req.url,
            etag: req.etag,
            size: req.size,
        };
        let answer = self
            .seeder
            .resolve_url(now.mono, key, host, fetched, req.gave_up);
        Ok(match answer {
            UrlAnswer::Known(digest) => pb::ResolveUrlResponse {
                digest: digest.to_string(),
                fetcher: String::new(),
            },
            UrlAnswer::Fetcher(h) => pb::ResolveUrlResponse {
                digest: String::new(),
                fetcher: self.agents.name(h),
            },
            UrlAnswer::Nobody => pb::ResolveUrlResponse::default(),
        })
    }
}
