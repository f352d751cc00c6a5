//! Load generator for issue 17 ("20,000 agents on one coordinator"): one real `shoal
//! coordinator` process, and N simulated agents in this process that speak the agent
//! session protocol to it over a few HTTP/2 connections (tonic multiplexes many streams per
//! connection; agents are assigned to them round-robin).
//!
//! 1. The coordinator starts from a generated configuration in a temporary directory
//!    (`insecure = true`: plaintext gRPC, no tokens, no agent certificates, so **the TLS
//!    handshakes and certificate signing a real cluster pays per agent are not measured**),
//!    its metrics on 127.0.0.1.
//! 2. Every agent Joins (at most `--join-concurrency` at once; each Join's latency is
//!    recorded) and opens its session as `agent/src/session.rs` does: Hello, a full
//!    inventory, a Load at once and every 5 s, a Heartbeat when nothing else went out for the
//!    coordinator's interval, progress of running orders every 500 ms.
//! 3. Agent 0 registers one blob (`--blob-size` bytes of deterministic data, 1 MiB chunks)
//!    and reports it whole; the generator Distributes it to all agents. An agent "fetches"
//!    what a FetchOrder names in size ÷ `--link-mbit` (× `--time-scale`), reporting progress
//!    meanwhile and BlobDone at the end; Cancel stops it. No bytes move between agents: what
//!    is measured is the coordinator's planning and session handling.
//! 4. With `--restart`, the coordinator is then SIGKILLed and started again on the same
//!    state; the agents reconnect as real ones do (rejoining with their id and secret), and
//!    the time until every agent is ready and the catalog knows them all as holders again is
//!    measured.
//!
//! Session messages are one-way, so their latency cannot be observed from here; the report
//! reads it from the coordinator's histogram of how long each one waited for its state task
//! (`shoal_coordinator_request_wait_seconds{kind="session"}`, scraped at each phase's
//! start and end), and gives its health probe latency too
//! (`shoal_coordinator_state_probe_seconds`: a probe queued behind everything else, scraped
//! every second). The job API's calls are timed twice, per phase: by the generator (its
//! `loadgen-api` thread) and by the coordinator (`shoal_coordinator_api_call_seconds`, from
//! the call's arrival at its service to its answer); the difference is the network's and the
//! machine's, not the coordinator's work. Each phase's last scrape is kept in the work
//! directory (`metrics-<phase>.txt`). The generator shares the machine's cores with the
//! coordinator: its own CPU time is printed too.
//!
//! `cargo build --release -p shoal -p shoal-benches && target/release/loadgen --agents 1000`

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use shoal_proto::pb::v1 as pb;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;

use agent::{Agent, Control, Counts, Shared};
use api::{Api, ApiTimes};
use process::{Coordinator, Settings, Usage};

