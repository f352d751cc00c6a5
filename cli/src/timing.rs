//! When a job's targets ended, against the physical bound: each target agent's bytes over its
//! download capacity (the coordinator's learned figure, capped by any configured limit). No
//! schedule gets those bytes to it sooner.

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use shoal_proto::pb::v1 as pb;

/// One target agent: how long after the job's creation its last target ended, and its bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    pub agent_id: String,
    pub secs: f64,
    /// Its bytes in this job over its download capacity; `None` if the capacity is unknown.
    pub bound_secs: Option<f64>,
}

impl Ended {
    /// Its time as a multiple of its own bound.
    pub fn ratio(&self) -> Option<f64> {
        self.bound_secs
            .filter(|b| *b > 0.0)
            .map(|bound| self.secs / bound)
    }
}

/// Seconds from the job's creation to `target`'s end; `None` while it is open, or if its
/// agent held the blob already.
pub fn target_secs(job: &pb::Job, target: &pb::TargetProgress) -> Option<f64> {
    let created = SystemTime::try_from(job.created_at?).ok()?;
    let ended = SystemTime::try_from(target.finished_at?).ok()?;
    Some(ended.duration_since(created).ok()?.as_secs_f64())
}

/// Per target agent whose every fetched target ended (agents that held everything already
/// are left out), in agent order. `capacity`: each agent's download capacity, bytes/s.
pub fn ended(job: &pb::Job, capacity: &HashMap<String, u64>) -> Vec<Ended> {
    let Some(progress) = &job.progress else {
        return Vec::new();
    };
    // (last end, bytes fetched, all ended)
    let mut agents: BTreeMap<&str, (f64, u64, bool)> = BTreeMap::new();
    for t in &progress.targets {
        let held_already = t.finished_at.is_none() && t.state() == pb::TargetState::Done;
        if held_already {
            continue;
        }
        let entry = agents.entry(&t.agent_id).or_insert((0.0, 0, true));
        match target_secs(job, t) {
            Some(secs) => {
                entry.0 = entry.0.max(secs);
                entry.1 += t.bytes_total;
            }
            None => entry.2 = false,
        }
    }
    (agents.into_iter())
        .filter(|(_, (_, _, all))| *all)
        .map(|(agent, (secs, bytes, _))| Ended {
            agent_id: agent.to_string(),
            secs,
            bound_secs: (capacity.get(agent))
                .filter(|c| **c > 0)
                .map(|c| bytes as f64 / *c as f64),
        })
        .collect()
}

/// "targets ended after: p50 …, p99 …, last …", each also as a multiple of the targets' own
/// bounds where every capacity is known; `None` if no target agent ended.
pub fn summary(ended: &[Ended]) -> Option<String> {
    let mut secs: Vec<f64> = ended.iter().map(|e| e.secs).collect();
    if secs.is_empty() {
        return None;
    }
    let ratios: Option<Vec<f64>> = ended.iter().map(Ended::ratio).collect();
    let at = |v: &mut Vec<f64>, q: f64| -> f64 {
        v.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    let mut parts = Vec::new();
    for (name, q) in [("p50", 0.5), ("p99", 0.99), ("last", 1.0)] {
        let mut part = format!("{name} {:.2} s", at(&mut secs, q));
        if let Some(mut r) = ratios.clone() {
            part.push_str(&format!(" ({:.2}x its bound)", at(&mut r, q)));
        }
        parts.push(part);
    }
    Some(format!(
        "{} target agents ended after: {}",
        ended.len(),
        parts.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(secs: f64) -> Option<prost_types::Timestamp> {
        Some((UNIX_EPOCH + Duration::from_secs_f64(1000.0 + secs)).into())
    }

    fn target(agent: &str, state: pb::TargetState, ended: Option<f64>) -> pb::TargetProgress {
        pb::TargetProgress {
            agent_id: agent.into(),
            state: state as i32,
            bytes_total: 100,
            finished_at: ended.and_then(at),
            ..Default::default()
        }
    }

    #[test]
    fn each_agent_counts_once_at_its_last_end_against_its_own_bound() {
        use pb::TargetState::{Done, Running};
        let job = pb::Job {
            created_at: at(0.0),
            progress: Some(pb::JobProgress {
                targets: vec![
                    target("a", Done, Some(2.0)),
                    target("a", Done, Some(4.0)), // a: 200 bytes, ended at 4 s
                    target("b", Done, Some(1.0)), // b: 100 bytes at 1 s
                    target("c", Done, None),      // c held it: left out
                    target("d", Done, Some(3.0)),
                    target("d", Running, None), // d still fetching: left out
                ],
                ..Default::default()
            }),
            ..Default::default()
        };
        let capacity = HashMap::from([("a".to_string(), 100), ("b".to_string(), 50)]);
        let ended = ended(&job, &capacity);
        assert_eq!(
            ended,
            [
                Ended {
                    agent_id: "a".into(),
                    secs: 4.0,
                    bound_secs: Some(2.0)
                },
                Ended {
                    agent_id: "b".into(),
                    secs: 1.0,
                    bound_secs: Some(2.0)
                },
            ]
        );
        assert_eq!(
            summary(&ended).as_deref(),
            Some(
                "2 target agents ended after: p50 1.00 s (0.50x its bound), \
                 p99 4.00 s (2.00x its bound), last 4.00 s (2.00x its bound)"
            )
        );
        // An unknown capacity: times only.
        let ended = super::ended(&job, &HashMap::new());
        assert_eq!(
            summary(&ended).as_deref(),
            Some("2 target agents ended after: p50 1.00 s, p99 4.00 s, last 4.00 s")
        );
        assert_eq!(summary(&[]), None);
    }
}
