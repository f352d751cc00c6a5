//! `grpc.health.v1` follows the state task. A watchdog asks the state task a [`Request::Ping`]
//! through its own request channel every second: behind whatever is queued there, so an
//! answer says the task runs and keeps up. No answer within the timeout (5 s) makes both
//! `""` (liveness) and `shoal.v1.Coordinator` (readiness) NOT_SERVING, until one comes.
//!
//! If the state task ends (a panic: the driver records why), or the database writer's thread
//! does, nothing can bring it back in this process: health turns NOT_SERVING, every request
//! waiting on the state is failed with UNAVAILABLE and the reason, the server stops, and
//! [`crate::run`] returns the reason as an error, so the process exits non-zero and
//! Kubernetes restarts it (a restart loses nothing durable: the writer drains its queue
//! first). A stall, which may pass, only turns health NOT_SERVING: the liveness probe
//! restarts a coordinator that stays stuck.

use std::future::Future;
use std::time::{Duration, Instant};

use shoal_proto::pb::v1::coordinator_server::CoordinatorServer;
use tokio::sync::{oneshot, watch};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::driver::{Down, StateTask};
use crate::service::Api;
use crate::state::Request;
use crate::writer::Stopped;

/// How often the state task is probed, and how long it has to answer.
#[derive(Clone, Copy, Debug)]
pub struct Watchdog {
    pub every: Duration,
    pub timeout: Duration,
}

impl Default for Watchdog {
    fn default() -> Self {
        Self {
            every: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

/// The longest a stopping coordinator waits for the writer to store what is queued.
const WRITER_DRAIN: Duration = Duration::from_secs(20);

/// What the watchdog watches.
#[derive(Debug)]
pub struct Watched {
    pub state_task: StateTask,
    pub writer: Stopped,
    pub requests: crate::driver::Requests,
    pub reporter: HealthReporter,
    pub down: Down,
}

/// Sets both services' status.
async fn set(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    match status {
        ServingStatus::Serving => reporter.set_serving::<CoordinatorServer<Api>>().await,
        _ => reporter.set_not_serving::<CoordinatorServer<Api>>().await,
    }
}

/// How long the state task took to answer a ping; `None` if it did not within `timeout`.
async fn probe(requests: &crate::driver::Requests, timeout: Duration) -> Option<Duration> {
    let started = Instant::now();
    let (tx, rx) = oneshot::channel();
    let answered = async {
        requests.send(Request::Ping(tx)).await.ok()?;
        rx.await.ok()
    };
    let answer = tokio::time::timeout(timeout, answered).await.ok().flatten();
    answer.map(|()| started.elapsed())
}

/// Watches until `stop` (then stops the state task) or until the state task or the writer
/// ends on its own: then `Err(why)`, with health NOT_SERVING, `down` set and `fatal` sent
/// (the server stops). Either way it returns once the writer has stored its queue.
pub async fn watch(
    watched: Watched,
    config: Watchdog,
    stop: impl Future<Output = ()>,
    fatal: watch::Sender<bool>,
) -> Result<(), String> {
    let Watched {
        mut state_task,
        mut writer,
        requests,
        reporter,
        down,
    } = watched;
    tokio::pin!(stop);
    let mut serving = true;
    let mut writer_ended = false;
    let mut state_ended = false;
    let outcome = loop {
        let next = async {
            tokio::time::sleep(config.every).await;
            probe(&requests, config.timeout).await
        };
        tokio::select! {
            biased;
            () = &mut stop => break Ok(()),
            ended = state_task.ended() => {
                state_ended = true;
                let why = match ended {
                    Ok(()) => (down.get().cloned())
                        .unwrap_or_else(|| "the state task ended".to_string()),
                    Err(panic) => format!("the state task panicked: {panic}"),
                };
                break Err(why);
            }
            ended = writer.wait() => {
                writer_ended = true;
                let why = ended.err().unwrap_or_else(|| "the state database writer ended".into());
                break Err(why);
            }
            answer = next => {
                let seconds = answer.unwrap_or(config.timeout).as_secs_f64();
                metrics::gauge!(crate::metrics::STATE_PROBE_SECONDS).set(seconds);
                match (answer.is_some(), serving) {
                    (false, true) => {
                        tracing::error!(timeout = ?config.timeout, "the state task did not answer a health probe in time: NOT_SERVING until it does");
                        set(&reporter, ServingStatus::NotServing).await;
                        serving = false;
                    }
                    (true, false) => {
                        tracing::warn!("the state task answers again: SERVING");
                        set(&reporter, ServingStatus::Serving).await;
                        serving = true;
                    }
                    _ => {}
                }
            }
        }
    };
    if let Err(why) = &outcome {
        let _ = down.set(why.clone());
        tracing::error!(reason = %why, "the coordinator cannot go on: NOT_SERVING, and exiting");
        set(&reporter, ServingStatus::NotServing).await;
        let _ = fatal.send(true);
    }
    // The state's handles to the writer go with the state; the writer then stores what is
    // queued and ends.
    if !state_ended {
        state_task.stop();
        let _ = state_task.ended().await;
    }
    drop(requests);
    if !writer_ended {
        match tokio::time::timeout(WRITER_DRAIN, writer.wait()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the state database writer failed"),
            Err(_) => tracing::error!(
                "the state database writer did not store its queue within {WRITER_DRAIN:?}: the last writes may be lost"
            ),
        }
    }
    outcome
}
