//! Who may do what on a real, secure cluster (docs/SECURITY.md): API tokens and their roles,
//! TLS that a plaintext client or a foreign CA cannot pass, agents that must prove their
//! join token and cannot act as another agent.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use shoal_pki::grpc;
use shoal_proto::pb::v1::{self as pb, agent_session_client::AgentSessionClient};
use tonic::Code;

use crate::admin::agent_ids;
use crate::harness::{Cluster, TOKEN, random_file, read, shoal};
use shoal_tests::impostor::Impostor;

const MIB: usize = 1 << 20;

/// Tokens the test's coordinator accepts besides the harness's admin token.
const DEPLOYER: &str = "deployer-token-0123456789abcdef";
const OTHER_DEPLOYER: &str = "other-deployer-token-0123456789";
const READER: &str = "reader-token-0123456789abcdef";

async fn cluster_with_roles(agents: usize) -> Result<Cluster> {
    let dir = tempfile::tempdir()?;
    let mut toml = String::new();
    for (name, role, token) in [
        ("ci", "deployer", DEPLOYER),
        ("other", "deployer", OTHER_DEPLOYER),
        ("dashboards", "reader", READER),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, format!("{token}\n"))?;
        toml.push_str(&format!(
            "[[api_tokens]]\nname = \"{name}\"\nrole = \"{role}\"\ntoken_file = {:?}\n",
            file.display().to_string()
        ));
    }
    let cluster = Cluster::start_configured(agents, &[], 2000, &toml, "").await?;
    // The token files must outlive the coordinator's start only: it reads them once.
    drop(dir);
    Ok(cluster)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

fn to(ids: &[&str]) -> Option<pb::TargetSelector> {
    Some(pb::TargetSelector {
        selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
            agent_ids: ids.iter().map(|s| s.to_string()).collect(),
        })),
    })
}

