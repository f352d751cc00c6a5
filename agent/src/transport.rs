//! The QUIC chunk transport: one endpoint per agent that both serves verified chunks from the
//! store and fetches chunks from peers.
//!
//! - One connection per peer pair: a connection is kept in [`ChunkEndpoint`]'s pool under the
//!   peer's endpoint address whichever side dialled it, and both sides accept requests on it.
//! - One bidirectional stream per chunk request ([`Peer::fetch_chunk`]), at most
//!   [`TransportConfig::max_requests_in_flight`] at once per connection.
//! - One have-stream per blob ([`Peer::watch_have`]): a bitfield, then deltas.
//! - The server answers `Busy` beyond [`TransportConfig::max_concurrent_served`] requests
//!   rather than queueing without bound.
//! - A downloader that rejects a chunk tells its source ([`Peer::report_corrupt`]), which
//!   reads its copy back and drops it if it rotted (`recheck.rs`). Serving itself never hashes.
//! - Mutual TLS against the cluster CA ([`tls`]).
//!
//! The data path is tuned per what was measured on loopback: UDP GSO on, 4 MiB socket
//! buffers, MTU discovery with a high upper bound, large flow-control windows so a single
//! connection can keep many chunks in flight, and no copy from store to stream on send.

mod client;
mod peers;
mod recheck;
mod server;
mod serving;
mod uplink;
/// The cluster PKI (see `shoal-pki`), re-exported where the transport uses it.
pub use shoal_pki as tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use client::{FetchError, FetchReport, HaveStream, HaveUpdate, Peer};
pub use server::ServeStats;

use crate::limiter::RateLimiter;
use crate::store::Store;
use tls::{Identity, TlsError};

/// Bytes a source queues for sending before it has measured its uplink (see `uplink`).
const INITIAL_UPLOAD_BACKLOG: u64 = 8 << 20;

/// Tuning of the transport. The defaults suit a datacenter link of 10–40 Gbit/s.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Chunk requests one connection may have open at once (both as client and server).
    pub max_requests_in_flight: u32,
    /// Chunk requests this agent serves at once across all peers; more are answered `Busy`.
    pub max_concurrent_served: usize,
    /// Chunk requests served at once to one peer (one certificate), across its
    /// connections; more are answered `Busy`, so that one peer cannot hold every slot.
    pub max_served_per_peer: usize,
    /// Connections one peer may have open to this agent at once; more are closed.
    pub max_connections_per_peer: usize,
    /// Connections all peers may have open to this agent at once; more are closed.
    pub max_connections: usize,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// A single chunk request (open, send, receive all bytes) must finish within this.
    pub request_timeout: Duration,
    /// Longest a request may wait before its bytes go out: behind the uplink's backlog (at
    /// the rate the uplink was measured to drain it) and on `upload_limit`; past it, the
    /// request is answered `Busy` and the downloader asks another source. Keeps a source's
    /// queue short enough that peers relay what it would have sent late, and a live source
    /// from going silent on a downloader for longer than the downloaders' stall timeout
    /// (`PickerConfig::stall_timeout`).
    pub max_upload_wait: Duration,
    /// Kernel send and receive buffer of the UDP socket.
    pub socket_buffer_bytes: usize,
    /// Largest UDP payload we accept, and the upper bound of MTU discovery. Loopback and
    /// jumbo-frame fabrics allow far more than the 1500-byte Ethernet default.
    pub max_udp_payload_size: u16,
    /// QUIC congestion controller of every connection.
    pub congestion: Congestion,
    /// Caps the bytes this agent serves to peers, across all connections; `None` = no cap.
    pub upload_limit: Option<Arc<RateLimiter>>,
    /// Caps the bytes this agent fetches from peers, across all connections; `None` = no cap.
    pub download_limit: Option<Arc<RateLimiter>>,
    /// A blob served to a peer is kept from eviction until this long after its last chunk
    /// went out (see `serving.rs`): it may be the swarm's only complete copy.
    pub serving_hold: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_requests_in_flight: 32,
            max_concurrent_served: 256,
            max_served_per_peer: 64,
            max_connections_per_peer: 4,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_upload_wait: Duration::from_millis(500),
            socket_buffer_bytes: 4 << 20,
            max_udp_payload_size: 1472,
            congestion: Congestion::default(),
            upload_limit: None,
            download_limit: None,
            serving_hold: Duration::from_secs(30),
        }
    }
}

/// Which congestion controller QUIC runs (quinn's implementations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    #[default]
    Cubic,
    Bbr,
    NewReno,
}

