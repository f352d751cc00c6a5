//! The discrete-event engine: hosts, their stores and downloads, a fluid model of the
//! network, the control plane, and the three ways of choosing sources (Shoal's planner, one
//! origin for everyone, a random mesh).
//!
//! Time advances in fixed steps ([`crate::spec::Params::tick`]). In each step every flow (one source
//! serving one download) with a request ready is given a rate by max-min sharing of the
//! source's uplink and the target's downlink (two rounds of water-filling), bytes move, and
//! chunks that complete are verified, stored and announced; control messages and faults are
//! timestamped events handled at the start of the step they fall in. Everything iterates in
//! a fixed order and all randomness comes from the one seed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_planner::{
    Assigner, AssignerConfig, AssignerStats, BlobId, ChunkIndex, ChunkPicker, ChunkSet, Command,
    Event, HostId, PickerConfig, RackId, SeedCommand, Seeder, SeederConfig, SeederStats, Time,
    ZoneId,
};
use shoal_proto::Digest;

use crate::spec::{Fault, Spec};

mod agent;
mod control;
mod network;
mod seeding;

/// Who decides which hosts a download pulls from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Strategy {
    /// Shoal: the coordinator's Assigner plans sources, agents pick chunks with the
    /// ChunkPicker and the stripes the Assigner gives.
    Shoal,
    /// Every host pulls every blob from the origins that hold it.
    SingleOrigin,
    /// BitTorrent/Kraken-like: each download connects to 5–10 random members of the blob's
    /// swarm (connections go both ways), rarest-first, no central planning.
    RandomMesh,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Shoal => "shoal",
            Strategy::SingleOrigin => "single origin",
            Strategy::RandomMesh => "random mesh",
        }
    }
}

/// How hard to check while running.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Checks {
    /// Cheap checks only (caps per step, verification on store, leases on orders).
    #[default]
    Cheap,
    /// Also the planner's full invariant check after every event: for small scales.
    EveryEvent,
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub strategy: Strategy,
    /// Per host that wants something: when it finished (seconds), if it did.
    pub finished: Vec<Option<f64>>,
    /// Hosts that want something and are alive at the end (crashed and never restarted
    /// ones are not).
    pub live: Vec<bool>,
    /// Hosts that want something and had no fault of their own (never crashed, full-speed
    /// NIC): completion percentiles are taken over these, since no planner can make a
    /// host with a tenth of the bandwidth finish on time.
    pub healthy: Vec<bool>,
    /// Simulated seconds when the run stopped.
    pub end: f64,
    /// Bytes sent by origin hosts (including any sent twice).
    pub origin_egress: u64,
    /// Bytes moved between hosts in all.
    pub bytes_moved: u64,
    /// Of those, bytes moved between hosts in different zones.
    pub cross_zone_bytes: u64,
    /// Chunks that failed verification and were dropped.
    pub rejected_chunks: u64,
    /// Chunks stored although their source served corrupt data: must be zero.
    pub stored_corrupt: u64,
    /// Violations of safety invariants, in the order found (empty when all held).
    pub violations: Vec<String>,
    /// Endgame duplicate requests and chunks that arrived twice.
    pub duplicate_requests: u64,
    pub wasted_chunks: u64,
    pub planner: Option<AssignerStats>,
    /// The coordinator's seeding decisions (blobs only external origins hold).
    pub seeding: Option<SeederStats>,
    /// Events and steps processed (the simulator's own cost).
    pub events: u64,
    pub steps: u64,
}

impl Outcome {
    /// Whether every live host that wants something finished.
    pub fn all_live_finished(&self) -> bool {
        self.finished
            .iter()
            .zip(&self.live)
            .all(|(f, live)| !live || f.is_some())
    }

    /// Latest finish over live hosts, if all finished.
    pub fn makespan(&self) -> Option<f64> {
        if !self.all_live_finished() {
            return None;
        }
        Some(
            (self.finished.iter().zip(&self.live))
                .filter(|(_, l)| **l)
                .filter_map(|(f, _)| *f)
                .fold(0.0, f64::max),
        )
    }

