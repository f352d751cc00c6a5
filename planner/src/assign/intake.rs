//! Intake: a burst of wants is planned a slice at a time, so that one `Distribute` to
//! 20,000 hosts does not hold the driver for the whole plan.
//!
//! Up to [`AssignerConfig::intake_slice`](super::AssignerConfig::intake_slice) wants are
//! planned per batch (`begin_batch`..`end_batch`) or per `handle_timeout`; the rest queue in
//! arrival order, and [`Assigner::poll_timeout`] says "now" until the queue is empty, so the
//! driver plans the next slice between the other work it has (agents' messages, reads).
//!
//! A blob's commands are held while it has queued wants: a download ordered in one slice
//! would otherwise get an `UpdateSources` for every later slice that splits one of its
//! edges (a 20,000-target burst cut into unheld slices sent 91,000 of them instead of
//! 12,000). Each download still gets one command with its final sources, as when the whole
//! burst was planned in one step, and the decisions are the same: the slices apply the same
//! wants in the same order. Once the last slice is planned, the held commands go out two
//! slices' worth per timeout, which the driver alternates with the agents' messages
//! (sending 20,000 orders at once took 0.5 s; 1,024 at every step, reads' too, made every
//! read wait 25 ms). Eight slices' worth per timeout took 25-45 ms a turn with 20,000
//! agents, and a read or session message that came meanwhile waited for all of it; two
//! release as fast now that the driver gives its turns alike in time (once, when the
//! driver alternated by count, two made the last order 60% later).
//!
//! A queued want is withdrawn by `Unwant`; one for a host that went down meanwhile is
//! planned like any want for a host that is down (kept, ordered when it comes back).

use std::collections::{BTreeMap, VecDeque};

use super::Assigner;
use crate::{BlobId, HostId, Time};

use super::Priority;

/// Wants waiting to be planned, in arrival order.
#[derive(Debug, Default)]
pub(super) struct Intake {
    queue: VecDeque<(BlobId, HostId)>,
    /// The queued wants still wanted, with their latest priority.
    waiting: BTreeMap<(BlobId, HostId), Priority>,
    /// Queued wants per blob: a blob listed here has its commands held.
    per_blob: BTreeMap<BlobId, usize>,
    /// Downloads of blobs with queued wants whose commands wait, in the order they changed.
    held: BTreeMap<BlobId, Vec<HostId>>,
    /// Downloads of fully planned blobs whose commands are still to go out (see `release`).
    released: VecDeque<(BlobId, HostId)>,
    /// Wants that may still be planned at once in the current batch or timeout.
    budget: usize,
    /// A timeout ran since the last flush: the next flush releases a slice of held
    /// commands (only timeouts do, so that no event's or read's step pays for it).
    release_due: bool,
}

impl Intake {
    /// Whether `blob`'s commands are held: it has wants waiting, or held commands not yet
    /// moved to the release queue (the last slice's go behind them).
    pub(super) fn holds_back(&self, blob: BlobId) -> bool {
        self.per_blob.contains_key(&blob) || self.held.contains_key(&blob)
    }

    /// Keeps `target`'s command for `blob` until the blob's queued wants are planned.
    pub(super) fn hold(&mut self, blob: BlobId, target: HostId) {
        self.held.entry(blob).or_default().push(target);
    }

    /// Up to `limit` downloads whose commands are due now that their blob's wants are all
    /// planned, in the order they changed. The rest go out at the next timeouts: sending
    /// 20,000 orders at once held the driver for half a second.
    pub(super) fn release(&mut self, limit: usize) -> Vec<(BlobId, HostId)> {
        if !std::mem::take(&mut self.release_due) {
            return Vec::new();
        }
        let done: Vec<BlobId> = (self.held.keys())
            .filter(|b| !self.per_blob.contains_key(b))
            .copied()
            .collect();
        for b in done {
            let targets = self.held.remove(&b).unwrap_or_default();
            self.released.extend(targets.into_iter().map(|t| (b, t)));
        }
        let n = limit.min(self.released.len());
        self.released.drain(..n).collect()
    }

    pub(super) fn len(&self) -> usize {
        self.waiting.len()
    }

    fn take(&mut self, blob: BlobId, host: HostId) -> Option<Priority> {
        let priority = self.waiting.remove(&(blob, host))?;
        if let Some(n) = self.per_blob.get_mut(&blob) {
            *n -= 1;
            if *n == 0 {
                self.per_blob.remove(&blob);
            }
        }
        Some(priority)
    }
}

impl Assigner {
    /// A new slice: up to `intake_slice` wants may be planned at once again.
    pub(super) fn refill_intake(&mut self) {
        self.intake.budget = self.config.intake_slice.max(1);
    }

    /// `Event::Want`: planned now if the slice has room and nothing waits before it, else
    /// queued (a repeat while queued only updates the priority).
    pub(super) fn intake_want(&mut self, blob: BlobId, host: HostId, priority: Priority) {
        let intake = &mut self.intake;
        if let Some(p) = intake.waiting.get_mut(&(blob, host)) {
            *p = priority;
            return;
        }
        if intake.waiting.is_empty() && intake.budget > 0 {
            intake.budget -= 1;
            self.want(blob, host, priority);
            return;
        }
        intake.queue.push_back((blob, host));
        intake.waiting.insert((blob, host), priority);
        *intake.per_blob.entry(blob).or_default() += 1;
        self.stats.wants_queued += 1;
    }

    /// `Event::Unwant`: a queued want is withdrawn (a download planned already is the
    /// caller's to cancel).
    pub(super) fn intake_unwant(&mut self, blob: BlobId, host: HostId) {
        self.intake.take(blob, host);
    }

    /// Plans queued wants while the slice has room (at a timeout: the flush after it also
    /// releases a slice of held commands).
    pub(super) fn plan_queued(&mut self) {
        self.intake.release_due = true;
        while self.intake.budget > 0 {
            let Some((blob, host)) = self.intake.queue.pop_front() else {
                break;
            };
            // Withdrawn while queued: nothing to plan.
            let Some(priority) = self.intake.take(blob, host) else {
                continue;
            };
            self.intake.budget -= 1;
            self.want(blob, host, priority);
            // As after a `Want` event: the same decisions as one step.
            self.settle();
        }
        if self.intake.waiting.is_empty() {
            self.intake.queue.clear();
        }
    }

    /// When the next slice is due: now, while wants wait or commands are still to go out.
    pub(super) fn intake_due(&self) -> Option<Time> {
        let busy = !self.intake.waiting.is_empty() || !self.intake.released.is_empty();
        busy.then_some(self.now)
    }

    /// Commands released per timeout, at most, once a burst is planned.
    pub(super) fn release_slice(&self) -> usize {
        self.config.intake_slice.max(1).saturating_mul(2)
    }

    /// Wants waiting to be planned (a burst bigger than one slice).
    pub fn queued_wants(&self) -> usize {
        self.intake.len()
    }
}
