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

/// The planner's next slice of a big burst is always due; the agents' messages queued
/// meanwhile must not wait for the whole burst (20,000 wants took 1.4 s in one step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_work_takes_turns_with_the_slices_of_a_burst() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = crate::start(&config(dir.path(), Duration::from_secs(10))).expect("start");
    let requests = started.requests.clone();
    let (planned, burst) = tokio::sync::oneshot::channel();
    let wants = 200_000;
    let fault = Request::Fault(Fault::Burst(wants, planned));
    requests.send(fault).await.expect("sent");
    burst.await.expect("the burst's step");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let ask = Request::Fault(Fault::QueuedWants(tx));
    requests.send(ask).await.expect("sent");
    let queued = rx.await.expect("answered");
    // Without the turns the request is handled once the queue is empty. With them it
    // waits for one slice (128), or a few if this task is slow to send it.
    assert!(
        queued > wants as usize / 2,
        "handled after the burst was planned: {queued} wants left of {wants}"
    );
    stop(started).await;
}

/// Agents' messages that have waited past a batch's time go before the next slice of a
/// burst: a backlog of them is taken in batches back to back, not one batch per slice
/// (2,000 messages behind a Distribute to 20,000 agents waited 200-500 ms so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_backlog_goes_before_the_slices_of_a_burst() {
    // Queued while the burst's step runs (it takes far longer than a batch's time): by
    // the time they are taken up they are all overdue. Eight batches' worth.
    let backlog = (0..2_000).map(|_| Request::Ping(tokio::sync::oneshot::channel().0));
    let planned = planned_behind_a_burst(backlog).await;
    // Taking turns with the batches, eight slices (of 128) would have gone first.
    assert!(
        planned <= 2 * 128,
        "{planned} wants were planned before the backlog was taken"
    );
}

/// Overdue messages go first, but not for ever: under a flood of them (here 400 ms of
/// work) the planner's timers still get a turn every `TurnConfig::timer_patience` (100 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_overdue_messages_does_not_starve_the_timers() {
    let flood = (0..40).map(|_| Request::Fault(Fault::Stall(Duration::from_millis(10))));
    let planned = planned_behind_a_burst(flood).await;
    // The burst's own slice, then one every 100 ms of the 400: a few, and never none.
    assert!(
        planned >= 2 * 128,
        "only {planned} wants were planned while 400 ms of overdue work ran"
    );
}

/// Queues a burst of 200,000 wants, then `backlog` behind it: how many wants the planner
/// had planned when the request after the backlog was taken up.
async fn planned_behind_a_burst(backlog: impl Iterator<Item = Request>) -> usize {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = crate::start(&config(dir.path(), Duration::from_secs(10))).expect("start");
    let requests = started.requests.clone();
    let (planned, burst) = tokio::sync::oneshot::channel();
    let wants = 200_000;
    requests
        .send(Request::Fault(Fault::Burst(wants, planned)))
        .await
        .expect("sent");
    for request in backlog {
        requests.send(request).await.expect("sent");
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    requests
        .send(Request::Fault(Fault::QueuedWants(tx)))
        .await
        .expect("sent");
    burst.await.expect("the burst's step");
    let queued = rx.await.expect("answered");
    stop(started).await;
    wants as usize - queued
}

/// The state task has a thread of its own: it answers while the one worker of the runtime
/// that serves gRPC is held by a task that never yields. Spawned on that runtime, as it
/// was, it waited for the worker; under a wave of 20,000 agents it ran 2-5 ms in every 7.
#[test]
fn the_state_answers_while_the_grpc_runtime_is_busy() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let started = {
        let _inside = runtime.enter();
        crate::start(&config(dir.path(), Duration::from_secs(10))).expect("start")
    };
    // The runtime's only worker, held until released.
    let (held, holding) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    runtime.spawn(async move {
        let _ = held.send(());
        let _ = released.recv();
    });
    holding.recv().expect("the worker is held");
    let requests = started.requests.clone();
    let asking = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let answer = asking.block_on(async {
        let list = ask(&requests, |r| Request::ListJobs(Default::default(), r));
        tokio::time::timeout(Duration::from_secs(5), list).await
    });
    let _ = release.send(());
    assert!(
        matches!(answer, Ok(Ok(_))),
        "the state did not answer while the gRPC runtime was busy: {answer:?}"
    );
    drop(requests);
    runtime.block_on(stop(started));
}

