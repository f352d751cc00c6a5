//! What agents report on their sessions, and what each report changes.
//!
//! Reports are keyed by (agent, blob), not by order id, where that is safe: an agent that
//! finishes an order issued by a previous coordinator incarnation still completes the
//! target. Failures and stalls are the exception: only the current order's count, since
//! agents resend recent reports after a reconnect.

use std::collections::BTreeSet;

use shoal_planner::{Event, HostId, SeedEvent};
use shoal_proto::pb::v1::{self as pb, agent_message::Msg};
use shoal_proto::{Digest, Manifest};

use super::catalog::{self, Trust};
use super::{Now, SessionId, State};

impl State {
    pub(super) fn on_agent_message(&mut self, session: SessionId, msg: Msg, now: Now) {
        if !self.agents.touch(session, now) {
            return; // A message from a replaced session.
        }
        let host = session.host;
        if self
            .agents
            .get(host)
            .is_some_and(|a| a.state == pb::AgentState::Draining)
        {
            // Out of planning until it joins again: only its lease (renewed above) counts.
            match msg {
                Msg::Load(load) => self.load(host, load, now),
                Msg::Draining(_) => {}
                _ => {
                    tracing::debug!(agent = %self.agents.name(host), "report of a draining agent ignored")
                }
            }
            return;
        }
        self.assigner.handle(now.mono, Event::Heartbeat { host });
        match msg {
            Msg::Draining(_) => {
                let waiting = self.drain(host, "drained as it stops (shoal drain)", now);
                tracing::info!(agent = %self.agents.name(host), waiting_targets = waiting, "agent asked to be drained");
            }
            Msg::Hello(_) | Msg::Heartbeat(_) => {}
            Msg::Inventory(inv) => self.inventory(host, inv, now),
            Msg::Progress(batch) => {
                for item in batch.items {
                    self.progress(host, item, now);
                }
            }
            Msg::BlobDone(done) => {
                let Ok(blob) = Digest::from_slice(&done.blob_digest) else {
                    return;
                };
                // An agent has read the whole blob and checked its digest (if the catalog's
                // manifest was not verified, its order said so).
                let by = self.agents.name(host);
                self.catalog.mark_verified(&blob, &by);
                // A target of a streamed seed may finish before the seeder registers it.
                if self.catalog.manifest(&blob).is_none() {
                    self.streams.finished(&blob, host);
                }
                self.blob_done(host, blob, now);
            }
            Msg::BlobFailed(failed) => self.blob_failed(host, failed, now),
            Msg::Load(load) => self.load(host, load, now),
            Msg::BlobRegistered(reg) => self.register(host, reg, now),
            Msg::RangeSeeded(range) => self.range_seeded(host, range, now),
            Msg::ChunksSeeded(chunks) => self.chunks_seeded(host, chunks, now),
            Msg::TableWanted(wanted) => self.table_wanted(host, wanted),
            Msg::SourceStalled(stalled) => {
                let Ok(blob) = Digest::from_slice(&stalled.blob_digest) else {
                    return;
                };
                if !self.orders.is_current(host, blob, stalled.order_id) {
                    return;
                }
                if let Some(source) = self.agents.host_of(&stalled.peer_agent_id) {
                    tracing::info!(agent = %self.agents.name(host), peer = %stalled.peer_agent_id, %blob, reason = %stalled.reason, "source stalled");
                    let event = Event::SourceStalled {
                        host,
                        blob: blob.into(),
                        source,
                    };
                    self.assigner.handle(now.mono, event);
                }
            }
            Msg::ChunkRejected(rej) => {
                let Ok(blob) = Digest::from_slice(&rej.blob_digest) else {
                    return;
                };
                if let Some(source) = self.agents.host_of(&rej.peer_agent_id) {
                    tracing::warn!(agent = %self.agents.name(host), peer = %rej.peer_agent_id, %blob, chunk = rej.chunk_index, "peer served a corrupted chunk");
                    let event = Event::SourceCorrupt {
                        host,
                        blob: blob.into(),
                        source,
                    };
                    self.assigner.handle(now.mono, event);
                }
            }
        }
    }

