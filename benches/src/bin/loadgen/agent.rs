//! One simulated agent: Join, then the session as `agent/src/session.rs` runs it (Hello, a
//! full inventory, a Load at once and every 5 s, progress of running orders every
//! `progress_ms`, a Heartbeat when nothing else went out for the interval, terminal reports
//! of the last 10 s sent again on a new session), reconnected with the real agent's backoff
//! and joined again (its id and secret) when the coordinator no longer knows the session.
//! Orders are not fetched: each completes after size ÷ link rate (× time scale).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::pb::v1::agent_session_client::AgentSessionClient;
use shoal_proto::pb::v1::coordinator_message::Msg as CMsg;
use shoal_proto::pb::v1::{self as pb, fetch_order};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tonic::Code;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Kinds of coordinator → agent messages, in `Counts::received` order.
pub const RECEIVED: [&str; 8] = [
    "fetch_order",
    "source_update",
    "cancel",
    "chunk_digests",
    "drop_blob",
    "revoked_agents",
    "register_blobs",
    "empty",
];

/// Kinds of agent → coordinator messages, in `Counts::sent` order.
pub const SENT: [&str; 7] = [
    "hello",
    "inventory",
    "progress",
    "blob_done",
    "load",
    "blob_registered",
    "heartbeat",
];

/// As the real agent: a load report this often, terminal reports resent within this window.
const LOAD_EVERY: Duration = Duration::from_secs(5);
const RESEND_WINDOW: Duration = Duration::from_secs(10);
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Message counters and order anomalies, shared by every agent.
#[derive(Debug, Default)]
pub struct Counts {
    pub received: [AtomicU64; RECEIVED.len()],
    /// Encoded bytes of the coordinator's messages, by kind (as `received`).
    pub received_bytes: [AtomicU64; RECEIVED.len()],
    pub sent: [AtomicU64; SENT.len()],
    /// A FetchOrder whose id this agent already runs (a resend on a new session).
    pub resent_orders: AtomicU64,
    /// A FetchOrder for a blob this agent already holds whole (answered BlobDone at once).
    pub orders_for_held: AtomicU64,
    /// FetchOrders that were not `FromPeers`.
    pub orders_not_from_peers: AtomicU64,
    /// Join attempts refused or failed, retried.
    pub join_errors: AtomicU64,
    /// Session attempts that failed or broke.
    pub session_breaks: AtomicU64,
    /// Sessions that ended with UNAUTHENTICATED / NOT_FOUND (rejoined).
    pub rejoins: AtomicU64,
    /// Agents that got a new id at a rejoin (their secret was not honoured).
    pub new_ids: AtomicU64,
    /// Agents that gave up (a Join refused for good).
    pub gave_up: AtomicU64,
    /// Why the first sessions broke (at most [`BREAK_REASONS`]).
    pub break_reasons: Mutex<Vec<String>>,
}

/// Reasons for breaks kept at most.
const BREAK_REASONS: usize = 5;

impl Counts {
    fn break_reason(&self, why: String) {
        if let Ok(mut reasons) = self.break_reasons.lock()
            && reasons.len() < BREAK_REASONS
        {
            reasons.push(why);
        }
    }
}

/// What every agent shares: parameters, the blob, counters, and what the driver reads.
#[derive(Debug)]
pub struct Shared {
    pub token: String,
    pub link_bytes_per_sec: f64,
    pub time_scale: f64,
    pub progress_every: Duration,
    /// The blob's manifest, once made; its holders register it again when asked.
    pub manifest: OnceLock<pb::Manifest>,
    pub counts: Counts,
    /// 0 until the restart, 1 after: which latency list a Join goes to.
    pub phase: AtomicU8,
    pub join_latencies: [Mutex<Vec<f64>>; 2],
    /// Agents that sent a full inventory since the restart.
    pub inventoried_after_restart: AtomicUsize,
    /// Sessions open now (the coordinator answered the session call).
    pub sessions_up: AtomicUsize,
    pub holders: AtomicUsize,
    /// When FetchOrders last arrived, µs since `base` (0: none yet).
    pub last_order_us: AtomicU64,
    pub base: Instant,
    /// Bounds the first Joins (the rejoins after a restart are not bounded: real agents are
    /// separate hosts).
    pub first_joins: Semaphore,
    pub stop: watch::Receiver<bool>,
}

