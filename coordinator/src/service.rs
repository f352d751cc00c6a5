//! The gRPC layer: decodes requests, hands them to the state task, and chooses every gRPC
//! status code in one place ([`status`]).

use std::pin::Pin;

use shoal_proto::pb::v1::{self as pb, agent_message};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request as GrpcRequest, Response, Status, Streaming};

use crate::auth::{Caller, Need, Policy};
use crate::driver::Down;
use crate::state::{ApiError, Reply, Request, Submitted};

/// How long Distribute waits for an origin to tell a blob's size.
const ORIGIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Agents' Joins, session opens and certificate renewals the state task is asked at once at
/// most; more wait here for their turn (see [`Api::admitted`]).
const ADMITTED_AT_ONCE: usize = 64;

/// The coordinator's gRPC services, both the public job API and the agent sessions.
#[derive(Clone, Debug)]
pub struct Api {
    state: crate::driver::Requests,
    /// Resolves image references for Preheat.
    origin: shoal_origin::Client,
    preheat_platforms: Vec<String>,
    /// Why the state task stopped, once it has.
    down: Down,
    trust: Trust,
    /// Turns for the agents' requests that answer to a waiting handler ([`ADMITTED_AT_ONCE`]).
    admission: std::sync::Arc<tokio::sync::Semaphore>,
}

/// Who may call, and what the coordinator proves about itself to a joining agent.
#[derive(Clone, Debug)]
pub struct Trust {
    pub policy: std::sync::Arc<Policy>,
    /// The cluster CA certificate (GetClusterCa).
    pub ca_der: Vec<u8>,
    /// Keys GetClusterCa's proof.
    pub join_token: String,
}

fn status(e: ApiError) -> Status {
    match e {
        ApiError::NotFound(m) => Status::not_found(m),
        ApiError::InvalidArgument(m) => Status::invalid_argument(m),
        ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
        ApiError::Unauthenticated(m) => Status::unauthenticated(m),
        ApiError::PermissionDenied(m) => Status::permission_denied(m),
        ApiError::Internal(m) => Status::internal(m),
        ApiError::Unavailable(m) => Status::unavailable(m),
    }
}

impl Api {
    pub fn new(
        state: crate::driver::Requests,
        origin: shoal_origin::Client,
        preheat_platforms: Vec<String>,
        down: Down,
        trust: Trust,
    ) -> Self {
        Self {
            state,
            origin,
            preheat_platforms,
            down,
            trust,
            admission: std::sync::Arc::new(tokio::sync::Semaphore::new(ADMITTED_AT_ONCE)),
        }
    }

    fn check<T>(&self, req: &GrpcRequest<T>, need: Need) -> Result<Caller, Status> {
        self.trust.policy.check(req, need)
    }

    /// UNAVAILABLE for a request the state task will not answer: it stopped (and says why;
    /// the coordinator exits to be restarted), or the coordinator is shutting down.
    fn state_gone(&self) -> Status {
        match self.down.get() {
            Some(why) => Status::unavailable(format!(
                "{why}: this coordinator serves nothing more and exits to be restarted"
            )),
            None => Status::unavailable("the coordinator is shutting down"),
        }
    }

    /// Fills in the size of origins that lack it, by asking the origin (HEAD), so that a
    /// large blob can be seeded in ranges. Best effort: an origin that does not answer is
    /// left for the seeder to meet.
    async fn size_origins(&self, req: &mut pb::DistributeRequest) {
        use pb::origin::Origin as O;
        for (blob, origin) in req.origins.iter_mut() {
            match &mut origin.origin {
                Some(O::Http(h)) if h.size == 0 => {
                    let headers: Vec<(String, String)> = h
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let head = self.origin.head_url(&h.url, &headers);
                    if let Ok(Ok(info)) = tokio::time::timeout(ORIGIN_HEAD_TIMEOUT, head).await {
                        h.size = info.size.unwrap_or(0);
                    }
                }
                Some(O::Oci(o)) if o.size == 0 => {
                    let Ok(digest) = blob.parse() else { continue };
                    let head = self.origin.head_blob(&o.registry, &o.repository, &digest);
                    if let Ok(Ok(size)) = tokio::time::timeout(ORIGIN_HEAD_TIMEOUT, head).await {
                        o.size = size;
                    }
                }
                _ => {}
            }
        }
    }

    /// A turn to ask the state task on an agent's behalf, held until its answer is in.
    ///
    /// After a coordinator restart every agent rejoins at once (20,000 in ~3 s). Asked all
    /// together, the state task answered them a batch at a time, and each answer woke its
    /// handler through the gRPC runtime's queue, which is first come, first served: a job
    /// API call answered just after such a batch waited behind thousands of those wakes,
    /// 6-28 ms after its answer, most of the call (its p99 up to 50 ms in
    /// `shoal_coordinator_api_call_seconds`). Admitted 64 at a time, at most that many are
    /// ahead of it, and the rejoins take no longer: the state task, not the number asking,
    /// sets their pace. The job API is not admitted here (it is what this keeps
    /// responsive), nor are session messages (one-way, bounded by the state's queue).
    async fn admitted(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        (self.admission.acquire().await).map_err(|_| self.state_gone())
    }

