//! Agents: Join, sessions, leases, and ListAgents.

use std::collections::{BTreeMap, HashMap};
use std::time::{Instant, SystemTime};

use rand::Rng as _;
use shoal_planner::{Event, HostId, RackId, ZoneId};
use shoal_proto::pb::v1::{self as pb, AgentState, coordinator_message};

use super::{ApiError, SessionId, SessionTx, State};

#[derive(Debug)]
pub struct Agent {
    pub id: String,
    pub host: HostId,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<String>,
    pub upload_bps: u64,
    pub download_bps: u64,
    pub version: String,
    pub token: String,
    pub joined_at: SystemTime,
    pub last_seen: Instant,
    pub last_seen_wall: SystemTime,
    pub state: AgentState,
    pub session: Option<(u64, SessionTx)>,
    pub load: pb::Load,
}

#[derive(Debug, Default)]
pub struct Agents {
    by_host: BTreeMap<HostId, Agent>,
    by_id: HashMap<String, HostId>,
    zones: BTreeMap<String, u32>,
    racks: BTreeMap<(String, String), u32>,
    next_generation: u64,
}

impl Agents {
    pub fn get(&self, host: HostId) -> Option<&Agent> {
        self.by_host.get(&host)
    }

    pub fn host_of(&self, id: &str) -> Option<HostId> {
        self.by_id.get(id).copied()
    }

