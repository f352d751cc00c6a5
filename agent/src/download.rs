//! The download loop of one fetch order: a have-stream per source tells what each holds, the
//! picker says which chunk to ask whom, and a window of requests per source stays in flight.
//! Every chunk is verified by the store on put; a peer that sends a bad one is dropped for
//! this blob and reported, to the coordinator and to the peer itself (which reads its copy
//! back and drops it if it rotted on its disk). A verified chunk is served onward at once (the
//! QUIC server reads the same store, and its have-streams publish the new chunk).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::FailureReason;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::wire::ErrorStatus;
use shoal_proto::{ChunkIndex, Digest, Manifest};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinError, JoinSet};
use tokio::time::Instant;

mod pending;
mod sources;
mod table;

use crate::counters::Counters;
use crate::failure::Failure;
use crate::link::Coordinator;
use crate::orders::{Control, RunningOrders};
use crate::readers::Readers;
use crate::shutdown::{Stop, stopped};
use crate::store::{PutOutcome, Store};
use crate::transport::{ChunkEndpoint, FetchError, HaveUpdate};
use pending::Pending;
use shoal_planner::{ChunkPicker, ChunkSet, HostId, PickerConfig, Time};
use sources::{NOT_FOUND_LIMIT, Source, SourceEvent, watch_source};

/// Pause after a source answered Busy.
const BUSY_BACKOFF: Duration = Duration::from_millis(100);
/// Pause after any other failed request.
const ERROR_BACKOFF: Duration = Duration::from_millis(300);
struct FetchDone {
    key: SourceKey,
    /// The source's agent, kept here because the source may be removed before this arrives.
    agent_id: String,
    /// [`Peer::connection_id`] of the connection the request went out on.
    connection: usize,
    index: ChunkIndex,
    result: Result<PutOutcome, FetchError>,
    buf: Vec<u8>,
}

/// Index of a source in `Download::sources`; the picker knows it as `HostId(key)`.
type SourceKey = usize;

fn host(key: SourceKey) -> HostId {
    HostId(key as u32)
}

/// What downloads need: the store, the QUIC endpoint, the coordinator (to report bad and
/// stalled sources), the counters, the mirror's readers (to fetch what they wait for
/// first), the order table (progress) and the stop signal. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Downloader {
    pub store: Store,
    pub endpoint: ChunkEndpoint,
    pub coordinator: Coordinator,
    pub counters: Counters,
    pub readers: Readers,
    pub orders: RunningOrders,
    pub stop: Stop,
}

struct Download<'a> {
    shared: &'a Downloader,
    order_id: u64,
    manifest: Arc<Manifest>,
    /// The planner's per-chunk decisions: random first, rarest first, endgame duplicates,
    /// and a window per source sized to its rate × RTT.
    picker: ChunkPicker,
    /// Time origin for the picker, which takes time as an argument.
    started: Instant,
    sources: Vec<Option<Source>>,
    by_agent: HashMap<String, SourceKey>,
    /// Sources that sent a bad chunk: never used again for this blob.
    banned: HashSet<String>,
    watchers: JoinSet<()>,
    events: mpsc::Sender<SourceEvent>,
    fetches: JoinSet<FetchDone>,
    /// The task of each request the picker counts as in flight, to cancel it when the picker
    /// drops the request (endgame duplicate lost the race, source removed).
    requests: HashMap<(SourceKey, ChunkIndex), AbortHandle>,
    buffers: Vec<Vec<u8>>,
    bytes_from_peers: u64,
    /// A source silent this long with requests in flight is dropped and reported.
    stall_timeout: Duration,
    /// Chunks stored from each source (by agent id), logged at the end: where a blob came
    /// from is what tells a seeder that sent too many copies from a swarm that relayed.
    stored_from: HashMap<String, u32>,
    /// While the manifest is provisional (the blob is being seeded): which digests are
    /// known, and what waits for them.
    pending: Option<Pending>,
}

impl Drop for Download<'_> {
    /// However the download ends, what its picker spent on duplicates counts.
    fn drop(&mut self) {
        let stats = self.picker.stats();
        metrics::counter!(crate::metrics::DUPLICATE_REQUESTS).increment(stats.duplicate_requests);
        metrics::counter!(crate::metrics::WASTED_BYTES)
            .increment(stats.wasted_chunks * u64::from(self.manifest.chunk_size()));
    }
}

