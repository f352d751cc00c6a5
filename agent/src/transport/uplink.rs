//! What this agent's uplink delivers, learned from its own sends, and the queue in front of it.
//!
//! Chunk bytes handed to QUIC are not sent yet: they wait in the connection's send buffer for
//! congestion control and the link. A source that accepts every request therefore builds a
//! queue that only grows while downloaders ask it for more, and every chunk in that queue is
//! one that a peer might have relayed sooner. On a shaped link this was the seeder sending 1.4-1.8
//! copies of a blob (issue 13).
//!
//! [`Uplink`] keeps the queue short without being told the link's rate: it counts the bytes
//! admitted and not yet acknowledged by the peer (the backlog), measures how fast the backlog
//! drains while there is one (the link's real rate, whatever congestion control, the kernel's
//! shaping and the peers' own downlinks make of it), and refuses a request that would wait
//! longer than `max_wait` behind the backlog. The downloader then asks another source for that
//! chunk. The drain rate is the agent's learned upload capacity.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Busy time over which one drain-rate sample is taken.
const SAMPLE_BUSY: Duration = Duration::from_millis(200);
/// Weight of a new sample in the drain-rate average.
const SAMPLE_WEIGHT: f64 = 0.25;

/// The uplink's learned rate and current backlog. One per endpoint, shared by every
/// connection: they all leave by the same link.
#[derive(Debug)]
pub(crate) struct Uplink {
    max_wait: Duration,
    /// Backlog allowed before any rate is known.
    initial_backlog: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Bytes admitted and not yet acknowledged.
    backlog: u64,
    /// When the current busy period (backlog above zero) began.
    busy_since: Option<Instant>,
    /// Bytes drained and busy time accumulated towards the next sample.
    sample_bytes: u64,
    sample_busy: Duration,
    /// Bytes per second, once measured.
    rate: Option<f64>,
}

/// A request's place in the backlog, held until the peer acknowledged the chunk
/// ([`Admitted::delivered`]) or the stream ended otherwise (dropped).
#[derive(Debug)]
#[must_use]
pub(crate) struct Admitted {
    uplink: Arc<Uplink>,
    bytes: u64,
    delivered: bool,
}

impl Admitted {
    /// The peer acknowledged every byte: they count towards the drain rate.
    pub(crate) fn delivered(mut self) {
        self.delivered = true;
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        (self.uplink).done_at(Instant::now(), self.bytes, self.delivered);
    }
}

impl Uplink {
    pub(crate) fn new(max_wait: Duration, initial_backlog: u64) -> Self {
        Self {
            max_wait,
            initial_backlog,
            state: Mutex::default(),
        }
    }

    /// Admits `bytes` to the backlog unless they would wait longer than `max_wait` behind it.
    /// An idle uplink admits anything.
    pub(crate) fn admit(self: &Arc<Self>, bytes: u64) -> Option<Admitted> {
        self.admit_at(Instant::now(), bytes).then(|| Admitted {
            uplink: self.clone(),
            bytes,
            delivered: false,
        })
    }

    fn admit_at(&self, now: Instant, bytes: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.backlog > 0 {
            let allowed = match s.rate {
                Some(rate) => (rate * self.max_wait.as_secs_f64()) as u64,
                None => self.initial_backlog,
            };
            if s.backlog + bytes > allowed {
                return false;
            }
        } else {
            s.busy_since = Some(now);
        }
        s.backlog += bytes;
        true
    }

    /// Admitted bytes left the backlog: acknowledged by the peer, or abandoned.
    fn done_at(&self, now: Instant, bytes: u64, delivered: bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.backlog = s.backlog.saturating_sub(bytes);
        if delivered {
            s.sample_bytes += bytes;
        }
        let busy = s
            .busy_since
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        if s.backlog == 0 {
            s.busy_since = None;
            s.sample_busy += busy;
        } else if s.sample_busy + busy >= SAMPLE_BUSY {
            // A long busy period: close the sample here and go on measuring from now.
            s.busy_since = Some(now);
            s.sample_busy += busy;
        }
        if s.sample_busy >= SAMPLE_BUSY {
            let sample = s.sample_bytes as f64 / s.sample_busy.as_secs_f64();
            s.rate = Some(s.rate.map_or(sample, |r| r + (sample - r) * SAMPLE_WEIGHT));
            s.sample_bytes = 0;
            s.sample_busy = Duration::ZERO;
        }
    }

    /// What the uplink delivered while it had something to send, in bytes per second.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).rate
    }

    /// Bytes admitted and not yet acknowledged.
    #[cfg(test)]
    fn backlog(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).backlog
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn an_idle_uplink_admits_anything_and_a_new_one_only_its_initial_backlog() {
        let up = Uplink::new(Duration::from_millis(500), 4 * MIB);
        let t = Instant::now();
        assert!(up.admit_at(t, 64 * MIB), "idle admits");
        assert!(
            !up.admit_at(t, MIB),
            "no rate yet: beyond the initial backlog"
        );
        up.done_at(t, 64 * MIB, false);
        for _ in 0..4 {
            assert!(up.admit_at(t, MIB), "within the initial backlog");
        }
        assert!(!up.admit_at(t, MIB));
        assert_eq!(up.backlog(), 4 * MIB);
        for _ in 0..4 {
            up.done_at(t, MIB, false);
        }
        assert_eq!(up.backlog(), 0);
        assert_eq!(up.rate(), None, "nothing delivered, nothing learned");
    }

    #[test]
    fn learns_the_drain_rate_and_bounds_the_wait_by_it() {
        let up = Uplink::new(Duration::from_millis(500), 64 * MIB);
        let mut t = Instant::now();
        // Ten chunks queued at once, one acknowledged every 40 ms: 25 MiB/s.
        for _ in 0..10 {
            assert!(up.admit_at(t, MIB));
        }
        for _ in 0..10 {
            t += Duration::from_millis(40);
            up.done_at(t, MIB, true);
        }
        let rate = up.rate().expect("400 ms busy is a sample");
        assert!(
            (rate / (25.0 * MIB as f64) - 1.0).abs() < 0.01,
            "rate {rate}"
        );
        // 500 ms at 25 MiB/s is 12.5 MiB: twelve chunks wait, the thirteenth is refused.
        for _ in 0..12 {
            assert!(up.admit_at(t, MIB));
        }
        assert!(!up.admit_at(t, MIB));
    }

    #[test]
    fn idle_time_does_not_count_as_slow_draining() {
        let up = Uplink::new(Duration::from_millis(500), 64 * MIB);
        let mut t = Instant::now();
        // One chunk every second, each acknowledged 10 ms after it was admitted.
        for _ in 0..30 {
            assert!(up.admit_at(t, MIB));
            t += Duration::from_millis(10);
            up.done_at(t, MIB, true);
            t += Duration::from_secs(1);
        }
        let rate = up.rate().expect("300 ms busy in all");
        assert!(
            rate > 90.0 * MIB as f64,
            "rate {rate}: idle seconds counted"
        );
    }
}
