//! A disk slower than the lease holds up no lease: with every commit taking twice the lease,
//! agents that heartbeat as usual stay ready, the state answers at once what needs no
//! write, and a Distribute is still answered only once its job is stored, and found after a
//! restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Instant;

use shoal_proto::Manifest;
use shoal_proto::pb::v1::agent_message::Msg;

use super::*;
use crate::db::Db;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_slower_than_the_lease_expires_no_lease_and_distribute_stays_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lease = Duration::from_secs(1);
    let config = config(dir.path(), lease);
    let db = Db::open(&dir.path().join(crate::DB_FILE)).expect("db");
    let faults = db.faults();
    let started = crate::start_on(&config, db).expect("start");
    let requests = started.requests.clone();

    let (seeder, _seeder_inbox) = agent(&requests, "seeder", 1).await;
    let (target, mut target_inbox) = agent(&requests, "target", 2).await;
    let m = Manifest::from_reader(&[7u8; 3 * 4096][..], 4096).expect("manifest");
    let registered = pb::BlobRegistered {
        manifest: Some(pb::Manifest::from(&m)),
    };
    let msg = Msg::BlobRegistered(registered);
    (requests.send(Request::FromAgent {
        session: seeder,
        msg,
    }))
    .await
    .expect("sent");

    // From now on every commit takes twice the lease.
    let slow = lease * 2;
    faults
        .commit_delay_ms
        .store(slow.as_millis() as u64, Relaxed);
    // Both agents heartbeat every quarter lease, as their sessions do.
    let beating = Arc::new(AtomicBool::new(true));
    for session in [seeder, target] {
        let (requests, beating) = (requests.clone(), beating.clone());
        tokio::spawn(async move {
            while beating.load(Relaxed) {
                let msg = Msg::Heartbeat(pb::Heartbeat {});
                let _ = requests.send(Request::FromAgent { session, msg }).await;
                tokio::time::sleep(lease / 4).await;
            }
        });
    }

    let asked = Instant::now();
    let req = pb::DistributeRequest {
        blobs: vec![m.digest().to_string()],
        targets: Some(pb::TargetSelector {
            selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
                agent_ids: vec!["target".into()],
            })),
        }),
        ..Default::default()
    };
    let distribute = {
        let requests = requests.clone();
        tokio::spawn(async move {
            ask(&requests, |r| {
                Request::Distribute(req, Default::default(), r)
            })
            .await
        })
    };
    // The order goes out, and the state answers, while the job's write is on the disk.
    let order = tokio::time::timeout(lease / 2, target_inbox.recv()).await;
    assert!(
        matches!(order, Ok(Some(Ok(_)))),
        "no order within half a lease: planning waited for the disk ({order:?})"
    );
    let listing = Instant::now();
    let agents = ask(&requests, |r| Request::ListAgents(Default::default(), r))
        .await
        .expect("list");
    assert!(
        listing.elapsed() < lease / 2,
        "ListAgents took {:?} behind a write",
        listing.elapsed()
    );
    assert_eq!(agents.agents.len(), 2);

    let job = distribute.await.expect("task").expect("distribute").job_id;
    assert!(
        asked.elapsed() >= slow,
        "answered after {:?}, before its write of {slow:?} was stored",
        asked.elapsed()
    );
    // The target finishes: its job's write queues behind the slow disk too. Three leases
    // more of slow commits.
    let done = Msg::BlobDone(pb::BlobDone {
        blob_digest: m.digest().as_bytes().to_vec(),
    });
    (requests.send(Request::FromAgent {
        session: target,
        msg: done,
    }))
    .await
    .expect("sent");
    tokio::time::sleep(lease * 3).await;

    let agents = ask(&requests, |r| Request::ListAgents(Default::default(), r))
        .await
        .expect("list");
    for a in &agents.agents {
        assert_eq!(
            a.state(),
            pb::AgentState::Ready,
            "{} lost its lease behind the slow disk",
            a.agent_id
        );
    }
    let get = pb::GetJobRequest {
        job_id: job.clone(),
        include_targets: true,
    };
    let got = ask(&requests, |r| Request::GetJob(get.clone(), r))
        .await
        .expect("job")
        .job
        .expect("job");
    assert_eq!(got.state(), pb::JobState::Done, "{got:?}");

    // A restart on the same file finds the job.
    beating.store(false, Relaxed);
    faults.commit_delay_ms.store(0, Relaxed);
    drop(requests);
    stop(started).await;
    let started = crate::start(&config).expect("restart");
    let found = ask(&started.requests, |r| Request::GetJob(get, r)).await;
    assert_eq!(
        found.expect("the job is on disk").job.expect("job").job_id,
        job
    );
    stop(started).await;
}