impl Shared {
    pub fn since_base_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

/// What the driver tells an agent.
#[derive(Debug)]
pub enum Control {
    /// Register the blob (BlobRegistered) and report it held whole.
    Register,
}

/// An order being "fetched".
#[derive(Debug)]
struct Running {
    digest: Vec<u8>,
    started: Instant,
    done_at: Instant,
    chunks: u32,
    chunk_size: u64,
    size: u64,
    /// Chunks the last progress report said (a real agent reports only what changed).
    reported: u32,
}

#[derive(Debug)]
enum Ended {
    Shutdown,
    /// The coordinator refused the session (UNAUTHENTICATED / NOT_FOUND): why.
    Rejoin(String),
    /// The session failed or broke: why.
    Broken(String),
}

/// A simulated agent.
#[derive(Debug)]
pub struct Agent {
    pub index: usize,
    pub channel: Channel,
    pub shared: Arc<Shared>,
    pub control: Option<mpsc::UnboundedReceiver<Control>>,
    id: String,
    secret: String,
    joined: pb::JoinResponse,
    held: Option<Vec<u8>>,
    recent: VecDeque<(Instant, pb::AgentMessage)>,
    inventoried_after_restart: bool,
}

/// The real agent's backoff: doubling from 100 ms to 5 s, each delay drawn from
/// [half, all] of its step.
#[derive(Debug)]
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }
    fn reset(&mut self) {
        *self = Self::new();
    }
    fn next_delay(&mut self) -> Duration {
        let cap = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        cap.mul_f64(rand::random_range(0.5..1.0))
    }
}