    /// Asks the state task; fails at once if it has stopped.
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Status> {
        if self.down.get().is_some() {
            return Err(self.state_gone());
        }
        let (reply, rx) = oneshot::channel();
        (self.state.send(make(reply)).await).map_err(|_| self.state_gone())?;
        rx.await.map_err(|_| self.state_gone())?.map_err(status)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for Api {
    async fn distribute(
        &self,
        req: GrpcRequest<pb::DistributeRequest>,
    ) -> Result<Response<pb::DistributeResponse>, Status> {
        let caller = self.check(&req, Need::Deploy)?;
        let mut req = req.into_inner();
        if let Caller::Agent(id) = &caller {
            only_to_itself(id, &req)?;
        }
        self.size_origins(&mut req).await;
        let submitted = Submitted {
            creator: caller.creator(),
            image: String::new(),
        };
        self.call(|r| Request::Distribute(req, submitted, r))
            .await
            .map(Response::new)
    }

    async fn get_job(
        &self,
        req: GrpcRequest<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        self.check(&req, Need::Read)?;
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
        self.check(&req, Need::Read)?;
        let req = req.into_inner();
        let rx = self.call(|r| Request::WatchJob(req, r)).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_job(
        &self,
        req: GrpcRequest<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let caller = self.check(&req, Need::Cancel)?;
        let owner = match &caller {
            Caller::Token {
                role: crate::auth::Role::Deployer,
                ..
            } => Some(caller.creator()),
            _ => None,
        };
        let req = req.into_inner();
        self.call(|r| Request::CancelJob(req, owner, r))
            .await
            .map(Response::new)
    }

    async fn remove_blob(
        &self,
        req: GrpcRequest<pb::RemoveBlobRequest>,
    ) -> Result<Response<pb::RemoveBlobResponse>, Status> {
        self.check(&req, Need::Admin)?;
        let req = req.into_inner();
        self.call(|r| Request::RemoveBlob(req, r))
            .await
            .map(Response::new)
    }

    async fn drain_agent(
        &self,
        req: GrpcRequest<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        self.check(&req, Need::Admin)?;
        let req = req.into_inner();
        self.call(|r| Request::DrainAgent(req, r))
            .await
            .map(Response::new)
    }

    async fn remove_agent(
        &self,
        req: GrpcRequest<pb::RemoveAgentRequest>,
    ) -> Result<Response<pb::RemoveAgentResponse>, Status> {
        self.check(&req, Need::Admin)?;
        let req = req.into_inner();
        self.call(|r| Request::RemoveAgent(req, r))
            .await
            .map(Response::new)
    }

    async fn list_jobs(
        &self,
        req: GrpcRequest<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.check(&req, Need::List)?;
        let req = req.into_inner();
        self.call(|r| Request::ListJobs(req, r))
            .await
            .map(Response::new)
    }

    async fn list_agents(
        &self,
        req: GrpcRequest<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.check(&req, Need::List)?;
        let req = req.into_inner();
        self.call(|r| Request::ListAgents(req, r))
            .await
            .map(Response::new)
    }

    async fn list_blobs(
        &self,
        req: GrpcRequest<pb::ListBlobsRequest>,
    ) -> Result<Response<pb::ListBlobsResponse>, Status> {
        self.check(&req, Need::List)?;
        let req = req.into_inner();
        self.call(|r| Request::ListBlobs(req, r))
            .await
            .map(Response::new)
    }

    async fn get_blob(
        &self,
        req: GrpcRequest<pb::GetBlobRequest>,
    ) -> Result<Response<pb::GetBlobResponse>, Status> {
        self.check(&req, Need::Read)?;
        let req = req.into_inner();
        self.call(|r| Request::GetBlob(req, r))
            .await
            .map(Response::new)
    }

    async fn resolve_url(
        &self,
        req: GrpcRequest<pb::ResolveUrlRequest>,
    ) -> Result<Response<pb::ResolveUrlResponse>, Status> {
        let caller = self.check(&req, Need::AgentOnly)?;
        let req = req.into_inner();
        if let Caller::Agent(id) = &caller
            && *id != req.agent_id
        {
            return Err(Status::permission_denied(format!(
                "agent {id} may resolve URLs only for itself, not for {:?}",
                req.agent_id
            )));
        }
        self.call(|r| Request::ResolveUrl(req, r))
            .await
            .map(Response::new)
    }

    async fn preheat(
        &self,
        req: GrpcRequest<pb::PreheatRequest>,
    ) -> Result<Response<pb::PreheatResponse>, Status> {
        let caller = self.check(&req, Need::Preheat)?;
        let req = req.into_inner();
        if req.image.is_empty() {
            return Err(Status::invalid_argument("image is required"));
        }
        if req.targets.is_none() {
            return Err(Status::invalid_argument(
                "targets: a selector (all, labels or agents) is required",
            ));
        }
        let reference: shoal_origin::Reference = req
            .image
            .parse()
            .map_err(|e| Status::invalid_argument(format!("image {:?}: {e}", req.image)))?;
        let platforms = if req.platforms.is_empty() {
            self.preheat_platforms.clone()
        } else {
            req.platforms.clone()
        };
        let resolved = shoal_origin::resolve_image(&self.origin, &reference, &platforms)
            .await
            .map_err(|e| {
                use shoal_origin::OriginError as E;
                let message = format!("resolving {reference}: {e}");
                match e {
                    E::NotFound(_) => Status::not_found(message),
                    E::Invalid(_) | E::TooLarge { .. } => Status::invalid_argument(message),
                    E::Unauthorized(_) => Status::permission_denied(message),
                    _ => Status::unavailable(message),
                }
            })?;
        let plain_http = self
            .origin
            .config()
            .registry(&reference.registry)
            .plain_http;
        let origin = |size| pb::Origin {
            origin: Some(pb::origin::Origin::Oci(pb::OciOrigin {
                registry: reference.registry.clone(),
                repository: reference.repository.clone(),
                plain_http,
                size,
            })),
        };
        let blobs: Vec<String> = resolved.blobs.iter().map(|(d, _)| d.to_string()).collect();
        if blobs.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{reference} has no layers for {platforms:?}"
            )));
        }
        let distribute = pb::DistributeRequest {
            origins: (resolved.blobs.iter())
                .map(|(d, size)| (d.to_string(), origin(*size)))
                .collect(),
            blobs: blobs.clone(),
            targets: req.targets,
            priority: req.priority,
            deadline_ms: req.deadline_ms,
            description: format!("preheat {reference}"),
        };
        let submitted = Submitted {
            creator: caller.creator(),
            image: reference.to_string(),
        };
        let job = self
            .call(|r| Request::Distribute(distribute, submitted, r))
            .await?;
        Ok(Response::new(pb::PreheatResponse {
            job_id: job.job_id,
            manifest_digest: resolved.manifest_digest.to_string(),
            blobs,
            target_count: job.target_count,
        }))
    }
}

