//! Pull rights: the mirror serves a repository only to a client the upstream registry would
//! let pull it. Whatever this agent holds (in its cache, its store, or from peers, who may
//! have pulled it with their own credentials) stays behind that check.
//!
//! A repository anyone may pull (an anonymous `HEAD` upstream succeeds) is public: served
//! to every client. For any other, the client must present its own credentials (HTTP
//! Basic; a client without them gets `401` with a Basic challenge, as a registry would, and
//! containerd, skopeo and docker answer it with the credentials they have for the image),
//! and the upstream must accept them for that repository (`HEAD` with those credentials
//! alone, never this agent's). Each verdict that allows is remembered for
//! `mirror.pull_right_ttl_ms`; refusals are not. When the upstream cannot be reached, an
//! expired verdict that allowed still does (the mirror keeps serving what it served);
//! without one, content named by its digest is served (the digest is the capability) and a
//! tag is refused.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use shoal_origin::{Credentials, OriginError, PullRight, Pullable};
use tokio::time::Instant;

use super::{Mirror, error};

/// The most verdicts kept per table; past it, the expired ones go, then all.
const MAX_VERDICTS: usize = 100_000;

/// Who asked: anyone, or the holder of credentials (by their hash: never kept in clear).
type Who = Option<[u8; 32]>;

#[derive(Debug, Default)]
pub(crate) struct Rights {
    /// (who, registry, repository) → when the upstream last allowed it.
    allowed: Mutex<HashMap<(Who, String, String), Instant>>,
}

impl Rights {
    fn seen(&self, key: &(Who, String, String)) -> Option<Instant> {
        lock(&self.allowed).get(key).copied()
    }

    fn allow(&self, key: (Who, String, String), ttl: Duration) {
        let mut allowed = lock(&self.allowed);
        if allowed.len() >= MAX_VERDICTS {
            let now = Instant::now();
            allowed.retain(|_, at| now.duration_since(*at) < ttl);
            if allowed.len() >= MAX_VERDICTS {
                allowed.clear();
            }
        }
        allowed.insert(key, Instant::now());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The client's Basic credentials, if it sent any; `Err` if it sent an `Authorization` the
/// mirror cannot use.
fn client_credentials(headers: &HeaderMap) -> Result<Option<Credentials>, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| "not ASCII")?;
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return Err("no scheme");
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("only Basic credentials are taken");
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "not base64")?;
    let text = String::from_utf8(decoded).map_err(|_| "not UTF-8")?;
    let (username, password) = text.split_once(':').ok_or("no user:password")?;
    Ok(Some(Credentials {
        username: username.to_string(),
        password: password.to_string(),
    }))
}

/// Whether `what` names its content by digest (a blob, a manifest by digest).
fn by_digest(what: Pullable<'_>) -> bool {
    match what {
        Pullable::Blob(_) => true,
        Pullable::Manifest(reference) => reference.starts_with("sha256:"),
    }
}

/// The upstream could not be reached or failed on its side (no verdict about the client).
fn unreachable(e: &OriginError) -> bool {
    match e {
        OriginError::Unreachable(_) => true,
        OriginError::Upstream { status, .. } => *status >= 500,
        _ => false,
    }
}

fn hash(c: &Credentials) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(c.username.as_bytes());
    h.update([0]);
    h.update(c.password.as_bytes());
    h.finalize().into()
}

/// `401` with a Basic challenge: the client should ask again with its credentials.
fn challenge(registry: &str, repository: &str) -> Response {
    let message = format!(
        "{registry}/{repository} is not public: pull it with your own credentials for {registry}"
    );
    challenged(&message)
}

/// The challenge of `GET /v2/` to a client without credentials.
pub(crate) fn challenge_any() -> Response {
    challenged("send the credentials you have for the upstream registry, or none for public images")
}

fn challenged(message: &str) -> Response {
    let mut r = error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"shoal mirror\""),
    );
    r
}

