//! `shoal-sim <scenario>|all [--quick] [--seed N] [--only STRATEGY] [--check]`: runs named
//! scenarios under Shoal and the two baselines and prints one table, then PASS/FAIL per goal.
//! Exits 1 if a goal failed, 2 on bad usage.

use std::process::ExitCode;
use std::time::Instant;

use shoal_sim::report::{self, Report};
use shoal_sim::scenarios::{self, NAMES};
use shoal_sim::{Checks, Strategy, run};

const USAGE: &str = "usage: shoal-sim <seed-example|kraken-bench|peak|faults|random-faults|cold|netns|netns-known|all> [--quick] [--seed N] [--only shoal|single-origin|random-mesh] [--check]";

struct Args {
    scenarios: Vec<String>,
    quick: bool,
    seed: u64,
    only: Option<Strategy>,
    checks: Checks,
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
    };
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
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown flag {s}")),
            s if scenario.is_none() => scenario = Some(s.to_string()),
            s => return Err(format!("unexpected argument {s:?}")),
        }
    }
    let scenario = scenario.ok_or("no scenario given")?;
    out.scenarios = if scenario == "all" {
        NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        vec![scenario]
    };
    Ok(out)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("shoal-sim: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut built = Vec::new();
    for name in &args.scenarios {
        match scenarios::build(name, args.quick, args.seed) {
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
