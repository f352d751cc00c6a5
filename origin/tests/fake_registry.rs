//! The client against an in-process, token-protected registry (axum on 127.0.0.1:0): the
//! bearer and basic flows, size caps, digests, ranges, redirects to storage, error mapping and
//! manifest-list resolution.

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
    ByteRange, Client, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, Digest, MANIFEST_MEDIA_TYPES,
    OriginConfig, OriginError, Reference, RegistryConfig, resolve_image,
};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret";
const SERVICE: &str = "fake-registry";
const TOKEN: &str = "tok-abc123";
const REPO: &str = "team/app";
/// The client's manifest cap in these tests.
const MANIFEST_CAP: u64 = 64 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// 401 with a Bearer challenge; tokens from /token for Basic alice:s3cret.
    Bearer,
    /// 401 with a Basic challenge; alice:s3cret directly.
    Basic,
}

struct Fake {
    mode: Mode,
    addr: SocketAddr,
    storage_addr: SocketAddr,
    token_requests: AtomicUsize,
    unauthorized_answers: AtomicUsize,
    /// The Authorization and Referer headers each storage request carried.
    storage_auth: Mutex<Vec<(Option<String>, Option<String>)>>,
    manifest: Bytes,
    layer: Bytes,
    config: Bytes,
    /// A Docker manifest list naming `manifest` for linux/amd64 and `arm_manifest` for
    /// linux/arm64/v8.
    list: Bytes,
    arm_manifest: Bytes,
    arm_layer: Bytes,
}

