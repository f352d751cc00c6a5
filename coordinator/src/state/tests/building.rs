//! A Distribute's targets are built as they are wanted, a few a turn (see `job::Rest`), not
//! all in its own turn: until then they are shown, counted and stored as pending, and what
//! must see every target (a cancel, a deadline, a lost agent) builds them first.

use super::*;
use crate::state::HOUSEKEEPING;

struct Four {
    s: S,
    m: Manifest,
    ids: Vec<String>,
    job: String,
}

/// Four targets, one built per turn; t1 holds the blob already.
fn four_one_a_turn(dir: &std::path::Path, lease: Duration) -> Four {
    let (mut s, m, _i) = with_seeder(dir, lease);
    let (ids, sessions) = agents_open(&mut s, 4, 10);
    register(&mut s, sessions[1].0, &m);
    s.set_wants_per_turn(1);
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let job = distribute(&mut s, m.digest(), &names).expect("distribute");
    Four { s, m, ids, job }
}

fn is_built(s: &S, job: &str) -> bool {
    s.jobs.get(job).expect("job").is_built()
}

fn states(targets: &[pb::TargetProgress]) -> Vec<(String, pb::TargetState)> {
    (targets.iter())
        .map(|t| (t.agent_id.clone(), t.state()))
        .collect()
}

#[test]
fn targets_not_built_yet_are_shown_and_stored_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Four {
        mut s, m, ids, job, ..
    } = four_one_a_turn(dir.path(), Duration::from_secs(300));
    let size = m.size();
    let got = get_job(&mut s, &job, true).expect("job");
    let progress = got.progress.expect("progress");
    let counts = progress.counts.expect("counts");
    assert_eq!(
        (counts.total, counts.running, counts.pending),
        (4, 1, 3),
        "t0 built and ordered: {counts:?}"
    );
    assert_eq!(progress.bytes_total, 4 * size);
    assert_eq!(progress.targets.len(), 4);
    assert!(progress.targets.iter().all(|t| t.bytes_total == size));
    assert!(!is_built(&s, &job), "three left to build");

    // Restarted now: the first record listed all four, pending, of the blob's size.
    writes_applied(&s);
    let mut s = restarted(s, dir.path(), Duration::from_secs(300));
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Pending);
    let pending: Vec<_> = (ids.iter())
        .map(|id| (id.clone(), pb::TargetState::Pending))
        .collect();
    assert_eq!(states(&targets), pending);
    assert!(targets.iter().all(|t| t.bytes_total == size), "{targets:?}");
}

#[test]
fn a_target_held_already_is_built_done_and_that_is_stored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Four {
        mut s, ids, job, ..
    } = four_one_a_turn(dir.path(), Duration::from_secs(300));
    let mut turns = 0;
    while s.jobs.wants_more(&job) {
        let now = s.now;
        s.handle_timeout(now);
        turns += 1;
    }
    assert_eq!(turns, 3, "one target a turn after the Distribute's");
    assert!(s.wanting.is_empty());
    let (_, targets) = target_state(&mut s, &job);
    let done = (ids.iter().enumerate())
        .map(|(i, id)| {
            (
                id.clone(),
                if i == 1 {
                    pb::TargetState::Done
                } else {
                    pb::TargetState::Running
                },
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(states(&targets), done);
    // The flush stores t1's target done (the first record said pending).
    s.advance(HOUSEKEEPING);
    writes_applied(&s);
    let mut s = restarted(s, dir.path(), Duration::from_secs(300));
    let (_, targets) = target_state(&mut s, &job);
    let after: Vec<_> = (states(&targets).into_iter())
        .map(|(id, st)| (id, st == pb::TargetState::Done))
        .collect();
    let expected: Vec<_> = (ids.iter().enumerate())
        .map(|(i, id)| (id.clone(), i == 1))
        .collect();
    assert_eq!(after, expected);
}

/// A lost agent's targets fail AGENT_LOST though they were not built yet (the loss builds
/// them all, and the others are wanted in their turn); a cancel then ends the open ones,
/// while the one held already is done.
#[test]
fn a_lost_agent_and_a_cancel_see_the_targets_not_built_yet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Four {
        mut s, m, ids, job, ..
    } = four_one_a_turn(dir.path(), Duration::from_secs(300));
    assert!(!is_built(&s, &job));
    let drain = pb::DrainAgentRequest {
        agent_id: ids[2].clone(),
    };
    let drained = (s.ask(|r| Request::DrainAgent(drain, r))).expect("drain");
    assert_eq!(
        drained.waiting_targets, 1,
        "t2's target, not built yet, waits"
    );
    let (_, targets) = target_state(&mut s, &job);
    let t2 = &targets[2];
    assert_eq!(
        (t2.agent_id.as_str(), t2.reason()),
        (ids[2].as_str(), pb::FailureReason::AgentLost),
        "{targets:?}"
    );
    assert!(t2.message.contains("drained"), "{}", t2.message);
    assert_eq!(targets[1].state(), pb::TargetState::Done, "{targets:?}");
    assert!(is_built(&s, &job), "the loss built them all");
    let t3 = s.agents.host_of(&ids[3]).expect("t3");
    assert!(!s.jobs.is_wanted(t3, m.digest()));
    // Built is not wanted: t3's target is, in its turn.
    for _ in 0..3 {
        let now = s.now;
        s.handle_timeout(now);
    }
    assert!(!s.jobs.wants_more(&job) && s.wanting.is_empty());
    assert!(
        s.jobs.is_wanted(t3, m.digest()),
        "t3's target was never wanted"
    );

    cancel(&mut s, &job);
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Cancelled);
    use pb::TargetState::{Cancelled, Done, Failed};
    let expected: Vec<_> = (ids.iter().cloned())
        .zip([Cancelled, Done, Failed, Cancelled])
        .collect();
    assert_eq!(states(&targets), expected);
}

/// A cancel builds the targets not built yet to end them: the held one is done, the
/// others cancelled, and none is wanted afterwards.
#[test]
fn a_cancel_ends_the_targets_not_built_yet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Four {
        mut s, m, ids, job, ..
    } = four_one_a_turn(dir.path(), Duration::from_secs(300));
    cancel(&mut s, &job);
    let now = s.now;
    s.handle_timeout(now);
    assert!(s.wanting.is_empty());
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Cancelled);
    use pb::TargetState::{Cancelled, Done};
    let expected: Vec<_> = (ids.iter().cloned())
        .zip([Cancelled, Done, Cancelled, Cancelled])
        .collect();
    assert_eq!(states(&targets), expected);
    for id in &ids {
        let host = s.agents.host_of(id).expect("joined");
        assert!(!s.jobs.is_wanted(host, m.digest()), "{id} is wanted");
    }
}

fn cancel(s: &mut S, job: &str) {
    let cancel = pb::CancelJobRequest {
        job_id: job.into(),
        reason: "test".into(),
    };
    s.ask(|r| Request::CancelJob(cancel, None, r))
        .expect("cancel");
}
