//! The coordinator is the cluster CA: it signs each agent's certificate at Join, so agents
//! verify each other over QUIC without any certificate handling by operators.

use std::fs;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The name every agent certificate carries; agents dial peers with it (see the agent's
/// `transport::tls::SERVER_NAME`).
pub const AGENT_SERVER_NAME: &str = "agent.shoal.internal";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid PEM {what}")]
    Pem { path: String, what: &'static str },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// The cluster CA's certificate and signing key.
pub struct ClusterCa {
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Loads `dir/ca.pem` + `dir/ca.key`, or creates them (key mode 0600) on first start.
    pub fn load_or_generate(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join("ca.pem");
        let key_path = dir.join("ca.key");
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| CaError::Io { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert_pem = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let pem_err = |p: &Path, what| CaError::Pem {
                path: p.display().to_string(),
                what,
            };
            let key = KeyPair::from_pem(&key_pem).map_err(|_| pem_err(&key_path, "private key"))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|_| pem_err(&cert_path, "certificate"))?;
            let cert_der =
                pem_to_der(&cert_pem).ok_or_else(|| pem_err(&cert_path, "certificate"))?;
            return Ok(Self { cert_der, issuer });
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Shoal cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Signs an agent's CSR. Whatever names the CSR asks for, the certificate carries exactly
    /// the agent server name and the agent id as common name, for server and client use.
    pub fn sign_csr(&self, csr_der: &[u8], agent_id: &str) -> Result<Vec<u8>, CaError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der)?;
        csr.params.subject_alt_names = vec![SanType::DnsName(AGENT_SERVER_NAME.try_into()?)];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        csr.params.distinguished_name = dn;
        csr.params.is_ca = IsCa::NoCa;
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        Ok(csr.signed_by(&self.issuer)?.der().to_vec())
    }
}

fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_a_csr_for_the_agent_name_and_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::load_or_generate(dir.path()).expect("ca");
        let key = KeyPair::generate().expect("key");
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .expect("params")
            .serialize_request(&key)
            .expect("csr");
        let cert = ca.sign_csr(csr.der(), "agent-1").expect("signed");
        assert!(!cert.is_empty());
        let again = ClusterCa::load_or_generate(dir.path()).expect("reload");
        assert_eq!(again.cert_der(), ca.cert_der());
        assert!(ca.sign_csr(b"not a csr", "agent-1").is_err());
    }
}
