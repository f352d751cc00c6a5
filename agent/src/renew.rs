//! The agent's certificate, kept valid: the coordinator issues it for hours
//! (`agent_certificate_hours`), and at half of its validity the agent asks for a new one for
//! the same key (RenewCertificate, presenting the current one). The new certificate goes to
//! the coordinator channel and to the QUIC endpoint for new connections; open ones keep the
//! one they were made with (TLS checks validity only at the handshake), so no transfer is cut.
//! Re-joins (`session.rs`) bring a new certificate too and call [`Certificate::install`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use shoal_pki::{CertificateRequest, Identity};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::agent_session_client::AgentSessionClient;

use crate::backoff::Backoff;
use crate::link::Coordinator;
use crate::shutdown::{Stop, stopped};
use crate::transport::ChunkEndpoint;
use crate::trust::CoordinatorTrust;

/// Retries of a failed renewal are at most this far apart.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Renewals are at least this far apart, whatever a certificate says.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// The agent's key and where its certificate is used.
#[derive(Clone, Debug)]
pub(crate) struct Certificate {
    csr: Arc<CertificateRequest>,
    trust: CoordinatorTrust,
    link: Coordinator,
    endpoint: ChunkEndpoint,
    /// When the current certificate was installed and when it stops being valid (its
    /// not-before is set back for clock skew, so the install time measures its life).
    validity: Arc<Mutex<Option<(SystemTime, SystemTime)>>>,
}

impl Certificate {
    pub(crate) fn new(
        csr: Arc<CertificateRequest>,
        trust: CoordinatorTrust,
        link: Coordinator,
        endpoint: ChunkEndpoint,
        first: &Identity,
    ) -> Self {
        let c = Self {
            csr,
            trust,
            link,
            endpoint,
            validity: Arc::default(),
        };
        c.note(first);
        c
    }

    /// The agent's key, for a certificate request.
    pub(crate) fn request(&self) -> &CertificateRequest {
        &self.csr
    }

    /// A channel for Join: no client certificate, which may have expired while the agent
    /// was away (the join token is the credential there).
    pub(crate) fn join_channel(
        &self,
    ) -> Result<tonic::transport::Channel, crate::error::AgentError> {
        self.trust.channel(None)
    }

    /// Whether certificates are renewed over gRPC (a TLS coordinator).
    pub(crate) fn renewable(&self) -> bool {
        self.trust.is_tls()
    }

    /// Uses a certificate the coordinator issued for this key: for the coordinator channel,
    /// and for the QUIC endpoint's new connections (`close_open`: and closes the open ones,
    /// when the id changed and peers must not meet the old name).
    pub(crate) fn install(
        &self,
        certificate_der: Vec<u8>,
        ca_certificates_der: Vec<Vec<u8>>,
        close_open: bool,
    ) {
        let identity = self.csr.identity(certificate_der, ca_certificates_der);
        match self.trust.channel(Some(&identity)) {
            Ok(channel) => self.link.set_channel(channel),
            Err(e) => tracing::error!(error = %e, "no coordinator channel for the new certificate"),
        }
        if let Err(e) = self.endpoint.set_identity(&identity, close_open) {
            tracing::error!(error = %e, "the QUIC endpoint kept the old certificate");
        }
        self.note(&identity);
    }

    fn note(&self, identity: &Identity) {
        let until = identity
            .chain
            .first()
            .and_then(shoal_pki::validity)
            .map(|(_, until)| until);
        if let Some(until) = until {
            let secs = until
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            metrics::gauge!(crate::metrics::CERTIFICATE_EXPIRY).set(secs);
        }
        *self.validity.lock().unwrap_or_else(|e| e.into_inner()) =
            until.map(|until| (SystemTime::now(), until));
    }

    /// When to renew: half-way from its install to its expiry.
    fn due(&self) -> Option<SystemTime> {
        let (from, until) = (*self.validity.lock().unwrap_or_else(|e| e.into_inner()))?;
        let life = until.duration_since(from).ok()?;
        Some(from + life / 2)
    }

    async fn renew_once(&self) -> Result<(), tonic::Status> {
        let answer = AgentSessionClient::new(self.link.channel())
            .renew_certificate(pb::RenewCertificateRequest {
                csr_der: self.csr.csr_der().to_vec(),
            })
            .await?
            .into_inner();
        self.install(answer.certificate_der, answer.ca_certificates_der, false);
        Ok(())
    }
}

/// Renews the certificate at half of its validity until the agent stops. Not run against an
/// insecure coordinator, whose certificates last as long as its CA.
pub(crate) async fn run(certificate: Certificate, mut stop: Stop) {
    let mut backoff = Backoff::with_max(RETRY_MAX);
    loop {
        let Some(due) = certificate.due() else {
            tracing::warn!("the agent's certificate has no readable validity: not renewed");
            return;
        };
        let wait = due
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .max(MIN_WAIT);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => return,
        }
        match certificate.renew_once().await {
            Ok(()) => {
                backoff.reset();
                tracing::info!("renewed the agent's certificate");
            }
            Err(s) => {
                let delay = backoff.next_delay();
                tracing::warn!(code = ?s.code(), error = s.message(), retry_in = ?delay, "renewing the agent's certificate failed");
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = stopped(&mut stop) => return,
                }
            }
        }
    }
}
