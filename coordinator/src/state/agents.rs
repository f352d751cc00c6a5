//! The agents: who joined, their sessions, their leases. Soft state, rebuilt when agents
//! join again after a coordinator restart.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use rand::Rng as _;
use shoal_planner::{HostId, RackId, Time, ZoneId};
use shoal_proto::pb::v1::{self as pb, AgentState, coordinator_message};

use super::{ApiError, Now, SessionId, SessionTx};

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
    pub last_seen: Time,
    pub last_seen_wall: SystemTime,
    pub state: AgentState,
    pub session: Option<(u64, SessionTx)>,
    pub load: pb::Load,
    /// The capacities the planner was last given (upload, download), bytes/s.
    pub planned: (u64, u64),
}

/// How far a learned capacity moves from the one the planner has before the planner hears
/// of it: rates measured from traffic wander, and each change may move stripes.
const CAPACITY_CHANGE: f64 = 0.2;

impl Agent {
    /// The capacities to plan with, bytes/s: the learned ones (at most the declared) where
    /// the agent has learned them, the declared ones otherwise.
    pub fn capacity(&self) -> (u64, u64) {
        let pick = |learned: u64, declared: u64| match learned {
            0 => declared,
            l if declared == 0 => l,
            l => l.min(declared),
        };
        (
            pick(self.load.learned_upload_bytes_per_sec, self.upload_bps),
            pick(self.load.learned_download_bytes_per_sec, self.download_bps),
        )
    }
}

/// What a Join asks for, checked.
#[derive(Debug)]
pub struct Admission {
    /// The agent's previous id, or a [`fresh_agent_id`].
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub addrs: Vec<String>,
    pub upload_bps: u64,
    pub download_bps: u64,
    pub version: String,
}

/// An agent admitted by Join.
#[derive(Debug)]
pub struct Admitted {
    pub host: HostId,
    pub id: String,
    pub token: String,
    pub zone: ZoneId,
    pub rack: RackId,
}

/// An agent whose lease ran out.
#[derive(Debug)]
pub struct Expired {
    pub host: HostId,
    pub id: String,
    /// For its targets: who stopped renewing which lease when.
    pub message: String,
    /// It was drained first: its work was already moved, and its end is no loss.
    pub drained: bool,
}

#[derive(Debug, Default)]
pub struct Agents {
    by_host: BTreeMap<HostId, Agent>,
    /// In id order: ListAgents takes a page from it (it sorted every agent for each page,
    /// ~8 ms at 20,000 and more while they all rejoin).
    by_id: BTreeMap<String, HostId>,
    zones: BTreeMap<String, u32>,
    racks: BTreeMap<(String, String), u32>,
    next_generation: u64,
    /// Fetch orders sent on sessions, ever (the driver paces a burst of them by it).
    orders_sent: u64,
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

    /// Fetch orders sent on sessions so far.
    pub fn orders_sent(&self) -> u64 {
        self.orders_sent
    }

    pub fn iter(&self) -> impl Iterator<Item = &Agent> {
        self.by_host.values()
    }

    fn host_for(&mut self, id: &str) -> HostId {
        match self.by_id.get(id) {
            Some(h) => *h,
            None => {
                let h = HostId(self.by_id.len() as u32);
                self.by_id.insert(id.to_string(), h);
                h
            }
        }
    }

    /// Records a Join: the agent keeps its host id if it was known, and gets a new session
    /// token. Not ready until its session opens.
    pub fn admit(&mut self, a: Admission, now: Now) -> Admitted {
        let id = a.id;
        let (zone, rack) = self.intern(&a.labels);
        let host = self.host_for(&id);
        let token = random_hex(16);
        let previous = self.by_host.remove(&host);
        self.by_host.insert(
            host,
            Agent {
                id: id.clone(),
                host,
                labels: a.labels,
                addrs: a.addrs,
                upload_bps: a.upload_bps,
                download_bps: a.download_bps,
                version: a.version,
                token: token.clone(),
                joined_at: previous.as_ref().map_or(now.wall, |p| p.joined_at),
                last_seen: now.mono,
                last_seen_wall: now.wall,
                state: AgentState::Disconnected,
                session: None,
                load: Default::default(),
                planned: (a.upload_bps.max(1), a.download_bps.max(1)),
            },
        );
        Admitted {
            host,
            id,
            token,
            zone,
            rack,
        }
    }