#[derive(Parser, Debug, Clone)]
struct Args {
    /// The `shoal` binary.
    #[arg(long, default_value = "target/release/shoal")]
    shoal: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// HTTP/2 connections the agents share (round-robin).
    #[arg(long, default_value_t = 32)]
    channels: usize,
    /// Joins in flight at once (the first joins; rejoins after a restart are not bounded).
    #[arg(long, default_value_t = 256)]
    join_concurrency: usize,
    /// Size of the distributed blob: bytes, or with KiB, MiB, GiB.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    blob_size: u64,
    /// Every agent's link, Mbit/s: a fetch takes size ÷ this.
    #[arg(long, default_value_t = 10_000.0)]
    link_mbit: f64,
    /// Multiplies every pretend fetch's duration.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// How often an agent reports the progress of its running orders (the agent's 500 ms).
    #[arg(long, default_value_t = 500)]
    progress_ms: u64,
    /// The coordinator's lease (default: its own, 10 s).
    #[arg(long)]
    lease_ms: Option<u64>,
    /// The coordinator's heartbeat interval (default: its own 2 s, or half of --lease-ms if
    /// that is less).
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Extra lines for coordinator.toml (`\n` separates lines).
    #[arg(long, default_value = "")]
    coordinator_toml: String,
    /// Seconds of steady state (every agent beating, nothing to do) between the joins and
    /// the distribution.
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// After the job, SIGKILL the coordinator, start it again on the same state, and
    /// measure until every agent is back.
    #[arg(long)]
    restart: bool,
    /// Give up on a phase (joins, the job, the restart) after this many seconds.
    #[arg(long, default_value_t = 600)]
    phase_timeout_secs: u64,
    /// Keep the configuration, state and logs here (default: a temporary directory).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: u64 = num.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        u => return Err(format!("unknown unit {u:?} (B, KiB, MiB, GiB)")),
    };
    n.checked_mul(mult)
        .filter(|b| *b > 0)
        .ok_or_else(|| format!("{s:?}: out of range"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.agents >= 1, "--agents must be at least 1");
    ensure!(args.channels >= 1, "--channels must be at least 1");
    ensure!(
        args.join_concurrency >= 1,
        "--join-concurrency must be at least 1"
    );
    ensure!(
        args.link_mbit > 0.0 && args.time_scale >= 0.0,
        "--link-mbit must be positive, --time-scale not negative"
    );
    let temp;
    let dir = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("{}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    // Every exit path drops the run, and with it the coordinator (SIGKILL).
    tokio::select! {
        r = run(&args, &dir) => r,
        r = tokio::signal::ctrl_c() => {
            r.context("waiting for Ctrl-C")?;
            bail!("interrupted")
        }
    }
}

/// Deterministic bytes (xorshift64*), `left` of them.
#[derive(Debug)]
struct Pattern {
    state: u64,
    left: u64,
}

impl std::io::Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Samples of the coordinator's health probe latency, seconds, by phase.
type Probes = Arc<Mutex<BTreeMap<u8, Vec<f64>>>>;

/// Phases for the probe samples.
const PHASES: [&str; 4] = ["joins", "steady", "distribute", "restart"];

/// Everything measured, for the report.
#[derive(Debug, Default)]
struct Measured {
    agents_joined: usize,
    joins_secs: f64,
    blob_digest: String,
    distribute_call_secs: f64,
    job_state: String,
    job_targets: String,
    last_order_secs: Option<f64>,
    job_done_secs: f64,
    restart: Option<Restart>,
    usage: Vec<(String, Usage)>,
    /// Each phase's CPU seconds: the coordinator's, and its state thread's.
    /// Per phase: the coordinator's CPU seconds, its state thread's, and how long that
    /// thread waited for a core.
    cpu_by_phase: Vec<(&'static str, f64, f64, f64)>,
    /// Agent messages per second in the steady phase.
    steady_messages_per_sec: f64,
    generator_cpu: f64,
    failure: Option<String>,
    /// The coordinator's planner counters after the job: stripe-only source updates and
    /// candidates examined.
    planner: Option<(f64, f64)>,
    /// How long the agents' session messages waited for the state task, and how long the
    /// coordinator took to answer API calls, per phase. None where a scrape at the phase's
    /// start or end failed.
    waits: Vec<(&'static str, Option<process::Waits>)>,
}

#[derive(Debug, Default)]
struct Restart {
    answering_secs: f64,
    all_ready_secs: f64,
    all_inventoried_secs: f64,
    all_holders_secs: f64,
    /// The job as the restarted coordinator first showed it, and once every agent was back.
    job_on_start: String,
    job_at_end: String,
}

async fn run(args: &Args, dir: &std::path::Path) -> Result<()> {
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], process::free_port()?));
    let heartbeat_ms = args
        .heartbeat_ms
        .or(args.lease_ms.map(|l| (l / 2).min(2_000)));
    let settings = Settings {
        listen,
        metrics,
        lease_ms: args.lease_ms,
        heartbeat_ms,
        extra_toml: args.coordinator_toml.replace("\\n", "\n"),
    };
    let limit = Duration::from_secs(args.phase_timeout_secs);

    // The blob first: hashing it takes a while and must not count in any phase.
    let size = args.blob_size;
    let manifest = tokio::task::spawn_blocking(move || {
        let data = Pattern {
            state: 0x5eed_1234_abcd_ef01,
            left: size,
        };
        shoal_proto::Manifest::from_reader(data, 1 << 20)
    })
    .await
    .context("hashing the blob")?
    .context("making the manifest")?;
    let digest = manifest.digest().to_string();

    let mut coordinator = Coordinator::start(&args.shoal, dir, &settings)?;
    let api_channel = process::channel(listen)?;
    coordinator.wait_ready(&api_channel, limit).await?;
    let mut api = Api::new(listen)?;
    let phase = Arc::new(AtomicU8::new(0));
    let probes: Probes = Arc::default();
    let scraper = tokio::spawn(scrape_probes(metrics, phase.clone(), probes.clone()));

    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        token: process::JOIN_TOKEN.into(),
        link_bytes_per_sec: args.link_mbit * 1e6 / 8.0,
        time_scale: args.time_scale,
        progress_every: Duration::from_millis(args.progress_ms.max(10)),
        manifest: OnceLock::new(),
        counts: Counts::default(),
        phase: AtomicU8::new(0),
        join_latencies: Default::default(),
        inventoried_after_restart: Default::default(),
        sessions_up: Default::default(),
        holders: Default::default(),
        last_order_us: Default::default(),
        base: Instant::now(),
        first_joins: Semaphore::new(args.join_concurrency),
        stop,
    });
    let channels = (0..args.channels)
        .map(|_| process::channel(listen))
        .collect::<Result<Vec<_>>>()?;
    let mut m = Measured::default();
    let mut tasks = Vec::with_capacity(args.agents);
    // What was measured is reported even when a phase fails.
    let outcome: Result<()> = async {
    let mut usage_mark = coordinator.usage()?;
    m.blob_digest = digest.clone();

    // Joins and sessions.
    println!(
        "{} agents over {} connections, joins {} at once; blob {} ({} bytes); coordinator on {listen}, work dir {}",
        args.agents,
        args.channels,
        args.join_concurrency,
        digest,
        size,
        dir.display()
    );
    let started = Instant::now();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let mut control_rx = Some(control_rx);
    for i in 0..args.agents {
        let channel = channels[i % channels.len()].clone();
        let agent = Agent::new(i, channel, shared.clone(), control_rx.take());
        tasks.push(tokio::spawn(agent.run()));
    }
    wait_for(
        &mut coordinator,
        limit,
        "every session to open",
        async || {
            let c = &shared.counts;
            ensure!(
                c.gave_up.load(Ordering::Relaxed) == 0,
                "an agent's join was refused (see above)"
            );
            Ok(shared.sessions_up.load(Ordering::Relaxed) >= args.agents)
        },
    )
    .await?;
    let ready = api.ready_agents().await?;
    m.joins_secs = started.elapsed().as_secs_f64();
    m.agents_joined = ready;
    println!("joined: {ready} ready in {:.2} s", m.joins_secs);
    let waits_after_joins = waits(metrics, dir, PHASES[0]).await;
    m.waits.push((PHASES[0], waits_after_joins.clone()));
    let now = coordinator.usage()?;
    m.cpu_by_phase
        .push(phase_cpu("joins and sessions", &usage_mark, &now));
    usage_mark = now;

    // Steady state: agents only beat and report load.
    phase.store(1, Ordering::Relaxed);
    api.phase = PHASES[1];
    let sent = |c: &Counts| {
        c.sent
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let (steady, sent_before) = (Instant::now(), sent(&shared.counts));
    while steady.elapsed() < Duration::from_secs(args.steady_secs) {
        coordinator.check_alive()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = steady.elapsed().as_secs_f64();
    m.steady_messages_per_sec = (sent(&shared.counts) - sent_before) as f64 / secs.max(1e-3);
    let now = coordinator.usage()?;
    m.cpu_by_phase.push(phase_cpu("steady", &usage_mark, &now));
    usage_mark = now;

    api.phase = PHASES[2];
    let waits_before = waits(metrics, dir, PHASES[1]).await;
    m.waits.push((
        PHASES[1],
        between(&waits_after_joins, &waits_before),
    ));

    // One blob, registered on agent 0, then distributed to all.
    phase.store(2, Ordering::Relaxed);
    shared
        .manifest
        .set(pb::Manifest::from(&manifest))
        .map_err(|_| anyhow::anyhow!("the manifest was set twice"))?;
    control_tx
        .send(Control::Register)
        .context("agent 0 is gone")?;
    let registered = Instant::now();
    while api.holders(&digest).await? < 1 {
        coordinator.check_alive()?;
        ensure!(
            registered.elapsed() < Duration::from_secs(60),
            "the coordinator never counted agent 0 as a holder"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let distributed = Instant::now();
    let distributed_us = shared.since_base_us();
    let request = pb::DistributeRequest {
        blobs: vec![digest.clone()],
        targets: Some(pb::TargetSelector {
            selector: Some(pb::target_selector::Selector::All(pb::AllAgents {})),
        }),
        description: "loadgen".into(),
        ..Default::default()
    };
    let (job, took) = api.distribute(request).await?;
    m.distribute_call_secs = took;
    println!(
        "distributing {digest} to {} targets (job {})",
        job.target_count, job.job_id
    );
    let mut last_print = Instant::now();
    let job = loop {
        coordinator.check_alive()?;
        ensure!(
            distributed.elapsed() < limit,
            "the job did not finish within {limit:?}"
        );
        // A state task that does not answer is measured, not waited for blindly.
        let asked = Instant::now();
        let j = match tokio::time::timeout(Duration::from_secs(5), api.job(&job.job_id)).await {
            Ok(j) => Some(j?),
            Err(_) => {
                api.times.add("get_job", api.phase, asked.elapsed().as_secs_f64());
                None
            }
        };
        if let Some(j) = &j
            && !matches!(j.state(), pb::JobState::Pending | pb::JobState::Running)
        {
            break j.clone();
        }
        if last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            println!(
                "  {:.0} s: {}; job: {}",
                distributed.elapsed().as_secs_f64(),
                status(&shared, &probes),
                j.as_ref().map_or("GetJob took over 5 s".into(), targets)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    m.job_done_secs = distributed.elapsed().as_secs_f64();
    m.job_state = format!("{:?}", job.state());
    m.job_targets = targets(&job);
    let last = shared.last_order_us.load(Ordering::Relaxed);
    m.last_order_secs = (last > 0).then(|| last.saturating_sub(distributed_us) as f64 / 1e6);
    println!(
        "job {}: {} in {:.2} s",
        job.job_id, m.job_state, m.job_done_secs
    );
    let now = coordinator.usage()?;
    m.cpu_by_phase
        .push(phase_cpu("distribute", &usage_mark, &now));
    // The coordinator exports its planner counters once a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let scraped = process::scrape(metrics).await.ok();
    keep_scrape(dir, PHASES[2], scraped.as_deref());
    if let Some(text) = &scraped {
        let read = |name| process::metric(text, name).unwrap_or(f64::NAN);
        m.planner = Some((
            read(shoal_coordinator::metrics::PLANNER_STRIPE_UPDATES),
            read(shoal_coordinator::metrics::PLANNER_CANDIDATES),
        ));
    }
    let waits_after = scraped.map(|t| process::Waits::read(&t));
    m.waits
        .push((PHASES[2], between(&waits_before, &waits_after)));
    m.usage.push(("coordinator".into(), now));

    if args.restart {
        phase.store(3, Ordering::Relaxed);
        shared.phase.store(1, Ordering::Relaxed);
        api.phase = PHASES[3];
        let killed = Instant::now();
        coordinator.restart()?;
        coordinator.wait_ready(&api_channel, limit).await?;
        let mut r = Restart {
            answering_secs: killed.elapsed().as_secs_f64(),
            ..Default::default()
        };
        r.job_on_start = job_now(&mut api, &job.job_id).await?;
        let n = args.agents;
        let (mut ready_at, mut inventoried_at, mut holders_at) = (None, None, None);
        let mut last_print = Instant::now();
        while ready_at.is_none() || inventoried_at.is_none() || holders_at.is_none() {
            coordinator.check_alive()?;
            ensure!(
                killed.elapsed() < limit,
                "the agents were not all back within {limit:?}"
            );
            let secs = killed.elapsed().as_secs_f64();
            if last_print.elapsed() >= Duration::from_secs(5) {
                last_print = Instant::now();
                println!("  {secs:.0} s after the kill: {}", status(&shared, &probes));
            }
            let slow = Duration::from_secs(10);
            let ready = tokio::time::timeout(slow, api.ready_agents()).await;
            if ready_at.is_none() && ready.ok().transpose()?.unwrap_or(0) >= n {
                ready_at = Some(secs);
            }
            if inventoried_at.is_none()
                && shared.inventoried_after_restart.load(Ordering::Relaxed) >= n
            {
                inventoried_at = Some(secs);
            }
            let holders = tokio::time::timeout(slow, api.holders(&digest)).await;
            if holders_at.is_none() && holders.ok().transpose()?.unwrap_or(0) as usize >= n {
                holders_at = Some(secs);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        r.all_ready_secs = ready_at.unwrap_or_default();
        r.all_inventoried_secs = inventoried_at.unwrap_or_default();
        r.all_holders_secs = holders_at.unwrap_or_default();
        r.job_at_end = job_now(&mut api, &job.job_id).await?;
        // A new process: its histogram started empty.
        m.waits.push((PHASES[3], waits(metrics, dir, PHASES[3]).await));
        println!("restart: every agent back in {:.2} s", r.all_ready_secs);
        m.restart = Some(r);
        let now = coordinator.usage()?;
        m.cpu_by_phase.push((
            "restart (new process)",
            now.cpu_seconds,
            now.state_cpu_seconds,
            now.state_waiting_seconds,
        ));
        m.usage.push(("coordinator after restart".into(), now));
    }
    Ok(())
    }
    .await;
    if let Err(e) = &outcome {
        println!("run failed: {e:#}");
        m.failure = Some(format!("{e:#}"));
        if let Ok(u) = coordinator.usage() {
            m.usage.push(("coordinator at the failure".into(), u));
        }
    }

    let _ = stop_tx.send(true);
    m.generator_cpu = process::usage_of("self").map_or(f64::NAN, |u| u.cpu_seconds);
    scraper.abort();
    let killed = coordinator.kill();
    for t in tasks {
        t.abort();
    }
    let probes = probes.lock().map(|p| p.clone()).unwrap_or_default();
    report(
        args,
        &m,
        &shared.counts,
        &shared,
        &api.times,
        &probes,
        &coordinator.logs,
    );
    killed?;
    outcome
}

/// Polls `done` every 50 ms until it is true, failing if the coordinator exits or `limit`
/// passes.
async fn wait_for(
    coordinator: &mut Coordinator,
    limit: Duration,
    what: &str,
    mut done: impl AsyncFnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        coordinator.check_alive()?;
        if done().await? {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn targets(job: &pb::Job) -> String {
    let c = job
        .progress
        .as_ref()
        .and_then(|p| p.counts)
        .unwrap_or_default();
    format!(
        "{} done, {} running, {} pending, {} failed of {}",
        c.done, c.running, c.pending, c.failed, c.total
    )
}

/// A phase's CPU seconds between two readings: the coordinator's and its state thread's,
/// and how long that thread waited for a core.
fn phase_cpu(
    phase: &'static str,
    from: &process::Usage,
    to: &process::Usage,
) -> (&'static str, f64, f64, f64) {
    (
        phase,
        to.cpu_seconds - from.cpu_seconds,
        to.state_cpu_seconds - from.state_cpu_seconds,
        to.state_waiting_seconds - from.state_waiting_seconds,
    )
}

/// The job's state and counts, or that GetJob took over 10 s; an error if it ended with
/// targets that did not.
async fn job_now(api: &mut Api, job_id: &str) -> Result<String> {
    match tokio::time::timeout(Duration::from_secs(10), api.job(job_id)).await {
        Ok(j) => {
            let j = j?;
            let shown = format!("{:?}, {}", j.state(), targets(&j));
            // An ended job with targets still pending or running was stored ended before
            // its targets' last words: they would wait for good.
            let ended = !matches!(j.state(), pb::JobState::Pending | pb::JobState::Running);
            let c = (j.progress.as_ref())
                .and_then(|p| p.counts)
                .unwrap_or_default();
            ensure!(
                !ended || c.pending + c.running == 0,
                "the restarted coordinator brought the job back torn: {shown}"
            );
            Ok(shown)
        }
        Err(_) => Ok("GetJob took over 10 s".into()),
    }
}

/// What the agents saw so far, and the last health probe latency, for progress lines.
fn status(shared: &Shared, probes: &Probes) -> String {
    let c = &shared.counts;
    let probe = (probes.lock().ok())
        .and_then(|p| p.values().flatten().last().copied())
        .map_or("?".into(), |v| format!("{:.0} ms", v * 1e3));
    format!(
        "{} sessions up, {} holders, {} orders, {} source updates, {} cancels, {} session ends, probe {probe}",
        shared.sessions_up.load(Ordering::Relaxed),
        shared.holders.load(Ordering::Relaxed),
        c.received[0].load(Ordering::Relaxed),
        c.received[1].load(Ordering::Relaxed),
        c.received[2].load(Ordering::Relaxed),
        c.session_breaks.load(Ordering::Relaxed),
    )
}

/// The coordinator's session message waits and API call times so far; None if the scrape
/// failed. The scrape is kept in `dir` ([`keep_scrape`]).
async fn waits(
    metrics: std::net::SocketAddr,
    dir: &std::path::Path,
    phase: &str,
) -> Option<process::Waits> {
    let scraped = process::scrape(metrics).await.ok();
    keep_scrape(dir, phase, scraped.as_deref());
    scraped.map(|t| process::Waits::read(&t))
}

/// Keeps the coordinator's metrics as scraped at the end of `phase` in `dir`
/// (`metrics-<phase>.txt`), for what the report does not show.
fn keep_scrape(dir: &std::path::Path, phase: &str, scraped: Option<&str>) {
    if let Some(text) = scraped
        && let Err(e) = std::fs::write(dir.join(format!("metrics-{phase}.txt")), text)
    {
        println!("keeping the metrics of the {phase} phase: {e}");
    }
}

/// The waits between two scrapes; None unless both were read.
fn between(
    before: &Option<process::Waits>,
    after: &Option<process::Waits>,
) -> Option<process::Waits> {
    Some(after.as_ref()?.since(before.as_ref()?))
}

/// Scrapes the health probe latency every second into `probes`, under the current phase.
async fn scrape_probes(addr: std::net::SocketAddr, phase: Arc<AtomicU8>, probes: Probes) {
    // The coordinator sets the gauge once a second; sampling twice as often misses none.
    let mut every = tokio::time::interval(Duration::from_millis(500));
    loop {
        every.tick().await;
        let Ok(text) = process::scrape(addr).await else {
            continue;
        };
        if let Some(v) = process::metric(&text, shoal_coordinator::metrics::STATE_PROBE_SECONDS)
            && let Ok(mut p) = probes.lock()
        {
            p.entry(phase.load(Ordering::Relaxed)).or_default().push(v);
        }
    }
}

#[path = "loadgen/agent.rs"]
mod agent;
#[path = "loadgen/api.rs"]
mod api;
#[path = "loadgen/process.rs"]
mod process;
#[path = "loadgen/report.rs"]
mod report;
use report::report;
