//! Being a good client of a rate-limited registry (Docker Hub's pull limits, a busy internal
//! registry): a `429 Too Many Requests` pauses every request of this process to that registry
//! for its `Retry-After` (1 s if it names none, never more than `max_retry_wait_ms`), then
//! the request is tried again, up to [`THROTTLED_RETRIES`] times; and a registry may be given a
//! request budget (`[[origin.registries]] max_requests_per_second`) that requests wait for
//! rather than spend. Each 429 counts in `shoal_origin_throttled_responses_total{registry}`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use tokio::time::Instant;

/// Attempts again after a 429 before the request fails with it.
pub(crate) const THROTTLED_RETRIES: u32 = 3;
/// What a 429 without a usable `Retry-After` waits.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Counter of 429 answers, by registry.
pub const THROTTLED: &str = "shoal_origin_throttled_responses_total";

/// When each registry may be sent the next request.
#[derive(Debug, Default)]
pub(crate) struct Pacing {
    next: Mutex<HashMap<String, Instant>>,
}

impl Pacing {
    /// Waits until `registry` may be sent a request, and with a budget of `rate` requests
    /// per second reserves this one's slot.
    pub(crate) async fn wait(&self, registry: &str, rate: Option<f64>) {
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = next.get(registry).copied().unwrap_or(now).max(now);
            match rate.filter(|r| *r > 0.0) {
                Some(rate) => {
                    next.insert(
                        registry.to_string(),
                        slot + Duration::from_secs_f64(1.0 / rate),
                    );
                }
                None => {
                    if next.get(registry).is_some_and(|t| *t <= now) {
                        next.remove(registry);
                    }
                }
            }
            slot
        };
        tokio::time::sleep_until(at).await;
    }

    /// `registry` answered 429: nobody sends it anything for `wait`. Returns the pause.
    pub(crate) fn throttled(&self, registry: &str, headers: &HeaderMap, max: Duration) -> Duration {
        metrics::counter!(THROTTLED, "registry" => registry.to_string()).increment(1);
        let wait = retry_after(headers, SystemTime::now())
            .unwrap_or(DEFAULT_RETRY_AFTER)
            .min(max);
        let until = Instant::now() + wait;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let entry = next.entry(registry.to_string()).or_insert(until);
        *entry = (*entry).max(until);
        wait
    }
}

/// `Retry-After`: delay-seconds, or an HTTP date (RFC 9110), as a wait from `now`.
fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, value.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // 1994-11-06 08:49:37
        assert_eq!(
            retry_after(&headers("120"), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:47 GMT"), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&headers("Sun, 06 Nov 1994 08:49:00 GMT"), now),
            Some(Duration::ZERO),
            "a date in the past: at once"
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(
            retry_after(&headers("Thu, 31 Feb 1970 25:00:00 GMT"), now),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_spaces_requests_and_a_429_pauses_them_all() {
        let pacing = Pacing::default();
        let start = Instant::now();
        for _ in 0..3 {
            pacing.wait("r", Some(10.0)).await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(200),
            "three requests at 10/s"
        );
        pacing.wait("other", None).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(200),
            "another registry waits not"
        );
        let start = Instant::now();
        let paused = pacing.throttled("other", &headers("5"), Duration::from_secs(2));
        assert_eq!(paused, Duration::from_secs(2), "capped at the maximum");
        pacing.wait("other", None).await;
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        let start = Instant::now();
        pacing.wait("other", None).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the pause is over");
    }
}
