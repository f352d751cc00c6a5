//! A token-protected registry in process (axum on 127.0.0.1:0) for the origin client's
//! tests: bearer and basic flows, a realm on another host, redirects to storage (same host
//! and another one), manifests, a manifest list, and size caps.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body as AxumBody;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::{any, get};
use base64::Engine as _;
use bytes::Bytes;
use shoal_origin::{
    Client, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Digest, OriginConfig, OriginError,
    RegistryConfig,
};

pub(crate) const USER: &str = "alice";
pub(crate) const PASSWORD: &str = "s3cret";
pub(crate) const SERVICE: &str = "fake-registry";
pub(crate) const TOKEN: &str = "tok-abc123";
pub(crate) const REPO: &str = "team/app";
/// The client's manifest cap in these tests.
pub(crate) const MANIFEST_CAP: u64 = 64 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// 401 with a Bearer challenge; tokens from /token for Basic alice:s3cret.
    Bearer,
    /// 401 with a Basic challenge; alice:s3cret directly.
    Basic,
    /// As Bearer, but the challenge names its realm by another host name (`localhost`
    /// instead of 127.0.0.1) over plain http.
    ForeignRealm,
}

pub(crate) struct Fake {
    pub(crate) mode: Mode,
    pub(crate) addr: SocketAddr,
    pub(crate) storage_addr: SocketAddr,
    pub(crate) token_requests: AtomicUsize,
    pub(crate) unauthorized_answers: AtomicUsize,
    /// The Authorization and Referer headers each storage request carried.
    pub(crate) storage_auth: Mutex<Vec<(Option<String>, Option<String>)>>,
    pub(crate) manifest: Bytes,
    pub(crate) layer: Bytes,
    pub(crate) config: Bytes,
    /// A Docker manifest list naming `manifest` for linux/amd64 and `arm_manifest` for
    /// linux/arm64/v8.
    pub(crate) list: Bytes,
    pub(crate) arm_manifest: Bytes,
    pub(crate) arm_layer: Bytes,
}

pub(crate) fn layer_bytes(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

pub(crate) fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Bytes {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "digest": Digest::of(l).to_string(),
                "size": l.len(),
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": Digest::of(config).to_string(),
            "size": config.len(),
        },
        "layers": layers,
    }))
    .unwrap()
    .into()
}

impl Fake {
    pub(crate) fn basic_ok(headers: &HeaderMap) -> bool {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == want.as_bytes())
    }

    pub(crate) fn authorized(&self, headers: &HeaderMap) -> bool {
        match self.mode {
            Mode::Bearer | Mode::ForeignRealm => headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes()),
            Mode::Basic => Self::basic_ok(headers),
        }
    }

    pub(crate) fn blob(&self, digest: &str) -> Option<Bytes> {
        [&self.layer, &self.config, &self.arm_layer]
            .into_iter()
            .find(|b| Digest::of(b).to_string() == digest)
            .cloned()
    }

    pub(crate) fn manifest_by_digest(&self, digest: &str) -> Option<(Bytes, &'static str)> {
        [
            (&self.manifest, DOCKER_MANIFEST),
            (&self.arm_manifest, DOCKER_MANIFEST),
            (&self.list, DOCKER_MANIFEST_LIST),
        ]
        .into_iter()
        .find(|(b, _)| Digest::of(b).to_string() == digest)
        .map(|(b, t)| (b.clone(), t))
    }
}

pub(crate) fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(AxumBody::from(
            serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string(),
        ))
        .unwrap()
}

pub(crate) fn serve_bytes(bytes: Bytes, content_type: &str, headers: &HeaderMap) -> Response {
    let digest = Digest::of(&bytes).to_string();
    let builder = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header("Docker-Content-Digest", digest)
        .header(header::ACCEPT_RANGES, "bytes");
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'));
    match range {
        Some((start, end)) => {
            let total = bytes.len() as u64;
            let start: u64 = start.parse().unwrap();
            let end: u64 = if end.is_empty() {
                total - 1
            } else {
                end.parse::<u64>().unwrap().min(total - 1)
            };
            builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{end}/{total}"),
                )
                .body(AxumBody::from(bytes.slice(start as usize..=end as usize)))
                .unwrap()
        }
        None => builder.body(AxumBody::from(bytes)).unwrap(),
    }
}