/// One connection's path as QUIC's congestion control sees it (see
/// [`ChunkEndpoint::connection_stats`]); counters are since the connection opened.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionStats {
    /// The peer's endpoint address (the pool's key).
    pub peer: SocketAddr,
    pub rtt: Duration,
    /// Congestion window, bytes.
    pub cwnd: u64,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
}

impl ConnectionStats {
    fn of(peer: SocketAddr, s: &quinn::ConnectionStats) -> Self {
        Self {
            peer,
            rtt: s.path.rtt,
            cwnd: s.path.cwnd,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            congestion_events: s.path.congestion_events,
        }
    }
}

/// Why the transport could not start or a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("binding UDP socket {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("QUIC configuration: {0}")]
    Config(String),
    #[error("connecting to {peer}: {source}")]
    Connect {
        peer: SocketAddr,
        source: quinn::ConnectError,
    },
    #[error("connection to {peer} failed: {source}")]
    Connection {
        peer: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("connecting to {peer}: timed out")]
    ConnectTimeout { peer: SocketAddr },
    #[error("{peer} is agent {agent_id}, whose certificate the coordinator revoked")]
    Revoked { peer: SocketAddr, agent_id: String },
    #[error("{peer} is {found}, not agent {expected} as the coordinator said")]
    WrongPeer {
        peer: SocketAddr,
        expected: String,
        found: String,
    },
}

/// An agent's QUIC endpoint: serves chunks from `store`, fetches from peers.
#[derive(Clone, Debug)]
pub struct ChunkEndpoint {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoint: quinn::Endpoint,
    /// Replaced with the server config when the agent's certificate changes (a new id).
    client_config: std::sync::RwLock<quinn::ClientConfig>,
    /// Agents the coordinator revoked: their certificates are refused both ways.
    revoked: std::sync::RwLock<std::collections::HashSet<String>>,
    config: TransportConfig,
    store: Store,
    pool: std::sync::Mutex<std::collections::HashMap<SocketAddr, Peer>>,
    stats: Arc<server::Counters>,
    served_limit: Arc<tokio::sync::Semaphore>,
    /// What each peer holds of the serving side (see `peers.rs`).
    peers: Arc<peers::Peers>,
    uplink: Arc<uplink::Uplink>,
    /// Chunks peers rejected, being read back (see `recheck.rs`).
    rechecks: Arc<recheck::Rechecks>,
    /// Blobs kept from eviction because peers are fetching them.
    serving: serving::Serving,
}

