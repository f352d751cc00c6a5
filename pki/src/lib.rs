//! Cluster PKI: one CA per cluster signs every agent's certificate; both sides of every QUIC
//! connection verify the other against it (mutual TLS). There is no skip-verify path.
//!
//! The coordinator holds the CA and signs agents' CSRs at Join; agents build their QUIC
//! identity from the result. Tests, benches and single-process tools use [`ClusterCa::issue`].

pub mod grpc;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
pub use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// The TLS server name every agent certificate carries and every client asks for. Peers are
/// dialled by address; what makes a peer legitimate is a certificate signed by the cluster CA.
pub const SERVER_NAME: &str = "agent.shoal.internal";

/// Why the cluster PKI could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: not a valid PEM {what}")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The cluster certificate authority: its certificate (the trust root) and its signing key.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Creates a fresh CA in memory (tests, the demo).
    pub fn generate() -> Result<Self, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Shoal cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert_der: cert.der().clone(),
            cert_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA from `dir/ca.pem` and `dir/ca.key`, generating and saving them on first
    /// use (the key file is written with mode 0600).
    pub fn load_or_generate(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|_| TlsError::Pem {
                path: key_path.clone(),
                what: "private key",
            })?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|_| TlsError::Pem {
                path: cert_path.clone(),
                what: "certificate",
            })?;
            let cert_der =
                CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| TlsError::Pem {
                    path: cert_path.clone(),
                    what: "certificate",
                })?;
            return Ok(Self {
                cert_pem,
                cert_der,
                issuer,
            });
        }
        let ca = Self::generate()?;
        fs::create_dir_all(dir).map_err(|source| TlsError::Io {
            path: dir.into(),
            source,
        })?;
        write_private(&key_path, ca.issuer.key().serialize_pem().as_bytes())?;
        fs::write(&cert_path, &ca.cert_pem).map_err(|source| TlsError::Io {
            path: cert_path,
            source,
        })?;
        Ok(ca)
    }

    /// The CA certificate in PEM, to hand to agents as their trust root.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate in DER (what `JoinResponse.ca_certificates_der` carries).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate for one agent, valid for [`SERVER_NAME`] as server and client,
    /// as long as the CA (tests, benches and single-process tools).
    pub fn issue(&self, agent_name: &str) -> Result<Identity, TlsError> {
        let key = KeyPair::generate()?;
        let cert = agent_params(agent_name, None)?.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            roots: vec![self.cert_der.clone()],
        })
    }

    /// Signs an agent's PKCS#10 request (DER, as sent in `JoinRequest.csr_der`) and returns
    /// the certificate in DER. Only the request's public key is taken (its signature is
    /// checked); names and usages are the CA's: [`SERVER_NAME`], server and client auth, and
    /// `agent_name` as common name. With `validity` = (now, how long): valid from a few
    /// minutes before now (clocks differ) for that long; without, as long as the CA.
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        agent_name: &str,
        validity: Option<(std::time::SystemTime, std::time::Duration)>,
    ) -> Result<Vec<u8>, TlsError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der);
        let csr = rcgen::CertificateSigningRequestParams::from_der(&der)?;
        let cert = agent_params(agent_name, validity)?.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.der().to_vec())
    }
}

/// The URI SAN naming an agent in its certificate.
pub fn agent_uri(agent_id: &str) -> String {
    format!("{AGENT_URI_PREFIX}{agent_id}")
}

/// What every agent's URI SAN starts with; the agent id follows.
pub const AGENT_URI_PREFIX: &str = "spiffe://shoal.internal/agent/";

/// How far back an agent certificate's validity starts: clocks across a cluster differ.
const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

fn agent_params(
    agent_name: &str,
    validity: Option<(std::time::SystemTime, std::time::Duration)>,
) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    // The agent id in a SAN of its own too, SPIFFE-style, for tools that read identities
    // from SANs (the common name says the same).
    let uri = rcgen::string::Ia5String::try_from(agent_uri(agent_name))?;
    params.subject_alt_names.push(rcgen::SanType::URI(uri));
    if let Some((now, validity)) = validity {
        let now = time::OffsetDateTime::from(now);
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + validity;
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, agent_name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    Ok(params)
}

