//! The coordinator's gauges, set from its state at every housekeeping tick: agents, catalog,
//! jobs by state, each unfinished job's progress against its physical bound, and the
//! planner's decision counts.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shoal_proto::pb::v1 as pb;

use super::State;
use super::agents::Agents;
use super::job::{Job, TargetKey, state_label};
use crate::metrics as m;

impl State {
    pub(super) fn export_metrics(&mut self) {
        let mut agents = [0usize; 4];
        for a in self.agents.iter() {
            match a.state {
                pb::AgentState::Ready => agents[0] += 1,
                pb::AgentState::Draining => agents[1] += 1,
                pb::AgentState::Disconnected => agents[2] += 1,
                pb::AgentState::Gone | pb::AgentState::Unspecified => agents[3] += 1,
            }
        }
        metrics::gauge!(m::AGENTS_READY).set(agents[0] as f64);
        for (state, n) in ["ready", "draining", "disconnected", "gone"]
            .iter()
            .zip(agents)
        {
            metrics::gauge!(m::AGENTS, "state" => *state).set(n as f64);
        }
        // Zero until the first expiry, so that alerts on it have a series to read.
        metrics::counter!(m::LEASES_EXPIRED).increment(0);
        metrics::gauge!(m::BLOBS).set(self.catalog.len() as f64);
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut scans = std::mem::take(&mut self.bounds);
        for job in self.jobs.iter() {
            *by_state.entry(state_label(job.state())).or_default() += 1;
            if !job.is_terminal() {
                let scan = scans.remove(job.id()).unwrap_or_default();
                let scan = export_job(job, &self.agents, scan);
                self.bounds.insert(job.id().to_string(), scan);
            }
        }
        for state in ["pending", "running", "done", "failed", "cancelled"] {
            let n = by_state.get(state).copied().unwrap_or(0);
            metrics::gauge!(m::JOBS, "state" => state).set(n as f64);
        }
        let s = self.assigner.stats();
        let seeds = self.seeder.stats();
        for (kind, v) in [
            ("order", s.orders),
            ("source_update", s.source_updates),
            ("cancel", s.cancels),
            ("replan", s.replans),
            ("stall", s.stalls),
            ("corrupt_report", s.corrupt_reports),
            ("gave_up", s.gave_up),
            ("seed_order", seeds.seed_orders),
            ("seed_failed", seeds.failed_seeds),
            ("seed_gave_up", seeds.gave_up),
        ] {
            metrics::counter!(m::PLANNER_DECISIONS, "kind" => kind).absolute(v);
        }
        metrics::counter!(m::PLANNER_STRIPE_UPDATES).absolute(s.stripe_updates);
        metrics::counter!(m::PLANNER_CANDIDATES).absolute(s.candidates_examined);
        metrics::gauge!(m::PLANNER_QUEUED_WANTS).set(self.assigner.queued_wants() as f64);
    }
}

/// Targets a job's bound takes in at each export (every 250 ms): a bound walks every target
/// of its job, and 20,000 of them at once held the state task ~19 ms once a second.
const BOUND_SLICE: usize = 2_000;

/// A job's bound, computed a slice of its targets at a time.
#[derive(Debug, Default)]
pub(super) struct BoundScan {
    /// The last target taken in, if a pass is under way.
    after: Option<TargetKey>,
    /// The agent whose targets are being summed, and their bytes so far.
    agent: Option<(String, u64)>,
    /// The longest time of the agents done in this pass, seconds.
    longest: f64,
    /// Whether an agent of this pass is unknown or announced no capacity.
    unknown: bool,
    /// The last whole pass's bound.
    bound: Option<f64>,
}

impl BoundScan {
    /// Takes in up to `limit` more of a job's `targets` (key and bytes, in key order from
    /// just after [`BoundScan::after`]: an agent's together), `download` giving an agent's
    /// capacity. At the end of a pass its bound becomes the one shown.
    fn advance<'a>(
        &mut self,
        targets: impl Iterator<Item = (&'a TargetKey, u64)>,
        limit: usize,
        download: impl Fn(&str) -> Option<u64>,
    ) {
        let mut taken = 0;
        let mut last_key = None;
        for (key, bytes) in targets.take(limit) {
            taken += 1;
            last_key = Some(key);
            let agent = &key.0;
            match &mut self.agent {
                Some((last, sum)) if last == agent => *sum += bytes,
                _ => {
                    self.finish_agent(&download);
                    self.agent = Some((agent.clone(), bytes));
                }
            }
        }
        // Where the next slice starts: one key kept per slice, not one per target.
        if let Some(key) = last_key {
            self.after = Some(key.clone());
        }
        if taken < limit {
            self.finish_agent(&download);
            self.bound = (!self.unknown && self.longest > 0.0).then_some(self.longest);
            (self.after, self.longest, self.unknown) = (None, 0.0, false);
        }
    }

