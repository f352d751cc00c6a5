//! Single flight for URLs pulled without a digest. A blob's identity is its digest, which a
//! URL alone does not give; so the first agent to ask fetches the URL and reports the
//! digest it found, and every other agent asking for the same (URL, ETag, size) meanwhile
//! waits, then pulls that digest from peers. Soft state: losing it only costs a second
//! fetch.

use std::collections::{BTreeMap, BTreeSet};

use super::SeederConfig;
use crate::{HostId, Time};
use shoal_proto::Digest;

/// What identifies a URL's content without its digest: a changed file has another ETag or
/// size, so it is another identity.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct UrlKey {
    pub url: String,
    pub etag: String,
    pub size: u64,
}

/// The answer to one agent asking about a URL.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum UrlAnswer {
    /// The content is this blob: pull it like any other.
    Known(Digest),
    /// This host fetches it now (the asker itself, or another one to wait for).
    Fetcher(HostId),
    /// The asker gave up and nobody knows the digest: nothing to wait for.
    Nobody,
}

#[derive(Debug, Default)]
struct Flight {
    digest: Option<Digest>,
    /// The fetcher and when it was chosen.
    fetcher: Option<(HostId, Time)>,
    touched: Time,
}

/// The URL identities known, by key.
#[derive(Debug, Default)]
pub(super) struct Urls {
    flights: BTreeMap<UrlKey, Flight>,
    /// (when chosen, key) of every flight with a fetcher: what times out first.
    fetching: BTreeSet<(Time, UrlKey)>,
}

impl Urls {
    /// One agent asks about `key`, reporting the digest it fetched or that it gave up.
    /// `alive` tells whether a fetcher's lease still runs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resolve(
        &mut self,
        config: &SeederConfig,
        now: Time,
        key: UrlKey,
        host: HostId,
        fetched: Option<Digest>,
        gave_up: bool,
        alive: impl Fn(HostId) -> bool,
    ) -> UrlAnswer {
        if self.flights.len() >= config.max_urls {
            let oldest = (self.flights.iter())
                .min_by_key(|(_, f)| f.touched)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                if let Some((_, since)) = self.flights.remove(&k).and_then(|f| f.fetcher) {
                    self.fetching.remove(&(since, k));
                }
            }
        }
        let timeout = config.url_fetch_timeout;
        let entry = self.flights.entry(key.clone()).or_default();
        let chosen = entry.fetcher.map(|(_, since)| since);
        let fetcher_alive = entry
            .fetcher
            .is_some_and(|(h, since)| alive(h) && now.saturating_since(since) < timeout);
        entry.touched = now;
        // Only the elected fetcher names the content, and only once: a digest already known
        // is never replaced.
        if let Some(digest) = fetched
            && entry.digest.is_none()
            && entry.fetcher.is_some_and(|(h, _)| h == host)
        {
            entry.digest = Some(digest);
            entry.fetcher = None;
        }
        if gave_up && entry.fetcher.is_some_and(|(h, _)| h == host) {
            entry.fetcher = None;
        }
        let answer = if let Some(digest) = entry.digest {
            UrlAnswer::Known(digest)
        } else if gave_up {
            UrlAnswer::Nobody
        } else {
            match entry.fetcher {
                Some((h, _)) if fetcher_alive => UrlAnswer::Fetcher(h),
                _ => {
                    entry.fetcher = Some((host, now));
                    UrlAnswer::Fetcher(host)
                }
            }
        };
        let now_chosen = entry.fetcher.map(|(_, since)| since);
        if chosen != now_chosen {
            if let Some(since) = chosen {
                self.fetching.remove(&(since, key.clone()));
            }
            if let Some(since) = now_chosen {
                self.fetching.insert((since, key));
            }
        }
        answer
    }

    /// Drops fetchers that have not reported within the timeout.
    pub(super) fn expire(&mut self, config: &SeederConfig, now: Time) {
        while let Some((since, key)) = self.fetching.first().cloned() {
            if now.saturating_since(since) < config.url_fetch_timeout {
                break;
            }
            self.fetching.pop_first();
            if let Some(f) = self.flights.get_mut(&key) {
                f.fetcher = None;
            }
        }
    }

    /// When the oldest fetcher times out.
    pub(super) fn next_expiry(&self, config: &SeederConfig) -> Option<Time> {
        (self.fetching.first()).map(|(since, _)| *since + config.url_fetch_timeout)
    }
}
