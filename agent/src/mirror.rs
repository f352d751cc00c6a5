//! The OCI registry mirror: the read side of the OCI Distribution API on a local port, so
//! that containerd (a `hosts.toml` mirror entry), skopeo and docker pull through Shoal
//! unchanged.
//!
//! - `GET /v2/` answers that this is a registry.
//! - Manifests and tags pass through to the upstream registry, with its token flow and this
//!   agent's credentials (`[origin]` in the config), and are cached briefly.
//! - Blobs come through Shoal: the mirror asks the coordinator to distribute the blob to
//!   this agent, with the upstream as its origin, and streams it to the client in order as
//!   verified chunks arrive (see `mirror/blobs.rs`).
//!
//! The upstream is the registry named by containerd's `?ns=` parameter, else
//! `mirror.default_registry`. Only registries the mirror is meant for are served
//! (`mirror.registries`): the mirror is not a proxy to wherever a client points it.

mod blobs;
mod manifests;
mod rights;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use tokio::task::JoinHandle;

use crate::link::Coordinator;
use crate::orders::RunningOrders;
use crate::readers::Readers;
use crate::shutdown::{Stop, stopped};
use crate::store::Store;

/// Settings of the mirror (`[mirror]` in the agent's config). `_ms` and `_bytes` keys also
/// take strings with units (`"30s"`, `"64MiB"`; see [`shoal_proto::units`]).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// Upstream registry when a request has no `?ns=` (skopeo and docker send none).
    pub default_registry: String,
    /// How long a manifest fetched by tag is served from the cache, milliseconds. By
    /// digest, manifests are immutable and kept ten times longer.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub manifest_cache_ttl_ms: u64,
    /// The most bytes the manifest cache holds (manifests and their keys). Default 64 MiB.
    #[serde(deserialize_with = "shoal_proto::units::bytes")]
    pub manifest_cache_bytes: u64,
    /// If no byte of a blob arrives from peers for this long, the rest is fetched from the
    /// upstream directly (logged, and counted in `shoal_mirror_fallbacks_total`).
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub fallback_after_ms: u64,
    /// Without `?ns=`, a first path component that names a registry host
    /// (`/v2/quay.io/org/app/...`, a port written `__`: `/v2/10.0.0.5__5000/app/...`) is the
    /// upstream, the rest the repository: how CRI-O, Podman and Skopeo name the upstream
    /// through a `registries.conf` mirror location (`shoal registries-conf`). A host is what
    /// has a `.` or `__`, or is `localhost`, as Docker decides for image references. Off: such
    /// a path is a repository of `default_registry`.
    pub route_by_path: bool,
    /// The upstream registries this mirror pulls from, whichever way a request names them
    /// (`?ns=`, a routed path, `default_registry`); others are refused with 403 DENIED.
    /// Empty (the default): `default_registry` and every `[[origin.registries]]` host. `"*"`
    /// allows any registry: then whoever reaches the mirror's port can make this agent
    /// fetch from any host it can reach (only with a loopback listener, on a node whose
    /// local users are trusted).
    pub registries: Vec<String>,
    /// Serve a repository only to clients the upstream would let pull it: public ones to
    /// anyone, others only to a client whose own credentials (HTTP Basic, asked for with a
    /// 401 challenge) the upstream accepts for it (see `mirror/rights.rs`). Off: whoever
    /// reaches the mirror gets whatever this agent can pull or holds.
    pub check_pull_rights: bool,
    /// How long an upstream verdict that allowed a pull is reused. Default 5 min.
    #[serde(deserialize_with = "shoal_proto::units::millis")]
    pub pull_right_ttl_ms: u64,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        Self {
            default_registry: "docker.io".into(),
            manifest_cache_ttl_ms: 30_000,
            manifest_cache_bytes: 64 << 20,
            fallback_after_ms: 30_000,
            route_by_path: true,
            registries: Vec::new(),
            check_pull_rights: true,
            pull_right_ttl_ms: 300_000,
        }
    }
}

impl MirrorConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !valid_registry(&self.default_registry) {
            return Err(format!(
                "mirror.default_registry: {:?} is not a registry host[:port]",
                self.default_registry
            ));
        }
        if let Some(bad) = (self.registries.iter()).find(|r| *r != "*" && !valid_registry(r)) {
            return Err(format!(
                "mirror.registries: {bad:?} is not a registry host[:port] (or \"*\" for any)"
            ));
        }
        if self.fallback_after_ms == 0 {
            return Err("mirror.fallback_after_ms: must be positive".into());
        }
        Ok(())
    }
}