/// Fetches every missing chunk of `manifest` from `sources` (and the ones control messages
/// add); returns the bytes received from peers.
impl Downloader {
    pub(crate) async fn download(
        &self,
        order_id: u64,
        manifest: Arc<Manifest>,
        sources: Vec<pb::Source>,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<u64, Failure> {
        download(self, order_id, manifest, sources, control).await
    }
}

async fn download(
    shared: &Downloader,
    order_id: u64,
    manifest: Arc<Manifest>,
    sources: Vec<pb::Source>,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<u64, Failure> {
    let blob = manifest.digest();
    let have = match shared.store.bitfield(&blob) {
        Some((count, bits)) if count == manifest.chunk_count() => {
            ChunkSet::from_bitfield(count, &bits)
        }
        _ => ChunkSet::empty(manifest.chunk_count()),
    };
    // A window beyond what one connection lets us have open would only queue in the transport.
    let per_connection = shared.endpoint.config().max_requests_in_flight.max(1);
    let defaults = PickerConfig::default();
    let config = PickerConfig {
        chunk_size: manifest.chunk_size(),
        initial_window: defaults.initial_window.min(per_connection),
        min_window: defaults.min_window.min(per_connection),
        max_window: defaults.max_window.min(per_connection),
        ..defaults
    };
    let stall_timeout = config.stall_timeout;
    let (events, mut event_rx) = mpsc::channel(256);
    let mut d = Download {
        shared,
        order_id,
        picker: ChunkPicker::new(have, order_id, config),
        started: Instant::now(),
        manifest,
        sources: Vec::new(),
        by_agent: HashMap::new(),
        banned: HashSet::new(),
        watchers: JoinSet::new(),
        events,
        fetches: JoinSet::new(),
        requests: HashMap::new(),
        buffers: Vec::new(),
        bytes_from_peers: 0,
        stall_timeout,
        stored_from: HashMap::new(),
        pending: None,
    };
    d.pending = shared.store.manifest(&blob).and_then(|m| Pending::of(&m));
    for s in sources {
        d.add_source(s);
    }
    let mut stop = shared.stop.clone();
    loop {
        d.report_progress();
        if d.picker.missing() == 0 {
            d.log_sources();
            return Ok(d.bytes_from_peers);
        }
        if shared.store.is_complete(&blob) {
            // Completed by other means (another order, a push): count what already arrived.
            let drain = async {
                while let Some(joined) = d.fetches.join_next_with_id().await {
                    d.on_joined(joined)?;
                }
                Ok::<(), Failure>(())
            };
            let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
            d.log_sources();
            return Ok(d.bytes_from_peers);
        }
        let pending = match &d.pending {
            Some(p) => Some(p.check(d.picker.in_flight_total())?),
            None => None,
        };
        let wake = [d.fill(), d.check_stalls(), pending]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            Some(joined) = d.fetches.join_next_with_id(), if !d.fetches.is_empty() => {
                d.on_joined(joined)?;
            }
            Some(event) = event_rx.recv() => d.on_event(event),
            c = control.recv() => match c {
                Some(Control::Sources { add, remove }) => {
                    for id in remove {
                        d.remove_source(&id);
                    }
                    for s in add {
                        d.add_source(s);
                    }
                }
                Some(Control::Digests { first, digests }) => d.learn(first, &digests)?,
                Some(Control::Cancel(reason)) => return Err(Failure::cancelled(Some(&reason))),
                None => return Err(Failure::cancelled(None)),
            },
            () = sleep_until(wake), if wake.is_some() => {}
            () = stopped(&mut stop) => {
                return Err(Failure::new(FailureReason::AgentLost, "agent shutting down"));
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

impl Download<'_> {
    fn add_source(&mut self, s: pb::Source) {
        if self.banned.contains(&s.agent_id) {
            return;
        }
        if s.agent_id == self.shared.coordinator.agent_id() {
            return;
        }
        if let Some(&key) = self.by_agent.get(&s.agent_id) {
            // Known: the have-stream is the authority on what it holds; only its stripe
            // may have changed (another downloader of it came or went).
            self.set_stripe(key, &s);
            return;
        }
        let addrs: Vec<SocketAddr> = s
            .quic_addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        if addrs.is_empty() {
            tracing::warn!(order_id = self.order_id, agent = s.agent_id, addresses = ?s.quic_addresses, "source has no usable QUIC address");
            return;
        }
        let key = self.sources.len();
        let watcher = self.watchers.spawn(watch_source(
            self.shared.endpoint.clone(),
            self.manifest.digest(),
            key,
            s.agent_id.clone(),
            addrs,
            self.events.clone(),
        ));
        self.picker
            .add_source(host(key), ChunkSet::empty(self.manifest.chunk_count()));
        // Ask this source for our own stripe first, so its downloaders don't overlap.
        self.set_stripe(key, &s);
        self.by_agent.insert(s.agent_id.clone(), key);
        self.sources.push(Some(Source {
            agent_id: s.agent_id,
            peer: None,
            paused_until: None,
            watcher,
            rx_mark: (0, Instant::now()),
            was_ready: false,
            lost_since: None,
            added: Instant::now(),
            not_found: 0,
        }));
    }

    /// Digests of chunks `first..` arrived for a provisional manifest: those chunks may be
    /// fetched now, from the sources that announced them meanwhile.
    fn learn(&mut self, first: u32, digests: &[Digest]) -> Result<(), Failure> {
        let blob = self.manifest.digest();
        let learned = (self.shared.store)
            .learn_digests(&blob, first, digests)
            .map_err(|e| Failure::from_store(&e))?;
        metrics::counter!(crate::metrics::STREAMED_DIGESTS).increment(u64::from(learned));
        let (Some(pending), Some(manifest)) =
            (&mut self.pending, self.shared.store.manifest(&blob))
        else {
            return Ok(());
        };
        for (key, ready) in pending.learned(&manifest, first, digests.len() as u32) {
            self.picker.source_have(host(key), ready);
        }
        if pending.is_complete() {
            self.pending = None;
            // The seed is over: its seeder is a source like any other now.
            for key in 0..self.sources.len() {
                self.picker.set_stripe_only(host(key), false);
            }
        }
        Ok(())
    }

    /// Passes what a source announced to the picker, but only chunks whose digest is known.
    fn source_have(&mut self, key: SourceKey, indices: impl IntoIterator<Item = ChunkIndex>) {
        match &mut self.pending {
            None => self.picker.source_have(host(key), indices),
            Some(pending) => {
                let ready = pending.admit(key, indices);
                self.picker.source_have(host(key), ready);
            }
        }
    }

    fn remove_source(&mut self, agent_id: &str) {
        let Some(key) = self.by_agent.remove(agent_id) else {
            return;
        };
        if let Some(pending) = &mut self.pending {
            pending.forget_source(key);
        }
        if let Some(s) = self.sources[key].take() {
            s.watcher.abort();
        }
        for index in self.picker.remove_source(host(key)) {
            self.cancel(key, index);
        }
    }

    /// The stripe the coordinator gave us of this source's chunks (see `ChunkPicker::set_stripe`).
    fn set_stripe(&mut self, key: SourceKey, s: &pb::Source) {
        self.picker.set_stripe(host(key), s.stripe, s.stripes);
        self.picker.set_stripe_only(host(key), s.stripe_only);
        tracing::debug!(order_id = self.order_id, source = %s.agent_id, stripe = s.stripe, stripes = s.stripes, only = s.stripe_only, "stripe");
    }

    /// Stops the task of a request the picker no longer counts.
    fn cancel(&mut self, key: SourceKey, index: ChunkIndex) {
        if let Some(task) = self.requests.remove(&(key, index)) {
            task.abort();
        }
    }

    fn now(&self) -> Time {
        Time::from_micros(self.started.elapsed().as_micros() as u64)
    }

    /// Starts requests up to each ready source's window; returns when a paused source
    /// resumes, if any is paused.
    fn fill(&mut self) -> Option<Instant> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        let reader = self.shared.readers.position(&self.manifest.digest());
        self.picker
            .set_sequential(reader.map(shoal_proto::ChunkIndex));
        for key in 0..self.sources.len() {
            let Some(source) = &mut self.sources[key] else {
                continue;
            };
            let Some(peer) = source.peer.clone() else {
                continue;
            };
            let agent_id = source.agent_id.clone();
            if let Some(until) = source.paused_until {
                if until > now {
                    wake = Some(wake.map_or(until, |w| w.min(until)));
                    continue;
                }
                source.paused_until = None;
            }
            while let Some(index) = self.picker.next_request(self.now(), host(key)) {
                let buf = self.buffers.pop().unwrap_or_default();
                let (peer, store, manifest, agent_id) = (
                    peer.clone(),
                    self.shared.store.clone(),
                    self.manifest.clone(),
                    agent_id.clone(),
                );
                let task = self.fetches.spawn(async move {
                    let (result, buf) = peer.fetch_into_store(&store, &manifest, index, buf).await;
                    FetchDone {
                        key,
                        agent_id,
                        connection: peer.connection_id(),
                        index,
                        result,
                        buf,
                    }
                });
                self.requests.insert((key, index), task);
            }
        }
        wake
    }

    fn pause(&mut self, key: SourceKey, for_: Duration) {
        if let Some(Some(s)) = self.sources.get_mut(key) {
            s.paused_until = Some(Instant::now() + for_);
        }
    }

    /// A fetch task ended: with its result, or cancelled by us, or panicked.
    fn on_joined(
        &mut self,
        joined: Result<(tokio::task::Id, FetchDone), JoinError>,
    ) -> Result<(), Failure> {
        match joined {
            Ok((id, done)) => {
                let request = (done.key, done.index);
                if self.requests.get(&request).is_some_and(|t| t.id() == id) {
                    self.requests.remove(&request);
                }
                self.on_fetch(done)
            }
            Err(e) => {
                // Cancelled by `cancel`: already forgotten. Otherwise (a panic) it is one
                // failed request, not a failed order.
                let id = e.id();
                let found = self.requests.iter().find(|(_, t)| t.id() == id);
                let Some(&(key, index)) = found.map(|(request, _)| request) else {
                    return Ok(());
                };
                self.requests.remove(&(key, index));
                tracing::warn!(order_id = self.order_id, %index, error = %e, "chunk fetch task failed");
                self.picker.on_chunk_failed(self.now(), host(key), index);
                self.pause(key, ERROR_BACKOFF);
                Ok(())
            }
        }
    }

    fn on_fetch(&mut self, done: FetchDone) -> Result<(), Failure> {
        let FetchDone {
            key,
            agent_id,
            connection,
            index,
            result,
            buf,
        } = done;
        let len = buf.len() as u64;
        if buf.capacity() > 0 {
            self.buffers.push(buf);
        }
        // Endgame duplicates race: the one that stored the chunk may report after one that
        // found it present (and may be cancelled then). The first report of a chunk counts
        // it, whichever outcome it carries; later reports never do.
        let first = !self.picker.have().contains(index);
        let result = match result {
            Ok(PutOutcome::AlreadyPresent) if first => Ok(PutOutcome::Stored),
            Ok(PutOutcome::Stored) if !first => Ok(PutOutcome::AlreadyPresent),
            other => other,
        };
        if result.is_ok()
            && let Some(Some(s)) = self.sources.get_mut(key)
        {
            s.not_found = 0;
        }
        match result {
            Ok(PutOutcome::Stored) => {
                // Endgame duplicates of this chunk elsewhere are no longer needed.
                for other in self.picker.on_chunk_done(self.now(), host(key), index, len) {
                    self.cancel(other.0 as SourceKey, index);
                }
                self.bytes_from_peers += len;
                if let Some(pending) = &mut self.pending {
                    pending.stored();
                }
                *self.stored_from.entry(agent_id.clone()).or_default() += 1;
                tracing::debug!(order_id = self.order_id, %index, source = %agent_id, in_endgame = self.picker.in_endgame(), "chunk stored");
                self.shared.counters.verified(len);
                metrics::counter!(crate::metrics::BYTES_IN, "source" => crate::metrics::SOURCE_PEER)
                    .increment(len);
                metrics::counter!(crate::metrics::CHUNKS_VERIFIED).increment(1);
            }
            Ok(PutOutcome::AlreadyPresent) => {
                for other in self.picker.on_chunk_done(self.now(), host(key), index, len) {
                    self.cancel(other.0 as SourceKey, index);
                }
            }
            Err(FetchError::Corrupt { peer, reason, .. }) => {
                self.picker.on_chunk_failed(self.now(), host(key), index);
                self.shared.counters.rejected();
                metrics::counter!(crate::metrics::CHUNKS_REJECTED).increment(1);
                tracing::warn!(order_id = self.order_id, agent = agent_id, %peer, %index, reason, "peer sent a corrupt chunk; dropping it for this blob");
                if let Some(Some(Source { peer: Some(p), .. })) = self.sources.get(key) {
                    // So that it stops serving the chunk if its disk is what damaged it.
                    let (p, blob) = (p.clone(), self.manifest.digest());
                    tokio::spawn(async move {
                        if let Err(e) = p.report_corrupt(blob, index).await {
                            tracing::debug!(%blob, %index, error = %e, "telling the source of its corrupt chunk failed");
                        }
                    });
                }
                self.banned.insert(agent_id.clone());
                self.remove_source(&agent_id);
                self.shared
                    .coordinator
                    .send(Msg::ChunkRejected(pb::ChunkRejected {
                        peer_agent_id: agent_id,
                        blob_digest: self.manifest.digest().as_bytes().to_vec(),
                        chunk_index: index.0,
                    }));
            }
            Err(FetchError::Store(e)) => {
                self.picker.on_chunk_failed(self.now(), host(key), index);
                return Err(Failure::from_store(&e));
            }
            Err(e) => {
                self.picker.on_chunk_failed(self.now(), host(key), index);
                if let FetchError::Connection { .. } = e
                    && let Some(Some(s)) = self.sources.get_mut(key)
                    && s.peer
                        .as_ref()
                        .is_some_and(|p| p.connection_id() == connection)
                {
                    // Dead connection: no more requests on it. Its watcher sees it closed
                    // and redials.
                    s.peer = None;
                }
                let pause = if e.is_busy() {
                    BUSY_BACKOFF
                } else {
                    tracing::debug!(order_id = self.order_id, %index, error = %e, "chunk request failed");
                    if matches!(
                        e,
                        FetchError::Refused {
                            status: ErrorStatus::NotFound,
                            ..
                        }
                    ) {
                        let count = match self.sources.get_mut(key) {
                            Some(Some(s)) => {
                                s.not_found += 1;
                                s.not_found
                            }
                            _ => 0,
                        };
                        if count >= NOT_FOUND_LIMIT {
                            let reason = format!(
                                "answered NotFound to {count} requests in a row for chunks it announced"
                            );
                            self.drop_stalled(agent_id, reason);
                            return Ok(());
                        }
                        BUSY_BACKOFF
                    } else {
                        ERROR_BACKOFF
                    }
                };
                self.pause(key, pause);
            }
        }
        Ok(())
    }

    fn on_event(&mut self, event: SourceEvent) {
        match event {
            SourceEvent::Ready(key, peer) => {
                if let Some(Some(s)) = self.sources.get_mut(key) {
                    self.picker.set_rtt(host(key), peer.rtt());
                    s.rx_mark = (peer.rx_bytes(), Instant::now());
                    s.peer = Some(peer);
                    s.was_ready = true;
                    s.lost_since = None;
                }
            }
            SourceEvent::Have(key, HaveUpdate::Bitfield { chunk_count, bits }) => {
                if chunk_count == self.manifest.chunk_count() {
                    // A bitfield only grows (a resend after lag): add what is new.
                    let has = ChunkSet::from_bitfield(chunk_count, &bits);
                    self.source_have(key, has.iter().collect::<Vec<_>>());
                } else {
                    tracing::warn!(
                        order_id = self.order_id,
                        chunk_count,
                        "source announced a bitfield of the wrong length"
                    );
                }
            }
            SourceEvent::Have(key, HaveUpdate::Delta(indices)) => {
                self.source_have(key, indices);
            }
            SourceEvent::Down(key, why) => {
                if let Some(Some(s)) = self.sources.get_mut(key) {
                    tracing::debug!(
                        order_id = self.order_id,
                        agent = s.agent_id,
                        why,
                        "source not reachable"
                    );
                    s.peer = None;
                }
            }
        }
    }

    fn log_sources(&self) {
        let stats = self.picker.stats();
        tracing::info!(
            order_id = self.order_id,
            blob = %self.manifest.digest(),
            chunks_by_source = ?self.stored_from,
            requests = stats.requests,
            duplicate_requests = stats.duplicate_requests,
            wasted_chunks = stats.wasted_chunks,
            "download finished"
        );
    }

    fn report_progress(&self) {
        let count = self.manifest.chunk_count();
        let verified = count - self.picker.missing();
        let bytes =
            (u64::from(verified) * u64::from(self.manifest.chunk_size())).min(self.manifest.size());
        let active = self
            .sources
            .iter()
            .enumerate()
            .filter(|(k, s)| {
                s.as_ref().is_some_and(|s| s.peer.is_some()) && self.picker.in_flight(host(*k)) > 0
            })
            .count() as u32;
        self.shared
            .orders
            .update(self.order_id, verified, bytes, active);
    }
}
