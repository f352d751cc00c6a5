//! The coordinator as grpcurl, load balancers and kubelet see it: health and reflection on
//! a real (TLS) server on a loopback port, and the plaintext health endpoint for probes.

use anyhow::Result;
use shoal_coordinator::CoordinatorConfig;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_and_reflection_answer() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let health_addr = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await?
        .local_addr()?;
    let config = CoordinatorConfig {
        state_dir: dir.path().into(),
        join_token: "t".into(),
        health_listen: Some(health_addr),
        ..Default::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(shoal_coordinator::run(config, listener, async {
        let _ = stopped.await;
    }));

    // The API port is TLS from the CA the coordinator made in its state directory.
    let ca_file = dir.path().join("ca.pem");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !ca_file.exists() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no ca.pem");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ca = std::fs::read_to_string(&ca_file)?;
    let channel = shoal_pki::grpc::api_channel(
        &format!("https://{addr}"),
        Some(&ca),
        std::time::Duration::from_secs(5),
    )?;
    let serving = |channel: tonic::transport::Channel| async move {
        let mut health = HealthClient::new(channel);
        let mut last = None;
        for _ in 0..100 {
            match health
                .check(HealthCheckRequest {
                    service: "shoal.v1.Coordinator".into(),
                })
                .await
            {
                Ok(r) => return Ok(r.into_inner().status()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Err(last.expect("tried"))
    };
    assert_eq!(serving(channel.clone()).await?, ServingStatus::Serving);
    // The plaintext health endpoint, for probes that cannot speak TLS, says the same.
    let plain =
        tonic::transport::Endpoint::from_shared(format!("http://{health_addr}"))?.connect_lazy();
    assert_eq!(serving(plain).await?, ServingStatus::Serving);
    // A plaintext client gets nothing from the API port.
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(std::time::Duration::from_secs(2))
        .connect_lazy();
    let refused = HealthClient::new(plaintext)
        .check(HealthCheckRequest::default())
        .await;
    assert!(
        refused.is_err(),
        "plaintext reached the TLS port: {refused:?}"
    );

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let Some(answer) = answers.message().await? else {
        anyhow::bail!("no reflection answer");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        anyhow::bail!("unexpected reflection answer");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "shoal.v1.Coordinator",
        "shoal.v1.AgentSession",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    let _ = stop.send(());
    server.await??;
    Ok(())
}
