//! Single flight for URLs pulled without a digest. A blob's identity is its digest, which a
//! URL alone does not give; so the first agent to ask fetches the URL, reports the digest it
//! found, and every other agent asking for the same (URL, ETag, size) meanwhile waits, then
//! pulls that digest from peers. Soft state: a coordinator restart only costs a second fetch.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, AgentState};

use super::{ApiError, State};

/// A fetcher that has not reported after this long is presumed stuck: another may fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Identities kept at most; the oldest go first.
const MAX_URLS: usize = 10_000;

/// (url, etag, size).
pub type UrlKey = (String, String, u64);

#[derive(Debug, Default)]
pub struct UrlIdentity {
    digest: Option<Digest>,
    fetcher: Option<(HostId, Instant)>,
    touched: Option<Instant>,
}

impl State {
    pub(super) fn resolve_url(
        &mut self,
        req: pb::ResolveUrlRequest,
    ) -> Result<pb::ResolveUrlResponse, ApiError> {
        shoal_origin::parse_http_url(&req.url)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        if req.etag.is_empty() && req.size == 0 {
            return Err(ApiError::InvalidArgument(
                "a URL without ETag or size cannot be told apart from a changed one: give a digest"
                    .into(),
            ));
        }
        let host = self
            .agents
            .host_of(&req.agent_id)
            .ok_or_else(|| ApiError::NotFound(format!("agent {:?} is not known", req.agent_id)))?;
        let fetched = if req.fetched_digest.is_empty() {
            None
        } else {
            Some(
                req.fetched_digest
                    .parse::<Digest>()
                    .map_err(|e| ApiError::InvalidArgument(format!("fetched_digest: {e}")))?,
            )
        };
        if self.urls.len() >= MAX_URLS {
            let oldest = (self.urls.iter())
                .min_by_key(|(_, u)| u.touched)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.urls.remove(&k);
            }
        }
        let key: UrlKey = (req.url, req.etag, req.size);
        let now = Instant::now();
        let live =
            |s: &Self, h: HostId| s.agents.get(h).is_some_and(|a| a.state != AgentState::Gone);
        let fetcher_alive = (self.urls.get(&key).and_then(|u| u.fetcher))
            .is_some_and(|(h, since)| live(self, h) && since.elapsed() < FETCH_TIMEOUT);
        let entry = self.urls.entry(key).or_default();
        entry.touched = Some(now);
        if let Some(digest) = fetched {
            entry.digest = Some(digest);
            entry.fetcher = None;
        }
        if req.gave_up && entry.fetcher.is_some_and(|(h, _)| h == host) {
            entry.fetcher = None;
        }
        if let Some(digest) = entry.digest {
            return Ok(pb::ResolveUrlResponse {
                digest: digest.to_string(),
                fetcher: String::new(),
            });
        }
        if req.gave_up {
            return Ok(pb::ResolveUrlResponse::default());
        }
        let fetcher = match entry.fetcher {
            Some((h, _)) if fetcher_alive => h,
            _ => {
                entry.fetcher = Some((host, now));
                host
            }
        };
        Ok(pb::ResolveUrlResponse {
            digest: String::new(),
            fetcher: self.agents.name(fetcher),
        })
    }
}

/// The URL identities known, by (url, etag, size).
pub type Urls = BTreeMap<UrlKey, UrlIdentity>;
