//! The control session with the coordinator: Join, then one bidirectional stream (Hello,
//! inventory, progress, reports, heartbeats out; orders in), reconnected with exponential
//! backoff and re-joined when the coordinator no longer knows the session.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::pb::v1::agent_session_client::AgentSessionClient;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::counters::Counters;
use crate::error::AgentError;
use crate::execute::Executor;
use crate::link::Outbox;
use crate::renew::Certificate;
use crate::shutdown::{Stop, stopped};
use crate::transport::ChunkEndpoint;

/// Progress is reported at most this often (one batch across all orders).
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// A session up this long (or that received a message) resets the reconnect backoff.
const STABLE_AFTER: Duration = Duration::from_secs(5);
const LOAD_EVERY: Duration = Duration::from_secs(5);
/// Blobs per inventory message (about 100 bytes each for complete blobs; keeps a message
/// well under 1 MiB).
const INVENTORY_BATCH: usize = 2000;
/// Terminal reports (done/failed) sent this long before a session broke are sent again on
/// the next session, since they may have been lost with it. The coordinator treats a
/// repeated report for the same order id as a no-op.
const RESEND_WINDOW: Duration = Duration::from_secs(10);

/// What the session task needs: the executor (the order table, the store and the link to
/// the coordinator, whose other end this task is) and what it reports on.
#[derive(Debug)]
pub(crate) struct Session {
    pub config: Arc<AgentConfig>,
    pub quic_addr: SocketAddr,
    pub endpoint: ChunkEndpoint,
    pub counters: Counters,
    pub executor: Executor,
    pub stop: Stop,
    /// The agent's key and certificate: each re-join asks for a new one, under the id it
    /// gets.
    pub certificate: Certificate,
    /// What its links were seen to carry (reported with each load report).
    pub learned: crate::capacity::Learned,
}

/// A successful Join.
#[derive(Clone, Debug)]
pub(crate) struct Joined {
    pub response: pb::JoinResponse,
}

