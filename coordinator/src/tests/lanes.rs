//! The state task's two lanes (`driver::run`): a read queued behind a backlog is answered
//! after at most one batch of it, while everything else keeps its order.

use std::time::Instant;

use super::*;
use crate::state::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_overtake_a_backlog_and_changes_keep_their_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = crate::start(&config(dir.path(), Duration::from_secs(10))).expect("start");
    let requests = started.requests.clone();
    // A backlog: six requests that each hold the state task 200 ms.
    let step = Duration::from_millis(200);
    let queued = Instant::now();
    for _ in 0..6 {
        let stall = Request::Fault(Fault::Stall(step));
        requests.send(stall).await.expect("sent");
    }
    // A change queued behind them, then a read.
    let cancel = {
        let requests = requests.clone();
        tokio::spawn(async move {
            let req = pb::CancelJobRequest {
                job_id: "job-none".into(),
                ..Default::default()
            };
            let answer = ask(&requests, |r| Request::CancelJob(req, None, r)).await;
            (answer, queued.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    let listed = ask(&requests, |r| Request::ListJobs(Default::default(), r)).await;
    let read_after = queued.elapsed();
    assert!(listed.is_ok(), "{listed:?}");
    // The first stall runs when the read arrives; at most one more may be in the batch
    // being taken (a batch ends after its time budget, here after one stall).
    assert!(
        read_after < step * 3,
        "the read waited {read_after:?} behind a backlog of {:?}",
        step * 6
    );
    let (cancelled, cancel_after) = cancel.await.expect("task");
    assert!(
        matches!(cancelled, Err(ApiError::NotFound(_))),
        "{cancelled:?}"
    );
    assert!(
        cancel_after >= step * 6,
        "the change overtook the backlog: answered after {cancel_after:?}"
    );
    stop(started).await;
}
