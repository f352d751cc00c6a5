//! The sources of one download: each source's have-stream watcher (reconnecting with
//! backoff), and the rules that drop a source and report it to the coordinator: silent with
//! requests in flight, unreachable after it was reached, never reachable with the blob, or
//! answering NotFound for chunks it announced.

use std::net::SocketAddr;
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_message::Msg;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{Download, SourceKey, host};
use crate::backoff::Backoff;
use crate::transport::{ChunkEndpoint, HaveUpdate, Peer};

/// Longest pause between attempts to reach a source's have-stream.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What a source's watcher task reports.
#[derive(Debug)]
pub(super) enum SourceEvent {
    Ready(SourceKey, Peer),
    Have(SourceKey, HaveUpdate),
    Down(SourceKey, String),
}

#[derive(Debug)]
pub(super) struct Source {
    pub(super) agent_id: String,
    pub(super) peer: Option<Peer>,
    pub(super) paused_until: Option<Instant>,
    pub(super) watcher: AbortHandle,
    /// The connection's received bytes when last seen to change (or when nothing was
    /// asked of it), and when: the stall clock.
    pub(super) rx_mark: (u64, Instant),
    /// A have-stream was open once: losing it since then counts towards a stall.
    pub(super) was_ready: bool,
    /// Since when the source has had no usable connection, after being ready once.
    pub(super) lost_since: Option<Instant>,
    /// When the coordinator named it: a source never ready (its have-stream answers
    /// NotFound, or it cannot be reached) is dropped [`NEVER_READY_STALLS`] stall timeouts
    /// later.
    pub(super) added: Instant,
    /// Chunk requests it answered NotFound in a row; [`NOT_FOUND_LIMIT`] drops it.
    pub(super) not_found: u32,
}

/// How many stall timeouts a source may take to open its have-stream at all (a stream
/// target that has not created its copy yet answers NotFound for a moment; one that never
/// does holds nothing, whatever it claimed).
const NEVER_READY_STALLS: u32 = 20;
/// Chunk requests a source may answer NotFound in a row, for chunks it announced, before it
/// is dropped and reported: it claims what it does not serve.
pub(super) const NOT_FOUND_LIMIT: u32 = 16;

/// How much longer than `stall_timeout` a source once reached may stay unreachable.
const UNREACHABLE_STALLS: u32 = 5;

impl Download<'_> {
    /// Drops and reports the sources that stalled: with requests in flight, the
    /// connection received nothing for `stall_timeout` (a frozen or black-holed peer; a
    /// live one answers within `max_upload_wait`, if only with Busy); or, once reached,
    /// it has been unreachable for `UNREACHABLE_STALLS` times that. Returns when to look
    /// again, if a stall clock runs.
    pub(super) fn check_stalls(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let timeout = self.stall_timeout;
        // Waiting on our own download cap, we stop reading: the silence is ours.
        let throttled = (self.shared.endpoint.config().download_limit.as_ref())
            .is_some_and(|l| l.available() < 0);
        let mut wake: Option<Instant> = None;
        let mut stalled = Vec::new();
        for key in 0..self.sources.len() {
            let in_flight = self.picker.in_flight(host(key));
            let Some(s) = &mut self.sources[key] else {
                continue;
            };
            let deadline = match &s.peer {
                Some(peer) => {
                    let rx = peer.rx_bytes();
                    if in_flight == 0 || throttled || rx != s.rx_mark.0 {
                        s.rx_mark = (rx, now);
                    }
                    if in_flight == 0 {
                        continue;
                    }
                    let deadline = s.rx_mark.1 + timeout;
                    if now >= deadline {
                        let silent = now.duration_since(s.rx_mark.1).as_millis();
                        stalled.push((
                            s.agent_id.clone(),
                            format!(
                                "nothing received for {silent} ms with {in_flight} requests in flight"
                            ),
                        ));
                        continue;
                    }
                    deadline
                }
                None if s.was_ready => {
                    let since = *s.lost_since.get_or_insert(now);
                    let deadline = since + timeout * UNREACHABLE_STALLS;
                    if now >= deadline {
                        let lost = now.duration_since(since).as_millis();
                        stalled.push((s.agent_id.clone(), format!("unreachable for {lost} ms")));
                        continue;
                    }
                    deadline
                }
                None => {
                    let deadline = s.added + timeout * NEVER_READY_STALLS;
                    if now >= deadline {
                        let waited = now.duration_since(s.added).as_millis();
                        stalled.push((
                            s.agent_id.clone(),
                            format!("no have-stream for {waited} ms: it does not hold the blob or cannot be reached"),
                        ));
                        continue;
                    }
                    deadline
                }
            };
            wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
        }
        for (agent_id, reason) in stalled {
            self.drop_stalled(agent_id, reason);
        }
        wake
    }

    /// Drops a source for this blob and tells the coordinator why.
    pub(super) fn drop_stalled(&mut self, agent_id: String, reason: String) {
        tracing::warn!(
            order_id = self.order_id,
            agent = agent_id,
            reason,
            "source stalled; dropping it"
        );
        self.remove_source(&agent_id);
        self.shared
            .coordinator
            .send(Msg::SourceStalled(pb::SourceStalled {
                order_id: self.order_id,
                blob_digest: self.manifest.digest().as_bytes().to_vec(),
                peer_agent_id: agent_id,
                reason,
            }));
    }
}

/// Keeps a have-stream open to one source, reconnecting with backoff (the source may not
/// have the blob's manifest yet, may restart, or its connection may drop after it finished
/// announcing a complete blob). Runs until the download drops it.
pub(super) async fn watch_source(
    endpoint: ChunkEndpoint,
    blob: Digest,
    key: SourceKey,
    agent_id: String,
    addrs: Vec<SocketAddr>,
    events: mpsc::Sender<SourceEvent>,
) {
    let mut backoff = Backoff::with_max(WATCH_BACKOFF_MAX);
    loop {
        for addr in &addrs {
            let why = match watch_once(
                &endpoint,
                blob,
                key,
                &agent_id,
                *addr,
                &events,
                &mut backoff,
            )
            .await
            {
                Ok(()) => return,
                Err(e) => e,
            };
            if events.send(SourceEvent::Down(key, why)).await.is_err() {
                return;
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// `Err` with the reason once the source is lost (to be redialled); `Ok` when the download
/// ended. A source holding the whole blob ends its have-stream (after a final bitfield) and
/// stays usable until its connection closes.
async fn watch_once(
    endpoint: &ChunkEndpoint,
    blob: Digest,
    key: SourceKey,
    agent_id: &str,
    addr: SocketAddr,
    events: &mpsc::Sender<SourceEvent>,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let peer = endpoint
        .peer_named(addr, agent_id)
        .await
        .map_err(|e| e.to_string())?;
    let mut have = peer.watch_have(blob).await.map_err(|e| e.to_string())?;
    let mut ready = Some(peer.clone());
    while let Some(update) = have.next().await.map_err(|e| e.to_string())? {
        if let Some(peer) = ready.take() {
            backoff.reset();
            if events.send(SourceEvent::Ready(key, peer)).await.is_err() {
                return Ok(());
            }
        }
        if events.send(SourceEvent::Have(key, update)).await.is_err() {
            return Ok(());
        }
    }
    if ready.is_some() {
        return Err("have-stream ended without a bitfield".into());
    }
    Err(format!("connection closed: {}", peer.closed().await))
}
