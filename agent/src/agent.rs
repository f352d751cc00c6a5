//! A running agent: store, QUIC endpoint, coordinator session, local API, and their shutdown.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::config::{AgentConfig, coordinator_host_port};
use crate::counters::Counters;
use crate::download::Downloader;
use crate::error::AgentError;
use crate::execute::Executor;
use crate::health::HealthEndpoint;
use crate::ingest::{Ingester, SeededRanges};
use crate::link::{Coordinator, Outbox};
use crate::local_api::LocalApi;
use crate::mirror::Mirror;
use crate::orders::RunningOrders;
use crate::readers::Readers;
use crate::renew::{self, Certificate};
use crate::repair::Repair;
use crate::session::{self, Joined, Session};
use crate::store::{Store, StoreConfig};
use crate::transport::tls::CertificateRequest;
use crate::transport::{self, ChunkEndpoint};
use crate::trust::CoordinatorTrust;

/// What the agent has moved so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Bytes of chunks served to peers.
    pub bytes_served: u64,
    /// Chunks served to peers.
    pub chunks_served: u64,
    /// Bytes of verified chunks fetched from peers.
    pub bytes_from_peers: u64,
    /// Chunks fetched, verified and stored.
    pub chunks_verified: u64,
    /// Chunks fetched that failed verification.
    pub chunks_rejected: u64,
    /// Fetch orders running now.
    pub active_transfers: u64,
    /// Chunk tables of orders that came without them, learned from a source, and from the
    /// coordinator (no source served it).
    pub tables_from_peers: u64,
    pub tables_from_coordinator: u64,
}

/// The parts of a started agent, each handed to the tasks that need it.
#[derive(Debug)]
struct Parts {
    config: Arc<AgentConfig>,
    quic_addr: SocketAddr,
    endpoint: ChunkEndpoint,
    counters: Counters,
    readers: Readers,
    executor: Executor,
    stop: watch::Receiver<bool>,
}

/// A running agent. Stop it with [`Agent::shutdown`].
#[derive(Debug)]
pub struct Agent {
    parts: Parts,
    agent_id: String,
    socket_path: PathBuf,
    stop: watch::Sender<bool>,
    session: JoinHandle<()>,
    local_api: JoinHandle<()>,
    health: Option<HealthEndpoint>,
    mirror: Option<(SocketAddr, JoinHandle<()>)>,
}