    /// No source of an order that came without its chunk table served it: the whole
    /// table, as digests for the order.
    fn table_wanted(&mut self, host: HostId, wanted: pb::TableWanted) {
        let Ok(blob) = Digest::from_slice(&wanted.blob_digest) else {
            return;
        };
        if !self.orders.is_current(host, blob, wanted.order_id) {
            // Not an order of this coordinator's (cancelled, replaced, or from before a
            // restart): the agent's task would wait for an answer that never comes.
            let cancel = pb::Cancel {
                order_id: wanted.order_id,
                reason: "no such order".into(),
            };
            self.agents
                .send(host, pb::coordinator_message::Msg::Cancel(cancel));
            return;
        }
        let Some(manifest) = self.catalog.wire_manifest(&blob) else {
            return;
        };
        tracing::debug!(agent = %self.agents.name(host), %blob, "sending a chunk table no source served");
        let message = pb::ChunkDigests {
            order_id: wanted.order_id,
            first_chunk: 0,
            chunk_digests: manifest.chunk_digests.to_vec(),
        };
        self.agents
            .send(host, pb::coordinator_message::Msg::ChunkDigests(message));
    }

    /// A load report; the planner hears of capacities the agent learned (see
    /// `Agent::capacity`).
    fn load(&mut self, host: HostId, load: pb::Load, now: Now) {
        if let Some((upload_bps, download_bps)) = self.agents.set_load(host, load) {
            tracing::debug!(agent = %self.agents.name(host), upload_bps, download_bps, "learned capacity");
            self.assigner.handle(
                now.mono,
                Event::HostCapacity {
                    host,
                    upload_bps,
                    download_bps,
                },
            );
        }
    }

    fn blob_failed(&mut self, host: HostId, failed: pb::BlobFailed, now: Now) {
        let Ok(blob) = Digest::from_slice(&failed.blob_digest) else {
            return;
        };
        // Only the current order's failure counts: agents resend recent reports after a
        // reconnect, and a stale one must not cost the retry another attempt.
        if !self.orders.is_current(host, blob, failed.order_id) {
            return;
        }
        let reason = failed.reason();
        if self.orders.is_seed(host, blob) {
            self.seed_failed(host, blob, reason, &failed.message, now);
            return;
        }
        if self.streams.target_failed(&blob, host) {
            // A target of a streamed seed: another order for it, while the seed runs (a
            // few times at most), and its stripe of the seeder goes to the others meanwhile.
            tracing::info!(agent = %self.agents.name(host), %blob, message = %failed.message, "fetch from a running seed failed");
            self.orders.remove(host, blob);
            self.orders.failed(host, blob, reason, failed.message);
            self.stream_to_waiting(blob, true, now);
            return;
        }
        if reason == pb::FailureReason::DigestMismatch {
            match self.catalog.trust(&blob) {
                Some(Trust::Seeded) => {
                    self.reject_provisional(blob, &failed.message, now);
                    return;
                }
                // One target's word is not enough to drop a manifest (it may lie, or its
                // disk may): its order fails as any other, and a second target decides.
                Some(Trust::Registered) if self.catalog.mismatch(&blob, host) >= 2 => {
                    self.reject_registered(blob, now);
                    return;
                }
                _ => {}
            }
        }
        tracing::info!(agent = %self.agents.name(host), %blob, message = %failed.message, "fetch failed");
        self.orders.remove(host, blob);
        self.orders.failed(host, blob, reason, failed.message);
        let event = Event::Failed {
            host,
            blob: blob.into(),
        };
        self.assigner.handle(now.mono, event);
    }

    /// An agent ingested a blob (a push, or a whole-blob seed): it holds it whole.
    fn register(&mut self, host: HostId, reg: pb::BlobRegistered, now: Now) {
        let Some(manifest) = (reg.manifest.as_ref()).and_then(|m| Manifest::try_from(m).ok())
        else {
            tracing::warn!(agent = %self.agents.name(host), "agent registered an invalid manifest");
            return;
        };
        let digest = manifest.digest();
        let by = self.agents.name(host);
        if let Some(why) = self.vetting.quarantined(&by) {
            tracing::warn!(agent = by, blob = %digest, why, "registration of a quarantined agent ignored");
            return;
        }
        // A named blob's table is its seeder's reading of the origin, and nothing else
        // checks it (its content is not its address): only the agent ordered to seed it
        // whole names its content, never another agent's registration.
        if manifest.name().is_some() && self.seeder.seeding_range(digest.into(), host) != Some(None)
        {
            tracing::warn!(agent = by, blob = %digest, "registration of a named blob by an agent not seeding it ignored");
            return;
        }
        let trust = if self.config.trust_registrations {
            Trust::Verified
        } else {
            Trust::Registered
        };
        self.add_to_catalog(manifest, by, trust, now);
        // If a job wanted it there, that target is done; targets waiting for it to be
        // seeded can now fetch it from peers.
        self.blob_done(host, digest, now);
        let event = SeedEvent::Known {
            blob: digest.into(),
            by: Some(host),
        };
        self.seeder.handle(now.mono, event);
    }