fn layer_bytes(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Bytes {
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
    fn basic_ok(headers: &HeaderMap) -> bool {
        let want = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
        );
        headers
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == want.as_bytes())
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        match self.mode {
            Mode::Bearer => headers
                .get(header::AUTHORIZATION)
                .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes()),
            Mode::Basic => Self::basic_ok(headers),
        }
    }

    fn blob(&self, digest: &str) -> Option<Bytes> {
        [&self.layer, &self.config, &self.arm_layer]
            .into_iter()
            .find(|b| Digest::of(b).to_string() == digest)
            .cloned()
    }

    fn manifest_by_digest(&self, digest: &str) -> Option<(Bytes, &'static str)> {
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

fn oci_error(status: StatusCode, code: &str, message: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(AxumBody::from(
            serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string(),
        ))
        .unwrap()
}

fn serve_bytes(bytes: Bytes, content_type: &str, headers: &HeaderMap) -> Response {
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

async fn token(State(f): State<Arc<Fake>>, uri: Uri, headers: HeaderMap) -> Response {
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

async fn v2(
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

async fn storage(State(f): State<Arc<Fake>>, headers: HeaderMap) -> Response {
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

const REDIRECTED: &str = "sha256:5707aa1f5c1e1fca1ef10fc3f3d9a5e83d8b3e4d2ef6e3b5c6f4fce1ce0e3a4d";

struct Harness {
    fake: Arc<Fake>,
    _dir: tempfile::TempDir,
    password_file: std::path::PathBuf,
}

impl Harness {
    async fn start(mode: Mode) -> Self {
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

    fn host(&self) -> String {
        self.fake.addr.to_string()
    }

    fn client_with(
        &self,
        username: Option<&str>,
        password_file: Option<std::path::PathBuf>,
    ) -> Client {
        Client::new(OriginConfig {
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

    fn client(&self) -> Client {
        self.client_with(Some(USER), Some(self.password_file.clone()))
    }
}

async fn read_all(mut body: shoal_origin::Body) -> Result<Vec<u8>, OriginError> {
    let mut out = Vec::new();
    while let Some(piece) = body.chunk().await? {
        out.extend_from_slice(&piece);
    }
    Ok(out)
}

#[tokio::test]
async fn bearer_token_flow_with_password_file_and_cache() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let m = client
        .get_manifest(&h.host(), REPO, "v1", MANIFEST_MEDIA_TYPES)
        .await
        .unwrap();
    assert_eq!(m.bytes, h.fake.manifest);
    assert_eq!(m.media_type, DOCKER_MANIFEST);
    assert_eq!(m.digest, Digest::of(&h.fake.manifest));
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.unauthorized_answers.load(Ordering::SeqCst), 1);

    // The cached token is sent up front: no second challenge, no second token fetch, also
    // from a clone of the client.
    let clone = client.clone();
    let by_digest = clone
        .get_manifest(&h.host(), REPO, &m.digest.to_string(), &[])
        .await
        .unwrap();
    assert_eq!(by_digest.digest, m.digest);
    let size = clone
        .head_blob(&h.host(), REPO, &Digest::of(&h.fake.layer))
        .await
        .unwrap();
    assert_eq!(size, 100_000);
    let head = clone
        .head_manifest(&h.host(), REPO, "v1", MANIFEST_MEDIA_TYPES)
        .await
        .unwrap();
    assert_eq!(head.size, h.fake.manifest.len() as u64);
    assert_eq!(head.digest, Some(m.digest));
    assert_eq!(head.media_type, DOCKER_MANIFEST);
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.unauthorized_answers.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_unauthorized() {
    let h = Harness::start(Mode::Bearer).await;
    let wrong = h._dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let err = h
        .client_with(Some(USER), Some(wrong))
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap_err();
    let OriginError::Unauthorized(message) = &err else {
        panic!("want Unauthorized, got {err:?}")
    };
    assert!(message.contains("/token"), "{message}");
    assert!(message.contains("alice"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    let err = h
        .client_with(None, None)
        .get_blob(&h.host(), REPO, &Digest::of(&h.fake.layer), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::Unauthorized(m) if m.contains("anonymous")),
        "{err:?}"
    );
}

#[tokio::test]
async fn basic_challenge_uses_credentials_and_remembers() {
    let h = Harness::start(Mode::Basic).await;
    let client = h.client();
    let m = client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap();
    assert_eq!(m.bytes, h.fake.manifest);
    client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap();
    assert_eq!(h.fake.unauthorized_answers.load(Ordering::SeqCst), 1);
    assert_eq!(h.fake.token_requests.load(Ordering::SeqCst), 0);

    let err = h
        .client_with(None, None)
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::Unauthorized(m) if m.contains("basic auth")),
        "{err:?}"
    );
}

#[tokio::test]
async fn manifest_over_the_cap_is_too_large() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let started = std::time::Instant::now();
    for tag in ["big", "big-chunked"] {
        let err = client
            .get_manifest(&h.host(), REPO, tag, &[])
            .await
            .unwrap_err();
        match err {
            OriginError::TooLarge { what, limit } => {
                assert_eq!(limit, MANIFEST_CAP);
                assert!(
                    what.contains(&format!("/v2/{REPO}/manifests/{tag}")),
                    "{what}"
                );
            }
            other => panic!("{tag}: want TooLarge, got {other:?}"),
        }
    }
    // Well under the 5 s request timeout: the announced size was refused without reading.
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[tokio::test]
async fn manifest_digest_mismatch() {
    let h = Harness::start(Mode::Bearer).await;
    let asked = Digest::of(b"something else");
    let err = h
        .client()
        .get_manifest(&h.host(), REPO, &asked.to_string(), &[])
        .await
        .unwrap_err();
    match err {
        OriginError::DigestMismatch { expected, actual } => {
            assert_eq!(expected, asked);
            assert_eq!(actual, Digest::of(&h.fake.manifest));
        }
        other => panic!("want DigestMismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn ranged_blob_get_returns_exactly_the_range() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let digest = Digest::of(&h.fake.layer);
    let range = ByteRange {
        start: 1000,
        end_inclusive: Some(1999),
    };
    let body = client
        .get_blob(&h.host(), REPO, &digest, Some(range))
        .await
        .unwrap();
    assert!(body.partial);
    assert_eq!(body.len, Some(1000));
    assert_eq!(body.total, Some(100_000));
    assert_eq!(read_all(body).await.unwrap(), &h.fake.layer[1000..2000]);

    let tail = client
        .get_blob(
            &h.host(),
            REPO,
            &digest,
            Some(ByteRange {
                start: 99_990,
                end_inclusive: None,
            }),
        )
        .await
        .unwrap();
    assert_eq!(tail.len, Some(10));
    assert_eq!(read_all(tail).await.unwrap(), &h.fake.layer[99_990..]);

    let whole = client
        .get_blob(&h.host(), REPO, &digest, None)
        .await
        .unwrap();
    assert!(!whole.partial);
    assert_eq!(whole.len, Some(100_000));
    assert_eq!(read_all(whole).await.unwrap(), h.fake.layer);
}

#[tokio::test]
async fn redirect_to_storage_drops_authorization() {
    let h = Harness::start(Mode::Bearer).await;
    let digest: Digest = REDIRECTED.parse().unwrap();
    let body = h
        .client()
        .get_blob(&h.host(), REPO, &digest, None)
        .await
        .unwrap();
    assert_eq!(read_all(body).await.unwrap(), h.fake.layer);
    let seen = h.fake.storage_auth.lock().unwrap().clone();
    // Neither the token nor the registry URL (via Referer) reaches the storage host.
    assert_eq!(seen, vec![(None, None)]);
}

#[tokio::test]
async fn statuses_map_to_errors_naming_the_url() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let missing = Digest::of(b"missing");
    let err = client
        .get_blob(&h.host(), REPO, &missing, None)
        .await
        .unwrap_err();
    let OriginError::NotFound(message) = &err else {
        panic!("want NotFound, got {err:?}")
    };
    assert!(
        message.contains(&format!("/v2/{REPO}/blobs/{missing}")),
        "{message}"
    );
    assert!(message.contains("BLOB_UNKNOWN"), "{message}");
    assert!(matches!(
        client.head_blob(&h.host(), REPO, &missing).await,
        Err(OriginError::NotFound(_))
    ));
    assert!(matches!(
        client
            .get_manifest(&h.host(), "team/other", "v1", &[])
            .await,
        Err(OriginError::NotFound(_))
    ));

    let err = client
        .get_manifest(&h.host(), REPO, "broken", &[])
        .await
        .unwrap_err();
    match &err {
        OriginError::Upstream { status, message } => {
            assert_eq!(*status, 500);
            assert!(message.contains("UNKNOWN: disk on fire"), "{message}");
            assert!(message.contains("/manifests/broken"), "{message}");
        }
        other => panic!("want Upstream, got {other:?}"),
    }

    // Bad input never reaches the network.
    for (repo, reference) in [
        ("team/../x", "v1"),
        ("Team/app", "v1"),
        (REPO, "a/b"),
        (REPO, "sha256:zz"),
    ] {
        assert!(
            matches!(
                client.get_manifest(&h.host(), repo, reference, &[]).await,
                Err(OriginError::Invalid(_))
            ),
            "{repo} {reference}"
        );
    }
    assert!(matches!(
        client.get_manifest("evil.io/x?", REPO, "v1", &[]).await,
        Err(OriginError::Invalid(_))
    ));
}

#[tokio::test]
async fn resolves_a_docker_manifest_list_per_platform() {
    let h = Harness::start(Mode::Bearer).await;
    let client = h.client();
    let reference: Reference = format!("{}/{REPO}:multi", h.host()).parse().unwrap();
    let f = &h.fake;
    let (config, layer, arm_layer) = (
        Digest::of(&f.config),
        Digest::of(&f.layer),
        Digest::of(&f.arm_layer),
    );

    let amd = resolve_image(&client, &reference, &[]).await.unwrap();
    assert_eq!(amd.manifest_digest, Digest::of(&f.list));
    assert_eq!(
        amd.manifests,
        vec![(Digest::of(&f.manifest), f.manifest.len() as u64)]
    );
    assert_eq!(
        amd.blobs,
        vec![(config, f.config.len() as u64), (layer, 100_000)]
    );

    let both = resolve_image(
        &client,
        &reference,
        &["linux/amd64".to_string(), "linux/arm64/v8".to_string()],
    )
    .await
    .unwrap();
    assert_eq!(both.manifests.len(), 2);
    // Configs first, then layers, each once.
    assert_eq!(
        both.blobs,
        vec![
            (config, f.config.len() as u64),
            (layer, 100_000),
            (arm_layer, 3000)
        ]
    );

    let err = resolve_image(&client, &reference, &["linux/s390x".to_string()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OriginError::NotFound(m) if m.contains("linux/arm64/v8") && m.contains("linux/s390x")),
        "{err:?}"
    );

    // A single-platform tag is its own platform manifest.
    let single: Reference = format!("{}/{REPO}:v1", h.host()).parse().unwrap();
    let one = resolve_image(&client, &single, &["linux/arm64".to_string()])
        .await
        .unwrap();
    assert_eq!(one.manifest_digest, Digest::of(&f.manifest));
    assert_eq!(
        one.manifests,
        vec![(one.manifest_digest, f.manifest.len() as u64)]
    );
    assert_eq!(one.blobs.len(), 2);
}

/// A client with no `[[origin.registries]]` credentials, only `[origin] auth_file`.
fn client_with_auth_file(h: &Harness, auth_file: std::path::PathBuf) -> Client {
    Client::new(OriginConfig {
        registries: vec![RegistryConfig {
            host: h.host(),
            plain_http: true,
            ..Default::default()
        }],
        auth_file: Some(auth_file),
        request_timeout_ms: 5000,
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn a_docker_config_json_gives_credentials_and_is_read_again_when_rotated() {
    let h = Harness::start(Mode::Bearer).await;
    let auth_file = h._dir.path().join("config.json");
    // As a kubernetes.io/dockerconfigjson Secret holds it: `auth` is base64 of user:password.
    let write = |password: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
        let json = format!(
            r#"{{"auths": {{"http://{}/v2/": {{"auth": "{auth}"}}}}}}"#,
            h.host()
        );
        std::fs::write(&auth_file, json).unwrap();
    };
    write("stale");
    let client = client_with_auth_file(&h, auth_file.clone());
    let err = client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap_err();
    assert!(matches!(err, OriginError::Unauthorized(_)), "{err:?}");
    // The Secret is rotated: the next token fetch reads it again.
    write(PASSWORD);
    let m = client
        .get_manifest(&h.host(), REPO, "v1", &[])
        .await
        .unwrap();
    assert_eq!(m.bytes, h.fake.manifest);
}
