//! Per-host bandwidth limits: one token bucket for serving peers (upload) and one for
//! fetching (download), shared by every connection of the agent.
//!
//! A caller takes `len` bytes of tokens when it is about to move the bytes (the fetcher once
//! the chunk's header arrived, so refused requests cost nothing). The bucket may go into
//! debt: the caller takes its tokens at once and sleeps until the debt is repaid, so a chunk
//! larger than the burst still passes, and concurrent callers are served in arrival order
//! at the configured rate on average.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket of bytes. Uses tokio's clock, so tests can pause time.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    burst: u64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Tokens available; negative while in debt.
    tokens: f64,
    refilled_at: Instant,
}

impl RateLimiter {
    /// A bucket refilled at `bytes_per_sec` holding at most `burst` bytes (starts full).
    /// `bytes_per_sec` must be positive.
    pub fn new(bytes_per_sec: u64, burst: u64) -> Self {
        let bytes_per_sec = bytes_per_sec.max(1);
        Self {
            bytes_per_sec,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst as f64,
                refilled_at: Instant::now(),
            }),
        }
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// The bucket, refilled up to now.
    fn refilled(&self) -> std::sync::MutexGuard<'_, Bucket> {
        let mut bucket = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now
            .saturating_duration_since(bucket.refilled_at)
            .as_secs_f64();
        bucket.tokens =
            (bucket.tokens + elapsed * self.bytes_per_sec as f64).min(self.burst as f64);
        bucket.refilled_at = now;
        bucket
    }

    /// How long a caller must wait once the bucket holds `tokens` (zero if not in debt).
    fn debt_wait(&self, tokens: f64) -> Duration {
        if tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-tokens / self.bytes_per_sec as f64)
        }
    }

    /// How long a caller taking `len` bytes now must wait; takes the tokens.
    fn reserve(&self, len: u64) -> Duration {
        let mut bucket = self.refilled();
        bucket.tokens -= len as f64;
        self.debt_wait(bucket.tokens)
    }

    /// Waits until `len` bytes may be moved.
    pub async fn acquire(&self, len: u64) {
        let wait = self.reserve(len);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `len` bytes of tokens only if the wait they cost is at most `max_wait`, and
    /// returns that wait; otherwise takes nothing and returns `None` (the caller should
    /// refuse the work rather than queue behind the debt).
    pub fn try_reserve_within(&self, len: u64, max_wait: Duration) -> Option<Duration> {
        let mut bucket = self.refilled();
        let wait = self.debt_wait(bucket.tokens - len as f64);
        if wait > max_wait {
            return None;
        }
        bucket.tokens -= len as f64;
        Some(wait)
    }

    /// Bytes that may be moved now without waiting; negative while in debt.
    pub fn available(&self) -> i64 {
        self.refilled().tokens as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_passes_at_once_then_rate_applies() {
        let limiter = RateLimiter::new(1000, 2000);
        let start = Instant::now();
        limiter.acquire(2000).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        limiter.acquire(500).await;
        let waited = start.elapsed();
        assert!(
            (Duration::from_millis(499)..=Duration::from_millis(501)).contains(&waited),
            "500 bytes at 1000 B/s after the burst: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_the_rate() {
        let limiter = std::sync::Arc::new(RateLimiter::new(1 << 20, 1 << 20));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..9 {
            let l = limiter.clone();
            tasks.push(tokio::spawn(async move { l.acquire(1 << 20).await }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        // 9 MiB at 1 MiB/s with 1 MiB of burst: 8 s.
        let waited = start.elapsed();
        assert!(
            (Duration::from_millis(7990)..=Duration::from_millis(8010)).contains(&waited),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_only_up_to_the_burst() {
        let limiter = RateLimiter::new(100, 100);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        limiter.acquire(300).await;
        let waited = start.elapsed();
        assert!(
            (Duration::from_millis(1990)..=Duration::from_millis(2010)).contains(&waited),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reservation_past_the_allowed_wait_takes_nothing() {
        let limiter = RateLimiter::new(1000, 1000);
        assert_eq!(
            limiter.try_reserve_within(1500, Duration::from_secs(1)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(limiter.available(), -500);
        assert_eq!(
            limiter.try_reserve_within(1000, Duration::from_secs(1)),
            None
        );
        assert_eq!(
            limiter.available(),
            -500,
            "a refused reservation takes no tokens"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn chunk_larger_than_the_burst_still_passes() {
        let limiter = RateLimiter::new(1000, 10);
        let start = Instant::now();
        limiter.acquire(1010).await;
        let waited = start.elapsed();
        assert!(
            (Duration::from_millis(999)..=Duration::from_millis(1001)).contains(&waited),
            "{waited:?}"
        );
    }
}
