//! What a simulation runs: the modelled datacenter, the blobs, who wants what and when, the
//! faults, and the model's constants. Built by [`crate::scenarios`] from a seed.

use std::time::Duration;

use shoal_planner::ChunkIndex;

/// Bytes per second of a 40 Gbit/s NIC.
pub const GBIT40: f64 = 5.0e9;

/// One host of the modelled datacenter.
#[derive(Clone, Debug)]
pub struct HostSpec {
    pub zone: u32,
    pub rack: u32,
    /// NIC capacity each way, bytes per second.
    pub up_bps: f64,
    pub down_bps: f64,
    /// When the host joins (seconds from the start).
    pub arrival: Duration,
    /// Blobs it holds complete from the start: an origin (a seeding host) for them.
    pub holds: Vec<u32>,
    /// Blobs it must download.
    pub wants: Vec<u32>,
    /// Not an agent but an external origin (an HTTP server or a registry) with `holds`:
    /// it never joins the coordinator, which does not know its blobs' manifests; under
    /// Shoal the planner's `Seeder` elects agents to fetch them from it (whole, or in
    /// ranges), as production does. The baselines fetch from it like from any origin.
    pub external: bool,
    /// The capacity its agent announces to the planner each way, if not its NIC's: an
    /// agent with no rate configured announces 10 Gbit/s, whatever its link.
    pub announced_bps: Option<f64>,
}

impl HostSpec {
    pub fn is_origin(&self) -> bool {
        !self.holds.is_empty()
    }
}

/// A fault injected at a point in simulated time.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The host dies at once (no goodbye: the coordinator learns it from the lease) and, if
    /// `restart_after` is set, comes back with its store intact after that long.
    Crash {
        host: u32,
        at: Duration,
        restart_after: Option<Duration>,
    },
    /// The host's NIC runs at `factor` of its speed each way, from the start.
    Slow { host: u32, factor: f64 },
    /// Every chunk the host serves fails verification, from the start.
    Corrupt { host: u32 },
    /// The coordinator process restarts: its planner state is lost and rebuilt from what
    /// agents report when they reconnect, and from the durable job records.
    CoordinatorRestart { at: Duration, downtime: Duration },
}

/// The model's constants. Defaults describe the production agent and coordinator.
#[derive(Clone, Debug)]
pub struct Params {
    /// Step of the bandwidth model. Requests and chunk completions are resolved per step.
    pub tick: Duration,
    /// Bytes per chunk (the manifest's chunk size).
    pub chunk_size: u64,
    /// Round-trip times by distance.
    pub rtt_rack: Duration,
    pub rtt_zone: Duration,
    pub rtt_cross_zone: Duration,
    /// One-way delay of a message between an agent and the coordinator.
    pub control_latency: Duration,
    /// How often an agent reports download progress (the agent's `PROGRESS_EVERY`).
    pub progress_interval: Duration,
    /// Agent heartbeat interval and the coordinator's lease.
    pub heartbeat: Duration,
    pub lease: Duration,
    /// A source that delivers nothing for this long while requests wait is reported
    /// stalled and dropped (QUIC's idle timeout in the agent).
    pub stall_timeout: Duration,
    /// Give up simulating at this simulated time.
    pub max_time: Duration,
    /// Assigner fan-out and fan-in (the coordinator's `max_sources`, `max_uploads`);
    /// the planner's defaults.
    pub max_sources: usize,
    pub max_uploads: usize,
    /// Seeding of blobs only external origins hold (the coordinator's
    /// `stripe_seed_min_bytes`, `max_seeders_per_blob`); the planner's defaults.
    pub stripe_seed_min_bytes: u64,
    pub max_seeders_per_blob: usize,
    /// Every host shares one machine's CPU (the real-network benchmark: all its hosts are
    /// namespaces of one machine), or `None`: each host has CPU to spare, as in production.
    pub shared_cpu: Option<SharedCpu>,
}

/// A CPU that all hosts share, as the real-network benchmark's namespaces share one
/// machine's cores: moving a byte from one host to another costs `secs_per_byte` of CPU in
/// all (the sender's and the receiver's, user and kernel), and no more than `cores` seconds
/// of CPU pass per second. When the links would move bytes faster than that, every flow
/// slows by the same factor (the kernel's scheduler shares the cores between the processes
/// roughly evenly). The cost is calibrated from the benchmark's own "CPU seconds per
/// delivered GB" (`docs/BENCHMARKS.md`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedCpu {
    pub cores: f64,
    pub secs_per_byte: f64,
}

