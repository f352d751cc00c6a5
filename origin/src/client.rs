//! The origin client: OCI Distribution registries and plain HTTP(S) URLs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{
    ACCEPT, ACCEPT_RANGES, AUTHORIZATION, CONTENT_RANGE, COOKIE, ETAG, HeaderMap, HeaderName,
    HeaderValue, LOCATION, PROXY_AUTHORIZATION, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode, Url};
use shoal_proto::Digest;

use crate::auth::{Token, TokenCache};
use crate::body::{Body, BodyParts, ByteRange, parse_content_range};
use crate::config::{Credentials, OriginConfig, RegistryConfig};
use crate::http::{
    check_status, content_length, display_url, header_str, media_type, parse_http_url, read_capped,
    send,
};
use crate::reference::{validate_registry, validate_tag};
use crate::{MANIFEST_MEDIA_TYPES, OriginError};

mod registry;

use registry::Principal;
pub use registry::{PullRight, Pullable};

/// The largest token-endpoint answer read.
const TOKEN_RESPONSE_MAX: u64 = 1 << 20;
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// A client for upstream origins. Cheap to clone: clones share one connection pool and one
/// bearer-token cache.
///
/// Registry requests go out anonymously first; a `401` with a `Bearer` challenge fetches a
/// token (with the registry's configured credentials, if any), caches it per registry and
/// scope, and retries once; a `Basic` challenge retries with the credentials. Redirects (to
/// blob storage) are followed, and `Authorization` is dropped when one leaves the host.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    /// The same, but it does not follow redirects: [`Client::head_url`] follows them itself,
    /// for what a redirect says of its target.
    first_hop: reqwest::Client,
    redirects: crate::redirects::RedirectPolicy,
    config: OriginConfig,
    tokens: TokenCache,
    pacing: crate::pacing::Pacing,
}

/// A manifest read in full, within `manifest_max_bytes`.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The manifest exactly as served; its digest is `digest`.
    pub bytes: Bytes,
    /// `Content-Type` without parameters, or the JSON `mediaType` field when the registry sent
    /// a generic type; empty if neither says.
    pub media_type: String,
    /// SHA-256 of `bytes`. When the manifest was requested by digest, equal to it.
    pub digest: Digest,
}

/// What a `HEAD` on a manifest tells.
#[derive(Clone, Debug)]
pub struct ManifestHead {
    pub size: u64,
    pub media_type: String,
    /// From `Docker-Content-Digest`, if the registry sent a sha256 one.
    pub digest: Option<Digest>,
}

/// What a `HEAD` on a URL tells.
#[derive(Clone, Debug)]
pub struct UrlInfo {
    pub size: Option<u64>,
    /// As sent, quotes included (`"abc"`, `W/"abc"`).
    pub etag: Option<String>,
    /// The server said `Accept-Ranges: bytes`.
    pub accept_ranges: bool,
    /// The content's SHA-256 as the server announced it (`Repr-Digest` and the like, see
    /// `announced.rs`): a claim to check the content against, not a checked fact.
    pub sha256: Option<Digest>,
}

enum Auth {
    Anonymous,
    Bearer(Token),
    Basic(Credentials),
}

/// One registry request to send: method, URL, headers, auth, and the URL as errors show it.
#[derive(Clone, Copy)]
struct Request<'a>(&'a Method, &'a Url, &'a HeaderMap, &'a Auth, &'a str);

