//! Operators' commands that change the cluster rather than list it: `shoal blobs rm|unpin`,
//! `shoal agents drain|remove` (coordinator API), and `shoal drain` (the local agent, for a
//! pod's preStop).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;

use crate::client::Client;

#[derive(clap::Subcommand, Debug)]
pub enum BlobsAction {
    /// Delete a blob from agents' stores. Without --on, from every agent that holds it,
    /// and from the catalog too (its manifest registration). Refused while an unfinished
    /// job wants it.
    Rm {
        digest: Digest,
        /// Only on these agents: all | key=value[,key=value] | agents:id[,id]. The catalog
        /// keeps the blob.
        #[arg(long, value_parser = crate::client::selector)]
        on: Option<pb::TargetSelector>,
    },
    /// Unpin a blob, so that eviction may take it. Without --on, on every agent that holds
    /// it.
    Unpin {
        digest: Digest,
        /// Only on these agents: all | key=value[,key=value] | agents:id[,id].
        #[arg(long, value_parser = crate::client::selector)]
        on: Option<pb::TargetSelector>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentsAction {
    /// Take an agent out of planning before stopping it: it is no longer a source, gets no
    /// orders, and its unfinished targets wait for it to join again. Lasts until its next
    /// join.
    Drain { agent_id: String },
    /// Forget an agent that left (no session): it leaves the listings and its unfinished
    /// targets fail. Refused while it is connected.
    Remove { agent_id: String },
}

pub async fn blobs(c: &mut Client, action: BlobsAction) -> Result<()> {
    let (digest, on, unpin_only) = match action {
        BlobsAction::Rm { digest, on } => (digest, on, false),
        BlobsAction::Unpin { digest, on } => (digest, on, true),
    };
    let r = c
        .remove_blob(pb::RemoveBlobRequest {
            digest: digest.to_string(),
            on,
            unpin_only,
        })
        .await
        .map_err(crate::client::explain)?
        .into_inner();
    let verb = if unpin_only { "unpinned" } else { "removed" };
    println!("{digest} {verb} on {} agent(s)", r.agent_ids.len());
    if r.forgotten {
        println!("{digest} left the catalog");
    }
    if !r.unreachable_agent_ids.is_empty() {
        eprintln!(
            "not reached (no session; they still hold it): {}",
            r.unreachable_agent_ids.join(", ")
        );
    }
    Ok(())
}

pub async fn agents(c: &mut Client, action: AgentsAction) -> Result<()> {
    match action {
        AgentsAction::Drain { agent_id } => {
            let r = c
                .drain_agent(pb::DrainAgentRequest {
                    agent_id: agent_id.clone(),
                })
                .await
                .map_err(crate::client::explain)?
                .into_inner();
            println!(
                "{agent_id} is {}; {} unfinished target(s) wait for it to join again",
                crate::output::agent_state_name(r.state()),
                r.waiting_targets
            );
        }
        AgentsAction::Remove { agent_id } => {
            let r = c
                .remove_agent(pb::RemoveAgentRequest {
                    agent_id: agent_id.clone(),
                })
                .await
                .map_err(crate::client::explain)?
                .into_inner();
            println!(
                "{agent_id} removed; {} unfinished target(s) failed",
                r.failed_targets
            );
        }
    }
    Ok(())
}

/// `shoal drain`: asks the local agent to drain and waits, at most `timeout`, for the chunks
/// it serves to finish.
pub async fn drain_local(socket: &Path, timeout: Duration) -> Result<()> {
    let mut c = crate::local::connect(socket).await?;
    let r = c
        .drain(pb::DrainRequest {
            timeout_ms: timeout.as_millis() as u64,
        })
        .await
        .map_err(crate::client::explain)?
        .into_inner();
    if !r.coordinator_told {
        eprintln!("the agent has no coordinator session: it is taken out when its lease ends");
    }
    if r.uploads_in_flight > 0 {
        eprintln!(
            "{} chunk request(s) still served after {timeout:?}: peers retry them elsewhere",
            r.uploads_in_flight
        );
    } else {
        eprintln!("drained: no chunk is being served");
    }
    Ok(())
}
