//! The model's machinery: events, the shards' state threads taking their turns, and the
//! agents as the loadgen pretends them (see the parent module for what is real and what is
//! modelled).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_planner::{
    Assigner, AssignerConfig, Command, Event, HostId, RackId, Time, Turn, Turns, Waiting, ZoneId,
};

use super::{LoadOutcome, LoadSpec};
use crate::engine::{blob_id, blob_index, mix};

/// A message on its way to, or waiting for, a shard's state thread.
#[derive(Clone, Copy, Debug)]
enum Msg {
    Steady {
        host: u32,
    },
    Progress {
        host: u32,
        blob: u32,
        chunks: u32,
    },
    Done {
        host: u32,
        blob: u32,
    },
    /// A Distribute's part: this shard's blobs, to every agent but their holders.
    Distribute,
}

#[derive(Clone, Copy, Debug)]
enum Ev {
    Arrive { shard: u32, msg: Msg },
    Connect { host: u32 },
    Load { host: u32 },
    Beat { host: u32 },
    Order { host: u32, blob: u32 },
    Progress { host: u32, blob: u32 },
    Fetched { host: u32, blob: u32 },
}

struct Shard {
    assigner: Assigner,
    turns: Turns,
    queue: VecDeque<(Time, Msg)>,
    /// The Distribute's targets still to be wanted: (host, blob), host-major.
    wanting: VecDeque<(u32, u32)>,
    blobs: Vec<u32>,
    /// When the thread is free, and when it next chooses a turn.
    free_at: Time,
    decide_at: Time,
    busy_ns: u64,
}

/// A running download on an agent: its progress ticks stop when it ends.
#[derive(Clone, Copy)]
struct Running {
    started: Time,
    ends: Time,
}

struct Model<'a> {
    spec: &'a LoadSpec,
    now: Time,
    seq: u64,
    /// Pending events in time order, ties in the order they were scheduled (as the
    /// engine's).
    events: BTreeMap<(Time, u64), Ev>,
    shards: Vec<Shard>,
    shard_of: Vec<u32>,
    running: Vec<Vec<Option<Running>>>,
    /// Completions handled per blob, and the blobs every target of which completed.
    done: Vec<u32>,
    blobs_done: u32,
    t0: Time,
    job_done: Option<Time>,
    /// Decides the heartbeat ticks exactly one interval after the last message, and how
    /// late each order reaches its agent.
    rng: SmallRng,
    /// When each agent last sent on each shard's session: `host * shards + shard`.
    last_sent: Vec<Time>,
    /// When each agent's sessions opened: its timers tick from there.
    connected: Vec<Time>,
    out: LoadOutcome,
}

/// The loadgen agent's Load interval (`LOAD_EVERY`) and the coordinator's heartbeat interval.
const LOAD_EVERY: Duration = Duration::from_secs(5);
const BEAT_EVERY: Duration = Duration::from_secs(2);

/// The shard a blob belongs to: rendezvous hashing of its number over the shards' numbers.
fn shard_for(blob: u32, shards: u32) -> u32 {
    (0..shards)
        .max_by_key(|s| mix(u64::from(blob), u64::from(*s) + 1))
        .unwrap_or(0)
}

fn ns(us: f64) -> u64 {
    (us * 1e3).round() as u64
}

fn from_ns(ns: u64) -> Duration {
    Duration::from_nanos(ns)
}

/// The holder of blob `b`, the one agent that is not its target.
fn holder(b: u32, agents: u32) -> u32 {
    b % agents
}

/// Runs a checked `spec`.
pub(super) fn run(spec: &LoadSpec) -> LoadOutcome {
    let mut model = Model::new(spec);
    model.run();
    model.out
}

