//! The coordinator's CPU under many agents (`shoal-sim control`, issue 17): the load
//! generator's scenario (`benches/src/bin/loadgen.rs`) with the coordinator's one state
//! thread modelled as a server, so that the simulator predicts what the loadgen measures
//! (how long the agents' session messages wait, when a big Distribute's last order goes out
//! and when its job ends) and can say what S coordinators, each the owner of the blobs whose
//! digest hashes to it, would do with more agents and blobs than this machine can generate.
//!
//! What is real: the planner ([`shoal_planner::Assigner`], the coordinator's configuration) decides every
//! order and source update, and [`shoal_planner::Turns`], the coordinator's own rules, chooses each turn of
//! the state thread (a batch of waiting messages, or the due timers; the rest after a turn
//! that sent orders). What is modelled: the CPU each piece of work costs the state thread
//! ([`Costs`], measured with the loadgen at 20,000 agents on the 2-core development machine,
//! docs/BENCHMARKS.md), one-way latency between agents and coordinator, and the agents as
//! the loadgen pretends them: a fetch takes the blob's size over the link whatever its
//! sources, progress every `progress_interval` while it runs, a completion at its end; each
//! session opened over `join_spread` (Hello, inventory, a Load), a Load every 5 s after and
//! a heartbeat tick every 2 s that sends one when nothing else went out for 2 s (one tick
//! exactly 2 s after the last message sends with `beat_borderline`'s chance: the loadgen's
//! agents decide that by how late their timers fire, so it grows with the load). The gRPC
//! threads and the generator, which share the loadgen machine's two cores with the state
//! thread, appear only as `cpu_slowdown` (the thread's wait for a core, which the loadgen
//! measures). Not modelled: the writer thread, reads (API calls that overtake), memory.
//!
//! A Distribute of several blobs is split by blob into one part per shard (SCALING.md); each
//! part's job and wants are its shard's.

use std::time::Duration;

use shoal_planner::TurnConfig;

mod model;

/// The state thread's CPU per piece of work, in microseconds.
#[derive(Clone, Debug)]
pub struct Costs {
    /// Every turn: the planner's flush and the round of commands.
    pub turn: f64,
    /// A steady session message (Load, heartbeat).
    pub steady: f64,
    /// A progress report of a running download.
    pub progress: f64,
    /// A download's completion (BlobDone: the planner, the job's target, its record).
    pub completion: f64,
    /// A Distribute, per target: its agents resolved and named, its job planned (the
    /// targets are built as they are wanted: `want`).
    pub job_target: f64,
    /// A job that ends, per target: its last record.
    pub job_end_target: f64,
    /// A target built and wanted (the job's target, its want into the planner's intake).
    pub want: f64,
    /// A want planned (its sources chosen).
    pub planned: f64,
    /// A fetch order sent.
    pub order: f64,
    /// A source update sent.
    pub update: f64,
}

impl Costs {
    /// Sets the cost called `name` (a field's name) to `us` microseconds.
    pub fn set(&mut self, name: &str, us: f64) -> Result<(), String> {
        let field = match name {
            "turn" => &mut self.turn,
            "steady" => &mut self.steady,
            "progress" => &mut self.progress,
            "completion" => &mut self.completion,
            "job_target" => &mut self.job_target,
            "job_end_target" => &mut self.job_end_target,
            "want" => &mut self.want,
            "planned" => &mut self.planned,
            "order" => &mut self.order,
            "update" => &mut self.update,
            _ => {
                return Err(format!(
                    "--cost: no cost called {name:?} (turn, steady, progress, completion, job_target, job_end_target, want, planned, order, update)"
                ));
            }
        };
        if !(us >= 0.0 && us.is_finite()) {
            return Err(format!("--cost {name}: {us} is not a time in microseconds"));
        }
        *field = us;
        Ok(())
    }
}

impl Default for Costs {
    /// Measured with `loadgen --agents 20000` at stop 42 (docs/BENCHMARKS.md, "the
    /// simulator predicts the loadgen"), from the state thread's CPU (`/proc`, 10 ms ticks):
    /// in the steady phase over the messages sent (~5 µs each); in the wave of a 64 MiB and
    /// of a 1 GiB blob, which differ mostly in their progress reports (2,260 against
    /// 34,450), ~4 µs a progress report and ~35 µs the rest of a download (its want,
    /// planning, order and completion), split by what a turn timer measured at stop 41: a
    /// release turn's 256 orders 13-15 µs each. The Distribute's own turn timed at stop 43,
    /// its targets built as they are wanted: the job 3.2-3.8 ms for 20,000 agents (0.17
    /// µs a target; 1 µs when it built them all), its first 2,000 targets built and wanted
    /// 3.8-7.8 ms (2.5 µs each). An ended job's last record is a scan of its
    /// targets writing the few not yet stored (0.1 µs a target): it had been put at 1.2
    /// µs (~25 ms for 20,000, a timing from before flushes went by passes), but writing it
    /// in slices moved nothing on the loadgen (stop 42), so it is not that.
    fn default() -> Self {
        Self {
            turn: 10.0,
            steady: 5.0,
            progress: 4.0,
            completion: 16.0,
            job_target: 0.17,
            job_end_target: 0.1,
            want: 2.5,
            planned: 3.0,
            order: 14.0,
            update: 8.0,
        }
    }
}