    /// Nearest-rank percentile of healthy hosts' completion times; unfinished ones count as
    /// never.
    pub fn percentile(&self, p: f64) -> f64 {
        let mut times: Vec<f64> = (self.finished.iter().zip(&self.healthy))
            .filter(|(_, ok)| **ok)
            .map(|(f, _)| f.unwrap_or(f64::INFINITY))
            .collect();
        if times.is_empty() {
            return 0.0;
        }
        times.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * times.len() as f64).ceil() as usize;
        times[rank.clamp(1, times.len()) - 1]
    }
}

/// Runs `spec` under `strategy`.
pub fn run(spec: &Spec, strategy: Strategy, checks: Checks) -> Outcome {
    let mut sim = Sim::new(spec, strategy, checks);
    sim.run();
    sim.outcome()
}

pub(crate) fn blob_id(b: u32) -> BlobId {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&b.to_be_bytes());
    bytes[31] = 0x5c;
    BlobId(Digest::from_bytes(bytes))
}

pub(crate) fn blob_index(id: BlobId) -> u32 {
    let b = id.0.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn mix(a: u64, b: u64) -> u64 {
    // SplitMix64 of a combination: decorrelates per-download seeds.
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Debug)]
enum Ev {
    Arrive(u32),
    /// A message to the coordinator, sent on session `epoch`.
    ToCoord {
        epoch: u32,
        from: Option<u32>,
        event: Event,
    },
    /// A command to an agent from coordinator `epoch`, with the stripe of each source.
    ToAgent {
        epoch: u32,
        command: Command,
        stripes: Vec<(u32, (u32, u32))>,
    },
    /// A seed order (or its cancellation) to an agent from coordinator `epoch`.
    SeedToAgent {
        epoch: u32,
        command: SeedCommand,
    },
    /// A seeder's report to the coordinator, sent on session `epoch`.
    SeedToCoord {
        epoch: u32,
        from: u32,
        report: SeedReport,
    },
    Crash(u32),
    Restart(u32),
    CoordDown(Duration),
    CoordUp,
    Heartbeats,
    Progress,
    StallCheck,
}

/// What a seeder tells the coordinator.
#[derive(Debug)]
enum SeedReport {
    /// It fetched `count` chunks from `first` from the origin (a range order).
    Range { blob: u32, first: u32, count: u32 },
    /// It fetched the whole blob, checked and registered it.
    Registered { blob: u32 },
}

/// One origin fetch of a seed order on its agent.
struct SeedFetch {
    flow: usize,
    first: u32,
    count: u32,
    got: u32,
    whole: bool,
}

struct Host {
    zone: u32,
    rack: u32,
    up: f64,
    down: f64,
    origin: bool,
    corrupt: bool,
    arrived: bool,
    alive: bool,
    /// Crashed and will not come back.
    gone: bool,
    store: BTreeMap<u32, ChunkSet>,
    downloads: BTreeMap<u32, Dl>,
    /// Wants not complete yet.
    pending: BTreeSet<u32>,
    finished_at: Option<Time>,
    /// Flows this host serves.
    out: Vec<usize>,
    /// An external origin: never an agent.
    external: bool,
    /// Origin fetches of its seed orders, by blob.
    seeding: BTreeMap<u32, SeedFetch>,
    /// Ranges it seeded, waiting in part files for the blob's order: (first, count).
    parts: BTreeMap<u32, Vec<(u32, u32)>>,
}

struct Dl {
    picker: ChunkPicker,
    sources: BTreeMap<u32, usize>,
    banned: BTreeSet<u32>,
    reported: u32,
}

struct Flow {
    src: u32,
    dst: u32,
    blob: u32,
    rtt: Duration,
    queue: VecDeque<(ChunkIndex, Time)>,
    head_left: f64,
    last_progress: Time,
    stall_reported: bool,
    /// An origin fetch of a seed order, not a peer download.
    seed: bool,
}

