//! Operators' commands on a real cluster: `shoal blobs rm|unpin`, `shoal agents
//! drain|remove`, `shoal drain` (the local agent, as a pod's preStop runs it) and
//! `shoal cancel`.

use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shoal_proto::pb::v1::{self as pb, JobState};

use crate::harness::{Cluster, random_file, read, scrape, shoal};

const MIB: usize = 1 << 20;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Agent ids by index (each agent has the label host=h{i}).
pub(crate) async fn agent_ids(cluster: &Cluster) -> Result<Vec<String>> {
    let agents = (cluster.client().await?)
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents;
    (0..cluster.agents.len())
        .map(|i| {
            let host = format!("h{i}");
            (agents.iter())
                .find(|a| a.labels.get("host") == Some(&host))
                .map(|a| a.agent_id.clone())
                .with_context(|| format!("no agent with host={host}"))
        })
        .collect()
}

async fn agent_state(cluster: &Cluster, id: &str) -> Result<Option<pb::AgentState>> {
    let agents = (cluster.client().await?)
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner()
        .agents;
    Ok(agents.iter().find(|a| a.agent_id == id).map(|a| a.state()))
}

/// The blob's holders as the coordinator knows them: (agent id, complete, pinned); `None`
/// if the catalog does not know the blob.
async fn holders(cluster: &Cluster, digest: &str) -> Result<Option<Vec<(String, bool, bool)>>> {
    let r = (cluster.client().await?)
        .get_blob(pb::GetBlobRequest {
            digest: digest.into(),
            include_manifest: false,
        })
        .await;
    match r {
        Ok(r) => Ok(Some(
            (r.into_inner().holders.into_iter())
                .map(|h| (h.agent_id, h.complete, h.pinned))
                .collect(),
        )),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s.into()),
    }
}

/// Polls `check` until it holds, for at most 20 s.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what}: not after 20 s")
}

/// The digests in agent `i`'s store, from its local API.
async fn stored(cluster: &Cluster, i: usize) -> Result<Vec<(String, bool)>> {
    let mut c = shoal_agent::local_api::connect(cluster.agents[i].socket()).await?;
    let r = c
        .status(pb::StatusRequest {
            include_blobs: true,
        })
        .await?
        .into_inner();
    Ok(r.blobs.into_iter().map(|b| (b.digest, b.pinned)).collect())
}