impl Agent {
    /// Opens the store, binds the QUIC socket, joins the coordinator (retrying while it is
    /// unreachable; a refused token fails at once), starts the endpoint with the certificate
    /// the coordinator issued, serves the local API and starts the session.
    pub async fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        config.validate().map_err(AgentError::Config)?;
        let (stop, stop_rx) = watch::channel(false);
        Self::start_with(config, stop, stop_rx).await
    }

    async fn start_with(
        config: AgentConfig,
        stop: watch::Sender<bool>,
        stop_rx: watch::Receiver<bool>,
    ) -> Result<Agent, AgentError> {
        let data_dir = config.data_dir.clone();
        let origin = origin_client(&config)?;
        let store = open_store(&config).await?;

        let socket = transport::bind_udp_socket(config.quic_listen, config.socket_buffer_bytes)?;
        let bound = socket.local_addr().map_err(|source| AgentError::Io {
            context: "reading address of QUIC socket bound to",
            path: config.quic_listen.to_string().into(),
            source,
        })?;
        let quic_addr = advertise_addr(&config, bound).await;
        // Live from here on (store open, socket bound), ready only once joined: a liveness
        // probe must not restart an agent that is waiting for its coordinator.
        let health = start_health(&config, &stop_rx).await?;

        let trust = CoordinatorTrust::establish(&config, stop_rx.clone()).await?;
        let join_channel = trust.channel(None)?;

        let id_path = data_dir.join("agent-id");
        let previous_id = std::fs::read_to_string(&id_path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let csr = CertificateRequest::generate()?;
        let joined: Joined = session::join_until_accepted(
            &join_channel,
            &config,
            quic_addr,
            &previous_id,
            csr.csr_der(),
            stop_rx.clone(),
        )
        .await?;
        let response = &joined.response;
        if response.certificate_der.is_empty() || response.ca_certificates_der.is_empty() {
            return Err(AgentError::Join {
                coordinator: config.coordinator.clone(),
                message: "the coordinator issued no certificate for the agent's QUIC identity"
                    .into(),
            });
        }
        let csr = Arc::new(csr);
        let identity = csr.identity(
            response.certificate_der.clone(),
            response.ca_certificates_der.clone(),
        );
        persist_agent_id(&id_path, &response.agent_id);
        // From here on every call presents the certificate the coordinator just issued.
        let channel = trust.channel(Some(&identity))?;

        let endpoint =
            ChunkEndpoint::from_socket(socket, &identity, store.clone(), config.transport())?;
        let agent_id = response.agent_id.clone();
        tracing::info!(agent_id, %quic_addr, coordinator = %config.coordinator, "agent joined");
        let (parts, outbox_rx) = assemble(
            config, store, endpoint, agent_id, quic_addr, channel, stop_rx, origin,
        );
        let certificate = Certificate::new(
            csr,
            trust,
            parts.executor.coordinator.clone(),
            parts.endpoint.clone(),
            &identity,
        );
        if certificate.renewable() {
            tokio::spawn(renew::run(certificate.clone(), parts.stop.clone()));
        }
        let session = Session {
            config: parts.config.clone(),
            quic_addr,
            endpoint: parts.endpoint.clone(),
            counters: parts.counters.clone(),
            executor: parts.executor.clone(),
            stop: parts.stop.clone(),
            certificate,
            learned: {
                let (up, down) = crate::capacity::declared(&parts.config);
                crate::capacity::Learned::new(up, down)
            },
        };
        let session = tokio::spawn(session::run(session, joined, outbox_rx));
        Self::finish_start(parts, stop, session, health).await
    }

    /// Runs the store, the QUIC endpoint (with `identity`) and the local API, without a
    /// coordinator: no join, no session; what would be sent to the coordinator is dropped.
    /// For tests and tools that exercise the agent's local side on its own.
    #[doc(hidden)]
    pub async fn start_detached(
        config: AgentConfig,
        agent_id: &str,
        identity: &crate::transport::tls::Identity,
    ) -> Result<Agent, AgentError> {
        config.validate().map_err(AgentError::Config)?;
        let (stop, stop_rx) = watch::channel(false);
        let origin = origin_client(&config)?;
        let store = open_store(&config).await?;
        let endpoint = ChunkEndpoint::bind(
            config.quic_listen,
            identity,
            store.clone(),
            config.transport(),
        )?;
        let quic_addr = advertise_addr(&config, endpoint.local_addr()).await;
        let health = start_health(&config, &stop_rx).await?;
        let channel = unconnected_channel(&config)?;
        let (parts, mut outbox_rx) = assemble(
            config,
            store,
            endpoint,
            agent_id.to_string(),
            quic_addr,
            channel,
            stop_rx,
            origin,
        );
        let session = tokio::spawn(async move {
            while let Some(m) = outbox_rx.recv().await {
                tracing::debug!(?m, "detached agent: dropping message for the coordinator");
            }
        });
        Self::finish_start(parts, stop, session, health).await
    }

    async fn finish_start(
        parts: Parts,
        stop: watch::Sender<bool>,
        session: JoinHandle<()>,
        health: Option<HealthEndpoint>,
    ) -> Result<Agent, AgentError> {
        let socket_path = parts.config.local_socket_path();
        let ex = &parts.executor;
        let agent_id = ex.coordinator.agent_id();
        let api = LocalApi {
            config: parts.config.clone(),
            quic_addr: parts.quic_addr,
            store: ex.store.clone(),
            coordinator: ex.coordinator.clone(),
            orders: ex.orders.clone(),
            counters: parts.counters.clone(),
            ingester: ex.ingester.clone(),
            endpoint: parts.endpoint.clone(),
            failed_guesses: Default::default(),
        };
        let local_api = match crate::local_api::serve(api, &socket_path, parts.stop.clone()) {
            Ok(task) => task,
            Err(source) => {
                // Ends the session task, which holds the store open.
                let _ = stop.send(true);
                return Err(AgentError::LocalApi {
                    path: socket_path,
                    source,
                });
            }
        };
        let mirror = Mirror::new(
            ex.store.clone(),
            ex.coordinator.clone(),
            ex.ingester.origin.clone(),
            ex.orders.clone(),
            parts.readers.clone(),
            parts.config.mirror.clone(),
        );
        let mirror = match parts.config.mirror_listen {
            None => None,
            Some(addr) => match crate::mirror::serve(mirror, addr, parts.stop.clone()).await {
                Ok(m) => Some(m),
                Err(source) => {
                    let _ = stop.send(true);
                    return Err(AgentError::Io {
                        context: "binding the OCI mirror (mirror_listen) on",
                        path: addr.to_string().into(),
                        source,
                    });
                }
            },
        };
        tokio::spawn(record_gauges(
            parts.endpoint.clone(),
            ex.store.clone(),
            parts.stop.clone(),
        ));
        tokio::spawn(
            (ex.coordinator.clone()).report_removals(ex.store.removals(), parts.stop.clone()),
        );
        let repair = Repair {
            store: ex.store.clone(),
            coordinator: ex.coordinator.clone(),
            orders: ex.orders.clone(),
            stop: parts.stop.clone(),
        };
        tokio::spawn(repair.run());
        tokio::spawn(crate::scrub::run(
            ex.store.clone(),
            parts.config.scrub_bytes_per_sec,
            parts.stop.clone(),
        ));
        if let Some(h) = &health {
            h.set_ready().await;
        }
        Ok(Agent {
            parts,
            agent_id,
            socket_path,
            stop,
            session,
            local_api,
            health,
            mirror,
        })
    }

    /// The address of the OCI registry mirror, if `mirror_listen` is set.
    pub fn mirror_addr(&self) -> Option<SocketAddr> {
        self.mirror.as_ref().map(|m| m.0)
    }

    pub fn agent_id(&self) -> &str {
        &self.agent_id
    }

    /// The QUIC address announced to peers.
    pub fn quic_addr(&self) -> SocketAddr {
        self.parts.quic_addr
    }

    /// The address of the `grpc.health.v1` endpoint, if `health_listen` is set.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(HealthEndpoint::local_addr)
    }

    /// The Unix socket of the local API.
    pub fn local_socket(&self) -> &Path {
        &self.socket_path
    }

    pub fn store(&self) -> &Store {
        &self.parts.executor.store
    }

    /// True while the session with the coordinator is up.
    pub fn is_connected(&self) -> bool {
        self.parts.executor.coordinator.is_connected()
    }

    pub fn stats(&self) -> AgentStats {
        let served = self.parts.endpoint.serve_stats();
        let (bytes_from_peers, chunks_verified, chunks_rejected) = self.parts.counters.fetched();
        let (tables_from_peers, tables_from_coordinator) = self.parts.counters.tables();
        AgentStats {
            tables_from_peers,
            tables_from_coordinator,
            bytes_served: served.bytes_served,
            chunks_served: served.chunks_served,
            bytes_from_peers,
            chunks_verified,
            chunks_rejected,
            active_transfers: self.parts.executor.orders.len() as u64,
        }
    }

    /// Stops gracefully: ends the session, stops running orders (verified chunks stay),
    /// stops the local API and removes its socket, closes the QUIC endpoint, flushes the store.
    pub async fn shutdown(self) {
        if let Some(h) = &self.health {
            h.set_stopping().await;
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session).await;
        self.parts.executor.orders.abort_all().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.local_api).await;
        if let Some((_, mirror)) = self.mirror {
            let _ = tokio::time::timeout(Duration::from_secs(5), mirror).await;
        }
        let _ = std::fs::remove_file(&self.socket_path);
        self.parts.endpoint.close().await;
        let store = self.parts.executor.store.clone();
        match tokio::task::spawn_blocking(move || store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "flushing the store on shutdown failed"),
            Err(e) => tracing::warn!(error = %e, "store flush task failed"),
        }
        if let Some(h) = self.health {
            h.join().await;
        }
        tracing::info!(agent_id = self.agent_id, "agent stopped");
    }
}

