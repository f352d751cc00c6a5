//! The Shoal coordinator: tracks agents and blobs, plans transfers, runs jobs.
//!
//! [`run`] serves, on one gRPC listener: the public job API (`shoal.v1.Coordinator`), the
//! agent sessions (`shoal.v1.AgentSession`), `grpc.health.v1` and server reflection (so
//! `grpcurl` works). One task owns all state (`state.rs`, driven by `driver.rs`); the
//! catalog, jobs, order-id counter and agents' secrets persist in a redb file under
//! `state_dir`, written by one thread of its own (`writer.rs`) so that no disk write holds up
//! the state task; the cluster CA that signs agent certificates lives there too. Health
//! follows the state task (`health.rs`); if it dies, [`run`] returns an error.

mod auth;
mod call_times;
mod db;
mod driver;
mod health;
mod listener;
pub mod metrics;
mod service;
mod state;
mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use auth::{ApiToken, Role};
/// The name of the coordinator's state thread (see `driver::StateTask`).
pub use driver::STATE_THREAD;
use shoal_planner::AssignerConfig;
use shoal_proto::pb::v1::coordinator_server::CoordinatorServer;
use shoal_proto::pb::{self, v1::agent_session_server::AgentSessionServer};

/// The coordinator's configuration; see `docs/OPERATIONS.md`. Every field has a default
/// except `join_token`. Keys ending in `_ms`, `_hours` and `_bytes` take an integer in that
/// unit or a string with units (`"10s"`, `"7d"`, `"16MiB"`; see [`shoal_proto::units`]).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// gRPC address (public API and agent sessions).
    pub listen: SocketAddr,
    /// Directory for the state database and the cluster CA.
    pub state_dir: PathBuf,
    /// Shared secret agents present at Join. Required.
    pub join_token: String,
    /// An agent silent for this long is gone, in milliseconds.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub lease_ms: u64,
    /// How often agents send a heartbeat, in milliseconds (less than the lease).
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub heartbeat_ms: u64,
    /// Most sources one target fetches a blob from at once.
    pub max_sources: usize,
    /// Most downloads one agent serves at once.
    pub max_uploads: usize,
    /// Finished jobs are forgotten this many hours after they end.
    #[serde(deserialize_with = "shoal_proto::units::hours")]
    pub job_retention_hours: u64,
    /// How long the certificates agents get are valid, in milliseconds (`"24h"`); agents
    /// renew them at half of it. Peers refuse an expired one. At least 10 s.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub agent_certificate_validity_ms: u64,
    /// Prometheus metrics address (installed by the binary); none = off.
    pub metrics_listen: Option<SocketAddr>,
    /// A plaintext `grpc.health.v1` endpoint for probes that cannot speak TLS (Kubernetes'
    /// gRPC probes); the same statuses as on `listen`. None = only on `listen`.
    pub health_listen: Option<SocketAddr>,
    /// Platforms Preheat picks from an image index when the request names none.
    pub preheat_platforms: Vec<String>,
    /// A blob at least this large that several agents wait for is fetched from its origin
    /// in ranges, by up to `max_seeders_per_blob` of them at once (when its size is known).
    /// 0 (the default) = never: one agent seeds the blob whole and streams it to the others
    /// as it comes. Ranges pay only for an origin much faster than one agent's link: each
    /// range seeder gets the rest of the blob only once every range is in (on links as fast
    /// as the origin's, 2.41x the bound against 1.30x streamed; docs/BENCHMARKS.md).
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub stripe_seed_min_bytes: u64,
    pub max_seeders_per_blob: usize,
    /// The largest job-API request (Distribute, Preheat, ...) the coordinator decodes;
    /// larger is refused (OUT_OF_RANGE) before it is read into memory. Default 16 MiB.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub max_api_request_bytes: usize,
    /// The largest message an agent session may send (a registration carries the blob's
    /// manifest: 32 MiB for 1 TiB in 1 MiB chunks); larger ends that session
    /// (OUT_OF_RANGE) before it is read into memory. Default 40 MiB.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub max_session_message_bytes: usize,
    /// The most targets (agents × blobs) one Distribute or Preheat may create; more is
    /// refused with INVALID_ARGUMENT, so that one request cannot fill the coordinator.
    /// Default 2,000,000 (20,000 agents × 100 blobs).
    pub max_targets_per_job: u64,
    /// Registries Preheat resolves image references at (scheme, credentials, limits).
    pub origin: shoal_origin::OriginConfig,
    /// API tokens and their roles (`admin`, `deployer`, `reader`); each token is read from
    /// its `token_file` at startup. See docs/SECURITY.md.
    pub api_tokens: Vec<ApiToken>,
    /// Serve plaintext gRPC and check no credentials (no TLS, no tokens, no agent
    /// certificates). Only for a trusted network or a test; logged as a warning at startup.
    pub insecure: bool,
    /// Take an agent's registration of a blob (a push, a whole seed) as verified: its
    /// first targets skip reading the blob whole against its digest, which they otherwise
    /// do until an agent other than the registrant has. Faster first distributions, but one
    /// compromised agent can then poison a digest (docs/SECURITY.md). Default false; logged
    /// as a warning at startup when set.
    pub trust_registrations: bool,
    /// The targets of a blob that no agent holds whole and nothing seeds fail `NO_SOURCE`
    /// after this long without any holder gaining a chunk: the chunks nobody has are lost
    /// (the last whole copy rotted, was evicted or removed, or its agent left).
    pub stranded_after_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7400)),
            state_dir: PathBuf::from("/var/lib/shoal/coordinator"),
            join_token: String::new(),
            lease_ms: 10_000,
            heartbeat_ms: 2_000,
            max_sources: shoal_planner::AssignerConfig::default().max_sources,
            max_uploads: shoal_planner::AssignerConfig::default().max_uploads,
            job_retention_hours: 168,
            agent_certificate_validity_ms: 24 * 3600 * 1000,
            metrics_listen: None,
            health_listen: None,
            preheat_platforms: vec!["linux/amd64".into()],
            stripe_seed_min_bytes: 0,
            max_seeders_per_blob: 4,
            max_targets_per_job: 2_000_000,
            max_api_request_bytes: 16 << 20,
            max_session_message_bytes: 40 << 20,
            origin: Default::default(),
            api_tokens: Vec::new(),
            insecure: false,
            trust_registrations: false,
            stranded_after_ms: 30_000,
        }
    }
}

