//! What agents report, and what of it the coordinator acts on.

use super::*;

fn failed(order_id: u64, blob: Digest, reason: pb::FailureReason, message: &str) -> Msg {
    Msg::BlobFailed(pb::BlobFailed {
        order_id,
        blob_digest: blob.as_bytes().to_vec(),
        reason: reason as i32,
        message: message.into(),
    })
}

fn progress(order_id: u64, blob: Digest, bytes_done: u64) -> Msg {
    Msg::Progress(pb::ProgressBatch {
        items: vec![pb::BlobProgress {
            order_id,
            blob_digest: blob.as_bytes().to_vec(),
            chunks_verified: 1,
            bytes_done,
            rate_bytes_per_sec: 1000,
        }],
    })
}

/// What `agent` holds of `blob`, as the catalog has it.
fn holding(s: &S, agent: &str, blob: Digest) -> Option<super::super::catalog::Holding> {
    let host = s.agents.host_of(agent).expect("joined");
    s.catalog.entry(&blob)?.holders.get(&host).copied()
}

#[test]
fn progress_of_a_replaced_order_moves_no_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, mut inbox) = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order").order_id;

    say(&mut s, session, progress(order - 1, m.digest(), 3000));
    let (_, targets) = target_state(&mut s, &job);
    assert_eq!(targets[0].bytes_done, 0, "a stale order's report counted");
    assert_eq!(
        holding(&s, "target", m.digest()).map(|h| h.chunks),
        Some(1),
        "chunks held are a fact whatever the order"
    );
    say(&mut s, session, progress(order, m.digest(), 2000));
    let (_, targets) = target_state(&mut s, &job);
    assert_eq!(targets[0].bytes_done, 2000);
    assert_eq!(targets[0].rate_bytes_per_sec, 1000);
}

#[test]
fn a_target_given_up_on_says_why_its_last_attempt_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, mut inbox) = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let mut attempts = 0;
    loop {
        let (state, targets) = target_state(&mut s, &job);
        if state == pb::JobState::Failed {
            assert_eq!(
                targets[0].reason(),
                pb::FailureReason::DiskFull,
                "{targets:?}"
            );
            assert!(
                targets[0].message.contains("no space left on device"),
                "{}",
                targets[0].message
            );
            break;
        }
        assert!(attempts < 10, "never gave up: {targets:?}");
        if let Some(order) = orders(&mut inbox).pop() {
            attempts += 1;
            let why = format!("attempt {attempts}: no space left on device");
            say(
                &mut s,
                session,
                failed(
                    order.order_id,
                    m.digest(),
                    pb::FailureReason::DiskFull,
                    &why,
                ),
            );
        }
        s.advance(Duration::from_secs(5));
    }
    assert!(attempts >= 2, "gave up after {attempts}");
}

#[test]
fn an_inventory_bitmap_of_the_wrong_length_counts_no_chunks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, _inbox) = open(&mut s, &target);
    let held = |chunk_count: u32| {
        Msg::Inventory(pb::Inventory {
            replace: true,
            blobs: vec![pb::HeldBlob {
                blob_digest: m.digest().as_bytes().to_vec(),
                complete: false,
                chunks: Some(pb::ChunkBitmap {
                    chunk_count,
                    bits: vec![0b1000_0000],
                }),
                pinned: false,
            }],
            removed_blobs: vec![],
        })
    };
    let chunks_of_target = |s: &S| holding(s, "target", m.digest()).map(|h| h.chunks);
    say(&mut s, session, held(m.chunk_count() + 7));
    assert_eq!(
        chunks_of_target(&s).unwrap_or(0),
        0,
        "a misread bitmap counted"
    );
    say(&mut s, session, held(m.chunk_count()));
    assert_eq!(chunks_of_target(&s), Some(1));
}

fn held(blob: Digest, replace: bool, pinned: bool) -> Msg {
    Msg::Inventory(pb::Inventory {
        replace,
        blobs: vec![pb::HeldBlob {
            blob_digest: blob.as_bytes().to_vec(),
            complete: true,
            chunks: None,
            pinned,
        }],
        removed_blobs: vec![],
    })
}

