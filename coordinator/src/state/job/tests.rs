//! Unit tests of a job's targets, tally and records.

use super::*;
use std::time::UNIX_EPOCH;

fn job_with(states: &[TargetState]) -> Job {
    let mut job = Job::new(
        pb::Job {
            job_id: "j".into(),
            ..Default::default()
        },
        None,
    );
    for (i, s) in states.iter().enumerate() {
        let mut t = Target::new(10, false);
        t.state = *s;
        job.add_target((format!("a{i}"), Digest::of(b"x")), t);
    }
    job
}

#[test]
fn aggregate_state_follows_the_targets() {
    let now = SystemTime::UNIX_EPOCH;
    let mut j = job_with(&[TargetState::Pending, TargetState::Pending]);
    j.refresh_state(now);
    assert_eq!(j.state(), JobState::Pending);
    let mut j = job_with(&[TargetState::Running, TargetState::Pending]);
    j.refresh_state(now);
    assert_eq!(j.state(), JobState::Running);
    let mut j = job_with(&[TargetState::Done, TargetState::Failed]);
    assert!(j.refresh_state(now));
    assert_eq!(j.state(), JobState::Failed);
    assert!(j.record.finished_at.is_some());
    let mut j = job_with(&[TargetState::Done, TargetState::Done]);
    j.refresh_state(now);
    assert_eq!(j.state(), JobState::Done);
}

#[test]
fn persisted_round_trip_resets_running_targets() {
    let now = SystemTime::UNIX_EPOCH;
    let j = job_with(&[TargetState::Done, TargetState::Running]);
    let back = Job::from_pb(j.to_pb(true, now)).expect("decodes");
    let states: Vec<_> = back.targets().map(|(_, t)| t.state).collect();
    assert_eq!(states, vec![TargetState::Done, TargetState::Pending]);
}

#[test]
fn every_change_a_watcher_should_see_bumps_the_version() {
    let mut j = job_with(&[TargetState::Pending]);
    let key = ("a0".to_string(), Digest::of(b"x"));
    // A seeded size and a failure message are changes too (they were not once).
    assert!(j.apply(&key, Transition::SetTotal(99), UNIX_EPOCH));
    assert_eq!(j.version(), 1);
    assert!(
        !j.apply(&key, Transition::SetTotal(99), UNIX_EPOCH),
        "no change, no version"
    );
    assert!(j.apply(&key, Transition::Start, UNIX_EPOCH));
    assert!(j.apply(
        &key,
        Transition::Fail(FailureReason::NoSource, "why"),
        UNIX_EPOCH
    ));
    assert!(
        !j.apply(
            &key,
            Transition::Fail(FailureReason::NoSource, "other"),
            UNIX_EPOCH
        ),
        "a terminal target does not fail again"
    );
    assert!(!j.apply(&key, Transition::Cancel("late"), UNIX_EPOCH));
    let p = j.progress(true, 2, SystemTime::UNIX_EPOCH);
    assert_eq!(p.targets.len(), 1, "changed after version 2");
    assert_eq!(
        (p.targets[0].bytes_total, p.targets[0].message.as_str()),
        (99, "why")
    );
}

#[test]
fn only_a_target_its_agent_lost_resumes() {
    let mut j = job_with(&[TargetState::Pending]);
    let key = ("a0".to_string(), Digest::of(b"x"));
    j.apply(
        &key,
        Transition::Fail(FailureReason::AgentLost, "gone"),
        UNIX_EPOCH,
    );
    assert!(j.resume(&key));
    assert_eq!(
        j.targets.get(&key).map(|t| t.state),
        Some(TargetState::Pending)
    );
    j.apply(
        &key,
        Transition::Fail(FailureReason::NoSource, "no"),
        UNIX_EPOCH,
    );
    assert!(!j.resume(&key), "another failure stays");
}

/// The tally, summed afresh over the targets.
fn recount(j: &Job) -> Tally {
    let mut t = Tally::default();
    for (_, target) in j.targets() {
        t.add(target);
    }
    t
}

#[test]
fn the_tally_follows_every_transition() {
    let mut j = job_with(&[TargetState::Pending; 4]);
    let key = |i: usize| (format!("a{i}"), Digest::of(b"x"));
    let steps: Vec<(usize, Transition<'_>)> = vec![
        (0, Transition::Start),
        (
            0,
            Transition::Progress {
                bytes_done: 4,
                rate: 7,
            },
        ),
        (
            1,
            Transition::Progress {
                bytes_done: 2,
                rate: 5,
            },
        ),
        (1, Transition::SetTotal(20)),
        (
            0,
            Transition::Progress {
                bytes_done: 9,
                rate: 3,
            },
        ),
        (0, Transition::Finish),
        (2, Transition::Fail(FailureReason::AgentLost, "gone")),
        (3, Transition::Cancel("no")),
        (1, Transition::Finish),
    ];
    for (i, t) in steps {
        j.apply(&key(i), t, UNIX_EPOCH);
        assert_eq!(j.tally, recount(&j), "after {t:?} on a{i}");
    }
    assert!(j.resume(&key(2)));
    assert_eq!(j.tally, recount(&j));
    j.add_target(key(0), Target::new(10, false));
    assert_eq!(j.tally, recount(&j), "a target replaced");
    let p = j.progress(false, 0, SystemTime::UNIX_EPOCH);
    let c = p.counts.expect("counts");
    assert_eq!(
        (
            c.total,
            c.pending,
            c.done,
            c.cancelled,
            p.bytes_done,
            p.bytes_total
        ),
        (4, 2, 1, 1, 20, 50)
    );
}

