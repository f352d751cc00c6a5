//! How the agent reaches its coordinator securely: which CA it verifies the coordinator
//! with, and the gRPC channels it dials.
//!
//! With an `https://` coordinator address the agent verifies the coordinator's certificate
//! against the cluster CA. It takes the CA from `coordinator_ca_file` when configured;
//! otherwise it asks the coordinator (GetClusterCa) and trusts the answer only if it carries
//! a proof keyed by the join token, which only the real coordinator knows (see
//! `shoal_pki::grpc`). It joins without a client certificate, and once it holds the
//! certificate the coordinator issued, every later call presents it. An `http://` address
//! is plaintext, for an insecure coordinator only, and is logged as a warning.

use std::sync::Arc;
use std::time::Duration;

use shoal_pki::grpc::{self, CoordinatorUrl};
use shoal_pki::{CertificateDer, Identity};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_session_client::AgentSessionClient;
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::error::AgentError;
use crate::shutdown::stopped;

/// The coordinator's address and, for TLS, the CA that vouches for it.
#[derive(Clone, Debug)]
pub(crate) struct CoordinatorTrust {
    url: CoordinatorUrl,
    /// Empty for a plaintext (insecure) coordinator.
    roots: Vec<CertificateDer<'static>>,
}

impl CoordinatorTrust {
    /// Learns the CA (from the file, or from the coordinator with its proof), retrying while
    /// the coordinator is unreachable. A wrong proof fails at once.
    pub(crate) async fn establish(
        config: &AgentConfig,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, AgentError> {
        let url = CoordinatorUrl::parse(config.coordinator.trim())
            .map_err(|e| AgentError::Config(format!("coordinator: {e}")))?;
        if !url.tls() {
            tracing::warn!(coordinator = %config.coordinator, "plaintext coordinator address: nothing this agent says to the coordinator or hears from it is protected (use https:// unless the coordinator runs with insecure = true)");
            return Ok(Self {
                url,
                roots: Vec::new(),
            });
        }
        let roots = match &config.coordinator_ca_file {
            Some(path) => {
                let pem = std::fs::read_to_string(path).map_err(|source| AgentError::Io {
                    context: "reading coordinator_ca_file",
                    path: path.clone(),
                    source,
                })?;
                let roots = grpc::certificates_from_pem(&pem);
                if roots.is_empty() {
                    return Err(AgentError::Config(format!(
                        "coordinator_ca_file {}: no PEM certificate in it",
                        path.display()
                    )));
                }
                roots
            }
            None => vec![learn_ca(config, &url, stop).await?],
        };
        Ok(Self { url, roots })
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.url.tls()
    }

    /// A channel to the coordinator presenting `identity` (none before the first Join).
    pub(crate) fn channel(&self, identity: Option<&Identity>) -> Result<Channel, AgentError> {
        let endpoint = self
            .url
            .endpoint()
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let tls = if self.url.tls() {
            Some(Arc::new(grpc::client_config(&self.roots, identity)?))
        } else {
            None
        };
        (self.url.channel(endpoint, tls))
            .map_err(|e| AgentError::Config(format!("coordinator: {e}")))
    }
}

/// Asks the coordinator for the cluster CA and checks its proof against the join token.
async fn learn_ca(
    config: &AgentConfig,
    url: &CoordinatorUrl,
    mut stop: watch::Receiver<bool>,
) -> Result<CertificateDer<'static>, AgentError> {
    let endpoint = url.endpoint().connect_timeout(Duration::from_secs(5));
    let channel = url
        .channel(endpoint, Some(Arc::new(grpc::bootstrap_client_config()?)))
        .map_err(|e| AgentError::Config(format!("coordinator: {e}")))?;
    let mut client = AgentSessionClient::new(channel);
    let mut backoff = Backoff::new();
    loop {
        let nonce: [u8; 32] = rand::random();
        match client
            .get_cluster_ca(pb::GetClusterCaRequest {
                nonce: nonce.to_vec(),
            })
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                if !grpc::verify_ca_proof(
                    &config.join_token,
                    &nonce,
                    &r.ca_certificate_der,
                    &r.proof,
                ) {
                    return Err(AgentError::Join {
                        coordinator: config.coordinator.clone(),
                        message: "the coordinator could not prove it knows the join token: the \
                                  token is wrong, or this is not the cluster's coordinator"
                            .into(),
                    });
                }
                tracing::info!(coordinator = %config.coordinator, "learned the cluster CA (proved by the join token)");
                return Ok(CertificateDer::from(r.ca_certificate_der));
            }
            Err(s) if s.code() == Code::Unimplemented => {
                return Err(AgentError::Join {
                    coordinator: config.coordinator.clone(),
                    message: format!(
                        "the coordinator cannot tell its CA ({}): set coordinator_ca_file",
                        s.message()
                    ),
                });
            }
            Err(s) => {
                let delay = backoff.next_delay();
                tracing::warn!(coordinator = %config.coordinator, code = ?s.code(), error = s.message(), retry_in = ?delay, "asking the coordinator for the cluster CA failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => return Err(AgentError::Interrupted),
                }
            }
        }
    }
}
