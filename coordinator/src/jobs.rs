//! Jobs: a set of blobs that a set of agents must end up holding, and the state of every
//! target (one agent × one blob).
//!
//! The rule for a lost agent: when an agent's lease expires, each of its unfinished targets
//! fails with `AGENT_LOST` and a message naming the agent and when it was last heard from. If
//! the agent comes back while the job is still running, those targets are resumed. A job is
//! DONE when every target is done, FAILED when every target is terminal and one failed.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, FailureReason, JobState, TargetState};

/// One target's state. `version` grows on every change, so watchers send only changes.
#[derive(Clone, Debug)]
pub struct Target {
    pub state: TargetState,
    pub reason: FailureReason,
    pub message: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub rate: u64,
    pub version: u64,
}

impl Target {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state,
            TargetState::Done | TargetState::Failed | TargetState::Cancelled
        )
    }
}

#[derive(Debug)]
pub struct Job {
    /// Everything but the targets and the aggregate progress.
    pub record: pb::Job,
    pub deadline: Option<SystemTime>,
    pub targets: BTreeMap<(String, Digest), Target>,
    pub version: u64,
}

impl Job {
    pub fn new(record: pb::Job, deadline: Option<SystemTime>) -> Self {
        Self {
            record,
            deadline,
            targets: BTreeMap::new(),
            version: 0,
        }
    }

    pub fn id(&self) -> &str {
        &self.record.job_id
    }