fn distribute(cluster: &Cluster, digest: &str, to: &str) -> Result<String> {
    let out = cluster.cli(&["distribute", digest, "--to", to, "--detach"]);
    anyhow::ensure!(out.status.success(), "distribute: {}", text(&out));
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_unpin_and_rm_reach_the_holders_and_rm_everywhere_forgets_the_blob() -> Result<()> {
    let mut cluster = Cluster::start(3, &[], 5000).await?;
    let ids = agent_ids(&cluster).await?;
    let file = random_file(cluster.dir.path(), "blob", 3 * MIB, 11)?;
    let out = shoal()
        .arg("push")
        .arg(&file)
        .arg("--pin")
        .arg("--socket")
        .arg(cluster.agents[0].socket())
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let digest = String::from_utf8(out.stdout)?.trim().to_string();
    let job = distribute(&cluster, &digest, "all")?;
    assert_eq!(
        cluster
            .wait_job(&job, Duration::from_secs(60))
            .await?
            .state(),
        JobState::Done
    );
    let pulled = cluster.dir.path().join("pulled");
    let out = shoal()
        .args(["pull", &digest, "--pin", "-o"])
        .arg(&pulled)
        .arg("--socket")
        .arg(cluster.agents[1].socket())
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let pinned_on =
        |h: &Vec<(String, bool, bool)>, id: &str| h.iter().any(|(a, _, pinned)| a == id && *pinned);
    eventually("pins reach the coordinator", || async {
        let h = holders(&cluster, &digest).await?.unwrap_or_default();
        Ok(pinned_on(&h, &ids[0]) && pinned_on(&h, &ids[1]))
    })
    .await?;

    // Unpin on one agent: only its pin goes, in its store and at the coordinator.
    let out = cluster.cli(&[
        "blobs",
        "unpin",
        &digest,
        "--on",
        &format!("agents:{}", ids[1]),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("unpinned on 1 agent(s)"),
        "{}",
        text(&out)
    );
    eventually("the unpin reaches the coordinator", || async {
        let h = holders(&cluster, &digest).await?.unwrap_or_default();
        Ok(!pinned_on(&h, &ids[1]) && pinned_on(&h, &ids[0]))
    })
    .await?;
    assert_eq!(stored(&cluster, 1).await?, vec![(digest.clone(), false)]);
    assert_eq!(stored(&cluster, 0).await?, vec![(digest.clone(), true)]);

    // Remove from one agent: gone from its store and its holders, the catalog keeps it.
    let out = cluster.cli(&[
        "blobs",
        "rm",
        &digest,
        "--on",
        &format!("agents:{}", ids[2]),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("left the catalog"), "{}", text(&out));
    eventually("the removal reaches the coordinator", || async {
        let h = holders(&cluster, &digest).await?.unwrap_or_default();
        Ok(h.len() == 2 && !h.iter().any(|(a, _, _)| *a == ids[2]))
    })
    .await?;
    assert!(stored(&cluster, 2).await?.is_empty());

    // A blob that an unfinished job wants is not removed: agent 2, stopped, keeps the job
    // open; the refusal names the job, and `shoal cancel` ends it.
    cluster.agents[2].proc.signal("STOP")?;
    let wanting = distribute(&cluster, &digest, &format!("agents:{}", ids[2]))?;
    let out = cluster.cli(&["blobs", "rm", &digest]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("refused") && text(&out).contains(&wanting),
        "{}",
        text(&out)
    );
    let out = cluster.cli(&["cancel", &wanting]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("cancelled"), "{}", text(&out));
    cluster.agents[2].proc.signal("CONT")?;

    // Everywhere: every holder deletes it, pinned or not, and the catalog forgets it, for
    // good (a restarted coordinator does not bring it back from its database).
    let out = cluster.cli(&["blobs", "rm", &digest]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("left the catalog"), "{}", text(&out));
    let left = holders(&cluster, &digest).await?;
    assert!(left.is_none(), "{left:?}");
    for i in 0..2 {
        eventually("every holder deletes it", || async {
            Ok(stored(&cluster, i).await?.is_empty())
        })
        .await?;
    }
    let before = text(&cluster.cli(&["jobs"]));
    cluster.restart_coordinator()?;
    cluster.wait_for_agents(3).await?;
    let left = holders(&cluster, &digest).await?;
    let jobs = text(&cluster.cli(&["jobs"]));
    assert!(left.is_none(), "after a restart: {left:?}; jobs:\n{jobs}");
    let out = cluster.cli(&["blobs", "rm", &digest]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let logs: Vec<String> = ["coordinator-0.log", "coordinator-1.log"]
        .iter()
        .map(|f| crate::harness::read(&cluster.dir.path().join(f)))
        .collect();
    assert!(
        text(&out).contains("not found"),
        "{} before:\n{before}\nafter:\n{jobs} {wanting}\n{}",
        text(&out),
        logs.join("\n=====\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_agent_leaves_planning_until_it_joins_again_and_a_stopped_one_is_removed()
-> Result<()> {
    let mut cluster = Cluster::start(3, &[], 2000).await?;
    let ids = agent_ids(&cluster).await?;
    let file = random_file(cluster.dir.path(), "blob", 8 * MIB, 12)?;
    let digest = cluster.push(0, &file)?;
    let job = distribute(&cluster, &digest, &format!("agents:{}", ids[2]))?;
    let job = cluster.wait_job(&job, Duration::from_secs(60)).await?;
    assert_eq!(job.state(), JobState::Done);

    // Drained, agent 2 still holds the blob but is no source: agent 1 gets it all from 0.
    let out = cluster.cli(&["agents", "drain", &ids[2]]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("is draining"), "{}", text(&out));
    assert_eq!(
        agent_state(&cluster, &ids[2]).await?,
        Some(pb::AgentState::Draining)
    );
    let served_before = cluster.agents[2].metric("shoal_agent_served_bytes_total")?;
    let job = distribute(&cluster, &digest, &format!("agents:{}", ids[1]))?;
    let job = cluster.wait_job(&job, Duration::from_secs(60)).await?;
    assert_eq!(job.state(), JobState::Done);
    assert_eq!(
        cluster.agents[2].metric("shoal_agent_served_bytes_total")?,
        served_before,
        "a drained agent served chunks"
    );
    // `--to all` leaves it out.
    let out = cluster.cli(&["distribute", &digest, "--to", "all", "--detach"]);
    assert!(out.status.success(), "{}", text(&out));
    let all = cluster.job(String::from_utf8(out.stdout)?.trim()).await?;
    let targets = all.progress.map(|p| p.targets).unwrap_or_default();
    assert!(
        targets.iter().all(|t| t.agent_id != ids[2]) && targets.len() == 2,
        "{targets:?}"
    );

    // Restarted, it joins again and is ready.
    cluster.restart_agent(2, &[])?;
    eventually("the restarted agent is ready", || async {
        Ok(agent_state(&cluster, &ids[2]).await? == Some(pb::AgentState::Ready))
    })
    .await?;

    // The local drain a pod's preStop runs: the coordinator takes the agent out, and the
    // command returns once nothing is being served.
    let out = shoal()
        .args(["drain", "--timeout", "5s", "--socket"])
        .arg(cluster.agents[1].socket())
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("drained"), "{}", text(&out));
    eventually("the local drain reaches the coordinator", || async {
        Ok(agent_state(&cluster, &ids[1]).await? == Some(pb::AgentState::Draining))
    })
    .await?;

    // Not removed while connected; once stopped and its lease over, removed, and its end
    // was no loss (it was drained).
    let out = cluster.cli(&["agents", "remove", &ids[1]]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is connected"), "{}", text(&out));
    cluster.agents[1].proc.kill();
    eventually("the stopped agent's lease ends", || async {
        Ok(agent_state(&cluster, &ids[1]).await? == Some(pb::AgentState::Gone))
    })
    .await?;
    assert_eq!(
        scrape(cluster.metrics, "shoal_coordinator_leases_expired_total")?,
        0.0
    );
    let out = cluster.cli(&["agents", "remove", &ids[1]]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent_state(&cluster, &ids[1]).await?, None);
    // Removal revokes: every agent is told to refuse the old certificate, and the id never
    // comes back. Started again on its data directory (its id and secret files), agent 1
    // joins under a new id, with a certificate for it that its peers accept.
    for i in [0, 2] {
        eventually("the other agents hear of the revocation", || async {
            Ok(read(&cluster.agents[i].proc.log).contains(&ids[1])
                && read(&cluster.agents[i].proc.log).contains("revoked agents"))
        })
        .await?;
    }
    cluster.restart_agent(1, &[])?;
    eventually("agent 1 joins again", || async {
        Ok(agent_ids(&cluster).await.is_ok())
    })
    .await?;
    let new_id = agent_ids(&cluster).await?[1].clone();
    assert_ne!(new_id, ids[1], "a removed id came back");
    let job = distribute(&cluster, &digest, &format!("agents:{new_id}"))?;
    let job = cluster.wait_job(&job, Duration::from_secs(60)).await?;
    assert_eq!(job.state(), JobState::Done);
    let out = cluster.cli(&["agents", "drain", "no-such-agent"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not found"), "{}", text(&out));
    Ok(())
}
