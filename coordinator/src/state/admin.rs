//! Operators' calls that change what the cluster holds or who is in it: RemoveBlob (unpin or
//! delete a blob on agents, and forget it), DrainAgent (take an agent out of planning before
//! it stops) and RemoveAgent (forget an agent that left).

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, AgentState};

use super::{ApiError, Now, Reply, State, when_stored};

impl State {
    /// RemoveBlob; a blob forgotten by the catalog is answered once that is stored.
    pub(super) fn remove_blob(
        &mut self,
        req: pb::RemoveBlobRequest,
        now: Now,
        reply: Reply<pb::RemoveBlobResponse>,
    ) {
        match self.drop_blob(req, now) {
            Ok((response, Some(blob))) => {
                let what = format!("forgetting blob {blob}");
                let then = when_stored(reply, response, what);
                self.catalog.remove(&blob, Some(then));
            }
            Ok((response, None)) => {
                let _ = reply.send(Ok(response));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Sends DropBlob where a RemoveBlob asks; returns the answer, and the blob if the
    /// catalog must forget it (the caller does, and answers once that is stored).
    fn drop_blob(
        &mut self,
        req: pb::RemoveBlobRequest,
        now: Now,
    ) -> Result<(pb::RemoveBlobResponse, Option<Digest>), ApiError> {
        let blob: Digest = req
            .digest
            .parse()
            .map_err(|e| ApiError::InvalidArgument(format!("digest: {e}")))?;
        let everywhere = req.on.is_none();
        let forget = everywhere && !req.unpin_only;
        if forget {
            self.writer_has_room()?;
        }
        if !req.unpin_only {
            let wanting: Vec<String> = (self.jobs.iter())
                .filter(|j| !j.is_terminal())
                .filter(|j| j.keys().any(|(_, b, ended)| b == blob && !ended))
                .map(|j| j.id().to_string())
                .collect();
            if !wanting.is_empty() {
                return Err(ApiError::FailedPrecondition(format!(
                    "{blob} is wanted by unfinished job(s) {}: cancel them first (shoal cancel JOB)",
                    wanting.join(", ")
                )));
            }
        }
        let hosts: Vec<HostId> = match &req.on {
            Some(selector) => self.resolve(Some(selector))?,
            None => match self.catalog.entry(&blob) {
                Some(entry) => entry.holders.keys().copied().collect(),
                None => {
                    return Err(ApiError::NotFound(format!(
                        "blob {blob} is not in the catalog"
                    )));
                }
            },
        };
        let mut response = pb::RemoveBlobResponse::default();
        for host in hosts {
            let Some(agent) = self.agents.get(host) else {
                continue;
            };
            let id = agent.id.clone();
            if agent.session.is_none() {
                response.unreachable_agent_ids.push(id);
                continue;
            }
            if !req.unpin_only {
                // Its order for the blob, if any, ends here; the agent cancels its own too.
                self.cancel_order(host, blob, "the blob was removed");
            }
            self.agents.send(
                host,
                pb::coordinator_message::Msg::DropBlob(pb::DropBlob {
                    blob_digest: blob.as_bytes().to_vec(),
                    unpin_only: req.unpin_only,
                }),
            );
            response.agent_ids.push(id);
        }
        if forget {
            // The check above read the jobs in memory; a restart must not find on disk an
            // older state in which a job still wants the blob that is now gone. Queued
            // before the catalog's delete, so stored before it.
            self.jobs.flush_now(now.wall);
            response.forgotten = true;
        }
        tracing::info!(
            %blob,
            unpin_only = req.unpin_only,
            agents = response.agent_ids.len(),
            unreachable = response.unreachable_agent_ids.len(),
            forgotten = response.forgotten,
            "blob removal asked"
        );
        Ok((response, forget.then_some(blob)))
    }

    pub(super) fn drain_agent(
        &mut self,
        req: pb::DrainAgentRequest,
        now: Now,
    ) -> Result<pb::DrainAgentResponse, ApiError> {
        let host = self.known_agent(&req.agent_id)?;
        let waiting_targets = self.drain(host, "drained by an operator (shoal agents drain)", now);
        let state = self.agents.get(host).map_or(AgentState::Gone, |a| a.state);
        Ok(pb::DrainAgentResponse {
            state: state as i32,
            waiting_targets,
        })
    }

    /// Takes the agent out of planning until its next join (see `Agents::drain`); returns
    /// its unfinished targets, which fail with AGENT_LOST and resume when it joins again.
    pub(super) fn drain(&mut self, host: HostId, why: &str, now: Now) -> u32 {
        let Some(agent) = self.agents.get(host) else {
            return 0;
        };
        let id = agent.id.clone();
        let waiting = self.unfinished_targets(&id);
        let was_out = agent.state == AgentState::Draining;
        if !self.agents.drain(host) || was_out {
            return waiting;
        }
        // Its own orders: it is about to stop, so they end now rather than run on.
        for blob in self.orders.of_host(host) {
            self.cancel_order(host, blob, why);
        }
        self.take_out(host, &id, &format!("{id} was {why}"), now);
        waiting
    }

    pub(super) fn remove_agent(
        &mut self,
        req: pb::RemoveAgentRequest,
        now: Now,
    ) -> Result<pb::RemoveAgentResponse, ApiError> {
        let host = self.known_agent(&req.agent_id)?;
        let failed_targets = self.unfinished_targets(&req.agent_id);
        let agent = self.agents.remove(host)?;
        // A disconnected agent's lease was still running: it leaves planning now.
        if agent.state != AgentState::Gone {
            let message = format!("{} was removed by an operator", agent.id);
            self.take_out(host, &agent.id, &message, now);
        }
        // Its certificate is revoked: every agent refuses it from now on, and the id is never
        // given back (if it runs on, it joins again under a new one).
        self.secrets.revoke(&agent.id, now.wall);
        let revoked = pb::RevokedAgents {
            agent_ids: vec![agent.id.clone()],
            replace: false,
        };
        let hosts: Vec<HostId> = self.agents.iter().map(|a| a.host).collect();
        for h in hosts {
            self.agents.send(
                h,
                pb::coordinator_message::Msg::RevokedAgents(revoked.clone()),
            );
        }
        tracing::info!(agent = %agent.id, failed_targets, "agent removed");
        Ok(pb::RemoveAgentResponse { failed_targets })
    }

    fn known_agent(&self, id: &str) -> Result<HostId, ApiError> {
        self.agents
            .host_of(id)
            .filter(|h| self.agents.get(*h).is_some())
            .ok_or_else(|| ApiError::NotFound(format!("agent {id:?} is not known")))
    }

    /// The agent's targets in unfinished jobs that are not done.
    fn unfinished_targets(&self, agent: &str) -> u32 {
        (self.jobs.iter())
            .filter(|j| !j.is_terminal())
            .flat_map(|j| j.keys())
            .filter(|(a, _, ended)| *a == agent && !ended)
            .count() as u32
    }
}
