//! The agent's configuration: one typed struct, loaded by the binary (defaults, then a file,
//! then `SHOAL_` variables) and checked once by [`AgentConfig::validate`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::limiter::RateLimiter;
use crate::transport::TransportConfig;

/// Capacity declared at Join for a direction neither capped nor bounded by an interface
/// speed the kernel reports (`capacity::declared`): 10 Gbit/s.
pub const UNLIMITED_CAPACITY_BYTES_PER_SEC: u64 = 1_250_000_000;

/// How an agent runs. Every field has a default; `data_dir` and `join_token` usually need
/// setting. Keys ending in `_ms`, `_bytes` and `_bytes_per_sec`, and `chunk_size`, take an
/// integer in that unit or a string with units (`"30s"`, `"100GiB"`, `"200Mbit/s"`; see
/// [`shoal_proto::units`]); the struct holds the integer.
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The coordinator's gRPC address, e.g. `https://shoal-coordinator:7400` (TLS, the
    /// default) or `http://...` for a coordinator run with `insecure = true`.
    pub coordinator: String,
    /// The cluster CA (PEM) that vouches for the coordinator. Default: asked of the
    /// coordinator at start and trusted only with a proof keyed by the join token.
    pub coordinator_ca_file: Option<PathBuf>,
    /// Cluster join token (the coordinator's shared secret).
    pub join_token: String,
    /// The store lives in `data_dir/store`; the agent id is kept in `data_dir/agent-id`.
    pub data_dir: PathBuf,
    /// The most bytes of blobs the store may hold.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub quota_bytes: u64,
    /// UDP address of the QUIC endpoint.
    pub quic_listen: SocketAddr,
    /// Address peers dial; default: the listen port on the IP of the route to the
    /// coordinator (127.0.0.1 if listening on loopback).
    pub advertise: Option<SocketAddr>,
    /// Unix socket of the local gRPC API; default `data_dir/agent.sock`. It is created
    /// mode 0660: the agent's user, root and `local_socket_group` may connect.
    pub local_socket: Option<PathBuf>,
    /// The socket's group (a name from /etc/group, or a number); default the agent's own.
    pub local_socket_group: Option<String>,
    /// Directories that callers other than root and the agent's own user may push files from
    /// and pull files into (checked with the socket's peer credentials, after resolving
    /// symbolic links). Empty (the default): such callers may only ask for `status`.
    pub local_allowed_paths: Vec<PathBuf>,
    /// Labels announced to the coordinator: `zone`, `rack`, `host`, any other.
    pub labels: BTreeMap<String, String>,
    /// Cap on bytes served to peers per second; 0 = unlimited.
    #[serde(deserialize_with = "shoal_proto::units::bytes_per_sec")]
    pub upload_limit_bytes_per_sec: u64,
    /// Cap on bytes fetched per second; 0 = unlimited.
    #[serde(deserialize_with = "shoal_proto::units::bytes_per_sec")]
    pub download_limit_bytes_per_sec: u64,
    /// Rate at which the background scrub reads stored chunks back from the disk and hashes
    /// them (the scrub, `scrub.rs`); 0 = off. A chunk that rotted is dropped and fetched again.
    #[serde(deserialize_with = "shoal_proto::units::bytes_per_sec")]
    pub scrub_bytes_per_sec: u64,
    /// Prometheus endpoint; the binary installs the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// TCP address of a `grpc.health.v1` endpoint for probes (see [`crate::health`]);
    /// none = off.
    pub health_listen: Option<SocketAddr>,
    /// Chunk requests one QUIC connection may have open at once.
    pub max_requests_in_flight: u32,
    /// Chunk requests served at once across all peers; more are answered `Busy`.
    pub max_concurrent_served: usize,
    /// Chunk requests served at once to one peer; more are answered `Busy`.
    pub max_served_per_peer: usize,
    /// Connections one peer may have open to this agent at once; more are closed.
    pub max_connections_per_peer: usize,
    /// Connections all peers may have open to this agent at once; more are closed.
    pub max_peer_connections: usize,
    /// A single chunk request must finish within this many milliseconds.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub request_timeout_ms: u64,
    /// Longest a chunk request waits behind this agent's upload queue before it is answered
    /// `Busy` and the peer asks another source, milliseconds.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub max_upload_wait_ms: u64,
    /// QUIC congestion controller: `cubic` (the default), `bbr` or `newreno`.
    pub congestion: crate::transport::Congestion,
    /// Kernel buffer of the UDP socket, bytes.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub socket_buffer_bytes: usize,
    /// Largest UDP payload (upper bound of MTU discovery).
    pub max_udp_payload_size: u16,
    /// Chunk size of manifests built by Push (a power of two, 4 KiB–16 MiB).
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub chunk_size: u32,
    /// TCP address of the OCI registry mirror (see [`crate::mirror`]); none = off. The Helm
    /// chart serves it on 127.0.0.1:7403, where `shoal containerd-config` points containerd.
    pub mirror_listen: Option<SocketAddr>,
    /// The mirror's settings.
    pub mirror: crate::mirror::MirrorConfig,
    /// Upstream registries (scheme, credentials) and limits for origin fetches.
    pub origin: shoal_origin::OriginConfig,
}

