//! How listings print: a table for people (the default), or JSON for scripts (`-o json`),
//! one document per command with every page fetched.

use anyhow::Result;
use shoal_proto::pb::v1 as pb;

use crate::client::{Client, explain, state_name, target_name};

/// `-o`: the output format of a listing.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
}

/// Every agent, every page.
async fn all_agents(client: &mut Client) -> Result<Vec<pb::AgentInfo>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_agents(pb::ListAgentsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .map_err(explain)?
            .into_inner();
        out.extend(page.agents);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// Every blob in the catalog, every page.
async fn all_blobs(client: &mut Client) -> Result<Vec<pb::BlobInfo>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_blobs(pb::ListBlobsRequest {
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner();
        out.extend(page.blobs);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// Every job (in `state`, if given), most recent first, every page.
async fn all_jobs(client: &mut Client, state: pb::JobState) -> Result<Vec<pb::Job>> {
    let mut out = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                state: state as i32,
                page_size: 1000,
                page_token: page_token.clone(),
            })
            .await
            .map_err(explain)?
            .into_inner();
        out.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(out);
        }
        page_token = page.next_page_token;
    }
}

/// `shoal jobs`: every job the coordinator keeps, most recent first.
pub async fn jobs(client: &mut Client, state: pb::JobState, output: Output) -> Result<()> {
    let jobs = all_jobs(client, state).await?;
    if output == Output::Json {
        let rows: Vec<_> = jobs.iter().map(job_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<17} {:<10} {:>6} {:>8} {:>7}  description",
        "JOB", "STATE", "BLOBS", "TARGETS", "DONE %"
    );
    for job in &jobs {
        let p = job.progress.clone().unwrap_or_default();
        let c = p.counts.unwrap_or_default();
        let done = if p.bytes_total > 0 {
            100.0 * p.bytes_done as f64 / p.bytes_total as f64
        } else {
            0.0
        };
        println!(
            "{:<17} {:<10} {:>6} {:>8} {:>7.1}  {}",
            job.job_id,
            state_name(job.state()),
            job.blobs.len(),
            c.total,
            done,
            job.description
        );
    }
    Ok(())
}

fn sorted_labels(a: &pb::AgentInfo) -> Vec<String> {
    let mut labels: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    labels
}

fn agent_state(a: &pb::AgentInfo) -> String {
    format!("{:?}", a.state()).to_lowercase()
}

pub async fn agents(client: &mut Client, output: Output) -> Result<()> {
    let agents = all_agents(client).await?;
    if output == Output::Json {
        let rows: Vec<_> = (agents.iter())
            .map(|a| {
                serde_json::json!({
                    "agent_id": a.agent_id,
                    "state": agent_state(a),
                    "quic_addresses": a.quic_addresses,
                    "blobs_held": a.blobs_held,
                    "blobs_partial": a.blobs_partial,
                    "labels": a.labels,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<12} {:<22} {:>6} {:>8}  labels",
        "AGENT", "STATE", "QUIC", "BLOBS", "PARTIAL"
    );
    for a in &agents {
        println!(
            "{:<20} {:<12} {:<22} {:>6} {:>8}  {}",
            a.agent_id,
            agent_state(a),
            a.quic_addresses.first().cloned().unwrap_or_default(),
            a.blobs_held,
            a.blobs_partial,
            sorted_labels(a).join(",")
        );
    }
    Ok(())
}

pub async fn blobs(client: &mut Client, output: Output) -> Result<()> {
    let blobs = all_blobs(client).await?;
    if output == Output::Json {
        let rows: Vec<_> = (blobs.iter())
            .map(|b| {
                serde_json::json!({
                    "digest": b.digest,
                    "size": b.size,
                    "complete_holders": b.complete_holders,
                    "partial_holders": b.partial_holders,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<71} {:>12} {:>8} {:>8}",
        "DIGEST", "SIZE", "HOLDERS", "PARTIAL"
    );
    for b in &blobs {
        println!(
            "{:<71} {:>12} {:>8} {:>8}",
            b.digest, b.size, b.complete_holders, b.partial_holders
        );
    }
    Ok(())
}

/// A job as `shoal status -o json` prints it.
pub fn job_json(job: &pb::Job) -> serde_json::Value {
    let p = job.progress.clone().unwrap_or_default();
    let c = p.counts.unwrap_or_default();
    let targets: Vec<_> = (p.targets.iter())
        .map(|t| {
            serde_json::json!({
                "agent_id": t.agent_id,
                "blob": t.blob,
                "state": target_name(t.state()),
                "message": t.message,
                "bytes_done": t.bytes_done,
                "bytes_total": t.bytes_total,
            })
        })
        .collect();
    serde_json::json!({
        "job_id": job.job_id,
        "state": state_name(job.state()),
        "blobs": job.blobs,
        "description": job.description,
        "counts": {
            "total": c.total,
            "done": c.done,
            "running": c.running,
            "pending": c.pending,
            "failed": c.failed,
            "cancelled": c.cancelled,
        },
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "targets": targets,
    })
}
