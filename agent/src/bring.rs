//! Bringing a blob to this agent through the coordinator, for the OCI mirror and for
//! `shoal pull`: a Distribute to this agent alone, then a WatchJob on the job until this
//! agent's target ends. The bytes arrive in the store by the ordinary orders; this only
//! tells the caller when the coordinator gave up on them.

use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::backoff::Backoff;
use crate::link::Coordinator;

/// What to bring.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub blob: Digest,
    /// Where the blob can be fetched if no agent holds it.
    pub origin: Option<pb::Origin>,
    pub priority: pb::Priority,
    pub deadline_ms: u64,
    /// Shown in the coordinator's job list.
    pub description: String,
}

/// A distribution to this agent, watched until it ends.
#[derive(Debug)]
pub(crate) struct Bringing {
    pub job_id: String,
    /// How this agent's target ended (`Err`: why it failed), once it has.
    ended: watch::Receiver<Option<Result<(), GaveUp>>>,
    watcher: tokio::task::AbortHandle,
}

impl Drop for Bringing {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

impl Bringing {
    /// Why the coordinator gave up on bringing the blob here, once it has (this agent's
    /// target failed or was cancelled, the job failed, or the job is gone); pending while
    /// it has not.
    pub(crate) async fn failed(&mut self) -> GaveUp {
        match self.end().await {
            Some(Err(gave_up)) => gave_up,
            // Done, or the watcher ended without a verdict: never.
            Some(Ok(())) | None => std::future::pending().await,
        }
    }

    /// Why, without waiting.
    pub(crate) fn has_failed(&self) -> Option<String> {
        (self.ended.borrow().clone()).and_then(|end| end.err().map(|g| g.why))
    }

    /// How this agent's target ended: `Ok` once it is done (the coordinator counts the blob
    /// whole here), `Err` with why it failed; `None` if the watcher stopped without knowing.
    pub(crate) async fn ended(&mut self) -> Option<Result<(), String>> {
        Some(self.end().await?.map_err(|g| g.why))
    }

    async fn end(&mut self) -> Option<Result<(), GaveUp>> {
        match self.ended.wait_for(Option::is_some).await {
            Ok(end) => end.clone(),
            Err(_) => None,
        }
    }
}

/// Why the coordinator gave up on bringing a blob here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GaveUp {
    /// Read after the blob's name: "failed: …", "was cancelled: …".
    pub why: String,
    /// This agent's target, or its job, was cancelled (not failed).
    pub cancelled: bool,
}

impl GaveUp {
    fn failed(why: String) -> Self {
        Self {
            why: format!("failed: {why}"),
            cancelled: false,
        }
    }

    fn cancelled(why: &str) -> Self {
        Self {
            why: format!("was cancelled: {why}"),
            cancelled: true,
        }
    }
}

/// Asks the coordinator to distribute `request.blob` to this agent and starts watching the
/// job. Errors are the coordinator's answer to the Distribute.
pub(crate) async fn bring_here(
    coordinator: &Coordinator,
    request: Request,
) -> Result<Bringing, Status> {
    let blob = request.blob.to_string();
    let me = coordinator.agent_id();
    let job = coordinator
        .client()
        .distribute(pb::DistributeRequest {
            blobs: vec![blob.clone()],
            targets: Some(pb::TargetSelector {
                selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
                    agent_ids: vec![me.clone()],
                })),
            }),
            priority: request.priority as i32,
            deadline_ms: request.deadline_ms,
            origins: request.origin.map(|o| (blob, o)).into_iter().collect(),
            description: request.description,
        })
        .await
        .map_err(|s| Status::new(s.code(), format!("coordinator: {}", s.message())))?
        .into_inner();
    let (tx, ended) = watch::channel(None);
    let watcher = tokio::spawn(watch(coordinator.clone(), job.job_id.clone(), me, tx));
    Ok(Bringing {
        job_id: job.job_id,
        ended,
        watcher: watcher.abort_handle(),
    })
}

/// Follows the job, re-watching when the stream breaks (the coordinator restarted, the
/// connection dropped), until this agent's target ends. Sends how it ended.
async fn watch(
    coordinator: Coordinator,
    job_id: String,
    me: String,
    tx: watch::Sender<Option<Result<(), GaveUp>>>,
) {
    let mut backoff = Backoff::with_max(Duration::from_secs(2));
    loop {
        let watched = coordinator
            .client()
            .watch_job(pb::WatchJobRequest {
                job_id: job_id.clone(),
                include_targets: true,
            })
            .await;
        let mut stream = match watched {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                let _ = tx.send(Some(Err(GaveUp::failed(format!(
                    "its job ({job_id}) is gone from the coordinator"
                )))));
                return;
            }
            Err(s) => {
                tracing::debug!(job = job_id, error = %s, "watching the job failed; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        // Until it ends or breaks; then watch again (a finished job answers with its end).
        while let Ok(Some(progress)) = stream.message().await {
            backoff.reset();
            match verdict(&progress, &me) {
                Verdict::Running => {}
                Verdict::Done => {
                    let _ = tx.send(Some(Ok(())));
                    return;
                }
                Verdict::Failed(why) => {
                    let _ = tx.send(Some(Err(why)));
                    return;
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Running,
    Done,
    Failed(GaveUp),
}

/// What one progress message says about this agent's target.
fn verdict(progress: &pb::JobProgress, me: &str) -> Verdict {
    let mine = (progress.targets.iter()).filter(|t| t.agent_id == me);
    for t in mine {
        match t.state() {
            pb::TargetState::Failed => return Verdict::Failed(GaveUp::failed(t.message.clone())),
            pb::TargetState::Cancelled => return Verdict::Failed(GaveUp::cancelled(&t.message)),
            pb::TargetState::Done => return Verdict::Done,
            _ => {}
        }
    }
    match progress.state() {
        pb::JobState::Failed => Verdict::Failed(GaveUp::failed("its job failed".into())),
        pb::JobState::Cancelled => Verdict::Failed(GaveUp::cancelled("its job was cancelled")),
        pb::JobState::Done => Verdict::Done,
        _ => Verdict::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(agent: &str, state: pb::TargetState, message: &str) -> pb::TargetProgress {
        pb::TargetProgress {
            agent_id: agent.into(),
            state: state as i32,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn only_this_agents_target_or_the_jobs_end_decides() {
        let mut p = pb::JobProgress {
            state: pb::JobState::Running as i32,
            targets: vec![target("other", pb::TargetState::Failed, "x")],
            ..Default::default()
        };
        assert_eq!(verdict(&p, "me"), Verdict::Running);
        p.targets
            .push(target("me", pb::TargetState::Failed, "origin 404"));
        assert_eq!(
            verdict(&p, "me"),
            Verdict::Failed(GaveUp {
                why: "failed: origin 404".into(),
                cancelled: false
            })
        );
        p.targets = vec![target("me", pb::TargetState::Done, "")];
        assert_eq!(verdict(&p, "me"), Verdict::Done);
        p.targets.clear();
        p.state = pb::JobState::Cancelled as i32;
        assert!(matches!(
            verdict(&p, "me"),
            Verdict::Failed(GaveUp {
                cancelled: true,
                ..
            })
        ));
    }
}