    /// Opens a session for the agent that `hello` names, replacing any older one.
    pub fn open_session(
        &mut self,
        hello: pb::Hello,
        tx: SessionTx,
        now: Now,
    ) -> Result<SessionId, ApiError> {
        let Some(host) = self.host_of(&hello.agent_id) else {
            return Err(ApiError::Unauthenticated(format!(
                "unknown agent {:?}: join first",
                hello.agent_id
            )));
        };
        self.next_generation += 1;
        let generation = self.next_generation;
        let Some(agent) = self.by_host.get_mut(&host) else {
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
        agent.last_seen = now.mono;
        agent.last_seen_wall = now.wall;
        Ok(SessionId { host, generation })
    }

    /// The session ended; true if it was the agent's current one (its lease still runs).
    pub fn close_session(&mut self, session: SessionId) -> bool {
        let Some(agent) = self.by_host.get_mut(&session.host) else {
            return false;
        };
        if agent.session.as_ref().map(|(g, _)| *g) != Some(session.generation) {
            return false;
        }
        agent.session = None;
        if agent.state == AgentState::Ready {
            agent.state = AgentState::Disconnected;
        }
        tracing::info!(agent = %agent.id, "session closed; lease still running");
        true
    }

    /// Renews the lease of the agent behind `session`; false if the session is stale.
    pub fn touch(&mut self, session: SessionId, now: Now) -> bool {
        let Some(agent) = self.by_host.get_mut(&session.host) else {
            return false;
        };
        if agent.session.as_ref().map(|(g, _)| *g) != Some(session.generation) {
            return false;
        }
        agent.last_seen = now.mono;
        agent.last_seen_wall = now.wall;
        true
    }

    /// Records a load report; the capacities to give the planner if they moved by more
    /// than [`CAPACITY_CHANGE`] from the ones it has.
    pub fn set_load(&mut self, host: HostId, load: pb::Load) -> Option<(u64, u64)> {
        let agent = self.by_host.get_mut(&host)?;
        agent.load = load;
        let (up, down) = agent.capacity();
        let (up, down) = (up.max(1), down.max(1));
        let moved = |new: u64, old: u64| {
            (new as f64 - old as f64).abs() > CAPACITY_CHANGE * old.max(1) as f64
        };
        let (old_up, old_down) = agent.planned;
        if !moved(up, old_up) && !moved(down, old_down) {
            return None;
        }
        agent.planned = (up, down);
        Some((up, down))
    }

    /// Agents silent past `lease` are gone: their session and token are dropped.
    pub fn expire(&mut self, now: Now, lease: Duration) -> Vec<Expired> {
        let mut out = Vec::new();
        for agent in self.by_host.values_mut() {
            if agent.state == AgentState::Gone
                || now.mono.saturating_since(agent.last_seen) <= lease
            {
                continue;
            }
            let drained = agent.state == AgentState::Draining;
            agent.state = AgentState::Gone;
            agent.session = None;
            agent.token.clear();
            if drained {
                tracing::info!(agent = %agent.id, "drained agent stopped");
            } else {
                tracing::warn!(agent = %agent.id, "lease expired");
            }
            out.push(Expired {
                drained,
                host: agent.host,
                id: agent.id.clone(),
                message: format!(
                    "{} stopped renewing its lease ({} ms) at {}",
                    agent.id,
                    lease.as_millis(),
                    humantime_utc(agent.last_seen_wall)
                ),
            });
        }
        out
    }

    /// Agents that unfinished jobs name but that have not joined since this coordinator
    /// started (after a restart): recorded as disconnected with a lease from now, so that
    /// either they rejoin and their targets resume, or the lease runs out and the targets
    /// fail with AGENT_LOST instead of waiting forever.
    pub fn expect(&mut self, ids: impl IntoIterator<Item = String>, now: Now) {
        for id in ids {
            if self.by_id.contains_key(&id) {
                continue;
            }
            let host = self.host_for(&id);
            self.by_host.insert(
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
                    joined_at: now.wall,
                    last_seen: now.mono,
                    last_seen_wall: now.wall,
                    state: AgentState::Disconnected,
                    session: None,
                    load: Default::default(),
                    planned: (1, 1),
                },
            );
        }
    }

    /// Marks the agent draining until its next join: its session, if any, stays open (it
    /// still renews its lease and serves peers), but its token is cleared, so that a
    /// reconnect must join again and comes back ready; if it never does, its lease runs out
    /// without counting as a loss. False if the agent is unknown or gone.
    pub fn drain(&mut self, host: HostId) -> bool {
        let Some(agent) = self.by_host.get_mut(&host) else {
            return false;
        };
        if agent.state == AgentState::Gone {
            return false;
        }
        agent.state = AgentState::Draining;
        agent.token.clear();
        tracing::info!(agent = %agent.id, "draining");
        true
    }