struct Coord {
    assigner: Assigner,
    /// The production seeding machine: who fetches blobs nobody holds from their origin.
    seeder: Seeder,
    /// Blobs whose manifest this coordinator knows.
    known: BTreeSet<u32>,
    up: bool,
    epoch: u32,
    last_heard: Vec<Option<Time>>,
    /// Hosts whose lease ran out, as the seeder was told.
    gone: Vec<bool>,
}

struct Sim<'a> {
    spec: &'a Spec,
    strategy: Strategy,
    checks: Checks,
    now: Time,
    seq: u64,
    events: BTreeMap<(Time, u64), Ev>,
    hosts: Vec<Host>,
    flows: Vec<Option<Flow>>,
    free_flows: Vec<usize>,
    coord: Option<Coord>,
    /// Inside one step's batch of events: nothing is drained until its end.
    batching: bool,
    /// Cold blobs whose manifest the coordinator persisted (registered whole, or verified by
    /// a download): known again after a coordinator restart.
    durable: BTreeSet<u32>,
    /// Random mesh: members of each blob's swarm, in join order.
    swarm: Vec<Vec<u32>>,
    rng: SmallRng,
    unfinished: usize,
    out: Outcome,
    /// `SHOAL_SIM_DEBUG` set: print the network's state every simulated second.
    debug: bool,
    /// `SHOAL_SIM_TRACE` set: print every order the planner makes.
    trace: bool,
    /// The agents' picker tunables (the defaults; `SHOAL_SIM_*` overrides for experiments).
    picker: PickerConfig,
    // Scratch for the bandwidth step.
    active: Vec<usize>,
    demand: Vec<f64>,
    alloc_a: Vec<f64>,
    alloc_b: Vec<f64>,
    order: Vec<u32>,
    spent: Vec<f64>,
}

impl<'a> Sim<'a> {
    fn new(spec: &'a Spec, strategy: Strategy, checks: Checks) -> Self {
        let mut hosts: Vec<Host> = (spec.hosts.iter())
            .map(|h| Host {
                zone: h.zone,
                rack: h.rack,
                up: h.up_bps,
                down: h.down_bps,
                origin: h.is_origin(),
                corrupt: false,
                arrived: false,
                alive: false,
                gone: false,
                store: (h.holds.iter())
                    .map(|&b| (b, ChunkSet::full(spec.chunk_count(b))))
                    .collect(),
                downloads: BTreeMap::new(),
                pending: h.wants.iter().copied().collect(),
                finished_at: None,
                out: Vec::new(),
                external: h.external,
                seeding: BTreeMap::new(),
                parts: BTreeMap::new(),
            })
            .collect();
        // External origins are up from the start and never join.
        for h in hosts.iter_mut().filter(|h| h.external) {
            h.arrived = true;
            h.alive = true;
        }
        for fault in &spec.faults {
            match *fault {
                Fault::Slow { host, factor } => {
                    let h = &mut hosts[host as usize];
                    h.up *= factor;
                    h.down *= factor;
                }
                Fault::Corrupt { host } => hosts[host as usize].corrupt = true,
                _ => {}
            }
        }
        let unfinished = hosts.iter().filter(|h| !h.pending.is_empty()).count();
        let p = &spec.params;
        let coord = (strategy == Strategy::Shoal).then(|| Coord {
            assigner: new_assigner(spec, 0),
            seeder: new_seeder(spec),
            known: BTreeSet::new(),
            up: true,
            epoch: 0,
            last_heard: vec![None; spec.hosts.len()],
            gone: vec![false; spec.hosts.len()],
        });
        let mut sim = Sim {
            spec,
            strategy,
            checks,
            now: Time::ZERO,
            seq: 0,
            events: BTreeMap::new(),
            hosts,
            flows: Vec::new(),
            free_flows: Vec::new(),
            coord,
            batching: false,
            durable: BTreeSet::new(),
            swarm: vec![Vec::new(); spec.blobs.len()],
            rng: SmallRng::seed_from_u64(mix(spec.seed, 0x51_4d)),
            unfinished,
            debug: std::env::var_os("SHOAL_SIM_DEBUG").is_some(),
            trace: std::env::var_os("SHOAL_SIM_TRACE").is_some(),
            picker: PickerConfig {
                chunk_size: spec.params.chunk_size as u32,
                random_first: env_or(
                    "SHOAL_SIM_RANDOM_FIRST",
                    PickerConfig::default().random_first,
                ),
                initial_window: env_or("SHOAL_SIM_WINDOW", PickerConfig::default().initial_window),
                min_window: env_or("SHOAL_SIM_MIN_WINDOW", PickerConfig::default().min_window),
                ..PickerConfig::default()
            },
            out: empty_outcome(strategy),
            active: Vec::new(),
            demand: Vec::new(),
            alloc_a: Vec::new(),
            alloc_b: Vec::new(),
            order: Vec::new(),
            spent: Vec::new(),
        };
        if let Some(c) = &mut sim.coord {
            for b in (0..spec.blobs.len() as u32).filter(|b| !spec.is_cold(*b)) {
                c.known.insert(b);
                c.assigner.handle(
                    Time::ZERO,
                    Event::BlobKnown {
                        blob: blob_id(b),
                        size: spec.blobs[b as usize],
                        chunk_count: spec.chunk_count(b),
                    },
                );
            }
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            if h.external {
                // A web seed for the random mesh from the start.
                for &b in &h.holds {
                    sim.swarm[b as usize].push(i as u32);
                }
            } else {
                sim.at(Time::ZERO + h.arrival, Ev::Arrive(i as u32));
            }
        }
        for fault in &spec.faults {
            match *fault {
                Fault::Crash { host, at, .. } => sim.at(Time::ZERO + at, Ev::Crash(host)),
                Fault::CoordinatorRestart { at, downtime } if strategy == Strategy::Shoal => {
                    sim.at(Time::ZERO + at, Ev::CoordDown(downtime))
                }
                _ => {}
            }
        }
        if strategy == Strategy::Shoal {
            sim.at(Time::ZERO + p.heartbeat, Ev::Heartbeats);
            sim.at(Time::ZERO + p.progress_interval, Ev::Progress);
        }
        sim.at(Time::from_millis(100), Ev::StallCheck);
        sim
    }