/// One run's shape.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    pub agents: u32,
    /// Blobs distributed at once, each to every agent but its holder.
    pub blobs: u32,
    pub blob_size: u64,
    /// Every agent's link, bits per second: a fetch takes the size over it.
    pub link_bps: f64,
    /// Coordinators; each blob belongs to the one its digest hashes highest for.
    pub shards: u32,
    /// The agents' sessions open evenly over this (the loadgen's `joins_s`).
    pub join_spread: Duration,
    /// The chance that a heartbeat tick exactly one interval after the last message sends.
    pub beat_borderline: f64,
    /// How often an agent reports a running download's progress.
    pub progress_interval: Duration,
    /// One way, agent to coordinator and back.
    pub latency: Duration,
    /// An order reaches its agent up to this much later than `latency` (evenly spread): the
    /// loadgen's agents take a turn's orders off their connections one after another,
    /// sharing the machine with the coordinator.
    pub order_spread: Duration,
    /// A Distribute's targets wanted per turn (the coordinator's `wants_per_turn`).
    pub wants_per_turn: usize,
    /// From the last session opened to the Distribute (the loadgen's steady phase, and the
    /// blob's registration).
    pub steady_before: Duration,
    pub costs: Costs,
    /// Wall time per CPU second of the state thread's work: 1 with a core of its own; more
    /// where it shares the cores (the loadgen on 2 cores measures it: `state_waiting_*_s`,
    /// the time the thread waited for a core, over its CPU).
    pub cpu_slowdown: f64,
    pub turns: TurnConfig,
    pub seed: u64,
    /// Give up after this much simulated time.
    pub max_time: Duration,
}

impl LoadSpec {
    /// The loadgen's defaults (`--link-mbit 10000`, `--steady-secs 3`, 32 channels on
    /// loopback) for `agents` agents and one blob of `blob_size` bytes.
    pub fn loadgen(agents: u32, blob_size: u64) -> Self {
        Self {
            agents,
            blobs: 1,
            blob_size,
            link_bps: 10e9,
            shards: 1,
            join_spread: Duration::from_secs_f64(f64::from(agents) * 137e-6),
            beat_borderline: 0.5,
            progress_interval: Duration::from_millis(500),
            latency: Duration::from_micros(200),
            order_spread: Duration::ZERO,
            wants_per_turn: 2000,
            steady_before: Duration::from_millis(3100),
            costs: Costs::default(),
            cpu_slowdown: 1.0,
            turns: TurnConfig::default(),
            seed: 1,
            max_time: Duration::from_secs(600),
        }
    }

    fn fetch_time(&self) -> Duration {
        Duration::from_secs_f64(self.blob_size as f64 * 8.0 / self.link_bps)
    }

    fn chunk_count(&self) -> u32 {
        self.blob_size.div_ceil(1 << 20).max(1) as u32
    }
}

/// What one run measured. Times are from the Distribute.
#[derive(Clone, Debug)]
pub struct LoadOutcome {
    /// Per shard, every session message's wait for its state thread from the Distribute to
    /// the end of the job, microseconds, sorted.
    pub waits_us: Vec<Vec<u32>>,
    /// The longest Distribute part's own processing (its job and first wants).
    pub distribute_turn: Duration,
    /// When the last fetch order went out.
    pub last_order: Duration,
    /// When the last completion was handled: every job done.
    pub job_done: Option<Duration>,
    /// Each shard's state thread CPU from the Distribute to the end of the job.
    pub busy: Vec<Duration>,
    pub orders: u64,
    pub updates: u64,
    /// Heartbeats the agents sent.
    pub heartbeats: u64,
}

/// The worst shard's figure: a shard that plans nothing has its waits near zero, and
/// pooled with the busy shard's they would hide them.
fn worst(waits: &[Vec<u32>], figure: impl Fn(&[u32]) -> f64) -> f64 {
    (waits.iter())
        .filter(|w| !w.is_empty())
        .map(|w| figure(w))
        .fold(0.0, f64::max)
}

impl LoadOutcome {
    /// Nearest-rank percentile of the session waits, milliseconds (the worst shard's).
    pub fn wait_ms(&self, p: f64) -> f64 {
        worst(&self.waits_us, |w| {
            let rank = ((p / 100.0) * w.len() as f64).ceil() as usize;
            f64::from(w[rank.clamp(1, w.len()) - 1]) / 1e3
        })
    }