/// Stopping the state task is heard between its turns, also under a flood of requests that
/// never lets it wait (the coordinator's shutdown waits for it before the writer drains).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_task_stops_under_a_flood() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = crate::start(&config(dir.path(), Duration::from_secs(10))).expect("start");
    let requests = started.requests.clone();
    let flood = tokio::spawn(async move {
        loop {
            let stall = Request::Fault(Fault::Stall(Duration::from_millis(1)));
            if requests.send(stall).await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Started {
        mut state_task,
        requests,
        mut writer,
        ..
    } = started;
    state_task.stop();
    let ended = tokio::time::timeout(Duration::from_secs(5), state_task.ended()).await;
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    drop(requests);
    flood.abort();
    writer.wait().await.expect("the writer stored everything");
}

/// A burst's orders go out paced by what their completions will cost (`shoal_planner::Turns`, its rest after a timer turn that sent orders):
/// after a timer turn that sent orders, the timer rests 1.5 times that turn before the
/// next, so a Distribute's completions cannot come back faster than the state takes them
/// in. Here every timer turn is made to take 50 ms: the 600 orders go out in three turns
/// (256 a turn) with two rests of 75 ms between them; unpaced, the turns come back to back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_orders_of_a_burst_go_out_paced_by_the_turns_that_send_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = crate::start(&config(dir.path(), Duration::from_secs(60))).expect("start");
    let requests = started.requests.clone();
    let (seeder, _seeder_inbox) = agent(&requests, "seeder", 7000).await;
    let m = crate::state::tests::manifest();
    let registered = pb::BlobRegistered {
        manifest: Some(pb::Manifest::from(&m)),
    };
    let msg = pb::agent_message::Msg::BlobRegistered(registered);
    let from_seeder = Request::FromAgent {
        session: seeder,
        msg,
    };
    requests.send(from_seeder).await.expect("sent");
    let targets = 600;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let mut inboxes = Vec::new();
    for i in 0..targets {
        let (_, mut inbox) = agent(&requests, &format!("target-{i}"), 7001 + i).await;
        let arrived_tx = arrived_tx.clone();
        inboxes.push(tokio::spawn(async move {
            while let Some(Ok(m)) = inbox.recv().await {
                if let Some(pb::coordinator_message::Msg::FetchOrder(o)) = m.msg {
                    let _ = arrived_tx.send((o.order_id, std::time::Instant::now()));
                }
            }
        }));
    }
    let stall = Duration::from_millis(50);
    let slow = Request::Fault(crate::state::Fault::SlowTimers(stall));
    requests.send(slow).await.expect("sent");
    let req = pb::DistributeRequest {
        blobs: vec![m.digest().to_string()],
        targets: Some(pb::TargetSelector {
            selector: Some(pb::target_selector::Selector::All(pb::AllAgents {})),
        }),
        ..Default::default()
    };
    let distributed = ask(&requests, |r| {
        Request::Distribute(req, Default::default(), r)
    })
    .await;
    assert!(distributed.is_ok(), "{distributed:?}");
    let mut at = Vec::new();
    while at.len() < targets as usize {
        let next = tokio::time::timeout(Duration::from_secs(30), arrived.recv()).await;
        let Ok(Some(order)) = next else {
            panic!("{} of {targets} targets got their order", at.len());
        };
        at.push(order);
    }
    let ids: std::collections::BTreeSet<u64> = at.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), at.len(), "an order was sent twice");
    let first = at.iter().map(|(_, t)| *t).min().expect("orders");
    let last = at.iter().map(|(_, t)| *t).max().expect("orders");
    // Two rests of 75 ms and two turns of 50 ms between the first order and the last:
    // 250 ms paced, 100 ms unpaced.
    let span = last - first;
    assert!(
        span >= Duration::from_millis(200),
        "the orders went out over {span:?}: the turns that sent them did not rest"
    );
    drop(inboxes);
    stop(started).await;
}