impl<'a> Model<'a> {
    fn new(spec: &'a LoadSpec) -> Self {
        let shard_of: Vec<u32> = (0..spec.blobs).map(|b| shard_for(b, spec.shards)).collect();
        let mut shards: Vec<Shard> = (0..spec.shards)
            .map(|s| Shard {
                assigner: Assigner::new(
                    AssignerConfig {
                        // The coordinator's: its lease (10 s) times 4, the rest the defaults.
                        lease: Duration::from_secs(40),
                        ..AssignerConfig::default()
                    },
                    mix(spec.seed, u64::from(s)),
                ),
                turns: Turns::new(spec.turns.clone()),
                queue: VecDeque::new(),
                wanting: VecDeque::new(),
                blobs: (0..spec.blobs)
                    .filter(|b| shard_of[*b as usize] == s)
                    .collect(),
                free_at: Time::ZERO,
                decide_at: Time::ZERO,
                busy_ns: 0,
            })
            .collect();
        let bps = spec.link_bps as u64;
        for shard in &mut shards {
            let a = &mut shard.assigner;
            for h in 0..spec.agents {
                a.handle(
                    Time::ZERO,
                    Event::HostUp {
                        host: HostId(h),
                        zone: ZoneId(0),
                        rack: RackId(h / 40),
                        upload_bps: bps,
                        download_bps: bps,
                    },
                );
            }
            for &b in &shard.blobs {
                a.handle(
                    Time::ZERO,
                    Event::BlobKnown {
                        blob: blob_id(b),
                        size: spec.blob_size,
                        chunk_count: spec.chunk_count(),
                    },
                );
                a.handle(
                    Time::ZERO,
                    Event::Holds {
                        host: HostId(holder(b, spec.agents)),
                        blob: blob_id(b),
                        chunks: spec.chunk_count(),
                        complete: true,
                    },
                );
            }
            while a.poll_command().is_some() {}
        }
        let t0 = Time::ZERO + spec.join_spread + spec.steady_before;
        let connected: Vec<Time> = (0..spec.agents)
            .map(|h| {
                Time::ZERO
                    + spec
                        .join_spread
                        .mul_f64(f64::from(h) / f64::from(spec.agents))
            })
            .collect();
        let mut model = Model {
            spec,
            now: Time::ZERO,
            seq: 0,
            events: BTreeMap::new(),
            shards,
            shard_of,
            running: vec![vec![None; spec.blobs as usize]; spec.agents as usize],
            done: vec![0; spec.blobs as usize],
            blobs_done: 0,
            t0,
            job_done: None,
            rng: SmallRng::seed_from_u64(mix(spec.seed, 0xc0_17)),
            last_sent: vec![Time::ZERO; (spec.agents * spec.shards) as usize],
            connected: connected.clone(),
            out: LoadOutcome {
                waits_us: vec![Vec::new(); spec.shards as usize],
                distribute_turn: Duration::ZERO,
                last_order: Duration::ZERO,
                job_done: None,
                busy: Vec::new(),
                orders: 0,
                updates: 0,
                heartbeats: 0,
            },
        };
        for (host, at) in (0..spec.agents).zip(connected) {
            model.at(at, Ev::Connect { host });
        }
        for s in 0..spec.shards {
            if !model.shards[s as usize].blobs.is_empty() {
                let msg = Msg::Distribute;
                model.at(t0 + spec.latency, Ev::Arrive { shard: s, msg });
            }
        }
        model
    }

    fn at(&mut self, t: Time, ev: Ev) {
        self.seq += 1;
        self.events.insert((t, self.seq), ev);
    }

    fn run(&mut self) {
        let max = Time::ZERO + self.spec.max_time;
        loop {
            let next_event = self.events.keys().next().map(|(t, _)| *t);
            let (s, decide) = (self.shards.iter().enumerate())
                .map(|(i, s)| (i, s.decide_at))
                .min_by_key(|(_, t)| *t)
                .expect("one shard at least");
            let now = match next_event {
                Some(t) if t <= decide => t,
                _ => decide,
            };
            if now > max {
                break;
            }
            if let Some(done) = self.job_done
                && now > done + Duration::from_millis(100)
            {
                break;
            }
            self.now = now;
            if next_event == Some(now) {
                if let Some((_, ev)) = self.events.pop_first() {
                    self.handle(ev);
                }
            } else {
                self.turn(s);
            }
        }
        self.out.job_done = self.job_done.map(|t| t - self.t0);
        self.out.waits_us.iter_mut().for_each(|w| w.sort_unstable());
        self.out.busy = self.shards.iter().map(|s| from_ns(s.busy_ns)).collect();
    }

    /// Agent `host` sends `msg` on its session to `shard`.
    fn send(&mut self, host: u32, shard: u32, msg: Msg) {
        self.last_sent[(host * self.spec.shards + shard) as usize] = self.now;
        let t = self.now + self.spec.latency;
        self.at(t, Ev::Arrive { shard, msg });
    }

