//! What the agent's links carry, learned from its own traffic and reported to the coordinator
//! (`Load.learned_*`), which plans with it in place of the declared capacities. An agent with
//! no configured limits declares 10 Gbit/s, and on a slower link every plan then assumed a
//! capacity the link did not have.
//!
//! Upload: the uplink's drain rate (`transport/uplink.rs`: how fast the backlog of served
//! chunks was acknowledged while there was one). Download: the bytes received from peers
//! over the last [`WINDOW`] (a shaper's burst or a chunk's rounding averages out). Each is a
//! sample; the estimate is the highest sample, decaying with a half-life of [`HALF_LIFE`] so
//! that a link that became slower is learned too, in time. A sample says what the link
//! carried, which is at most what it can, so the peak is the best lower bound at hand; the
//! configured limits cap it.
//!
//! What the agent declares at Join, before it has learned anything: its configured limits,
//! else the fastest speed the kernel reports for a network interface that is up
//! (`/sys/class/net/*/speed`; a veth claims 10 Gbit/s, a virtio NIC reports none), else
//! 10 Gbit/s.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{AgentConfig, UNLIMITED_CAPACITY_BYTES_PER_SEC};

/// How fast an unrenewed peak fades.
pub(crate) const HALF_LIFE: Duration = Duration::from_secs(600);

/// Samples below this are not evidence of a link's capacity (a trickle, an idle moment).
const MIN_SAMPLE: f64 = 64.0 * 1024.0;

#[derive(Debug, Default)]
struct Peak {
    /// Bytes per second and when it was last raised or decayed.
    value: f64,
    at: Option<Instant>,
}

impl Peak {
    fn value_at(&self, now: Instant) -> f64 {
        let Some(at) = self.at else { return 0.0 };
        let age = now.saturating_duration_since(at).as_secs_f64();
        self.value * 0.5f64.powf(age / HALF_LIFE.as_secs_f64())
    }

    fn observe(&mut self, now: Instant, sample: f64) {
        if sample.is_nan() || sample < MIN_SAMPLE {
            return;
        }
        let decayed = self.value_at(now);
        self.value = decayed.max(sample);
        self.at = Some(now);
    }
}

/// (upload, download) capacities to declare at Join, bytes/s (see the module's doc).
pub(crate) fn declared(config: &AgentConfig) -> (u64, u64) {
    let nic = nic_speed(Path::new("/sys/class/net")).unwrap_or(UNLIMITED_CAPACITY_BYTES_PER_SEC);
    let or_nic = |limit: u64| if limit > 0 { limit } else { nic };
    (
        or_nic(config.upload_limit_bytes_per_sec),
        or_nic(config.download_limit_bytes_per_sec),
    )
}

/// The fastest link speed under `root` (`/sys/class/net`) of an interface that is up, not
/// loopback, bytes/s; `None` where none reports one (virtual devices give -1 or an error).
fn nic_speed(root: &Path) -> Option<u64> {
    let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).ok();
    (std::fs::read_dir(root).ok()?.flatten())
        .map(|e| e.path())
        .filter(|dir| !dir.ends_with("lo"))
        .filter(|dir| read(dir, "operstate").is_some_and(|s| s.trim() == "up"))
        .filter_map(|dir| read(&dir, "speed")?.trim().parse::<i64>().ok())
        .filter(|&mbit| mbit > 0)
        .map(|mbit| mbit as u64 * 1_000_000 / 8)
        .max()
}

/// How long a download rate sample is averaged over: long enough that a few chunks more or
/// less, or a shaper's burst, do not make a sample (and so the peak) overshoot the link.
pub(crate) const WINDOW: Duration = Duration::from_secs(3);

