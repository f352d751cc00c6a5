//! The `--quick` variant of every scenario, under Shoal and both baselines, as CI runs it.
//!
//! Every run must finish every live host, store nothing corrupt and keep every invariant,
//! and every goal is asserted as the issue states it.

use shoal_sim::report::{self, Report};
use shoal_sim::scenarios;
use shoal_sim::{Checks, Strategy, run};

/// Runs one quick scenario, prints its rows and goals, and returns the report's figures.
fn quick(name: &str) -> (f64, f64, f64, f64, f64, f64) {
    let (spec, goals) = scenarios::build(name, true, 1).expect("scenario");
    let runs: Vec<_> = [
        Strategy::Shoal,
        Strategy::SingleOrigin,
        Strategy::RandomMesh,
    ]
    .into_iter()
    .map(|s| run(&spec, s, Checks::Cheap))
    .collect();
    let r = Report {
        spec: &spec,
        runs,
        wall: 0.0,
    };
    println!("{}\n{}", report::HEADER, report::RULE);
    for row in report::rows(&r) {
        println!("{row}");
    }
    for (ok, what) in report::judge(&r, &goals) {
        println!("{} {what}", if ok { "PASS" } else { "FAIL" });
    }
    for o in &r.runs {
        assert!(
            o.violations.is_empty(),
            "{name}/{}: {:?}",
            o.strategy.name(),
            o.violations
        );
        assert_eq!(o.stored_corrupt, 0, "{name}/{}", o.strategy.name());
    }
    let shoal = r.get(Strategy::Shoal).expect("shoal ran");
    let mesh = r.get(Strategy::RandomMesh).expect("mesh ran");
    assert!(
        shoal.all_live_finished(),
        "{name}: a live host never finished"
    );
    let bound = spec.bound();
    (
        shoal.makespan().unwrap_or(f64::INFINITY) / bound,
        shoal.percentile(99.0) / bound,
        shoal.percentile(99.9) / bound,
        shoal.origin_egress as f64 / spec.unique_bytes() as f64,
        shoal.percentile(99.0),
        mesh.percentile(99.0),
    )
}

#[test]
fn seed_example_quick() {
    let (makespan, _, _, _, p99, mesh_p99) = quick("seed-example");
    assert!(p99 < mesh_p99, "p99 {p99} vs random mesh {mesh_p99}");
    assert!(makespan <= 1.10, "makespan {makespan:.3} x bound");
}

#[test]
fn kraken_bench_quick() {
    let (_, p99, p999, _, ours, mesh) = quick("kraken-bench");
    assert!(p99 <= 1.15, "p99 {p99:.3} x bound");
    assert!(p999 <= 1.25, "p99.9 {p999:.3} x bound");
    assert!(ours < mesh, "p99 {ours} vs random mesh {mesh}");
}

#[test]
fn peak_quick() {
    let (makespan, _, _, egress, ours, mesh) = quick("peak");
    assert!(ours < mesh, "p99 {ours} vs random mesh {mesh}");
    assert!(makespan * 13.7 <= 30.0, "makespan past 30 s");
    assert!(makespan <= 1.25, "makespan {makespan:.3} x bound");
    assert!(egress <= 1.05, "origin egress {egress:.3} x unique");
}

#[test]
fn faults_quick() {
    // Every live host completes and nothing corrupt is stored (asserted in `quick`).
    let (_, _, _, _, ours, mesh) = quick("faults");
    assert!(ours < mesh, "p99 {ours} vs random mesh {mesh}");
}

/// Blobs only an external origin holds: the simulator runs production's `Seeder`
/// (`shoal_planner::Seeder`, the code the coordinator runs), which elects seeders, splits
/// the 2 GB blob into origin ranges, and re-elects when a range seeder crashes mid-fetch.
#[test]
fn cold_quick_runs_the_production_seeder() {
    let (_, _, _, egress, _, _) = quick("cold");
    let (spec, _) = scenarios::build("cold", true, 1).expect("scenario");
    let o = run(&spec, Strategy::Shoal, Checks::EveryEvent);
    assert!(o.violations.is_empty(), "{:?}", o.violations);
    assert!(o.all_live_finished(), "a live host never finished");
    let s = o.seeding.expect("the Shoal run drives the Seeder");
    assert!(s.range_orders >= 2, "the 2 GB blob was not split: {s:?}");
    assert!(s.ranges_seeded >= 2, "{s:?}");
    assert!(
        s.failed_seeds >= 1,
        "the crashed range seeder was never noticed: {s:?}"
    );
    assert_eq!(s.seeded, 5, "every blob is seeded once: {s:?}");
    assert_eq!(s.gave_up, 0, "{s:?}");
    assert!(egress <= 1.25, "origin egress {egress:.3} x unique");
}

/// The real-network benchmark's shape, with the capacity the agents announce unknown (10
/// Gbit/s) and known: both complete with every invariant kept. How far the predictions are
/// from the measured runs is in docs/BENCHMARKS.md.
#[test]
fn netns_shape_runs_with_capacity_unknown_and_known() {
    for name in ["netns", "netns-known"] {
        let (spec, _) = scenarios::build(name, true, 1).expect("scenario");
        let o = run(&spec, Strategy::Shoal, Checks::EveryEvent);
        assert!(o.violations.is_empty(), "{name}: {:?}", o.violations);
        assert!(o.all_live_finished(), "{name}: a target never finished");
    }
}

/// The shared CPU of the netns shape: the machine moves no more bytes per second than its
/// cores allow, and a CPU with room to spare changes nothing.
#[test]
fn a_shared_cpu_bounds_the_bytes_moved_per_second_and_nothing_else() {
    use scenarios::NetnsShape;
    use shoal_sim::spec::SharedCpu;
    let shape = |cpu| NetnsShape {
        targets: 4,
        size_mib: 32,
        cpu,
        ..NetnsShape::default()
    };
    let makespan = |cpu| {
        let spec = scenarios::netns(1, false, &shape(cpu));
        let o = run(&spec, Strategy::Shoal, Checks::EveryEvent);
        assert!(o.violations.is_empty(), "{:?}", o.violations);
        assert!(o.all_live_finished(), "a target never finished");
        (o.makespan().expect("finished"), o.bytes_moved as f64)
    };
    let (free, _) = makespan(None);
    let (roomy, _) = makespan(Some(SharedCpu {
        cores: 64.0,
        secs_per_byte: 1e-9,
    }));
    assert_eq!(free, roomy, "a CPU that never binds changes the run");
    // 20 ns of CPU per byte on one core: 50 MB/s for the whole machine, a quarter of what
    // four 25 MB/s downlinks take.
    let cpu = SharedCpu {
        cores: 1.0,
        secs_per_byte: 20e-9,
    };
    let (bound, moved) = makespan(Some(cpu));
    let floor = moved * cpu.secs_per_byte / cpu.cores;
    assert!(
        bound >= floor * 0.999,
        "{moved} bytes moved in {bound} s: faster than the CPU allows ({floor} s)"
    );
    assert!(
        bound <= floor * 1.2 && bound > 1.5 * free,
        "CPU-bound run took {bound} s, the CPU's floor is {floor} s, the links' run {free} s"
    );
}