fn join_request(
    config: &AgentConfig,
    quic_addr: SocketAddr,
    previous_id: &str,
    csr_der: &[u8],
) -> pb::JoinRequest {
    let declared = crate::capacity::declared(config);
    pb::JoinRequest {
        token: config.join_token.clone(),
        labels: config.labels.clone().into_iter().collect(),
        quic_addresses: vec![quic_addr.to_string()],
        upload_capacity_bytes_per_sec: declared.0,
        download_capacity_bytes_per_sec: declared.1,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        previous_agent_id: previous_id.to_string(),
        csr_der: csr_der.to_vec(),
        protocol: shoal_proto::SESSION_PROTOCOL,
        agent_secret: std::fs::read_to_string(secret_path(config))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

/// Where the secret that proves the agent's id is kept (`data_dir/agent-secret`, 0600).
fn secret_path(config: &AgentConfig) -> std::path::PathBuf {
    config.data_dir.join("agent-secret")
}

/// Keeps a secret the coordinator issued with our id, readable by the agent's user only.
fn persist_secret(config: &AgentConfig, secret: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = secret_path(config);
    let tmp = path.with_extension("tmp");
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{secret}\n").as_bytes())
                .and_then(|()| f.sync_all())
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not keep the agent's secret: the next join gets a new id");
    }
}

/// Joins, retrying with backoff while the coordinator is unreachable or unavailable. A
/// refusal (bad token, invalid request) fails at once: retrying cannot fix it.
pub(crate) async fn join_until_accepted(
    channel: &Channel,
    config: &AgentConfig,
    quic_addr: SocketAddr,
    previous_id: &str,
    csr_der: &[u8],
    mut stop: watch::Receiver<bool>,
) -> Result<Joined, AgentError> {
    let mut client = AgentSessionClient::new(channel.clone());
    let mut backoff = Backoff::new();
    loop {
        let request = join_request(config, quic_addr, previous_id, csr_der);
        match client.join(request).await {
            Ok(r) => {
                let response = r.into_inner();
                if !response.agent_secret.is_empty() {
                    persist_secret(config, &response.agent_secret);
                }
                return Ok(Joined { response });
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unauthenticated
                        | Code::InvalidArgument
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                ) =>
            {
                return Err(AgentError::Join {
                    coordinator: config.coordinator.clone(),
                    message: s.message().to_string(),
                });
            }
            Err(s) => {
                let delay = backoff.next_delay();
                tracing::warn!(coordinator = %config.coordinator, code = ?s.code(), error = s.message(), retry_in = ?delay, "join failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => return Err(AgentError::Interrupted),
                }
            }
        }
    }
}

/// How one session stream ended.
enum Ended {
    Shutdown,
    /// The coordinator no longer knows us: Join again.
    Rejoin(String),
    Broken(String),
}

/// Runs the session until shutdown, reconnecting forever.
pub(crate) async fn run(shared: Session, mut joined: Joined, mut outbox: Outbox) {
    let link = shared.executor.coordinator.clone();
    let mut stop = shared.stop.clone();
    let mut backoff = Backoff::new();
    let mut recent: VecDeque<(Instant, pb::AgentMessage)> = VecDeque::new();
    loop {
        let ended = connect_once(&shared, &joined, &mut outbox, &mut recent, &mut backoff).await;
        link.set_connected(false);
        metrics::gauge!(crate::metrics::SESSION_CONNECTED).set(0.0);
        let rejoin = match ended {
            Ended::Shutdown => return,
            Ended::Rejoin(why) => {
                tracing::warn!(
                    reason = why,
                    "coordinator dropped the session; joining again"
                );
                true
            }
            Ended::Broken(why) => {
                tracing::warn!(reason = why, "session with the coordinator broke");
                false
            }
        };
        let delay = backoff.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return,
        }
        if rejoin {
            let id = link.agent_id();
            // The QUIC endpoint keeps the certificate from the first join (peers check that
            // the cluster CA signed it); the coordinator channel needs one naming the
            // current id, so a new id comes with a new certificate for the same key.
            let request_id = id.clone();
            let joined_again = match shared.certificate.join_channel() {
                Ok(channel) => {
                    join_until_accepted(
                        &channel,
                        &shared.config,
                        shared.quic_addr,
                        &request_id,
                        shared.certificate.request().csr_der(),
                        stop.clone(),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match joined_again {
                Ok(j) => {
                    let new_id = j.response.agent_id != id;
                    // A fresh certificate comes with every join. Under a new id, peers must
                    // not meet the old name: the endpoint's open connections close.
                    if !j.response.certificate_der.is_empty() {
                        shared.certificate.install(
                            j.response.certificate_der.clone(),
                            j.response.ca_certificates_der.clone(),
                            new_id,
                        );
                    }
                    if new_id {
                        tracing::warn!(
                            old = id,
                            new = j.response.agent_id,
                            "coordinator assigned a new agent id"
                        );
                        link.set_agent_id(j.response.agent_id.clone());
                        let path = shared.config.data_dir.join("agent-id");
                        let _ = std::fs::write(path, format!("{}\n", j.response.agent_id));
                    }
                    joined = j;
                }
                Err(AgentError::Interrupted) => return,
                Err(e) => {
                    tracing::error!(error = %e, "re-joining the coordinator failed; will retry");
                }
            }
        }
    }
}

/// One session stream, from Hello to its end.
async fn connect_once(
    shared: &Session,
    joined: &Joined,
    outbox: &mut mpsc::UnboundedReceiver<pb::AgentMessage>,
    recent: &mut VecDeque<(Instant, pb::AgentMessage)>,
    backoff: &mut Backoff,
) -> Ended {
    let link = &shared.executor.coordinator;
    let mut stop = shared.stop.clone();
    if *stop.borrow() {
        return Ended::Shutdown;
    }
    let cutoff = Instant::now() - RESEND_WINDOW;
    recent.retain(|(at, _)| *at >= cutoff);
    // A blob removed since (evicted, or by RemoveBlob) must not come back to the catalog
    // through a resent report that it is held.
    let store = &shared.executor.store;
    recent.retain(|(_, m)| match &m.msg {
        Some(Msg::BlobDone(d)) => held_whole(store, &d.blob_digest),
        Some(Msg::BlobRegistered(r)) => r
            .manifest
            .as_ref()
            .is_none_or(|m| held_whole(store, &m.digest)),
        _ => true,
    });
    let hello = Msg::Hello(pb::Hello {
        agent_id: joined.response.agent_id.clone(),
        session_token: joined.response.session_token.clone(),
        quic_addresses: vec![shared.quic_addr.to_string()],
    });
    let mut first = vec![hello];
    first.extend(inventory(shared).await.into_iter().map(Msg::Inventory));
    // Room for the opening messages, so they are queued before the stream starts.
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(first.len() + recent.len() + 256);
    for m in first {
        let _ = tx.try_send(pb::AgentMessage { msg: Some(m) });
    }
    for (_, m) in recent.iter() {
        let _ = tx.try_send(m.clone());
    }

    // Orders carry manifests: 32 MiB for a 1 TiB blob, past tonic's 4 MiB default.
    let mut client = AgentSessionClient::new(link.channel())
        .max_decoding_message_size(shoal_proto::MAX_SESSION_MESSAGE_BYTES);
    let connect = client.session(ReceiverStream::new(rx));
    let mut inbound = tokio::select! {
        r = connect => match r {
            Ok(r) => r.into_inner(),
            Err(s) => return ended_by(s),
        },
        () = stopped(&mut stop) => return Ended::Shutdown,
    };
    link.set_connected(true);
    metrics::gauge!(crate::metrics::SESSION_CONNECTED).set(1.0);
    tracing::info!(agent_id = joined.response.agent_id, "session established");

    let beat_every = heartbeat_interval(&joined.response);
    let mut heartbeat = tokio::time::interval(beat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut load = tokio::time::interval(LOAD_EVERY);
    load.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_sent = Instant::now();
    let mut uploaded = UploadRate::new(shared);
    let mut received = crate::capacity::Window::default();
    let connected_at = Instant::now();
    let mut stable = false;
    loop {
        if !stable && connected_at.elapsed() >= STABLE_AFTER {
            backoff.reset();
            stable = true;
        }
        let out: Option<pb::AgentMessage> = tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    if !stable {
                        // Something arrived: the coordinator accepted the session.
                        backoff.reset();
                        stable = true;
                    }
                    if let Some(msg) = m.msg {
                        shared.executor.handle(msg);
                    }
                    None
                }
                Ok(None) => return Ended::Broken("coordinator closed the session".into()),
                Err(s) => return ended_by(s),
            },
            m = outbox.recv() => {
                let Some(m) = m else { return Ended::Shutdown };
                if matches!(m.msg, Some(Msg::BlobDone(_) | Msg::BlobFailed(_) | Msg::BlobRegistered(_) | Msg::RangeSeeded(_))) {
                    recent.push_back((Instant::now(), m.clone()));
                    if recent.len() > 4096 {
                        recent.pop_front();
                    }
                }
                Some(m)
            }
            _ = progress.tick() => {
                let now = std::time::Instant::now();
                let downloaded = received.rate(now, shared.counters.fetched().0);
                shared.learned.observe(now, shared.endpoint.upload_rate(), downloaded);
                shared.executor.orders.progress_batch().map(|b| pb::AgentMessage { msg: Some(Msg::Progress(b)) })
            }
            _ = load.tick() => {
                let report = load_report(shared, uploaded.rate(shared));
                Some(pb::AgentMessage { msg: Some(Msg::Load(report)) })
            }
            _ = heartbeat.tick() => {
                if last_sent.elapsed() >= beat_every {
                    Some(pb::AgentMessage { msg: Some(Msg::Heartbeat(pb::Heartbeat {})) })
                } else {
                    None
                }
            }
            () = stopped(&mut stop) => return Ended::Shutdown,
        };
        if let Some(m) = out {
            if tx.send(m).await.is_err() {
                return Ended::Broken("session stream closed".into());
            }
            last_sent = Instant::now();
        }
    }
}

fn ended_by(s: tonic::Status) -> Ended {
    match s.code() {
        Code::Unauthenticated | Code::NotFound => Ended::Rejoin(s.message().to_string()),
        code => Ended::Broken(format!("{code:?}: {}", s.message())),
    }
}

/// The coordinator's interval; 5 s if it names none (every coordinator of protocol 1 does).
fn heartbeat_interval(r: &pb::JoinResponse) -> Duration {
    let ms = match r.heartbeat_interval_ms {
        0 => 5_000,
        hb => hb,
    };
    Duration::from_millis(ms.max(100))
}

/// The full inventory: a replace=true message, then more if the store is large.
async fn inventory(shared: &Session) -> Vec<pb::Inventory> {
    let store = shared.executor.store.clone();
    let held = tokio::task::spawn_blocking(move || {
        store
            .blobs()
            .into_iter()
            .map(|b| {
                let complete = b.present == b.chunk_count;
                let chunks = (!complete).then(|| {
                    let (chunk_count, bits) = store.bitfield(&b.digest).unwrap_or_default();
                    pb::ChunkBitmap {
                        chunk_count,
                        bits: bits.to_vec(),
                    }
                });
                pb::HeldBlob {
                    blob_digest: b.digest.as_bytes().to_vec(),
                    complete,
                    chunks,
                    pinned: b.pinned,
                }
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut messages: Vec<pb::Inventory> = held
        .chunks(INVENTORY_BATCH)
        .map(|c| pb::Inventory {
            replace: false,
            blobs: c.to_vec(),
            removed_blobs: Vec::new(),
        })
        .collect();
    if messages.is_empty() {
        messages.push(pb::Inventory::default());
    }
    messages[0].replace = true;
    messages
}

/// Bytes served to peers per second since the previous load report.
struct UploadRate {
    bytes: u64,
    at: Instant,
}

impl UploadRate {
    fn new(shared: &Session) -> Self {
        Self {
            bytes: shared.endpoint.serve_stats().bytes_served,
            at: Instant::now(),
        }
    }

    /// Measures, and records the rate for the local Status call too.
    fn rate(&mut self, shared: &Session) -> u64 {
        let now = Self::new(shared);
        let secs = now.at.duration_since(self.at).as_secs_f64();
        let rate = (now.bytes.saturating_sub(self.bytes) as f64 / secs.max(1e-3)) as u64;
        *self = now;
        shared.counters.set_upload_rate(rate);
        rate
    }
}

fn load_report(shared: &Session, upload_bytes_per_sec: u64) -> pb::Load {
    let orders = &shared.executor.orders;
    let (learned_up, learned_down) = shared.learned.capacities(std::time::Instant::now());
    metrics::gauge!(crate::metrics::DOWNLOAD_CAPACITY).set(learned_down as f64);
    pb::Load {
        upload_bytes_per_sec,
        download_bytes_per_sec: orders.download_rate(),
        disk_free_bytes: shared.executor.store.free_bytes(),
        learned_upload_bytes_per_sec: learned_up,
        learned_download_bytes_per_sec: learned_down,
    }
}

/// Whether the store holds the blob whose 32 raw digest bytes are `digest`, whole.
fn held_whole(store: &crate::store::Store, digest: &[u8]) -> bool {
    shoal_proto::Digest::from_slice(digest).is_ok_and(|d| store.is_complete(&d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_beats_at_the_interval_its_coordinator_names() {
        let joined = |ms| pb::JoinResponse {
            heartbeat_interval_ms: ms,
            ..Default::default()
        };
        assert_eq!(
            heartbeat_interval(&joined(1_250)),
            Duration::from_millis(1_250)
        );
        assert_eq!(heartbeat_interval(&joined(0)), Duration::from_secs(5));
    }
}
