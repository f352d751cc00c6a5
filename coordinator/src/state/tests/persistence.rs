//! Writes go to the writer thread: the state never waits for the disk, and what a user asked
//! is answered only once it is stored (or refused if it cannot be). The disk here is the
//! real redb file, made slow or failing by its fault hooks; the writer runs in real time,
//! the state on the fake clock.

use std::sync::atomic::Ordering::Relaxed;

use super::*;
use crate::state::HOUSEKEEPING;

/// Asks without waiting: the step runs, and the reply is whatever it is then.
fn send<R>(
    s: &mut S,
    make: impl FnOnce(Reply<R>) -> Request,
) -> oneshot::Receiver<Result<R, ApiError>> {
    let (tx, rx) = oneshot::channel();
    let now = s.now;
    s.s.step(make(tx), now);
    rx
}

fn distribute_rx(
    s: &mut S,
    blob: Digest,
    ids: &[&str],
) -> oneshot::Receiver<Result<pb::DistributeResponse, ApiError>> {
    let req = pb::DistributeRequest {
        blobs: vec![blob.to_string()],
        targets: agents(ids),
        ..Default::default()
    };
    send(s, |r| Request::Distribute(req, Default::default(), r))
}

/// A Distribute is planned in its step and answered once its job is stored; the step does
/// not wait for the disk, and the state answers other requests meanwhile.
#[test]
fn distribute_is_answered_once_stored_and_the_state_does_not_wait_for_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (_, mut inbox) = open(&mut s, &target);
    // A disk that holds every commit until the test lets it go (or 10 s have passed: a
    // step that waited for it would then end, late, and fail below instead of hanging).
    s.faults.hold_commits.store(true, Relaxed);
    let faults = s.faults.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        faults.hold_commits.store(false, Relaxed);
    });

    let mut reply = distribute_rx(&mut s, m.digest(), &["target"]);
    // The step is over and the job's write still waits on the disk: it did not wait.
    assert!(
        s.writer.queued() >= 1,
        "the step waited for the disk: no write is queued after it"
    );
    assert!(
        matches!(reply.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "answered before the job was stored"
    );
    assert_eq!(orders(&mut inbox).len(), 1, "planned at once, in the step");
    // The state answers what needs no write while the job's write is on the disk.
    let listed = send(&mut s, |r| Request::ListAgents(Default::default(), r));
    let listed = listed
        .blocking_recv()
        .expect("answered in its step")
        .expect("list");
    assert_eq!(listed.agents.len(), 2);
    assert!(
        matches!(reply.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
        "answered while its write was held"
    );

    s.faults.hold_commits.store(false, Relaxed);
    let job = wait(reply).expect("stored").job_id;
    // Answered means stored: a disk that fails from now on loses nothing of it.
    s.faults.fail_commits.store(true, Relaxed);
    let mut s = restarted(s, dir.path(), Duration::from_secs(30));
    assert_eq!(get_job(&mut s, &job, true).expect("job").blobs.len(), 1);
}

/// A job whose write fails is refused, and dropped at the next housekeeping: its order is
/// cancelled, and it is not found.
#[test]
fn a_job_that_cannot_be_stored_is_refused_and_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (_, mut inbox) = open(&mut s, &target);
    s.faults.fail_commits.store(true, Relaxed);
    let refused = wait(distribute_rx(&mut s, m.digest(), &["target"]));
    let Err(ApiError::Internal(message)) = refused else {
        panic!("expected INTERNAL, got {refused:?}");
    };
    assert!(
        message.contains("storing job") && message.contains("injected"),
        "{message}"
    );
    s.advance(HOUSEKEEPING);
    let list = s
        .ask(|r| Request::ListJobs(Default::default(), r))
        .expect("list");
    assert!(list.jobs.is_empty(), "{:?}", list.jobs);
    let mut cancelled = false;
    while let Ok(Ok(msg)) = inbox.try_recv() {
        cancelled |= matches!(msg.msg, Some(coordinator_message::Msg::Cancel(_)));
    }
    assert!(cancelled, "the dropped job's order was not cancelled");
}