    pub fn state(&self) -> JobState {
        self.record.state()
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state(),
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    /// Changes one target; returns true if anything changed.
    pub fn update(&mut self, key: &(String, Digest), f: impl FnOnce(&mut Target)) -> bool {
        let Some(t) = self.targets.get_mut(key) else {
            return false;
        };
        let before = (t.state, t.reason, t.bytes_done, t.rate);
        f(t);
        if before != (t.state, t.reason, t.bytes_done, t.rate) {
            self.version += 1;
            t.version = self.version;
            return true;
        }
        false
    }

    /// Recomputes the aggregate state; returns true if it became terminal just now.
    pub fn refresh_state(&mut self, now: SystemTime) -> bool {
        if self.is_terminal() {
            return false;
        }
        let all = self.targets.values();
        let state = if all.clone().all(|t| t.state == TargetState::Done) {
            JobState::Done
        } else if all.clone().all(Target::is_terminal) {
            JobState::Failed
        } else if all.clone().any(|t| t.state != TargetState::Pending) {
            JobState::Running
        } else {
            JobState::Pending
        };
        self.set_state(state, now)
    }

    pub fn set_state(&mut self, state: JobState, now: SystemTime) -> bool {
        if self.state() == state {
            return false;
        }
        self.record.set_state(state);
        self.version += 1;
        if self.is_terminal() {
            self.record.finished_at = Some(now.into());
            return true;
        }
        false
    }

    /// Aggregate progress; with `with_targets`, the targets changed after `since` (0: all).
    pub fn progress(&self, with_targets: bool, since: u64, now: SystemTime) -> pb::JobProgress {
        let mut counts = pb::TargetCounts::default();
        let (mut done, mut total, mut rate) = (0u64, 0u64, 0u64);
        let mut targets = Vec::new();
        for ((agent, blob), t) in &self.targets {
            counts.total += 1;
            match t.state {
                TargetState::Pending | TargetState::Unspecified => counts.pending += 1,
                TargetState::Running => counts.running += 1,
                TargetState::Done => counts.done += 1,
                TargetState::Failed => counts.failed += 1,
                TargetState::Cancelled => counts.cancelled += 1,
            }
            done += t.bytes_done;
            total += t.bytes_total;
            if t.state == TargetState::Running {
                rate += t.rate;
            }
            if with_targets && (since == 0 || t.version > since) {
                targets.push(pb::TargetProgress {
                    agent_id: agent.clone(),
                    blob: blob.to_string(),
                    state: t.state as i32,
                    reason: t.reason as i32,
                    message: t.message.clone(),
                    bytes_done: t.bytes_done,
                    bytes_total: t.bytes_total,
                    rate_bytes_per_sec: t.rate,
                    eta_ms: eta_ms(t.bytes_total - t.bytes_done.min(t.bytes_total), t.rate),
                });
            }
        }
        pb::JobProgress {
            job_id: self.record.job_id.clone(),
            state: self.record.state,
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_sec: rate,
            eta_ms: if self.is_terminal() {
                0
            } else {
                eta_ms(total - done.min(total), rate)
            },
            counts: Some(counts),
            targets,
            updated_at: Some(now.into()),
        }
    }

    /// The record as persisted and as returned by GetJob (targets optional).
    pub fn to_pb(&self, with_targets: bool, now: SystemTime) -> pb::Job {
        let mut job = self.record.clone();
        job.progress = Some(self.progress(with_targets, 0, now));
        job
    }

    /// Rebuilds a job from its persisted record. Running targets go back to pending: their
    /// agents will report what they hold when they reconnect.
    pub fn from_pb(mut record: pb::Job) -> Option<Self> {
        let progress = record.progress.take()?;
        let deadline = record.deadline.and_then(|d| SystemTime::try_from(d).ok());
        let mut job = Self::new(record, deadline);
        for t in progress.targets {
            let Ok(blob) = t.blob.parse::<Digest>() else {
                continue;
            };
            let (mut state, reason) = (t.state(), t.reason());
            if state == TargetState::Running {
                state = TargetState::Pending;
            }
            job.targets.insert(
                (t.agent_id, blob),
                Target {
                    state,
                    reason,
                    message: t.message,
                    bytes_done: if state == TargetState::Done {
                        t.bytes_total
                    } else {
                        0
                    },
                    bytes_total: t.bytes_total,
                    rate: 0,
                    version: 0,
                },
            );
        }
        Some(job)
    }
}

/// A job state as a metric label.
pub fn state_label(s: JobState) -> &'static str {
    match s {
        JobState::Pending | JobState::Unspecified => "pending",
        JobState::Running => "running",
        JobState::Done => "done",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn eta_ms(remaining: u64, rate: u64) -> u64 {
    if rate == 0 || remaining == 0 {
        0
    } else {
        remaining.saturating_mul(1000) / rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_with(states: &[TargetState]) -> Job {
        let mut job = Job::new(
            pb::Job {
                job_id: "j".into(),
                ..Default::default()
            },
            None,
        );
        for (i, s) in states.iter().enumerate() {
            job.targets.insert(
                (format!("a{i}"), Digest::of(b"x")),
                Target {
                    state: *s,
                    reason: FailureReason::Unspecified,
                    message: String::new(),
                    bytes_done: 0,
                    bytes_total: 10,
                    rate: 0,
                    version: 0,
                },
            );
        }
        job
    }

    #[test]
    fn aggregate_state_follows_the_targets() {
        let now = SystemTime::UNIX_EPOCH;
        let mut j = job_with(&[TargetState::Pending, TargetState::Pending]);
        j.refresh_state(now);
        assert_eq!(j.state(), JobState::Pending);
        let mut j = job_with(&[TargetState::Running, TargetState::Pending]);
        j.refresh_state(now);
        assert_eq!(j.state(), JobState::Running);
        let mut j = job_with(&[TargetState::Done, TargetState::Failed]);
        assert!(j.refresh_state(now));
        assert_eq!(j.state(), JobState::Failed);
        assert!(j.record.finished_at.is_some());
        let mut j = job_with(&[TargetState::Done, TargetState::Done]);
        j.refresh_state(now);
        assert_eq!(j.state(), JobState::Done);
    }

    #[test]
    fn persisted_round_trip_resets_running_targets() {
        let now = SystemTime::UNIX_EPOCH;
        let j = job_with(&[TargetState::Done, TargetState::Running]);
        let back = Job::from_pb(j.to_pb(true, now)).expect("decodes");
        let states: Vec<_> = back.targets.values().map(|t| t.state).collect();
        assert_eq!(states, vec![TargetState::Done, TargetState::Pending]);
    }
}