#[tonic::async_trait]
impl pb::agent_session_server::AgentSession for Api {
    async fn join(
        &self,
        req: GrpcRequest<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = req.into_inner();
        let _turn = self.admitted().await?;
        self.call(|r| Request::Join(req, r))
            .await
            .map(Response::new)
    }

    async fn get_cluster_ca(
        &self,
        req: GrpcRequest<pb::GetClusterCaRequest>,
    ) -> Result<Response<pb::GetClusterCaResponse>, Status> {
        let nonce = req.into_inner().nonce;
        if !(16..=64).contains(&nonce.len()) {
            return Err(Status::invalid_argument("nonce: 16 to 64 bytes"));
        }
        let proof = shoal_pki::grpc::ca_proof(&self.trust.join_token, &nonce, &self.trust.ca_der);
        Ok(Response::new(pb::GetClusterCaResponse {
            ca_certificate_der: self.trust.ca_der.clone(),
            proof,
        }))
    }

    async fn renew_certificate(
        &self,
        req: GrpcRequest<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        let Some(agent_id) = self.trust.policy.agent(&req)? else {
            return Err(Status::failed_precondition(
                "this coordinator is insecure: agents have no certificates to renew over gRPC",
            ));
        };
        let csr_der = req.into_inner().csr_der;
        let _turn = self.admitted().await?;
        self.call(|reply| Request::RenewCertificate {
            agent_id,
            csr_der,
            reply,
        })
        .await
        .map(Response::new)
    }

    type SessionStream = BoxStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        req: GrpcRequest<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let certified = self.trust.policy.agent(&req)?;
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
        if let Some(id) = certified
            && id != hello.agent_id
        {
            return Err(Status::permission_denied(format!(
                "the certificate is agent {id}'s, not {:?}'s",
                hello.agent_id
            )));
        }
        let (tx, rx) = mpsc::channel(4096);
        // Weak: the stream must still end when the state drops its sender.
        let errors = tx.downgrade();
        let turn = self.admitted().await?;
        let session = self
            .call(|reply| Request::OpenSession { hello, tx, reply })
            .await?;
        drop(turn);
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
                        // A message past the limit, or a broken stream: the agent hears why
                        // if it still listens.
                        tracing::warn!(agent = %session.host, error = %e, "agent session ended by an error");
                        if let Some(tx) = errors.upgrade() {
                            let _ = tx.try_send(Err(e));
                        }
                        break;
                    }
                }
            }
            let _ = state.send(Request::SessionClosed { session }).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// An agent's Distribute may name only that agent (an on-demand pull).
fn only_to_itself(id: &str, req: &pb::DistributeRequest) -> Result<(), Status> {
    use pb::target_selector::Selector;
    let itself = matches!(
        req.targets.as_ref().and_then(|t| t.selector.as_ref()),
        Some(Selector::Agents(list)) if list.agent_ids.iter().all(|a| a == id) && !list.agent_ids.is_empty()
    );
    if itself {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "agent {id} may distribute only to itself"
        )))
    }
}