    /// The `p`th percentile of the session waits as the loadgen reads it, milliseconds (the
    /// worst shard's): from the coordinator's histogram ([`WAIT_BUCKETS`]), interpolated
    /// linearly within the bucket it falls in (as Prometheus's `histogram_quantile` does),
    /// so a p99 anywhere between two bounds reads by the share of that bucket below it,
    /// not by the waits themselves.
    pub fn wait_ms_from_histogram(&self, p: f64) -> f64 {
        worst(&self.waits_us, |w| {
            let rank = p / 100.0 * w.len() as f64;
            let (mut lower, mut below) = (0.0, 0.0);
            for le in WAIT_BUCKETS {
                let n = w.partition_point(|x| f64::from(*x) <= le * 1e6) as f64;
                if n >= rank {
                    let share = if n > below {
                        (rank - below) / (n - below)
                    } else {
                        1.0
                    };
                    return (lower + (le - lower) * share) * 1e3;
                }
                (lower, below) = (*le, n);
            }
            lower * 1e3
        })
    }

    /// The share of session waits over `ms` (the worst shard's).
    pub fn over_ms(&self, ms: f64) -> f64 {
        worst(&self.waits_us, |w| {
            let over = w.iter().filter(|x| f64::from(**x) > ms * 1e3).count();
            over as f64 / w.len() as f64
        })
    }
}

/// The buckets of the coordinator's `shoal_coordinator_request_wait_seconds`, in seconds
/// (`shoal_coordinator::metrics::REQUEST_WAIT_BUCKETS`; `sim/tests/control.rs` checks they
/// agree).
pub const WAIT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0,
    2.0, 5.0,
];

/// Runs `spec`. Deterministic: the same spec gives the same outcome.
pub fn run(spec: &LoadSpec) -> Result<LoadOutcome, String> {
    spec.check()?;
    Ok(model::run(spec))
}

impl LoadSpec {
    /// Whether the model can run this shape; why not.
    pub fn check(&self) -> Result<(), String> {
        if self.agents < 2 || self.blobs == 0 || self.shards == 0 || self.blob_size == 0 {
            return Err(
                "control: --agents must be 2 or more, --blobs, --shards and the size positive"
                    .into(),
            );
        }
        if !(self.link_bps > 0.0 && self.cpu_slowdown >= 1.0) || self.wants_per_turn == 0 {
            return Err("control: the link rate and the wants per turn must be positive, the CPU slowdown 1 or more".into());
        }
        if !(0.0..=1.0).contains(&self.beat_borderline) {
            return Err("control: --beat-borderline is a chance, from 0 to 1".into());
        }
        Ok(())
    }
}

/// Issue 17's goals for a session message's p99 and for an API call (the Distribute's
/// turn is the state thread's part of its call), milliseconds: the row gives each figure
/// as a multiple of its goal too, as the loadgen's report does.
pub const SESSION_GOAL_MS: f64 = 20.0;
pub const API_GOAL_MS: f64 = 50.0;

/// The table [`row`] prints under.
pub const HEADER: &str = "| agents | blobs | shards | blob | wait p50 / p99 (the worst shard's), ms | p99 as the loadgen reads it, ms | over 10 ms | over 20 ms | Distribute turn, ms | p99, turn × goal | last order, s | job done, s | busiest shard's CPU, s | orders | source updates | heartbeats per agent |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|";

/// One run as a row of [`HEADER`]'s table.
pub fn row(spec: &LoadSpec, o: &LoadOutcome) -> String {
    let size = match spec.blob_size {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b => format!("{} MiB", b >> 20),
    };
    let busy = o.busy.iter().max().copied().unwrap_or_default();
    let done = o
        .job_done
        .map_or("not done".into(), |d| format!("{:.2}", d.as_secs_f64()));
    format!(
        "| {} | {} | {} | {size} | {:.1} / {:.1} | {:.1} | {:.1}% | {:.1}% | {:.1} | {:.2}, {:.2} | {:.2} | {done} | {:.2} | {} | {} | {:.2} |",
        spec.agents,
        spec.blobs,
        spec.shards,
        o.wait_ms(50.0),
        o.wait_ms(99.0),
        o.wait_ms_from_histogram(99.0),
        100.0 * o.over_ms(10.0),
        100.0 * o.over_ms(20.0),
        o.distribute_turn.as_secs_f64() * 1e3,
        o.wait_ms(99.0) / SESSION_GOAL_MS,
        o.distribute_turn.as_secs_f64() * 1e3 / API_GOAL_MS,
        o.last_order.as_secs_f64(),
        busy.as_secs_f64(),
        o.orders,
        o.updates,
        o.heartbeats as f64 / f64::from(spec.agents),
    )
}
