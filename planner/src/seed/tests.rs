use std::time::Duration;

use super::*;

const MIB: u64 = 1 << 20;

fn blob(n: u8) -> BlobId {
    BlobId(Digest::from_bytes([n; 32]))
}

fn h(n: u32) -> HostId {
    HostId(n)
}

fn seeder() -> Seeder {
    Seeder::new(SeederConfig {
        stripe_min_bytes: 8 * MIB,
        max_seeders_per_blob: 4,
        max_attempts: 3,
        chunk_size: MIB as u32,
        url_fetch_timeout: Duration::from_secs(60),
        max_urls: 3,
    })
}

/// `n` ready hosts waiting for `b` (of `size` bytes), handled as one batch.
fn waiting(s: &mut Seeder, b: BlobId, n: u32, size: u64) {
    for i in 0..n {
        s.handle(Time::ZERO, SeedEvent::HostReady { host: h(i) });
        s.handle(
            Time::ZERO,
            SeedEvent::Wait {
                blob: b,
                host: h(i),
                size,
            },
        );
    }
}

fn commands(s: &mut Seeder) -> Vec<SeedCommand> {
    std::iter::from_fn(|| s.poll_command()).collect()
}

fn notices(s: &mut Seeder) -> Vec<SeedNotice> {
    std::iter::from_fn(|| s.poll_notice()).collect()
}

fn seeds(cmds: &[SeedCommand]) -> Vec<(HostId, Option<(u64, u64)>)> {
    (cmds.iter())
        .filter_map(|c| match c {
            SeedCommand::Seed { host, range, .. } => Some((*host, *range)),
            SeedCommand::Stop { .. } => None,
        })
        .collect()
}

fn fail(s: &mut Seeder, b: BlobId, host: HostId, fault: SeedFault) {
    s.handle(
        Time::ZERO,
        SeedEvent::Failed {
            blob: b,
            host,
            fault,
            message: format!("{fault:?}"),
        },
    );
}

fn digests(n: u32) -> Vec<Digest> {
    (0..n).map(|i| Digest::of(&i.to_be_bytes())).collect()
}

#[test]
fn one_seeder_fetches_the_whole_small_blob_and_the_others_wait_for_it() {
    let mut s = seeder();
    let b = blob(1);
    waiting(&mut s, b, 5, MIB);
    let cmds = commands(&mut s);
    assert_eq!(seeds(&cmds), vec![(h(0), None)], "one seeder, whole blob");
    assert!(commands(&mut s).is_empty(), "elected once");
    assert_eq!(s.seeding_range(b, h(0)), Some(None));
    s.handle(
        Time::ZERO,
        SeedEvent::Known {
            blob: b,
            by: Some(h(0)),
        },
    );
    let n = notices(&mut s);
    assert_eq!(
        n,
        vec![SeedNotice::Seeded {
            blob: b,
            waiting: (0..5).map(h).collect()
        }]
    );
    assert!(!s.is_seeding(b));
    assert!(
        commands(&mut s).is_empty(),
        "the seeder registered it: nothing to stop"
    );
}

#[test]
fn a_batch_of_targets_is_seen_whole_before_the_blob_is_striped() {
    let mut s = seeder();
    let b = blob(2);
    // 10 MiB over 6 ready targets: 4 ranges (the most seeders per blob).
    waiting(&mut s, b, 6, 10 * MIB);
    let got = seeds(&commands(&mut s));
    assert_eq!(
        got,
        vec![
            (h(0), Some((0, 3 * MIB))),
            (h(1), Some((3 * MIB, 6 * MIB))),
            (h(2), Some((6 * MIB, 8 * MIB))),
            (h(3), Some((8 * MIB, 10 * MIB))),
        ]
    );
    // Every range in: the manifest is assembled from them, and each seeder holds its range.
    for (i, (host, range)) in got.iter().enumerate() {
        let (start, end) = range.expect("range");
        s.handle(
            Time::ZERO,
            SeedEvent::RangeSeeded {
                blob: b,
                host: *host,
                first_chunk: (start / MIB) as u32,
                digests: digests(((end - start) / MIB) as u32),
            },
        );
        if i < 3 {
            assert!(notices(&mut s).is_empty());
        }
    }
    let n = notices(&mut s);
    let [
        SeedNotice::Assembled {
            size,
            digests,
            held,
            ..
        },
    ] = n.as_slice()
    else {
        panic!("{n:?}");
    };
    assert_eq!((*size, digests.len()), (10 * MIB, 10));
    assert_eq!(
        held,
        &vec![(h(0), 0, 3), (h(1), 3, 3), (h(2), 6, 2), (h(3), 8, 2)]
    );
    s.handle(Time::ZERO, SeedEvent::Known { blob: b, by: None });
    assert!(
        matches!(notices(&mut s).as_slice(), [SeedNotice::Seeded { waiting, .. }] if waiting.len() == 6)
    );
    assert!(
        commands(&mut s).is_empty(),
        "every range is in: nothing to stop"
    );
}