impl ChunkEndpoint {
    /// Binds `addr` (port 0 picks one) and starts serving `store`. Must run inside tokio.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        store: Store,
        config: TransportConfig,
    ) -> Result<Self, TransportError> {
        let socket = bind_udp_socket(addr, config.socket_buffer_bytes)?;
        Self::from_socket(socket, identity, store, config)
    }

    /// Starts serving `store` on a socket bound earlier with [`bind_udp_socket`] (an agent
    /// binds before it joins, so it can announce its address, and gets its certificate from
    /// the join). Must run inside tokio.
    pub fn from_socket(
        socket: std::net::UdpSocket,
        identity: &Identity,
        store: Store,
        config: TransportConfig,
    ) -> Result<Self, TransportError> {
        let addr = socket
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (server_config, client_config) = quic_configs(identity, &config)?;

        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(config.max_udp_payload_size.max(1200))
            .map_err(|e| TransportError::Config(e.to_string()))?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Config("no async runtime found".into()))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
            .map_err(|source| TransportError::Bind { addr, source })?;

        let inner = Arc::new(Inner {
            endpoint,
            client_config: std::sync::RwLock::new(client_config),
            revoked: Default::default(),
            served_limit: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_served)),
            uplink: Arc::new(uplink::Uplink::new(
                config.max_upload_wait,
                INITIAL_UPLOAD_BACKLOG,
            )),
            config,
            store,
            pool: Default::default(),
            stats: Default::default(),
            peers: Default::default(),
            rechecks: Default::default(),
            serving: Default::default(),
        });
        tokio::spawn(server::accept_loop(Arc::downgrade(&inner)));
        tokio::spawn(serving::sweep_loop(
            Arc::downgrade(&inner),
            inner.config.serving_hold,
        ));
        Ok(Self { inner })
    }

    /// Serves and dials with `identity` from now on (a renewed certificate, or one for a new
    /// agent id). `close_open`: close the connections made under the old one (a new id, which
    /// peers must not meet under the old name); otherwise they go on.
    pub fn set_identity(
        &self,
        identity: &Identity,
        close_open: bool,
    ) -> Result<(), TransportError> {
        let (server_config, client_config) = quic_configs(identity, &self.inner.config)?;
        self.inner.endpoint.set_server_config(Some(server_config));
        *self
            .inner
            .client_config
            .write()
            .unwrap_or_else(|e| e.into_inner()) = client_config;
        if !close_open {
            return Ok(());
        }
        let pool = std::mem::take(&mut *self.inner.pool.lock().unwrap_or_else(|e| e.into_inner()));
        for peer in pool.values() {
            peer.close(b"new identity");
        }
        Ok(())
    }

    /// The agents whose certificates are refused from now on (`replace`: exactly these;
    /// else these too). Open connections with them are closed.
    pub fn revoke(&self, agent_ids: &[String], replace: bool) {
        {
            let mut revoked = self
                .inner
                .revoked
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if replace {
                revoked.clear();
            }
            revoked.extend(agent_ids.iter().cloned());
        }
        let pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
        for peer in pool.values() {
            if peer.agent_id().is_some_and(|id| self.inner.is_revoked(&id)) {
                tracing::info!(peer = %peer.addr(), "closing the connection of a revoked agent");
                peer.close(b"revoked");
            }
        }
    }

    /// The address peers dial to reach this endpoint.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// How many blobs are kept from eviction because peers fetched them lately.
    pub fn held_for_serving(&self) -> usize {
        self.inner.serving.held()
    }

    pub fn config(&self) -> &TransportConfig {
        &self.inner.config
    }

    /// What the uplink delivered while it had chunks to send, in bytes per second: the
    /// agent's learned upload capacity. `None` until measured.
    pub fn upload_rate(&self) -> Option<f64> {
        self.inner.uplink.rate()
    }

    /// Congestion state of every pooled connection, as QUIC sees it.
    pub fn connection_stats(&self) -> Vec<ConnectionStats> {
        let pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
        (pool.iter())
            .map(|(&peer, p)| ConnectionStats::of(peer, &p.connection_stats()))
            .collect()
    }

    /// Chunk requests being served right now.
    pub fn active_uploads(&self) -> usize {
        (self.inner.config.max_concurrent_served)
            .saturating_sub(self.inner.served_limit.available_permits())
    }

    /// What the serving side has done so far.
    pub fn serve_stats(&self) -> ServeStats {
        self.inner.stats.snapshot()
    }

    /// The connection to `peer`, dialled if there is none yet (or the old one died).
    pub async fn peer(&self, peer: SocketAddr) -> Result<Peer, TransportError> {
        if let Some(p) = self.inner.pooled(peer) {
            return Ok(p);
        }
        let client_config = (self.inner.client_config.read())
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connecting = self
            .inner
            .endpoint
            .connect_with(client_config, peer, tls::SERVER_NAME)
            .map_err(|source| TransportError::Connect { peer, source })?;
        let conn = tokio::time::timeout(self.inner.config.request_timeout, connecting)
            .await
            .map_err(|_| TransportError::ConnectTimeout { peer })?
            .map_err(|source| TransportError::Connection { peer, source })?;
        if let Some(id) = self.inner.revoked_peer(&conn) {
            conn.close(0u32.into(), b"revoked");
            return Err(TransportError::Revoked { peer, agent_id: id });
        }
        Ok(self.inner.adopt(conn, false))
    }

    /// The connection to `peer`, which must be agent `agent_id` (its certificate says so):
    /// the coordinator named that agent at that address, and nobody else may answer there.
    pub async fn peer_named(
        &self,
        peer: SocketAddr,
        agent_id: &str,
    ) -> Result<Peer, TransportError> {
        let p = self.peer(peer).await?;
        match p.agent_id() {
            Some(id) if id == agent_id => Ok(p),
            found => Err(TransportError::WrongPeer {
                peer,
                expected: agent_id.to_string(),
                found: found.unwrap_or_else(|| "no agent".into()),
            }),
        }
    }

    /// Peers this endpoint holds an open connection to, whichever side dialled.
    pub fn connected_peers(&self) -> Vec<SocketAddr> {
        let pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers: Vec<_> = pool
            .iter()
            .filter(|(_, p)| p.is_open())
            .map(|(a, _)| *a)
            .collect();
        peers.sort();
        peers
    }

    /// Closes every connection and the endpoint, waiting briefly for peers to be told.
    pub async fn close(&self) {
        self.inner.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }
}

/// The end-entity certificate `conn`'s peer presented (verified by the handshake).
fn leaf_certificate(conn: &quinn::Connection) -> Option<tls::CertificateDer<'static>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<tls::CertificateDer<'static>>>()
        .ok()?;
    chain.first().cloned()
}

