//! The model of the coordinator's CPU (`shoal-sim control`): what it must get right to be
//! trusted beside the load generator. Simulated time: these assert the model's behaviour,
//! not this machine's speed.

use std::time::Duration;

use shoal_sim::control::{API_GOAL_MS, LoadSpec, SESSION_GOAL_MS, WAIT_BUCKETS, row, run};

fn spec(agents: u32, blob_size: u64) -> LoadSpec {
    LoadSpec {
        steady_before: Duration::from_secs(1),
        ..LoadSpec::loadgen(agents, blob_size)
    }
}

/// Every target gets one order from the real planner and the job ends; the state thread's
/// CPU is what the costs add up to.
#[test]
fn every_target_is_ordered_once_and_the_job_ends() {
    let s = spec(3000, 64 << 20);
    let o = run(&s).expect("a valid spec");
    assert_eq!(o.orders, 2999);
    let done = o.job_done.expect("the job ended");
    assert!(done >= o.last_order, "done {done:?} before the last order");
    // Each download: a want, its planning, an order and a completion at least.
    let c = &s.costs;
    let floor = 2999.0 * (c.want + c.planned + c.order + c.completion) * 1e-6;
    let busy = o.busy[0].as_secs_f64();
    assert!(
        busy >= floor,
        "busy {busy} s below the downloads' own {floor} s"
    );
    assert!(!o.waits_us[0].is_empty());
}

/// The same spec gives the same outcome, to the microsecond.
#[test]
fn the_same_spec_gives_the_same_outcome() {
    let s = spec(2000, 64 << 20);
    let (a, b) = (run(&s).unwrap(), run(&s).unwrap());
    assert_eq!(a.waits_us, b.waits_us);
    assert_eq!((a.last_order, a.job_done), (b.last_order, b.job_done));
}

/// The turn rules are the coordinator's: without the rest after a turn that sent orders,
/// a wave's completions come back faster than the state thread takes them in, and the
/// session messages wait longer (what stop 41 measured on the loadgen: p99 ~48 → ~20 ms),
/// while the last order goes out sooner.
#[test]
fn the_rest_after_sending_orders_keeps_the_completions_from_queueing() {
    let paced = spec(20_000, 1 << 30);
    let mut unpaced = paced.clone();
    unpaced.turns.release_rest = 0.0;
    let (p, u) = (run(&paced).unwrap(), run(&unpaced).unwrap());
    assert!(
        u.wait_ms(99.0) > 2.0 * p.wait_ms(99.0),
        "p99 unpaced {} ms, paced {} ms",
        u.wait_ms(99.0),
        p.wait_ms(99.0)
    );
    assert!(u.last_order < p.last_order);
}

/// Blobs split over shards: each shard plans only its own, so the busiest shard's CPU for a
/// wave of several blobs falls as shards are added, and every order still goes out once.
#[test]
fn shards_share_a_wave_of_several_blobs() {
    let one = LoadSpec {
        blobs: 8,
        ..spec(2000, 64 << 20)
    };
    let four = LoadSpec {
        shards: 4,
        ..one.clone()
    };
    let (a, b) = (run(&one).unwrap(), run(&four).unwrap());
    assert_eq!(a.orders, 8 * 1999);
    assert_eq!(b.orders, 8 * 1999);
    assert_eq!(b.busy.len(), 4);
    let busiest = |o: &shoal_sim::control::LoadOutcome| o.busy.iter().max().copied().unwrap();
    assert!(
        busiest(&b) < busiest(&a).mul_f64(0.6),
        "one shard {:?}, the busiest of four {:?}",
        busiest(&a),
        busiest(&b)
    );
    assert!(b.job_done.unwrap() < a.job_done.unwrap());
}

/// Bad shapes are refused with a message, not a panic.
#[test]
fn a_bad_shape_is_refused() {
    for bad in [
        LoadSpec {
            agents: 1,
            ..spec(2, 1 << 20)
        },
        LoadSpec {
            shards: 0,
            ..spec(10, 1 << 20)
        },
        LoadSpec {
            link_bps: 0.0,
            ..spec(10, 1 << 20)
        },
    ] {
        assert!(run(&bad).is_err(), "{bad:?} accepted");
    }
}

/// The model reads its waits through the coordinator's own histogram buckets, as the
/// loadgen does: the same bounds, and a p99 that falls between two of them reads as the
/// loadgen's interpolation would.
#[test]
fn waits_are_read_through_the_coordinators_buckets() {
    assert_eq!(
        WAIT_BUCKETS,
        shoal_coordinator::metrics::REQUEST_WAIT_BUCKETS,
        "the model's buckets drifted from the coordinator's"
    );
    let o = run(&spec(3000, 64 << 20)).unwrap();
    let exact = o.wait_ms(99.0);
    let read = o.wait_ms_from_histogram(99.0);
    let bucket = |ms: f64| WAIT_BUCKETS.iter().position(|le| ms <= le * 1e3);
    assert_eq!(
        bucket(exact),
        bucket(read),
        "exact {exact} ms, read {read} ms"
    );
}

/// A row gives the p99 and the Distribute's turn as multiples of the goals, as the
/// loadgen's report does.
#[test]
fn a_row_gives_its_figures_against_the_goals() {
    let s = spec(2000, 64 << 20);
    let o = run(&s).unwrap();
    let ratios = format!(
        "| {:.2}, {:.2} |",
        o.wait_ms(99.0) / SESSION_GOAL_MS,
        o.distribute_turn.as_secs_f64() * 1e3 / API_GOAL_MS
    );
    assert!(o.distribute_turn.as_secs_f64() > 0.0);
    assert!(
        row(&s, &o).contains(&ratios),
        "{} lacks {ratios}",
        row(&s, &o)
    );
}