    /// A range seeder fetched its range: the seeder keeps its chunk digests.
    fn range_seeded(&mut self, host: HostId, msg: pb::RangeSeeded, now: Now) {
        let Ok(blob) = Digest::from_slice(&msg.blob_digest) else {
            return;
        };
        if !self.orders.is_current(host, blob, msg.order_id) || !self.orders.is_seed(host, blob) {
            return; // Stale: not the current seed order.
        }
        self.orders.remove(host, blob);
        let digests = (msg.chunk_digests.iter())
            .filter_map(|d| Digest::from_slice(d).ok())
            .collect();
        let event = SeedEvent::RangeSeeded {
            blob: blob.into(),
            host,
            first_chunk: msg.first_chunk,
            digests,
        };
        self.seeder.handle(now.mono, event);
    }

    /// A target found that the blob assembled from seeded ranges does not match its digest:
    /// the origin serves other bytes. The manifest is dropped and every target of the blob
    /// fails, rather than fetching it again and again.
    fn reject_provisional(&mut self, blob: Digest, message: &str, now: Now) {
        tracing::warn!(%blob, message, "the seeded blob does not match its digest");
        let message = format!("the origin's content does not match {blob}: {message}");
        self.fail_mismatched(blob, &message, now);
        self.catalog.remove(&blob, None);
    }

    /// Two targets found that the blob they assembled from a registered manifest does not
    /// match its digest: its registrant's word was wrong (a lie, or its disk). The manifest
    /// is dropped and the registrant quarantined and told to drop its copy; the blob's
    /// targets fail (their orders carry the wrong manifest), and its other whole holders
    /// are asked to register it again, so the digest is not lost to the cluster.
    fn reject_registered(&mut self, blob: Digest, now: Now) {
        let Some(entry) = self.catalog.entry(&blob) else {
            return;
        };
        let registrant = entry.registered_by.clone();
        let holders: Vec<(HostId, bool)> = (entry.holders.iter())
            .map(|(host, h)| (*host, h.complete))
            .collect();
        tracing::error!(agent = registrant, %blob, "quarantined: the manifest it registered does not describe the blob (two targets read it whole)");
        let why =
            format!("the manifest it registered for {blob} did not match the blob at two targets");
        self.vetting.quarantine(&registrant, why);
        let registrant_host = self.agents.host_of(&registrant);
        if let Some(host) = registrant_host {
            self.agents.send(
                host,
                pb::coordinator_message::Msg::DropBlob(pb::DropBlob {
                    blob_digest: blob.as_bytes().to_vec(),
                    unpin_only: false,
                }),
            );
        }
        let message = format!(
            "the manifest agent {registrant} registered for {blob} does not describe it (two targets read the blob whole); that agent is quarantined and the manifest dropped: push the blob again, or retry once another holder registered it"
        );
        self.fail_mismatched(blob, &message, now);
        // Nobody holds what this manifest described: the planner forgets every holding.
        for (host, _) in &holders {
            self.holds(*host, blob, 0, false, now);
        }
        // Honest holders whose chunks failed against it were reported corrupt wrongly.
        let event = Event::ManifestReplaced { blob: blob.into() };
        self.assigner.handle(now.mono, event);
        self.catalog.remove(&blob, None);
        let whole = holders.into_iter().filter(|(_, complete)| *complete);
        for (host, _) in whole {
            if Some(host) != registrant_host && !self.is_quarantined(host) {
                self.ask_to_register(host, vec![blob], now);
            }
        }
    }

