//! The jobs' persistence. It goes through the writer (`crate::writer`), never waited for
//! here. What a user asked (Distribute, CancelJob) is written before it is acknowledged: the
//! reply rides on the write and is sent by the writer once it is stored. Agent-driven
//! changes mark the job dirty and are written a few times a second by [`Jobs::flush`], not
//! once per target, and one flush at a time (a slow disk gets fewer, larger writes, not a
//! growing queue). A flush writes the job's own row and the rows of the targets that
//! changed since the last write (a job of 20,000 targets is not re-encoded whole four times
//! a second); a job whose write failed is written whole next. What a crash loses in
//! between, the agents' inventories restore. Each write's outcome comes back on a ticket,
//! read at housekeeping ([`Jobs::confirm`]): a failed flush or cancel is written again, and
//! a new job whose write failed is dropped (its caller was told so).

use std::time::{Duration, SystemTime};

use super::Jobs;
use crate::db::Write;
use crate::writer::{Then, Ticket};

/// A write of jobs the writer has not confirmed yet.
pub(super) struct Unconfirmed {
    ids: Vec<String>,
    ticket: Ticket,
    /// A new job's first write: if it fails, the job is dropped; otherwise its jobs are
    /// written again.
    create: bool,
    /// A periodic flush (at most one is out at a time).
    flush: bool,
}

impl Unconfirmed {
    /// A new job's first write.
    pub(super) fn create(id: String, ticket: Ticket) -> Self {
        Self {
            ids: vec![id],
            ticket,
            create: true,
            flush: false,
        }
    }
}

impl Jobs {
    /// Queues a write of job `id` now; `then` runs once it is stored.
    pub fn store(&mut self, id: &str, now: SystemTime, then: Then) {
        self.dirty.remove(id);
        let Some(job) = self.jobs.get_mut(id) else {
            then(Ok(()));
            return;
        };
        let write = Write::Jobs(vec![job.record_whole(now)]);
        let ticket = self.writer.write_ticket(write, Some(then));
        self.unconfirmed.push(Unconfirmed {
            ids: vec![id.to_string()],
            ticket,
            create: false,
            flush: false,
        });
    }

    /// Queues a write of the jobs changed since the last flush, up to [`FLUSH_SLICE`](super::FLUSH_SLICE)
    /// targets of each (a job with more stays to be flushed on), unless the last flush is
    /// not stored yet (they wait for the next one).
    pub fn flush(&mut self, now: SystemTime) {
        if self.unconfirmed.iter().any(|u| u.flush) {
            return;
        }
        let ids: Vec<String> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut jobs = Vec::new();
        for id in &ids {
            let Some(job) = self.jobs.get_mut(id) else {
                continue;
            };
            // An ended job is written whole at once: its header must not say it ended
            // while some of its targets' last words are not stored (a restart would bring
            // it back ended, with targets pending for good).
            let (record, done) = if job.is_terminal() {
                (job.record_changes(now), true)
            } else {
                job.record_some_changes(self.flush_slice, now)
            };
            jobs.push(record);
            if !done {
                self.dirty.insert(id.clone());
            }
        }
        self.queue_flush(ids, jobs);
    }

    /// Queues a write of the jobs changed since the last flush, now: what is queued after
    /// it lands after it.
    pub fn flush_now(&mut self, now: SystemTime) {
        let ids: Vec<String> = std::mem::take(&mut self.dirty).into_iter().collect();
        let jobs: Vec<crate::db::JobRecord> = (ids.iter())
            .filter_map(|id| self.jobs.get_mut(id).map(|j| j.record_changes(now)))
            .collect();
        self.queue_flush(ids, jobs);
    }

    /// Queues the records of a flush of jobs `ids`.
    fn queue_flush(&mut self, ids: Vec<String>, jobs: Vec<crate::db::JobRecord>) {
        if jobs.is_empty() {
            return;
        }
        let ticket = self.writer.write_ticket(Write::Jobs(jobs), None);
        self.unconfirmed.push(Unconfirmed {
            ids,
            ticket,
            create: false,
            flush: true,
        });
    }

    /// Jobs changed and not yet stored, and writes of jobs not yet confirmed.
    #[cfg(test)]
    pub fn unstored(&self) -> usize {
        self.dirty.len() + self.unconfirmed.len()
    }

    /// Reads what the writer did with the jobs' writes: a failed one is written again at
    /// the next flush, except a new job's first, whose id is returned (its caller was told
    /// it failed; the job must go, see [`Jobs::discard`]).
    pub fn confirm(&mut self) -> Vec<String> {
        let mut unstored = Vec::new();
        let dirty = &mut self.dirty;
        let jobs = &mut self.jobs;
        self.unconfirmed.retain_mut(|u| match u.ticket.poll() {
            None => true,
            Some(Ok(())) => false,
            Some(Err(_)) if u.create => {
                unstored.append(&mut u.ids);
                false
            }
            Some(Err(_)) => {
                // Its changes were not stored: the next write is whole.
                for id in &u.ids {
                    if let Some(job) = jobs.get_mut(id) {
                        job.forget_stored();
                    }
                }
                dirty.extend(u.ids.drain(..));
                false
            }
        });
        unstored.retain(|id| self.jobs.contains_key(id));
        unstored
    }

    /// Drops jobs that ended longer than `retention` ago, from memory and disk, so a
    /// long-running coordinator does not grow without bound.
    pub fn forget_old(&mut self, retention: Duration, now: SystemTime) {
        let Some(cutoff) = now.checked_sub(retention) else {
            return;
        };
        let old: Vec<String> = (self.jobs.values())
            .filter(|j| j.is_terminal())
            .filter(|j| {
                (j.record.finished_at)
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .is_some_and(|t| t <= cutoff)
            })
            .map(|j| j.id().to_string())
            .collect();
        for id in old {
            self.remove(&id);
            self.dirty.remove(&id);
            // A failure is logged by the writer; the job comes back at the next start and is
            // dropped again then.
            self.writer.write(Write::ForgetJob(id));
        }
    }
}
