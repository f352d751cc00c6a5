//! A coordinator and agents in the bench's own process, on loopback, as `shoal demo` starts
//! them: TLS from the coordinator's CA, a join token, each agent with its store in a
//! temporary directory. The benches that drive the agents' own code paths start one.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_agent::{Agent, AgentConfig};
use shoal_coordinator::CoordinatorConfig;

/// A running coordinator and its agents; [`LocalCluster::shutdown`] stops them.
#[derive(Debug)]
pub struct LocalCluster {
    pub agents: Vec<Agent>,
    stop: tokio::sync::oneshot::Sender<()>,
    coordinator: tokio::task::JoinHandle<Result<(), shoal_coordinator::CoordinatorError>>,
    _dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts a coordinator (`coordinator` sets what the bench needs beyond the defaults)
    /// and `n` agents (`agent` likewise, given each agent's defaults), and waits until every
    /// agent is connected.
    pub async fn start(
        n: usize,
        coordinator: impl FnOnce(&mut CoordinatorConfig),
        mut agent: impl FnMut(&mut AgentConfig),
    ) -> Result<LocalCluster> {
        let dir = tempfile::Builder::new().prefix("shoal-bench-").tempdir()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let join_token = format!("{:032x}", rand::random::<u128>());
        let mut config = CoordinatorConfig {
            listen: addr,
            state_dir: dir.path().join("coordinator"),
            join_token: join_token.clone(),
            ..Default::default()
        };
        coordinator(&mut config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let coordinator = tokio::spawn(shoal_coordinator::run(config, listener, async {
            let _ = stopped.await;
        }));
        let mut agents = Vec::new();
        for i in 0..n {
            let mut config = AgentConfig {
                coordinator: format!("https://{addr}"),
                join_token: join_token.clone(),
                data_dir: dir.path().join(format!("agent-{i}")),
                quic_listen: "127.0.0.1:0".parse()?,
                ..Default::default()
            };
            agent(&mut config);
            let started = Agent::start(config).await;
            agents.push(started.with_context(|| format!("starting agent {i}"))?);
        }
        let started = Instant::now();
        while !agents.iter().all(Agent::is_connected) {
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the agents did not connect to the coordinator within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(LocalCluster {
            agents,
            stop,
            coordinator,
            _dir: dir,
        })
    }

    /// Stops the agents, then the coordinator.
    pub async fn shutdown(self) -> Result<()> {
        for agent in self.agents {
            agent.shutdown().await;
        }
        let _ = self.stop.send(());
        self.coordinator.await??;
        Ok(())
    }
}