/// A registry host as in image references: `host[:port]`, no scheme, no path.
fn valid_registry(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// What the mirror serves from: the store, the coordinator (to have blobs brought here),
/// the upstream client, the order table (part files of running origin fetches), the
/// readers table (what its clients wait for), and its manifest cache. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Mirror {
    pub store: Store,
    pub coordinator: Coordinator,
    pub origin: shoal_origin::Client,
    pub orders: RunningOrders,
    pub readers: Readers,
    pub config: MirrorConfig,
    /// The registries served, lower-cased; None: any (see [`MirrorConfig::registries`]).
    allowed: Option<Arc<std::collections::HashSet<String>>>,
    manifests: Arc<Mutex<manifests::Cache>>,
    rights: Arc<rights::Rights>,
}

impl Mirror {
    pub(crate) fn new(
        store: Store,
        coordinator: Coordinator,
        origin: shoal_origin::Client,
        orders: RunningOrders,
        readers: Readers,
        config: MirrorConfig,
    ) -> Self {
        let allowed = (!config.registries.iter().any(|r| r == "*")).then(|| {
            let named: Vec<&str> = if config.registries.is_empty() {
                let configured = origin.config().registries.iter().map(|r| &*r.host);
                std::iter::once(&*config.default_registry)
                    .chain(configured)
                    .collect()
            } else {
                config.registries.iter().map(|r| &**r).collect()
            };
            Arc::new(named.iter().map(|r| r.to_ascii_lowercase()).collect())
        });
        Self {
            store,
            coordinator,
            origin,
            orders,
            readers,
            config,
            allowed,
            manifests: Arc::default(),
            rights: Arc::default(),
        }
    }

    /// Whether the mirror serves `registry` (see [`MirrorConfig::registries`]).
    fn serves(&self, registry: &str) -> bool {
        (self.allowed.as_ref()).is_none_or(|a| a.contains(&registry.to_ascii_lowercase()))
    }
}

/// Binds `addr` and serves the mirror until the agent shuts down. Returns the bound address.
pub(crate) async fn serve(
    mirror: Mirror,
    addr: SocketAddr,
    mut stop: Stop,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/v2/", get(base))
        .route("/v2", get(base))
        .route("/v2/{*rest}", any(dispatch))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "not an OCI registry path",
            )
        })
        .with_state(mirror);
    tracing::info!(%bound, "OCI registry mirror listening");
    // Responses start with small writes (headers, a first piece): without NODELAY, Nagle
    // and the client's delayed ACK can hold them back for 40 ms.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on a mirror connection failed");
        }
    });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped(&mut stop).await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "mirror server failed");
        }
    });
    Ok((bound, task))
}

/// `GET /v2/`. With pull rights checked, a client without credentials is challenged, as
/// registries do: clients that probe `/v2/` first (skopeo, docker, CRI-O) learn there that
/// they may send credentials, and go on anonymously if they have none.
async fn base(State(mirror): State<Mirror>, headers: HeaderMap) -> Response {
    let mut r = if mirror.config.check_pull_rights && !headers.contains_key(header::AUTHORIZATION) {
        rights::challenge_any()
    } else {
        (StatusCode::OK, "{}").into_response()
    };
    api_headers(r.headers_mut());
    r
}

fn api_headers(h: &mut HeaderMap) {
    h.insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
}

/// An OCI error response: `{"errors":[{"code":..,"message":..}]}`.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]});
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    api_headers(r.headers_mut());
    r
}

/// The upstream's failure as a response for the client.
pub(crate) fn upstream_error(e: &shoal_origin::OriginError, unknown_code: &str) -> Response {
    use shoal_origin::OriginError as E;
    match e {
        E::NotFound(m) => error(StatusCode::NOT_FOUND, unknown_code, m),
        E::Unauthorized(m) => error(
            StatusCode::FORBIDDEN,
            "DENIED",
            &format!("the upstream registry refused this agent's credentials: {m}"),
        ),
        other => error(
            StatusCode::BAD_GATEWAY,
            "UNAVAILABLE",
            &format!("upstream registry: {other}"),
        ),
    }
}

#[derive(serde::Deserialize)]
struct Params {
    ns: Option<String>,
}

/// What a `/v2/<name>/...` path asks for.
#[derive(Debug, PartialEq, Eq)]
enum Target<'a> {
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
}

/// Splits `<name>/manifests/<reference>` or `<name>/blobs/<digest>`; the name may have
/// several components. None for any other path (uploads, tags/list, referrers).
fn parse_target(rest: &str) -> Option<Target<'_>> {
    if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        return (!reference.contains('/')).then_some(Target::Manifest { name, reference });
    }
    if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        return (!digest.contains('/')).then_some(Target::Blob { name, digest });
    }
    None
}

fn target_name<'a>(target: &Target<'a>) -> &'a str {
    match target {
        Target::Manifest { name, .. } | Target::Blob { name, .. } => name,
    }
}

