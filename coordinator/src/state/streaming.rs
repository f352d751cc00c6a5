//! The glue of streaming seeds (see `streams.rs`): a whole-blob seeder's digest reports
//! become orders from peers for the blob's waiting targets and digests for those orders;
//! the end of the seed hands the targets to the assigner or fails them.

use std::collections::BTreeMap;

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, FailureReason};

use super::orders::OrderKind;
use super::{Now, State};

impl State {
    /// The agent seeding `blob` whole stored chunks and reports their digests: the blob's
    /// waiting targets may fetch them now.
    pub(super) fn chunks_seeded(&mut self, host: HostId, msg: pb::ChunksSeeded, now: Now) {
        let Ok(blob) = Digest::from_slice(&msg.blob_digest) else {
            return;
        };
        let whole_seed = self.seeder.seeding_range(blob.into(), host) == Some(None);
        if !self.orders.is_current(host, blob, msg.order_id) || !whole_seed {
            return; // Stale: not the current whole-blob seed order.
        }
        if self.catalog.manifest(&blob).is_some() {
            return; // Known already: the assigner plans it.
        }
        let Some(digests) = Digest::from_table(&msg.chunk_digests) else {
            tracing::warn!(agent = %self.agents.name(host), %blob, "ragged chunk digest table");
            return;
        };
        let seeders_before = self.streams.get(&blob).map(|s| s.seeders.clone());
        let name = (!msg.name.is_empty()).then_some(msg.name.as_str());
        // A blob named by its origin streams only under that name (its table ends at the
        // content's digest, not at the address), and no other blob under one.
        let named = (self.origins.get(&blob))
            .and_then(|o| o.origin.as_ref())
            .and_then(|o| o.name_of(&blob));
        if name != named.as_deref() {
            tracing::warn!(agent = %self.agents.name(host), %blob, "seed reported under another name than its origin's");
            return;
        }
        if let Err(e) = (self.streams).start(blob, name, msg.size, msg.chunk_size, host) {
            tracing::warn!(agent = %self.agents.name(host), %blob, error = %e, "seed does not fit the stream");
            return;
        }
        if let Err(e) = self.streams.learn(&blob, msg.first_chunk, &digests) {
            // The origin served other bytes than to an earlier seeder of the same blob.
            let message = format!("the origin's content changed while it was seeded: {e}");
            self.cancel_order(host, blob, "its chunks contradict the digests already sent");
            self.streams.remove_seeder(&blob, host);
            self.seed_failed(host, blob, FailureReason::DigestMismatch, &message, now);
            return;
        }
        let new_seeder = seeders_before.is_none_or(|s| !s.contains(&host));
        if new_seeder {
            tracing::info!(agent = %self.agents.name(host), %blob, size = msg.size, "streaming the seed to its waiting targets");
        }
        self.stream_to_waiting(blob, new_seeder, now);
        let targets: Vec<HostId> = (self.streams.get(&blob))
            .map_or_else(Vec::new, |s| s.targets.iter().copied().collect());
        for t in targets {
            let Some(order) = self.orders.get(t, blob) else {
                continue;
            };
            if !matches!(order.kind, OrderKind::Peers { .. }) {
                continue;
            }
            let message = pb::ChunkDigests {
                order_id: order.id,
                first_chunk: msg.first_chunk,
                chunk_digests: msg.chunk_digests.clone(),
            };
            self.agents
                .send(t, pb::coordinator_message::Msg::ChunkDigests(message));
        }
    }

    /// Gives each waiting target of a streamed blob that has no order one from peers, with
    /// the provisional manifest; and, when targets or seeders changed, everyone's sources.
    pub(super) fn stream_to_waiting(&mut self, blob: Digest, mut changed: bool, now: Now) {
        if !self.streams.contains(&blob) {
            return;
        }
        let mut new = Vec::new();
        for h in self.seeder.waiting(blob.into()) {
            if self.orders.get(h, blob).is_some()
                || self.seeder.seeding_range(blob.into(), h).is_some()
                || !self.jobs.is_wanted(h, blob)
            {
                continue;
            }
            if self.streams.add_target(&blob, h) {
                new.push(h);
            }
        }
        changed |= !new.is_empty();
        if !changed {
            return;
        }
        let Some(stream) = self.streams.get(&blob) else {
            return;
        };
        let plans: Vec<(HostId, super::streams::Stripes)> = (stream.targets.iter())
            .map(|t| (*t, stream.sources_of(*t)))
            .collect();
        for (t, sources) in plans {
            if new.contains(&t) {
                let sources: BTreeMap<HostId, (u32, u32)> = sources.into_iter().collect();
                self.orders.issue_streamed(t, blob, sources);
                self.deliver_order(t, blob);
                let agent = self.agents.name(t);
                self.jobs.start(&agent, t, blob, now.wall);
            } else {
                self.tell_sources(t, blob, sources);
            }
        }
    }

    /// A target of a streamed blob no longer wants it, or is to seed it: its order stops.
    pub(super) fn leave_stream(&mut self, host: HostId, blob: Digest, why: &str, now: Now) {
        if self.streams.remove_target(&blob, host) {
            self.cancel_order(host, blob, why);
            // Its stripe of the seeder goes to the others.
            self.stream_to_waiting(blob, true, now);
            self.streams.end_if_idle(&blob);
        }
    }

    /// The seed of `blob` ended. Seeded: the targets that finished meanwhile hold it (their
    /// orders now pass to the assigner, see `send_order`). Failed (or its last seeder failed,
    /// and another seed starts a new stream): every target's order stops.
    pub(super) fn end_stream(&mut self, blob: Digest, seeded: bool, now: Now) {
        let Some(stream) = self.streams.end(&blob) else {
            return;
        };
        if seeded {
            for host in stream.finished {
                self.holds(host, blob, u32::MAX, true, now);
            }
        } else {
            for host in stream.targets {
                self.cancel_order(host, blob, "seeding failed");
            }
        }
    }
}
