//! Targets of a blob nobody holds whole and nothing seeds fail once no holder has gained a
//! chunk for `stranded_after`; progress among partial holders keeps them going.

use super::seeding::{Cluster, cluster, messages};
use super::*;

/// Every agent says it is alive, then the clock moves on by `d`, in steps within the lease.
fn live_for(c: &mut Cluster, d: Duration) {
    let step = Duration::from_secs(5);
    let mut left = d;
    while !left.is_zero() {
        for a in 0..c.sessions.len() {
            c.say(a, Msg::Heartbeat(pb::Heartbeat {}));
        }
        let now = left.min(step);
        c.s.advance(now);
        left -= now;
    }
}

/// The holder's copy lost chunk 1 (rot found when a peer rejected it): what its agent says.
fn lost_chunk_1(m: &Manifest) -> [Msg; 2] {
    let digest = m.digest().as_bytes().to_vec();
    [
        Msg::Inventory(pb::Inventory {
            replace: false,
            blobs: vec![],
            removed_blobs: vec![digest.clone()],
        }),
        Msg::Inventory(pb::Inventory {
            replace: false,
            blobs: vec![pb::HeldBlob {
                blob_digest: digest,
                complete: false,
                chunks: Some(pb::ChunkBitmap {
                    chunk_count: 3,
                    bits: vec![0b101],
                }),
                ..Default::default()
            }],
            removed_blobs: vec![],
        }),
    ]
}

fn progress(order: &pb::FetchOrder, chunks: u32) -> Msg {
    Msg::Progress(pb::ProgressBatch {
        items: vec![pb::BlobProgress {
            order_id: order.order_id,
            blob_digest: order.blob_digest.clone(),
            chunks_verified: chunks,
            bytes_done: u64::from(chunks) * 4096,
            rate_bytes_per_sec: 0,
        }],
    })
}

#[test]
fn the_targets_of_a_blob_whose_last_whole_copy_lost_a_chunk_fail_once_nothing_moves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = manifest();
    register(&mut c.s, c.sessions[0], &m);
    c.say(
        0,
        Msg::BlobDone(pb::BlobDone {
            blob_digest: m.digest().as_bytes().to_vec(),
        }),
    );
    let job = distribute(&mut c.s, m.digest(), &["a1", "a2"]).expect("distribute");
    let orders = c.orders();
    let order_of = |agent| {
        (orders.iter().find(|(a, _)| *a == agent))
            .map(|(_, o)| o.clone())
            .expect("an order")
    };
    let (o1, o2) = (order_of(1), order_of(2));
    // Past the first lease after the start, when watching begins.
    live_for(&mut c, Duration::from_secs(30));
    for msg in lost_chunk_1(&m) {
        c.say(0, msg);
    }
    c.say(1, progress(&o1, 1));

    // A target that gains chunks from partial holders keeps the clock from running out.
    live_for(&mut c, Duration::from_secs(20));
    c.say(2, progress(&o2, 1));
    live_for(&mut c, Duration::from_secs(25));
    assert_eq!(target_state(&mut c.s, &job).0, pb::JobState::Running);
    for a in 1..3 {
        messages(&mut c, a);
    }

    // Then nothing moves for 30 s: the chunk is nowhere.
    live_for(&mut c, Duration::from_secs(10));
    let (state, targets) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Failed);
    assert_eq!(targets.len(), 2);
    for t in &targets {
        assert_eq!(t.reason(), pb::FailureReason::NoSource, "{t:?}");
        assert!(t.message.contains("lost"), "{t:?}");
    }
    // Their orders are called off on the agents.
    for a in 1..3 {
        let got = messages(&mut c, a);
        assert!(
            got.iter()
                .any(|m| matches!(m, coordinator_message::Msg::Cancel(_))),
            "a{a}: {got:?}"
        );
    }
}

#[test]
fn a_blob_still_held_whole_is_never_stranded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 2);
    let m = manifest();
    register(&mut c.s, c.sessions[0], &m);
    c.say(
        0,
        Msg::BlobDone(pb::BlobDone {
            blob_digest: m.digest().as_bytes().to_vec(),
        }),
    );
    let job = distribute(&mut c.s, m.digest(), &["a1"]).expect("distribute");
    // A target that makes no progress at all, with a whole holder: slow, not stranded.
    live_for(&mut c, Duration::from_secs(120));
    assert_eq!(target_state(&mut c.s, &job).0, pb::JobState::Running);
}