impl<'a> Target<'a> {
    fn with_name(self, name: &'a str) -> Target<'a> {
        match self {
            Target::Manifest { reference, .. } => Target::Manifest { name, reference },
            Target::Blob { digest, .. } => Target::Blob { name, digest },
        }
    }
}

/// The upstream a repository path names in its first component, and the repository after
/// it (see [`MirrorConfig::route_by_path`]); None if the first component is no host.
fn routed_by_path(name: &str) -> Option<(String, &str)> {
    let (first, rest) = name.split_once('/')?;
    let host = first.contains('.') || first.contains("__") || first == "localhost";
    let registry = first.replace("__", ":");
    (host && !rest.is_empty() && valid_registry(&registry)).then_some((registry, rest))
}

async fn dispatch(
    State(mirror): State<Mirror>,
    method: Method,
    Path(rest): Path<String>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this is a pull-through mirror: only GET and HEAD are served",
        );
    }
    let Some(target) = parse_target(&rest) else {
        return error(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            &format!("/v2/{rest}: the mirror serves manifests and blobs only"),
        );
    };
    let routed = (params.ns.is_none() && mirror.config.route_by_path)
        .then(|| routed_by_path(target_name(&target)))
        .flatten();
    let (registry, target) = match routed {
        Some((registry, name)) => (Some(registry), target.with_name(name)),
        None => (None, target),
    };
    let registry = match (registry, params.ns.as_deref()) {
        (Some(routed), _) => routed,
        (None, ns) => match ns {
            Some(ns) if valid_registry(ns) => ns.to_string(),
            Some(ns) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "NAME_INVALID",
                    &format!("ns={ns:?} is not a registry host[:port]"),
                );
            }
            None => mirror.config.default_registry.clone(),
        },
    };
    if !mirror.serves(&registry) {
        tracing::warn!(
            registry,
            "mirror: refused a request for a registry it does not serve"
        );
        return error(
            StatusCode::FORBIDDEN,
            "DENIED",
            &format!(
                "this mirror does not pull from {registry:?}: add it to mirror.registries (or [[origin.registries]]) in the agent's config"
            ),
        );
    }
    let name = target_name(&target);
    if let Err(e) = shoal_origin::validate_repository(name) {
        return error(StatusCode::BAD_REQUEST, "NAME_INVALID", &e.to_string());
    }
    // A malformed digest is refused by `blobs::serve`, which serves nothing for it.
    let blob_digest: Option<shoal_proto::Digest> = match &target {
        Target::Blob { digest, .. } => digest.parse().ok(),
        Target::Manifest { .. } => None,
    };
    let what = match (&target, &blob_digest) {
        (Target::Manifest { reference, .. }, _) => {
            Some(shoal_origin::Pullable::Manifest(reference))
        }
        (Target::Blob { .. }, Some(d)) => Some(shoal_origin::Pullable::Blob(d)),
        (Target::Blob { .. }, None) => None,
    };
    if let Some(what) = what {
        if let Err(mut refused) = mirror
            .check_pull_right(&registry, name, what, &headers)
            .await
        {
            api_headers(refused.headers_mut());
            return refused;
        }
    }
    let head = method == Method::HEAD;
    let mut response = match target {
        Target::Manifest { name, reference } => {
            manifests::serve(&mirror, &registry, name, reference, &headers, head).await
        }
        Target::Blob { name, digest } => {
            blobs::serve(&mirror, &registry, name, digest, &headers, head).await
        }
    };
    api_headers(response.headers_mut());
    response
}

/// A streamed body fed by a task: `Ok` pieces, or an error that cuts the response short
/// (the client sees a truncated body, never wrong bytes presented as whole).
pub(crate) fn channel_body() -> (
    tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    Body,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    (
        tx,
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
}

pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_multi_component_names() {
        assert_eq!(
            parse_target("library/ubuntu/manifests/22.04"),
            Some(Target::Manifest {
                name: "library/ubuntu",
                reference: "22.04"
            })
        );
        assert_eq!(
            parse_target("a/b/c/blobs/sha256:00"),
            Some(Target::Blob {
                name: "a/b/c",
                digest: "sha256:00"
            })
        );
        assert_eq!(parse_target("a/blobs/uploads/"), None);
        assert_eq!(parse_target("a/tags/list"), None);
    }

    #[test]
    fn a_first_component_that_is_a_host_names_the_upstream() {
        assert_eq!(
            routed_by_path("docker.io/library/alpine"),
            Some(("docker.io".into(), "library/alpine"))
        );
        assert_eq!(
            routed_by_path("10.0.0.5__5000/team/app"),
            Some(("10.0.0.5:5000".into(), "team/app"))
        );
        assert_eq!(
            routed_by_path("localhost/app"),
            Some(("localhost".into(), "app"))
        );
        assert_eq!(routed_by_path("library/alpine"), None);
        assert_eq!(routed_by_path("app"), None);
        assert_eq!(routed_by_path("quay.io/"), None);
    }

    #[test]
    fn registries_are_host_and_port_only() {
        assert!(valid_registry("127.0.0.1:5000"));
        assert!(valid_registry("docker.io"));
        assert!(!valid_registry("http://x"));
        assert!(!valid_registry("a/b"));
        assert!(!valid_registry(""));
    }
}
