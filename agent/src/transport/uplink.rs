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
//!
//! A peer with nothing in the backlog is always admitted. The drain rate is learned from
//! whatever the backlog holds, and a receiver slower than the uplink (a host on a slow link)
//! drains its own bytes at its own pace: with only its bytes queued, the rate learned fell to
//! that host's, every other peer's request was refused, so only its bytes stayed queued and
//! the rate stayed low; peers on fast links waited for the slow one (the netns fault test
//! "a host on a twentieth of the link", failing now and then). One request per peer keeps
//! every peer served, and their faster drains correct the rate.

use std::collections::HashMap;
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
    /// Backlog bytes per peer (peers with none are absent).
    by_peer: HashMap<Peer, u64>,
}

/// Which peer a request came from (its key).
pub(crate) type Peer = [u8; 32];

/// A request's place in the backlog, held until the peer acknowledged the chunk
/// ([`Admitted::delivered`]) or the stream ended otherwise (dropped).
#[derive(Debug)]
#[must_use]
pub(crate) struct Admitted {
    uplink: Arc<Uplink>,
    peer: Peer,
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
        (self.uplink).done_at(Instant::now(), self.peer, self.bytes, self.delivered);
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

    /// Admits `bytes` from `peer` to the backlog unless they would wait longer than
    /// `max_wait` behind it. An idle uplink admits anything, and a peer with nothing in the
    /// backlog one request.
    pub(crate) fn admit(self: &Arc<Self>, peer: Peer, bytes: u64) -> Option<Admitted> {
        self.admit_at(Instant::now(), peer, bytes)
            .then(|| Admitted {
                uplink: self.clone(),
                peer,
                bytes,
                delivered: false,
            })
    }

    fn admit_at(&self, now: Instant, peer: Peer, bytes: u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let first_of_peer = !s.by_peer.contains_key(&peer);
        if s.backlog > 0 && !first_of_peer {
            let allowed = match s.rate {
                Some(rate) => (rate * self.max_wait.as_secs_f64()) as u64,
                None => self.initial_backlog,
            };
            if s.backlog + bytes > allowed {
                return false;
            }
        } else if s.backlog == 0 {
            s.busy_since = Some(now);
        }
        s.backlog += bytes;
        *s.by_peer.entry(peer).or_default() += bytes;
        true
    }

    /// Admitted bytes left the backlog: acknowledged by the peer, or abandoned.
    fn done_at(&self, now: Instant, peer: Peer, bytes: u64, delivered: bool) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.backlog = s.backlog.saturating_sub(bytes);
        if let Some(left) = s.by_peer.get_mut(&peer) {
            *left = left.saturating_sub(bytes);
            if *left == 0 {
                s.by_peer.remove(&peer);
            }
        }
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
    /// The peer of every request unless a test says otherwise.
    const P: Peer = [1; 32];

    #[test]
    fn an_idle_uplink_admits_anything_and_a_new_one_only_its_initial_backlog() {
        let up = Uplink::new(Duration::from_millis(500), 4 * MIB);
        let t = Instant::now();
        assert!(up.admit_at(t, P, 64 * MIB), "idle admits");
        assert!(
            !up.admit_at(t, P, MIB),
            "no rate yet: beyond the initial backlog"
        );
        up.done_at(t, P, 64 * MIB, false);
        for _ in 0..4 {
            assert!(up.admit_at(t, P, MIB), "within the initial backlog");
        }
        assert!(!up.admit_at(t, P, MIB));
        assert_eq!(up.backlog(), 4 * MIB);
        for _ in 0..4 {
            up.done_at(t, P, MIB, false);
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
            assert!(up.admit_at(t, P, MIB));
        }
        for _ in 0..10 {
            t += Duration::from_millis(40);
            up.done_at(t, P, MIB, true);
        }
        let rate = up.rate().expect("400 ms busy is a sample");
        assert!(
            (rate / (25.0 * MIB as f64) - 1.0).abs() < 0.01,
            "rate {rate}"
        );
        // 500 ms at 25 MiB/s is 12.5 MiB: twelve chunks wait, the thirteenth is refused.
        for _ in 0..12 {
            assert!(up.admit_at(t, P, MIB));
        }
        assert!(!up.admit_at(t, P, MIB));
    }

    #[test]
    fn idle_time_does_not_count_as_slow_draining() {
        let up = Uplink::new(Duration::from_millis(500), 64 * MIB);
        let mut t = Instant::now();
        // One chunk every second, each acknowledged 10 ms after it was admitted.
        for _ in 0..30 {
            assert!(up.admit_at(t, P, MIB));
            t += Duration::from_millis(10);
            up.done_at(t, P, MIB, true);
            t += Duration::from_secs(1);
        }
        let rate = up.rate().expect("300 ms busy in all");
        assert!(
            rate > 90.0 * MIB as f64,
            "rate {rate}: idle seconds counted"
        );
    }

    #[test]
    fn a_slow_receiver_alone_in_the_backlog_does_not_shut_out_the_others() {
        let up = Uplink::new(Duration::from_millis(500), 64 * MIB);
        let (slow, fast, other) = ([2; 32], [3; 32], [4; 32]);
        let mut t = Instant::now();
        // Only the slow receiver's chunks queued, one drained per 800 ms: ~1.3 MiB/s learned,
        // so 500 ms of wait is less than one chunk.
        assert!(up.admit_at(t, slow, MIB));
        for _ in 0..3 {
            t += Duration::from_millis(800);
            up.done_at(t, slow, MIB, true);
            assert!(up.admit_at(t, slow, MIB), "an idle uplink admits");
        }
        let rate = up.rate().expect("sampled");
        assert!(rate < 2.0 * MIB as f64, "rate {rate}");
        assert!(
            up.backlog() > 0,
            "the slow receiver's chunk is still queued"
        );
        assert!(
            !up.admit_at(t, slow, MIB),
            "the slow receiver waits its turn"
        );
        // Each other peer still gets a request in, but one only while it has one queued.
        assert!(up.admit_at(t, fast, MIB));
        assert!(!up.admit_at(t, fast, MIB));
        assert!(up.admit_at(t, other, MIB));
        // Its chunk acknowledged, the fast peer is admitted again.
        t += Duration::from_millis(5);
        up.done_at(t, fast, MIB, true);
        assert!(up.admit_at(t, fast, MIB));
    }
}
