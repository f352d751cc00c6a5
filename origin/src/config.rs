//! Settings for origins, read from the agent's and coordinator's TOML (`[origin]`).

use std::fmt;
use std::path::PathBuf;

use crate::OriginError;

/// Per-registry settings (section `[[origin.registries]]`). Registries without an entry are
/// reached over HTTPS, anonymously.
#[derive(Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// The registry as written in image references: `"docker.io"`, `"ghcr.io"`,
    /// `"127.0.0.1:5000"`.
    pub host: String,
    /// Base URL override, e.g. `"http://127.0.0.1:5000"`. Default: `https://<host>`, or
    /// `http://<host>` with `plain_http`; `docker.io` maps to `https://registry-1.docker.io`.
    pub endpoint: Option<String>,
    /// Use `http://` instead of `https://` when `endpoint` is not given.
    pub plain_http: bool,
    /// Username for the token endpoint (HTTP Basic) or for a registry that asks for Basic.
    pub username: Option<String>,
    /// Password, inline. Prefer `password_file`.
    pub password: Option<String>,
    /// A file holding the password (e.g. a mounted Kubernetes secret). Read at each token fetch
    /// so a rotated secret is picked up; one trailing newline is trimmed. Wins over `password`.
    pub password_file: Option<PathBuf>,
    /// A request budget for this registry: requests wait for their slot instead of being
    /// refused with 429 (e.g. below Docker Hub's pull limit). None: no budget.
    pub max_requests_per_second: Option<f64>,
}

// Hand-written so a logged config never shows the password.
impl fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryConfig")
            .field("host", &self.host)
            .field("endpoint", &self.endpoint)
            .field("plain_http", &self.plain_http)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .finish()
    }
}

impl RegistryConfig {
    /// The base URL requests go to, without a trailing slash (`/v2/...` is appended).
    pub fn base_url(&self) -> String {
        if let Some(endpoint) = &self.endpoint {
            return endpoint.trim_end_matches('/').to_string();
        }
        let scheme = if self.plain_http { "http" } else { "https" };
        let host = if self.host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        };
        format!("{scheme}://{host}")
    }

    /// The configured username and password, reading `password_file` now; without a
    /// username, what `auth_file` (`[origin] auth_file`) gives for this registry. `None`:
    /// anonymous.
    pub(crate) fn credentials(
        &self,
        auth_file: Option<&std::path::Path>,
    ) -> Result<Option<Credentials>, OriginError> {
        let Some(username) = &self.username else {
            return match auth_file {
                Some(path) => crate::docker_auth::lookup(path, &self.host),
                None => Ok(None),
            };
        };
        let password = match (&self.password_file, &self.password) {
            (Some(path), _) => {
                let mut text = std::fs::read_to_string(path).map_err(|e| {
                    OriginError::Unauthorized(format!(
                        "cannot read password_file {} for registry {}: {e}",
                        path.display(),
                        self.host
                    ))
                })?;
                if text.ends_with('\n') {
                    text.pop();
                    if text.ends_with('\r') {
                        text.pop();
                    }
                }
                text
            }
            (None, Some(password)) => password.clone(),
            (None, None) => String::new(),
        };
        Ok(Some(Credentials {
            username: username.clone(),
            password,
        }))
    }
}

/// A username and password, only ever sent as HTTP Basic. Debug does not show the password.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Headers for HTTP(S) origins whose URL starts with `url_prefix` (section
/// `[[origin.http]]`): e.g. an `Authorization` token for a private model host. Values come
/// from the config or, for secrets, from files (a mounted Kubernetes Secret), read at each
/// request with a trailing newline trimmed.
#[derive(Clone, Default, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpOriginConfig {
    /// E.g. `https://models.internal/` (compared byte for byte, so end it with `/`).
    pub url_prefix: String,
    pub headers: std::collections::BTreeMap<String, String>,
    /// Header name -> file holding its value.
    pub header_files: std::collections::BTreeMap<String, std::path::PathBuf>,
}

impl fmt::Debug for HttpOriginConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be credentials: names only.
        f.debug_struct("HttpOriginConfig")
            .field("url_prefix", &self.url_prefix)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("header_files", &self.header_files)
            .finish()
    }
}