impl Mirror {
    /// Whether this client may pull `what` from `registry`/`repository`: `Ok` to serve,
    /// else the response to send instead.
    pub(crate) async fn check_pull_right(
        &self,
        registry: &str,
        repository: &str,
        what: Pullable<'_>,
        headers: &HeaderMap,
    ) -> Result<(), Response> {
        if !self.config.check_pull_rights {
            return Ok(());
        }
        let ttl = super::ms(self.config.pull_right_ttl_ms);
        let fresh = |at: Option<Instant>| at.is_some_and(|at| at.elapsed() < ttl);
        let public = (None, registry.to_string(), repository.to_string());
        let seen_public = self.rights.seen(&public);
        if fresh(seen_public) {
            return Ok(());
        }
        let credentials = client_credentials(headers).map_err(|why| {
            error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                &format!("unusable Authorization header ({why})"),
            )
        })?;
        let key = (
            credentials.as_ref().map(hash),
            registry.to_string(),
            repository.to_string(),
        );
        let seen_key = self.rights.seen(&key);
        if fresh(seen_key) {
            return Ok(());
        }
        let asked = self
            .origin
            .may_pull(registry, repository, what, credentials.as_ref())
            .await;
        let unknown = || {
            let code = match what {
                Pullable::Manifest(_) => "MANIFEST_UNKNOWN",
                Pullable::Blob(_) => "BLOB_UNKNOWN",
            };
            let message = format!(
                "the upstream registry {registry} has no such thing in {repository} for these credentials"
            );
            error(StatusCode::NOT_FOUND, code, &message)
        };
        match asked {
            Ok(PullRight::Allowed) => {
                self.rights.allow(key, ttl);
                Ok(())
            }
            // An open registry without it: nothing private to protect, and the serving
            // path says what it has.
            Ok(PullRight::Unknown { challenged: false }) => Ok(()),
            Ok(PullRight::Refused | PullRight::Unknown { .. }) if credentials.is_none() => {
                tracing::debug!(
                    registry,
                    repository,
                    "mirror: not public, asking the client for credentials"
                );
                Err(challenge(registry, repository))
            }
            Ok(PullRight::Unknown { .. }) => Err(unknown()),
            Ok(PullRight::Refused) => {
                tracing::warn!(
                    registry,
                    repository,
                    "mirror: refused a client whose credentials the upstream does not accept for this repository"
                );
                Err(error(
                    StatusCode::FORBIDDEN,
                    "DENIED",
                    &format!(
                        "the upstream registry {registry} does not let these credentials pull {repository}"
                    ),
                ))
            }
            // The upstream is away: what was allowed before still is.
            Err(e) if seen_key.or(seen_public).is_some() => {
                tracing::warn!(registry, repository, error = %e, "mirror: cannot check a pull right upstream; serving on an earlier verdict");
                Ok(())
            }
            // Nor is there anyone to ask: content named by its digest is served, the digest
            // being the capability (a private image's digests come only with its manifest,
            // which a tag cannot be resolved to while the upstream is away). A cluster keeps
            // pulling what it holds through a registry outage.
            Err(e) if by_digest(what) && unreachable(&e) => {
                tracing::warn!(registry, repository, error = %e, "mirror: the upstream cannot be asked about a pull right; serving content named by its digest");
                Ok(())
            }
            Err(e) => Err(super::upstream_error(&e, "UNKNOWN")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_read_and_anything_else_refused() {
        let mut h = HeaderMap::new();
        assert_eq!(client_credentials(&h), Ok(None));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic dXNlcjpwYTpzcw=="),
        );
        let c = client_credentials(&h).expect("ok").expect("some");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        for bad in ["Bearer abc", "Basic !!!", "Basic dXNlcg==", "Basic"] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(bad));
            assert!(client_credentials(&h).is_err(), "{bad}");
        }
    }
}
