//! What the agent does when its store drops something on its own (`Store::damage`): a chunk
//! found corrupt (by the scrub, or for a peer that rejected it), or a whole blob after a failed
//! fdatasync. It counts them, tells the coordinator at once, and brings back what is wanted
//! here.
//!
//! - Reported: a blob that was complete and lost a chunk is announced incomplete
//!   (`Coordinator::announce_incomplete`), so the coordinator stops offering this agent as a
//!   complete source; a blob dropped whole went out as a removal already
//!   (`Coordinator::report_removals`). A partial blob that lost a chunk needs no report: the
//!   coordinator's count of its chunks is a hint, and peers ask its have-stream.
//! - Fetched again: a pinned blob (someone asked to keep it on this node) is distributed to
//!   this agent again (`bring.rs`), from peers, and pinned again once whole (a lost write
//!   dropped the pin with the blob). Not while an order fetches it anyway: that order fails
//!   its final check, and the coordinator retries it. An unpinned blob stays as it is: partial
//!   (still a source of what it has, evictable) and completed by the next order for it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::{Id, JoinSet};
use tonic::Code;

use crate::backoff::Backoff;
use crate::bring;
use crate::link::Coordinator;
use crate::orders::RunningOrders;
use crate::shutdown::{Stop, stopped};
use crate::store::{Damage, DamageCause, Store};

/// How often a repair looks whether the blob is whole again.
const POLL: Duration = Duration::from_millis(250);
/// Longest pause between two attempts to have the blob distributed here again (the
/// coordinator refuses while no agent holds it whole: this is how soon a copy that appears
/// is used).
const RETRY_MAX: Duration = Duration::from_secs(10);

/// What repairs need. The task owns the set of blobs being brought back.
#[derive(Clone, Debug)]
pub(crate) struct Repair {
    pub store: Store,
    pub coordinator: Coordinator,
    pub orders: RunningOrders,
    pub stop: Stop,
}

impl Repair {
    /// Handles the store's damage reports until the agent stops.
    pub(crate) async fn run(self) {
        let mut damage = self.store.damage();
        let mut stop = self.stop.clone();
        let mut tasks = JoinSet::new();
        let mut repairing: HashSet<Digest> = HashSet::new();
        let mut by_task: HashMap<Id, Digest> = HashMap::new();
        loop {
            tokio::select! {
                report = damage.recv() => match report {
                    Ok(d) => {
                        self.report(&d);
                        if d.pinned && repairing.insert(d.blob) {
                            let task = tasks.spawn(self.clone().bring_back(d.blob, d.cause));
                            by_task.insert(task.id(), d.blob);
                        }
                    }
                    Err(RecvError::Lagged(n)) => tracing::warn!(missed = n, "damage reports fell behind: some are not reported nor repaired"),
                    Err(RecvError::Closed) => return,
                },
                Some(ended) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let id = match ended {
                        Ok((id, ())) => id,
                        Err(e) => e.id(),
                    };
                    if let Some(blob) = by_task.remove(&id) {
                        repairing.remove(&blob);
                    }
                }
                () = stopped(&mut stop) => return,
            }
        }
    }

    /// Counts the damage and tells the coordinator what this agent no longer holds.
    fn report(&self, d: &Damage) {
        match d.cause {
            DamageCause::Corrupt => {
                metrics::counter!(crate::metrics::CORRUPT_CHUNKS).increment(d.chunks.len() as u64);
            }
            DamageCause::LostWrite => metrics::counter!(crate::metrics::LOST_WRITES).increment(1),
        }
        if d.cause != DamageCause::Corrupt || !d.was_complete {
            return;
        }
        if let Some((chunk_count, bits)) = self.store.bitfield(&d.blob) {
            let pinned = self.store.is_pinned(&d.blob).unwrap_or(false);
            tracing::info!(blob = %d.blob, chunks = ?d.chunks, "telling the coordinator this agent no longer holds the whole blob");
            (self.coordinator).announce_incomplete(&d.blob, chunk_count, &bits, pinned);
        }
    }

    /// Has the coordinator distribute `blob` to this agent again until it is whole, then pins
    /// it again. Gives up if the coordinator does not know the blob, or if a blob that lost a
    /// chunk is unpinned or removed meanwhile (it is no longer wanted here).
    async fn bring_back(self, blob: Digest, cause: DamageCause) {
        let what = match cause {
            DamageCause::Corrupt => "chunks found corrupt",
            DamageCause::LostWrite => "a write lost by a failed fdatasync",
        };
        let mut backoff = Backoff::with_max(RETRY_MAX);
        // The coordinator hears that this agent lost the blob on the session, and the
        // Distribute below on its API: let the first arrive first, or the target is done at
        // once (then it is asked again anyway).
        tokio::time::sleep(Duration::from_secs(1)).await;
        'whole: while !self.store.is_complete(&blob) {
            if cause == DamageCause::Corrupt && self.store.is_pinned(&blob) != Some(true) {
                tracing::info!(%blob, "a damaged blob was unpinned or removed: not fetched again");
                return;
            }
            if self.orders.transfer_of(&blob).is_some() {
                // An order fetches it already; whatever becomes of it, look again after.
                tokio::time::sleep(POLL).await;
                continue;
            }
            let request = bring::Request {
                blob,
                origin: None,
                priority: pb::Priority::Normal,
                deadline_ms: 0,
                description: format!(
                    "repair of a pinned blob on agent {}: {what}",
                    self.coordinator.agent_id()
                ),
            };
            match bring::bring_here(&self.coordinator, request).await {
                Ok(mut bringing) => {
                    tracing::info!(%blob, job = bringing.job_id, "fetching a pinned blob again after {what}");
                    loop {
                        tokio::select! {
                            ended = bringing.ended() => {
                                match ended {
                                    _ if self.store.is_complete(&blob) => break 'whole,
                                    Some(Err(why)) => tracing::warn!(%blob, why, "fetching a pinned blob again failed; trying again"),
                                    // Counted whole here before the coordinator heard
                                    // otherwise: ask again.
                                    Some(Ok(())) | None => tracing::debug!(%blob, "the repair's job ended before the blob was whole; asking again"),
                                }
                                break;
                            }
                            () = tokio::time::sleep(POLL) => {
                                if self.store.is_complete(&blob) {
                                    break 'whole;
                                }
                            }
                        }
                    }
                }
                Err(s) if s.code() == Code::NotFound => {
                    tracing::warn!(%blob, error = %s, "the coordinator does not know a damaged pinned blob: it cannot be fetched again");
                    return;
                }
                Err(s) => {
                    tracing::warn!(%blob, error = %s, "asking to fetch a damaged pinned blob again failed; trying again");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        if self.store.is_pinned(&blob) == Some(false) && self.store.pin(&blob).is_ok() {
            self.coordinator.announce_pin(&blob, true);
        }
        tracing::info!(%blob, "pinned blob whole again");
    }
}