impl Default for AgentConfig {
    fn default() -> Self {
        let transport = TransportConfig::default();
        Self {
            coordinator: "https://127.0.0.1:7400".into(),
            coordinator_ca_file: None,
            join_token: String::new(),
            data_dir: PathBuf::from("/var/lib/shoal"),
            quota_bytes: 100 << 30,
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 7401)),
            advertise: None,
            local_socket: None,
            local_socket_group: None,
            local_allowed_paths: Vec::new(),
            labels: BTreeMap::new(),
            upload_limit_bytes_per_sec: 0,
            download_limit_bytes_per_sec: 0,
            scrub_bytes_per_sec: crate::scrub::DEFAULT_BYTES_PER_SEC,
            metrics_listen: None,
            health_listen: None,
            max_requests_in_flight: transport.max_requests_in_flight,
            max_concurrent_served: transport.max_concurrent_served,
            max_served_per_peer: 64,
            max_connections_per_peer: 4,
            max_peer_connections: 4096,
            request_timeout_ms: transport.request_timeout.as_millis() as u64,
            max_upload_wait_ms: transport.max_upload_wait.as_millis() as u64,
            congestion: transport.congestion,
            socket_buffer_bytes: transport.socket_buffer_bytes,
            max_udp_payload_size: transport.max_udp_payload_size,
            chunk_size: shoal_proto::CHUNK_SIZE,
            mirror_listen: None,
            mirror: Default::default(),
            origin: Default::default(),
        }
    }
}

impl AgentConfig {
    /// Checks every value; the error names the offending key and says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let url = self.coordinator.trim();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(format!(
                "coordinator: {:?} is not an http:// or https:// URL",
                self.coordinator
            ));
        }
        if coordinator_host_port(url).is_none() {
            return Err(format!(
                "coordinator: {:?} has no host:port",
                self.coordinator
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err("data_dir: must not be empty".into());
        }
        if self.quota_bytes == 0 {
            return Err("quota_bytes: must be positive".into());
        }
        if let Some(a) = self.advertise {
            if a.ip().is_unspecified() || a.port() == 0 {
                return Err(format!(
                    "advertise: {a} must be a concrete IP and port peers can dial"
                ));
            }
        }
        if self.max_requests_in_flight == 0 {
            return Err("max_requests_in_flight: must be at least 1".into());
        }
        if self.max_concurrent_served == 0 {
            return Err("max_concurrent_served: must be at least 1".into());
        }
        if self.request_timeout_ms == 0 {
            return Err("request_timeout_ms: must be positive".into());
        }
        if self.max_upload_wait_ms == 0 || self.max_upload_wait_ms >= self.request_timeout_ms {
            return Err(format!(
                "max_upload_wait_ms: must be positive and below request_timeout_ms ({})",
                self.request_timeout_ms
            ));
        }
        if self.max_udp_payload_size < 1200 {
            return Err("max_udp_payload_size: must be at least 1200 (QUIC's minimum)".into());
        }
        if !self.chunk_size.is_power_of_two() || !(4 << 10..=16 << 20).contains(&self.chunk_size) {
            return Err(format!(
                "chunk_size: {} is not a power of two between 4 KiB and 16 MiB",
                self.chunk_size
            ));
        }
        for (key, value) in &self.labels {
            if key.is_empty() {
                return Err(format!("labels: empty key (value {value:?})"));
            }
        }
        if self.max_served_per_peer == 0
            || self.max_connections_per_peer == 0
            || self.max_peer_connections == 0
        {
            return Err(
                "max_served_per_peer, max_connections_per_peer and max_peer_connections: must be positive"
                    .into(),
            );
        }
        if let Some(bad) = (self.local_allowed_paths.iter()).find(|p| !p.is_absolute()) {
            return Err(format!(
                "local_allowed_paths: {} is not an absolute path",
                bad.display()
            ));
        }
        if let Some(group) = &self.local_socket_group {
            group_id(group)?;
        }
        self.mirror.validate()?;
        Ok(())
    }

    /// The Unix socket of the local API.
    pub fn local_socket_path(&self) -> PathBuf {
        self.local_socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("agent.sock"))
    }

    /// The transport settings, with one token bucket per capped direction (burst: two
    /// chunks, so a single connection is never starved by its own bucket).
    pub fn transport(&self) -> TransportConfig {
        let burst = 2 * u64::from(self.chunk_size.max(shoal_proto::CHUNK_SIZE));
        let bucket =
            |rate: u64| (rate > 0).then(|| Arc::new(RateLimiter::new(rate, burst.max(rate / 10))));
        TransportConfig {
            max_requests_in_flight: self.max_requests_in_flight,
            max_concurrent_served: self.max_concurrent_served,
            max_served_per_peer: self.max_served_per_peer,
            max_connections_per_peer: self.max_connections_per_peer,
            max_connections: self.max_peer_connections,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            max_upload_wait: Duration::from_millis(self.max_upload_wait_ms),
            congestion: self.congestion,
            socket_buffer_bytes: self.socket_buffer_bytes,
            max_udp_payload_size: self.max_udp_payload_size,
            upload_limit: bucket(self.upload_limit_bytes_per_sec),
            download_limit: bucket(self.download_limit_bytes_per_sec),
            ..TransportConfig::default()
        }
    }
}

