//! Limits on what one agent may send (docs/SECURITY.md "Limits"): a session message past
//! `max_session_message_bytes` ends that session, unread, and nothing else.

use std::time::Duration;

use anyhow::{Result, bail, ensure};
use shoal_proto::pb::v1::{self as pb, agent_message::Msg};
use tonic::Code;

use crate::harness::{Cluster, TOKEN};
use shoal_tests::impostor::{Impostor, say};

#[tokio::test]
async fn a_session_message_past_the_limit_ends_that_session_only() -> Result<()> {
    let cluster =
        Cluster::start_configured(1, &[], 2000, "max_session_message_bytes = \"1MiB\"\n", "")
            .await?;
    let agent = Impostor::join(&cluster.url(), &cluster.ca_file(), TOKEN, "127.0.0.1:9").await?;
    let (tx, mut inbound) = agent.open(vec![]).await?;
    // Under the limit: taken (the session stays up).
    let held = |n: usize| {
        Msg::Inventory(pb::Inventory {
            replace: true,
            blobs: (0..n)
                .map(|i| pb::HeldBlob {
                    blob_digest: shoal_proto::Digest::of(&i.to_be_bytes())
                        .as_bytes()
                        .to_vec(),
                    complete: true,
                    ..Default::default()
                })
                .collect(),
            removed_blobs: vec![],
        })
    };
    tx.send(say(held(10_000))).await?; // ~380 KiB
    // Past it: the session ends with OUT_OF_RANGE.
    tx.send(say(held(40_000))).await?; // ~1.5 MiB
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => bail!("the session ended without an error"),
                Err(status) => return Ok(status),
            }
        }
    })
    .await??;
    ensure!(ended.code() == Code::OutOfRange, "{ended:?}");
    // The coordinator and the real agent go on.
    cluster.wait_for_agents(1).await?;
    let listed = (cluster.client().await?)
        .list_agents(pb::ListAgentsRequest::default())
        .await?
        .into_inner();
    ensure!(listed.agents.len() == 2, "{listed:?}");
    Ok(())
}