#[test]
fn a_stored_job_writes_only_its_changed_targets_next() {
    let now = SystemTime::UNIX_EPOCH;
    let mut j = job_with(&[TargetState::Pending; 3]);
    let listed =
        |r: JobRecord| -> Vec<String> { r.targets.into_iter().map(|t| t.agent_id).collect() };
    assert_eq!(
        listed(j.record_changes(now)),
        ["a0", "a1", "a2"],
        "first: whole"
    );
    assert!(listed(j.record_changes(now)).is_empty(), "nothing changed");
    let key = ("a1".to_string(), Digest::of(b"x"));
    j.apply(&key, Transition::Start, UNIX_EPOCH);
    assert_eq!(listed(j.record_changes(now)), ["a1"]);
    j.apply(&key, Transition::Finish, UNIX_EPOCH);
    j.forget_stored();
    assert_eq!(
        listed(j.record_changes(now)),
        ["a0", "a1", "a2"],
        "after a failed write: whole"
    );
}

/// Only a job's first record (and the one after a failed write) is whole: the database
/// folds its log of changes itself (`crate::db`), so that no 20,000-target record is built
/// on the state task in the middle of a wave.
#[test]
fn a_job_records_only_its_changes_after_the_first() {
    let now = SystemTime::UNIX_EPOCH;
    let mut j = job_with(&[TargetState::Pending; 3]);
    assert!(j.record_changes(now).whole, "first: whole");
    let key = ("a1".to_string(), Digest::of(b"x"));
    j.apply(&key, Transition::Start, UNIX_EPOCH);
    for i in 0..500 {
        let (bytes_done, rate) = (1, i as u64 + 1);
        j.apply(&key, Transition::Progress { bytes_done, rate }, UNIX_EPOCH);
        let r = j.record_changes(now);
        assert!(!r.whole, "record {i}");
        assert_eq!(r.targets.len(), 1);
    }
}

#[test]
fn a_target_records_when_it_ended_and_keeps_it_across_a_restart() {
    let at = |s: u64| UNIX_EPOCH + std::time::Duration::from_secs(s);
    let mut j = job_with(&[TargetState::Pending; 3]);
    let key = |i: usize| (format!("a{i}"), Digest::of(b"x"));
    let ended = |j: &Job| -> Vec<Option<SystemTime>> {
        let p = j.to_pb(true, at(0)).progress.expect("progress");
        (p.targets.iter())
            .map(|t| t.finished_at.and_then(|f| SystemTime::try_from(f).ok()))
            .collect()
    };
    j.apply(&key(0), Transition::Start, at(1));
    j.apply(&key(0), Transition::Finish, at(7));
    j.apply(&key(0), Transition::Finish, at(9));
    j.apply(
        &key(1),
        Transition::Fail(FailureReason::AgentLost, "gone"),
        at(8),
    );
    assert_eq!(
        ended(&j),
        [Some(at(7)), Some(at(8)), None],
        "the first end counts"
    );
    // Stored and loaded back (a coordinator restart): the ends stay.
    let record = j.record_whole(at(10));
    let mut stored = record.job;
    stored.progress.as_mut().expect("progress").targets = record.targets;
    let back = Job::from_pb(stored).expect("loads");
    assert_eq!(ended(&back), [Some(at(7)), Some(at(8)), None]);
    // A target failed for its lost agent, which came back, is open again: no end.
    assert!(j.resume(&key(1)));
    assert_eq!(ended(&j), [Some(at(7)), None, None]);
}

