//! Edge splitting, batches and stripe-update delays: how a swarm that arrives at once is
//! planned.

use super::*;

#[test]
fn split_edges_of_fresh_downloads() {
    let x = blob(1);
    let mut t = Harness::new(cfg(1, 1));
    t.seed(0, 0, 0, GBPS, x);
    for host in 1..=4 {
        t.up(host, 0, 0, GBPS);
    }
    assert_eq!(t.want(1, x), vec![fetch(1, x, &[0])]);
    assert_eq!(t.want(2, x), vec![fetch(2, x, &[1])]);
    // Host 2 has nothing yet: its edge from host 1 (partial) becomes 1 -> 3 -> 2, so
    // targets that arrive together form a random graph rather than a band in arrival
    // order. The edge from the seed (complete) is never split.
    let mut out = t.want(3, x);
    out.sort_by_key(Command::host);
    assert_eq!(out, vec![update(2, x, &[3]), fetch(3, x, &[1])]);
    assert_eq!(t.a.stats().splits, 1);
    t.a.check_invariants().unwrap();
    // Host 2 got a chunk: its download is running and keeps its source. Host 3's edge
    // is split instead.
    t.ev(Event::Holds {
        host: h(2),
        blob: x,
        chunks: 1,
        complete: false,
    });
    let mut out = t.want(4, x);
    out.sort_by_key(Command::host);
    assert_eq!(out, vec![update(3, x, &[4]), fetch(4, x, &[1])]);
    t.a.check_invariants().unwrap();
}

/// Hops from the seed (host 0) to every target over source edges, the longest of them.
fn depth(t: &Harness, b: BlobId, targets: std::ops::RangeInclusive<u32>) -> usize {
    let mut dist: BTreeMap<u32, usize> = BTreeMap::from([(0, 0)]);
    let mut changed = true;
    while changed {
        changed = false;
        for target in targets.clone() {
            let best = (t.sources(target, b).iter())
                .filter_map(|s| dist.get(&s.0).map(|d| d + 1))
                .min();
            if let Some(d) = best
                && dist.get(&target).is_none_or(|old| d < *old)
            {
                dist.insert(target, d);
                changed = true;
            }
        }
    }
    assert_eq!(
        dist.len(),
        targets.count() + 1,
        "every target reaches the seed"
    );
    dist.values().copied().max().unwrap_or(0)
}

#[test]
fn targets_arriving_together_form_a_shallow_graph_not_a_band() {
    // 400 targets want one blob at once; each host's upload covers exactly K downloads,
    // so the only holders with room are the latest arrivals. Taking those made a band in
    // arrival order, about 400 / K hops deep; splitting edges keeps it logarithmic.
    let x = blob(1);
    let mut t = Harness::new(cfg(4, 256));
    t.seed(0, 0, 0, GBPS, x);
    for host in 1..=400 {
        t.up(host, 0, host / 40, GBPS);
    }
    for host in 1..=400 {
        t.want(host, x);
    }
    for host in 1..=400 {
        assert_eq!(t.sources(host, x).len(), 4, "host {host} has K sources");
        assert!(
            t.a.uploads(h(host)) <= 4,
            "host {host} serves at most its upload"
        );
    }
    let d = depth(&t, x, 1..=400);
    assert!(d <= 10, "the source graph is {d} hops deep");
    assert!(t.a.stats().splits > 1000, "{:?}", t.a.stats());
}

#[test]
fn a_batch_sends_one_command_per_download() {
    let x = blob(1);
    let run = |batch: bool| {
        let mut t = Harness::new(cfg(4, 256));
        t.seed(0, 0, 0, GBPS, x);
        for host in 1..=60 {
            t.up(host, 0, 0, GBPS);
        }
        if batch {
            t.a.begin_batch();
        }
        let mut out = Vec::new();
        for host in 1..=60 {
            out.extend(t.want(host, x));
        }
        if batch {
            assert!(out.is_empty(), "withheld until the batch ends: {out:?}");
            t.a.end_batch();
            t.a.check_invariants().unwrap();
            out = t.drain();
        }
        let sources: Vec<Vec<HostId>> = (1..=60).map(|host| t.sources(host, x)).collect();
        (out, sources)
    };
    let (batched, planned) = run(true);
    // The same decisions, but each target's first command already has its final sources.
    let (unbatched, same) = run(false);
    assert_eq!(planned, same);
    assert!(
        (unbatched.iter()).any(|c| matches!(c, Command::UpdateSources { .. })),
        "without a batch, later arrivals re-plan earlier ones"
    );
    let mut expected: Vec<Command> = (1..=60u32)
        .map(|host| Command::Fetch {
            host: h(host),
            blob: x,
            sources: planned[host as usize - 1].clone(),
        })
        .collect();
    let mut got = batched;
    got.sort_by_key(Command::host);
    expected.sort_by_key(Command::host);
    assert_eq!(got, expected);
}