    /// Cancels every order for `blob` and fails its targets everywhere: the manifest they
    /// fetch by does not describe it.
    fn fail_mismatched(&mut self, blob: Digest, message: &str, now: Now) {
        let wanting: Vec<HostId> = (self.agents.iter())
            .map(|a| a.host)
            .filter(|h| self.jobs.is_wanted(*h, blob))
            .collect();
        for host in wanting {
            self.cancel_order(host, blob, "the blob does not match its digest");
            self.fail_targets(host, blob, pb::FailureReason::DigestMismatch, message, now);
        }
    }

    /// Asks `host` to register those of `blobs` it holds whole, as far as
    /// [`super::vetting::Vetting::ask`] allows.
    fn ask_to_register(&mut self, host: HostId, blobs: Vec<Digest>, now: Now) {
        let blob_digests: Vec<Vec<u8>> = (blobs.into_iter())
            .filter(|b| self.vetting.ask(*b, host, now.mono))
            .map(|b| b.as_bytes().to_vec())
            .collect();
        if blob_digests.is_empty() {
            return;
        }
        tracing::info!(agent = %self.agents.name(host), blobs = blob_digests.len(), "asking an agent to register blobs the catalog lacks");
        let msg = pb::coordinator_message::Msg::RegisterBlobs(pb::RegisterBlobs { blob_digests });
        self.agents.send(host, msg);
    }

    /// Whether `host`'s word about content is no longer taken.
    pub(super) fn is_quarantined(&self, host: HostId) -> bool {
        !self.vetting.none_quarantined()
            && self.vetting.quarantined(&self.agents.name(host)).is_some()
    }

    fn inventory(&mut self, host: HostId, inv: pb::Inventory, now: Now) {
        // A snapshot replaces what we knew; blobs it no longer lists are dropped after it is
        // applied, so holdings that did not change cause no re-planning.
        let mut dropped: BTreeSet<Digest> = if inv.replace {
            self.catalog.held_by(host).into_iter().collect()
        } else {
            BTreeSet::new()
        };
        let mut unknown = Vec::new();
        for held in inv.blobs {
            let Ok(blob) = Digest::from_slice(&held.blob_digest) else {
                continue;
            };
            if held.complete
                && self.catalog.entry(&blob).is_none()
                && self.streams.get(&blob).is_none()
            {
                unknown.push(blob);
            }
            let expected = self.catalog.manifest(&blob).map(|m| m.chunk_count());
            let chunks = match held.chunks.as_ref() {
                // A bitmap of another length describes another blob layout: misread, it
                // would count chunks that are not there.
                Some(c) if expected.is_some_and(|n| n != c.chunk_count) => {
                    tracing::warn!(agent = %self.agents.name(host), %blob, bitmap = c.chunk_count, chunks = ?expected, "inventory bitmap of the wrong length ignored");
                    0
                }
                Some(c) => catalog::count_bits(&c.bits),
                None => 0,
            };
            dropped.remove(&blob);
            self.holds(host, blob, chunks, held.complete, now);
            if held.complete {
                self.blob_done(host, blob, now);
            }
            self.catalog.set_pinned(&blob, host, held.pinned);
        }
        // Blobs the agent reports gone since its last message (evicted, removed).
        let removed = (inv.removed_blobs.iter()).filter_map(|d| Digest::from_slice(d).ok());
        dropped.extend(removed);
        for blob in dropped {
            self.holds(host, blob, 0, false, now);
        }
        if !unknown.is_empty() && !self.is_quarantined(host) {
            self.ask_to_register(host, unknown, now);
        }
    }

    fn progress(&mut self, host: HostId, item: pb::BlobProgress, now: Now) {
        let Ok(blob) = Digest::from_slice(&item.blob_digest) else {
            return;
        };
        // A late progress report must not make a complete holder look partial again.
        if !self.catalog.holds_complete(&blob, host) {
            self.holds(host, blob, item.chunks_verified, false, now);
        }
        // Chunks held are a fact whatever the order; bytes and rate belong to the order out
        // now (a replaced order's late report must not move the target).
        if !self.orders.is_current(host, blob, item.order_id) {
            return;
        }
        let agent = self.agents.name(host);
        let (bytes, rate) = (item.bytes_done, item.rate_bytes_per_sec);
        self.jobs
            .progress(&agent, host, blob, bytes, rate, now.wall);
    }
}
