//! The coordinator as it runs: the real driver on the real clock, its writer thread on a real
//! redb file (made slow or failing by the file's fault hooks), and for health the real gRPC
//! server on a loopback port. The state is reached through its request channel, as the gRPC
//! layer reaches it.

use std::time::Duration;

use shoal_proto::pb::v1 as pb;
use tokio::sync::{mpsc, oneshot};

use crate::state::{ApiError, Reply, Request, SessionId};
use crate::{CoordinatorConfig, Started};

mod admission;
mod health;
mod lanes;
mod slow_disk;

use crate::state::tests::TOKEN;

fn config(dir: &std::path::Path, lease: Duration) -> CoordinatorConfig {
    CoordinatorConfig {
        state_dir: dir.into(),
        join_token: TOKEN.into(),
        lease_ms: lease.as_millis() as u64,
        heartbeat_ms: (lease / 4).as_millis() as u64,
        // In-process tests of behaviour, not of trust: plaintext, no credentials (the
        // real-process tests in cli/tests run secure coordinators).
        insecure: true,
        ..Default::default()
    }
}

/// Asks the state task, as the gRPC layer does.
async fn ask<R>(
    requests: &crate::driver::Requests,
    make: impl FnOnce(Reply<R>) -> Request,
) -> Result<R, ApiError> {
    let (tx, rx) = oneshot::channel();
    requests.send(make(tx)).await.expect("the state task runs");
    rx.await.expect("answered")
}

type Inbox = mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>;

/// An agent that joined and opened its session.
async fn agent(requests: &crate::driver::Requests, id: &str, port: u16) -> (SessionId, Inbox) {
    let req = crate::state::tests::join_request(id, "", port);
    let joined = ask(requests, |r| Request::Join(req, r))
        .await
        .expect("join");
    let (tx, inbox) = mpsc::channel(1024);
    let hello = pb::Hello {
        agent_id: joined.agent_id,
        session_token: joined.session_token,
        quic_addresses: vec![],
    };
    let session = ask(requests, |reply| Request::OpenSession { hello, tx, reply })
        .await
        .expect("session");
    (session, inbox)
}

/// Serves `started` on the real gRPC server on a loopback port: a channel to it, and the
/// server's task (it ends with what `serve` returns).
async fn serve_on_loopback(
    config: CoordinatorConfig,
    started: Started,
    watchdog: crate::health::Watchdog,
) -> (
    tonic::transport::Channel,
    tokio::task::JoinHandle<Result<(), crate::CoordinatorError>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move {
        crate::serve(&config, listener, std::future::pending(), started, watchdog).await
    });
    let channel = tonic::transport::Endpoint::from_shared(url)
        .expect("url")
        .connect()
        .await
        .expect("connect");
    (channel, server)
}

/// Stops the state task and waits until its writer has stored everything and closed the
/// file.
async fn stop(started: Started) {
    let Started {
        mut state_task,
        requests,
        mut writer,
        ..
    } = started;
    drop(requests);
    state_task.stop();
    let _ = state_task.ended().await;
    writer.wait().await.expect("the writer stored everything");
}