/// A CancelJob whose write fails is refused, but the job stays cancelled and is written
/// again once the disk works.
#[test]
fn a_cancel_that_cannot_be_stored_is_written_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let _session = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    s.faults.fail_commits.store(true, Relaxed);
    let req = pb::CancelJobRequest {
        job_id: job.clone(),
        reason: "test".into(),
    };
    let refused = s.ask(|r| Request::CancelJob(req, None, r));
    assert!(matches!(refused, Err(ApiError::Internal(_))), "{refused:?}");
    assert_eq!(target_state(&mut s, &job).0, pb::JobState::Cancelled);
    // Let the failed write be seen as failed before the disk works again.
    writes_applied(&s);
    s.advance(HOUSEKEEPING);
    s.faults.fail_commits.store(false, Relaxed);
    // Housekeeping reads the failure, then writes the job again.
    settle(&mut s);
    let mut s = restarted(s, dir.path(), Duration::from_secs(30));
    assert_eq!(target_state(&mut s, &job).0, pb::JobState::Cancelled);
}

/// Runs housekeeping on the fake clock, letting the writer apply each round's writes, until
/// every job change is stored.
pub(super) fn settle(s: &mut S) {
    for _ in 0..1_000 {
        if s.jobs.unstored() == 0 && s.writer.queued() == 0 {
            return;
        }
        s.advance(HOUSEKEEPING);
        writes_applied(s);
    }
    panic!("the writes never settled");
}

/// Agents' reports are flushed one write at a time: with the disk behind, changes wait for
/// the next flush (and are stored by it) instead of queueing a write each tick.
#[test]
fn a_slow_disk_gets_one_flush_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(300));
    let (ids, sessions) = agents_open(&mut s, 10, 10);
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let job = distribute(&mut s, m.digest(), &names).expect("distribute");
    let done = || {
        Msg::BlobDone(pb::BlobDone {
            blob_digest: m.digest().as_bytes().to_vec(),
        })
    };
    // The first target to read the blob whole verifies its manifest: a write of its own.
    say(&mut s, sessions[0].0, done());
    settle(&mut s);
    s.faults.commit_delay_ms.store(300, Relaxed);
    // A target finishes at each housekeeping tick: each tick has a change to write.
    for (session, _) in &sessions[1..] {
        say(&mut s, *session, done());
        s.advance(HOUSEKEEPING);
    }
    assert!(
        s.writer.queued() <= 1,
        "{} writes queued: flushes pile up behind the disk",
        s.writer.queued()
    );
    s.faults.commit_delay_ms.store(0, Relaxed);
    settle(&mut s);
    let mut s = restarted(s, dir.path(), Duration::from_secs(300));
    assert_eq!(target_state(&mut s, &job).0, pb::JobState::Done);
}

/// A job's periodic flush writes a slice of its targets at a time, but an ended job at once:
/// its header must not be stored ended while some targets' last words are not (a restart
/// would bring it back Done with targets pending for good; the loadgen's restart at 20,000
/// showed 1,493 of them). Flushed a target at a time, changes reach the disk all the same.
#[test]
fn an_ended_job_is_stored_whole_while_others_are_flushed_a_slice_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(300));
    s.jobs.set_flush_slice(1);
    let (ids, sessions) = agents_open(&mut s, 5, 10);
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    let job = distribute(&mut s, m.digest(), &names).expect("distribute");
    let other = distribute(&mut s, m.digest(), &names[..3]).expect("distribute");
    let done = || {
        Msg::BlobDone(pb::BlobDone {
            blob_digest: m.digest().as_bytes().to_vec(),
        })
    };
    // The first target to read the blob whole verifies its manifest: a write of its own.
    say(&mut s, sessions[0].0, done());
    settle(&mut s);
    // The others finish within one housekeeping tick, then one flush, and the process ends.
    for (session, _) in &sessions[1..] {
        say(&mut s, *session, done());
    }
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Done, "{targets:?}");
    s.advance(HOUSEKEEPING);
    writes_applied(&s);
    let mut s = restarted(s, dir.path(), Duration::from_secs(300));
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Done);
    let finished = |targets: &[pb::TargetProgress]| {
        (targets.iter())
            .filter(|t| t.state() == pb::TargetState::Done)
            .count()
    };
    assert_eq!(finished(&targets), 5, "{targets:?}");
    assert_eq!(finished(&target_state(&mut s, &other).1), 3);
}
