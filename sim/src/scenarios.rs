//! The named scenarios, each at full scale and as a `--quick` variant with the same goals.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::spec::{Fault, GBIT40, HostSpec, Params, SharedCpu, Spec};

/// Names accepted by [`build`], in the order `all` runs them.
pub const NAMES: [&str; 5] = ["seed-example", "kraken-bench", "peak", "faults", "cold"];

const MB: u64 = 1_000_000;
const GB: u64 = 1_000_000_000;

/// Hosts per rack and racks per zone of the modelled datacenter.
const RACK: u32 = 40;
const RACKS_PER_ZONE: u32 = 10;

/// A goal the run is judged by.
#[derive(Clone, Debug)]
pub enum Goal {
    /// Shoal's makespan ≤ this × the bound.
    Makespan(f64),
    /// Shoal's per-host completion percentile (e.g. 99.0) ≤ this × the bound.
    Percentile(f64, f64),
    /// Every live host finishes within this many simulated seconds.
    Within(f64),
    /// Origin egress ≤ this × the unique bytes.
    OriginEgress(f64),
    /// Every live host completes and nothing corrupt is stored.
    LiveCompleteNoCorruption,
    /// Shoal's p99 is below the random mesh's.
    BeatsMeshP99,
}

/// Builds scenario `name`, or says which names exist.
pub fn build(name: &str, quick: bool, seed: u64) -> Result<(Spec, Vec<Goal>), String> {
    let goals_mesh = |mut g: Vec<Goal>| {
        g.push(Goal::BeatsMeshP99);
        g
    };
    match name {
        "seed-example" => Ok((
            seed_example(quick, seed),
            goals_mesh(vec![Goal::Makespan(1.10)]),
        )),
        "kraken-bench" => Ok((
            kraken_bench(quick, seed),
            goals_mesh(vec![
                Goal::Percentile(99.0, 1.15),
                Goal::Percentile(99.9, 1.25),
            ]),
        )),
        "peak" => Ok((
            peak(quick, seed),
            goals_mesh(vec![
                Goal::Within(30.0),
                Goal::Makespan(1.25),
                Goal::OriginEgress(1.05),
            ]),
        )),
        "faults" => Ok((
            faults(quick, seed),
            goals_mesh(vec![Goal::LiveCompleteNoCorruption]),
        )),
        "cold" => Ok((
            cold(quick, seed),
            vec![Goal::LiveCompleteNoCorruption, Goal::OriginEgress(1.25)],
        )),
        "random-faults" => Ok((random_faults(seed), vec![Goal::LiveCompleteNoCorruption])),
        "netns" | "netns-known" => Ok((
            netns(seed, name == "netns-known", &NetnsShape::default()),
            vec![Goal::LiveCompleteNoCorruption],
        )),
        _ => Err(format!(
            "unknown scenario {name:?}: expected one of {}, random-faults, or all",
            NAMES.join(", ")
        )),
    }
}

fn host(index: u32, bps: f64, arrival: Duration) -> HostSpec {
    let rack = if std::env::var_os("SHOAL_SIM_FLAT").is_some() {
        0
    } else {
        index / RACK
    };
    HostSpec {
        zone: rack / RACKS_PER_ZONE,
        rack,
        up_bps: bps,
        down_bps: bps,
        arrival,
        holds: Vec::new(),
        wants: Vec::new(),
        external: false,
        announced_bps: None,
    }
}

/// One 5 GB blob from one origin host to 1,000 hosts (quick: 100).
fn seed_example(quick: bool, seed: u64) -> Spec {
    let n = if quick { 100 } else { 1_000 };
    let mut hosts = vec![host(0, GBIT40, Duration::ZERO)];
    hosts[0].holds = vec![0];
    for i in 1..=n {
        let mut h = host(i, GBIT40, Duration::ZERO);
        h.wants = vec![0];
        hosts.push(h);
    }
    Spec {
        name: "seed-example".into(),
        seed,
        hosts,
        blobs: vec![5 * GB],
        faults: Vec::new(),
        params: Params {
            tick: Duration::from_micros(250),
            ..Params::default()
        },
    }
}