/// The agent id in the certificate `conn`'s peer presented.
pub(crate) fn peer_agent_id(conn: &quinn::Connection) -> Option<String> {
    leaf_certificate(conn).and_then(|c| tls::grpc::agent_id_of(&c))
}

/// The QUIC server and client configs for `identity`.
fn quic_configs(
    identity: &Identity,
    config: &TransportConfig,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let transport = Arc::new(transport_config(config));
    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(identity.server_config()?)
            .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport.clone());
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config()?)
            .map_err(|e| TransportError::Config(e.to_string()))?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}

impl Inner {
    /// The revoked agent `conn`'s peer is, if it is one (no certificate is parsed while
    /// nothing is revoked).
    fn revoked_peer(&self, conn: &quinn::Connection) -> Option<String> {
        if self
            .revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return None;
        }
        peer_agent_id(conn).filter(|id| self.is_revoked(id))
    }

    fn is_revoked(&self, agent_id: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(agent_id)
    }

    fn pooled(&self, peer: SocketAddr) -> Option<Peer> {
        let pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.get(&peer).filter(|p| p.is_open()).cloned()
    }

    /// Puts a connection in the pool (whoever dialled) and starts serving requests on it.
    /// `incoming`: the peer dialled us (the connection caps apply), else we dialled it.
    fn adopt(self: &Arc<Self>, conn: quinn::Connection, incoming: bool) -> Peer {
        let peer_addr = conn.remote_address();
        let peer = Peer::new(conn.clone(), &self.config);
        {
            let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = pool.get(&peer_addr).filter(|p| p.is_open()) {
                // Both sides dialled at once: keep serving on this one, hand out the first.
                let existing = existing.clone();
                drop(pool);
                tokio::spawn(server::serve_connection(
                    Arc::downgrade(self),
                    conn,
                    incoming,
                ));
                return existing;
            }
            pool.insert(peer_addr, peer.clone());
        }
        tokio::spawn(server::serve_connection(
            Arc::downgrade(self),
            conn,
            incoming,
        ));
        peer
    }
}

fn transport_config(config: &TransportConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let chunk_window = 2u32 << 20;
    t.max_concurrent_bidi_streams(config.max_requests_in_flight.into())
        .max_concurrent_uni_streams(0u32.into())
        // Each in-flight request may have a whole chunk in flight.
        .stream_receive_window(chunk_window.into())
        .receive_window(
            (u64::from(chunk_window) * u64::from(config.max_requests_in_flight).min(64))
                .try_into()
                .unwrap_or(quinn::VarInt::MAX),
        )
        .send_window(u64::from(chunk_window) * u64::from(config.max_requests_in_flight).min(64))
        .max_idle_timeout(config.idle_timeout.try_into().ok())
        .keep_alive_interval(Some(config.idle_timeout / 3))
        .enable_segmentation_offload(true)
        // A connection sends its chunks one after another in the order they were written
        // (the order requests arrived), not round-robin: a downloader gets each chunk whole
        // as early as possible and can verify and relay it, instead of every requested chunk
        // finishing together at the end of the window. Have-streams outrank chunk data (see
        // `server::serve_have`).
        .send_fairness(false);
    match config.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(config.max_udp_payload_size.max(1200));
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Binds the UDP socket of an endpoint with `buffer` bytes of kernel buffers (see
/// [`ChunkEndpoint::from_socket`]).
pub fn bind_udp_socket(
    addr: SocketAddr,
    buffer: usize,
) -> Result<std::net::UdpSocket, TransportError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| TransportError::Bind { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    set_buffers(&socket, buffer);
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

/// Asks for `buffer` bytes of kernel buffer. The plain options are capped by
/// `net.core.{r,w}mem_max` (often 208 KiB), which loses packets at high rates, so as root we
/// force the size; otherwise we take what we get and say so.
fn set_buffers(socket: &socket2::Socket, buffer: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let forced = setsockopt(socket, sockopt::RcvBufForce, &buffer).is_ok()
        && setsockopt(socket, sockopt::SndBufForce, &buffer).is_ok();
    if !forced {
        let _ = socket.set_recv_buffer_size(buffer);
        let _ = socket.set_send_buffer_size(buffer);
    }
    let got = socket.recv_buffer_size().unwrap_or(0);
    if got < buffer {
        tracing::warn!(
            wanted = buffer,
            got,
            "UDP receive buffer is smaller than configured; raise net.core.rmem_max or run with CAP_NET_ADMIN"
        );
    }
}