#[test]
fn stripe_updates_wait_and_coalesce() {
    let x = blob(1);
    let delay = Duration::from_millis(100);
    let mut t = Harness::new(AssignerConfig {
        restripe_delay: delay,
        ..cfg(1, 8)
    });
    t.seed(0, 0, 0, 10 * GBPS, x);
    for host in 1..=3 {
        t.up(host, 0, 0, GBPS);
    }
    assert_eq!(t.want(1, x), vec![fetch(1, x, &[0])]);
    // Each newcomer's order goes out at once; the stripes of the seed's other downloaders
    // change twice, but they hear of it once, after the delay.
    assert_eq!(t.want(2, x), vec![fetch(2, x, &[0])]);
    t.now += delay / 2;
    assert_eq!(t.want(3, x), vec![fetch(3, x, &[0])]);
    assert_eq!(t.a.stripe(x, h(1), h(0)), Some((0, 3)));
    let due = t.a.poll_timeout().expect("a stripe update is due");
    assert_eq!(due, Time::ZERO + delay);
    t.now = due;
    t.a.handle_timeout(t.now);
    let mut out = t.drain();
    out.sort_by_key(Command::host);
    assert_eq!(out, vec![update(1, x, &[0]), update(2, x, &[0])]);
    assert!(t.a.stats().restripes_coalesced >= 2, "{:?}", t.a.stats());
    // Host 3's order already had its stripe: nothing more for anyone.
    t.now += delay;
    t.a.handle_timeout(t.now);
    assert!(t.drain().is_empty());
    t.a.check_invariants().unwrap();
}

#[test]
fn a_freed_stripe_goes_to_the_next_download_and_nobody_else_hears_of_it() {
    freed_stripes(false);
}

#[test]
fn an_origin_seeders_empty_stripe_closes_after_a_while() {
    freed_stripes(true);
}

/// A seed serving four downloads three at a time; `origin`: it seeds from its origin (holds
/// part of the blob, downloads none), so it sends each chunk only to its stripe's owner.
fn freed_stripes(origin: bool) {
    let x = blob(1);
    let delay = Duration::from_millis(100);
    let mut t = Harness::new(AssignerConfig {
        restripe_delay: delay,
        ..cfg(1, 3)
    });
    if origin {
        t.up(0, 0, 0, 100 * GBPS);
        let holds = Event::Holds {
            host: h(0),
            blob: x,
            chunks: 1,
            complete: false,
        };
        assert!(t.ev(holds).is_empty());
    } else {
        t.seed(0, 0, 0, 100 * GBPS, x);
    }
    for host in 1..=4 {
        t.up(host, 0, 0, 0); // they cannot upload: only the seed serves
        t.want(host, x);
    }
    t.now += delay;
    t.a.handle_timeout(t.now);
    t.drain();
    let stripes = |t: &Harness| -> Vec<Option<(u32, u32)>> {
        (1..=4).map(|n| t.a.stripe(x, h(n), h(0))).collect()
    };
    assert_eq!(
        stripes(&t),
        vec![Some((0, 3)), Some((1, 3)), Some((2, 3)), None]
    );
    // Host 2 finishes; host 4, waiting, takes its slot. Hosts 1 and 3 keep their stripes
    // and hear nothing, now or later.
    assert_eq!(
        t.ev(Event::Done {
            host: h(2),
            blob: x
        }),
        vec![fetch(4, x, &[0])]
    );
    assert_eq!(t.a.stripe(x, h(4), h(0)), Some((1, 3)));
    t.now += delay;
    t.a.handle_timeout(t.now);
    assert!(t.drain().is_empty());
    let updates_before = t.a.stats().stripe_updates;
    // Host 3 finishes with nobody waiting: its stripe is nobody's.
    assert!(
        t.ev(Event::Done {
            host: h(3),
            blob: x
        })
        .is_empty()
    );
    if !origin {
        // A seed serving from its store sends any chunk to whoever asks: the hole is only
        // nobody's first choice, and the others keep their stripes and hear nothing.
        t.now += delay * stripes::COMPACT_AFTER * 2;
        t.a.handle_timeout(t.now);
        assert!(t.drain().is_empty());
        assert_eq!(stripes(&t), vec![Some((0, 3)), None, None, Some((1, 3))]);
        assert_eq!(t.a.stats().stripe_updates, updates_before);
        t.a.check_invariants().unwrap();
        return;
    }
    // An origin seeder's hole would leave a third of its chunks unsent: after a while the
    // others close ranks, one update each.
    t.now += delay * (stripes::COMPACT_AFTER - 1);
    t.a.handle_timeout(t.now);
    let early = t.drain();
    assert!(early.is_empty(), "{early:?}");
    assert_eq!(t.a.stripe(x, h(1), h(0)), Some((0, 3)), "not yet");
    t.now += delay;
    t.a.handle_timeout(t.now);
    let mut out = t.drain();
    out.sort_by_key(Command::host);
    assert_eq!(out, vec![update(1, x, &[0]), update(4, x, &[0])]);
    assert_eq!(stripes(&t), vec![Some((0, 2)), None, None, Some((1, 2))]);
    assert_eq!(t.a.stats().stripe_updates, updates_before + 2);
    t.a.check_invariants().unwrap();
}
