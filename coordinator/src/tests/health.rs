//! grpc.health.v1 follows the state task: NOT_SERVING while it does not answer, SERVING when
//! it does again; once it panics, calls fail at once with UNAVAILABLE and the reason, and
//! the coordinator stops with an error (the binary exits non-zero).

use std::time::Instant;

use shoal_proto::pb::v1::coordinator_client::CoordinatorClient;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::*;
use crate::health::Watchdog;
use crate::state::Fault;

type Health = HealthClient<tonic::transport::Channel>;

async fn status(health: &mut Health, service: &str) -> ServingStatus {
    let req = HealthCheckRequest {
        service: service.into(),
    };
    let answer = health.check(req).await.expect("health answers");
    answer.into_inner().status()
}

/// Waits until both services report `want`; panics after `within`.
async fn until(health: &mut Health, want: ServingStatus, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let liveness = status(health, "").await;
        let readiness = status(health, "shoal.v1.Coordinator").await;
        if liveness == want && readiness == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still {liveness:?} / {readiness:?} after {within:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_state_task_and_its_death_stops_the_coordinator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), Duration::from_secs(10));
    let started = crate::start(&config).expect("start");
    let faults = started.requests.clone();
    let watchdog = Watchdog {
        every: Duration::from_millis(50),
        timeout: Duration::from_millis(300),
    };
    let (channel, server) = serve_on_loopback(config, started, watchdog).await;
    let mut health = HealthClient::new(channel.clone());
    let mut api = CoordinatorClient::new(channel);
    until(&mut health, ServingStatus::Serving, Duration::from_secs(5)).await;

    // A stall past the timeout: NOT_SERVING while it lasts, SERVING once it answers again.
    let stalled = Instant::now();
    let stall = Request::Fault(Fault::Stall(Duration::from_millis(1500)));
    faults.send(stall).await.expect("sent");
    until(
        &mut health,
        ServingStatus::NotServing,
        Duration::from_secs(1),
    )
    .await;
    assert!(
        stalled.elapsed() < Duration::from_millis(1500),
        "seen only after the stall"
    );
    until(&mut health, ServingStatus::Serving, Duration::from_secs(3)).await;
    let listed = api.list_jobs(pb::ListJobsRequest::default()).await;
    assert!(listed.is_ok(), "the API serves again: {listed:?}");

    // A panic: a call queued behind it fails at once with the reason, health turns
    // NOT_SERVING, and the coordinator stops with an error. (A call that changes state:
    // reads may overtake the queue, see `Request::may_overtake`.)
    let watch = HealthCheckRequest {
        service: "shoal.v1.Coordinator".into(),
    };
    let mut watching = health.watch(watch).await.expect("watch").into_inner();
    let first = watching.message().await.expect("stream").expect("status");
    assert_eq!(first.status(), ServingStatus::Serving);
    let stall = Request::Fault(Fault::Stall(Duration::from_millis(200)));
    faults.send(stall).await.expect("sent");
    faults
        .send(Request::Fault(Fault::Panic))
        .await
        .expect("sent");
    drop(faults);
    let called = Instant::now();
    let cancel = pb::CancelJobRequest {
        job_id: "job-none".into(),
        ..Default::default()
    };
    let refused = api
        .cancel_job(cancel)
        .await
        .expect_err("the state task is gone");
    assert!(
        called.elapsed() < Duration::from_secs(2),
        "failed only after {:?}",
        called.elapsed()
    );
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("panicked")
            && refused.message().contains("a fault injected by a test"),
        "{}",
        refused.message()
    );
    let next = tokio::time::timeout(Duration::from_secs(2), watching.message()).await;
    let next = next
        .expect("a status within 2 s")
        .expect("stream")
        .expect("status");
    assert_eq!(next.status(), ServingStatus::NotServing);

    let ended = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the coordinator stops")
        .expect("task");
    let Err(crate::CoordinatorError::StateTask(why)) = ended else {
        panic!("expected the state task's error, got {ended:?}");
    };
    assert!(why.contains("a fault injected by a test"), "{why}");
}
