//! The control plane under Shoal: agents' sessions to the coordinator (the real `Assigner`),
//! with latency, leases, progress batching and coordinator restarts.

use super::*;

impl Sim<'_> {
    // ---- control plane (Shoal) ----

    /// The agent (re)opens its session: HostUp, then its inventory.
    pub(super) fn announce(&mut self, h: u32) {
        let s = &self.spec.hosts[h as usize];
        self.send(
            h,
            Event::HostUp {
                host: HostId(h),
                zone: ZoneId(s.zone),
                rack: RackId(s.rack),
                upload_bps: s.announced_bps.unwrap_or(s.up_bps) as u64,
                download_bps: s.announced_bps.unwrap_or(s.down_bps) as u64,
            },
        );
        let inventory: Vec<(u32, u32, bool)> = (self.hosts[h as usize].store.iter())
            .filter(|(_, c)| c.count() > 0)
            .map(|(b, c)| (*b, c.count(), c.is_full()))
            .collect();
        for (b, chunks, complete) in inventory {
            self.send(
                h,
                Event::Holds {
                    host: HostId(h),
                    blob: blob_id(b),
                    chunks,
                    complete,
                },
            );
        }
    }

    /// A deploy job asks for `b` on `h` (through the coordinator's API, not the agent).
    pub(super) fn job_want(&mut self, h: u32, b: u32) {
        let Some(c) = &self.coord else { return };
        let epoch = c.epoch;
        let t = self.now + self.spec.params.control_latency;
        self.at(
            t,
            Ev::ToCoord {
                epoch,
                from: None,
                event: Event::Want {
                    blob: blob_id(b),
                    host: HostId(h),
                    priority: 0,
                },
            },
        );
    }

    /// An agent message over its session; lost if the coordinator is down.
    pub(super) fn send(&mut self, h: u32, event: Event) {
        let Some(c) = &self.coord else { return };
        if !c.up || !self.hosts[h as usize].alive {
            return;
        }
        let epoch = c.epoch;
        let t = self.now + self.spec.params.control_latency;
        self.at(
            t,
            Ev::ToCoord {
                epoch,
                from: Some(h),
                event,
            },
        );
    }

    pub(super) fn coordinator_receive(&mut self, epoch: u32, from: Option<u32>, event: Event) {
        let now = self.now;
        let Some(c) = &mut self.coord else { return };
        if !c.up || c.epoch != epoch {
            return;
        }
        if let Some(h) = from {
            c.last_heard[h as usize] = Some(now);
            let up = matches!(event, Event::HostUp { .. });
            if let Event::Done { blob, .. } = &event {
                // A target checked the whole blob: its manifest is persisted.
                self.durable.insert(blob_index(*blob));
            }
            c.assigner.handle(now, event);
            if up {
                c.gone[h as usize] = false;
                let ready = shoal_planner::SeedEvent::HostReady { host: HostId(h) };
                c.seeder.handle(now, ready);
            } else {
                c.assigner.handle(now, Event::Heartbeat { host: HostId(h) });
            }
        } else {
            match event {
                // A want of a blob whose manifest nobody knows waits for it to be seeded.
                Event::Want { blob, host, .. } if !c.known.contains(&blob_index(blob)) => {
                    let size = self.spec.blobs[blob_index(blob) as usize];
                    let wait = shoal_planner::SeedEvent::Wait { blob, host, size };
                    c.seeder.handle(now, wait);
                }
                event => c.assigner.handle(now, event),
            }
        }
        self.drain_commands();
    }

    pub(super) fn coordinator_timers(&mut self) {
        let now = self.now;
        let Some(c) = &mut self.coord else { return };
        if !c.up {
            return;
        }
        // All that is due, the planner's slices of a big burst included: the model gives
        // the coordinator no CPU time, so a burst is planned within the step.
        while let Some(c) = (self.coord.as_mut()).filter(|c| c.up)
            && c.assigner.poll_timeout().is_some_and(|t| t <= now)
        {
            c.assigner.handle_timeout(now);
            self.drain_commands();
        }
        self.seeder_leases();
        self.drain_commands();
    }

    /// Sends what both planner machines decided, until neither has anything to say.
    pub(super) fn drain_commands(&mut self) {
        if self.batching {
            return; // The end of the step drains.
        }
        loop {
            self.drain_assigner();
            let seeded = self.drain_seeder();
            if !self.seeder_notices() && !seeded {
                return;
            }
        }
    }

    /// Seed orders to agents; returns whether there were any.
    fn drain_seeder(&mut self) -> bool {
        let now = self.now;
        let latency = self.spec.params.control_latency;
        let Some(c) = &mut self.coord else {
            return false;
        };
        let epoch = c.epoch;
        let commands: Vec<SeedCommand> = std::iter::from_fn(|| c.seeder.poll_command()).collect();
        let any = !commands.is_empty();
        for command in commands {
            if self.trace {
                eprintln!("{now:?} {command:?}");
            }
            self.at(now + latency, Ev::SeedToAgent { epoch, command });
        }
        any
    }

    fn drain_assigner(&mut self) {
        let now = self.now;
        let lease = self.spec.params.lease;
        let latency = self.spec.params.control_latency;
        let trace = self.trace;
        let Some(c) = &mut self.coord else { return };
        let mut out = Vec::new();
        let mut bad = Vec::new();
        while let Some(command) = c.assigner.poll_command() {
            let host = command.host();
            let heard = c.last_heard[host.0 as usize];
            if heard.is_none_or(|t| now.saturating_since(t) >= lease) {
                bad.push(format!("order {command:?} to a host whose lease expired"));
            }
            let stripes = match &command {
                Command::Fetch { blob, sources, .. }
                | Command::UpdateSources { blob, sources, .. } => (sources.iter())
                    .map(|s| (s.0, c.assigner.stripe(*blob, host, *s).unwrap_or((0, 1))))
                    .collect(),
                Command::Cancel { .. } => Vec::new(),
            };
            if trace {
                eprintln!("{now:?} {command:?}");
            }
            out.push((command, stripes));
        }
        let epoch = c.epoch;
        for (command, stripes) in out {
            self.at(
                now + latency,
                Ev::ToAgent {
                    epoch,
                    command,
                    stripes,
                },
            );
        }
        for b in bad {
            self.violation(b);
        }
    }

    pub(super) fn coordinator_up(&mut self) {
        let seed = self.spec.seed;
        let Some(c) = &mut self.coord else { return };
        c.epoch += 1;
        c.up = true;
        c.assigner = new_assigner(self.spec, mix(seed, u64::from(c.epoch)));
        // Seeding state is soft: elections start again from what agents and jobs say.
        c.seeder = new_seeder(self.spec);
        c.last_heard.iter_mut().for_each(|t| *t = None);
        c.gone.iter_mut().for_each(|g| *g = false);
        let spec = self.spec;
        let durable = &self.durable;
        c.known = (0..spec.blobs.len() as u32)
            .filter(|b| !spec.is_cold(*b) || durable.contains(b))
            .collect();
        for b in c.known.clone() {
            c.assigner.handle(
                self.now,
                Event::BlobKnown {
                    blob: blob_id(b),
                    size: self.spec.blobs[b as usize],
                    chunk_count: self.spec.chunk_count(b),
                },
            );
        }
        // Agents reconnect and report; the job records still want what is not done.
        for h in 0..self.hosts.len() as u32 {
            if self.hosts[h as usize].alive {
                self.announce(h);
            }
            if self.hosts[h as usize].arrived {
                let pending: Vec<u32> = self.hosts[h as usize].pending.iter().copied().collect();
                for b in pending {
                    self.job_want(h, b);
                }
            }
        }
    }

    pub(super) fn agent_receive(
        &mut self,
        epoch: u32,
        command: Command,
        stripes: Vec<(u32, (u32, u32))>,
    ) {
        let Some(c) = &self.coord else { return };
        let h = command.host().0;
        // Orders from a coordinator session that has since broken never arrive.
        if !c.up || c.epoch != epoch || !self.hosts[h as usize].alive {
            return;
        }
        match command {
            Command::Fetch { blob, sources, .. } | Command::UpdateSources { blob, sources, .. } => {
                let b = blob_index(blob);
                if !self.hosts[h as usize].downloads.contains_key(&b) && !self.start_download(h, b)
                {
                    // Already complete here: say so again.
                    self.send(
                        h,
                        Event::Done {
                            host: HostId(h),
                            blob,
                        },
                    );
                    return;
                }
                let want: BTreeSet<u32> = sources.iter().map(|s| s.0).collect();
                let have: Vec<u32> = self.hosts[h as usize].downloads[&b]
                    .sources
                    .keys()
                    .copied()
                    .collect();
                for s in have {
                    if !want.contains(&s) {
                        self.remove_source(h, b, s);
                    }
                }
                for (s, stripe) in stripes {
                    self.add_source(h, b, s, Some(stripe));
                }
                self.refill(h, b);
            }
            Command::Cancel { blob, .. } => {
                self.drop_download(h, blob_index(blob));
            }
        }
    }

    pub(super) fn report_progress(&mut self, h: u32) {
        if !self.hosts[h as usize].alive {
            return;
        }
        let mut reports = Vec::new();
        for (b, d) in &mut self.hosts[h as usize].downloads {
            let chunks = d.picker.have().count();
            if chunks != d.reported {
                d.reported = chunks;
                reports.push((*b, chunks));
            }
        }
        for (b, chunks) in reports {
            self.send(
                h,
                Event::Holds {
                    host: HostId(h),
                    blob: blob_id(b),
                    chunks,
                    complete: false,
                },
            );
        }
    }

    pub(super) fn check_planner(&mut self) {
        let Some(c) = &self.coord else { return };
        if !c.up {
            return;
        }
        if let Err(e) = c.assigner.check_invariants() {
            self.violation(format!("planner invariant: {e}"));
        }
    }
}