/// Starts an agent, runs it until `shutdown` resolves, then stops it gracefully. A shutdown
/// during start (e.g. while the coordinator is unreachable) ends the start.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    config.validate().map_err(AgentError::Config)?;
    let (stop, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let agent = tokio::select! {
        agent = Agent::start_with(config, stop, stop_rx) => agent?,
        () = &mut shutdown => return Err(AgentError::Interrupted),
    };
    shutdown.await;
    agent.shutdown().await;
    Ok(())
}

async fn open_store(config: &AgentConfig) -> Result<Store, AgentError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| AgentError::Io {
        context: "creating data directory",
        path: config.data_dir.clone(),
        source,
    })?;
    // Part files of origin fetches a previous run left: nothing refers to them any more.
    let _ = std::fs::remove_dir_all(config.data_dir.join("ingest"));
    let store_config = StoreConfig {
        root: config.data_dir.join("store"),
        quota_bytes: config.quota_bytes,
    };
    tokio::task::spawn_blocking(move || Store::open(store_config))
        .await
        .map_err(|e| AgentError::Config(format!("store open task failed: {e}")))?
        .map_err(AgentError::from)
}

async fn start_health(
    config: &AgentConfig,
    stop: &watch::Receiver<bool>,
) -> Result<Option<HealthEndpoint>, AgentError> {
    match config.health_listen {
        Some(addr) => Ok(Some(HealthEndpoint::serve(addr, stop.clone()).await?)),
        None => Ok(None),
    }
}