#[test]
fn a_failed_seed_moves_to_another_target_then_gives_up_after_max_attempts() {
    let mut s = seeder();
    let b = blob(3);
    waiting(&mut s, b, 5, MIB);
    let mut seeders = Vec::new();
    for _ in 0..3 {
        let got = seeds(&commands(&mut s));
        assert_eq!(got.len(), 1);
        let (host, _) = got[0];
        assert!(!seeders.contains(&host), "never the same agent twice");
        seeders.push(host);
        fail(&mut s, b, host, SeedFault::Transient);
    }
    let n = notices(&mut s);
    let [SeedNotice::Failed { cause, waiting, .. }] = n.as_slice() else {
        panic!("{n:?}");
    };
    assert!(
        matches!(cause, GiveUp::Exhausted { attempts: 3, last: Some(LastError::Failed { host, .. }) } if *host == seeders[2]),
        "{cause:?}"
    );
    assert_eq!(waiting.len(), 5, "every waiting target fails");
    assert!(!s.is_seeding(b));
}

#[test]
fn a_seeders_own_disk_fault_excludes_it_but_does_not_count_against_the_origin() {
    let mut s = seeder();
    let b = blob(4);
    waiting(&mut s, b, 6, MIB);
    for _ in 0..4 {
        let got = seeds(&commands(&mut s));
        assert_eq!(got.len(), 1);
        fail(&mut s, b, got[0].0, SeedFault::Local);
    }
    // Four agents' disks failed; the origin was never blamed: a fifth agent seeds.
    assert!(notices(&mut s).is_empty());
    let got = seeds(&commands(&mut s));
    assert_eq!(got, vec![(h(4), None)]);
    assert_eq!(s.stats().local_faults, 4);
}

#[test]
fn an_answer_every_agent_would_get_fails_every_target_at_once() {
    for fault in [SeedFault::Missing, SeedFault::Mismatch] {
        let mut s = seeder();
        let b = blob(5);
        waiting(&mut s, b, 3, MIB);
        let got = seeds(&commands(&mut s));
        fail(&mut s, b, got[0].0, fault);
        let n = notices(&mut s);
        assert!(
            matches!(n.as_slice(), [SeedNotice::Failed { cause: GiveUp::Definitive { fault: f, .. }, waiting, .. }] if *f == fault && waiting.len() == 3),
            "{n:?}"
        );
        assert!(seeds(&commands(&mut s)).is_empty(), "nobody else tries");
    }
}

#[test]
fn a_lone_target_whose_seed_fails_does_not_wait_forever() {
    let mut s = seeder();
    let b = blob(6);
    waiting(&mut s, b, 1, MIB);
    let got = seeds(&commands(&mut s));
    fail(&mut s, b, got[0].0, SeedFault::Transient);
    let n = notices(&mut s);
    assert!(
        matches!(
            n.as_slice(),
            [SeedNotice::Failed {
                cause: GiveUp::NobodyLeft { .. },
                ..
            }]
        ),
        "{n:?}"
    );
}

#[test]
fn a_lost_range_seeder_is_replaced_and_a_stale_report_from_it_ignored() {
    let mut s = seeder();
    let b = blob(7);
    waiting(&mut s, b, 6, 10 * MIB);
    let first = seeds(&commands(&mut s));
    let (lost, range) = first[1];
    s.handle(Time::ZERO, SeedEvent::HostAway { host: lost });
    assert!(
        commands(&mut s).is_empty(),
        "away is not lost: its order stays"
    );
    s.handle(Time::ZERO, SeedEvent::HostGone { host: lost });
    let again = seeds(&commands(&mut s));
    // The first idle ready target takes the range (h(4): h(0), h(2), h(3) seed others).
    assert_eq!(again, vec![(h(4), range)]);
    let (start, end) = range.expect("range");
    s.handle(
        Time::ZERO,
        SeedEvent::RangeSeeded {
            blob: b,
            host: lost,
            first_chunk: (start / MIB) as u32,
            digests: digests(((end - start) / MIB) as u32),
        },
    );
    assert_eq!(
        s.stats().ranges_seeded,
        0,
        "the lost seeder's report is stale"
    );
}

#[test]
fn a_range_that_does_not_fit_counts_as_a_failed_attempt() {
    let mut s = seeder();
    let b = blob(8);
    waiting(&mut s, b, 6, 10 * MIB);
    let first = seeds(&commands(&mut s));
    let (host, _) = first[0];
    s.handle(
        Time::ZERO,
        SeedEvent::RangeSeeded {
            blob: b,
            host,
            first_chunk: 0,
            digests: digests(1),
        },
    );
    assert_eq!(seeds(&commands(&mut s)), vec![(h(4), first[0].1)]);
}

