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

/// The manifests cached, within [`CACHE_ENTRIES`] and `mirror.manifest_cache_bytes` (keys
/// and manifests counted): what clients can make the agent hold is bounded whatever they
/// ask for (names, tags, Accept headers).
#[derive(Debug, Default)]
pub(super) struct Cache {
    entries: std::collections::HashMap<Key, Cached>,
    bytes: usize,
}

fn weight(key: &Key, entry: &Cached) -> usize {
    key.0.len() + key.1.len() + key.2.len() + key.3.len() + entry.bytes.len()
}

impl Cache {
    fn get(&self, key: &Key, now: Instant) -> Option<Cached> {
        self.entries.get(key).filter(|c| c.expires > now).cloned()
    }

    /// Caches `entry` unless it alone is over `cap` bytes, evicting expired entries first,
    /// then others, until it fits.
    fn insert(&mut self, key: Key, entry: Cached, cap: usize, now: Instant) {
        let w = weight(&key, &entry);
        if w > cap {
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= weight(&key, &old);
        }
        let full = |c: &Self| c.entries.len() >= CACHE_ENTRIES || c.bytes + w > cap;
        if full(self) {
            self.entries.retain(|_, c| c.expires > now);
            self.bytes = self.entries.iter().map(|(k, c)| weight(k, c)).sum();
        }
        while full(self) {
            let Some(k) = self.entries.keys().next().cloned() else {
                break;
            };
            if let Some(c) = self.entries.remove(&k) {
                self.bytes -= weight(&k, &c);
            }
        }
        self.bytes += w;
        self.entries.insert(key, entry);
    }
}

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
        cache.get(&key, Instant::now())
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
            let cap = usize::try_from(mirror.config.manifest_cache_bytes).unwrap_or(usize::MAX);
            let mut cache = mirror.manifests.lock().unwrap_or_else(|e| e.into_inner());
            cache.insert(key, entry.clone(), cap, Instant::now());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry(len: usize, expires: Instant) -> Cached {
        let bytes = bytes::Bytes::from(vec![b'{'; len]);
        Cached {
            digest: Digest::of(&bytes),
            bytes,
            media_type: String::new(),
            expires,
        }
    }

    fn key(i: usize) -> Key {
        (String::new(), "r".into(), format!("t{i}"), String::new())
    }

    #[test]
    fn the_cache_stays_within_its_bytes_expired_entries_first() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let mut cache = Cache::default();
        let cap = 10_000;
        // One entry, already expired, and three live ones of ~2 KB each.
        cache.insert(key(0), entry(2000, now), cap, now);
        for i in 1..=3 {
            cache.insert(key(i), entry(2000, later), cap, now);
        }
        assert_eq!(cache.entries.len(), 4);
        // A fifth does not fit: the expired one goes, the live ones stay.
        let after = now + Duration::from_millis(1);
        cache.insert(key(4), entry(3000, later), cap, after);
        assert!(cache.get(&key(0), after).is_none());
        assert!((1..=4).all(|i| cache.get(&key(i), after).is_some()));
        assert!(cache.bytes <= cap, "{}", cache.bytes);
        // Nothing expired: live entries go until it fits.
        cache.insert(key(5), entry(6000, later), cap, after);
        assert!(cache.get(&key(5), after).is_some());
        assert!(cache.bytes <= cap, "{}", cache.bytes);
        assert_eq!(
            cache.bytes,
            (cache.entries.iter())
                .map(|(k, c)| weight(k, c))
                .sum::<usize>()
        );
        // Over the cap alone: not cached, nothing evicted for it.
        let before = cache.entries.len();
        cache.insert(key(6), entry(cap + 1, later), cap, after);
        assert!(cache.get(&key(6), after).is_none());
        assert_eq!(cache.entries.len(), before);
        // Replacing an entry does not count it twice.
        cache.insert(key(5), entry(6000, later), cap, after);
        assert!(cache.bytes <= cap, "{}", cache.bytes);
    }
}
