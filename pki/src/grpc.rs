//! TLS for the coordinator's gRPC port (the job API and the agents' sessions).
//!
//! The coordinator serves a certificate from the cluster CA named [`COORDINATOR_NAME`];
//! clients verify it against the CA whatever address they dialled, as peers do with
//! [`crate::SERVER_NAME`]. An agent certificate never carries the coordinator's name, so no
//! agent can stand in for the coordinator. Client certificates are optional at the TLS layer
//! (API callers present bearer tokens, a joining agent has no certificate yet) but verified
//! against the CA when presented; the coordinator reads the agent's id from a verified one
//! ([`agent_id_of`]).
//!
//! An agent learns the CA with nothing but its join token ([`ca_proof`]): the coordinator
//! sends its CA certificate with an HMAC keyed by the token over it, on a connection the
//! agent does not yet verify ([`bootstrap_client_config`]). Only what the proof vouches for is
//! taken from that connection, and the agent sends nothing secret over it.

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tonic::codegen::http::Uri;

use crate::{ClusterCa, Identity, TlsError};

/// The name the coordinator's certificate carries and every client verifies.
pub const COORDINATOR_NAME: &str = "coordinator.shoal.internal";

/// ALPN for gRPC over TLS.
const H2: &[u8] = b"h2";

impl ClusterCa {
    /// Issues the coordinator's serving certificate, named [`COORDINATOR_NAME`].
    pub fn issue_coordinator(&self) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::new(vec![COORDINATOR_NAME.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Shoal coordinator");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            roots: vec![self.cert_der.clone()],
        })
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The coordinator's rustls config: TLS 1.3, ALPN h2, client certificates optional but
/// verified against the cluster CA when given.
pub fn server_config(identity: &Identity) -> Result<rustls::ServerConfig, TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(identity.root_store()?), provider())
            .allow_unauthenticated()
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A client's rustls config for the coordinator: the server verified against `roots` as
/// [`COORDINATOR_NAME`], and `identity`'s certificate presented when given (an agent after
/// its Join).
pub fn client_config(
    roots: &[CertificateDer<'static>],
    identity: Option<&Identity>,
) -> Result<rustls::ClientConfig, TlsError> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone())?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(store);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// Reads PEM certificates (a CA file).
pub fn certificates_from_pem(pem: &str) -> Vec<CertificateDer<'static>> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// The agent id in a certificate the cluster CA issued to an agent (its URI SAN
/// `spiffe://shoal.internal/agent/ID`; its common name in certificates issued before that
/// SAN existed), or `None` for any other certificate. Call only on a chain the TLS layer
/// verified.
pub fn agent_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok().flatten()?;
    let names = &san.value.general_names;
    let is_agent =
        (names.iter()).any(|n| matches!(n, GeneralName::DNSName(d) if *d == crate::SERVER_NAME));
    if !is_agent {
        return None;
    }
    let from_uri = names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => uri.strip_prefix(crate::AGENT_URI_PREFIX),
        _ => None,
    });
    if let Some(id) = from_uri {
        return Some(id.to_string());
    }
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// The proof that `ca_der` is the CA of the coordinator that knows `join_token`:
/// HMAC-SHA256 keyed by the token over a label, the client's nonce and the certificate.
pub fn ca_proof(join_token: &str, nonce: &[u8], ca_der: &[u8]) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, join_token.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(b"shoal cluster CA v1\0");
    ctx.update(&(nonce.len() as u64).to_be_bytes());
    ctx.update(nonce);
    ctx.update(ca_der);
    ctx.sign().as_ref().to_vec()
}

/// Whether `proof` is [`ca_proof`] of these values (compared in constant time).
pub fn verify_ca_proof(join_token: &str, nonce: &[u8], ca_der: &[u8], proof: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, join_token.as_bytes());
    let mut message = b"shoal cluster CA v1\0".to_vec();
    message.extend_from_slice(&(nonce.len() as u64).to_be_bytes());
    message.extend_from_slice(nonce);
    message.extend_from_slice(ca_der);
    ring::hmac::verify(&key, &message, proof).is_ok()
}

/// The config of the one connection an agent makes before it knows the cluster CA: the
/// server's certificate is not checked (its signatures still are), because nothing read
/// on it is trusted unless [`verify_ca_proof`] vouches for it, and nothing secret is sent.
pub fn bootstrap_client_config() -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unverified(provider())))
        .with_no_client_auth();
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a coordinator address cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{0:?} is not a URL (https://host:port, or http://host:port for an insecure coordinator)"
    )]
    NotAUrl(String),
    #[error("{0:?}: the scheme must be https (or http for an insecure coordinator)")]
    Scheme(String),
}

/// A coordinator address: `https://host:port` (TLS) or `http://host:port` (plaintext, only
/// for a coordinator run with `insecure = true`).
#[derive(Clone, Debug)]
pub struct CoordinatorUrl {
    /// What tonic dials: always `http://host:port`, since the TLS is ours (the connector).
    plain: Uri,
    tls: bool,
}

