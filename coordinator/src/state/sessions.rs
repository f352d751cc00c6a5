//! Agents coming and going: Join, sessions opening and closing, leases running out, and
//! what each means for the planner and the jobs.

use std::collections::BTreeMap;

use shoal_planner::{Event, HostId, SeedEvent};
use shoal_proto::pb::v1 as pb;

use super::agents::Admission;
use super::{ApiError, Now, Reply, SessionId, SessionTx, State, when_stored};
use crate::auth::same_hash;

impl State {
    /// Join; one that gets a new secret is answered once its hash is stored.
    pub(super) fn join(&mut self, req: pb::JoinRequest, now: Now, reply: Reply<pb::JoinResponse>) {
        match self.admit(req, now) {
            Ok((response, Some(hash))) => {
                let id = response.agent_id.clone();
                let what = format!("storing the secret of agent {id}");
                (self.secrets).record(&id, hash, when_stored(reply, response, what));
            }
            Ok((response, None)) => {
                let _ = reply.send(Ok(response));
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Checks a Join and admits the agent; returns the answer, and the hash of the secret
    /// it carries if that is new (the caller records it).
    fn admit(
        &mut self,
        req: pb::JoinRequest,
        now: Now,
    ) -> Result<(pb::JoinResponse, Option<[u8; 32]>), ApiError> {
        if !same_secret(&req.token, &self.config.join_token) {
            return Err(ApiError::Unauthenticated("wrong join token".into()));
        }
        if req.protocol != shoal_proto::SESSION_PROTOCOL {
            return Err(ApiError::FailedPrecondition(format!(
                "the agent speaks session protocol {}, this coordinator {}: run agents and \
                 the coordinator of the same Shoal release",
                req.protocol,
                shoal_proto::SESSION_PROTOCOL
            )));
        }
        if req.quic_addresses.is_empty() {
            return Err(ApiError::InvalidArgument(
                "quic_addresses: at least one is required".into(),
            ));
        }
        for a in &req.quic_addresses {
            if a.parse::<std::net::SocketAddr>().is_err() {
                return Err(ApiError::InvalidArgument(format!(
                    "quic_addresses: {a:?} is not host:port with an IP address"
                )));
            }
        }
        let (id, needs_secret) = self.claim_id(&req.previous_agent_id, &req.agent_secret);
        // The certificate names the agent's id: sign it (refusing a bad CSR) before
        // anything is recorded.
        let certificate_der = if req.csr_der.is_empty() {
            Vec::new()
        } else {
            (self
                .ca
                .sign_csr(&req.csr_der, &id, self.certificate_validity(now)))
            .map_err(|e| ApiError::InvalidArgument(format!("csr_der: {e}")))?
        };
        let (agent_secret, hash) = if needs_secret {
            let secret = super::agents::random_hex(32);
            let hash = *shoal_proto::Digest::of(secret.as_bytes()).as_bytes();
            (secret, Some(hash))
        } else {
            (String::new(), None)
        };
        let (upload_bps, download_bps) = (
            req.upload_capacity_bytes_per_sec,
            req.download_capacity_bytes_per_sec,
        );
        let a = self.agents.admit(
            Admission {
                id,
                labels: req.labels.into_iter().collect::<BTreeMap<_, _>>(),
                addrs: req.quic_addresses,
                upload_bps,
                download_bps,
                version: req.agent_version,
            },
            now,
        );
        self.assigner.handle(
            now.mono,
            Event::HostUp {
                host: a.host,
                zone: a.zone,
                rack: a.rack,
                upload_bps: upload_bps.max(1),
                download_bps: download_bps.max(1),
            },
        );
        // Known and alive, not ready for orders until its session opens.
        let host = a.host;
        self.seeder.handle(now.mono, SeedEvent::HostAway { host });
        tracing::info!(agent = %a.id, "agent joined");
        let response = pb::JoinResponse {
            agent_id: a.id,
            session_token: a.token,
            heartbeat_interval_ms: self.config.heartbeat.as_millis() as u64,
            certificate_der,
            ca_certificates_der: vec![self.ca.cert_der().to_vec()],
            agent_secret,
        };
        Ok((response, hash))
    }

    /// The id a joining agent gets, and whether it needs a new secret. Its previous id
    /// comes back only with proof: the secret issued with it, whose hash is on record. An
    /// id with no secret on record (new, or an agent older than this rule) is taken as
    /// given and gets one; a wrong or missing secret gets a new id, so that a token holder
    /// cannot take over another agent's id and its orders. Records nothing.
    fn claim_id(&self, previous: &str, secret: &str) -> (String, bool) {
        let fresh = || {
            super::agents::fresh_agent_id(|id| {
                self.agents.host_of(id).is_some()
                    || self.secrets.get(id).is_some()
                    || self.secrets.is_revoked(id)
            })
        };
        if !super::agents::valid_agent_id(previous) {
            return (fresh(), true);
        }
        let id = previous.to_string();
        if self.secrets.is_revoked(&id) {
            let fresh = fresh();
            tracing::warn!(revoked = %id, given = %fresh, "a join claimed a revoked agent id: given a new id");
            return (fresh, true);
        }
        match self.secrets.get(&id) {
            Some(hash) if same_hash(hash, secret) => (id, false),
            Some(_) => {
                let fresh = fresh();
                tracing::warn!(claimed = %id, given = %fresh, "a join claimed an agent id without its secret: given a new id");
                (fresh, true)
            }
            None => (id, true),
        }
    }

    /// A fresh certificate for an agent that proved its id with its current one (not
    /// expired, not revoked: its TLS handshake and this check).
    pub(super) fn renew_certificate(
        &self,
        agent_id: &str,
        csr_der: &[u8],
        now: Now,
    ) -> Result<pb::RenewCertificateResponse, ApiError> {
        if self.secrets.is_revoked(agent_id) {
            return Err(ApiError::PermissionDenied(format!(
                "agent {agent_id} was removed: its certificate is revoked"
            )));
        }
        if self.agents.host_of(agent_id).is_none() {
            return Err(ApiError::NotFound(format!(
                "agent {agent_id} is not known: join again"
            )));
        }
        let certificate_der = (self.ca)
            .sign_csr(csr_der, agent_id, self.certificate_validity(now))
            .map_err(|e| ApiError::InvalidArgument(format!("csr_der: {e}")))?;
        Ok(pb::RenewCertificateResponse {
            certificate_der,
            ca_certificates_der: vec![self.ca.cert_der().to_vec()],
        })
    }

    /// What a certificate signed now gets: valid from the state's wall clock, if
    /// certificates expire at all.
    fn certificate_validity(
        &self,
        now: Now,
    ) -> Option<(std::time::SystemTime, std::time::Duration)> {
        self.config.certificate_validity.map(|v| (now.wall, v))
    }

    pub(super) fn open_session(
        &mut self,
        hello: pb::Hello,
        tx: SessionTx,
        now: Now,
    ) -> Result<SessionId, ApiError> {
        let session = self.agents.open_session(hello, tx, now)?;
        let host = session.host;
        // First, whom its peers' certificates must not name (all of them: it may have missed
        // revocations while away). Revocations are never taken back, so none is no news.
        let revoked: Vec<String> = self.secrets.revoked().cloned().collect();
        if !revoked.is_empty() {
            let revoked = pb::RevokedAgents {
                agent_ids: revoked,
                replace: true,
            };
            self.agents
                .send(host, pb::coordinator_message::Msg::RevokedAgents(revoked));
        }
        self.assigner.handle(now.mono, Event::Heartbeat { host });
        self.seeder.handle(now.mono, SeedEvent::HostReady { host });
        self.resume_targets(host, now);
        self.redeliver_orders(host);
        Ok(session)
    }

    pub(super) fn session_closed(&mut self, session: SessionId, now: Now) {
        if self.agents.close_session(session) {
            let host = session.host;
            self.seeder.handle(now.mono, SeedEvent::HostAway { host });
        }
    }

    /// Agents silent past their lease are gone: their orders are re-planned and their
    /// unfinished targets fail with AGENT_LOST (see `job.rs` for the rule). A drained agent
    /// that stops was already taken out of planning.
    pub(super) fn expire_leases(&mut self, now: Now) {
        for gone in self.agents.expire(now, self.config.lease) {
            if gone.drained {
                continue;
            }
            metrics::counter!(crate::metrics::LEASES_EXPIRED).increment(1);
            self.take_out(gone.host, &gone.id, &gone.message, now);
        }
    }

    /// Takes an agent out of planning (its lease expired, it is drained or removed): it is no
    /// source and gets no orders, streams it took part in re-plan, and its unfinished
    /// targets fail with AGENT_LOST, resumable if it joins again while their job runs.
    pub(super) fn take_out(&mut self, host: HostId, id: &str, message: &str, now: Now) {
        self.assigner.handle(now.mono, Event::HostDown { host });
        self.seeder.handle(now.mono, SeedEvent::HostGone { host });
        self.catalog.forget_host(host);
        self.orders.drop_host(host);
        // Streams it seeded or fetched: the other targets' sources and stripes change.
        for blob in self.streams.drop_host(host) {
            self.stream_to_waiting(blob, true, now);
            self.streams.end_if_idle(&blob);
        }
        let unwanted =
            (self.jobs).lose_agent(id, Some(host), message, &self.catalog.holding(), now.wall);
        for blob in unwanted {
            self.unwanted(host, blob, now);
        }
    }

    /// An agent (re)connected: want again what unfinished jobs still need from it, including
    /// targets that failed because it was lost.
    fn resume_targets(&mut self, host: HostId, now: Now) {
        let agent = self.agents.name(host);
        for (job, blob) in self.jobs.resume(&agent) {
            if self.catalog.holds_complete(&blob, host) {
                self.jobs.want(&job, host, blob);
                self.blob_done(host, blob, now);
            } else {
                self.want(&job, host, blob, now);
            }
        }
    }
}

/// Whether `secret` hashes to `hash`, in time that does not depend on where they differ.
/// Whether two secrets are equal, in time that depends on neither: their SHA-256 digests
/// (fixed length, so no early exit on a length difference either) compared byte for byte
/// without stopping at the first difference.
fn same_secret(given: &str, expected: &str) -> bool {
    same_hash(
        shoal_proto::Digest::of(expected.as_bytes()).as_bytes(),
        given,
    )
}

#[cfg(test)]
mod secret_tests {
    #[test]
    fn same_secret_is_equality() {
        use super::same_secret;
        assert!(same_secret("tok", "tok"));
        assert!(!same_secret("tok", "tok2"));
        assert!(!same_secret("", "tok"));
        assert!(!same_secret("tOk", "tok"));
        assert!(same_secret("", ""));
    }
}
