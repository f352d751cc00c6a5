//! The coordinator's gauges, set from its state at every housekeeping tick: agents, catalog,
//! jobs by state, each unfinished job's progress against its physical bound, and the
//! planner's decision counts.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shoal_proto::pb::v1 as pb;

use super::State;
use super::agents::Agents;
use super::job::{Job, state_label};
use crate::metrics as m;

impl State {
    pub(super) fn export_metrics(&mut self) {
        self.exports += 1;
        let with_bounds = self.exports % BOUND_EVERY == 1;
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
        for job in self.jobs.iter() {
            *by_state.entry(state_label(job.state())).or_default() += 1;
            if !job.is_terminal() {
                export_job(job, &self.agents, with_bounds);
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

/// Exports between two computations of the jobs' bounds (once a second): a bound walks
/// every target of its job, 20,000 of them in a big one.
const BOUND_EVERY: u64 = 4;

/// One unfinished job's gauges, labelled `job_id`, its bound only `with_bound`. They stop
/// being set when the job ends, and the exporter drops them after [`m::JOB_SERIES_LINGER`].
fn export_job(job: &Job, agents: &Agents, with_bound: bool) {
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
    if !with_bound {
        return;
    }
    let per_agent = sum_by_agent((job.targets()).map(|((a, _), t)| (a.as_str(), t.bytes_total())));
    if let Some(bound) = bound_seconds(&per_agent, agents) {
        metrics::gauge!(m::JOB_BOUND, "job_id" => id).set(bound);
    }
}

/// Each agent's bytes, from targets in key order (an agent's together): summed as they
/// pass. A map of 20,000 agents, built once a second on the state task, was a pause of its
/// own.
fn sum_by_agent<'a>(targets: impl Iterator<Item = (&'a str, u64)>) -> Vec<(&'a str, u64)> {
    let mut per_agent: Vec<(&str, u64)> = Vec::new();
    for (agent, bytes) in targets {
        match per_agent.last_mut() {
            Some((last, sum)) if *last == agent => *sum += bytes,
            _ => per_agent.push((agent, bytes)),
        }
    }
    per_agent
}

/// The longest any target agent needs to receive its bytes at its download capacity; `None`
/// while some target agent is unknown or announced no capacity, or nothing is wanted yet.
fn bound_seconds(per_agent: &[(&str, u64)], agents: &Agents) -> Option<f64> {
    let mut bound: f64 = 0.0;
    for (id, bytes) in per_agent {
        let agent = agents.host_of(id).and_then(|h| agents.get(h))?;
        let download = agent.capacity().1;
        if download == 0 {
            return None;
        }
        bound = bound.max(*bytes as f64 / download as f64);
    }
    (bound > 0.0).then_some(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_targets_are_summed_together() {
        let targets = [("a", 1), ("a", 2), ("b", 5), ("c", 0), ("c", 7)];
        assert_eq!(
            sum_by_agent(targets.into_iter()),
            vec![("a", 3), ("b", 5), ("c", 7)]
        );
        assert!(sum_by_agent(std::iter::empty()).is_empty());
    }
}