    fn handle(&mut self, ev: Ev) {
        let spec = self.spec;
        match ev {
            Ev::Arrive { shard, msg } => {
                let now = self.now;
                let s = &mut self.shards[shard as usize];
                s.queue.push_back((now, msg));
                if s.decide_at > now {
                    s.decide_at = now.max(s.free_at);
                }
            }
            Ev::Connect { host } => {
                // Hello, the inventory and the first Load; the timers start.
                for shard in 0..spec.shards {
                    for _ in 0..3 {
                        self.send(host, shard, Msg::Steady { host });
                    }
                }
                self.at(self.now + LOAD_EVERY, Ev::Load { host });
                self.at(self.now + BEAT_EVERY, Ev::Beat { host });
            }
            Ev::Load { host } => {
                for shard in 0..spec.shards {
                    self.send(host, shard, Msg::Steady { host });
                }
                self.at(self.now + LOAD_EVERY, Ev::Load { host });
            }
            Ev::Beat { host } => {
                for shard in 0..spec.shards {
                    let last = self.last_sent[(host * spec.shards + shard) as usize];
                    let quiet = self.now - last;
                    let beat = quiet > BEAT_EVERY
                        || (quiet == BEAT_EVERY && self.rng.random_bool(spec.beat_borderline));
                    if beat {
                        self.out.heartbeats += 1;
                        self.send(host, shard, Msg::Steady { host });
                    }
                }
                self.at(self.now + BEAT_EVERY, Ev::Beat { host });
            }
            Ev::Order { host, blob } => {
                if self.running[host as usize][blob as usize].is_some() {
                    return; // Ordered again: the download goes on.
                }
                let ends = self.now + spec.fetch_time();
                let started = self.now;
                self.running[host as usize][blob as usize] = Some(Running { started, ends });
                self.at(ends, Ev::Fetched { host, blob });
                // The agent's progress tick, which runs from its session's start.
                let period = spec.progress_interval.as_micros().max(1) as u64;
                let since = self.now.as_micros() - self.connected[host as usize].as_micros();
                let first = self.now + Duration::from_micros(period - since % period);
                if first < ends {
                    self.at(first, Ev::Progress { host, blob });
                }
            }
            Ev::Progress { host, blob } => {
                let Some(r) = self.running[host as usize][blob as usize] else {
                    return;
                };
                if self.now >= r.ends {
                    return;
                }
                let share =
                    (self.now - r.started).as_secs_f64() / (r.ends - r.started).as_secs_f64();
                let chunks = (share * f64::from(spec.chunk_count())) as u32;
                let msg = Msg::Progress { host, blob, chunks };
                self.send(host, self.shard_of[blob as usize], msg);
                self.at(
                    self.now + spec.progress_interval,
                    Ev::Progress { host, blob },
                );
            }
            Ev::Fetched { host, blob } => {
                self.send(host, self.shard_of[blob as usize], Msg::Done { host, blob });
            }
        }
    }