/// `host:port` of the coordinator URL (default port 80/443 by scheme).
pub(crate) fn coordinator_host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    if authority.is_empty() {
        return None;
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

/// The id of `group`: a number, or a name in /etc/group.
pub fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string("/etc/group")
        .map_err(|e| format!("local_socket_group {group:?}: reading /etc/group: {e}"))?;
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("local_socket_group: no group {group:?} in /etc/group"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        AgentConfig::default().validate().expect("defaults");
    }

    #[test]
    fn errors_name_the_key() {
        let bad = AgentConfig {
            coordinator: "127.0.0.1:7400".into(),
            ..AgentConfig::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("coordinator:"));
        let bad = AgentConfig {
            chunk_size: 3000,
            ..AgentConfig::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("chunk_size:"));
        let bad = AgentConfig {
            advertise: Some("0.0.0.0:7401".parse().expect("addr")),
            ..AgentConfig::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("advertise:"));
        let bad = AgentConfig {
            max_upload_wait_ms: 30_000,
            ..AgentConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .starts_with("max_upload_wait_ms:")
        );
    }

    #[test]
    fn transport_settings_reach_the_transport() {
        // The same serde shape as agent.toml.
        let c: AgentConfig =
            serde_json::from_str(r#"{"max_upload_wait_ms": 250, "congestion": "newreno"}"#)
                .expect("parses");
        c.validate().expect("valid");
        let t = c.transport();
        assert_eq!(t.max_upload_wait, Duration::from_millis(250));
        assert_eq!(t.congestion, crate::transport::Congestion::NewReno);
        assert!(serde_json::from_str::<AgentConfig>(r#"{"congestion": "vegas"}"#).is_err());
    }

    #[test]
    fn the_scrub_rate_takes_units_and_zero_turns_it_off() {
        assert_eq!(AgentConfig::default().scrub_bytes_per_sec, 16 << 20);
        let c: AgentConfig =
            serde_json::from_str(r#"{"scrub_bytes_per_sec": "64MiB/s"}"#).expect("parses");
        assert_eq!(c.scrub_bytes_per_sec, 64 << 20);
        let c: AgentConfig = serde_json::from_str(r#"{"scrub_bytes_per_sec": 0}"#).expect("parses");
        c.validate().expect("off is valid");
    }

    #[test]
    fn coordinator_url_parts() {
        assert_eq!(
            coordinator_host_port("http://127.0.0.1:7400"),
            Some(("127.0.0.1".into(), 7400))
        );
        assert_eq!(
            coordinator_host_port("https://coord.example/"),
            Some(("coord.example".into(), 443))
        );
        assert_eq!(
            coordinator_host_port("http://[::1]:9"),
            Some(("::1".into(), 9))
        );
    }

    #[test]
    fn limits_become_buckets_only_when_set() {
        let c = AgentConfig::default();
        assert!(c.transport().upload_limit.is_none());
        let c = AgentConfig {
            upload_limit_bytes_per_sec: 25_000_000,
            ..AgentConfig::default()
        };
        assert_eq!(
            c.transport().upload_limit.map(|l| l.bytes_per_sec()),
            Some(25_000_000)
        );
    }
}