/// Settings for every origin request (section `[origin]`). `_ms`, `_bytes` and
/// `_bytes_per_sec` keys also take strings with units (`"5s"`, `"4MiB"`, `"64KiB/s"`; see
/// [`shoal_proto::units`]).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OriginConfig {
    /// Registries that need something other than anonymous HTTPS.
    pub registries: Vec<RegistryConfig>,
    /// Headers for HTTP(S) origins, by URL prefix (every matching entry applies).
    pub http: Vec<HttpOriginConfig>,
    /// Manifests larger than this are refused with [`OriginError::TooLarge`]. Default 4 MiB.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub manifest_max_bytes: u64,
    /// TCP connect timeout. Default 5000.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub connect_timeout_ms: u64,
    /// How long to wait for response headers, and for each further piece of a body; not a
    /// limit on the whole transfer of a large blob. Default 30000.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub request_timeout_ms: u64,
    /// `User-Agent` of every request. Default `shoal/<version>`.
    pub user_agent: String,
    /// A Docker `config.json` holding registry credentials (a mounted
    /// `kubernetes.io/dockerconfigjson` Secret's `.dockerconfigjson`): `auths` entries and
    /// credential helpers (`credHelpers`, `credsStore`). Used for registries whose
    /// `[[origin.registries]]` entry names no username; read at each token fetch, so a
    /// rotated Secret is picked up.
    pub auth_file: Option<PathBuf>,
    /// The longest a registry's `429 Too Many Requests` may pause requests to it (its
    /// `Retry-After`, capped). Default 60000.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub max_retry_wait_ms: u64,
    /// Hosts a redirect may lead to over plain http or at an internal address (`host` for
    /// any port, or `host:port`), e.g. a registry's storage on the cluster network. Public
    /// https, the same host, and every `[[origin.registries]]` host and endpoint need no
    /// entry; other redirects are refused.
    pub redirect_hosts: Vec<String>,
    /// The slowest a body may come, bytes per second, measured over each
    /// `min_rate_window_ms`: a slower one fails (Unreachable), so that a seed from an origin
    /// that drips a few bytes within every `request_timeout_ms` ends, and another seeder or
    /// the targets' failure takes over, instead of holding every waiting target. 0: no
    /// floor. Default 65536 (64 KiB/s).
    #[serde(deserialize_with = "shoal_proto::units::bytes_per_sec")]
    pub min_bytes_per_sec: u64,
    /// The window `min_bytes_per_sec` is measured over. Default 30000.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub min_rate_window_ms: u64,
    /// Ranged GETs a whole blob is read with at once, in blocks of `parallel_range_bytes`,
    /// from an origin that serves ranges (an origin that ignores `Range` is read as one GET
    /// all the same). One connection seldom carries a link's rate from an object store, nor
    /// from any origin while the seeder's uplink is busy serving its peers. 1: one GET.
    /// Default 4, at most 64.
    pub parallel_ranges: u32,
    /// Bytes of each of those GETs. Blocks behind the first wait in memory for their turn
    /// (at most `parallel_ranges` × this per blob being seeded). Default 2 MiB, 64 KiB to
    /// 256 MiB.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub parallel_range_bytes: u64,
}

impl Default for OriginConfig {
    fn default() -> Self {
        Self {
            registries: Vec::new(),
            http: Vec::new(),
            manifest_max_bytes: 4 << 20,
            connect_timeout_ms: 5000,
            request_timeout_ms: 30_000,
            user_agent: concat!("shoal/", env!("CARGO_PKG_VERSION")).to_string(),
            auth_file: None,
            max_retry_wait_ms: 60_000,
            redirect_hosts: Vec::new(),
            min_bytes_per_sec: 64 << 10,
            min_rate_window_ms: 30_000,
            parallel_ranges: 4,
            parallel_range_bytes: 2 << 20,
        }
    }
}

impl OriginConfig {
    /// The configured headers for `url`: every `[[origin.http]]` entry whose prefix it has.
    pub fn http_headers(&self, url: &str) -> Result<Vec<(String, String)>, OriginError> {
        let mut out = Vec::new();
        for entry in self.http.iter().filter(|e| url.starts_with(&e.url_prefix)) {
            out.extend(entry.headers.iter().map(|(k, v)| (k.clone(), v.clone())));
            for (name, path) in &entry.header_files {
                let value = std::fs::read_to_string(path).map_err(|e| {
                    OriginError::Invalid(format!(
                        "header {name} for {}: reading {}: {e}",
                        entry.url_prefix,
                        path.display()
                    ))
                })?;
                out.push((
                    name.clone(),
                    value.trim_end_matches(['\n', '\r']).to_string(),
                ));
            }
        }
        Ok(out)
    }

    /// The settings for `host`, or the defaults (HTTPS, anonymous) when it has no entry.
    pub fn registry(&self, host: &str) -> RegistryConfig {
        (self.registries.iter())
            .find(|r| r.host.eq_ignore_ascii_case(host))
            .cloned()
            .unwrap_or_else(|| RegistryConfig {
                host: host.to_string(),
                ..RegistryConfig::default()
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let cfg = OriginConfig {
            registries: vec![
                RegistryConfig {
                    host: "127.0.0.1:5000".into(),
                    plain_http: true,
                    ..Default::default()
                },
                RegistryConfig {
                    host: "mirror.local".into(),
                    endpoint: Some("http://10.0.0.1:8080/".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            cfg.registry("127.0.0.1:5000").base_url(),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            cfg.registry("mirror.local").base_url(),
            "http://10.0.0.1:8080"
        );
        assert_eq!(cfg.registry("ghcr.io").base_url(), "https://ghcr.io");
        assert_eq!(
            cfg.registry("docker.io").base_url(),
            "https://registry-1.docker.io"
        );
    }

    #[test]
    fn debug_hides_password_and_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\r\n").unwrap();
        let reg = RegistryConfig {
            host: "r".into(),
            username: Some("u".into()),
            password: Some("inline-secret".into()),
            password_file: Some(file),
            ..Default::default()
        };
        assert!(!format!("{reg:?}").contains("inline-secret"));
        let creds = reg.credentials(None).unwrap().unwrap();
        assert_eq!(creds.password, "s3cret");
        assert!(!format!("{creds:?}").contains("s3cret"));
        let missing = RegistryConfig {
            password_file: Some(dir.path().join("absent")),
            ..reg
        };
        let err = missing.credentials(None).unwrap_err();
        assert!(
            matches!(err, OriginError::Unauthorized(ref m) if m.contains("absent")),
            "{err}"
        );
    }

    #[test]
    fn toml_shape_is_strict() {
        let cfg: OriginConfig = serde_json::from_str(
            r#"{"registries":[{"host":"ghcr.io","username":"bot"}],"manifest_max_bytes":10}"#,
        )
        .unwrap();
        assert_eq!(cfg.manifest_max_bytes, 10);
        assert_eq!(cfg.request_timeout_ms, 30_000);
        assert_eq!(cfg.registries[0].username.as_deref(), Some("bot"));
        assert!(serde_json::from_str::<OriginConfig>(r#"{"registry":[]}"#).is_err());
    }
}