/// A configuration value that cannot work, naming the key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    pub key: &'static str,
    pub reason: String,
}

impl CoordinatorConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, reason: &str| {
            Err(ConfigError {
                key,
                reason: reason.into(),
            })
        };
        if self.join_token.is_empty() {
            return bad("join_token", "must be set (agents present it at Join)");
        }
        if self.max_targets_per_job == 0 {
            return bad("max_targets_per_job", "must be positive");
        }
        if self.max_api_request_bytes < 4096 {
            return bad("max_api_request_bytes", "must be at least 4096");
        }
        if self.max_session_message_bytes < 1 << 20 {
            return bad("max_session_message_bytes", "must be at least 1 MiB");
        }
        if self.lease_ms < 500 {
            return bad("lease_ms", "must be at least 500");
        }
        if self.heartbeat_ms == 0 || self.heartbeat_ms * 2 > self.lease_ms {
            return bad(
                "heartbeat_ms",
                "must be positive and at most half of lease_ms",
            );
        }
        if self.max_sources == 0 {
            return bad("max_sources", "must be at least 1");
        }
        if self.max_uploads == 0 {
            return bad("max_uploads", "must be at least 1");
        }
        if self.agent_certificate_validity_ms < 10_000 {
            return bad("agent_certificate_validity_ms", "must be at least 10 s");
        }
        if self.max_seeders_per_blob == 0 {
            return bad("max_seeders_per_blob", "must be at least 1");
        }
        if self.stranded_after_ms < 1_000 {
            return bad("stranded_after_ms", "must be at least 1 s");
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("{path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("cluster CA: {0}")]
    Ca(#[from] shoal_pki::TlsError),
    #[error("health_listen {addr}: {source}")]
    HealthListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("api_tokens: {0}")]
    Tokens(String),
    #[error("loading state: {0}")]
    State(String),
    /// The state task or the database writer stopped: the process should exit non-zero.
    #[error("{0}")]
    StateTask(String),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("origin: {0}")]
    Origin(#[from] shoal_origin::OriginError),
}

/// Requests queued for the state task at most; senders wait beyond.
const REQUEST_QUEUE: usize = 4096;

/// After the state task died, how long the server may take to close its connections.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// Serves the coordinator on `listener` until `shutdown` resolves. Returns an error if the
/// state task or its database writer stops before that (the binary then exits non-zero, so
/// that it is restarted; see `health.rs`).
pub async fn run(
    config: CoordinatorConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let started = start(&config)?;
    serve(
        &config,
        listener,
        shutdown,
        started,
        health::Watchdog::default(),
    )
    .await
}

/// The state task, running, and what talks to it.
#[derive(Debug)]
struct Started {
    /// The cluster CA (it issues the coordinator's own serving certificate too).
    ca: Arc<shoal_pki::ClusterCa>,
    state_task: driver::StateTask,
    requests: driver::Requests,
    writer: writer::Stopped,
    down: driver::Down,
}

/// Opens the state database, loads the state and starts its task and its writer.
fn start(config: &CoordinatorConfig) -> Result<Started, CoordinatorError> {
    config.validate()?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| CoordinatorError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;
    let db = db::Db::open(&config.state_dir.join(DB_FILE))?;
    start_on(config, db)
}

/// The state database's file in `state_dir`.
const DB_FILE: &str = "coordinator.redb";

/// Loads the state from `db` and starts its task and its writer.
fn start_on(config: &CoordinatorConfig, db: db::Db) -> Result<Started, CoordinatorError> {
    let ca = Arc::new(shoal_pki::ClusterCa::load_or_generate(&config.state_dir)?);
    let state_config = state::StateConfig {
        join_token: config.join_token.clone(),
        lease: Duration::from_millis(config.lease_ms),
        heartbeat: Duration::from_millis(config.heartbeat_ms),
        job_retention: Duration::from_secs(config.job_retention_hours * 3600),
        assigner: AssignerConfig {
            max_sources: config.max_sources,
            max_uploads: config.max_uploads,
            // The coordinator enforces leases itself and tells the assigner (HostDown).
            lease: Duration::from_millis(config.lease_ms) * 4,
            ..AssignerConfig::default()
        },
        seeder: shoal_planner::SeederConfig {
            stripe_min_bytes: config.stripe_seed_min_bytes,
            max_seeders_per_blob: config.max_seeders_per_blob,
            ..Default::default()
        },
        seed: rand::random(),
        max_targets_per_job: config.max_targets_per_job,
        trust_registrations: config.trust_registrations,
        stranded_after: Duration::from_millis(config.stranded_after_ms),
        certificate_validity: (!config.insecure)
            .then(|| Duration::from_millis(config.agent_certificate_validity_ms)),
    };
    let clock = driver::Clock::new();
    let (state, writer) = state::State::new(state_config, db, ca.clone(), clock.now())
        .map_err(|e| CoordinatorError::State(e.to_string()))?;
    let (requests, rx) = driver::requests(REQUEST_QUEUE);
    let down: driver::Down = Arc::new(OnceLock::new());
    let state_task = driver::StateTask::spawn(state, clock, rx, down.clone())
        .map_err(|e| CoordinatorError::State(format!("the state thread did not start: {e}")))?;
    Ok(Started {
        ca,
        state_task,
        requests,
        writer,
        down,
    })
}

/// Serves the API on `listener` with health following the state task, until `shutdown`
/// resolves or the state task dies.
async fn serve(
    config: &CoordinatorConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: Started,
    watchdog: health::Watchdog,
) -> Result<(), CoordinatorError> {
    let origin = shoal_origin::Client::new(config.origin.clone())?;
    let tokens = auth::Tokens::load(&config.api_tokens).map_err(CoordinatorError::Tokens)?;
    if config.trust_registrations {
        tracing::warn!(
            "trust_registrations = true: one agent's registration vouches for a blob, so one compromised agent can poison a digest"
        );
    }
    let tls = if config.insecure {
        tracing::warn!(
            "insecure = true: the gRPC port is plaintext and checks no credentials; anyone who reaches it controls the cluster"
        );
        None
    } else {
        if tokens.is_empty() {
            tracing::warn!(
                "no api_tokens configured: only agents can call this coordinator (see docs/SECURITY.md)"
            );
        }
        let identity = started.ca.issue_coordinator()?;
        Some(Arc::new(shoal_pki::grpc::server_config(&identity)?))
    };
    let api = service::Api::new(
        started.requests.clone(),
        origin,
        config.preheat_platforms.clone(),
        started.down.clone(),
        service::Trust {
            policy: Arc::new(auth::Policy::new(!config.insecure, tokens)),
            ca_der: started.ca.cert_der().to_vec(),
            join_token: config.join_token.clone(),
        },
    );
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<CoordinatorServer<service::Api>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| CoordinatorError::Reflection(e.to_string()))?;

    let health_only = match config.health_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| CoordinatorError::HealthListen { addr, source })?,
        ),
        None => None,
    };
    let (fatal, mut fatal_seen) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watched = health::Watched {
        state_task: started.state_task,
        writer: started.writer,
        requests: started.requests,
        reporter,
        down: started.down,
    };
    let stop_watching = async {
        let _ = stopped.await;
    };
    let watchdog = tokio::spawn(health::watch(watched, watchdog, stop_watching, fatal));
    let mut fatal_signal = fatal_seen.clone();
    let signal = async move {
        tokio::select! {
            () = shutdown => {}
            _ = fatal_signal.wait_for(|f| *f) => {}
        }
    };

    // Manifests of 100 GB blobs are ~3 MiB, of 1 TiB 32 MiB: raise the 4 MiB default for
    // what the coordinator sends (orders and GetBlob carry manifests) and for what agents
    // register; callers' requests are small.
    let max = shoal_proto::MAX_SESSION_MESSAGE_BYTES;
    let max_request = config.max_api_request_bytes;
    let max_session = config.max_session_message_bytes;
    tracing::info!(addr = ?listener.local_addr().ok(), tls = tls.is_some(), "coordinator serving");
    let time_calls = call_times::TimeCalls::new(
        pb::FILE_DESCRIPTOR_SET,
        <CoordinatorServer<service::Api> as tonic::server::NamedService>::NAME,
    );
    let server = tonic::transport::Server::builder()
        .layer(time_calls)
        .add_service(health_service.clone())
        .add_service(reflection)
        .add_service(
            CoordinatorServer::new(api.clone())
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(max),
        )
        .add_service(
            AgentSessionServer::new(api)
                .max_decoding_message_size(max_session)
                .max_encoding_message_size(max),
        )
        .serve_with_incoming_shutdown(listener::incoming(listener, tls), signal);
    let (health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(listener) = health_only {
        let health = health_service.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(listener::incoming(listener, None), async {
                    let _ = health_stopped.await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the health endpoint stopped");
            }
        });
    }
    let served = tokio::select! {
        served = server => served,
        // The state task is gone, and with it the streams it fed; a client that holds a
        // connection open does not hold the exit back.
        () = async {
            let _ = fatal_seen.wait_for(|f| *f).await;
            tokio::time::sleep(EXIT_GRACE).await;
        } => Ok(()),
    };
    let _ = stop.send(());
    let _ = health_stop.send(());
    let outcome = (watchdog.await)
        .map_err(|e| CoordinatorError::StateTask(format!("the health watchdog: {e}")))?;
    served?;
    outcome.map_err(CoordinatorError::StateTask)
}

#[cfg(test)]
mod tests;
