//! A real coordinator (`shoal_coordinator::run`) on a loopback port, for in-process
//! end-to-end tests, and waiting for a condition.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Coordinator {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), shoal_coordinator::CoordinatorError>>,
}

impl Coordinator {
    /// Starts one with its state under `dir`, agents admitted with `token`.
    pub async fn start(dir: &Path, token: &str, lease_ms: u64) -> Result<Coordinator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(shoal_coordinator::run(
            shoal_coordinator::CoordinatorConfig {
                listen: addr,
                state_dir: dir.join("coordinator"),
                join_token: token.into(),
                lease_ms,
                heartbeat_ms: 500,
                // In-process tests of behaviour, not of trust: plaintext, no credentials (the
                // real-process tests in cli/tests run secure coordinators).
                insecure: true,
                ..Default::default()
            },
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        Ok(Coordinator {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

/// Polls `cond` every 20 ms until it holds, or fails after `limit`.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    while !cond() {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
