//! Manifests pass through to the upstream registry and are cached briefly: a pull asks for
//! the same manifest by tag, then by digest, often with HEAD first.

use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use shoal_proto::Digest;

use super::{Mirror, error, ms, upstream_error};

/// Entries kept at most; expired ones go first when full.
const CACHE_ENTRIES: usize = 1024;

/// (registry, repository, reference, Accept).
pub(super) type Key = (String, String, String, String);

#[derive(Clone, Debug)]
pub(super) struct Cached {
    bytes: bytes::Bytes,
    media_type: String,
    digest: Digest,
    expires: Instant,
}

pub(super) async fn serve(
    mirror: &Mirror,
    registry: &str,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let by_digest = reference.starts_with("sha256:");
    if by_digest {
        if let Err(e) = reference.parse::<Digest>() {
            return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &e.to_string());
        }
    } else if let Err(e) = shoal_origin::validate_tag(reference) {
        return error(StatusCode::BAD_REQUEST, "MANIFEST_INVALID", &e.to_string());
    }
    let accept = (headers.get_all(header::ACCEPT).iter())
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let key: Key = (
        registry.to_string(),
        name.to_string(),
        reference.to_string(),
        accept.clone(),
    );
    let cached = {
        let cache = mirror.manifests.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&key)
            .filter(|c| c.expires > Instant::now())
            .cloned()
    };
    let manifest = match cached {
        Some(c) => c,
        None => {
            let types: Vec<&str> = if accept.is_empty() {
                shoal_origin::MANIFEST_MEDIA_TYPES.to_vec()
            } else {
                accept.split(',').map(str::trim).collect()
            };
            let fetched = (mirror.origin)
                .get_manifest(registry, name, reference, &types)
                .await;
            let fetched = match fetched {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(registry, name, reference, error = %e, "manifest from upstream failed");
                    return upstream_error(&e, "MANIFEST_UNKNOWN");
                }
            };
            let ttl = mirror.config.manifest_cache_ttl_ms;
            let ttl = if by_digest {
                ttl.saturating_mul(10)
            } else {
                ttl
            };
            let entry = Cached {
                bytes: fetched.bytes,
                media_type: fetched.media_type,
                digest: fetched.digest,
                expires: Instant::now() + ms(ttl),
            };
            let mut cache = mirror.manifests.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_ENTRIES {
                let now = Instant::now();
                cache.retain(|_, c| c.expires > now);
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, entry.clone());
            entry
        }
    };
    metrics::counter!(crate::metrics::MIRROR_REQUESTS, "kind" => "manifest").increment(1);
    let len = manifest.bytes.len();
    let mut response = if head {
        StatusCode::OK.into_response()
    } else {
        (StatusCode::OK, manifest.bytes).into_response()
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&manifest.media_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&manifest.digest.to_string()) {
        h.insert("Docker-Content-Digest", v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}
