//! The gRPC layer: decodes requests, hands them to the state task, and chooses every gRPC
//! status code in one place ([`status`]).

use std::pin::Pin;

use shoal_proto::pb::v1::{self as pb, agent_message};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::state::{ApiError, Reply, Request};

/// The coordinator's gRPC services, both the public job API and the agent sessions.
#[derive(Clone, Debug)]
pub struct Api {
    state: mpsc::Sender<Request>,
}

fn status(e: ApiError) -> Status {
    match e {
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::InvalidArgument(m) => Status::invalid_argument(m),
        ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
        ApiError::Unauthenticated(m) => Status::unauthenticated(m),
        ApiError::Internal(m) => Status::internal(m),
    }
}

impl Api {
    pub fn new(state: mpsc::Sender<Request>) -> Self {
        Self { state }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.state
            .send(make(reply))
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        rx.await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?
            .map_err(status)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Api {
    async fn distribute(
        &self,
        req: GrpcRequest<pb::DistributeRequest>,
    ) -> Result<Response<pb::DistributeResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::Distribute(req, r))
            .await
            .map(Response::new)
    }

    async fn get_job(
        &self,
        req: GrpcRequest<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::GetJob(req, r))
            .await
            .map(Response::new)
    }

    type WatchJobStream = BoxStream<pb::JobProgress>;

    async fn watch_job(
        &self,
        req: GrpcRequest<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let req = req.into_inner();
        let rx = self.call(|r| Request::WatchJob(req, r)).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        req: GrpcRequest<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::CancelJob(req, r))
            .await
            .map(Response::new)
    }

    async fn list_jobs(
        &self,
        req: GrpcRequest<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::ListJobs(req, r))
            .await
            .map(Response::new)
    }

    async fn list_agents(
        &self,
        req: GrpcRequest<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::ListAgents(req, r))
            .await
            .map(Response::new)
    }

    async fn list_blobs(
        &self,
        req: GrpcRequest<pb::ListBlobsRequest>,
    ) -> Result<Response<pb::ListBlobsResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::ListBlobs(req, r))
            .await
            .map(Response::new)
    }

    async fn get_blob(
        &self,
        req: GrpcRequest<pb::GetBlobRequest>,
    ) -> Result<Response<pb::GetBlobResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::GetBlob(req, r))
            .await
            .map(Response::new)
    }

    async fn preheat(
        &self,
        _req: GrpcRequest<pb::PreheatRequest>,
    ) -> Result<Response<pb::PreheatResponse>, Status> {
        Err(Status::unimplemented(
            "preheat needs the OCI registry origin, which is not built yet",
        ))
    }
}

#[tonic::async_trait]
impl pb::agent_session_server::AgentSession for Api {
    async fn join(
        &self,
        req: GrpcRequest<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = req.into_inner();
        self.call(|r| Request::Join(req, r))
            .await
            .map(Response::new)
    }

    type SessionStream = BoxStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        req: GrpcRequest<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("session ended before Hello"))?;
        let Some(agent_message::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first session message must be Hello",
            ));
        };
        let (tx, rx) = mpsc::channel(4096);
        let session = self
            .call(|reply| Request::OpenSession { hello, tx, reply })
            .await?;
        let state = self.state.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(pb::AgentMessage { msg: Some(msg) })) => {
                        if state
                            .send(Request::FromAgent { session, msg })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "session stream error");
                        break;
                    }
                }
            }
            let _ = state.send(Request::SessionClosed { session }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