/// Kraken's published benchmark: 2,600 hosts pull a 3 GB image of two layers at once, every
/// agent capped at 300 MB/s, five origins (quick: 260 hosts, 300 MB at 30 MB/s).
fn kraken_bench(quick: bool, seed: u64) -> Spec {
    let (n, scale) = if quick { (260, 10) } else { (2_600, 1) };
    let cap = 300.0 * MB as f64 / scale as f64;
    let layers = vec![2 * GB / scale, GB / scale];
    let mut hosts = Vec::new();
    for i in 0..5 {
        let mut o = host(i * RACK, GBIT40, Duration::ZERO);
        o.holds = vec![0, 1];
        hosts.push(o);
    }
    for i in 0..n {
        let mut h = host(i, cap, Duration::ZERO);
        h.wants = vec![0, 1];
        hosts.push(h);
    }
    Spec {
        name: "kraken-bench".into(),
        seed,
        hosts,
        blobs: layers,
        faults: Vec::new(),
        params: Params {
            tick: Duration::from_millis(1),
            ..Params::default()
        },
    }
}

/// Zipf(s) sampler over `n` items (item 0 most popular).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { cdf }
    }

    fn sample(&self, rng: &mut SmallRng) -> u32 {
        let x: f64 = rng.random();
        self.cdf.partition_point(|&c| c < x).min(self.cdf.len() - 1) as u32
    }
}

/// `hosts` hosts each pull `per_host` distinct blobs drawn Zipf(1.1) from a catalog of
/// `catalog` blobs of 100 MB–1 GB, seeded at `origins` origin hosts (each blob at one,
/// balanced by bytes), arriving uniformly over `arrivals`.
#[allow(clippy::too_many_arguments)]
fn catalog_workload(
    name: &str,
    seed: u64,
    hosts_n: u32,
    catalog: usize,
    per_host: usize,
    origins: u32,
    origin_bps: f64,
    arrivals: Duration,
) -> Spec {
    let mut rng = SmallRng::seed_from_u64(seed);
    let blobs: Vec<u64> = (0..catalog)
        .map(|_| rng.random_range(100 * MB..=GB))
        .collect();
    let zipf = Zipf::new(catalog, 1.1);
    let mut hosts = Vec::new();
    // One origin per zone.
    let mut load = vec![0u64; origins as usize];
    let mut origin_hosts: Vec<HostSpec> = (0..origins)
        .map(|i| {
            host(
                i * RACK * RACKS_PER_ZONE + (RACK - 1),
                origin_bps,
                Duration::ZERO,
            )
        })
        .collect();
    let mut by_size: Vec<u32> = (0..catalog as u32).collect();
    by_size.sort_by_key(|&b| std::cmp::Reverse(blobs[b as usize]));
    for b in by_size {
        let o = (0..origins as usize).min_by_key(|&o| load[o]).unwrap_or(0);
        load[o] += blobs[b as usize];
        origin_hosts[o].holds.push(b);
    }
    hosts.extend(origin_hosts);
    let span = arrivals.as_micros() as u64;
    for i in 0..hosts_n {
        let at = if span == 0 {
            0
        } else {
            rng.random_range(0..span)
        };
        let mut h = host(i, GBIT40, Duration::from_micros(at));
        while h.wants.len() < per_host.min(catalog) {
            let b = zipf.sample(&mut rng);
            if !h.wants.contains(&b) {
                h.wants.push(b);
            }
        }
        hosts.push(h);
    }
    Spec {
        name: name.into(),
        seed,
        hosts,
        blobs,
        faults: Vec::new(),
        params: Params::default(),
    }
}

/// 20,000 blob downloads: 2,000 hosts × 10 blobs from a catalog of 500 at 4 origins, hosts
/// arriving over 5 s. Quick: a tenth of the hosts, the catalog and the origins' links, so
/// the origins stay the bottleneck as at full scale.
fn peak(quick: bool, seed: u64) -> Spec {
    let (n, catalog, origin_bps) = if quick {
        (200, 50, GBIT40 / 10.0)
    } else {
        (2_000, 500, GBIT40)
    };
    catalog_workload(
        "peak",
        seed,
        n,
        catalog,
        10,
        4,
        origin_bps,
        Duration::from_secs(5),
    )
}