/// A channel to the configured address that a detached agent never uses for real.
fn unconnected_channel(config: &AgentConfig) -> Result<Channel, AgentError> {
    Ok(
        tonic::transport::Endpoint::from_shared(config.coordinator.clone())
            .map_err(|e| AgentError::Config(format!("coordinator: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy(),
    )
}

fn origin_client(config: &AgentConfig) -> Result<shoal_origin::Client, AgentError> {
    shoal_origin::Client::new(config.origin.clone())
        .map_err(|e| AgentError::Config(format!("origin: {e}")))
}

/// Builds the agent's parts: the order table and the handles over it, and the link to the
/// coordinator (whose outbox the session task drains).
#[allow(clippy::too_many_arguments)]
fn assemble(
    config: AgentConfig,
    store: Store,
    endpoint: ChunkEndpoint,
    agent_id: String,
    quic_addr: SocketAddr,
    channel: Channel,
    stop: watch::Receiver<bool>,
    origin: shoal_origin::Client,
) -> (Parts, Outbox) {
    let (coordinator, outbox) = Coordinator::new(channel, agent_id);
    let orders = RunningOrders::default();
    let counters = Counters::default();
    let readers = Readers::default();
    let downloader = Downloader {
        store: store.clone(),
        endpoint: endpoint.clone(),
        coordinator: coordinator.clone(),
        counters: counters.clone(),
        readers: readers.clone(),
        orders: orders.clone(),
        stop: stop.clone(),
    };
    let ingester = Ingester {
        store: store.clone(),
        origin,
        part_dir: config.data_dir.join("ingest"),
        chunk_size: config.chunk_size,
        coordinator: coordinator.clone(),
        orders: orders.clone(),
        ranges: SeededRanges::default(),
    };
    let executor = Executor {
        orders,
        coordinator,
        store,
        downloader,
        ingester,
    };
    let parts = Parts {
        config: Arc::new(config),
        quic_addr,
        endpoint,
        counters,
        readers,
        executor,
        stop,
    };
    (parts, outbox)
}

/// The address peers dial: configured, else the bound port on the bound IP, or on the IP of
/// the route to the coordinator when bound to a wildcard.
async fn advertise_addr(config: &AgentConfig, bound: SocketAddr) -> SocketAddr {
    if let Some(a) = config.advertise {
        return a;
    }
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let routed = async {
        let (host, port) = coordinator_host_port(&config.coordinator)?;
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .ok()?
            .next()?;
        let any: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let probe = std::net::UdpSocket::bind(any).ok()?;
        probe.connect(target).ok()?;
        Some(probe.local_addr().ok()?.ip())
    };
    let ip = routed.await.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, bound.port())
}

fn persist_agent_id(path: &Path, id: &str) {
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, format!("{id}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "could not persist the agent id");
    }
}

/// Exports the transport's congestion state (see [`record_transport_once`]) and the store's
/// fill until the agent stops.
async fn record_gauges(endpoint: ChunkEndpoint, store: Store, mut stop: crate::shutdown::Stop) {
    loop {
        record_transport_once(&endpoint);
        metrics::gauge!(crate::metrics::STORE_USED).set(store.usage_bytes() as f64);
        metrics::gauge!(crate::metrics::STORE_QUOTA).set(store.quota_bytes() as f64);
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => return,
            _ = tokio::time::sleep(crate::metrics::GAUGES_INTERVAL) => {}
        }
    }
}

/// Records the uplink's learned capacity and every pooled connection's QUIC state.
fn record_transport_once(endpoint: &ChunkEndpoint) {
    if let Some(rate) = endpoint.upload_rate() {
        metrics::gauge!(crate::metrics::UPLOAD_CAPACITY).set(rate);
    }
    for c in endpoint.connection_stats() {
        let peer = c.peer.to_string();
        metrics::gauge!(crate::metrics::QUIC_RTT, "peer" => peer.clone()).set(c.rtt.as_secs_f64());
        metrics::gauge!(crate::metrics::QUIC_CWND, "peer" => peer.clone()).set(c.cwnd as f64);
        metrics::counter!(crate::metrics::QUIC_SENT_PACKETS, "peer" => peer.clone())
            .absolute(c.sent_packets);
        metrics::counter!(crate::metrics::QUIC_LOST_PACKETS, "peer" => peer.clone())
            .absolute(c.lost_packets);
        metrics::counter!(crate::metrics::QUIC_CONGESTION_EVENTS, "peer" => peer)
            .absolute(c.congestion_events);
    }
}