/// A fresh key and a certificate signing request for it, to send in `JoinRequest.csr_der`;
/// the private key never leaves the agent.
pub struct CertificateRequest {
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl std::fmt::Debug for CertificateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateRequest").finish_non_exhaustive()
    }
}

impl CertificateRequest {
    pub fn generate() -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let csr_der = params.serialize_request(&key)?.der().to_vec();
        Ok(Self { key, csr_der })
    }

    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// The identity made of this key, the certificate the CA issued for it, and the CA roots.
    pub fn identity(&self, certificate_der: Vec<u8>, roots_der: Vec<Vec<u8>>) -> Identity {
        Identity {
            chain: vec![CertificateDer::from(certificate_der)],
            key: PrivatePkcs8KeyDer::from(self.key.serialize_der()).into(),
            roots: roots_der.into_iter().map(CertificateDer::from).collect(),
        }
    }
}

/// What an agent needs for TLS: its certificate chain and key, and the cluster's trust roots.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            roots: self.roots.clone(),
        }
    }
}

impl Identity {
    fn root_store(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        for r in &self.roots {
            roots.add(r.clone())?;
        }
        Ok(roots)
    }

    /// rustls server side: TLS 1.3, ALPN `shoal/1`, client certificates required and verified.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.root_store()?),
            provider.clone(),
        )
        .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![shoal_proto::wire::ALPN.to_vec()];
        Ok(config)
    }

    /// rustls client side: TLS 1.3, ALPN `shoal/1`, the server verified against the cluster CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.root_store()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![shoal_proto::wire::ALPN.to_vec()];
        Ok(config)
    }
}

/// When `cert` starts and stops being valid.
pub fn validity(
    cert: &CertificateDer<'_>,
) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let at = |t: &x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    };
    Some((
        at(&parsed.validity().not_before),
        at(&parsed.validity().not_after),
    ))
}

fn read(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.into(),
        source,
    })
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| TlsError::Io {
        path: path.into(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_csr_makes_a_working_identity() {
        let ca = ClusterCa::generate().expect("ca");
        let request = CertificateRequest::generate().expect("csr");
        let hour = std::time::Duration::from_secs(3600);
        let cert = ca
            .sign_csr(
                request.csr_der(),
                "agent-7",
                Some((std::time::SystemTime::now(), hour)),
            )
            .expect("sign");
        let (_, expires) = validity(&CertificateDer::from(cert.clone())).expect("validity");
        let left = expires
            .duration_since(std::time::SystemTime::now())
            .expect("in the future");
        assert!(left > hour - std::time::Duration::from_secs(60) && left <= hour);
        let identity = request.identity(cert, vec![ca.cert_der().to_vec()]);
        identity.server_config().expect("server config");
        identity.client_config().expect("client config");
        assert!(ca.sign_csr(b"not a csr", "x", None).is_err());
    }

    #[test]
    fn the_ca_not_the_request_chooses_names() {
        let ca = ClusterCa::generate().expect("ca");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "impostor");
        let csr = params.serialize_request(&key).expect("csr");
        let cert = ca.sign_csr(csr.der(), "agent-7", None).expect("sign");
        // Names are stored as plain strings in the DER encoding.
        let has = |needle: &str| cert.windows(needle.len()).any(|w| w == needle.as_bytes());
        assert!(has(SERVER_NAME) && has("agent-7"));
        assert!(!has("evil.example") && !has("impostor"));
    }

    #[test]
    fn ca_persists_and_reloads_the_same_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ClusterCa::load_or_generate(dir.path()).expect("generate");
        let b = ClusterCa::load_or_generate(dir.path()).expect("reload");
        assert_eq!(a.cert_pem(), b.cert_pem());
        // A certificate issued by the reloaded CA chains to the original root.
        let id = b.issue("agent-1").expect("issue");
        assert_eq!(id.roots[0], a.cert_der);
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .expect("key")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