/// `peak` at 500 hosts (quick: 100) with 5% crashing mid-transfer (half restart), 2% slow,
/// one host serving corrupt chunks and one coordinator restart.
fn faults(quick: bool, seed: u64) -> Spec {
    let (n, catalog, origin_bps) = if quick {
        (100, 100, GBIT40 / 5.0)
    } else {
        (500, 500, GBIT40)
    };
    let mut spec = catalog_workload(
        "faults",
        seed,
        n,
        catalog,
        10,
        4,
        origin_bps,
        Duration::from_secs(5),
    );
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xfa_17);
    let origins = 4;
    let mut pool: Vec<u32> = (origins..origins + n).collect();
    let mut take = |k: usize, rng: &mut SmallRng| -> Vec<u32> {
        (0..k)
            .map(|_| pool.swap_remove(rng.random_range(0..pool.len())))
            .collect()
    };
    let crashed = take((n as usize * 5).div_ceil(100), &mut rng);
    let slow = take((n as usize * 2).div_ceil(100), &mut rng);
    let corrupt = take(1, &mut rng);
    for (k, &h) in crashed.iter().enumerate() {
        let arrival = spec.hosts[h as usize].arrival;
        let at = arrival + Duration::from_millis(rng.random_range(200..3_000));
        let restart_after =
            (k % 2 == 0).then(|| Duration::from_millis(rng.random_range(1_000..5_000)));
        spec.faults.push(Fault::Crash {
            host: h,
            at,
            restart_after,
        });
    }
    for h in slow {
        spec.faults.push(Fault::Slow {
            host: h,
            factor: 0.1,
        });
    }
    spec.faults.push(Fault::Corrupt { host: corrupt[0] });
    spec.faults.push(Fault::CoordinatorRestart {
        at: Duration::from_secs(4),
        downtime: Duration::from_secs(1),
    });
    spec
}

/// Blobs nobody holds yet, behind one external origin whose uplink (10 Gbit/s) is a
/// quarter of a host's: 400 hosts (quick: 40) arriving at once want a 2 GB blob, seeded in
/// ranges by four of them, and four 200 MB blobs, each seeded whole by one. One range
/// seeder dies mid-range and never comes back: its lease runs out and another host fetches
/// the range again. Every live host must finish, and the origin send little more than each
/// byte once.
fn cold(quick: bool, seed: u64) -> Spec {
    let n = if quick { 40 } else { 400 };
    let mut origin = host(0, GBIT40 / 4.0, Duration::ZERO);
    origin.external = true;
    origin.holds = vec![0, 1, 2, 3, 4];
    let mut hosts = vec![origin];
    for i in 1..=n {
        let mut h = host(i, GBIT40, Duration::ZERO);
        h.wants = vec![0, 1, 2, 3, 4];
        hosts.push(h);
    }
    Spec {
        name: "cold".into(),
        seed,
        hosts,
        blobs: vec![2 * GB, 200 * MB, 200 * MB, 200 * MB, 200 * MB],
        // Host 2 is the second of the 2 GB blob's four range seeders (the Seeder elects
        // the first ready waiting hosts); its 500 MB range takes about 3 s at its share
        // of the origin.
        faults: vec![Fault::Crash {
            host: 2,
            at: Duration::from_secs(1),
            restart_after: None,
        }],
        params: Params {
            tick: Duration::from_millis(1),
            ..Params::default()
        },
    }
}

/// The real-network benchmark's shape (`benches/src/bin/netns.rs`, whose options these
/// mirror): a blob on host 0, `targets` hosts that want it, every link `rate_mbit` both ways
/// but the last `slow` targets' at half that, and the machine's CPU shared by all of them.
#[derive(Clone, Debug, PartialEq)]
pub struct NetnsShape {
    pub targets: u32,
    pub size_mib: u64,
    pub rate_mbit: f64,
    pub slow: u32,
    /// `None`: CPU to spare (the model before it met the benchmark).
    pub cpu: Option<SharedCpu>,
}

/// CPU seconds per GB moved between the benchmark's hosts: the whole machine's busy CPU over
/// the transfer (the figure in brackets in its CPU column) of `distribute` at N = 8, 256
/// MiB, 200 Mbit/s on the 2-core machine, 2026-12-05 (`docs/BENCHMARKS.md`, "the simulator
/// meets the benchmark"). It is not a constant of nature: the same machine spent 9.3-9.8 per
/// GB at N = 16 (the more saturated, the more packets each wakeup handles), so pass the run's
/// own figure with `--cpu-s-per-gb` to predict another shape.
pub const NETNS_CPU_SECS_PER_GB: f64 = 12.0;

