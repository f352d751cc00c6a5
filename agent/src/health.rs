//! `grpc.health.v1` on TCP, for probes that cannot reach the local API's Unix socket
//! (Kubernetes `grpc:` probes dial a port in the pod's network namespace).
//!
//! Two answers, so a liveness probe does not kill an agent that waits for its coordinator:
//! - service `""` (the whole server): `SERVING` once the store is open and the QUIC socket is
//!   bound, until shutdown begins. Use it for liveness.
//! - service [`READINESS_SERVICE`]: `SERVING` once the agent has joined the coordinator and
//!   serves peers and the local API; `NOT_SERVING` before that and during shutdown. Use it for
//!   readiness.

use std::net::SocketAddr;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::error::AgentError;

/// The health service name that reports whether the agent has joined and serves.
pub const READINESS_SERVICE: &str = "shoal.agent.ready";

/// A running health endpoint.
#[derive(Debug)]
pub(crate) struct HealthEndpoint {
    reporter: HealthReporter,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl HealthEndpoint {
    /// Binds `addr` and serves until `stop` turns true (or its sender is dropped, as when
    /// the start fails). Readiness starts as `NOT_SERVING`.
    pub(crate) async fn serve(
        addr: SocketAddr,
        mut stop: watch::Receiver<bool>,
    ) -> Result<HealthEndpoint, AgentError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| AgentError::Io {
                context: "binding the health endpoint (health_listen)",
                path: addr.to_string().into(),
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| AgentError::Io {
            context: "reading address of health endpoint bound to",
            path: addr.to_string().into(),
            source,
        })?;
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
            .await;
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    crate::shutdown::stopped(&mut stop).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "health endpoint failed");
            }
        });
        tracing::info!(addr = %bound, "health endpoint serving");
        Ok(HealthEndpoint {
            reporter,
            addr: bound,
            task,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(crate) async fn set_ready(&self) {
        self.reporter
            .set_service_status(READINESS_SERVICE, ServingStatus::Serving)
            .await;
    }

    /// Both answers turn `NOT_SERVING`: the agent is going away.
    pub(crate) async fn set_stopping(&self) {
        for service in ["", READINESS_SERVICE] {
            self.reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
    }

    /// Waits (briefly) for the server to end after the stop signal.
    pub(crate) async fn join(self) {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}
