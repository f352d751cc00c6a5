//! A burst of wants bigger than one slice (see `intake`): planned a slice per timeout, its
//! commands held until the last slice, and the same commands as one big step.

use super::*;

/// A seed of blob 1 and `n` targets spread over `racks`, planning `slice` wants at once.
fn cluster(slice: usize, n: u32, racks: u32) -> Harness {
    let mut t = Harness::new(AssignerConfig {
        intake_slice: slice,
        ..cfg(3, 8)
    });
    t.seed(0, 0, 0, 10 * GBPS, blob(1));
    for i in 1..=n {
        t.up(i, 0, i % racks, GBPS);
    }
    t
}

/// Every target wants blob 1, all in one batch (which `then` may add to before it ends).
fn want_all(t: &mut Harness, n: u32, then: impl FnOnce(&mut Harness)) {
    t.a.begin_batch();
    for i in 1..=n {
        let want = Event::Want {
            blob: blob(1),
            host: h(i),
            priority: 0,
        };
        t.a.handle(t.now, want);
    }
    then(t);
    t.a.end_batch();
    t.a.check_invariants().unwrap();
}

/// Runs the timeouts due now until none is; `each` sees each one's commands.
fn run_due(t: &mut Harness, mut each: impl FnMut(&mut Harness, Vec<Command>)) -> usize {
    let mut timeouts = 0;
    while let Some(due) = t.a.poll_timeout().filter(|d| *d <= t.now) {
        assert!(timeouts < 1000, "the intake never drains");
        t.a.handle_timeout(due);
        t.a.check_invariants().unwrap();
        let out = t.drain();
        each(t, out);
        timeouts += 1;
    }
    timeouts
}

/// 40 targets in four racks: every command, and how many timeouts it took.
fn burst(slice: usize) -> (Vec<Command>, usize) {
    let mut t = cluster(slice, 40, 4);
    want_all(&mut t, 40, |_| {});
    let mut out = t.drain();
    let timeouts = run_due(&mut t, |_, more| out.extend(more));
    (out, timeouts)
}

#[test]
fn a_burst_is_planned_a_slice_per_timeout_with_the_same_commands_as_one_step() {
    let (whole, none) = burst(usize::MAX);
    assert_eq!(none, 0, "one step plans it all");
    let (sliced, timeouts) = burst(4);
    // Nine to plan the 36 queued wants 4 at a time; the last of them releases 8 orders
    // (two slices' worth), four more the other 32.
    assert_eq!(timeouts, 13);
    let fetches = |c: &[Command]| {
        c.iter()
            .filter(|c| matches!(c, Command::Fetch { .. }))
            .count()
    };
    assert_eq!(fetches(&whole), 40);
    assert_eq!(
        sliced, whole,
        "the slices apply the same wants in the same order"
    );
}

#[test]
fn a_blob_with_queued_wants_holds_its_commands_then_releases_them_in_slices() {
    let mut t = cluster(2, 40, 1);
    want_all(&mut t, 40, |_| {});
    assert_eq!(t.a.queued_wants(), 38);
    assert!(
        t.drain().is_empty(),
        "nothing goes out before the burst is planned"
    );
    let mut released = Vec::new();
    run_due(&mut t, |t, out| {
        if t.a.queued_wants() > 0 {
            assert!(out.is_empty(), "{out:?} went out with wants still queued");
        } else {
            assert!(out.len() <= 4, "a release is two intake slices");
            released.push(out.len());
            // Only timeouts release: an event's step (or a read's) does not pay for it.
            t.a.handle(t.now, Event::Heartbeat { host: h(1) });
            assert!(t.drain().is_empty(), "an event released held commands");
        }
    });
    assert_eq!(released, [4; 10], "released in slices");
}

#[test]
fn an_unwant_withdraws_a_queued_want() {
    let x = blob(1);
    let mut t = cluster(1, 3, 1);
    want_all(&mut t, 3, |t| {
        t.a.handle(
            t.now,
            Event::Unwant {
                blob: x,
                host: h(3),
            },
        );
    });
    assert_eq!(t.a.queued_wants(), 1);
    let mut out = t.drain();
    run_due(&mut t, |_, more| out.extend(more));
    let ordered: Vec<HostId> = (out.iter())
        .filter_map(|c| match c {
            Command::Fetch { host, .. } => Some(*host),
            _ => None,
        })
        .collect();
    assert_eq!(ordered, vec![h(1), h(2)], "{out:?}");
    assert!(
        t.a.sources(x, h(3)).is_none(),
        "no download for the withdrawn want"
    );
}