pub(crate) async fn token(State(f): State<Arc<Fake>>, uri: Uri, headers: HeaderMap) -> Response {
    f.token_requests.fetch_add(1, Ordering::SeqCst);
    let query = uri.query().unwrap_or("");
    // The scope the challenge named, e.g. repository:team/app:pull.
    let scope_ok = query.split('&').any(|p| {
        p.strip_prefix("scope=repository%3A")
            .is_some_and(|rest| rest.ends_with("%3Apull"))
    });
    if !query.contains(&format!("service={SERVICE}")) || !scope_ok {
        return oci_error(StatusCode::BAD_REQUEST, "BAD_QUERY", query);
    }
    if !Fake::basic_ok(&headers) {
        return oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "bad credentials");
    }
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(AxumBody::from(
            serde_json::json!({"access_token": TOKEN, "expires_in": 300}).to_string(),
        ))
        .unwrap()
}

pub(crate) async fn v2(
    State(f): State<Arc<Fake>>,
    method: Method,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !f.authorized(&headers) {
        f.unauthorized_answers.fetch_add(1, Ordering::SeqCst);
        let repo = rest.split("/manifests/").next().unwrap();
        let repo = repo.split("/blobs/").next().unwrap();
        let challenge = match f.mode {
            Mode::Bearer => format!(
                r#"Bearer realm="http://{}/token",service="{SERVICE}",scope="repository:{repo}:pull""#,
                f.addr
            ),
            Mode::Basic => r#"Basic realm="fake""#.to_string(),
            Mode::ForeignRealm => format!(
                r#"Bearer realm="http://localhost:{}/token",service="{SERVICE}",scope="repository:{repo}:pull""#,
                f.addr.port()
            ),
        };
        let mut response = oci_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "log in");
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, challenge.parse().unwrap());
        return response;
    }
    if method != Method::GET && method != Method::HEAD {
        return oci_error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read only");
    }
    let Some(rest) = rest.strip_prefix(&format!("{REPO}/")) else {
        return oci_error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "repository unknown");
    };
    match rest.split_once('/') {
        Some(("manifests", "v1")) => serve_bytes(f.manifest.clone(), DOCKER_MANIFEST, &headers),
        Some(("manifests", "multi")) => serve_bytes(f.list.clone(), DOCKER_MANIFEST_LIST, &headers),
        // Over the cap, announced by Content-Length; the body then stalls, so a client that
        // started reading instead of refusing up front would time out instead.
        Some(("manifests", "big")) => {
            use tokio_stream::StreamExt as _;
            let first = tokio_stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{"))]);
            Response::builder()
                .header(header::CONTENT_TYPE, DOCKER_MANIFEST)
                .header(header::CONTENT_LENGTH, MANIFEST_CAP + 1)
                .body(AxumBody::from_stream(first.chain(tokio_stream::pending())))
                .unwrap()
        }
        // Over the cap, chunked: the client only finds out while reading.
        Some(("manifests", "big-chunked")) => {
            let pieces = (0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 4096])));
            Response::builder()
                .header(header::CONTENT_TYPE, DOCKER_MANIFEST)
                .body(AxumBody::from_stream(tokio_stream::iter(pieces)))
                .unwrap()
        }
        Some(("manifests", "broken")) => {
            oci_error(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", "disk on fire")
        }
        Some(("manifests", digest)) if digest.starts_with("sha256:") => {
            match f.manifest_by_digest(digest) {
                Some((bytes, media_type)) => serve_bytes(bytes, media_type, &headers),
                // A lying registry: any other digest gets the v1 manifest.
                None => serve_bytes(f.manifest.clone(), DOCKER_MANIFEST, &headers),
            }
        }
        Some(("blobs", REDIRECTED_AWAY)) => {
            // Storage named by another host over plain http (as an SSRF would).
            Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(
                    header::LOCATION,
                    format!("http://localhost:{}/storage/layer", f.storage_addr.port()),
                )
                .body(AxumBody::empty())
                .unwrap()
        }
        Some(("blobs", REDIRECTED)) => {
            // The storage redirect case: a fixed digest that names the layer in storage.
            Response::builder()
                .status(StatusCode::TEMPORARY_REDIRECT)
                .header(
                    header::LOCATION,
                    format!("http://{}/storage/layer?X-Signature=abc", f.storage_addr),
                )
                .body(AxumBody::empty())
                .unwrap()
        }
        Some(("blobs", digest)) => match f.blob(digest) {
            Some(bytes) => serve_bytes(bytes, "application/octet-stream", &headers),
            None => oci_error(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            ),
        },
        _ => oci_error(
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
            "manifest unknown",
        ),
    }
}

