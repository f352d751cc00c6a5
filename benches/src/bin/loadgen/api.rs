//! The job API as a deploy pipeline calls it, timed. Its calls run on a thread of their own
//! (`loadgen-api`, with its own connection): on the runtime of the 20,000 simulated agents
//! a call's answer waited for that runtime's turn, and the generator's own load showed up
//! as the coordinator's API latency.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use shoal_proto::pb::v1 as pb;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::process;

type Client = pb::coordinator_client::CoordinatorClient<Channel>;

/// Latencies of the job API calls the generator makes, seconds, by call and by phase.
#[derive(Debug, Default)]
pub struct ApiTimes {
    pub by_call: BTreeMap<&'static str, Vec<f64>>,
    pub by_phase: BTreeMap<&'static str, Vec<f64>>,
}

impl ApiTimes {
    pub fn add(&mut self, call: &'static str, phase: &'static str, secs: f64) {
        self.by_call.entry(call).or_default().push(secs);
        self.by_phase.entry(phase).or_default().push(secs);
    }
}

/// The job API, timed.
#[derive(Debug)]
pub struct Api {
    client: Client,
    pub times: ApiTimes,
    /// The phase the calls are counted under.
    pub phase: &'static str,
    /// Where the calls run: `None` once dropped.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Api {
    fn drop(&mut self) {
        // Dropped inside the generator's runtime, which must not block on it.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Api {
    /// A client of the coordinator on `addr`, on a thread of its own.
    pub fn new(addr: SocketAddr) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("loadgen-api")
            .enable_all()
            .build()
            .context("starting the API's runtime")?;
        // The channel's connection runs where it is made.
        let channel = {
            let _inside = runtime.enter();
            process::channel(addr)?
        };
        Ok(Self {
            client: Client::new(channel),
            times: ApiTimes::default(),
            phase: "joins",
            runtime: Some(runtime),
        })
    }

    /// Runs `call` on the API's thread and records its time, taken there, as `name`.
    async fn timed<T, F>(
        &mut self,
        name: &'static str,
        call: impl FnOnce(Client) -> F,
    ) -> Result<(Result<T, tonic::Status>, f64)>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        let runtime = self.runtime.as_ref().context("the API's runtime is gone")?;
        let call = call(self.client.clone());
        let (answer, secs) = runtime
            .spawn(async move {
                let started = Instant::now();
                let answer = call.await;
                (answer, started.elapsed().as_secs_f64())
            })
            .await
            .context("the API's call task")?;
        self.times.add(name, self.phase, secs);
        Ok((answer.map(tonic::Response::into_inner), secs))
    }

    /// Agents in READY, over every page.
    pub async fn ready_agents(&mut self) -> Result<usize> {
        let mut token = String::new();
        let mut ready = 0;
        loop {
            let request = pb::ListAgentsRequest {
                state: pb::AgentState::Ready as i32,
                page_size: 1000,
                page_token: token,
                ..Default::default()
            };
            let (page, _) = (self.timed("list_agents", |mut c| async move {
                c.list_agents(request).await
            }))
            .await?;
            let page = page.context("ListAgents")?;
            ready += page.agents.len();
            if page.next_page_token.is_empty() {
                return Ok(ready);
            }
            token = page.next_page_token;
        }
    }

    /// Agents holding `digest` whole, as the catalog says.
    pub async fn holders(&mut self, digest: &str) -> Result<u32> {
        let request = pb::GetBlobRequest {
            digest: digest.into(),
            include_manifest: false,
        };
        let (r, _) =
            (self.timed("get_blob", |mut c| async move { c.get_blob(request).await })).await?;
        match r {
            Ok(r) => Ok(r.blob.map_or(0, |b| b.complete_holders)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(0),
            Err(s) => Err(s).context("GetBlob"),
        }
    }

    pub async fn job(&mut self, job_id: &str) -> Result<pb::Job> {
        let request = pb::GetJobRequest {
            job_id: job_id.into(),
            include_targets: false,
        };
        let (r, _) =
            (self.timed("get_job", |mut c| async move { c.get_job(request).await })).await?;
        r.context("GetJob")?.job.context("GetJob answered no job")
    }

    /// The Distribute call's answer and how long it took.
    pub async fn distribute(
        &mut self,
        request: pb::DistributeRequest,
    ) -> Result<(pb::DistributeResponse, f64)> {
        let (r, secs) = (self.timed(
            "distribute",
            |mut c| async move { c.distribute(request).await },
        ))
        .await?;
        Ok((r.context("Distribute")?, secs))
    }
}
