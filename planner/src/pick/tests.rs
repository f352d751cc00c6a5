use std::collections::BTreeSet;
use std::time::Duration;

use super::*;

const A: HostId = HostId(1);
const B: HostId = HostId(2);
const C: HostId = HostId(3);

fn set(n: u32, range: std::ops::Range<u32>) -> ChunkSet {
    let mut s = ChunkSet::empty(n);
    for i in range {
        s.insert(ChunkIndex(i));
    }
    s
}

fn config(window: u32) -> PickerConfig {
    PickerConfig {
        initial_window: window,
        max_window: window.max(64),
        ..PickerConfig::default()
    }
}

/// Requests from `source` until it says no.
fn drain(p: &mut ChunkPicker, source: HostId) -> Vec<u32> {
    std::iter::from_fn(|| p.next_request(Time::ZERO, source))
        .map(|c| c.0)
        .collect()
}

#[test]
fn never_picks_held_or_in_flight_chunks() {
    let n = 300;
    let mut have = ChunkSet::empty(n);
    for i in (0..n).filter(|i| i % 3 == 0 || i % 7 == 0) {
        have.insert(ChunkIndex(i));
    }
    let missing = n - have.count();
    let mut p = ChunkPicker::new(have.clone(), 1, config(1_000));
    p.add_source(A, ChunkSet::full(n));
    p.add_source(B, set(n, 0..150));
    let mut seen = BTreeSet::new();
    let mut from_b = BTreeSet::new();
    for source in [B, A] {
        loop {
            let endgame = p.in_endgame();
            let Some(i) = p.next_request(Time::ZERO, source) else {
                break;
            };
            assert!(!have.contains(i), "picked held chunk {i}");
            if endgame {
                // A may only duplicate what B has out.
                assert!(source == A && from_b.contains(&i.0), "bad duplicate {i}");
            } else {
                assert!(
                    seen.insert(i.0),
                    "picked in-flight chunk {i} outside endgame"
                );
            }
            if source == B {
                from_b.insert(i.0);
            }
        }
    }
    assert_eq!(seen.len() as u32, missing);
    assert!(p.in_endgame());
    assert!(p.stats().duplicate_requests > 0);
}

#[test]
fn first_picks_are_random_then_rarest_first() {
    // 256 chunks; A has all, B has 0..128, C has 0..64: rarity 3 on 0..64, 2 on 64..128,
    // 1 on 128..256.
    let n = 256;
    let build = |seed, random_first| {
        let cfg = PickerConfig {
            random_first,
            ..config(1_000)
        };
        let mut p = ChunkPicker::new(ChunkSet::empty(n), seed, cfg);
        p.add_source(A, ChunkSet::full(n));
        p.add_source(B, set(n, 0..128));
        p.add_source(C, set(n, 0..64));
        p
    };
    assert_eq!(build(0, 0).rarity(ChunkIndex(70)), 2);
    // Without the random phase the very first pick from A is a rarity-1 chunk, and B
    // takes every rarity-2 chunk before any rarity-3 one.
    for seed in 0..20 {
        let mut p = build(seed, 0);
        assert!(p.next_request(Time::ZERO, A).unwrap().0 >= 128);
        let from_b = drain(&mut p, B);
        assert_eq!(from_b.len(), 128);
        assert!(
            from_b[..64].iter().all(|&i| (64..128).contains(&i)),
            "{from_b:?}"
        );
    }
    // With it, B's first 4 picks are spread over everything B has, common chunks included.
    let mut common = 0;
    let mut firsts = BTreeSet::new();
    for seed in 0..20 {
        let mut p = build(seed, 4);
        let picks = drain(&mut p, B);
        firsts.insert(picks[0]);
        common += picks[..4].iter().filter(|&&i| i < 64).count();
        // After the random phase, rarest-first: the remaining rarity-2 chunks come next.
        let rare_left = 64 - picks[..4].iter().filter(|&&i| i >= 64).count();
        assert!(
            picks[4..4 + rare_left].iter().all(|&i| i >= 64),
            "seed {seed}: {picks:?}"
        );
    }
    assert!(
        common >= 20,
        "random phase should hit common chunks about half the time: {common}"
    );
    assert!(
        firsts.len() >= 10,
        "first picks vary with the seed: {firsts:?}"
    );
}

