//! A running agent: store, QUIC endpoint, coordinator session, local API, and their shutdown.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use shoal_proto::pb::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::config::{AgentConfig, coordinator_host_port};
use crate::health::HealthEndpoint;
use crate::order::Orders;
use crate::session::{self, Joined};
use crate::store::{Store, StoreConfig, StoreError};
use crate::transfers::Transfers;
use crate::transport::tls::{CertificateRequest, TlsError};
use crate::transport::{self, ChunkEndpoint, TransportError};

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("content store: {0}")]
    Store(#[from] StoreError),
    #[error("QUIC endpoint: {0}")]
    Transport(#[from] TransportError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("joining the coordinator at {coordinator}: {message}")]
    Join {
        coordinator: String,
        message: String,
    },
    #[error("local API socket {}: {source}", path.display())]
    LocalApi {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("start interrupted by shutdown")]
    Interrupted,
}

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
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub bytes_from_peers: AtomicU64,
    pub chunks_verified: AtomicU64,
    pub chunks_rejected: AtomicU64,
    /// Bytes per second served to peers, as of the last load report.
    pub upload_rate: AtomicU64,
}

/// State every task of the agent shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: AgentConfig,
    pub store: Store,
    pub endpoint: ChunkEndpoint,
    pub agent_id: RwLock<String>,
    pub quic_addr: SocketAddr,
    /// One HTTP/2 channel to the coordinator: the session and the public API share it.
    pub channel: Channel,
    /// Messages for the coordinator; the session task sends them when connected. Unbounded
    /// so that queueing never waits: only reports go here (one or two per order, chunk
    /// rejections, registrations); progress, load and heartbeats are made by the session.
    pub outbox: mpsc::UnboundedSender<pb::AgentMessage>,
    pub connected: AtomicBool,
    pub transfers: Transfers,
    pub orders: Orders,
    pub counters: Counters,
    pub shutdown: watch::Receiver<bool>,
    /// Client of upstream registries and HTTP origins.
    pub origin: shoal_origin::Client,
    /// Blobs this agent is seeding from their origin right now.
    pub ingests: crate::ingest::Ingests,
    /// Where in-order readers (mirror clients) of blobs being fetched are.
    pub readers: crate::mirror::Readers,
}

impl Shared {
    /// What the store may still take under its quota.
    pub(crate) fn disk_free(&self) -> u64 {
        self.config
            .quota_bytes
            .saturating_sub(self.store.usage_bytes())
    }

    pub(crate) fn agent_id(&self) -> String {
        self.agent_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues a message for the coordinator. Never waits (see `outbox`).
    pub(crate) fn send(&self, msg: pb::agent_message::Msg) {
        let _ = self.outbox.send(pb::AgentMessage { msg: Some(msg) });
    }
}

/// Resolves once the agent is told to stop (or its stop signal is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A running agent. Stop it with [`Agent::shutdown`].
#[derive(Debug)]
pub struct Agent {
    shared: Arc<Shared>,
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

        let channel = coordinator_channel(&config)?;

        let id_path = data_dir.join("agent-id");
        let previous_id = std::fs::read_to_string(&id_path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let csr = CertificateRequest::generate()?;
        let joined: Joined = session::join_until_accepted(
            &channel,
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
        let identity = csr.into_identity(
            response.certificate_der.clone(),
            response.ca_certificates_der.clone(),
        );
        persist_agent_id(&id_path, &response.agent_id);

        let endpoint =
            ChunkEndpoint::from_socket(socket, &identity, store.clone(), config.transport())?;
        let agent_id = response.agent_id.clone();
        tracing::info!(agent_id, %quic_addr, coordinator = %config.coordinator, "agent joined");
        let (shared, outbox_rx) = assemble(
            config, store, endpoint, agent_id, quic_addr, channel, stop_rx, origin,
        );
        let session = tokio::spawn(session::run(shared.clone(), joined, outbox_rx));
        Self::finish_start(shared, stop, session, health).await
    }

    /// Runs the store, the QUIC endpoint (with `identity`) and the local API, without a
    /// coordinator: no join, no session; what would be sent to the coordinator is dropped.
    /// For tests and tools that exercise the agent's local side on its own.
    #[doc(hidden)]
    pub async fn start_detached(
        config: AgentConfig,
        agent_id: &str,
        identity: &crate::transport::tls::AgentIdentity,
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
        let channel = coordinator_channel(&config)?;
        let (shared, mut outbox_rx) = assemble(
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
        Self::finish_start(shared, stop, session, health).await
    }

    async fn finish_start(
        shared: Arc<Shared>,
        stop: watch::Sender<bool>,
        session: JoinHandle<()>,
        health: Option<HealthEndpoint>,
    ) -> Result<Agent, AgentError> {
        let socket_path = shared.config.local_socket_path();
        let agent_id = shared.agent_id();
        let local_api = match crate::local_api::serve(shared.clone(), &socket_path) {
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
        let mirror = match shared.config.mirror_listen {
            None => None,
            Some(addr) => match crate::mirror::serve(shared.clone(), addr).await {
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
        if let Some(h) = &health {
            h.set_ready().await;
        }
        Ok(Agent {
            shared,
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
        self.shared.quic_addr
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
        &self.shared.store
    }

    /// True while the session with the coordinator is up.
    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> AgentStats {
        let served = self.shared.endpoint.serve_stats();
        let c = &self.shared.counters;
        AgentStats {
            bytes_served: served.bytes_served,
            chunks_served: served.chunks_served,
            bytes_from_peers: c.bytes_from_peers.load(Ordering::Relaxed),
            chunks_verified: c.chunks_verified.load(Ordering::Relaxed),
            chunks_rejected: c.chunks_rejected.load(Ordering::Relaxed),
            active_transfers: self.shared.transfers.len() as u64,
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
        self.shared.orders.abort_all().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.local_api).await;
        if let Some((_, mirror)) = self.mirror {
            let _ = tokio::time::timeout(Duration::from_secs(5), mirror).await;
        }
        let _ = std::fs::remove_file(&self.socket_path);
        self.shared.endpoint.close().await;
        let store = self.shared.store.clone();
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

fn coordinator_channel(config: &AgentConfig) -> Result<Channel, AgentError> {
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

#[allow(clippy::too_many_arguments)]
fn assemble(
    config: AgentConfig,
    store: Store,
    endpoint: ChunkEndpoint,
    agent_id: String,
    quic_addr: SocketAddr,
    channel: Channel,
    shutdown: watch::Receiver<bool>,
    origin: shoal_origin::Client,
) -> (Arc<Shared>, mpsc::UnboundedReceiver<pb::AgentMessage>) {
    let (outbox, outbox_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        store,
        endpoint,
        agent_id: RwLock::new(agent_id),
        quic_addr,
        channel,
        outbox,
        connected: AtomicBool::new(false),
        transfers: Transfers::default(),
        orders: Orders::default(),
        counters: Counters::default(),
        shutdown,
        origin,
        ingests: Default::default(),
        readers: Default::default(),
        config,
    });
    (shared, outbox_rx)
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