/// Bytes received per second over the last [`WINDOW`], from a running total.
#[derive(Debug, Default)]
pub(crate) struct Window {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

impl Window {
    /// Adds the total received by `now`; the rate over the window once it spans one.
    pub(crate) fn rate(&mut self, now: Instant, total: u64) -> Option<f64> {
        self.samples.push_back((now, total));
        while (self.samples.get(1)).is_some_and(|&(t, _)| now.duration_since(t) >= WINDOW) {
            self.samples.pop_front();
        }
        let &(since, before) = self.samples.front()?;
        let span = now.duration_since(since);
        (span >= WINDOW).then(|| total.saturating_sub(before) as f64 / span.as_secs_f64())
    }
}

/// The learned upload and download capacities of this agent's links.
#[derive(Debug)]
pub(crate) struct Learned {
    up: Mutex<Peak>,
    down: Mutex<Peak>,
    /// The configured limits, bytes/s (0: none).
    up_limit: u64,
    down_limit: u64,
}

impl Learned {
    pub(crate) fn new(up_limit: u64, down_limit: u64) -> Self {
        Self {
            up: Mutex::default(),
            down: Mutex::default(),
            up_limit,
            down_limit,
        }
    }

    /// A sample of each direction, bytes/s (`None`: nothing measured).
    pub(crate) fn observe(&self, now: Instant, up: Option<f64>, down: Option<f64>) {
        for (peak, sample) in [(&self.up, up), (&self.down, down)] {
            if let Some(sample) = sample {
                let mut peak = peak.lock().unwrap_or_else(|e| e.into_inner());
                peak.observe(now, sample);
            }
        }
    }

    /// (upload, download) bytes/s, each at most its configured limit; 0 where not learned.
    pub(crate) fn capacities(&self, now: Instant) -> (u64, u64) {
        let get = |m: &Mutex<Peak>, limit: u64| {
            let v = m.lock().unwrap_or_else(|e| e.into_inner()).value_at(now) as u64;
            if limit > 0 { v.min(limit) } else { v }
        };
        (
            get(&self.up, self.up_limit),
            get(&self.down, self.down_limit),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    #[test]
    fn the_fastest_interface_that_is_up_gives_the_hint() {
        let root = tempfile::tempdir().expect("tempdir");
        let nic = |name: &str, state: &str, speed: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).expect("dir");
            std::fs::write(dir.join("operstate"), format!("{state}\n")).expect("state");
            if !speed.is_empty() {
                std::fs::write(dir.join("speed"), format!("{speed}\n")).expect("speed");
            }
        };
        assert_eq!(nic_speed(root.path()), None, "no interfaces");
        nic("lo", "unknown", "");
        nic("veth0", "up", "-1");
        nic("ifb0", "down", "");
        assert_eq!(nic_speed(root.path()), None, "none reports a speed");
        nic("eth0", "up", "25000");
        nic("eth1", "down", "100000");
        nic("eth2", "up", "10000");
        assert_eq!(
            nic_speed(root.path()),
            Some(3_125_000_000),
            "25 Gbit/s, the fastest up"
        );
    }

    #[test]
    fn the_download_rate_is_averaged_over_the_window() {
        let mut w = Window::default();
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        assert_eq!(w.rate(at(0), 0), None);
        // A burst of 8 MB in the first half second, then 1 MB per half second.
        assert_eq!(
            w.rate(at(500), 8_000_000),
            None,
            "the window is not full yet"
        );
        let mut total = 8_000_000;
        let mut last = None;
        for i in 2..=12 {
            total += 1_000_000;
            last = w.rate(at(500 * i), total);
        }
        // Over the last 3 s: 6 MB, whatever the burst was.
        assert_eq!(last, Some(2.0 * MB));
    }

    #[test]
    fn the_peak_is_learned_capped_by_the_limit_and_fades() {
        let l = Learned::new(0, 20_000_000);
        let t = Instant::now();
        assert_eq!(l.capacities(t), (0, 0), "nothing learned yet");
        l.observe(t, Some(10.0 * MB), Some(5.0 * MB));
        l.observe(t, Some(25.0 * MB), None);
        l.observe(t, Some(12.0 * MB), Some(30.0 * MB));
        l.observe(t, Some(1_000.0), Some(0.0));
        assert_eq!(
            l.capacities(t),
            (25_000_000, 20_000_000),
            "the highest samples; download at its limit; trickles ignored"
        );
        // One half-life later the peak is half; a new sample above that replaces it.
        let later = t + HALF_LIFE;
        assert_eq!(l.capacities(later).0, 12_500_000);
        l.observe(later, Some(15.0 * MB), None);
        assert_eq!(l.capacities(later).0, 15_000_000);
    }
}
