//! Deterministic fault testing: 20 seeds of random faults (crashes with and without restart,
//! slow hosts, a host serving corrupt chunks, coordinator restarts) at tens of hosts, with
//! the planner's invariants checked after every event. A failing seed prints the command
//! that replays it.

use shoal_sim::scenarios::random_faults;
use shoal_sim::{Checks, Outcome, Strategy, run};

const SEEDS: u64 = 20;

fn replay(seed: u64) -> String {
    format!("cargo run --release -p shoal-sim -- random-faults --seed {seed} --check --only shoal")
}

fn problems(o: &Outcome) -> Vec<String> {
    let mut out = o.violations.clone();
    if o.stored_corrupt > 0 {
        out.push(format!("{} corrupt chunks stored", o.stored_corrupt));
    }
    let unfinished = (o.finished.iter().zip(&o.live))
        .filter(|(f, live)| **live && f.is_none())
        .count();
    if unfinished > 0 {
        out.push(format!(
            "{unfinished} live hosts never finished (stopped at {:.1} s simulated)",
            o.end
        ));
    }
    out
}

#[test]
fn random_faults_keep_every_invariant_and_every_live_host_finishes() {
    let mut failures = Vec::new();
    let mut rejected = 0;
    let mut crashes = 0;
    for seed in 0..SEEDS {
        let spec = random_faults(seed);
        crashes += (spec.faults.iter())
            .filter(|f| matches!(f, shoal_sim::Fault::Crash { .. }))
            .count();
        let o = run(&spec, Strategy::Shoal, Checks::EveryEvent);
        rejected += o.rejected_chunks;
        let p = problems(&o);
        if !p.is_empty() {
            failures.push(format!(
                "seed {seed}: {}\n  replay: {}",
                p.join("; "),
                replay(seed)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The seeds must actually exercise the faults, or the test proves nothing.
    assert!(crashes >= 10, "only {crashes} crashes over {SEEDS} seeds");
    assert!(rejected > 0, "no corrupt chunk was ever served");
}

#[test]
fn the_same_seed_gives_the_same_result_bit_for_bit() {
    for seed in [3, 11] {
        let spec = random_faults(seed);
        let a = run(&spec, Strategy::Shoal, Checks::Cheap);
        let b = run(&spec, Strategy::Shoal, Checks::Cheap);
        assert_eq!(
            format!(
                "{:?}",
                (
                    &a.finished,
                    a.origin_egress,
                    a.bytes_moved,
                    &a.planner,
                    a.steps
                )
            ),
            format!(
                "{:?}",
                (
                    &b.finished,
                    b.origin_egress,
                    b.bytes_moved,
                    &b.planner,
                    b.steps
                )
            ),
            "seed {seed} is not deterministic; replay: {}",
            replay(seed)
        );
    }
    let a = run(&random_faults(3), Strategy::Shoal, Checks::Cheap);
    let c = run(&random_faults(4), Strategy::Shoal, Checks::Cheap);
    assert_ne!(a.finished, c.finished, "different seeds must differ");
}