    fn finish_agent(&mut self, download: &impl Fn(&str) -> Option<u64>) {
        let Some((id, bytes)) = self.agent.take() else {
            return;
        };
        match download(&id) {
            Some(d) if d > 0 => self.longest = self.longest.max(bytes as f64 / d as f64),
            _ => self.unknown = true,
        }
    }
}

/// One unfinished job's gauges, labelled `job_id`; its bound (the longest any target agent
/// needs to receive its bytes at its download capacity) once a pass of `scan` has taken in
/// every target, and while no target agent is unknown or without capacity. They stop being
/// set when the job ends, and the exporter drops them after [`m::JOB_SERIES_LINGER`].
fn export_job(job: &Job, agents: &Agents, mut scan: BoundScan) -> BoundScan {
    let (done, wanted) = job.bytes();
    let id = job.id().to_string();
    metrics::gauge!(m::JOB_DONE_BYTES, "job_id" => id.clone()).set(done as f64);
    metrics::gauge!(m::JOB_WANTED_BYTES, "job_id" => id.clone()).set(wanted as f64);
    if let Some(created) = job
        .record
        .created_at
        .and_then(|t| SystemTime::try_from(t).ok())
    {
        let secs = created
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        metrics::gauge!(m::JOB_CREATED, "job_id" => id.clone()).set(secs);
    }
    if !job.is_built() {
        // Its targets are built within a few turns; a pass over some would bound too low.
        return BoundScan::default();
    }
    let after = scan.after.clone();
    let targets = (job.targets_after(after.as_ref())).map(|(key, t)| (key, t.bytes_total()));
    scan.advance(targets, BOUND_SLICE, |id| {
        (agents.host_of(id).and_then(|h| agents.get(h))).map(|a| a.capacity().1)
    });
    if let Some(bound) = scan.bound {
        metrics::gauge!(m::JOB_BOUND, "job_id" => id).set(bound);
    }
    scan
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use shoal_proto::Digest;

    use super::*;
    use crate::state::job::targets_after;

    /// Scans `targets` to the end of a pass, `limit` at a time: its bound, and the slices.
    fn pass(
        targets: &BTreeMap<TargetKey, u64>,
        limit: usize,
        download: &BTreeMap<&str, u64>,
    ) -> (Option<f64>, usize) {
        let mut scan = BoundScan::default();
        for slices in 1.. {
            let after = scan.after.clone();
            let slice = targets_after(targets, after.as_ref()).map(|(k, b)| (k, *b));
            scan.advance(slice, limit, |id| download.get(id).copied());
            if scan.after.is_none() {
                return (scan.bound, slices);
            }
        }
        unreachable!()
    }

    #[test]
    fn a_bound_is_the_slowest_agents_bytes_over_its_capacity_taken_in_slices() {
        let (x, y) = (Digest::of(b"x"), Digest::of(b"y"));
        let key = |a: &str, d: Digest| (a.to_string(), d);
        // b's two blobs meet across a slice's end when slices are of two.
        let targets: BTreeMap<TargetKey, u64> = [
            (key("a", x), 100),
            (key("b", x), 300),
            (key("b", y), 300),
            (key("c", x), 100),
        ]
        .into();
        let download: BTreeMap<&str, u64> = [("a", 100), ("b", 200), ("c", 10)].into();
        // c: 100 / 10 = 10 s; b: 600 / 200 = 3 s.
        for (limit, slices) in [(1, 5), (2, 3), (3, 2), (100, 1)] {
            assert_eq!(
                pass(&targets, limit, &download),
                (Some(10.0), slices),
                "{limit}"
            );
        }
        let mut slow_b = download.clone();
        slow_b.insert("b", 10);
        assert_eq!(
            pass(&targets, 2, &slow_b).0,
            Some(60.0),
            "b's bytes summed across slices"
        );
        let mut unknown = download.clone();
        unknown.remove("b");
        assert_eq!(
            pass(&targets, 2, &unknown).0,
            None,
            "an unknown agent: no bound"
        );
        unknown.insert("b", 0);
        assert_eq!(pass(&targets, 2, &unknown).0, None, "no capacity: no bound");
        assert_eq!(
            pass(&BTreeMap::new(), 2, &download).0,
            None,
            "nothing wanted"
        );
    }
}