    /// Forgets an agent without a session. Its host id stays reserved for its id (host ids
    /// are never reused), so it may join again later as a new agent of the same name.
    pub fn remove(&mut self, host: HostId) -> Result<Agent, ApiError> {
        let Some(agent) = self.by_host.get(&host) else {
            return Err(ApiError::NotFound("unknown agent".into()));
        };
        if agent.session.is_some() {
            return Err(ApiError::FailedPrecondition(format!(
                "agent {} is connected: drain it (shoal agents drain) and stop it first",
                agent.id
            )));
        }
        Ok(self.by_host.remove(&host).expect("checked above"))
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
        let order = matches!(msg, coordinator_message::Msg::FetchOrder(_));
        let sent = tx.try_send(Ok(pb::CoordinatorMessage { msg: Some(msg) }));
        self.orders_sent += u64::from(order && sent.is_ok());
        if sent.is_err() {
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

    /// One page of agents, with each one's (complete, partial) blob counts from `counts`
    /// and why it is quarantined from `quarantined` (empty: it is not).
    pub fn list(
        &self,
        req: pb::ListAgentsRequest,
        counts: impl Fn(HostId) -> (u32, u32),
        quarantined: impl Fn(&str) -> String,
    ) -> pb::ListAgentsResponse {
        let agents = (self
            .by_id
            .range::<str, _>(super::after_token(&req.page_token)))
        .filter_map(|(id, host)| Some((id.as_str(), self.by_host.get(host)?)))
        .filter(|(_, a)| {
            req.match_labels
                .iter()
                .all(|(k, v)| a.labels.get(k) == Some(v))
        })
        .filter(|(_, a)| req.state == 0 || a.state as i32 == req.state);
        let (page, next_page_token) = super::page_in_order(agents, req.page_size);
        let agents = (page.into_iter())
            .map(|a| {
                let (held, partial) = counts(a.host);
                let (upload, download) = a.capacity();
                pb::AgentInfo {
                    agent_id: a.id.clone(),
                    labels: a.labels.clone().into_iter().collect(),
                    quic_addresses: a.addrs.clone(),
                    upload_capacity_bytes_per_sec: upload,
                    download_capacity_bytes_per_sec: download,
                    declared_upload_capacity_bytes_per_sec: a.upload_bps,
                    declared_download_capacity_bytes_per_sec: a.download_bps,
                    state: a.state as i32,
                    last_seen: Some(a.last_seen_wall.into()),
                    blobs_held: held,
                    blobs_partial: partial,
                    upload_bytes_per_sec: a.load.upload_bytes_per_sec,
                    download_bytes_per_sec: a.load.download_bytes_per_sec,
                    disk_free_bytes: a.load.disk_free_bytes,
                    version: a.version.clone(),
                    joined_at: Some(a.joined_at.into()),
                    quarantined: quarantined(&a.id),
                }
            })
            .collect();
        pb::ListAgentsResponse {
            agents,
            next_page_token,
        }
    }
}

/// A new agent's id: `agent-` and 8 random hex digits, drawn again while `taken` says an
/// agent has it. Of 20,000 agents joining without an id, two drew the same one in about one
/// cluster start of twenty, and the second took the first one's place (its host record,
/// orders and session).
pub fn fresh_agent_id(taken: impl Fn(&str) -> bool) -> String {
    untaken(|| format!("agent-{}", random_hex(4)), taken)
}

/// The first of `draw`'s ids that is not `taken`.
fn untaken(mut draw: impl FnMut() -> String, taken: impl Fn(&str) -> bool) -> String {
    loop {
        let id = draw();
        if !taken(&id) {
            return id;
        }
    }
}

/// An id an agent may give as its previous one.
pub fn valid_agent_id(id: &str) -> bool {
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

fn humantime_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (h, m, s) = (secs / 3600 % 24, secs / 60 % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_id_is_drawn_again_while_an_agent_has_it() {
        let known = ["agent-0000abcd", "agent-0000beef"];
        let mut draws = ["agent-0000abcd", "agent-0000beef", "agent-00c0ffee"].into_iter();
        let id = untaken(
            || draws.next().expect("three draws at most").to_string(),
            |id| known.contains(&id),
        );
        assert_eq!(id, "agent-00c0ffee");
        // The real draw: the form the ids have, never a known one.
        let id = fresh_agent_id(|id| known.contains(&id));
        assert!(id.starts_with("agent-") && id.len() == 14, "{id}");
        assert!(valid_agent_id(&id), "{id}");
    }
}
