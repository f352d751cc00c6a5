//! The agent's local API: gRPC `AgentLocal` on a Unix socket, for the `shoal` CLI on the same
//! host. Push and pull live in `local_api/push.rs` and `local_api/pull.rs`, writing a
//! pulled blob out in `local_api/output.rs`.

mod caller;
mod output;
mod pull;
mod push;

use caller::Caller;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_local_client::AgentLocalClient;
use shoal_proto::pb::v1::agent_local_server::{AgentLocal, AgentLocalServer};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::config::AgentConfig;
use crate::counters::Counters;
use crate::ingest::Ingester;
use crate::link::Coordinator;
use crate::orders::RunningOrders;
use crate::shutdown::{Stop, stopped};
use crate::store::Store;

/// What the local API serves from. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct LocalApi {
    pub config: Arc<AgentConfig>,
    pub quic_addr: SocketAddr,
    pub store: Store,
    pub coordinator: Coordinator,
    pub orders: RunningOrders,
    pub counters: Counters,
    /// For URLs fetched by this agent alone.
    pub ingester: Ingester,
    /// The QUIC endpoint: how many chunk requests it serves right now (Drain waits for 0).
    pub endpoint: crate::transport::ChunkEndpoint,
    /// Origins' announced digests that a pull by them found wrong (`pull.rs`).
    pub failed_guesses: pull::FailedGuesses,
}

/// Binds the Unix socket (replacing a stale one) and serves the local API until the agent
/// shuts down.
pub(crate) fn serve(api: LocalApi, path: &Path, mut stop: Stop) -> io::Result<JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    // Not left to the umask: the agent's user, root and the configured group only.
    if let Some(group) = &api.config.local_socket_group {
        let gid = crate::config::group_id(group).map_err(io::Error::other)?;
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))?;
    let service = AgentLocalServer::new(api);
    Ok(tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
                stopped(&mut stop).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "local API server failed");
        }
    }))
}

/// A client of the local API of the agent listening on the Unix socket `path`.
pub async fn connect(
    path: impl AsRef<Path>,
) -> Result<AgentLocalClient<Channel>, tonic::transport::Error> {
    let path: PathBuf = path.as_ref().to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    let channel = tonic::transport::Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?;
    Ok(AgentLocalClient::new(channel))
}

type ProgressStream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl AgentLocal for LocalApi {
    type PushStream = ProgressStream<pb::PushProgress>;
    type PullStream = ProgressStream<pb::PullProgress>;

    async fn push(
        &self,
        request: Request<pb::PushRequest>,
    ) -> Result<Response<Self::PushStream>, Status> {
        let caller = Caller::of(&request);
        push::push(self.clone(), caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        let caller = Caller::of(&request);
        pull::pull(self.clone(), caller, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        Caller::of(&request).may_drain()?;
        let timeout = std::time::Duration::from_millis(request.into_inner().timeout_ms);
        let coordinator_told = self.coordinator.is_connected();
        self.coordinator
            .send(pb::agent_message::Msg::Draining(pb::Draining {}));
        tracing::info!(
            coordinator_told,
            "draining: waiting for served chunks to finish"
        );
        // Peers hear from the coordinator that this agent is no longer a source; the chunk
        // requests already in flight finish. Two quiet looks in a row, 100 ms apart, so that
        // a request between two samples is not missed.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut quiet = 0;
        while quiet < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            quiet = if self.endpoint.active_uploads() == 0 {
                quiet + 1
            } else {
                0
            };
        }
        let uploads_in_flight = self.endpoint.active_uploads() as u32;
        tracing::info!(uploads_in_flight, "drained");
        Ok(Response::new(pb::DrainResponse {
            coordinator_told,
            uploads_in_flight,
        }))
    }

    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let include_blobs = request.into_inner().include_blobs;
        let shared = self;
        let store = shared.store.clone();
        let summaries = tokio::task::spawn_blocking(move || store.blobs())
            .await
            .map_err(|e| Status::internal(format!("store task failed: {e}")))?;
        let complete = summaries
            .iter()
            .filter(|b| b.present == b.chunk_count)
            .count() as u32;
        let transfers = (shared.orders.transfers().into_iter())
            .map(|t| pb::LocalTransfer {
                digest: t.digest.to_string(),
                bytes_done: t.progress.bytes_done,
                bytes_total: t.progress.bytes_total,
                rate_bytes_per_sec: t.progress.rate_bytes_per_sec,
                active_sources: t.progress.active_sources,
                job_id: t.job_id,
                priority: t.priority,
            })
            .collect();
        let blobs = if include_blobs {
            summaries
                .iter()
                .map(|b| pb::LocalBlob {
                    digest: b.digest.to_string(),
                    size: b.size,
                    chunks_verified: b.present,
                    chunk_count: b.chunk_count,
                    complete: b.present == b.chunk_count,
                    pinned: b.pinned,
                })
                .collect()
        } else {
            Vec::new()
        };
        let usage = shared.store.usage_bytes();
        Ok(Response::new(pb::StatusResponse {
            agent_id: shared.coordinator.agent_id(),
            connected: shared.coordinator.is_connected(),
            coordinator_address: shared.config.coordinator.clone(),
            labels: shared.config.labels.clone().into_iter().collect(),
            quic_addresses: vec![shared.quic_addr.to_string()],
            version: env!("CARGO_PKG_VERSION").to_string(),
            disk_used_bytes: usage,
            disk_free_bytes: shared.store.free_bytes(),
            blobs_complete: complete,
            blobs_partial: summaries.len() as u32 - complete,
            upload_bytes_per_sec: shared.counters.upload_rate(),
            download_bytes_per_sec: shared.orders.download_rate(),
            transfers,
            blobs,
        }))
    }
}

/// An absolute path from a request field, or INVALID_ARGUMENT naming the field.
fn absolute_path(field: &str, value: &str) -> Result<PathBuf, Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    let path = PathBuf::from(value);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!(
            "{field} {value:?} is not an absolute path"
        )));
    }
    Ok(path)
}

/// Maps a store error to the gRPC status a CLI user should see.
fn store_status(e: &crate::store::StoreError) -> Status {
    use crate::store::StoreError as E;
    match e {
        E::QuotaExceeded { .. } | E::DiskFull { .. } => Status::resource_exhausted(e.to_string()),
        E::ManifestConflict(_) | E::DigestConflict(_) => Status::failed_precondition(e.to_string()),
        E::Verify(_) => Status::data_loss(e.to_string()),
        E::UnknownBlob(_) | E::ChunkMissing { .. } => Status::not_found(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}