    fn at(&mut self, t: Time, ev: Ev) {
        self.seq += 1;
        self.events.insert((t, self.seq), ev);
    }

    fn violation(&mut self, what: String) {
        if self.out.violations.len() < 20 {
            self.out.violations.push(format!("{:?}: {what}", self.now));
        }
    }

    fn run(&mut self) {
        let tick = self.tick();
        let max = Time::ZERO + self.spec.params.max_time;
        loop {
            // The coordinator handles what reaches it in one step as one batch (as it
            // handles a job's targets): one command per changed download.
            if let Some(c) = &mut self.coord {
                c.assigner.begin_batch();
            }
            // The seeder's elections, too, wait for the whole batch of wants.
            self.batching = true;
            while let Some(entry) = self.events.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let ev = entry.remove();
                self.out.events += 1;
                self.handle(ev);
            }
            self.batching = false;
            if let Some(c) = &mut self.coord {
                c.assigner.end_batch();
                if c.up {
                    self.drain_commands();
                } else {
                    // Lost with the coordinator.
                    while c.assigner.poll_command().is_some() {}
                    while c.seeder.poll_command().is_some() {}
                    while c.seeder.poll_notice().is_some() {}
                }
            }
            self.coordinator_timers();
            if self.unfinished == 0 || self.now >= max {
                break;
            }
            let done = self.step();
            self.now += tick;
            self.out.steps += 1;
            for (flow, chunk) in done {
                self.chunk_arrived(flow, chunk);
            }
        }
    }

    /// The model's step. Single-origin runs are long and steady (thousands of hosts share
    /// one uplink for minutes), so they step at 20 ms at least.
    fn tick(&self) -> Duration {
        match self.strategy {
            Strategy::SingleOrigin => self.spec.params.tick.max(Duration::from_millis(20)),
            _ => self.spec.params.tick,
        }
    }

    fn outcome(mut self) -> Outcome {
        if self.debug {
            for (i, h) in self.hosts.iter().enumerate() {
                for b in &h.pending {
                    let planned = (self.coord.as_ref())
                        .and_then(|c| c.assigner.sources(blob_id(*b), HostId(i as u32)))
                        .map(<[HostId]>::to_vec);
                    let holders: Vec<(usize, u32, bool, usize)> = (self.hosts.iter().enumerate())
                        .filter_map(|(j, o)| {
                            o.store.get(b).map(|c| {
                                (
                                    j,
                                    c.count(),
                                    o.alive,
                                    self.coord
                                        .as_ref()
                                        .map_or(0, |c| c.assigner.uploads(HostId(j as u32))),
                                )
                            })
                        })
                        .filter(|x| x.1 > 0)
                        .collect();
                    eprintln!("  holders of {b}: {holders:?}");
                    eprintln!(
                        "unfinished: host{i} blob {b} alive {} download {:?} planned {planned:?}",
                        h.alive,
                        h.downloads.get(b).map(|d| (
                            d.picker.have().count(),
                            d.sources.keys().collect::<Vec<_>>()
                        )),
                    );
                }
            }
        }
        let mut out = std::mem::replace(&mut self.out, empty_outcome(self.strategy));
        for h in &self.hosts {
            for d in h.downloads.values() {
                out.duplicate_requests += d.picker.stats().duplicate_requests;
                out.wasted_chunks += d.picker.stats().wasted_chunks;
            }
        }
        for (i, spec) in self.spec.hosts.iter().enumerate() {
            if spec.wants.is_empty() {
                continue;
            }
            let h = &self.hosts[i];
            out.finished
                .push(h.finished_at.map(|t| t.as_micros() as f64 / 1e6));
            out.live.push(!h.gone);
            let faulty = self.spec.faults.iter().any(|f| match *f {
                Fault::Crash { host, .. } | Fault::Slow { host, .. } => host as usize == i,
                _ => false,
            });
            out.healthy.push(!faulty);
        }
        out.end = self.now.as_micros() as f64 / 1e6;
        out.planner = self.coord.as_ref().map(|c| c.assigner.stats().clone());
        out.seeding = (self.coord.as_ref())
            .filter(|_| (0..self.spec.blobs.len() as u32).any(|b| self.spec.is_cold(b)))
            .map(|c| c.seeder.stats().clone());
        out
    }

    // ---- events ----

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Arrive(h) => self.arrive(h),
            Ev::ToCoord { epoch, from, event } => self.coordinator_receive(epoch, from, event),
            Ev::ToAgent {
                epoch,
                command,
                stripes,
            } => self.agent_receive(epoch, command, stripes),
            Ev::SeedToAgent { epoch, command } => self.agent_seed(epoch, command),
            Ev::SeedToCoord {
                epoch,
                from,
                report,
            } => self.coordinator_seed_report(epoch, from, report),
            Ev::Crash(h) => self.crash(h),
            Ev::Restart(h) => self.restart(h),
            Ev::CoordDown(downtime) => {
                if let Some(c) = &mut self.coord {
                    c.up = false;
                    c.epoch += 1;
                }
                self.at(self.now + downtime, Ev::CoordUp);
            }
            Ev::CoordUp => self.coordinator_up(),
            Ev::Heartbeats => {
                for h in 0..self.hosts.len() as u32 {
                    if self.hosts[h as usize].alive {
                        self.send(h, Event::Heartbeat { host: HostId(h) });
                    }
                }
                self.at(self.now + self.spec.params.heartbeat, Ev::Heartbeats);
            }
            Ev::Progress => {
                for h in 0..self.hosts.len() as u32 {
                    self.report_progress(h);
                }
                self.at(self.now + self.spec.params.progress_interval, Ev::Progress);
            }
            Ev::StallCheck => {
                self.stall_check();
                self.at(self.now + Duration::from_millis(100), Ev::StallCheck);
            }
        }
        if self.checks == Checks::EveryEvent {
            self.check_planner();
        }
    }

    fn arrive(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        host.arrived = true;
        host.alive = true;
        let wants = self.spec.hosts[h as usize].wants.clone();
        match self.strategy {
            Strategy::Shoal => {
                self.announce(h);
                for &b in &wants {
                    self.job_want(h, b);
                }
            }
            Strategy::SingleOrigin => {
                for b in wants {
                    let origins: Vec<u32> = (0..self.spec.hosts.len() as u32)
                        .filter(|&o| self.spec.hosts[o as usize].holds.contains(&b))
                        .collect();
                    if self.start_download(h, b) {
                        for o in origins {
                            self.add_source(h, b, o, None);
                        }
                        self.refill(h, b);
                    }
                }
            }
            Strategy::RandomMesh => {
                for &b in &self.spec.hosts[h as usize].holds {
                    self.swarm[b as usize].push(h);
                }
                for b in wants {
                    if self.start_download(h, b) {
                        self.mesh_announce(h, b);
                    }
                    self.swarm[b as usize].push(h);
                }
            }
        }
    }

    fn crash(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        if !host.alive {
            return;
        }
        host.alive = false;
        let blobs: Vec<u32> = host.downloads.keys().copied().collect();
        for b in blobs {
            self.drop_download(h, b);
        }
        // Its origin fetches die with it, and the agent drops its part files on restart.
        self.drop_seed_fetches(h);
        self.hosts[h as usize].parts.clear();
        // Flows it served stop delivering; their downloaders find out by the stall timeout.
        let restart = self.spec.faults.iter().find_map(|f| match *f {
            Fault::Crash {
                host,
                restart_after,
                ..
            } if host == h => Some(restart_after),
            _ => None,
        });
        match restart.flatten() {
            Some(after) => self.at(self.now + after, Ev::Restart(h)),
            None => {
                let host = &mut self.hosts[h as usize];
                host.gone = true;
                if host.finished_at.is_none() && !host.pending.is_empty() {
                    self.unfinished -= 1;
                }
            }
        }
    }

    fn restart(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        host.alive = true;
        let pending: Vec<u32> = host.pending.iter().copied().collect();
        match self.strategy {
            Strategy::Shoal => self.announce(h),
            _ => {
                for b in pending {
                    if self.start_download(h, b) {
                        if self.strategy == Strategy::RandomMesh {
                            self.mesh_announce(h, b);
                        } else {
                            let origins: Vec<u32> = (0..self.spec.hosts.len() as u32)
                                .filter(|&o| self.spec.hosts[o as usize].holds.contains(&b))
                                .collect();
                            for o in origins {
                                self.add_source(h, b, o, None);
                            }
                            self.refill(h, b);
                        }
                    }
                }
            }
        }
    }
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn new_assigner(spec: &Spec, salt: u64) -> Assigner {
    let p = &spec.params;
    Assigner::new(
        AssignerConfig {
            max_sources: env_or("SHOAL_SIM_K", p.max_sources),
            max_uploads: p.max_uploads,
            lease: p.lease,
            ..AssignerConfig::default()
        },
        mix(spec.seed, salt),
    )
}

fn new_seeder(spec: &Spec) -> Seeder {
    let p = &spec.params;
    Seeder::new(SeederConfig {
        stripe_min_bytes: p.stripe_seed_min_bytes,
        max_seeders_per_blob: p.max_seeders_per_blob,
        chunk_size: p.chunk_size as u32,
        ..SeederConfig::default()
    })
}

fn empty_outcome(strategy: Strategy) -> Outcome {
    Outcome {
        strategy,
        finished: Vec::new(),
        live: Vec::new(),
        healthy: Vec::new(),
        end: 0.0,
        origin_egress: 0,
        bytes_moved: 0,
        cross_zone_bytes: 0,
        rejected_chunks: 0,
        stored_corrupt: 0,
        violations: Vec::new(),
        duplicate_requests: 0,
        wasted_chunks: 0,
        planner: None,
        seeding: None,
        events: 0,
        steps: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_ids_round_trip() {
        for b in [0, 1, 499, u32::MAX] {
            assert_eq!(blob_index(blob_id(b)), b);
        }
    }
}