fn say(msg: Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

fn sent_kind(m: &pb::AgentMessage) -> Option<usize> {
    Some(match m.msg.as_ref()? {
        Msg::Hello(_) => 0,
        Msg::Inventory(_) => 1,
        Msg::Progress(_) => 2,
        Msg::BlobDone(_) => 3,
        Msg::Load(_) => 4,
        Msg::BlobRegistered(_) => 5,
        Msg::Heartbeat(_) => 6,
        _ => return None,
    })
}

fn received_kind(m: &pb::CoordinatorMessage) -> usize {
    match &m.msg {
        Some(CMsg::FetchOrder(_)) => 0,
        Some(CMsg::SourceUpdate(_)) => 1,
        Some(CMsg::Cancel(_)) => 2,
        Some(CMsg::ChunkDigests(_)) => 3,
        Some(CMsg::DropBlob(_)) => 4,
        Some(CMsg::RevokedAgents(_)) => 5,
        Some(CMsg::RegisterBlobs(_)) => 6,
        None => 7,
    }
}

impl Agent {
    pub fn new(
        index: usize,
        channel: Channel,
        shared: Arc<Shared>,
        control: Option<mpsc::UnboundedReceiver<Control>>,
    ) -> Self {
        Self {
            index,
            channel,
            shared,
            control,
            id: String::new(),
            secret: String::new(),
            joined: pb::JoinResponse::default(),
            held: None,
            recent: VecDeque::new(),
            inventoried_after_restart: false,
        }
    }

    /// Joins, then keeps a session up until the driver stops everything.
    pub async fn run(mut self) {
        let mut stop = self.shared.stop.clone();
        let mut backoff = Backoff::new();
        let mut join = true;
        loop {
            if join && !self.join(&mut stop).await {
                return;
            }
            let ended = self.session(&mut backoff).await;
            // The run's end kills the coordinator: a session that saw that before the
            // stop is no break.
            if *stop.borrow() {
                return;
            }
            let why = match ended {
                Ended::Shutdown => return,
                Ended::Rejoin(why) => {
                    self.shared.counts.rejoins.fetch_add(1, Ordering::Relaxed);
                    join = true;
                    why
                }
                Ended::Broken(why) => {
                    join = false;
                    why
                }
            };
            self.shared
                .counts
                .session_breaks
                .fetch_add(1, Ordering::Relaxed);
            self.shared.counts.break_reason(format!(
                "agent {} in phase {}: {why}",
                self.index,
                self.shared.phase.load(Ordering::Relaxed)
            ));
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    fn join_request(&self) -> pb::JoinRequest {
        let i = self.index as u32;
        let rate = self.shared.link_bytes_per_sec as u64;
        pb::JoinRequest {
            token: self.shared.token.clone(),
            labels: [
                ("host".to_string(), format!("sim-{i}")),
                ("zone".to_string(), format!("z{}", i % 4)),
                ("rack".to_string(), format!("r{}", i % 64)),
            ]
            .into_iter()
            .collect(),
            // Never dialled: no agent runs QUIC here, and peers are never contacted.
            quic_addresses: vec![format!(
                "127.{}.{}.{}:7401",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )],
            upload_capacity_bytes_per_sec: rate,
            download_capacity_bytes_per_sec: rate,
            agent_version: "loadgen".into(),
            previous_agent_id: self.id.clone(),
            csr_der: Vec::new(),
            protocol: shoal_proto::SESSION_PROTOCOL,
            agent_secret: self.secret.clone(),
        }
    }

    /// Joins until accepted, as the real agent: a refusal ends the agent, anything else is
    /// retried with backoff. False: stopped or refused.
    async fn join(&mut self, stop: &mut watch::Receiver<bool>) -> bool {
        let phase = self.shared.phase.load(Ordering::Relaxed).min(1) as usize;
        let _permit = if phase == 0 {
            self.shared.first_joins.acquire().await.ok()
        } else {
            None
        };
        let mut client = AgentSessionClient::new(self.channel.clone());
        let mut backoff = Backoff::new();
        loop {
            let started = Instant::now();
            match client.join(self.join_request()).await {
                Ok(r) => {
                    let latency = started.elapsed().as_secs_f64();
                    if let Ok(mut l) = self.shared.join_latencies[phase].lock() {
                        l.push(latency);
                    }
                    let r = r.into_inner();
                    if !self.id.is_empty() && r.agent_id != self.id {
                        self.shared.counts.new_ids.fetch_add(1, Ordering::Relaxed);
                    }
                    self.id.clone_from(&r.agent_id);
                    if !r.agent_secret.is_empty() {
                        self.secret.clone_from(&r.agent_secret);
                    }
                    self.joined = r;
                    return true;
                }
                Err(s) => {
                    self.shared
                        .counts
                        .join_errors
                        .fetch_add(1, Ordering::Relaxed);
                    if matches!(
                        s.code(),
                        Code::Unauthenticated
                            | Code::InvalidArgument
                            | Code::PermissionDenied
                            | Code::FailedPrecondition
                    ) {
                        eprintln!("agent {}: join refused: {s}", self.index);
                        self.shared.counts.gave_up.fetch_add(1, Ordering::Relaxed);
                        return false;
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(backoff.next_delay()) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
    }

    fn inventory(&self) -> pb::Inventory {
        pb::Inventory {
            replace: true,
            blobs: (self.held.iter())
                .map(|d| pb::HeldBlob {
                    blob_digest: d.clone(),
                    complete: true,
                    chunks: None,
                    pinned: false,
                })
                .collect(),
            removed_blobs: Vec::new(),
        }
    }

    async fn send(&mut self, tx: &mpsc::Sender<pb::AgentMessage>, m: pb::AgentMessage) -> bool {
        if let Some(k) = sent_kind(&m) {
            self.shared.counts.sent[k].fetch_add(1, Ordering::Relaxed);
        }
        if matches!(m.msg, Some(Msg::BlobDone(_) | Msg::BlobRegistered(_))) {
            self.recent.push_back((Instant::now(), m.clone()));
        }
        tx.send(m).await.is_ok()
    }

    fn registered(&self) -> Option<pb::AgentMessage> {
        let manifest = self.shared.manifest.get()?.clone();
        Some(say(Msg::BlobRegistered(pb::BlobRegistered {
            manifest: Some(manifest),
        })))
    }

    /// Becomes a holder of `digest`.
    fn hold(&mut self, digest: Vec<u8>) {
        if self.held.is_none() {
            self.shared.holders.fetch_add(1, Ordering::Relaxed);
        }
        self.held = Some(digest);
    }

    /// One session, from Hello to its end.
    async fn session(&mut self, backoff: &mut Backoff) -> Ended {
        let mut stop = self.shared.stop.clone();
        let cutoff = Instant::now() - RESEND_WINDOW;
        self.recent.retain(|(at, _)| *at >= cutoff);
        let (tx, rx) = mpsc::channel(self.recent.len() + 64);
        let hello = say(Msg::Hello(pb::Hello {
            agent_id: self.id.clone(),
            session_token: self.joined.session_token.clone(),
            quic_addresses: Vec::new(),
        }));
        let mut first = vec![hello, say(Msg::Inventory(self.inventory()))];
        first.extend(self.recent.iter().map(|(_, m)| m.clone()));
        for m in first {
            if let Some(k) = sent_kind(&m) {
                self.shared.counts.sent[k].fetch_add(1, Ordering::Relaxed);
            }
            let _ = tx.try_send(m);
        }
        let mut client = AgentSessionClient::new(self.channel.clone())
            .max_decoding_message_size(shoal_proto::MAX_SESSION_MESSAGE_BYTES);
        let mut inbound = tokio::select! {
            r = client.session(ReceiverStream::new(rx)) => match r {
                Ok(r) => r.into_inner(),
                Err(s) => return ended_by(&s),
            },
            _ = stop.wait_for(|s| *s) => return Ended::Shutdown,
        };
        self.shared.sessions_up.fetch_add(1, Ordering::Relaxed);
        // Accepted: its inventory follows the Hello the coordinator took.
        if self.shared.phase.load(Ordering::Relaxed) == 1 && !self.inventoried_after_restart {
            self.inventoried_after_restart = true;
            (self.shared.inventoried_after_restart).fetch_add(1, Ordering::Relaxed);
        }
        let ended = self.serve(&tx, &mut inbound, backoff).await;
        self.shared.sessions_up.fetch_sub(1, Ordering::Relaxed);
        ended
    }

    async fn serve(
        &mut self,
        tx: &mpsc::Sender<pb::AgentMessage>,
        inbound: &mut tonic::Streaming<pb::CoordinatorMessage>,
        backoff: &mut Backoff,
    ) -> Ended {
        let mut stop = self.shared.stop.clone();
        let beat_every = Duration::from_millis(match self.joined.heartbeat_interval_ms {
            0 => 2_000,
            ms => ms.max(100),
        });
        let mut heartbeat = tokio::time::interval(beat_every);
        let mut progress = tokio::time::interval(self.shared.progress_every);
        let mut load = tokio::time::interval(LOAD_EVERY);
        for i in [&mut heartbeat, &mut progress, &mut load] {
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        let mut orders: HashMap<u64, Running> = HashMap::new();
        let mut last_sent = Instant::now();
        let connected_at = Instant::now();
        let mut stable = false;
        let mut control = self.control.take();
        let ended = loop {
            if !stable && connected_at.elapsed() >= STABLE_AFTER {
                backoff.reset();
                stable = true;
            }
            let next_done = orders.values().map(|r| r.done_at).min();
            let out: Vec<pb::AgentMessage> = tokio::select! {
                m = inbound.message() => match m {
                    Ok(Some(m)) => {
                        if !stable {
                            backoff.reset();
                            stable = true;
                        }
                        self.received(m, &mut orders)
                    }
                    Ok(None) => break Ended::Broken("the coordinator ended the session".into()),
                    Err(s) => break ended_by(&s),
                },
                Some(c) = recv(&mut control) => match c {
                    Control::Register => {
                        let Some(m) = self.shared.manifest.get() else { continue };
                        self.hold(m.digest.clone());
                        let mut inv = self.inventory();
                        inv.replace = false;
                        self.registered().into_iter().chain([say(Msg::Inventory(inv))]).collect()
                    }
                },
                () = sleep_until(next_done) => self.finish(&mut orders),
                // Ticking whether or not an order runs, as a real agent's does: a guard here
                // made the tick, long due, fire the moment an order arrived, and every agent
                // sent a progress of nothing at the start of each order.
                _ = progress.tick() => {
                    self.progress(&mut orders).map(|b| say(Msg::Progress(b))).into_iter().collect()
                }
                _ = load.tick() => {
                    let rate = if orders.is_empty() { 0 } else { self.shared.link_bytes_per_sec as u64 };
                    vec![say(Msg::Load(pb::Load {
                        upload_bytes_per_sec: 0,
                        download_bytes_per_sec: rate,
                        disk_free_bytes: 1 << 40,
                        // A real agent learns its link from its first transfers and keeps it.
                        learned_upload_bytes_per_sec: 0,
                        learned_download_bytes_per_sec: self.shared.link_bytes_per_sec as u64,
                    }))]
                }
                _ = heartbeat.tick() => {
                    if last_sent.elapsed() >= beat_every {
                        vec![say(Msg::Heartbeat(pb::Heartbeat {}))]
                    } else {
                        Vec::new()
                    }
                }
                _ = stop.wait_for(|s| *s) => break Ended::Shutdown,
            };
            for m in out {
                if !self.send(tx, m).await {
                    break;
                }
                last_sent = Instant::now();
            }
            if tx.is_closed() {
                break Ended::Broken("the session's sending half closed".into());
            }
        };
        self.control = control;
        if self.recent.len() > 64 {
            let cutoff = Instant::now() - RESEND_WINDOW;
            self.recent.retain(|(at, _)| *at >= cutoff);
        }
        ended
    }

    /// Obeys one coordinator message; what to send back.
    fn received(
        &mut self,
        m: pb::CoordinatorMessage,
        orders: &mut HashMap<u64, Running>,
    ) -> Vec<pb::AgentMessage> {
        let counts = &self.shared.counts;
        let kind = received_kind(&m);
        counts.received[kind].fetch_add(1, Ordering::Relaxed);
        counts.received_bytes[kind]
            .fetch_add(prost::Message::encoded_len(&m) as u64, Ordering::Relaxed);
        match m.msg {
            Some(CMsg::FetchOrder(o)) => {
                (self.shared.last_order_us)
                    .fetch_max(self.shared.since_base_us(), Ordering::Relaxed);
                if self.held.as_ref() == Some(&o.blob_digest) {
                    counts.orders_for_held.fetch_add(1, Ordering::Relaxed);
                    return vec![say(Msg::BlobDone(pb::BlobDone {
                        blob_digest: o.blob_digest,
                    }))];
                }
                if orders.contains_key(&o.order_id) {
                    counts.resent_orders.fetch_add(1, Ordering::Relaxed);
                    return Vec::new();
                }
                let manifest = match &o.kind {
                    Some(fetch_order::Kind::Peers(p)) => p.manifest.clone(),
                    _ => {
                        counts.orders_not_from_peers.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                };
                let Some(manifest) = manifest.or_else(|| self.shared.manifest.get().cloned())
                else {
                    return Vec::new();
                };
                // A new order for a blob replaces the one before it; the chunks stay.
                let before = (orders.iter())
                    .find(|(_, r)| r.digest == o.blob_digest)
                    .map(|(id, r)| (*id, r.started, r.done_at));
                let now = Instant::now();
                let bits = manifest.size as f64 * 8.0;
                let secs = bits / (self.shared.link_bytes_per_sec * 8.0) * self.shared.time_scale;
                let (started, done_at) = match before {
                    Some((id, started, done_at)) => {
                        orders.remove(&id);
                        (started, done_at)
                    }
                    None => (now, now + Duration::from_secs_f64(secs)),
                };
                let chunk_size = u64::from(manifest.chunk_size.max(1));
                orders.insert(
                    o.order_id,
                    Running {
                        digest: o.blob_digest,
                        started,
                        done_at,
                        chunks: manifest.size.div_ceil(chunk_size) as u32,
                        chunk_size,
                        size: manifest.size,
                        reported: 0,
                    },
                );
                Vec::new()
            }
            Some(CMsg::Cancel(c)) => {
                orders.remove(&c.order_id);
                Vec::new()
            }
            Some(CMsg::RegisterBlobs(r)) => {
                let holds = (self.held.as_ref()).is_some_and(|h| r.blob_digests.contains(h));
                if holds {
                    self.registered().into_iter().collect()
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// Orders whose time is up: BlobDone, and the agent holds the blob.
    fn finish(&mut self, orders: &mut HashMap<u64, Running>) -> Vec<pb::AgentMessage> {
        let now = Instant::now();
        let done: Vec<u64> = (orders.iter())
            .filter(|(_, r)| r.done_at <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in done {
            if let Some(r) = orders.remove(&id) {
                self.hold(r.digest.clone());
                out.push(say(Msg::BlobDone(pb::BlobDone {
                    blob_digest: r.digest,
                })));
            }
        }
        out
    }

    /// Chunks verified grow linearly from the order's start to its end; the orders that
    /// verified chunks since their last report, as `agent/src/orders.rs` reports them.
    fn progress(&self, orders: &mut HashMap<u64, Running>) -> Option<pb::ProgressBatch> {
        let now = Instant::now();
        let items: Vec<pb::BlobProgress> = (orders.iter_mut())
            .filter_map(|(id, r)| {
                let total = r.done_at.duration_since(r.started).as_secs_f64().max(1e-6);
                let part = (now.duration_since(r.started).as_secs_f64() / total).min(1.0);
                let chunks = ((f64::from(r.chunks) * part) as u32).min(r.chunks);
                if chunks <= r.reported {
                    return None;
                }
                r.reported = chunks;
                Some(pb::BlobProgress {
                    order_id: *id,
                    blob_digest: r.digest.clone(),
                    chunks_verified: chunks,
                    bytes_done: (u64::from(chunks) * r.chunk_size).min(r.size),
                    rate_bytes_per_sec: self.shared.link_bytes_per_sec as u64,
                })
            })
            .collect();
        (!items.is_empty()).then_some(pb::ProgressBatch { items })
    }
}

async fn recv(control: &mut Option<mpsc::UnboundedReceiver<Control>>) -> Option<Control> {
    match control {
        Some(c) => c.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn ended_by(s: &tonic::Status) -> Ended {
    match s.code() {
        Code::Unauthenticated | Code::NotFound => Ended::Rejoin(format!("{s}")),
        _ => Ended::Broken(format!("{s}")),
    }
}