impl SharedCpu {
    /// The most bytes per second all flows together can move.
    pub fn max_bytes_per_sec(&self) -> f64 {
        self.cores / self.secs_per_byte
    }
}

impl Default for Params {
    fn default() -> Self {
        let planner = shoal_planner::AssignerConfig::default();
        let seeder = shoal_planner::SeederConfig::default();
        Self {
            tick: Duration::from_micros(500),
            chunk_size: 1 << 20,
            rtt_rack: Duration::from_micros(20),
            rtt_zone: Duration::from_micros(100),
            rtt_cross_zone: Duration::from_micros(1_000),
            control_latency: Duration::from_millis(1),
            progress_interval: Duration::from_millis(500),
            heartbeat: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            stall_timeout: shoal_planner::PickerConfig::default().stall_timeout,
            max_time: Duration::from_secs(3_000),
            max_sources: planner.max_sources,
            max_uploads: planner.max_uploads,
            stripe_seed_min_bytes: seeder.stripe_min_bytes,
            max_seeders_per_blob: seeder.max_seeders_per_blob,
            shared_cpu: None,
        }
    }
}

/// Everything one run needs. The same `Spec` and seed give the same result, bit for bit.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub seed: u64,
    pub hosts: Vec<HostSpec>,
    /// Blob sizes in bytes, indexed by blob number.
    pub blobs: Vec<u64>,
    pub faults: Vec<Fault>,
    pub params: Params,
}

impl Spec {
    pub fn chunk_count(&self, blob: u32) -> u32 {
        self.blobs[blob as usize].div_ceil(self.params.chunk_size) as u32
    }

    /// Bytes of chunk `index` of `blob` (the last one may be short).
    pub fn chunk_bytes(&self, blob: u32, index: ChunkIndex) -> f64 {
        let c = self.params.chunk_size;
        (self.blobs[blob as usize] - u64::from(index.0) * c).min(c) as f64
    }

    /// Whether only external origins hold `blob` at the start: under Shoal it must be
    /// seeded (its manifest is unknown until an agent has read it).
    pub fn is_cold(&self, blob: u32) -> bool {
        let mut holders = self.hosts.iter().filter(|h| h.holds.contains(&blob));
        holders.clone().next().is_some() && holders.all(|h| h.external)
    }

    /// Bytes of blob downloads (every want counted once).
    pub fn download_bytes(&self) -> u64 {
        (self.hosts.iter())
            .flat_map(|h| &h.wants)
            .map(|&b| self.blobs[b as usize])
            .sum()
    }

    pub fn downloads(&self) -> usize {
        self.hosts.iter().map(|h| h.wants.len()).sum()
    }

    /// Bytes of the distinct blobs someone wants: what has to leave the origins at least once.
    pub fn unique_bytes(&self) -> u64 {
        let mut wanted = vec![false; self.blobs.len()];
        for &b in self.hosts.iter().flat_map(|h| &h.wants) {
            wanted[b as usize] = true;
        }
        (self.blobs.iter().zip(&wanted))
            .filter(|(_, w)| **w)
            .map(|(s, _)| s)
            .sum()
    }

    /// The physical lower bound on the makespan, in seconds: no host finishes before it
    /// arrived plus its bytes in ÷ its downlink, and no schedule gets the unique bytes out
    /// faster than all origins' uplinks together. The larger of the two.
    pub fn bound(&self) -> f64 {
        let per_host = (self.hosts.iter())
            .filter(|h| !h.wants.is_empty())
            .map(|h| {
                let bytes: u64 = h.wants.iter().map(|&b| self.blobs[b as usize]).sum();
                h.arrival.as_secs_f64() + bytes as f64 / h.down_bps
            })
            .fold(0.0, f64::max);
        let egress: f64 = (self.hosts.iter())
            .filter(|h| h.is_origin())
            .map(|h| h.up_bps)
            .sum();
        let origin = if egress > 0.0 {
            self.unique_bytes() as f64 / egress
        } else {
            f64::INFINITY
        };
        per_host.max(origin)
    }

    /// The bound for one host alone (arrival + bytes ÷ downlink), seconds.
    pub fn host_bound(&self, host: usize) -> f64 {
        let h = &self.hosts[host];
        let bytes: u64 = h.wants.iter().map(|&b| self.blobs[b as usize]).sum();
        h.arrival.as_secs_f64() + bytes as f64 / h.down_bps
    }
}
