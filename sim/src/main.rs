//! `shoal-sim <scenario>|all [--quick] [--seed N] [--only STRATEGY] [--check]`: runs named
//! scenarios under Shoal and the two baselines and prints one table, then PASS/FAIL per goal.
//! Exits 1 if a goal failed, 2 on bad usage. `shoal-sim control ...` models the coordinator's
//! CPU under many agents instead (`shoal_sim::control`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use shoal_sim::control::LoadSpec;
use shoal_sim::report::{self, Report};
use shoal_sim::scenarios::{self, NAMES, NetnsShape};
use shoal_sim::spec::SharedCpu;
use shoal_sim::{Checks, Strategy, run};

const USAGE: &str = "usage: shoal-sim control [--agents N[,N...]] [--blobs B[,B...]] [--shards S[,S...]] [--blob-size 64MiB] [--link-mbit 10000] [--release-rest 1.5] [--cpu-slowdown 1] [--join-spread SECS] [--beat-borderline 0.5] [--order-spread-ms 0] [--cost NAME=MICROSECONDS]... [--seed N]
  the coordinator's CPU under many agents (the loadgen's scenario), one row per combination
       shoal-sim <seed-example|kraken-bench|peak|faults|random-faults|cold|netns|netns-known|all> [--quick] [--seed N] [--only shoal|single-origin|random-mesh] [--check]
  netns and netns-known take the real-network benchmark's shape (its defaults):
  [--targets 8] [--size-mib 256] [--rate-mbit 200] [--slow 0] (the last targets at half rate)
  [--cores 2] [--cpu-s-per-gb 12] (the machine's CPU all hosts share; --cores 0: CPU to spare)";

struct Args {
    scenarios: Vec<String>,
    quick: bool,
    seed: u64,
    only: Option<Strategy>,
    checks: Checks,
    netns: NetnsShape,
}

fn number<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T, String> {
    let v = v.ok_or(format!("{flag} needs a number"))?;
    v.parse()
        .map_err(|_| format!("{flag}: {v:?} is not a number"))
}

fn parse() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut scenario = None;
    let mut out = Args {
        scenarios: Vec::new(),
        quick: false,
        seed: 1,
        only: None,
        checks: Checks::Cheap,
        netns: NetnsShape::default(),
    };
    let default_cpu = out.netns.cpu.expect("the shape's default has a CPU");
    let (mut cores, mut cpu_s_per_gb) = (default_cpu.cores, default_cpu.secs_per_byte * 1e9);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => out.quick = true,
            "--check" => out.checks = Checks::EveryEvent,
            "--seed" => {
                let v = args.next().ok_or("--seed needs a number")?;
                out.seed = v
                    .parse()
                    .map_err(|_| format!("--seed: {v:?} is not a number"))?;
            }
            "--only" => {
                out.only = Some(match args.next().as_deref() {
                    Some("shoal") => Strategy::Shoal,
                    Some("single-origin") => Strategy::SingleOrigin,
                    Some("random-mesh") => Strategy::RandomMesh,
                    other => return Err(format!("--only: unknown strategy {other:?}")),
                })
            }
            "--targets" => out.netns.targets = number(&a, args.next())?,
            "--size-mib" => out.netns.size_mib = number(&a, args.next())?,
            "--rate-mbit" => out.netns.rate_mbit = number(&a, args.next())?,
            "--slow" => out.netns.slow = number(&a, args.next())?,
            "--cores" => cores = number(&a, args.next())?,
            "--cpu-s-per-gb" => cpu_s_per_gb = number(&a, args.next())?,
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown flag {s}")),
            s if scenario.is_none() => scenario = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    let shape = &out.netns;
    if shape.targets == 0 || shape.size_mib == 0 || shape.rate_mbit <= 0.0 {
        return Err("--targets, --size-mib and --rate-mbit must be positive".into());
    }
    if shape.slow > shape.targets {
        return Err(format!(
            "--slow {} is more than the {} targets",
            shape.slow, shape.targets
        ));
    }
    if !(cores >= 0.0 && cpu_s_per_gb > 0.0) {
        return Err("--cores must be 0 or more, --cpu-s-per-gb positive".into());
    }
    out.netns.cpu = (cores > 0.0).then_some(SharedCpu {
        cores,
        secs_per_byte: cpu_s_per_gb / 1e9,
    });
    let scenario = scenario.ok_or("no scenario given")?;
    out.scenarios = if scenario == "all" {
        NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        vec![scenario]
    };
    Ok(out)
}