/// A periodic flush takes a job's changes a slice of its targets at a time: each pass
/// lists every target changed before it started once, and what changes behind it comes
/// with the next pass; a complete record of changes after a partial pass lists every
/// change not yet written.
#[test]
fn a_jobs_changes_are_recorded_a_slice_at_a_time() {
    let now = SystemTime::UNIX_EPOCH;
    let mut j = job_with(&[TargetState::Pending; 5]);
    assert!(j.record_changes(now).whole, "first: whole");
    let key = |i: usize| (format!("a{i}"), Digest::of(b"x"));
    let listed =
        |r: &JobRecord| -> Vec<String> { r.targets.iter().map(|t| t.agent_id.clone()).collect() };
    for i in [0, 2, 3, 4] {
        j.apply(&key(i), Transition::Start, now);
    }
    let (r, done) = j.record_some_changes(2, now);
    assert_eq!(
        (listed(&r), done, r.whole),
        (vec!["a0".into()], false, false)
    );
    // Changed behind the pass (a0) and ahead of it (a4).
    for i in [0, 4] {
        let (bytes_done, rate) = (5, 1);
        j.apply(&key(i), Transition::Progress { bytes_done, rate }, now);
    }
    let (r, done) = j.record_some_changes(2, now);
    assert_eq!((listed(&r), done), (vec!["a2".into(), "a3".into()], false));
    let (r, done) = j.record_some_changes(2, now);
    assert_eq!((listed(&r), done), (vec!["a4".into()], true));
    // The next pass: what changed after the last one began.
    let (r, done) = j.record_some_changes(10, now);
    assert_eq!((listed(&r), done), (vec!["a0".into(), "a4".into()], true));
    let (r, done) = j.record_some_changes(10, now);
    assert_eq!(
        (listed(&r), done),
        (Vec::<String>::new(), true),
        "nothing changed"
    );
    // A complete record in the middle of a pass writes all that is not written.
    j.apply(&key(1), Transition::Start, now);
    let (bytes_done, rate) = (7, 1);
    j.apply(&key(3), Transition::Progress { bytes_done, rate }, now);
    let (r, _) = j.record_some_changes(2, now);
    assert_eq!(listed(&r), ["a1"]);
    // a0 changed behind the pass, a3 ahead of it (before it began); a1, written by the
    // pass and not changed since, is not written again.
    j.apply(&key(0), Transition::Finish, now);
    assert_eq!(listed(&j.record_changes(now)), ["a0", "a3"]);
    let (r, done) = j.record_some_changes(10, now);
    assert_eq!((listed(&r), done), (Vec::<String>::new(), true));
    // After a failed write, whole again.
    j.forget_stored();
    let (r, done) = j.record_some_changes(2, now);
    assert!(r.whole && done);
    assert_eq!(listed(&r).len(), 5);
}

/// Each target's record names its own blob (a job's blob names are written out once per
/// record and reused).
#[test]
fn each_targets_record_names_its_own_blob() {
    let now = SystemTime::UNIX_EPOCH;
    let mut j = job_with(&[]);
    let blobs = [Digest::of(b"x"), Digest::of(b"y"), Digest::of(b"z")];
    for agent in ["a", "b"] {
        for blob in blobs {
            j.add_target((agent.to_string(), blob), Target::new(10, false));
        }
    }
    let named = |r: JobRecord| -> Vec<(String, String)> {
        (r.targets.into_iter())
            .map(|t| (t.agent_id, t.blob))
            .collect()
    };
    let expected: Vec<(String, String)> = (j.targets())
        .map(|((a, b), _)| (a.clone(), b.to_string()))
        .collect();
    assert_eq!(expected.len(), 6);
    assert_eq!(named(j.record_whole(now)), expected);
    for (agent, blob) in [("a", blobs[2]), ("b", blobs[0])] {
        j.apply(&(agent.to_string(), blob), Transition::Start, now);
    }
    let (r, _) = j.record_some_changes(100, now);
    assert_eq!(
        named(r),
        [
            ("a".to_string(), blobs[2].to_string()),
            ("b".to_string(), blobs[0].to_string())
        ]
    );
}

/// A planned job counts, shows and records its targets not built yet as pending; building
/// one its agent holds makes it done and changes the job's version (so that the flush and
/// the watchers carry it), building a pending one does not.
#[test]
fn targets_not_built_are_pending_until_built() {
    let now = SystemTime::UNIX_EPOCH;
    let (x, y) = (Digest::of(b"x"), Digest::of(b"y"));
    let mut job = job_with(&[]);
    job.record.blobs = vec![x.to_string(), y.to_string()];
    assert_eq!(job.blobs().collect::<Vec<_>>(), vec![x, y]);
    let agents = vec![(HostId(0), "a0".to_string()), (HostId(1), "a1".to_string())];
    job.plan(Rest::new(agents, vec![(x, 10), (y, 5)]));
    job.refresh_state(now);
    assert_eq!(job.state(), JobState::Pending);
    assert_eq!(job.bytes(), (0, 30));
    let p = job.progress(true, 0, now);
    assert_eq!((p.counts.expect("counts").pending, p.targets.len()), (4, 4));
    let record = job.record_whole(now);
    assert_eq!((record.targets.len(), record.pending.is_some()), (0, true));

    let held = |host: HostId, blob: Digest| host == HostId(1) && blob == y;
    let version = job.version();
    assert_eq!(job.want_next(&held), Some((HostId(0), x, true)));
    assert_eq!(job.version(), version, "built pending: nothing to show");
    assert!(job.progress(true, version, now).targets.is_empty());
    assert_eq!(job.want_next(&held), Some((HostId(0), y, true)));
    assert_eq!(job.want_next(&held), Some((HostId(1), x, true)));
    assert_eq!(job.want_next(&held), Some((HostId(1), y, false)));
    assert!(job.version() > version, "built done: a change");
    let changed = job.progress(true, version, now).targets;
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].state(), TargetState::Done);
    assert_eq!(
        changed[0].finished_at, None,
        "done at creation: no end time"
    );
    assert_eq!(job.want_next(&held), None);
    assert!(job.is_built() && !job.wants_more());
    assert_eq!(job.bytes(), (5, 30));
    let record = job.record_whole(now);
    assert_eq!((record.targets.len(), record.pending.is_none()), (4, true));
}