impl CoordinatorUrl {
    pub fn parse(url: &str) -> Result<Self, AddressError> {
        let uri: Uri = url
            .parse()
            .map_err(|_| AddressError::NotAUrl(url.to_string()))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(AddressError::Scheme(url.to_string())),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| AddressError::NotAUrl(url.to_string()))?;
        let plain = format!("http://{authority}")
            .parse()
            .map_err(|_| AddressError::NotAUrl(url.to_string()))?;
        Ok(Self { plain, tls })
    }

    /// Whether this address asks for TLS (`https`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The endpoint to configure (timeouts, keep-alive) before [`CoordinatorUrl::channel`].
    pub fn endpoint(&self) -> tonic::transport::Endpoint {
        tonic::transport::Endpoint::from(self.plain.clone())
    }

    /// A lazily connecting channel over `endpoint`: TLS with `tls` for an `https` address,
    /// plaintext for `http`. An `https` address without a TLS config is an error, never a
    /// silent plaintext connection.
    pub fn channel(
        &self,
        endpoint: tonic::transport::Endpoint,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<tonic::transport::Channel, ClientError> {
        match (self.tls, tls) {
            (true, Some(config)) => Ok(endpoint.connect_with_connector_lazy(TlsConnector(
                tokio_rustls::TlsConnector::from(config),
            ))),
            (true, None) => Err(ClientError::NoCa(format!(
                "https://{}",
                self.plain.authority().map_or("", |a| a.as_str())
            ))),
            (false, _) => Ok(endpoint.connect_lazy()),
        }
    }
}

/// Dials TCP and runs TLS as [`COORDINATOR_NAME`] over it.
#[derive(Clone)]
struct TlsConnector(tokio_rustls::TlsConnector);

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.0.clone();
        Box::pin(async move {
            let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "no host");
            let host = uri.host().ok_or_else(invalid)?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(COORDINATOR_NAME).map_err(|_| invalid())?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// Adds `authorization: Bearer <token>` to every call (none without a token).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        match token {
            None => Ok(Self(None)),
            Some(t) => format!("Bearer {}", t.trim())
                .parse()
                .map(|v| Self(Some(v)))
                .map_err(|_| ClientError::Token),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A job-API client that presents a bearer token.
pub type ApiClient = shoal_proto::pb::v1::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// Why a job-API client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Address(#[from] AddressError),
    #[error("{0} is a TLS address: the cluster CA is needed to verify the coordinator")]
    NoCa(String),
    #[error("the CA file holds no PEM certificate")]
    EmptyCa,
    #[error("the API token must be printable ASCII")]
    Token,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A lazily connecting channel to the coordinator at `url`, verifying an `https`
/// coordinator against `ca_pem`, presenting no client certificate.
pub fn api_channel(
    url: &str,
    ca_pem: Option<&str>,
    connect_timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, ClientError> {
    let parsed = CoordinatorUrl::parse(url.trim())?;
    let tls = if parsed.tls() {
        let pem = ca_pem.ok_or_else(|| ClientError::NoCa(url.to_string()))?;
        let roots = certificates_from_pem(pem);
        if roots.is_empty() {
            return Err(ClientError::EmptyCa);
        }
        Some(Arc::new(client_config(&roots, None)?))
    } else {
        None
    };
    let endpoint = parsed.endpoint().connect_timeout(connect_timeout);
    parsed.channel(endpoint, tls)
}

/// A job-API client on `channel` presenting `token`.
pub fn api_client(
    channel: tonic::transport::Channel,
    token: Option<&str>,
) -> Result<ApiClient, ClientError> {
    Ok(
        shoal_proto::pb::v1::coordinator_client::CoordinatorClient::with_interceptor(
            channel,
            Bearer::new(token)?,
        )
        .max_decoding_message_size(shoal_proto::MAX_SESSION_MESSAGE_BYTES),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_proof_binds_token_nonce_and_certificate() {
        let proof = ca_proof("token", b"nonce", b"ca");
        assert!(verify_ca_proof("token", b"nonce", b"ca", &proof));
        assert!(!verify_ca_proof("other", b"nonce", b"ca", &proof));
        assert!(!verify_ca_proof("token", b"nonce2", b"ca", &proof));
        assert!(!verify_ca_proof("token", b"nonce", b"cb", &proof));
        assert!(!verify_ca_proof("token", b"nonce", b"ca", &proof[1..]));
    }

    #[test]
    fn only_agent_certificates_name_an_agent() {
        let ca = ClusterCa::generate().expect("ca");
        let agent = ca.issue("agent-7").expect("agent");
        assert_eq!(agent_id_of(&agent.chain[0]).as_deref(), Some("agent-7"));
        // The id is in a SAN of its own.
        let (_, parsed) = x509_parser::parse_x509_certificate(&agent.chain[0]).expect("x509");
        let san = parsed
            .subject_alternative_name()
            .expect("san")
            .expect("san");
        let uris: Vec<&str> = (san.value.general_names.iter())
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        assert_eq!(uris, ["spiffe://shoal.internal/agent/agent-7"]);
        let coordinator = ca.issue_coordinator().expect("coordinator");
        assert_eq!(agent_id_of(&coordinator.chain[0]), None);
        assert_eq!(agent_id_of(&CertificateDer::from(vec![1, 2, 3])), None);
        server_config(&coordinator).expect("server config");
        client_config(&coordinator.roots, Some(&agent)).expect("client config");
        client_config(&coordinator.roots, None).expect("client config");
    }

    #[test]
    fn addresses() {
        let url = CoordinatorUrl::parse("https://10.0.0.1:7400").unwrap();
        assert!(url.tls());
        // No downgrade: TLS asked for and no config to do it is an error, not plaintext.
        assert!(matches!(
            url.channel(url.endpoint(), None),
            Err(ClientError::NoCa(_))
        ));
        assert!(!CoordinatorUrl::parse("http://[::1]:7400").unwrap().tls());
        assert!(CoordinatorUrl::parse("ftp://x:1").is_err());
        assert!(CoordinatorUrl::parse("not a url").is_err());
        assert!(CoordinatorUrl::parse("10.0.0.1:7400").is_err());
    }
}