#[test]
fn a_seeder_whose_target_ended_has_its_range_seeded_again_by_one_that_keeps_it() {
    let mut s = seeder();
    let b = blob(9);
    waiting(&mut s, b, 6, 10 * MIB);
    let first = seeds(&commands(&mut s));
    // h(0) seeded its range, then its job was cancelled.
    let report = |s: &mut Seeder, (host, range): (HostId, Option<(u64, u64)>)| {
        let (start, end) = range.expect("range");
        s.handle(
            Time::ZERO,
            SeedEvent::RangeSeeded {
                blob: b,
                host,
                first_chunk: (start / MIB) as u32,
                digests: digests(((end - start) / MIB) as u32),
            },
        );
    };
    report(&mut s, first[0]);
    s.handle(
        Time::ZERO,
        SeedEvent::Unwait {
            blob: b,
            host: h(0),
        },
    );
    for &seed in &first[1..] {
        report(&mut s, seed);
    }
    assert!(
        notices(&mut s).is_empty(),
        "not assembled: h(0) would hold its range nowhere"
    );
    let again = seeds(&commands(&mut s));
    // The first ready waiting target not fetching a range now: h(1) (its range is in).
    assert_eq!(again, vec![(h(1), first[0].1)]);
    report(&mut s, again[0]);
    assert!(matches!(
        notices(&mut s).as_slice(),
        [SeedNotice::Assembled { .. }]
    ));
}

#[test]
fn nobody_waiting_stops_the_seeders_and_a_known_blob_stops_those_still_fetching() {
    let mut s = seeder();
    let b = blob(10);
    waiting(&mut s, b, 2, MIB);
    let got = seeds(&commands(&mut s));
    for i in 0..2 {
        s.handle(
            Time::ZERO,
            SeedEvent::Unwait {
                blob: b,
                host: h(i),
            },
        );
    }
    assert_eq!(
        commands(&mut s),
        vec![SeedCommand::Stop {
            host: got[0].0,
            blob: b
        }]
    );
    assert!(!s.is_seeding(b));

    let b = blob(11);
    waiting(&mut s, b, 6, 10 * MIB);
    let got = seeds(&commands(&mut s));
    assert_eq!(got.len(), 4);
    // Someone pushed the blob meanwhile: the seeders stop, the waiting are released.
    s.handle(
        Time::ZERO,
        SeedEvent::Known {
            blob: b,
            by: Some(h(9)),
        },
    );
    let stops = commands(&mut s);
    assert_eq!(stops.len(), 4, "{stops:?}");
    assert!(matches!(
        notices(&mut s).as_slice(),
        [SeedNotice::Seeded { .. }]
    ));
}

#[test]
fn a_target_not_connected_yet_is_elected_when_it_connects() {
    let mut s = seeder();
    let b = blob(12);
    s.handle(
        Time::ZERO,
        SeedEvent::Wait {
            blob: b,
            host: h(0),
            size: MIB,
        },
    );
    assert!(commands(&mut s).is_empty(), "nobody ready");
    s.handle(Time::ZERO, SeedEvent::HostReady { host: h(0) });
    assert_eq!(seeds(&commands(&mut s)), vec![(h(0), None)]);
}

#[test]
fn urls_have_one_fetcher_until_it_reports_gives_up_dies_or_times_out() {
    let mut s = seeder();
    let key = |n: u64| UrlKey {
        url: format!("http://origin/{n}"),
        etag: "e".into(),
        size: n,
    };
    let t0 = Time::from_secs(1);
    assert_eq!(
        s.resolve_url(t0, key(1), h(0), None, false),
        UrlAnswer::Fetcher(h(0))
    );
    assert_eq!(
        s.resolve_url(t0, key(1), h(1), None, false),
        UrlAnswer::Fetcher(h(0))
    );
    // The fetcher gives up: the next to ask fetches.
    assert_eq!(
        s.resolve_url(t0, key(1), h(0), None, true),
        UrlAnswer::Nobody
    );
    assert_eq!(
        s.resolve_url(t0, key(1), h(1), None, false),
        UrlAnswer::Fetcher(h(1))
    );
    // Its lease expires: another fetches.
    s.handle(t0, SeedEvent::HostGone { host: h(1) });
    assert_eq!(
        s.resolve_url(t0, key(1), h(2), None, false),
        UrlAnswer::Fetcher(h(2))
    );
    // It never reports: after the timeout the next asker fetches.
    assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    let late = t0 + Duration::from_secs(61);
    s.handle_timeout(late);
    assert_eq!(s.poll_timeout(), None);
    assert_eq!(
        s.resolve_url(late, key(1), h(3), None, false),
        UrlAnswer::Fetcher(h(3))
    );
    // It reports: everyone gets the digest.
    let d = Digest::of(b"content");
    assert_eq!(
        s.resolve_url(late, key(1), h(3), Some(d), false),
        UrlAnswer::Known(d)
    );
    assert_eq!(
        s.resolve_url(late, key(1), h(0), None, false),
        UrlAnswer::Known(d)
    );
    assert_eq!(s.poll_timeout(), None);
    // Bounded: the least recently asked identity goes first.
    for n in 2..=4 {
        s.resolve_url(late + Duration::from_secs(n), key(n), h(0), None, false);
    }
    assert_eq!(
        s.resolve_url(late, key(1), h(1), None, false),
        UrlAnswer::Fetcher(h(1)),
        "evicted: known no more"
    );
}
