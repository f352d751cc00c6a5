//! Blobs that only an external origin holds, under Shoal: the coordinator runs the
//! planner's real `Seeder` (as production does) to elect agents that fetch each blob, whole
//! or in ranges, from the origin over its rate-limited uplink; a whole blob is registered
//! when its fetch ends, ranges are reported and their manifest assembled, and then the blob
//! spreads from peers like any other. A seeder that dies mid-range is found by its lease
//! and replaced.
//!
//! As in production, what a seeder fetched reaches peers only once its blob is known: a
//! whole blob when it is registered, a range when the seeder's own order for the blob
//! arrives and it moves the range into its store.

use shoal_planner::{GiveUp, SeedEvent, SeedNotice};
use shoal_proto::Digest;

use super::*;

/// The chunk digest a seeder reports: the simulator's stand-in for SHA-256 of the chunk.
fn chunk_digest(b: u32, i: u32) -> Digest {
    let mut bytes = [0u8; 32];
    bytes[..4].copy_from_slice(&b.to_be_bytes());
    bytes[4..8].copy_from_slice(&i.to_be_bytes());
    Digest::from_bytes(bytes)
}

impl Sim<'_> {
    // ---- the agent ----

    /// A seed order (or its end) reaches an agent.
    pub(super) fn agent_seed(&mut self, epoch: u32, command: SeedCommand) {
        let Some(c) = &self.coord else { return };
        let h = match &command {
            SeedCommand::Seed { host, .. } | SeedCommand::Stop { host, .. } => host.0,
        };
        if !c.up || c.epoch != epoch || !self.hosts[h as usize].alive {
            return;
        }
        match command {
            SeedCommand::Seed { blob, range, .. } => {
                let b = blob_index(blob);
                if self.hosts[h as usize].seeding.contains_key(&b) {
                    return; // Sent again: the fetch goes on.
                }
                let n = self.spec.chunk_count(b);
                let chunk = self.spec.params.chunk_size;
                let (first, count) = match range {
                    Some((start, end)) => ((start / chunk) as u32, end.div_ceil(chunk) as u32),
                    None => (0, n),
                };
                let count = count - first;
                if range.is_none()
                    && self.hosts[h as usize]
                        .store
                        .get(&b)
                        .is_some_and(ChunkSet::is_full)
                {
                    self.seed_report(h, SeedReport::Registered { blob: b });
                    return;
                }
                let Some(origin) = (0..self.hosts.len() as u32).find(|&o| {
                    self.hosts[o as usize].external
                        && self.spec.hosts[o as usize].holds.contains(&b)
                }) else {
                    self.violation(format!("seed order for blob {b}, which no origin holds"));
                    return;
                };
                let rtt = self.rtt(origin, h);
                let ready = self.now + rtt;
                let queue: VecDeque<(ChunkIndex, Time)> = (first..first + count)
                    .map(|i| (ChunkIndex(i), ready))
                    .collect();
                let head_left = self.spec.chunk_bytes(b, ChunkIndex(first));
                let flow = self.new_flow(Flow {
                    src: origin,
                    dst: h,
                    blob: b,
                    rtt,
                    queue,
                    head_left,
                    last_progress: self.now,
                    stall_reported: false,
                    seed: true,
                });
                self.hosts[h as usize].seeding.insert(
                    b,
                    SeedFetch {
                        flow,
                        first,
                        count,
                        got: 0,
                        whole: range.is_none(),
                    },
                );
            }
            SeedCommand::Stop { blob, .. } => {
                let b = blob_index(blob);
                if let Some(f) = self.hosts[h as usize].seeding.remove(&b) {
                    self.remove_flow(f.flow);
                }
            }
        }
    }

    /// A chunk of an origin fetch arrived on its seeder (checked only at the end, against
    /// the blob digest or by the targets, as in production).
    pub(super) fn seed_chunk_arrived(&mut self, h: u32, b: u32) {
        let Some(f) = self.hosts[h as usize].seeding.get_mut(&b) else {
            return;
        };
        f.got += 1;
        if f.got < f.count {
            return;
        }
        let Some(f) = self.hosts[h as usize].seeding.remove(&b) else {
            return;
        };
        self.remove_flow(f.flow);
        if f.whole {
            // Checked against the blob digest and stored: it holds the blob whole.
            let origin = self.origin_of(b);
            for i in 0..f.count {
                self.store(h, b, ChunkIndex(i), origin);
            }
            self.blob_complete(h, b);
            self.seed_report(h, SeedReport::Registered { blob: b });
        } else {
            (self.hosts[h as usize].parts.entry(b).or_default()).push((f.first, f.count));
            let report = SeedReport::Range {
                blob: b,
                first: f.first,
                count: f.count,
            };
            self.seed_report(h, report);
        }
    }

    fn origin_of(&self, b: u32) -> u32 {
        (0..self.hosts.len() as u32)
            .find(|&o| {
                self.hosts[o as usize].external && self.spec.hosts[o as usize].holds.contains(&b)
            })
            .unwrap_or(0)
    }

    /// Moves the ranges `h` seeded of `b` into its store (its order for the blob came).
    pub(super) fn import_parts(&mut self, h: u32, b: u32) {
        let Some(parts) = self.hosts[h as usize].parts.remove(&b) else {
            return;
        };
        let origin = self.origin_of(b);
        for (first, count) in parts {
            for i in first..first + count {
                self.store(h, b, ChunkIndex(i), origin);
            }
        }
    }

    pub(super) fn drop_seed_fetches(&mut self, h: u32) {
        let fetches = std::mem::take(&mut self.hosts[h as usize].seeding);
        for f in fetches.into_values() {
            self.remove_flow(f.flow);
        }
    }

    fn seed_report(&mut self, h: u32, report: SeedReport) {
        let Some(c) = &self.coord else { return };
        if !c.up || !self.hosts[h as usize].alive {
            return;
        }
        let epoch = c.epoch;
        let t = self.now + self.spec.params.control_latency;
        self.at(
            t,
            Ev::SeedToCoord {
                epoch,
                from: h,
                report,
            },
        );
    }

    // ---- the coordinator ----

    pub(super) fn coordinator_seed_report(&mut self, epoch: u32, from: u32, report: SeedReport) {
        let now = self.now;
        let spec = self.spec;
        let Some(c) = &mut self.coord else { return };
        if !c.up || c.epoch != epoch {
            return;
        }
        c.last_heard[from as usize] = Some(now);
        c.assigner
            .handle(now, Event::Heartbeat { host: HostId(from) });
        let host = HostId(from);
        match report {
            SeedReport::Range { blob, first, count } => {
                let digests = (first..first + count)
                    .map(|i| chunk_digest(blob, i))
                    .collect();
                let event = SeedEvent::RangeSeeded {
                    blob: blob_id(blob),
                    host,
                    first_chunk: first,
                    digests,
                };
                c.seeder.handle(now, event);
            }
            SeedReport::Registered { blob } => {
                self.durable.insert(blob);
                c.known.insert(blob);
                c.assigner.handle(
                    now,
                    Event::BlobKnown {
                        blob: blob_id(blob),
                        size: spec.blobs[blob as usize],
                        chunk_count: spec.chunk_count(blob),
                    },
                );
                let holds = Event::Holds {
                    host,
                    blob: blob_id(blob),
                    chunks: spec.chunk_count(blob),
                    complete: true,
                };
                c.assigner.handle(now, holds);
                let known = SeedEvent::Known {
                    blob: blob_id(blob),
                    by: Some(host),
                };
                c.seeder.handle(now, known);
            }
        }
        self.drain_commands();
    }

    /// Acts on the seeder's notices: an assembled manifest becomes known to the assigner,
    /// with each seeder a partial holder; the waiting targets become wants. Returns whether
    /// there was any.
    pub(super) fn seeder_notices(&mut self) -> bool {
        let now = self.now;
        let spec = self.spec;
        let Some(c) = &mut self.coord else {
            return false;
        };
        let mut any = false;
        let mut gave_up = Vec::new();
        while let Some(notice) = c.seeder.poll_notice() {
            any = true;
            match notice {
                SeedNotice::Assembled { blob, held, .. } => {
                    let b = blob_index(blob);
                    c.known.insert(b);
                    c.assigner.handle(
                        now,
                        Event::BlobKnown {
                            blob,
                            size: spec.blobs[b as usize],
                            chunk_count: spec.chunk_count(b),
                        },
                    );
                    let mut counts: BTreeMap<HostId, u32> = BTreeMap::new();
                    for (h, _, n) in held {
                        *counts.entry(h).or_default() += n;
                    }
                    for (host, chunks) in counts {
                        let holds = Event::Holds {
                            host,
                            blob,
                            chunks,
                            complete: false,
                        };
                        c.assigner.handle(now, holds);
                    }
                    c.seeder.handle(now, SeedEvent::Known { blob, by: None });
                }
                SeedNotice::Seeded { blob, waiting } => {
                    for host in waiting {
                        let want = Event::Want {
                            blob,
                            host,
                            priority: 0,
                        };
                        c.assigner.handle(now, want);
                    }
                }
                SeedNotice::Failed { blob, cause, .. } => {
                    gave_up.push((blob_index(blob), cause));
                }
            }
        }
        for (b, cause) in gave_up {
            let why = match cause {
                GiveUp::Definitive { message, .. } | GiveUp::Abandoned { message } => message,
                other => format!("{other:?}"),
            };
            self.violation(format!("seeding blob {b} gave up: {why}"));
        }
        any
    }

    /// Hosts whose lease ran out are gone for the seeder (the assigner keeps its own).
    pub(super) fn seeder_leases(&mut self) {
        let now = self.now;
        let lease = self.spec.params.lease;
        let Some(c) = &mut self.coord else { return };
        for h in 0..c.gone.len() {
            let expired = c.last_heard[h].is_some_and(|t| now.saturating_since(t) > lease);
            if expired && !c.gone[h] {
                c.gone[h] = true;
                c.seeder.handle(
                    now,
                    SeedEvent::HostGone {
                        host: HostId(h as u32),
                    },
                );
            }
        }
    }
}