    pub fn name(&self, host: HostId) -> String {
        self.by_host
            .get(&host)
            .map(|a| a.id.clone())
            .unwrap_or_else(|| host.to_string())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Agent> {
        self.by_host.values()
    }

    /// Renews the lease of the agent behind `session`; false if the session is stale.
    pub fn touch(&mut self, session: SessionId) -> bool {
        let Some(agent) = self.by_host.get_mut(&session.host) else {
            return false;
        };
        if agent.session.as_ref().map(|(g, _)| *g) != Some(session.generation) {
            return false;
        }
        agent.last_seen = Instant::now();
        agent.last_seen_wall = SystemTime::now();
        true
    }

    pub fn set_load(&mut self, host: HostId, load: pb::Load) {
        if let Some(agent) = self.by_host.get_mut(&host) {
            agent.load = load;
        }
    }

    /// Queues a message on the agent's session. Without a session nothing is sent: orders are
    /// delivered again when it opens. A session whose queue is full (the agent stopped
    /// reading) is closed rather than silently losing a message; the agent reconnects and
    /// gets its orders again.
    pub fn send(&mut self, host: HostId, msg: coordinator_message::Msg) {
        let Some(agent) = self.by_host.get_mut(&host) else {
            return;
        };
        let Some((_, tx)) = agent.session.as_ref() else {
            tracing::debug!(agent = %agent.id, "no session; message not sent");
            return;
        };
        if tx
            .try_send(Ok(pb::CoordinatorMessage { msg: Some(msg) }))
            .is_err()
        {
            tracing::warn!(agent = %agent.id, "session queue full or closed; closing the session");
            agent.session = None;
            if agent.state == AgentState::Ready {
                agent.state = AgentState::Disconnected;
            }
        }
    }

    fn intern(&mut self, labels: &BTreeMap<String, String>) -> (ZoneId, RackId) {
        let zone = labels.get("zone").cloned().unwrap_or_default();
        let rack = labels.get("rack").cloned().unwrap_or_default();
        let next = self.zones.len() as u32;
        let z = *self.zones.entry(zone.clone()).or_insert(next);
        let next = self.racks.len() as u32;
        let r = *self.racks.entry((zone, rack)).or_insert(next);
        (ZoneId(z), RackId(r))
    }
}

fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(super) fn random_hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

impl State {
    pub(super) fn join(&mut self, req: pb::JoinRequest) -> Result<pb::JoinResponse, ApiError> {
        if req.token != self.config.join_token {
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
        let id = if valid_agent_id(&req.previous_agent_id) {
            req.previous_agent_id.clone()
        } else {
            format!("agent-{}", random_hex(4))
        };
        let certificate_der = if req.csr_der.is_empty() {
            Vec::new()
        } else {
            self.ca
                .sign_csr(&req.csr_der, &id)
                .map_err(|e| ApiError::InvalidArgument(format!("csr_der: {e}")))?
        };
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        let (zone, rack) = self.agents.intern(&labels);
        let host = match self.agents.by_id.get(&id) {
            Some(h) => *h,
            None => {
                let h = HostId(self.agents.by_id.len() as u32);
                self.agents.by_id.insert(id.clone(), h);
                h
            }
        };
        let token = random_hex(16);
        let now_wall = SystemTime::now();
        let previous = self.agents.by_host.remove(&host);
        let agent = Agent {
            id: id.clone(),
            host,
            labels,
            addrs: req.quic_addresses,
            upload_bps: req.upload_capacity_bytes_per_sec,
            download_bps: req.download_capacity_bytes_per_sec,
            version: req.agent_version,
            token: token.clone(),
            joined_at: previous.as_ref().map(|p| p.joined_at).unwrap_or(now_wall),
            last_seen: Instant::now(),
            last_seen_wall: now_wall,
            state: AgentState::Disconnected,
            session: None,
            load: Default::default(),
        };
        let now = self.now();
        self.assigner.handle(
            now,
            Event::HostUp {
                host,
                zone,
                rack,
                upload_bps: agent.upload_bps.max(1),
                download_bps: agent.download_bps.max(1),
            },
        );
        self.agents.by_host.insert(host, agent);
        tracing::info!(agent = %id, "agent joined");
        Ok(pb::JoinResponse {
            agent_id: id,
            lease_ms: self.config.lease.as_millis() as u64,
            session_token: token,
            heartbeat_interval_ms: self.config.heartbeat.as_millis() as u64,
            certificate_der,
            ca_certificates_der: vec![self.ca.cert_der().to_vec()],
        })
    }

    pub(super) fn open_session(
        &mut self,
        hello: pb::Hello,
        tx: SessionTx,
    ) -> Result<SessionId, ApiError> {
        let Some(host) = self.agents.host_of(&hello.agent_id) else {
            return Err(ApiError::Unauthenticated(format!(
                "unknown agent {:?}: join first",
                hello.agent_id
            )));
        };
        self.agents.next_generation += 1;
        let generation = self.agents.next_generation;
        let Some(agent) = self.agents.by_host.get_mut(&host) else {
            return Err(ApiError::Unauthenticated("join first".into()));
        };
        if agent.token != hello.session_token || agent.state == AgentState::Gone {
            return Err(ApiError::Unauthenticated(
                "session token expired: join again".into(),
            ));
        }
        if !hello.quic_addresses.is_empty() {
            agent.addrs = hello.quic_addresses;
        }
        agent.session = Some((generation, tx));
        agent.state = AgentState::Ready;
        agent.last_seen = Instant::now();
        let now = self.now();
        self.assigner.handle(now, Event::Heartbeat { host });
        self.resume_targets(host);
        self.redeliver_orders(host);
        self.redeliver_seeds(host);
        Ok(SessionId { host, generation })
    }

    pub(super) fn session_closed(&mut self, session: SessionId) {
        let Some(agent) = self.agents.by_host.get_mut(&session.host) else {
            return;
        };
        if agent.session.as_ref().map(|(g, _)| *g) == Some(session.generation) {
            agent.session = None;
            if agent.state == AgentState::Ready {
                agent.state = AgentState::Disconnected;
            }
            tracing::info!(agent = %agent.id, "session closed; lease still running");
        }
    }

    /// Agents silent past their lease are gone: their orders are re-planned and their
    /// unfinished targets fail with AGENT_LOST (see `jobs.rs` for the rule).
    pub(super) fn expire_leases(&mut self) {
        let lease = self.config.lease;
        let expired: Vec<HostId> = self
            .agents
            .by_host
            .values()
            .filter(|a| a.state != AgentState::Gone && a.last_seen.elapsed() > lease)
            .map(|a| a.host)
            .collect();
        for host in expired {
            let Some(agent) = self.agents.by_host.get_mut(&host) else {
                continue;
            };
            agent.state = AgentState::Gone;
            agent.session = None;
            agent.token.clear();
            let message = format!(
                "{} stopped renewing its lease ({} ms) at {}",
                agent.id,
                lease.as_millis(),
                humantime_utc(agent.last_seen_wall)
            );
            tracing::warn!(agent = %agent.id, "lease expired");
            let id = agent.id.clone();
            let now = self.now();
            self.assigner.handle(now, Event::HostDown { host });
            self.catalog.forget_host(host);
            self.orders.retain(|(h, _), _| *h != host);
            self.fail_agent_targets(&id, &message);
        }
    }

    /// Agents that unfinished jobs name but that have not joined since this coordinator
    /// started (after a restart): recorded as disconnected with a lease from now, so that
    /// either they rejoin and their targets resume, or the lease runs out and the targets
    /// fail with AGENT_LOST instead of waiting forever.
    pub(super) fn expect_agents(&mut self, ids: impl IntoIterator<Item = String>) {
        let now = Instant::now();
        for id in ids {
            if self.agents.by_id.contains_key(&id) {
                continue;
            }
            let host = HostId(self.agents.by_id.len() as u32);
            self.agents.by_id.insert(id.clone(), host);
            self.agents.by_host.insert(
                host,
                Agent {
                    id,
                    host,
                    labels: BTreeMap::new(),
                    addrs: Vec::new(),
                    upload_bps: 0,
                    download_bps: 0,
                    version: String::new(),
                    token: String::new(),
                    joined_at: SystemTime::now(),
                    last_seen: now,
                    last_seen_wall: SystemTime::now(),
                    state: AgentState::Disconnected,
                    session: None,
                    load: Default::default(),
                },
            );
        }
    }

    pub(super) fn list_agents(&self, req: pb::ListAgentsRequest) -> pb::ListAgentsResponse {
        let agents = self
            .agents
            .iter()
            .filter(|a| {
                req.match_labels
                    .iter()
                    .all(|(k, v)| a.labels.get(k) == Some(v))
            })
            .filter(|a| req.state == 0 || a.state as i32 == req.state)
            .map(|a| (a.id.clone(), a))
            .collect();
        let (page, next_page_token) = super::page(agents, req.page_size, &req.page_token);
        let agents = (page.into_iter())
            .map(|a| {
                let (held, partial) = self.catalog.counts_for(a.host);
                pb::AgentInfo {
                    agent_id: a.id.clone(),
                    labels: a.labels.clone().into_iter().collect(),
                    quic_addresses: a.addrs.clone(),
                    upload_capacity_bytes_per_sec: a.upload_bps,
                    download_capacity_bytes_per_sec: a.download_bps,
                    state: a.state as i32,
                    last_seen: Some(a.last_seen_wall.into()),
                    blobs_held: held,
                    blobs_partial: partial,
                    upload_bytes_per_sec: a.load.upload_bytes_per_sec,
                    download_bytes_per_sec: a.load.download_bytes_per_sec,
                    disk_free_bytes: a.load.disk_free_bytes,
                    version: a.version.clone(),
                    joined_at: Some(a.joined_at.into()),
                }
            })
            .collect();
        pb::ListAgentsResponse {
            agents,
            next_page_token,
        }
    }
}

fn humantime_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02} UTC")
}