    /// The shard's state thread takes its next turn at `self.now`.
    fn turn(&mut self, shard: usize) {
        let now = self.now;
        let spec = self.spec;
        let c = &spec.costs;
        let s = &mut self.shards[shard];
        let timer_due = match s.wanting.is_empty() {
            false => Time::ZERO,
            true => s.assigner.poll_timeout().unwrap_or(Time::MAX),
        };
        let waiting = Waiting {
            read: false,
            oldest_message: s.queue.front().map(|(t, _)| now - *t),
            timer_due,
        };
        let queued_before = s.assigner.queued_wants();
        // CPU nanoseconds spent, and the wall time they take.
        let mut spent = ns(c.turn);
        let wall = |cpu: u64| (cpu as f64 * spec.cpu_slowdown) as u64;
        let mut wanted = 0;
        let mut timer = false;
        match s.turns.next(now, waiting) {
            Turn::Idle { wake } => {
                // Woken by an arrival earlier than that (see `handle`).
                s.decide_at = wake.max(now + Duration::from_micros(1));
                return;
            }
            Turn::Read => unreachable!("the model sends no reads"),
            Turn::Timer => {
                timer = true;
                s.assigner.begin_batch();
                wanted += want_some(s, spec, now);
                if s.assigner.poll_timeout().is_some_and(|t| t <= now) {
                    s.assigner.handle_timeout(now);
                }
                s.assigner.end_batch();
            }
            Turn::Batch { allowance, count } => {
                s.assigner.begin_batch();
                let allowance = allowance.as_nanos() as u64;
                let mut taken = 0;
                while wall(spent) < allowance
                    && taken < count
                    && let Some((arrived, msg)) = s.queue.pop_front()
                {
                    taken += 1;
                    let at = now + from_ns(wall(spent));
                    if !matches!(msg, Msg::Distribute) && at >= self.t0 {
                        let waited = (at - arrived).as_micros();
                        let waited = u32::try_from(waited).unwrap_or(u32::MAX);
                        self.out.waits_us[shard].push(waited);
                    }
                    let a = &mut s.assigner;
                    spent += match msg {
                        Msg::Steady { host } => {
                            a.handle(now, Event::Heartbeat { host: HostId(host) });
                            ns(c.steady)
                        }
                        Msg::Progress { host, blob, chunks } => {
                            let (host, blob) = (HostId(host), blob_id(blob));
                            a.handle(
                                now,
                                Event::Holds {
                                    host,
                                    blob,
                                    chunks,
                                    complete: false,
                                },
                            );
                            ns(c.progress)
                        }
                        Msg::Done { host, blob } => {
                            a.handle(
                                now,
                                Event::Done {
                                    host: HostId(host),
                                    blob: blob_id(blob),
                                },
                            );
                            self.done[blob as usize] += 1;
                            if self.done[blob as usize] == spec.agents - 1 {
                                self.blobs_done += 1;
                            }
                            // The last completion of the shard's part ends its job.
                            let targets = spec.agents - 1;
                            let ended = self.done[blob as usize] == targets
                                && s.blobs.iter().all(|b| self.done[*b as usize] == targets);
                            let record = match ended {
                                true => {
                                    c.job_end_target * f64::from(targets) * s.blobs.len() as f64
                                }
                                false => 0.0,
                            };
                            ns(c.completion + record)
                        }
                        Msg::Distribute => {
                            for h in 0..spec.agents {
                                for &b in &s.blobs {
                                    if h != holder(b, spec.agents) {
                                        s.wanting.push_back((h, b));
                                    }
                                }
                            }
                            let job = ns(c.job_target * s.wanting.len() as f64);
                            let first = want_some(s, spec, now);
                            wanted += first;
                            // What its answer waits on: the job, and its first wants
                            // (charged with the turn's other wants below).
                            let own = from_ns(wall(job + ns(c.want * first as f64)));
                            self.out.distribute_turn = self.out.distribute_turn.max(own);
                            job
                        }
                    };
                }
                s.assigner.end_batch();
            }
        }
        let planned = (queued_before + wanted).saturating_sub(s.assigner.queued_wants());
        spent += ns(c.want * wanted as f64 + c.planned * planned as f64);
        let mut orders = Vec::new();
        while let Some(command) = s.assigner.poll_command() {
            match command {
                Command::Fetch { host, blob, .. } => {
                    spent += ns(c.order);
                    orders.push((host.0, blob_index(blob)));
                }
                Command::UpdateSources { .. } => {
                    spent += ns(c.update);
                    self.out.updates += 1;
                }
                Command::Cancel { .. } => spent += ns(c.update),
            }
        }
        while s.assigner.poll_notice().is_some() {}
        let end = now + from_ns(wall(spent));
        if timer {
            s.turns
                .timer_ran(from_ns(wall(spent)), end, orders.len() as u64);
        }
        if now >= self.t0 {
            s.busy_ns += spent;
        }
        s.free_at = end;
        s.decide_at = end;
        if !orders.is_empty() {
            self.out.orders += orders.len() as u64;
            self.out.last_order = end - self.t0;
        }
        if self.job_done.is_none() && self.blobs_done == spec.blobs {
            self.job_done = Some(end);
        }
        let spread = spec.order_spread.as_micros() as u64;
        for (host, blob) in orders {
            let late = Duration::from_micros(self.rng.random_range(0..=spread));
            self.at(end + spec.latency + late, Ev::Order { host, blob });
        }
    }
}

/// Wants up to `wants_per_turn` of the Distribute's targets; how many.
fn want_some(s: &mut Shard, spec: &LoadSpec, now: Time) -> usize {
    let mut n = 0;
    while n < spec.wants_per_turn
        && let Some((host, blob)) = s.wanting.pop_front()
    {
        let event = Event::Want {
            blob: blob_id(blob),
            host: HostId(host),
            priority: 0,
        };
        s.assigner.handle(now, event);
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_spread_over_shards_and_stay_put() {
        let counts = (0..1000).fold([0u32; 4], |mut c, b| {
            c[shard_for(b, 4) as usize] += 1;
            c
        });
        assert!(counts.iter().all(|c| (200..300).contains(c)), "{counts:?}");
        // Rendezvous: a fifth shard takes blobs only for itself.
        let moved = (0..1000)
            .filter(|b| shard_for(*b, 5) != shard_for(*b, 4) && shard_for(*b, 5) != 4)
            .count();
        assert_eq!(moved, 0);
    }
}