impl Client {
    /// Builds a client. `Invalid` if a registry entry has a bad host or endpoint, or the TLS
    /// setup fails.
    pub fn new(config: OriginConfig) -> Result<Self, OriginError> {
        if !(1..=64).contains(&config.parallel_ranges) {
            return Err(OriginError::Invalid(format!(
                "origin.parallel_ranges: {} is not between 1 and 64",
                config.parallel_ranges
            )));
        }
        if !(64 << 10..=256 << 20).contains(&config.parallel_range_bytes) {
            return Err(OriginError::Invalid(format!(
                "origin.parallel_range_bytes: {} is not between 64 KiB and 256 MiB",
                config.parallel_range_bytes
            )));
        }
        for registry in &config.registries {
            validate_registry(&registry.host)?;
            if let Some(endpoint) = &registry.endpoint {
                parse_http_url(endpoint).map_err(|e| {
                    OriginError::Invalid(format!("endpoint of registry {}: {e}", registry.host))
                })?;
            }
        }
        let build = |redirect| {
            reqwest::Client::builder()
                .user_agent(config.user_agent.clone())
                .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
                // A Referer would carry the previous URL, query and all, to the storage host.
                .referer(false)
                .redirect(redirect)
                .build()
                .map_err(|e| {
                    OriginError::Invalid(format!(
                        "cannot build HTTP client: {}",
                        crate::http::error_chain(e)
                    ))
                })
        };
        let http = build(crate::redirects::reqwest_policy(&config))?;
        let first_hop = build(reqwest::redirect::Policy::none())?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                first_hop,
                redirects: crate::redirects::RedirectPolicy::new(&config),
                config,
                tokens: TokenCache::default(),
                pacing: Default::default(),
            }),
        })
    }

    /// How a whole blob is read (`parallel_ranges` GETs of `parallel_range_bytes` at once),
    /// from `registry` if it is an OCI registry's: one GET from a registry given a request
    /// budget, which every block would spend.
    pub fn ranges(&self, registry: Option<&str>) -> crate::Ranges {
        let config = &self.inner.config;
        let budget = registry.is_some_and(|r| config.registry(r).max_requests_per_second.is_some());
        crate::Ranges {
            connections: if budget { 1 } else { config.parallel_ranges },
            block: config.parallel_range_bytes,
        }
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &OriginConfig {
        &self.inner.config
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.inner.config.request_timeout_ms)
    }

    // ---- OCI registries ----------------------------------------------------------------

    /// Fetches a manifest by tag or digest, sending `accept` (empty means
    /// [`MANIFEST_MEDIA_TYPES`]). Refuses manifests over `manifest_max_bytes` (`TooLarge`) and,
    /// when `reference` is a digest, content that does not hash to it (`DigestMismatch`).
    pub async fn get_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<FetchedManifest, OriginError> {
        let (requested, response) = self
            .manifest_request(Method::GET, registry, repository, reference, accept)
            .await?;
        let shown = display_url(response.url());
        let header_type = media_type(response.headers());
        let announced = announced_digest(response.headers());
        let bytes = read_capped(
            response,
            &shown,
            "manifest",
            self.inner.config.manifest_max_bytes,
            self.timeout(),
        )
        .await?;
        let digest = Digest::of(&bytes);
        if let Some(expected) = requested {
            if expected != digest {
                return Err(OriginError::DigestMismatch {
                    expected,
                    actual: digest,
                });
            }
        } else if announced.is_some_and(|a| a != digest) {
            // Only a tag was asked for, so the bytes are still what the tag names; the header
            // is just wrong. Worth knowing, not worth failing a pull.
            tracing::warn!(url = %shown, "Docker-Content-Digest does not match the manifest served");
        }
        let media_type = match header_type {
            Some(t) if !is_generic_type(&t) => t,
            _ => json_media_type(&bytes).unwrap_or_default(),
        };
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// A manifest request by tag or digest; returns the digest asked for, if any.
    async fn manifest_request(
        &self,
        method: Method,
        registry: &str,
        repository: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<(Option<Digest>, reqwest::Response), OriginError> {
        let requested = parse_manifest_reference(reference)?;
        let response = self
            .registry_request(
                method,
                registry,
                repository,
                &format!("manifests/{reference}"),
                accept_headers(accept)?,
                Principal::Node,
            )
            .await?;
        Ok((requested, response))
    }

    /// `HEAD` on a manifest: its size, media type and, if sent, its digest. When `reference` is
    /// a digest and the registry announces another, `DigestMismatch`.
    pub async fn head_manifest(
        &self,
        registry: &str,
        repository: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<ManifestHead, OriginError> {
        let (requested, response) = self
            .manifest_request(Method::HEAD, registry, repository, reference, accept)
            .await?;
        let size = required_length(&response)?;
        let digest = announced_digest(response.headers());
        if let (Some(expected), Some(actual)) = (requested, digest) {
            if expected != actual {
                return Err(OriginError::DigestMismatch { expected, actual });
            }
        }
        Ok(ManifestHead {
            size,
            media_type: media_type(response.headers()).unwrap_or_default(),
            digest: digest.or(requested),
        })
    }

    /// The size of a blob, from `HEAD`.
    pub async fn head_blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
    ) -> Result<u64, OriginError> {
        let response = self
            .registry_request(
                Method::HEAD,
                registry,
                repository,
                &format!("blobs/{digest}"),
                HeaderMap::new(),
                Principal::Node,
            )
            .await?;
        if let Some(actual) = announced_digest(response.headers()) {
            if actual != *digest {
                return Err(OriginError::DigestMismatch {
                    expected: *digest,
                    actual,
                });
            }
        }
        required_length(&response)
    }

    /// Streams a blob, or the `range` of it. The content is not verified against `digest`:
    /// the caller hashes what it reads.
    pub async fn get_blob(
        &self,
        registry: &str,
        repository: &str,
        digest: &Digest,
        range: Option<ByteRange>,
    ) -> Result<Body, OriginError> {
        let headers = range_headers(range)?;
        let response = self
            .registry_request(
                Method::GET,
                registry,
                repository,
                &format!("blobs/{digest}"),
                headers,
                Principal::Node,
            )
            .await?;
        self.ranged_body(response, range)
    }

    // ---- plain HTTP(S) ---------------------------------------------------------------

    /// `HEAD` on an absolute `http://` or `https://` URL, sending `headers`. `headers` go to
    /// every host a redirect leads to, except `Authorization` and cookies, which are dropped
    /// when a redirect leaves the host. The content's SHA-256 is the one every hop that
    /// announced one agrees on (`X-Linked-Etag` on a redirect, the final answer's headers:
    /// `announced.rs`).
    pub async fn head_url(
        &self,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<UrlInfo, OriginError> {
        let url = parse_http_url(url)?;
        let mut headers = self.with_configured(url.as_str(), headers)?;
        let (want, value) = crate::announced::WANT_REPR_DIGEST;
        headers.insert(want, HeaderValue::from_static(value));
        // Redirects followed here, as `http` would (the same policy, `Authorization` and
        // cookies dropped when one leaves the host), because a model host (Hugging Face)
        // names an LFS file's content on its redirect to storage (`X-Linked-Etag`), and
        // the storage does not repeat it.
        let timeout = self.timeout();
        let mut linked = Vec::new();
        let mut at = url;
        let mut hop = 0;
        loop {
            let shown = display_url(&at);
            let request = (self.inner.first_hop)
                .request(Method::HEAD, at.clone())
                .headers(headers.clone());
            let response = send(request, &shown, timeout).await?;
            let next = (response.status().is_redirection())
                .then(|| response.headers().get(LOCATION)?.to_str().ok())
                .flatten()
                .and_then(|l| at.join(l).ok());
            let Some(next) = next else {
                // Not a redirect (or one that says nowhere): the answer.
                let response = check_status(response, &shown, timeout).await?;
                let mut info = url_info(response.headers());
                linked.extend(info.sha256.map(Some));
                info.sha256 = crate::announced::agreed(&linked);
                return Ok(info);
            };
            hop += 1;
            (self.inner.redirects.follow(hop, &at, &next))
                .map_err(|why| OriginError::Unreachable(format!("{shown}: {why}")))?;
            linked.extend(crate::announced::linked_sha256(response.headers()).map(Some));
            let same_origin = (at.host_str(), at.port_or_known_default(), at.scheme())
                == (next.host_str(), next.port_or_known_default(), next.scheme());
            if !same_origin {
                for name in [AUTHORIZATION, COOKIE, PROXY_AUTHORIZATION, WWW_AUTHENTICATE] {
                    headers.remove(name);
                }
                headers.remove("cookie2");
            }
            at = next;
        }
    }

    /// Streams an absolute `http://` or `https://` URL, or the `range` of it; `headers` as for
    /// [`Client::head_url`].
    pub async fn get_url(
        &self,
        url: &str,
        headers: &[(String, String)],
        range: Option<ByteRange>,
    ) -> Result<Body, OriginError> {
        let url = parse_http_url(url)?;
        let mut headers = self.with_configured(url.as_str(), headers)?;
        headers.extend(range_headers(range)?);
        let response = self.url_request(Method::GET, url, headers).await?;
        self.ranged_body(response, range)
    }

    // ---- internals ---------------------------------------------------------------------

    /// The caller's headers, then the configured ones for `url` (`[[origin.http]]`).
    fn with_configured(
        &self,
        url: &str,
        headers: &[(String, String)],
    ) -> Result<HeaderMap, OriginError> {
        let mut all = headers.to_vec();
        all.extend(self.inner.config.http_headers(url)?);
        user_headers(&all)
    }

    async fn url_request(
        &self,
        method: Method,
        url: Url,
        headers: HeaderMap,
    ) -> Result<Response, OriginError> {
        let shown = display_url(&url);
        let request = self.inner.http.request(method, url).headers(headers);
        let response = send(request, &shown, self.timeout()).await?;
        check_status(response, &shown, self.timeout()).await
    }

    /// [`Client::send_with`] within the registry's pacing: waits for its request budget and
    /// any pause a 429 set, and tries again after a 429 (see `pacing.rs`).
    async fn send_paced(
        &self,
        settings: &RegistryConfig,
        request: Request<'_>,
    ) -> Result<Response, OriginError> {
        let Request(method, url, headers, auth, shown) = request;
        let pacing = &self.inner.pacing;
        let max_wait = Duration::from_millis(self.inner.config.max_retry_wait_ms);
        let mut throttled = 0;
        loop {
            pacing
                .wait(&settings.host, settings.max_requests_per_second)
                .await;
            let response = self.send_with(method, url, headers, auth, shown).await?;
            if response.status() != StatusCode::TOO_MANY_REQUESTS
                || throttled >= crate::pacing::THROTTLED_RETRIES
            {
                return Ok(response);
            }
            throttled += 1;
            let wait = pacing.throttled(&settings.host, response.headers(), max_wait);
            tracing::warn!(registry = %settings.host, url = %shown, ?wait, attempt = throttled, "registry answered 429 Too Many Requests: pausing requests to it");
        }
    }

    async fn send_with(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        auth: &Auth,
        shown: &str,
    ) -> Result<Response, OriginError> {
        let mut request = self
            .inner
            .http
            .request(method.clone(), url.clone())
            .headers(headers.clone());
        request = match auth {
            Auth::Anonymous => request,
            Auth::Bearer(token) => request.bearer_auth(&token.0),
            Auth::Basic(c) => request.basic_auth(&c.username, Some(&c.password)),
        };
        send(request, shown, self.timeout()).await
    }

    /// Wraps a successful GET in a [`Body`] that yields exactly `range` (see [`Body`]).
    fn ranged_body(
        &self,
        response: Response,
        range: Option<ByteRange>,
    ) -> Result<Body, OriginError> {
        let shown = display_url(response.url());
        let headers = response.headers();
        let content_length = content_length(headers);
        let etag = header_str(headers, ETAG);
        let upstream = |message: String| OriginError::Upstream {
            status: response.status().as_u16(),
            message: format!("{shown}: {message}"),
        };
        let (len, total, skip, partial) = match (response.status(), range) {
            (StatusCode::PARTIAL_CONTENT, Some(range)) => {
                let value = header_str(headers, CONTENT_RANGE).unwrap_or_default();
                let got = parse_content_range(&value).ok_or_else(|| {
                    upstream(format!("206 with unusable Content-Range {value:?}"))
                })?;
                let wanted_end = range.end_inclusive.unwrap_or(u64::MAX);
                if got.first != range.start || got.last > wanted_end {
                    return Err(upstream(format!(
                        "asked for {}, got Content-Range {value:?}",
                        range.header_value()?
                    )));
                }
                (Some(got.last - got.first + 1), got.total, 0, true)
            }
            (StatusCode::PARTIAL_CONTENT, None) => {
                return Err(upstream(
                    "206 Partial Content to a request without Range".into(),
                ));
            }
            (_, Some(range)) => {
                // The origin ignored Range: skip to it ourselves.
                let len = match content_length {
                    Some(total) => {
                        if range.start > 0 && range.start >= total {
                            return Err(OriginError::Invalid(format!(
                                "{shown}: range {} starts beyond the {total}-byte object",
                                range.header_value()?
                            )));
                        }
                        let end = range
                            .end_inclusive
                            .map_or(total, |e| e.saturating_add(1).min(total));
                        Some(end - range.start)
                    }
                    None => range.byte_len(),
                };
                tracing::debug!(url = %shown, "origin ignored Range; skipping to it");
                (len, content_length, range.start, false)
            }
            (_, None) => (content_length, content_length, 0, false),
        };
        Ok(Body::new(BodyParts {
            response,
            url: shown,
            len,
            partial,
            total,
            etag,
            skip,
            content_length,
            idle_timeout: self.timeout(),
            min_rate: (self.inner.config.min_bytes_per_sec > 0).then(|| {
                (
                    self.inner.config.min_bytes_per_sec,
                    Duration::from_millis(self.inner.config.min_rate_window_ms.max(1)),
                )
            }),
        }))
    }
}

/// A manifest reference is a digest (has ':') or a tag; returns the digest if it is one.
fn parse_manifest_reference(reference: &str) -> Result<Option<Digest>, OriginError> {
    if reference.contains(':') {
        reference
            .parse::<Digest>()
            .map(Some)
            .map_err(|e| OriginError::Invalid(format!("manifest reference {reference:?}: {e}")))
    } else {
        validate_tag(reference).map(|()| None)
    }
}

fn accept_headers(accept: &[&str]) -> Result<HeaderMap, OriginError> {
    let types = if accept.is_empty() {
        MANIFEST_MEDIA_TYPES.as_slice()
    } else {
        accept
    };
    let value = HeaderValue::from_str(&types.join(", "))
        .map_err(|_| OriginError::Invalid(format!("Accept media types {types:?}")))?;
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, value);
    Ok(headers)
}

fn range_headers(range: Option<ByteRange>) -> Result<HeaderMap, OriginError> {
    let mut headers = HeaderMap::new();
    if let Some(range) = range {
        let value = HeaderValue::from_str(&range.header_value()?)
            .map_err(|e| OriginError::Invalid(format!("Range header: {e}")))?;
        headers.insert(RANGE, value);
    }
    Ok(headers)
}

fn user_headers(headers: &[(String, String)]) -> Result<HeaderMap, OriginError> {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| OriginError::Invalid(format!("header name {name:?}")))?;
        // The value may be a credential: name the header, never show the value.
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| OriginError::Invalid(format!("value of header {name}")))?;
        value.set_sensitive(true);
        map.append(name, value);
    }
    Ok(map)
}