pub(crate) async fn storage(State(f): State<Arc<Fake>>, headers: HeaderMap) -> Response {
    let header = |name| {
        headers
            .get(name)
            .map(|v: &header::HeaderValue| v.to_str().unwrap().to_string())
    };
    f.storage_auth
        .lock()
        .unwrap()
        .push((header(header::AUTHORIZATION), header(header::REFERER)));
    serve_bytes(f.layer.clone(), "application/octet-stream", &headers)
}

pub(crate) const REDIRECTED_AWAY: &str =
    "sha256:1111111111111111111111111111111111111111111111111111111111111111";
pub(crate) const REDIRECTED: &str =
    "sha256:5707aa1f5c1e1fca1ef10fc3f3d9a5e83d8b3e4d2ef6e3b5c6f4fce1ce0e3a4d";

pub(crate) struct Harness {
    pub(crate) fake: Arc<Fake>,
    pub(crate) _dir: tempfile::TempDir,
    pub(crate) password_file: std::path::PathBuf,
}

impl Harness {
    pub(crate) async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let storage_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
        let layer = layer_bytes(100_000, 7);
        let manifest = image_manifest(&config, &[&layer]);
        let arm_layer = layer_bytes(3000, 99);
        // The arm image shares the config and the big layer, and adds one of its own.
        let arm_manifest = image_manifest(&config, &[&arm_layer, &layer]);
        let list = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST_LIST,
            "manifests": [
                {"mediaType": DOCKER_MANIFEST, "digest": Digest::of(&manifest).to_string(),
                 "size": manifest.len(), "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": DOCKER_MANIFEST, "digest": Digest::of(&arm_manifest).to_string(),
                 "size": arm_manifest.len(),
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            ],
        }))
        .unwrap()
        .into();
        let fake = Arc::new(Fake {
            mode,
            addr: listener.local_addr().unwrap(),
            storage_addr: storage_listener.local_addr().unwrap(),
            token_requests: AtomicUsize::new(0),
            unauthorized_answers: AtomicUsize::new(0),
            storage_auth: Mutex::new(Vec::new()),
            manifest,
            layer,
            config,
            list,
            arm_manifest,
            arm_layer,
        });
        let app = Router::new()
            .route("/token", get(token))
            .route("/v2/{*rest}", any(v2))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let storage_app = Router::new()
            .route("/storage/{*key}", get(storage))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(storage_listener, storage_app).await.unwrap() });

        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("password");
        // As a Kubernetes secret mounted from `kubectl create secret` often is: with a newline.
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        Self {
            fake,
            _dir: dir,
            password_file,
        }
    }

    pub(crate) fn host(&self) -> String {
        self.fake.addr.to_string()
    }

    pub(crate) fn client_with(
        &self,
        username: Option<&str>,
        password_file: Option<std::path::PathBuf>,
    ) -> Client {
        self.client_configured(username, password_file, Vec::new())
    }

    pub(crate) fn client_configured(
        &self,
        username: Option<&str>,
        password_file: Option<std::path::PathBuf>,
        redirect_hosts: Vec<String>,
    ) -> Client {
        Client::new(OriginConfig {
            redirect_hosts,
            registries: vec![RegistryConfig {
                host: self.host(),
                plain_http: true,
                username: username.map(String::from),
                password_file,
                ..Default::default()
            }],
            manifest_max_bytes: MANIFEST_CAP,
            request_timeout_ms: 5000,
            ..Default::default()
        })
        .unwrap()
    }

    pub(crate) fn client(&self) -> Client {
        self.client_with(Some(USER), Some(self.password_file.clone()))
    }
}

pub(crate) async fn read_all(mut body: shoal_origin::Body) -> Result<Vec<u8>, OriginError> {
    let mut out = Vec::new();
    while let Some(piece) = body.chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}