/// `shoal-sim control ...`: the coordinator's CPU under many agents, one run per
/// combination of the lists given.
fn control(args: &[String]) -> Result<Vec<LoadSpec>, String> {
    fn list<T: std::str::FromStr>(flag: &str, v: Option<&String>) -> Result<Vec<T>, String> {
        let v = v.ok_or(format!("{flag} needs a value"))?;
        (v.split(','))
            .map(|x| (x.trim().parse()).map_err(|_| format!("{flag}: {x:?} is not a number")))
            .collect()
    }
    let mut base = LoadSpec::loadgen(20_000, 64 << 20);
    let (mut agents, mut blobs, mut shards) = (vec![20_000u32], vec![1u32], vec![1u32]);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--agents" => agents = list(a, it.next())?,
            "--blobs" => blobs = list(a, it.next())?,
            "--shards" => shards = list(a, it.next())?,
            "--blob-size" => {
                let v = it.next().ok_or("--blob-size needs a size")?;
                base.blob_size = parse_size(v)?;
            }
            "--link-mbit" => base.link_bps = number::<f64>(a, it.next().cloned())? * 1e6,
            "--release-rest" => base.turns.release_rest = number(a, it.next().cloned())?,
            "--cpu-slowdown" => base.cpu_slowdown = number(a, it.next().cloned())?,
            "--join-spread" => {
                base.join_spread = Duration::from_secs_f64(number(a, it.next().cloned())?)
            }
            "--beat-borderline" => base.beat_borderline = number(a, it.next().cloned())?,
            "--order-spread-ms" => {
                base.order_spread =
                    Duration::from_secs_f64(number::<f64>(a, it.next().cloned())? / 1e3)
            }
            "--seed" => base.seed = number(a, it.next().cloned())?,
            "--cost" => {
                let v = it.next().ok_or("--cost needs NAME=MICROSECONDS")?;
                let (name, us) = v
                    .split_once('=')
                    .ok_or(format!("--cost: {v:?} is not NAME=MICROSECONDS"))?;
                base.costs.set(name, number(a, Some(us.to_string()))?)?;
            }
            "-h" | "--help" => return Err(USAGE.into()),
            s => return Err(format!("control: unexpected argument {s:?}")),
        }
    }
    let mut out = Vec::new();
    for &a in &agents {
        for &b in &blobs {
            for &s in &shards {
                let spec = LoadSpec {
                    agents: a,
                    blobs: b,
                    shards: s,
                    ..base.clone()
                };
                spec.check()?;
                out.push(spec);
            }
        }
    }
    Ok(out)
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else {
        (s, 1)
    };
    let n: u64 = (num.trim().parse()).map_err(|_| format!("{s:?} is not a size (64MiB, 1GiB)"))?;
    n.checked_mul(mult)
        .filter(|b| *b > 0)
        .ok_or(format!("{s:?}: out of range"))
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().is_some_and(|a| a == "control") {
        let specs = match control(&argv[1..]) {
            Ok(specs) => specs,
            Err(e) => {
                eprintln!("shoal-sim: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        println!("{}", shoal_sim::control::HEADER);
        for spec in specs {
            match shoal_sim::control::run(&spec) {
                Ok(o) => println!("{}", shoal_sim::control::row(&spec, &o)),
                Err(e) => {
                    eprintln!("shoal-sim: {e}\n{USAGE}");
                    return ExitCode::from(2);
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shoal-sim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut built = Vec::new();
    for name in &args.scenarios {
        let scenario = match name.as_str() {
            "netns" | "netns-known" => Ok((
                scenarios::netns(args.seed, name == "netns-known", &args.netns),
                vec![scenarios::Goal::LiveCompleteNoCorruption],
            )),
            _ => scenarios::build(name, args.quick, args.seed),
        };
        match scenario {
            Ok(b) => built.push(b),
            Err(e) => {
                eprintln!("shoal-sim: {e}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let strategies = match args.only {
        Some(s) => vec![s],
        None => vec![
            Strategy::Shoal,
            Strategy::SingleOrigin,
            Strategy::RandomMesh,
        ],
    };
    let mut reports = Vec::new();
    for (spec, goals) in &built {
        let started = Instant::now();
        let mut runs = Vec::new();
        for &s in &strategies {
            let t = Instant::now();
            let o = run(spec, s, args.checks);
            eprintln!(
                "  {} / {}: {:.1} s simulated in {:.1} s wall ({} steps, {} events)",
                spec.name,
                s.name(),
                o.end,
                t.elapsed().as_secs_f64(),
                o.steps,
                o.events
            );
            runs.push(o);
        }
        reports.push((
            Report {
                spec,
                runs,
                wall: started.elapsed().as_secs_f64(),
            },
            goals,
        ));
    }
    println!(
        "seed {}{}\n",
        args.seed,
        if args.quick { ", quick" } else { "" }
    );
    println!("{}\n{}", report::HEADER, report::RULE);
    for (r, _) in &reports {
        for row in report::rows(r) {
            println!("{row}");
        }
    }
    println!();
    let mut failed = 0;
    for (r, goals) in &reports {
        for (ok, what) in report::judge(r, goals) {
            if args.only.is_some_and(|s| s != Strategy::Shoal) {
                continue;
            }
            failed += usize::from(!ok);
            println!("{} {what}", if ok { "PASS" } else { "FAIL" });
        }
    }
    println!();
    for (r, _) in &reports {
        if let Some(shoal) = r.get(Strategy::Shoal) {
            if let Some(p) = &shoal.planner {
                println!(
                    "{}: planner orders {} edge splits {} source updates {} replans {} stalls {} corrupt reports {} lease expiries {}; endgame duplicates {} wasted chunks {}; {:.0}% of bytes crossed zones",
                    r.spec.name,
                    p.orders,
                    p.splits,
                    p.source_updates,
                    p.replans,
                    p.stalls,
                    p.corrupt_reports,
                    p.lease_expiries,
                    shoal.duplicate_requests,
                    shoal.wasted_chunks,
                    100.0 * shoal.cross_zone_bytes as f64 / shoal.bytes_moved.max(1) as f64
                );
            }
            if let Some(s) = &shoal.seeding {
                println!(
                    "{}: seeder orders {} (ranges {}) ranges seeded {} failed seeds {} (local faults {}) blobs seeded {} gave up {}",
                    r.spec.name,
                    s.seed_orders,
                    s.range_orders,
                    s.ranges_seeded,
                    s.failed_seeds,
                    s.local_faults,
                    s.seeded,
                    s.gave_up
                );
            }
            if let Some(line) = report::own_bounds(r.spec, shoal) {
                println!("{}: {line}", r.spec.name);
            }
            for v in &shoal.violations {
                println!("{}: VIOLATION {v}", r.spec.name);
            }
        }
        println!("{}: simulated in {:.1} s wall", r.spec.name, r.wall);
    }
    if let Some(bytes) = report::peak_memory() {
        println!("peak memory {:.2} GiB", bytes as f64 / (1u64 << 30) as f64);
    }
    if failed > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