/// `Docker-Content-Digest`, when it is a sha256 digest.
fn announced_digest(headers: &HeaderMap) -> Option<Digest> {
    header_str(headers, DOCKER_CONTENT_DIGEST)?.parse().ok()
}

fn required_length(response: &Response) -> Result<u64, OriginError> {
    content_length(response.headers()).ok_or_else(|| OriginError::Upstream {
        status: response.status().as_u16(),
        message: format!(
            "{}: HEAD answer has no Content-Length",
            display_url(response.url())
        ),
    })
}

fn is_generic_type(media_type: &str) -> bool {
    matches!(
        media_type.to_ascii_lowercase().as_str(),
        "application/json" | "text/plain" | "application/octet-stream"
    )
}

/// The `mediaType` field of a JSON manifest, if it has one.
fn json_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct MediaTypeOnly {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
    }
    serde_json::from_slice::<MediaTypeOnly>(bytes)
        .ok()?
        .media_type
}

/// What a final answer to `HEAD` says of a URL's content.
fn url_info(headers: &HeaderMap) -> UrlInfo {
    UrlInfo {
        sha256: crate::announced::announced_sha256(headers),
        size: content_length(headers),
        etag: header_str(headers, ETAG),
        accept_ranges: header_str(headers, ACCEPT_RANGES)
            .is_some_and(|v| v.split(',').any(|u| u.trim().eq_ignore_ascii_case("bytes"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_references() {
        assert_eq!(parse_manifest_reference("v1.0").unwrap(), None);
        let d = Digest::of(b"x");
        assert_eq!(parse_manifest_reference(&d.to_string()).unwrap(), Some(d));
        for bad in ["sha512:abc", "../x", "a/b", "", "sha256:XYZ"] {
            assert!(parse_manifest_reference(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn user_header_errors_hide_values() {
        let err = user_headers(&[("Authorization".into(), "Bearer sec\nret".into())]).unwrap_err();
        assert!(!err.to_string().contains("sec"), "{err}");
        assert!(user_headers(&[("bad name".into(), "v".into())]).is_err());
        let ok = user_headers(&[("x-a".into(), "1".into()), ("x-a".into(), "2".into())]).unwrap();
        assert_eq!(ok.get_all("x-a").iter().count(), 2);
    }

    #[test]
    fn media_type_from_json_when_header_is_generic() {
        assert!(is_generic_type("Application/JSON"));
        assert!(!is_generic_type(MANIFEST_MEDIA_TYPES[0]));
        assert_eq!(
            json_media_type(
                br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json"}"#
            )
            .as_deref(),
            Some("application/vnd.oci.image.index.v1+json")
        );
        assert_eq!(json_media_type(b"not json"), None);
    }

    #[test]
    fn client_rejects_bad_registry_settings() {
        let cfg = |host: &str, endpoint: Option<&str>| OriginConfig {
            registries: vec![RegistryConfig {
                host: host.into(),
                endpoint: endpoint.map(String::from),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(Client::new(cfg("ok.io", Some("http://127.0.0.1:5000"))).is_ok());
        assert!(Client::new(cfg("bad/host", None)).is_err());
        assert!(Client::new(cfg("ok.io", Some("ftp://x"))).is_err());
    }
}