impl Default for NetnsShape {
    fn default() -> Self {
        Self {
            targets: 8,
            size_mib: 256,
            rate_mbit: 200.0,
            slow: 0,
            cpu: Some(SharedCpu {
                cores: 2.0,
                secs_per_byte: NETNS_CPU_SECS_PER_GB / 1e9,
            }),
        }
    }
}

/// The real-network benchmark's run of `shape`. With `known` false the agents announce what
/// an agent without configured rates does (10 Gbit/s), as in that run; its measured makespan
/// is what this must predict (`docs/BENCHMARKS.md`).
pub fn netns(seed: u64, known: bool, shape: &NetnsShape) -> Spec {
    let rate = shape.rate_mbit * 1e6 / 8.0;
    let announced = (!known).then_some(shoal_proto_unlimited());
    let mut hosts = Vec::new();
    for i in 0..=shape.targets {
        let slow = i > shape.targets.saturating_sub(shape.slow);
        let mut h = host(i, if slow { rate / 2.0 } else { rate }, Duration::ZERO);
        h.zone = 0;
        h.rack = 0;
        h.announced_bps = announced;
        if i == 0 {
            h.holds = vec![0];
        } else {
            h.wants = vec![0];
        }
        hosts.push(h);
    }
    Spec {
        name: if known { "netns-known" } else { "netns" }.into(),
        seed,
        hosts,
        blobs: vec![shape.size_mib << 20],
        faults: Vec::new(),
        params: Params {
            tick: Duration::from_micros(200),
            shared_cpu: shape.cpu,
            ..Params::default()
        },
    }
}

/// What an agent without configured rates announces (`shoal_agent::config`).
fn shoal_proto_unlimited() -> f64 {
    1_250_000_000.0
}

/// Tens of hosts with random faults of every kind, for the deterministic fault test.
pub fn random_faults(seed: u64) -> Spec {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x7e57);
    let n = rng.random_range(20..=40u32);
    let catalog = rng.random_range(3..=8usize);
    let origins = 2;
    let mut spec = catalog_workload(
        "random-faults",
        seed,
        n,
        catalog,
        rng.random_range(1..=3usize),
        origins,
        GBIT40,
        Duration::from_millis(rng.random_range(0..2_000)),
    );
    // 1 Gbit/s NICs and 32–256 MB blobs: transfers take seconds, so the faults land
    // mid-transfer, and a run is still only a few thousand chunks.
    for b in &mut spec.blobs {
        *b = rng.random_range(32 * MB..=256 * MB);
    }
    for h in &mut spec.hosts {
        h.up_bps = 125.0e6;
        h.down_bps = 125.0e6;
    }
    spec.params.tick = Duration::from_millis(1);
    let mut pool: Vec<u32> = (origins..origins + n).collect();
    for _ in 0..rng.random_range(0..=4) {
        let h = pool.swap_remove(rng.random_range(0..pool.len()));
        let restart_after = rng
            .random_bool(0.5)
            .then(|| Duration::from_millis(rng.random_range(100..3_000)));
        spec.faults.push(Fault::Crash {
            host: h,
            at: Duration::from_millis(rng.random_range(200..4_000)),
            restart_after,
        });
    }
    for _ in 0..rng.random_range(0..=2) {
        let h = pool.swap_remove(rng.random_range(0..pool.len()));
        spec.faults.push(Fault::Slow {
            host: h,
            factor: 0.1,
        });
    }
    if rng.random_bool(0.6) {
        let h = pool.swap_remove(rng.random_range(0..pool.len()));
        spec.faults.push(Fault::Corrupt { host: h });
    }
    if rng.random_bool(0.5) {
        spec.faults.push(Fault::CoordinatorRestart {
            at: Duration::from_millis(rng.random_range(200..4_000)),
            downtime: Duration::from_millis(rng.random_range(10..1_500)),
        });
    }
    spec.params.max_time = Duration::from_secs(120);
    spec
}
