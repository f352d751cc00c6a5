//! An agent of the test's own: it joins with the join token and gets a certificate as a
//! real agent does, then says on its session whatever the test makes it say. What a
//! compromised node could do.

use std::sync::Arc;

use anyhow::Result;
use shoal_pki::Identity;
use shoal_pki::grpc::{self, CoordinatorUrl};
use shoal_proto::pb::v1::{self as pb, agent_session_client::AgentSessionClient};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub struct Impostor {
    pub joined: pb::JoinResponse,
    pub identity: Identity,
    url: CoordinatorUrl,
    ca_pem: String,
}

impl std::fmt::Debug for Impostor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Impostor")
            .field("agent_id", &self.joined.agent_id)
            .finish_non_exhaustive()
    }
}

impl Impostor {
    /// Joins the coordinator at `url` (its CA in `ca_file`) with the join `token`,
    /// announcing `quic_address`.
    pub async fn join(
        url: &str,
        ca_file: &std::path::Path,
        token: &str,
        quic_address: &str,
    ) -> Result<Self> {
        let url = CoordinatorUrl::parse(url)?;
        let ca_pem = std::fs::read_to_string(ca_file)?;
        let csr = shoal_pki::CertificateRequest::generate()?;
        let joined = AgentSessionClient::new(channel(&url, &ca_pem, None)?)
            .join(pb::JoinRequest {
                token: token.into(),
                quic_addresses: vec![quic_address.into()],
                csr_der: csr.csr_der().to_vec(),
                protocol: shoal_proto::SESSION_PROTOCOL,
                ..Default::default()
            })
            .await?
            .into_inner();
        let identity = csr.identity(
            joined.certificate_der.clone(),
            joined.ca_certificates_der.clone(),
        );
        Ok(Self {
            joined,
            identity,
            url,
            ca_pem,
        })
    }

    /// A channel to the coordinator that verifies it against the cluster CA and presents
    /// `identity`, if any.
    pub fn channel(&self, identity: Option<&Identity>) -> Result<tonic::transport::Channel> {
        channel(&self.url, &self.ca_pem, identity)
    }

    /// A Hello naming `agent_id` with this impostor's session token.
    pub fn hello(&self, agent_id: &str) -> pb::AgentMessage {
        say(pb::agent_message::Msg::Hello(pb::Hello {
            agent_id: agent_id.into(),
            session_token: self.joined.session_token.clone(),
            quic_addresses: vec![],
        }))
    }

    /// Opens its session under its certificate, saying Hello then `first`. Returns the
    /// sender for later messages (the session lasts as long as it does); what the
    /// coordinator sends is read and dropped.
    pub async fn session(
        &self,
        first: Vec<pb::agent_message::Msg>,
    ) -> Result<mpsc::Sender<pb::AgentMessage>> {
        let (tx, mut inbound) = self.open(first).await?;
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        Ok(tx)
    }

    /// Like [`Impostor::session`], returning what the coordinator sends too.
    pub async fn open(
        &self,
        first: Vec<pb::agent_message::Msg>,
    ) -> Result<(
        mpsc::Sender<pb::AgentMessage>,
        tonic::Streaming<pb::CoordinatorMessage>,
    )> {
        let (tx, rx) = mpsc::channel(16);
        tx.send(self.hello(&self.joined.agent_id)).await?;
        for msg in first {
            tx.send(say(msg)).await?;
        }
        let inbound = AgentSessionClient::new(self.channel(Some(&self.identity))?)
            .session(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((tx, inbound))
    }
}

fn channel(
    url: &CoordinatorUrl,
    ca_pem: &str,
    identity: Option<&Identity>,
) -> Result<tonic::transport::Channel> {
    let roots = grpc::certificates_from_pem(ca_pem);
    let tls = Arc::new(grpc::client_config(&roots, identity)?);
    Ok(url.channel(url.endpoint(), Some(tls))?)
}

/// An inventory snapshot that claims `digest` whole, and nothing else.
pub fn holds_whole(digest: &shoal_proto::Digest) -> pb::agent_message::Msg {
    pb::agent_message::Msg::Inventory(pb::Inventory {
        replace: true,
        blobs: vec![pb::HeldBlob {
            blob_digest: digest.as_bytes().to_vec(),
            complete: true,
            ..Default::default()
        }],
        removed_blobs: vec![],
    })
}

pub fn say(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}