#[tokio::test]
async fn api_calls_need_a_token_whose_role_allows_them() -> Result<()> {
    let cluster = cluster_with_roles(2).await?;
    let ids = agent_ids(&cluster).await?;
    let file = random_file(cluster.dir.path(), "blob", 2 * MIB, 31)?;
    let digest = cluster.push(0, &file)?;
    let distribute = pb::DistributeRequest {
        blobs: vec![digest.clone()],
        targets: to(&[&ids[1]]),
        ..Default::default()
    };

    // No credentials, or a token nobody configured: UNAUTHENTICATED, for reads too.
    for token in [None, Some("not-a-configured-token-0123456789")] {
        let mut c = cluster.client_as(token).await?;
        assert_eq!(
            code(c.list_agents(pb::ListAgentsRequest::default()).await),
            Code::Unauthenticated
        );
        assert_eq!(
            code(c.distribute(distribute.clone()).await),
            Code::Unauthenticated
        );
    }

    // A reader reads, and nothing else.
    let mut reader = cluster.client_as(Some(READER)).await?;
    assert_eq!(
        code(reader.list_agents(pb::ListAgentsRequest::default()).await),
        Code::Ok
    );
    assert_eq!(
        code(reader.distribute(distribute.clone()).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            reader
                .remove_blob(pb::RemoveBlobRequest {
                    digest: digest.clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::PermissionDenied
    );

    // A deployer distributes; the job names it; another deployer cannot cancel it.
    let mut deployer = cluster.client_as(Some(DEPLOYER)).await?;
    let job = deployer
        .distribute(distribute.clone())
        .await?
        .into_inner()
        .job_id;
    let record = cluster.job(&job).await?;
    assert_eq!(record.creator, "token:ci");
    let cancel = pb::CancelJobRequest {
        job_id: job.clone(),
        reason: String::new(),
    };
    let mut other = cluster.client_as(Some(OTHER_DEPLOYER)).await?;
    assert_eq!(
        code(other.cancel_job(cancel.clone()).await),
        Code::PermissionDenied
    );
    assert_eq!(code(deployer.cancel_job(cancel).await), Code::Ok);
    // Operators' calls are the admin's.
    assert_eq!(
        code(
            deployer
                .drain_agent(pb::DrainAgentRequest {
                    agent_id: ids[1].clone(),
                })
                .await
        ),
        Code::PermissionDenied
    );
    // ResolveUrl binds a URL to content: only the fetching agent's own session may.
    let mut admin = cluster.client().await?;
    assert_eq!(
        code(
            admin
                .resolve_url(pb::ResolveUrlRequest {
                    agent_id: ids[0].clone(),
                    ..Default::default()
                })
                .await
        ),
        Code::PermissionDenied
    );

    // The CLI: without a token it says so and fails; with SHOAL_TOKEN it works.
    let bare = shoal()
        .args(["agents", "--coordinator", &cluster.url()])
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .env_remove("SHOAL_TOKEN")
        .env_remove("SHOAL_TOKEN_FILE")
        .output()?;
    let said = String::from_utf8_lossy(&bare.stderr);
    ensure!(
        !bare.status.success() && said.contains("credentials"),
        "shoal agents without a token: {said}"
    );
    let with = shoal()
        .args(["agents", "--coordinator", &cluster.url()])
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .env("SHOAL_TOKEN", READER)
        .output()?;
    ensure!(
        with.status.success(),
        "shoal agents as reader: {}",
        String::from_utf8_lossy(&with.stderr)
    );
    ensure!(String::from_utf8_lossy(&with.stdout).contains(&ids[0]));
    // A token never reaches the logs.
    let log = read(&cluster.coordinator.log);
    for token in [DEPLOYER, OTHER_DEPLOYER, READER] {
        ensure!(!log.contains(token), "a token is in the coordinator's log");
    }
    Ok(())
}

#[tokio::test]
async fn only_the_cluster_ca_over_tls_reaches_the_api() -> Result<()> {
    let cluster = Cluster::start(1, &[], 2000).await?;
    // Plaintext to the TLS port: no answer.
    let plain = grpc::api_channel(
        &format!("http://{}", cluster.addr),
        None,
        Duration::from_secs(2),
    )?;
    let mut c = grpc::api_client(plain, Some(crate::harness::ADMIN_TOKEN))?;
    let r = c.list_agents(pb::ListAgentsRequest::default()).await;
    ensure!(r.is_err(), "plaintext reached the API: {r:?}");
    // A CA other than the cluster's: the coordinator's certificate is refused, so the token
    // is never sent.
    let foreign = shoal_pki::ClusterCa::generate()?;
    let channel = grpc::api_channel(
        &cluster.url(),
        Some(foreign.cert_pem()),
        Duration::from_secs(2),
    )?;
    let mut c = grpc::api_client(channel, Some(crate::harness::ADMIN_TOKEN))?;
    let r = c.list_agents(pb::ListAgentsRequest::default()).await;
    ensure!(r.is_err(), "a foreign CA verified the coordinator: {r:?}");
    // `shoal ca-cert` prints what clients need from the state directory (as kubectl exec
    // runs it in the chart's coordinator pod), and never the key.
    let printed = shoal()
        .arg("ca-cert")
        .arg("--state-dir")
        .arg(cluster.dir.path().join("coordinator"))
        .output()?;
    ensure!(printed.status.success());
    assert_eq!(
        String::from_utf8(printed.stdout)?,
        std::fs::read_to_string(cluster.ca_file())?
    );
    // The CLI explains a missing CA.
    let out = shoal()
        .args(["agents", "--coordinator", &cluster.url()])
        .env_remove("SHOAL_CA_FILE")
        .env("SHOAL_TOKEN", crate::harness::ADMIN_TOKEN)
        .output()?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("--ca-file"),
        "shoal agents without a CA: {said}"
    );
    Ok(())
}

#[tokio::test]
async fn agents_prove_their_token_and_act_only_as_themselves() -> Result<()> {
    let cluster = Cluster::start(1, &[], 2000).await?;
    let ids = agent_ids(&cluster).await?;

    // An agent with a wrong join token stops at once: the coordinator's CA proof fails.
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("log");
    let mut agent = shoal()
        .args([
            "agent",
            "--coordinator",
            &cluster.url(),
            "--join-token",
            "wrong-token",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = agent.try_wait()? {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = agent.kill();
            bail!("an agent with a wrong token kept running: {}", read(&log));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: std::fs::read(&log)?,
    };
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("could not prove it knows the join token"),
        "agent with a wrong token: {said}"
    );

    // A session of the test's own: it learns the CA and joins as a real agent would.
    let impostor = Impostor::join(&cluster.url(), &cluster.ca_file(), TOKEN, "127.0.0.1:9").await?;
    let (joined, identity) = (&impostor.joined, &impostor.identity);
    let channel = |identity: Option<&shoal_pki::Identity>| impostor.channel(identity);
    let hello = |agent_id: &str| impostor.hello(agent_id);
    // Without its certificate a session is refused, even with the right session token.
    let r = AgentSessionClient::new(channel(None)?)
        .session(tokio_stream::iter([hello(&joined.agent_id)]))
        .await;
    assert_eq!(code(r), Code::Unauthenticated);
    // With it, the session may not claim another agent's id.
    let mut as_itself = AgentSessionClient::new(channel(Some(identity))?);
    let r = as_itself
        .session(tokio_stream::iter([hello(&ids[0])]))
        .await;
    assert_eq!(code(r), Code::PermissionDenied);
    // Its job-API calls are an agent's: to itself only, URLs for itself only, no listing.
    let mut api = grpc::api_client(channel(Some(identity))?, None)?;
    let everyone = pb::DistributeRequest {
        blobs: vec![format!("sha256:{}", "0".repeat(64))],
        targets: Some(pb::TargetSelector {
            selector: Some(pb::target_selector::Selector::All(pb::AllAgents {})),
        }),
        ..Default::default()
    };
    assert_eq!(code(api.distribute(everyone).await), Code::PermissionDenied);
    assert_eq!(
        code(
            api.resolve_url(pb::ResolveUrlRequest {
                agent_id: ids[0].clone(),
                ..Default::default()
            })
            .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(api.list_agents(pb::ListAgentsRequest::default()).await),
        Code::PermissionDenied
    );
    // The real agent is untouched by all this.
    let state = (cluster.client().await?)
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == ids[0])
        .map(|a| a.state());
    if state != Some(pb::AgentState::Ready) {
        bail!("agent {} is {state:?}", ids[0]);
    }
    Ok(())
}

#[tokio::test]
async fn certificates_are_short_lived_and_renewed_without_a_pause() -> Result<()> {
    // Certificates of 10 s: renewed every 5 s; a peer refuses an expired one.
    let cluster = Cluster::start_configured(
        2,
        &[],
        2000,
        "agent_certificate_validity_ms = \"10s\"\n",
        "",
    )
    .await?;
    let ids = agent_ids(&cluster).await?;
    let file = random_file(cluster.dir.path(), "blob", 4 * MIB, 37)?;
    let digest = cluster.push(0, &file)?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    };
    let first = cluster.agents[1].metric("shoal_agent_certificate_expiry_timestamp_seconds")?;
    ensure!(
        first > now() && first < now() + 11.0,
        "the first certificate expires at {first}, now is {}",
        now()
    );
    // Past the first certificates' end: both agents hold newer ones, and still serve each
    // other (new connections, with the renewed certificates) with their sessions up.
    tokio::time::sleep(Duration::from_secs(12)).await;
    for agent in &cluster.agents {
        let expiry = agent.metric("shoal_agent_certificate_expiry_timestamp_seconds")?;
        ensure!(
            expiry > now(),
            "a certificate ran out: {expiry} < {}",
            now()
        );
        ensure!(
            read(&agent.proc.log).contains("renewed the agent's certificate"),
            "no renewal in the log"
        );
    }
    let job = cluster
        .client()
        .await?
        .distribute(pb::DistributeRequest {
            blobs: vec![digest],
            targets: to(&[&ids[1]]),
            ..Default::default()
        })
        .await?
        .into_inner()
        .job_id;
    let job = cluster.wait_job(&job, Duration::from_secs(60)).await?;
    ensure!(
        job.state() == pb::JobState::Done,
        "job {:?}; logs:\n{}\n{}",
        job.state(),
        read(&cluster.agents[0].proc.log),
        read(&cluster.agents[1].proc.log)
    );
    Ok(())
}

#[tokio::test]
async fn plaintext_only_when_asked_for_and_then_with_a_warning() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = dir.path().join("log");
    let mut coordinator = shoal()
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--join-token", TOKEN])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("SHOAL_INSECURE", "true")
        .env("SHOAL_LOG", "info")
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let result = async {
        // Anyone may call it, without TLS or a token.
        let channel = grpc::api_channel(
            &format!("http://127.0.0.1:{port}"),
            None,
            Duration::from_secs(2),
        )?;
        let mut c = grpc::api_client(channel, None)?;
        let mut answered = false;
        for _ in 0..100 {
            if c.list_agents(pb::ListAgentsRequest::default())
                .await
                .is_ok()
            {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(
            answered,
            "the insecure coordinator never answered: {}",
            read(&log)
        );
        ensure!(
            read(&log).contains("insecure = true") && read(&log).contains("WARN"),
            "no warning at start: {}",
            read(&log)
        );
        Ok(())
    }
    .await;
    let _ = coordinator.kill();
    let _ = coordinator.wait();
    result
}
