//! The agent's `grpc.health.v1` endpoint as Kubernetes probes see it, through a real gRPC
//! health client: live (service "") while it waits for its coordinator, ready
//! (`shoal.agent.ready`) only once joined, gone after shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use shoal_agent::health::READINESS_SERVICE;
use shoal_agent::{Agent, AgentConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const TOKEN: &str = "health-test-token";

async fn check(addr: SocketAddr, service: &str) -> Result<ServingStatus> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .status();
    Ok(status)
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<SocketAddr> {
    let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(probe.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_while_waiting_for_the_coordinator_ready_once_joined() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Bound but not yet served: the agent's Join waits in the listen backlog.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coordinator_addr = listener.local_addr()?;
    let health_addr = free_port()?;
    let config = AgentConfig {
        coordinator: format!("http://{coordinator_addr}"),
        join_token: TOKEN.into(),
        data_dir: dir.path().join("agent"),
        quic_listen: "127.0.0.1:0".parse()?,
        quota_bytes: 1 << 30,
        health_listen: Some(health_addr),
        ..AgentConfig::default()
    };
    let starting = tokio::spawn(Agent::start(config));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match check(health_addr, "").await {
            Ok(status) => {
                assert_eq!(status, ServingStatus::Serving);
                break;
            }
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e.context("health endpoint never answered"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(
        check(health_addr, READINESS_SERVICE).await?,
        ServingStatus::NotServing,
        "not ready before joining"
    );
    assert!(!starting.is_finished(), "the agent cannot have joined yet");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let coordinator = tokio::spawn(shoal_coordinator::run(
        shoal_coordinator::CoordinatorConfig {
            listen: coordinator_addr,
            state_dir: dir.path().join("coordinator"),
            join_token: TOKEN.into(),
            // In-process tests of behaviour, not of trust: plaintext, no credentials (the
            // real-process tests in cli/tests run secure coordinators).
            insecure: true,
            ..Default::default()
        },
        listener,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let agent = tokio::time::timeout(Duration::from_secs(30), starting)
        .await
        .context("agent did not join within 30 s")???;
    assert_eq!(agent.health_addr(), Some(health_addr));
    assert_eq!(
        check(health_addr, READINESS_SERVICE).await?,
        ServingStatus::Serving
    );
    assert_eq!(check(health_addr, "").await?, ServingStatus::Serving);

    agent.shutdown().await;
    assert!(
        check(health_addr, "").await.is_err(),
        "the health endpoint must be gone after shutdown"
    );
    let _ = stop_tx.send(());
    coordinator.await??;
    Ok(())
}

#[tokio::test]
async fn a_taken_health_port_fails_the_start_naming_the_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let config = AgentConfig {
        coordinator: "http://127.0.0.1:9".into(),
        join_token: TOKEN.into(),
        data_dir: dir.path().join("agent"),
        quic_listen: "127.0.0.1:0".parse()?,
        health_listen: Some(taken.local_addr()?),
        ..AgentConfig::default()
    };
    let err = Agent::start(config)
        .await
        .err()
        .context("start must fail while the health port is taken")?;
    let message = err.to_string();
    assert!(message.contains("health_listen"), "{message}");
    assert_eq!(message.lines().count(), 1, "{message}");
    Ok(())
}
