//! The discrete-event engine: hosts, their stores and downloads, a fluid model of the
//! network, the control plane, and the three ways of choosing sources (Shoal's planner, one
//! origin for everyone, a random mesh).
//!
//! Time advances in fixed steps ([`Params::tick`]). In each step every flow (one source
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
    Event, HostId, PickerConfig, RackId, Time, ZoneId,
};
use shoal_proto::Digest;

use crate::spec::{Fault, Spec};

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

fn blob_id(b: u32) -> BlobId {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&b.to_be_bytes());
    bytes[31] = 0x5c;
    BlobId(Digest::from_bytes(bytes))
}

fn blob_index(id: BlobId) -> u32 {
    let b = id.0.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn mix(a: u64, b: u64) -> u64 {
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
    Crash(u32),
    Restart(u32),
    CoordDown(Duration),
    CoordUp,
    Heartbeats,
    Progress,
    StallCheck,
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
}

struct Coord {
    assigner: Assigner,
    up: bool,
    epoch: u32,
    last_heard: Vec<Option<Time>>,
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
    /// Random mesh: members of each blob's swarm, in join order.
    swarm: Vec<Vec<u32>>,
    rng: SmallRng,
    unfinished: usize,
    out: Outcome,
    /// `SHOAL_SIM_DEBUG` set: print the network's state every simulated second.
    debug: bool,
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
            })
            .collect();
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
            up: true,
            epoch: 0,
            last_heard: vec![None; spec.hosts.len()],
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
            swarm: vec![Vec::new(); spec.blobs.len()],
            rng: SmallRng::seed_from_u64(mix(spec.seed, 0x51_4d)),
            unfinished,
            debug: std::env::var_os("SHOAL_SIM_DEBUG").is_some(),
            out: empty_outcome(strategy),
            active: Vec::new(),
            demand: Vec::new(),
            alloc_a: Vec::new(),
            alloc_b: Vec::new(),
            order: Vec::new(),
            spent: Vec::new(),
        };
        if let Some(c) = &mut sim.coord {
            for b in 0..spec.blobs.len() as u32 {
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
            sim.at(Time::ZERO + h.arrival, Ev::Arrive(i as u32));
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
            while let Some(entry) = self.events.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let ev = entry.remove();
                self.out.events += 1;
                self.handle(ev);
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

    // ---- control plane (Shoal) ----

    /// The agent (re)opens its session: HostUp, then its inventory.
    fn announce(&mut self, h: u32) {
        let s = &self.spec.hosts[h as usize];
        self.send(
            h,
            Event::HostUp {
                host: HostId(h),
                zone: ZoneId(s.zone),
                rack: RackId(s.rack),
                upload_bps: s.up_bps as u64,
                download_bps: s.down_bps as u64,
            },
        );
        let inventory: Vec<(u32, u32, bool)> = (self.hosts[h as usize].store.iter())
            .filter(|(_, c)| c.count() > 0)
            .map(|(b, c)| (*b, c.count(), c.is_full()))
            .collect();
        for (b, chunks, complete) in inventory {
            self.send(
                h,
                Event::Holds {
                    host: HostId(h),
                    blob: blob_id(b),
                    chunks,
                    complete,
                },
            );
        }
    }

    /// A deploy job asks for `b` on `h` (through the coordinator's API, not the agent).
    fn job_want(&mut self, h: u32, b: u32) {
        let Some(c) = &self.coord else { return };
        let epoch = c.epoch;
        let t = self.now + self.spec.params.control_latency;
        self.at(
            t,
            Ev::ToCoord {
                epoch,
                from: None,
                event: Event::Want {
                    blob: blob_id(b),
                    host: HostId(h),
                    priority: 0,
                },
            },
        );
    }

    /// An agent message over its session; lost if the coordinator is down.
    fn send(&mut self, h: u32, event: Event) {
        let Some(c) = &self.coord else { return };
        if !c.up || !self.hosts[h as usize].alive {
            return;
        }
        let epoch = c.epoch;
        let t = self.now + self.spec.params.control_latency;
        self.at(
            t,
            Ev::ToCoord {
                epoch,
                from: Some(h),
                event,
            },
        );
    }

    fn coordinator_receive(&mut self, epoch: u32, from: Option<u32>, event: Event) {
        let now = self.now;
        let Some(c) = &mut self.coord else { return };
        if !c.up || c.epoch != epoch {
            return;
        }
        if let Some(h) = from {
            c.last_heard[h as usize] = Some(now);
            let up = matches!(event, Event::HostUp { .. });
            c.assigner.handle(now, event);
            if !up {
                c.assigner.handle(now, Event::Heartbeat { host: HostId(h) });
            }
        } else {
            c.assigner.handle(now, event);
        }
        self.drain_commands();
    }

    fn coordinator_timers(&mut self) {
        let now = self.now;
        let Some(c) = &mut self.coord else { return };
        if !c.up {
            return;
        }
        if c.assigner.poll_timeout().is_some_and(|t| t <= now) {
            c.assigner.handle_timeout(now);
            self.drain_commands();
        }
    }

    fn drain_commands(&mut self) {
        let now = self.now;
        let lease = self.spec.params.lease;
        let latency = self.spec.params.control_latency;
        let Some(c) = &mut self.coord else { return };
        let mut out = Vec::new();
        let mut bad = Vec::new();
        while let Some(command) = c.assigner.poll_command() {
            let host = command.host();
            let heard = c.last_heard[host.0 as usize];
            if heard.is_none_or(|t| now.saturating_since(t) >= lease) {
                bad.push(format!("order {command:?} to a host whose lease expired"));
            }
            let stripes = match &command {
                Command::Fetch { blob, sources, .. }
                | Command::UpdateSources { blob, sources, .. } => (sources.iter())
                    .map(|s| (s.0, c.assigner.stripe(*blob, host, *s).unwrap_or((0, 1))))
                    .collect(),
                Command::Cancel { .. } => Vec::new(),
            };
            if std::env::var_os("SHOAL_SIM_TRACE").is_some() {
                eprintln!("{now:?} {command:?}");
            }
            out.push((command, stripes));
        }
        let epoch = c.epoch;
        for (command, stripes) in out {
            self.at(
                now + latency,
                Ev::ToAgent {
                    epoch,
                    command,
                    stripes,
                },
            );
        }
        for b in bad {
            self.violation(b);
        }
    }

    fn coordinator_up(&mut self) {
        let seed = self.spec.seed;
        let Some(c) = &mut self.coord else { return };
        c.epoch += 1;
        c.up = true;
        c.assigner = new_assigner(self.spec, mix(seed, u64::from(c.epoch)));
        c.last_heard.iter_mut().for_each(|t| *t = None);
        for b in 0..self.spec.blobs.len() as u32 {
            c.assigner.handle(
                self.now,
                Event::BlobKnown {
                    blob: blob_id(b),
                    size: self.spec.blobs[b as usize],
                    chunk_count: self.spec.chunk_count(b),
                },
            );
        }
        // Agents reconnect and report; the job records still want what is not done.
        for h in 0..self.hosts.len() as u32 {
            if self.hosts[h as usize].alive {
                self.announce(h);
            }
            if self.hosts[h as usize].arrived {
                let pending: Vec<u32> = self.hosts[h as usize].pending.iter().copied().collect();
                for b in pending {
                    self.job_want(h, b);
                }
            }
        }
    }

    fn agent_receive(&mut self, epoch: u32, command: Command, stripes: Vec<(u32, (u32, u32))>) {
        let Some(c) = &self.coord else { return };
        let h = command.host().0;
        // Orders from a coordinator session that has since broken never arrive.
        if !c.up || c.epoch != epoch || !self.hosts[h as usize].alive {
            return;
        }
        match command {
            Command::Fetch { blob, sources, .. } | Command::UpdateSources { blob, sources, .. } => {
                let b = blob_index(blob);
                if !self.hosts[h as usize].downloads.contains_key(&b) && !self.start_download(h, b)
                {
                    // Already complete here: say so again.
                    self.send(
                        h,
                        Event::Done {
                            host: HostId(h),
                            blob,
                        },
                    );
                    return;
                }
                let want: BTreeSet<u32> = sources.iter().map(|s| s.0).collect();
                let have: Vec<u32> = self.hosts[h as usize].downloads[&b]
                    .sources
                    .keys()
                    .copied()
                    .collect();
                for s in have {
                    if !want.contains(&s) {
                        self.remove_source(h, b, s);
                    }
                }
                for (s, stripe) in stripes {
                    self.add_source(h, b, s, Some(stripe));
                }
                self.refill(h, b);
            }
            Command::Cancel { blob, .. } => {
                self.drop_download(h, blob_index(blob));
            }
        }
    }

    fn report_progress(&mut self, h: u32) {
        if !self.hosts[h as usize].alive {
            return;
        }
        let mut reports = Vec::new();
        for (b, d) in &mut self.hosts[h as usize].downloads {
            let chunks = d.picker.have().count();
            if chunks != d.reported {
                d.reported = chunks;
                reports.push((*b, chunks));
            }
        }
        for (b, chunks) in reports {
            self.send(
                h,
                Event::Holds {
                    host: HostId(h),
                    blob: blob_id(b),
                    chunks,
                    complete: false,
                },
            );
        }
    }

    fn check_planner(&mut self) {
        let Some(c) = &self.coord else { return };
        if !c.up {
            return;
        }
        if let Err(e) = c.assigner.check_invariants() {
            self.violation(format!("planner invariant: {e}"));
        }
    }

    // ---- random mesh ----

    /// Asks the "tracker" for 5–10 random live members of the swarm and connects both ways.
    fn mesh_announce(&mut self, h: u32, b: u32) {
        let candidates: Vec<u32> = (self.swarm[b as usize].iter())
            .copied()
            .filter(|&p| p != h && self.hosts[p as usize].alive)
            .filter(|p| {
                !self.hosts[h as usize].downloads[&b].sources.contains_key(p)
                    && !self.hosts[h as usize].downloads[&b].banned.contains(p)
            })
            .collect();
        let k = self.rng.random_range(5..=10usize).min(candidates.len());
        let picked = rand::seq::index::sample(&mut self.rng, candidates.len(), k);
        let mut peers: Vec<u32> = picked.iter().map(|i| candidates[i]).collect();
        peers.sort_unstable();
        for p in peers {
            self.add_source(h, b, p, None);
            let reverse = (self.hosts[p as usize].downloads.get(&b))
                .is_some_and(|d| !d.sources.contains_key(&h) && !d.banned.contains(&h));
            if reverse {
                self.add_source(p, b, h, None);
                self.refill(p, b);
            }
        }
        self.refill(h, b);
    }

    // ---- the agent's downloads ----

    /// Starts a download of `b` on `h` unless the store has it complete. Returns whether a
    /// download now runs.
    fn start_download(&mut self, h: u32, b: u32) -> bool {
        let n = self.spec.chunk_count(b);
        let seed = mix(self.spec.seed, (u64::from(h) << 32) | u64::from(b));
        let host = &mut self.hosts[h as usize];
        if host.downloads.contains_key(&b) {
            return true;
        }
        let have = host.store.entry(b).or_insert_with(|| ChunkSet::empty(n));
        if have.is_full() {
            return false;
        }
        let picker = ChunkPicker::new(
            have.clone(),
            mix(seed, self.out.events),
            PickerConfig {
                chunk_size: self.spec.params.chunk_size as u32,
                random_first: env_or(
                    "SHOAL_SIM_RANDOM_FIRST",
                    PickerConfig::default().random_first,
                ),
                initial_window: env_or("SHOAL_SIM_WINDOW", PickerConfig::default().initial_window),
                min_window: env_or("SHOAL_SIM_MIN_WINDOW", PickerConfig::default().min_window),
                ..PickerConfig::default()
            },
        );
        host.downloads.insert(
            b,
            Dl {
                picker,
                sources: BTreeMap::new(),
                banned: BTreeSet::new(),
                reported: have.count(),
            },
        );
        true
    }

    fn rtt(&self, a: u32, b: u32) -> Duration {
        let (x, y) = (&self.hosts[a as usize], &self.hosts[b as usize]);
        let p = &self.spec.params;
        if x.zone != y.zone {
            p.rtt_cross_zone
        } else if x.rack != y.rack {
            p.rtt_zone
        } else {
            p.rtt_rack
        }
    }

    fn add_source(&mut self, h: u32, b: u32, s: u32, stripe: Option<(u32, u32)>) {
        if s == h {
            return;
        }
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        if d.banned.contains(&s) {
            return;
        }
        if d.sources.contains_key(&s) {
            // Known source: only its stripe may have changed.
            if let Some((stripe, stripes)) = stripe {
                d.picker.set_stripe(HostId(s), stripe, stripes);
            }
            return;
        }
        let n = self.spec.chunk_count(b);
        let has = (self.hosts[s as usize].store.get(&b))
            .filter(|_| self.hosts[s as usize].alive)
            .cloned()
            .unwrap_or_else(|| ChunkSet::empty(n));
        let flow = Flow {
            src: s,
            dst: h,
            blob: b,
            rtt: self.rtt(s, h),
            queue: VecDeque::new(),
            head_left: 0.0,
            last_progress: self.now,
            stall_reported: false,
        };
        let id = match self.free_flows.pop() {
            Some(id) => {
                self.flows[id] = Some(flow);
                id
            }
            None => {
                self.flows.push(Some(flow));
                self.flows.len() - 1
            }
        };
        self.hosts[s as usize].out.push(id);
        let d = self.hosts[h as usize]
            .downloads
            .get_mut(&b)
            .expect("checked");
        d.sources.insert(s, id);
        d.picker.add_source(HostId(s), has);
        if let Some((stripe, stripes)) = stripe {
            d.picker.set_stripe(HostId(s), stripe, stripes);
        }
    }

    fn remove_flow(&mut self, id: usize) {
        if let Some(f) = self.flows[id].take() {
            let out = &mut self.hosts[f.src as usize].out;
            if let Some(pos) = out.iter().position(|&x| x == id) {
                out.swap_remove(pos);
            }
            self.free_flows.push(id);
        }
    }

    fn remove_source(&mut self, h: u32, b: u32, s: u32) {
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        let Some(id) = d.sources.remove(&s) else {
            return;
        };
        d.picker.remove_source(HostId(s));
        self.remove_flow(id);
    }

    fn drop_download(&mut self, h: u32, b: u32) {
        let Some(d) = self.hosts[h as usize].downloads.remove(&b) else {
            return;
        };
        self.out.duplicate_requests += d.picker.stats().duplicate_requests;
        self.out.wasted_chunks += d.picker.stats().wasted_chunks;
        for &id in d.sources.values() {
            self.remove_flow(id);
        }
    }

    fn chunk_bytes(&self, b: u32, i: ChunkIndex) -> f64 {
        let size = self.spec.blobs[b as usize];
        let c = self.spec.params.chunk_size;
        (size - u64::from(i.0) * c).min(c) as f64
    }

    /// Hands out requests up to each source's window.
    fn refill(&mut self, h: u32, b: u32) {
        self.refill_from(h, b, None);
    }

    /// Hands out requests up to the window of `only` (every source if `None`).
    fn refill_from(&mut self, h: u32, b: u32, only: Option<u32>) {
        let now = self.now;
        let size = self.spec.blobs[b as usize];
        let chunk = self.spec.params.chunk_size;
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        for (&s, &id) in &d.sources {
            if only.is_some_and(|o| o != s) {
                continue;
            }
            let Some(f) = self.flows[id].as_mut() else {
                continue;
            };
            while let Some(i) = d.picker.next_request(now, HostId(s)) {
                if f.queue.is_empty() {
                    f.head_left = (size - u64::from(i.0) * chunk).min(chunk) as f64;
                    f.last_progress = now;
                }
                f.queue.push_back((i, now + f.rtt));
            }
        }
    }

    /// A chunk finished arriving over `flow`: verify, store, announce, continue.
    fn chunk_arrived(&mut self, id: usize, i: ChunkIndex) {
        let Some(f) = self.flows[id].as_ref() else {
            return;
        };
        let (s, h, b) = (f.src, f.dst, f.blob);
        let now = self.now;
        let bytes = self.chunk_bytes(b, i);
        let corrupt = self.hosts[s as usize].corrupt;
        let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) else {
            return;
        };
        if corrupt {
            // The digest does not match the manifest: drop it, never use the source again.
            self.out.rejected_chunks += 1;
            d.picker.on_chunk_failed(now, HostId(s), i);
            d.banned.insert(s);
            self.remove_source(h, b, s);
            match self.strategy {
                Strategy::Shoal => self.send(
                    h,
                    Event::SourceCorrupt {
                        host: HostId(h),
                        blob: blob_id(b),
                        source: HostId(s),
                    },
                ),
                Strategy::RandomMesh => {
                    if self.hosts[h as usize].downloads[&b].sources.len() < 5 {
                        self.mesh_announce(h, b);
                    }
                }
                Strategy::SingleOrigin => {}
            }
            self.refill(h, b);
            return;
        }
        let others = d.picker.on_chunk_done(now, HostId(s), i, bytes as u64);
        for o in others {
            if let Some(&oid) = d.sources.get(&o.0)
                && let Some(of) = self.flows[oid].as_mut()
                && let Some(pos) = of.queue.iter().position(|(c, _)| *c == i)
            {
                of.queue.remove(pos);
                if pos == 0
                    && let Some(&(next, _)) = of.queue.front()
                {
                    let size = self.spec.blobs[b as usize];
                    let chunk = self.spec.params.chunk_size;
                    of.head_left = (size - u64::from(next.0) * chunk).min(chunk) as f64;
                }
            }
        }
        let complete = d.picker.is_complete();
        self.store(h, b, i, s);
        if complete {
            self.finish_download(h, b);
        } else {
            self.refill(h, b);
        }
    }

    /// Stores a verified chunk and tells the host's downloaders of `b` that it has it.
    fn store(&mut self, h: u32, b: u32, i: ChunkIndex, from: u32) {
        if self.hosts[from as usize].corrupt {
            self.out.stored_corrupt += 1;
            self.violation(format!(
                "host{h} stored chunk {} of blob {b} from a corrupt source",
                i.0
            ));
        }
        let n = self.spec.chunk_count(b);
        let host = &mut self.hosts[h as usize];
        let have = host.store.entry(b).or_insert_with(|| ChunkSet::empty(n));
        if !have.insert(i) {
            return;
        }
        let downstream: Vec<u32> = (host.out.iter())
            .filter_map(|&id| self.flows[id].as_ref())
            .filter(|f| f.blob == b)
            .map(|f| f.dst)
            .collect();
        for t in downstream {
            if let Some(d) = self.hosts[t as usize].downloads.get_mut(&b) {
                d.picker.source_have(HostId(h), [i]);
            }
            // Only what `h` offers changed for `t`.
            self.refill_from(t, b, Some(h));
        }
    }

    fn finish_download(&mut self, h: u32, b: u32) {
        self.drop_download(h, b);
        let host = &mut self.hosts[h as usize];
        host.pending.remove(&b);
        if host.pending.is_empty() && host.finished_at.is_none() {
            host.finished_at = Some(self.now);
            self.unfinished -= 1;
        }
        if self.strategy == Strategy::Shoal {
            self.send(
                h,
                Event::Done {
                    host: HostId(h),
                    blob: blob_id(b),
                },
            );
        }
    }

    fn stall_check(&mut self) {
        let now = self.now;
        let timeout = self.spec.params.stall_timeout;
        let mut stalled = Vec::new();
        for f in self.flows.iter_mut().flatten() {
            let waiting = f.queue.front().is_some_and(|(_, ready)| *ready <= now);
            if waiting && !f.stall_reported && now.saturating_since(f.last_progress) >= timeout {
                f.stall_reported = true;
                stalled.push((f.dst, f.blob, f.src));
            }
        }
        for (h, b, s) in stalled {
            if !self.hosts[h as usize].alive {
                continue;
            }
            self.remove_source(h, b, s);
            match self.strategy {
                Strategy::Shoal => self.send(
                    h,
                    Event::SourceStalled {
                        host: HostId(h),
                        blob: blob_id(b),
                        source: HostId(s),
                    },
                ),
                Strategy::RandomMesh => {
                    if let Some(d) = self.hosts[h as usize].downloads.get_mut(&b) {
                        d.banned.insert(s);
                        if d.sources.len() < 5 {
                            self.mesh_announce(h, b);
                        }
                    }
                }
                Strategy::SingleOrigin => {}
            }
            self.refill(h, b);
        }
    }

    // ---- the network ----

    /// One step of the fluid model; returns the chunks that completed, in flow order.
    fn step(&mut self) -> Vec<(usize, ChunkIndex)> {
        let now = self.now;
        let dt = self.tick().as_secs_f64();
        self.active.clear();
        self.demand.clear();
        for (id, f) in self.flows.iter().enumerate() {
            let Some(f) = f else { continue };
            if !self.hosts[f.src as usize].alive || !self.hosts[f.dst as usize].alive {
                continue;
            }
            let mut bytes = 0.0;
            let mut first = true;
            for &(i, ready) in &f.queue {
                if ready > now {
                    break;
                }
                bytes += if first {
                    f.head_left
                } else {
                    let size = self.spec.blobs[f.blob as usize];
                    let c = self.spec.params.chunk_size;
                    (size - u64::from(i.0) * c).min(c) as f64
                };
                first = false;
            }
            if bytes > 0.0 {
                self.active.push(id);
                self.demand.push(bytes / dt);
            }
        }
        let n = self.active.len();
        if n == 0 {
            return Vec::new();
        }
        let src: Vec<u32> = (self.active.iter())
            .map(|&id| self.flows[id].as_ref().map_or(0, |f| f.src))
            .collect();
        let dst: Vec<u32> = (self.active.iter())
            .map(|&id| self.flows[id].as_ref().map_or(0, |f| f.dst))
            .collect();
        let up: Vec<f64> = self.hosts.iter().map(|h| h.up).collect();
        let down: Vec<f64> = self.hosts.iter().map(|h| h.down).collect();
        self.alloc_a.resize(n, 0.0);
        self.alloc_b.resize(n, 0.0);
        // Round 1: sources share their uplink, targets their downlink.
        water_fill(&src, &up, &self.demand, &mut self.alloc_a, &mut self.order);
        water_fill(
            &dst,
            &down,
            &self.alloc_a,
            &mut self.alloc_b,
            &mut self.order,
        );
        // Round 2: what targets could not take goes back to the sources' other flows.
        let demand2: Vec<f64> = (self.demand.iter().zip(&self.alloc_a).zip(&self.alloc_b))
            .map(|((&d, &a), &b)| if b < a * (1.0 - 1e-9) { b } else { d })
            .collect();
        water_fill(&src, &up, &demand2, &mut self.alloc_a, &mut self.order);
        water_fill(
            &dst,
            &down,
            &self.alloc_a,
            &mut self.alloc_b,
            &mut self.order,
        );
        // Nobody sends more than its uplink.
        self.spent.clear();
        self.spent.resize(self.hosts.len(), 0.0);
        for (&s, &rate) in src.iter().zip(&self.alloc_b) {
            self.spent[s as usize] += rate;
        }
        let over: Vec<u32> = (0..self.hosts.len() as u32)
            .filter(|&h| self.spent[h as usize] > self.hosts[h as usize].up * (1.0 + 1e-6))
            .collect();
        for h in over {
            self.violation(format!("host{h} sends above its uplink"));
        }
        let mut done = Vec::new();
        let size_of = |blob: u32, i: ChunkIndex| {
            let size = self.spec.blobs[blob as usize];
            let c = self.spec.params.chunk_size;
            (size - u64::from(i.0) * c).min(c) as f64
        };
        let mut egress = 0.0;
        let mut moved = 0.0;
        for k in 0..n {
            let id = self.active[k];
            let mut budget = self.alloc_b[k] * dt;
            let f = self.flows[id].as_mut().expect("active");
            if budget > 0.0 {
                f.last_progress = now;
                f.stall_reported = false;
                moved += budget;
                if self.hosts[f.src as usize].origin {
                    egress += budget;
                }
            }
            while budget > 0.0 {
                let Some(&(i, ready)) = f.queue.front() else {
                    break;
                };
                if ready > now {
                    break;
                }
                let take = budget.min(f.head_left);
                f.head_left -= take;
                budget -= take;
                if f.head_left <= 0.5 {
                    f.queue.pop_front();
                    done.push((id, i));
                    if let Some(&(next, _)) = f.queue.front() {
                        f.head_left = size_of(f.blob, next);
                    }
                }
            }
        }
        if self.debug && now.as_micros() % 100_000 < self.tick().as_micros() as u64 {
            let downloading: Vec<&Host> = (self.hosts.iter())
                .filter(|h| h.alive && !h.downloads.is_empty())
                .collect();
            let want_rate: f64 = downloading.iter().map(|h| h.down).sum();
            let dls: usize = downloading.iter().map(|h| h.downloads.len()).sum();
            let srcs: usize = (downloading.iter())
                .flat_map(|h| h.downloads.values())
                .map(|d| d.sources.len())
                .sum();
            let no_src = (downloading.iter())
                .flat_map(|h| h.downloads.values())
                .filter(|d| d.sources.is_empty())
                .count();
            let origin_rate: f64 = (0..n)
                .filter(|&k| self.hosts[src[k] as usize].origin)
                .map(|k| self.alloc_b[k])
                .sum();
            let origin_flows = (0..n)
                .filter(|&k| self.hosts[src[k] as usize].origin)
                .count();
            let origin_up: f64 = self.hosts.iter().filter(|h| h.origin).map(|h| h.up).sum();
            eprintln!(
                "  origins send {:.0}% of their uplink over {origin_flows} active flows",
                100.0 * origin_rate / origin_up
            );
            eprintln!(
                "{now:?}: flows {} active {n} moving {:.2} GB/s of {:.2} downlink; downloads {dls} sources/dl {:.1} without {no_src}",
                self.flows.len() - self.free_flows.len(),
                moved / dt / 1e9,
                want_rate / 1e9,
                srcs as f64 / dls.max(1) as f64
            );
        }
        self.out.origin_egress += egress.round() as u64;
        self.out.bytes_moved += moved.round() as u64;
        done
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

fn empty_outcome(strategy: Strategy) -> Outcome {
    Outcome {
        strategy,
        finished: Vec::new(),
        live: Vec::new(),
        healthy: Vec::new(),
        end: 0.0,
        origin_egress: 0,
        bytes_moved: 0,
        rejected_chunks: 0,
        stored_corrupt: 0,
        violations: Vec::new(),
        duplicate_requests: 0,
        wasted_chunks: 0,
        planner: None,
        events: 0,
        steps: 0,
    }
}

/// Max-min shares of each host's capacity among its flows: flow `k` belongs to host
/// `key[k]` and asks for `demand[k]`; `out[k]` gets at most that. Flows are served smallest
/// demand first, each the lesser of its demand and an equal split of what is left.
fn water_fill(key: &[u32], cap: &[f64], demand: &[f64], out: &mut [f64], order: &mut Vec<u32>) {
    order.clear();
    order.extend(0..key.len() as u32);
    order.sort_unstable_by(|&a, &b| {
        (key[a as usize].cmp(&key[b as usize]))
            .then(demand[a as usize].total_cmp(&demand[b as usize]))
            .then(a.cmp(&b))
    });
    let mut start = 0;
    while start < order.len() {
        let host = key[order[start] as usize];
        let mut end = start;
        while end < order.len() && key[order[end] as usize] == host {
            end += 1;
        }
        let mut left = cap[host as usize];
        for (j, &k) in order[start..end].iter().enumerate() {
            let share = left / (end - start - j) as f64;
            let give = demand[k as usize].min(share).max(0.0);
            out[k as usize] = give;
            left -= give;
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn water_fill_is_max_min() {
        let key = [0, 0, 0, 1];
        let cap = [9.0, 5.0];
        let demand = [1.0, 10.0, 10.0, 10.0];
        let mut out = [0.0; 4];
        water_fill(&key, &cap, &demand, &mut out, &mut Vec::new());
        assert_eq!(out, [1.0, 4.0, 4.0, 5.0]);
    }

    #[test]
    fn blob_ids_round_trip() {
        for b in [0, 1, 499, u32::MAX] {
            assert_eq!(blob_index(blob_id(b)), b);
        }
    }
}