#[test]
fn get_blob_shows_which_holders_pinned_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let other = join(&mut s, "other", 2);
    let (session, _inbox) = open(&mut s, &other);
    let pins = |s: &mut S| {
        let req = pb::GetBlobRequest {
            digest: m.digest().to_string(),
            include_manifest: false,
        };
        let blob = s.ask(|r| Request::GetBlob(req, r)).expect("get blob");
        (blob.holders.into_iter())
            .map(|h| (h.agent_id, h.pinned))
            .collect::<BTreeSet<_>>()
    };
    say(&mut s, session, held(m.digest(), true, false));
    let unpinned = BTreeSet::from([("other".to_string(), false), ("seeder".to_string(), false)]);
    assert_eq!(pins(&mut s), unpinned);
    // A user pinned it on "other": the agent sends an update, not a snapshot.
    say(&mut s, session, held(m.digest(), false, true));
    assert!(pins(&mut s).contains(&("other".to_string(), true)));
    // The next snapshot is the truth again.
    say(&mut s, session, held(m.digest(), true, false));
    assert_eq!(pins(&mut s), unpinned);
}

#[test]
fn an_inventory_completes_targets_and_a_snapshot_drops_what_it_no_longer_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, _inbox) = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    say(&mut s, session, held(m.digest(), true, false));
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Done, "{targets:?}");
    assert!(holding(&s, "target", m.digest()).is_some_and(|h| h.complete));
    // An empty snapshot: the blob was evicted.
    let empty = pb::Inventory {
        replace: true,
        blobs: vec![],
        removed_blobs: vec![],
    };
    say(&mut s, session, Msg::Inventory(empty));
    assert_eq!(holding(&s, "target", m.digest()), None);
}

#[test]
fn a_removal_report_drops_the_holder_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let other = join(&mut s, "other", 2);
    let (session, _inbox) = open(&mut s, &other);
    say(&mut s, session, held(m.digest(), true, false));
    assert!(holding(&s, "other", m.digest()).is_some_and(|h| h.complete));
    // Evicted: an update (not a snapshot) naming it removed.
    let removed = pb::Inventory {
        replace: false,
        blobs: vec![],
        removed_blobs: vec![m.digest().as_bytes().to_vec()],
    };
    say(&mut s, session, Msg::Inventory(removed));
    assert_eq!(holding(&s, "other", m.digest()), None);
    assert!(
        holding(&s, "seeder", m.digest()).is_some_and(|h| h.complete),
        "only the reporting agent's holding goes"
    );
}

#[test]
fn blob_done_completes_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, mut inbox) = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    assert_eq!(orders(&mut inbox).len(), 1);
    let done = pb::BlobDone {
        blob_digest: m.digest().as_bytes().to_vec(),
    };
    say(&mut s, session, Msg::BlobDone(done));
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Done, "{targets:?}");
    assert_eq!(targets[0].bytes_done, m.size());
}

#[test]
fn any_message_renews_the_lease_a_heartbeat_included() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lease = Duration::from_secs(10);
    let mut s = state(dir.path(), lease);
    let joined = join(&mut s, "a", 2);
    let (session, _inbox) = open(&mut s, &joined);
    for _ in 0..4 {
        s.advance(lease / 2);
        say(&mut s, session, Msg::Heartbeat(pb::Heartbeat {}));
    }
    let state_of = |s: &S| s.agents.iter().next().map(|a| a.state);
    assert_eq!(state_of(&s), Some(pb::AgentState::Ready));
    s.advance(lease + Duration::from_secs(1));
    assert_eq!(
        state_of(&s),
        Some(pb::AgentState::Gone),
        "silent past its lease"
    );
}

#[test]
fn a_source_that_served_a_corrupt_chunk_is_removed_from_the_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let other = join(&mut s, "other", 2);
    let (other_session, _other_inbox) = open(&mut s, &other);
    register(&mut s, other_session, &m);
    let target = join(&mut s, "target", 3);
    let (session, mut inbox) = open(&mut s, &target);
    distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order");
    let bad = super::sources_of(&order)[0].agent_id.clone();

    let rejected = pb::ChunkRejected {
        peer_agent_id: bad.clone(),
        blob_digest: m.digest().as_bytes().to_vec(),
        chunk_index: 0,
    };
    say(&mut s, session, Msg::ChunkRejected(rejected));
    let mut removed = Vec::new();
    while let Ok(Ok(msg)) = inbox.try_recv() {
        if let Some(coordinator_message::Msg::SourceUpdate(u)) = msg.msg {
            assert_eq!(u.order_id, order.order_id);
            removed.extend(u.remove);
        }
    }
    assert_eq!(removed, vec![bad]);
}

#[test]
fn a_failure_is_forgotten_once_the_blob_arrives_another_way() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, mut inbox) = open(&mut s, &target);
    distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order").order_id;
    let why = failed(order, m.digest(), pb::FailureReason::IoError, "disk");
    say(&mut s, session, why);
    // A user pushed it there meanwhile.
    register(&mut s, session, &m);
    let host = s.agents.host_of("target").expect("joined");
    assert_eq!(s.orders.last_failure(host, m.digest()), None);
}