#[test]
fn ties_are_broken_by_the_seed_reproducibly() {
    let run = |seed| {
        let mut p = ChunkPicker::new(ChunkSet::empty(500), seed, config(1_000));
        p.add_source(A, ChunkSet::full(500));
        drain(&mut p, A)
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
}

#[test]
fn endgame_duplicates_only_once_everything_missing_is_in_flight() {
    let n = 10;
    let mut p = ChunkPicker::new(ChunkSet::empty(n), 3, config(8));
    p.add_source(A, ChunkSet::full(n));
    p.add_source(B, ChunkSet::full(n));
    p.add_source(C, ChunkSet::full(n));
    let from_a: BTreeSet<u32> = drain(&mut p, A).into_iter().collect();
    assert_eq!(from_a.len(), 8);
    assert!(!p.in_endgame());
    let b1 = p.next_request(Time::ZERO, B).unwrap().0;
    assert!(
        !from_a.contains(&b1),
        "not a duplicate while chunks are unrequested"
    );
    assert!(!p.in_endgame());
    let b2 = p.next_request(Time::ZERO, B).unwrap().0;
    assert!(!from_a.contains(&b2) && b2 != b1);
    assert_eq!(p.stats().duplicate_requests, 0);
    assert!(p.in_endgame());
    // Now B duplicates A's requests (never its own), up to its window.
    let dups = drain(&mut p, B);
    assert_eq!(dups.len(), 6);
    assert!(dups.iter().all(|i| from_a.contains(i)));
    // C duplicates only chunks with a single request out (A's two left), bound = 2.
    // C duplicates only chunks with a single request out (A's two left and B's two):
    // at most `endgame_max_requests` = 2 per chunk.
    let from_c = drain(&mut p, C);
    assert_eq!(from_c.len(), 4);
    assert!(from_c.iter().all(|i| !dups.contains(i)));
    assert!(drain(&mut p, C).is_empty());
    assert_eq!(p.stats().duplicate_requests, 10);
    // The first copy wins; the duplicate is returned for cancelling and frees B's window.
    let cancel = p.on_chunk_done(Time::from_millis(1), A, ChunkIndex(dups[0]), 1 << 20);
    assert_eq!(cancel, vec![B]);
    assert_eq!(p.in_flight(B), 7);
    // A late copy is counted as waste, not as progress.
    p.on_chunk_done(Time::from_millis(2), B, ChunkIndex(dups[0]), 1 << 20);
    assert_eq!(p.stats().wasted_chunks, 1);
    assert_eq!(p.stats().chunks_done, 1);
}

#[test]
fn failed_and_abandoned_requests_return_to_the_pool() {
    let n = 4;
    let cfg = PickerConfig {
        endgame_max_requests: 1,
        ..config(8)
    };
    let mut p = ChunkPicker::new(ChunkSet::empty(n), 3, cfg);
    p.add_source(A, ChunkSet::full(n));
    let picks = drain(&mut p, A);
    assert_eq!(picks.len(), 4);
    p.on_chunk_failed(Time::ZERO, A, ChunkIndex(picks[0]));
    p.add_source(B, set(n, 0..4));
    assert_eq!(drain(&mut p, B), vec![picks[0]]);
    let abandoned = p.remove_source(A);
    assert_eq!(abandoned.len(), 3);
    assert_eq!(drain(&mut p, B).len(), 3);
    assert_eq!(p.rarity(ChunkIndex(0)), 1);
}

#[test]
fn window_follows_rate_times_rtt_within_bounds() {
    let cfg = PickerConfig {
        min_window: 2,
        max_window: 64,
        initial_window: 4,
        ..Default::default()
    };
    let mut p = ChunkPicker::new(ChunkSet::empty(1_000), 1, cfg);
    p.add_source(A, ChunkSet::full(1_000));
    assert_eq!(p.window(A), 4);
    let mut pending = drain(&mut p, A);
    assert_eq!(pending.len(), 4, "requests respect the initial window");
    // The source delivers back to back, 1 MiB per 1,048 µs: 1 GB/s.
    let mut now = Time::ZERO;
    for _ in 0..20 {
        now += Duration::from_micros(1_048);
        let c = pending.remove(0);
        p.on_chunk_done(now, A, ChunkIndex(c), 1 << 20);
        pending.extend(drain(&mut p, A));
    }
    p.set_rtt(A, Duration::from_millis(10)); // bdp = 10 MB ≈ 9.5 chunks
    assert_eq!(p.window(A), 12);
    p.set_rtt(A, Duration::from_millis(40));
    assert_eq!(p.window(A), 41, "window grows with rtt");
    p.set_rtt(A, Duration::from_secs(1));
    assert_eq!(p.window(A), 64, "clamped to max_window");
    p.set_rtt(A, Duration::ZERO);
    assert_eq!(p.window(A), 2, "floored at min_window");
    p.set_rtt(A, Duration::from_millis(10));
    drain(&mut p, A);
    assert_eq!(p.in_flight(A), 12, "requests fill exactly the window");
}

#[test]
fn window_grows_with_measured_rate() {
    let mut p = ChunkPicker::new(ChunkSet::empty(1_000), 1, PickerConfig::default());
    p.add_source(A, ChunkSet::full(1_000));
    p.set_rtt(A, Duration::from_millis(5));
    let mut now = Time::ZERO;
    // Slow source: 1 MiB per 10 ms.
    for _ in 0..20 {
        let c = p.next_request(now, A).unwrap();
        now += Duration::from_millis(10);
        p.on_chunk_done(now, A, c, 1 << 20);
    }
    let slow = p.window(A);
    // Fast source: 1 MiB per 100 µs.
    for _ in 0..40 {
        let c = p.next_request(now, A).unwrap();
        now += Duration::from_micros(100);
        p.on_chunk_done(now, A, c, 1 << 20);
    }
    let fast = p.window(A);
    assert_eq!(slow, 3);
    assert!(fast > 40 && fast <= 52, "{fast}");
}

#[test]
fn completes_from_partial_sources_that_grow() {
    let n = 333;
    let mut p = ChunkPicker::new(set(n, 0..33), 9, PickerConfig::default());
    p.add_source(A, set(n, 0..200));
    p.add_source(B, set(n, 100..n));
    p.add_source(C, ChunkSet::empty(n));
    let mut now = Time::ZERO;
    let mut rounds = 0;
    while !p.is_complete() {
        rounds += 1;
        assert!(rounds < 1_000, "stuck with {} missing", p.missing());
        now += Duration::from_millis(1);
        if rounds == 5 {
            p.source_have(C, (0..n).map(ChunkIndex));
        }
        for s in [A, B, C] {
            let picks: Vec<ChunkIndex> = std::iter::from_fn(|| p.next_request(now, s)).collect();
            for c in picks {
                if c.0 % 3 == 0 && rounds % 2 == 1 && rounds < 10 {
                    p.on_chunk_failed(now, s, c);
                } else {
                    p.on_chunk_done(now, s, c, 1 << 20);
                }
            }
        }
    }
    assert_eq!(p.stats().chunks_done, u64::from(n - 33));
    assert!(p.stats().failed_requests > 0);
    assert!(p.next_request(now, A).is_none());
}

#[test]
fn no_duplicates_while_another_source_has_unrequested_chunks() {
    let n = 10;
    let mut p = ChunkPicker::new(ChunkSet::empty(n), 4, config(8));
    p.add_source(A, set(n, 0..5));
    p.add_source(C, set(n, 0..5));
    assert_eq!(drain(&mut p, A).len(), 5);
    p.add_source(B, ChunkSet::full(n));
    // Everything C has is in flight at A, but 5..10 (only B has them) are unrequested:
    // not endgame, so C idles rather than duplicating.
    assert!(!p.in_endgame());
    assert!(p.next_request(Time::ZERO, C).is_none());
    assert_eq!(p.stats().duplicate_requests, 0);
    let from_b = drain(&mut p, B);
    assert_eq!(
        from_b.len(),
        8,
        "5 fresh, then 3 duplicates of A's up to B's window"
    );
    assert!(from_b[..5].iter().all(|&i| i >= 5));
    assert!(from_b[5..].iter().all(|&i| i < 5));
    // Now in endgame, C may duplicate A's two requests nobody duplicated yet.
    let from_c = drain(&mut p, C);
    assert_eq!(from_c.len(), 2);
    assert!(from_c.iter().all(|i| !from_b.contains(i)));
    assert_eq!(p.stats().duplicate_requests, 5);
}

#[test]
fn downloaders_of_one_source_ask_it_for_their_own_stripes() {
    let n = 64;
    let picks = |stripe: u32, seed: u64| {
        let mut p = ChunkPicker::new(ChunkSet::empty(n), seed, config(8));
        p.add_source(A, set(n, 0..n));
        p.set_stripe(A, stripe, 3);
        drain(&mut p, A)
    };
    // Random-first and rarest-first picks alike stay in the stripe while it has chunks.
    for (stripe, seed) in [(0, 1), (1, 2), (2, 3)] {
        let got = picks(stripe, seed);
        assert_eq!(got.len(), 8);
        assert!(
            got.iter().all(|i| i % 3 == stripe),
            "stripe {stripe}: {got:?}"
        );
    }

    // Once the stripe is exhausted, anything the source has is still picked.
    let mut p = ChunkPicker::new(set(n, 0..n - 2), 9, config(8));
    p.add_source(A, set(n, 0..n));
    p.set_stripe(A, 0, 3); // chunk 63 is in stripe 0, chunk 62 in stripe 2
    let mut got = drain(&mut p, A);
    got.sort();
    assert_eq!(got, vec![62, 63]);
}

#[test]
fn a_source_seeding_now_is_asked_for_its_stripe_only() {
    // The seeder has chunks 0..6 so far; our stripe of it is 0 of 3; peer B has 0..3.
    let n = 12;
    let mut p = ChunkPicker::new(ChunkSet::empty(n), 5, config(8));
    p.add_source(A, set(n, 0..6));
    p.set_stripe(A, 0, 3);
    p.set_stripe_only(A, true);
    p.add_source(B, set(n, 0..3));
    let mut from_a = drain(&mut p, A);
    from_a.sort();
    assert_eq!(from_a, vec![0, 3], "the stripe, nothing else");
    let mut from_b = drain(&mut p, B);
    from_b.sort();
    assert_eq!(from_b, vec![1, 2], "the rest from the peer");
    // An in-order reader does not pull the seeder's other chunks either.
    p.set_sequential(Some(ChunkIndex(4)));
    p.source_have(A, [ChunkIndex(6)]);
    assert_eq!(drain(&mut p, A), vec![6]);
    // Back to a plain stripe (the seed ended): anything it has.
    p.set_stripe_only(A, false);
    let mut rest = drain(&mut p, A);
    rest.sort();
    assert_eq!(rest, vec![4, 5]);
}

#[test]
fn no_endgame_while_missing_chunks_are_not_out_anywhere() {
    // A swarm peer holds the first half so far; the rest is still on its way to it.
    let n = 20;
    let mut p = ChunkPicker::new(ChunkSet::empty(n), 4, config(64));
    p.add_source(A, set(n, 0..10));
    p.add_source(B, set(n, 0..10));
    let mut picked = drain(&mut p, A);
    picked.extend(drain(&mut p, B));
    assert_eq!(picked.len(), 10, "each available chunk once: {picked:?}");
    assert!(!p.in_endgame());
    assert_eq!(p.stats().duplicate_requests, 0);
    // The rest arrives at A: requested once each, then endgame may duplicate.
    p.source_have(A, (10..n).map(ChunkIndex));
    assert_eq!(drain(&mut p, A).len(), 10);
    assert!(p.in_endgame());
}

#[test]
fn a_chunk_whose_rarity_rose_in_flight_returns_to_the_pool() {
    // Found by the simulator: the chunk's rarity passed every pooled chunk's while it was
    // requested, so putting it back after a failure indexed past the buckets (a panic in
    // the agent, triggered by peers' have-messages).
    let n = 4;
    let mut p = ChunkPicker::new(ChunkSet::empty(n), 1, config(8));
    p.add_source(A, set(n, 0..1));
    assert_eq!(p.next_request(Time::ZERO, A), Some(ChunkIndex(0)));
    p.add_source(B, set(n, 0..1));
    p.add_source(C, set(n, 0..1));
    assert_eq!(p.rarity(ChunkIndex(0)), 3);
    p.on_chunk_failed(Time::ZERO, A, ChunkIndex(0));
    assert_eq!(p.next_request(Time::ZERO, B), Some(ChunkIndex(0)));
}

#[test]
fn an_in_order_reader_gets_its_next_chunks_first() {
    let n = 64;
    let mut have = ChunkSet::empty(n);
    have.insert(ChunkIndex(10));
    let mut p = ChunkPicker::new(have, 3, config(4));
    p.add_source(A, ChunkSet::full(n));
    p.set_sequential(Some(ChunkIndex(8)));
    // 8, 9, then 11 and 12 (10 is held): the reader's next chunks, in order.
    assert_eq!(drain(&mut p, A), vec![8, 9, 11, 12]);
    p.set_sequential(None);
    let mut q = ChunkPicker::new(ChunkSet::empty(n), 3, config(4));
    q.add_source(A, ChunkSet::full(n));
    assert_ne!(
        drain(&mut q, A),
        vec![0, 1, 2, 3],
        "without a reader, no order"
    );
}
