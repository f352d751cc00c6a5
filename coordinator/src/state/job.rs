//! One job: a set of blobs that a set of agents must end up holding, and the state of every
//! target (one agent × one blob).
//!
//! A target changes state only through its transitions ([`Target::start`],
//! [`Target::finish`], [`Target::fail`], …), each of which says whether anything changed,
//! so that a job's `version` grows on every change a watcher should see.
//!
//! The rule for a lost agent: when an agent's lease expires, each of its unfinished targets
//! fails with `AGENT_LOST` and a message naming the agent and when it was last heard from. If
//! the agent comes back while the job is still running, those targets are resumed. A job is
//! DONE when every target is done, FAILED when every target is terminal and one failed.

use std::collections::BTreeMap;
use std::time::SystemTime;

use shoal_planner::HostId;
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, FailureReason, JobState, TargetState};

use crate::db::JobRecord;

mod rest;
pub use rest::Rest;

/// What GetJob and ListJobs show instead of an origin header's value.
pub const REDACTED: &str = "<redacted>";

/// Replaces every origin header's value with [`REDACTED`] (the names stay).
fn hide_header_values(job: &mut pb::Job) {
    for origin in job.origins.values_mut() {
        if let Some(pb::origin::Origin::Http(h)) = &mut origin.origin {
            for value in h.headers.values_mut() {
                *value = REDACTED.to_string();
            }
        }
    }
}

/// A URL without what may be a credential: its user and password, and its query's values
/// (presigned URLs carry their signature there); the names of the query's keys stay.
fn redacted_url(url: &str) -> String {
    let Ok(mut parsed) = shoal_origin::parse_http_url(url) else {
        return REDACTED.to_string();
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username(REDACTED);
        let _ = parsed.set_password(None);
    }
    if parsed.query().is_some() {
        let keys: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        parsed
            .query_pairs_mut()
            .clear()
            .extend_pairs(keys.iter().map(|k| (k.as_str(), REDACTED)));
    }
    parsed.to_string()
}

/// A target's key: (agent id, blob).
pub type TargetKey = (String, Digest);

/// One target's state. `version` is the job's version at its last change, so watchers send
/// only what changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    state: TargetState,
    reason: FailureReason,
    message: String,
    bytes_done: u64,
    bytes_total: u64,
    rate: u64,
    version: u64,
    /// When it became terminal (`None` while open, and if it was done at creation).
    ended_at: Option<SystemTime>,
}

impl Target {
    /// A new target of a blob of `bytes_total` bytes (0 while unknown), done already if the
    /// agent holds it.
    pub fn new(bytes_total: u64, done: bool) -> Self {
        Self {
            state: if done {
                TargetState::Done
            } else {
                TargetState::Pending
            },
            reason: FailureReason::Unspecified,
            message: String::new(),
            bytes_done: if done { bytes_total } else { 0 },
            bytes_total,
            rate: 0,
            version: 0,
            ended_at: None,
        }
    }

    /// The blob's size, 0 while unknown.
    pub fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state,
            TargetState::Done | TargetState::Failed | TargetState::Cancelled
        )
    }

    /// An order (or a seed order for its blob) went out: pending becomes running.
    fn start(&mut self) {
        if self.state == TargetState::Pending {
            self.state = TargetState::Running;
        }
    }

    /// The agent reported progress.
    fn progress(&mut self, bytes_done: u64, rate: u64) {
        if !self.is_terminal() {
            self.state = TargetState::Running;
            self.bytes_done = bytes_done.min(self.bytes_total);
            self.rate = rate;
        }
    }

    /// The blob's size became known (seeded from its origin).
    fn set_total(&mut self, bytes_total: u64) {
        self.bytes_total = bytes_total;
        if self.state == TargetState::Done {
            self.bytes_done = bytes_total;
        }
    }

    /// The agent holds the whole blob, verified. A failed or cancelled target stays so.
    fn finish(&mut self) {
        if !self.is_terminal() {
            self.state = TargetState::Done;
            self.bytes_done = self.bytes_total;
            self.rate = 0;
        }
    }

    /// It cannot complete. Only an unfinished target fails.
    fn fail(&mut self, reason: FailureReason, message: &str) {
        if !self.is_terminal() {
            self.state = TargetState::Failed;
            self.reason = reason;
            self.message = message.to_string();
            self.rate = 0;
        }
    }

    /// The job was cancelled. Only an unfinished target is.
    fn cancel(&mut self, message: &str) {
        if !self.is_terminal() {
            self.state = TargetState::Cancelled;
            self.reason = FailureReason::Cancelled;
            self.message = message.to_string();
            self.rate = 0;
        }
    }

    /// Its agent came back: a target it lost is pending again. True if the target still
    /// needs the blob (pending, running, or just resumed).
    fn resume(&mut self) -> bool {
        if self.state == TargetState::Failed && self.reason == FailureReason::AgentLost {
            self.state = TargetState::Pending;
            self.reason = FailureReason::Unspecified;
            self.message.clear();
        }
        matches!(self.state, TargetState::Pending | TargetState::Running)
    }
}

/// A transition of one target.
#[derive(Clone, Copy, Debug)]
pub enum Transition<'a> {
    Start,
    Progress { bytes_done: u64, rate: u64 },
    SetTotal(u64),
    Finish,
    Fail(FailureReason, &'a str),
    Cancel(&'a str),
}

#[derive(Debug)]
pub struct Job {
    /// Everything but the targets and the aggregate progress.
    pub record: pb::Job,
    pub deadline: Option<SystemTime>,
    /// The targets built.
    targets: BTreeMap<TargetKey, Target>,
    /// The targets not built yet, all pending, or not wanted yet (see [`Rest`]); `None`
    /// once all are wanted.
    rest: Option<Rest>,
    /// The built targets' counts and bytes, kept with every change: the aggregate state
    /// after each target's report, and a `GetJob` without targets, must not walk 20,000
    /// targets. [`Job::tally`] adds the targets not built.
    tally: Tally,
    version: u64,
    /// The version whose changes have all been handed to the database writer (`None`:
    /// nothing yet, or a write failed): a flush writes only the targets changed after it.
    stored: Option<u64>,
    /// A pass of [`Job::record_some_changes`] under way: the version it stores once done,
    /// and the last target it scanned.
    pass: Option<(u64, TargetKey)>,
}

/// Sums over a job's targets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    pending: u64,
    running: u64,
    done: u64,
    failed: u64,
    cancelled: u64,
    bytes_done: u64,
    bytes_total: u64,
    /// The rates of the running targets.
    rate: u64,
}

impl Tally {
    fn add(&mut self, t: &Target) {
        self.apply(t, u64::wrapping_add);
    }

    fn remove(&mut self, t: &Target) {
        self.apply(t, u64::wrapping_sub);
    }

    fn apply(&mut self, t: &Target, op: fn(u64, u64) -> u64) {
        let count = match t.state {
            TargetState::Pending | TargetState::Unspecified => &mut self.pending,
            TargetState::Running => &mut self.running,
            TargetState::Done => &mut self.done,
            TargetState::Failed => &mut self.failed,
            TargetState::Cancelled => &mut self.cancelled,
        };
        *count = op(*count, 1);
        self.bytes_done = op(self.bytes_done, t.bytes_done);
        self.bytes_total = op(self.bytes_total, t.bytes_total);
        if t.state == TargetState::Running {
            self.rate = op(self.rate, t.rate);
        }
    }

    fn total(&self) -> u64 {
        self.pending + self.running + self.done + self.failed + self.cancelled
    }
}

impl Job {
    pub fn new(record: pb::Job, deadline: Option<SystemTime>) -> Self {
        Self {
            record,
            deadline,
            targets: BTreeMap::new(),
            rest: None,
            tally: Tally::default(),
            version: 0,
            stored: None,
            pass: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.record.job_id
    }

    /// Who created the job (`token:<name>`, `agent:<id>`, or empty).
    pub fn creator(&self) -> &str {
        &self.record.creator
    }

    pub fn state(&self) -> JobState {
        self.record.state()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state(),
            JobState::Done | JobState::Failed | JobState::Cancelled
        )
    }

    /// Bytes done and wanted over all targets.
    pub fn bytes(&self) -> (u64, u64) {
        let t = self.tally();
        (t.bytes_done, t.bytes_total)
    }

    /// The counts and bytes of all targets, built or not.
    fn tally(&self) -> Tally {
        let mut t = self.tally;
        if let Some(rest) = &self.rest {
            t.pending += rest.pending();
            t.bytes_total += rest.bytes();
        }
        t
    }

    /// The targets built (see [`Job::keys`] for all of them).
    pub fn targets(&self) -> impl Iterator<Item = (&TargetKey, &Target)> {
        self.targets.iter()
    }

    /// Every target's (agent, blob), built or not, and whether it has ended.
    pub fn keys(&self) -> impl Iterator<Item = (&str, Digest, bool)> {
        let built = (self.targets.iter()).map(|((a, b), t)| (a.as_str(), *b, t.is_terminal()));
        let rest = (self.rest.iter()).flat_map(|r| r.iter().map(|(a, b, _)| (a, b, false)));
        built.chain(rest)
    }

    /// The blobs it has targets of: its record's (every agent has a target of each), not
    /// a walk of 20,000 targets.
    pub fn blobs(&self) -> impl Iterator<Item = Digest> + '_ {
        (self.record.blobs.iter()).filter_map(|b| b.parse().ok())
    }

    /// Whether every target is built.
    pub fn is_built(&self) -> bool {
        self.rest.as_ref().is_none_or(Rest::all_built)
    }

    /// Whether a target is not wanted yet.
    pub fn wants_more(&self) -> bool {
        self.rest.is_some()
    }

    /// Whether `agent` has a target not built yet.
    pub fn waits_to_build(&self, agent: &str) -> bool {
        self.rest.as_ref().is_some_and(|r| r.has_agent(agent))
    }

    /// Its targets, to be built as they are wanted ([`Job::want_next`]).
    pub fn plan(&mut self, rest: Rest) {
        self.rest = (!rest.all_wanted()).then_some(rest);
    }

    /// Builds the next target not built yet, done already if `held` says its agent holds
    /// the blob (done at creation: it has no end time, as it had when targets were built
    /// with their job); false once all are built. A target built done changes the job's
    /// version (the record and the watchers show it); a pending one does not (they showed
    /// it pending already).
    pub fn build_next(&mut self, held: &dyn Fn(HostId, Digest) -> bool) -> bool {
        self.build(held).is_some()
    }

    /// [`Job::build_next`]: whether the target built was done; `None` if none was left.
    fn build(&mut self, held: &dyn Fn(HostId, Digest) -> bool) -> Option<bool> {
        let (host, key, size) = self.rest.as_mut().and_then(Rest::build)?;
        let done = held(host, key.1);
        let mut target = Target::new(size, done);
        if done {
            self.version += 1;
            target.version = self.version;
        }
        self.add_target(key, target);
        Some(done)
    }

    /// The next target not wanted yet, built first if it is not: its host, blob, and
    /// whether it is still open (`held` tells whether its agent holds the blob already).
    /// `None` once all are wanted.
    pub fn want_next(
        &mut self,
        held: &dyn Fn(HostId, Digest) -> bool,
    ) -> Option<(HostId, Digest, bool)> {
        let rest = self.rest.as_mut()?;
        if rest.all_wanted() {
            self.rest = None;
            return None;
        }
        // Built now, open unless done at once; or built earlier (a cancel, a deadline or a
        // lost agent builds them all), and it may have ended since.
        let built_now = if rest.next_is_built() {
            None
        } else {
            Some(self.build(held)?)
        };
        let rest = self.rest.as_mut()?;
        let (host, agent, blob) = rest.want()?;
        let open = match built_now {
            Some(done) => !done,
            None => {
                (self.targets.get(&(agent.to_string(), blob))).is_some_and(|t| !t.is_terminal())
            }
        };
        if rest.all_wanted() {
            self.rest = None;
        }
        Some((host, blob, open))
    }

    /// The blob's size is known: the targets not built yet carry it (the built ones take
    /// it as a transition).
    pub fn set_rest_size(&mut self, blob: &Digest, size: u64) {
        if let Some(rest) = &mut self.rest {
            rest.set_size(blob, size);
        }
    }

    /// The targets after `after` in key order (all of them if `None`).
    pub fn targets_after(
        &self,
        after: Option<&TargetKey>,
    ) -> impl Iterator<Item = (&TargetKey, &Target)> {
        targets_after(&self.targets, after)
    }

    /// Adds a target while the job is built.
    pub fn add_target(&mut self, key: TargetKey, target: Target) {
        self.tally.add(&target);
        if let Some(old) = self.targets.insert(key, target) {
            self.tally.remove(&old);
        }
    }

    /// Applies a transition to one target; true if anything changed (the job's version
    /// then grows and the target carries it).
    /// A target that ends now records `now` as its end.
    pub fn apply(&mut self, key: &TargetKey, t: Transition<'_>, now: SystemTime) -> bool {
        let Some(target) = self.targets.get_mut(key) else {
            return false;
        };
        let before = target.clone();
        match t {
            Transition::Start => target.start(),
            Transition::Progress { bytes_done, rate } => target.progress(bytes_done, rate),
            Transition::SetTotal(n) => target.set_total(n),
            Transition::Finish => target.finish(),
            Transition::Fail(reason, message) => target.fail(reason, message),
            Transition::Cancel(message) => target.cancel(message),
        }
        if target.is_terminal() && !before.is_terminal() {
            target.ended_at = Some(now);
        }
        self.bump(key, before)
    }

    /// Resumes a target its agent lost; true if it still needs the blob.
    pub fn resume(&mut self, key: &TargetKey) -> bool {
        let Some(target) = self.targets.get_mut(key) else {
            return false;
        };
        let before = target.clone();
        let open = target.resume();
        if !target.is_terminal() {
            target.ended_at = None;
        }
        self.bump(key, before);
        open
    }

    fn bump(&mut self, key: &TargetKey, before: Target) -> bool {
        let Some(target) = self.targets.get_mut(key) else {
            return false;
        };
        if *target == before {
            return false;
        }
        self.tally.remove(&before);
        self.tally.add(target);
        self.version += 1;
        target.version = self.version;
        true
    }

    /// Recomputes the aggregate state; returns true if it became terminal just now.
    pub fn refresh_state(&mut self, now: SystemTime) -> bool {
        if self.is_terminal() {
            return false;
        }
        let t = &self.tally();
        let state = if t.done == t.total() {
            JobState::Done
        } else if t.pending + t.running == 0 {
            JobState::Failed
        } else if t.pending < t.total() {
            JobState::Running
        } else {
            JobState::Pending
        };
        self.set_state(state, now)
    }

    /// Sets the aggregate state; returns true if it became terminal just now.
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

    /// Aggregate progress; with `with_targets`, the targets changed after `since` (0: all,
    /// built or not).
    pub fn progress(&self, with_targets: bool, since: u64, now: SystemTime) -> pb::JobProgress {
        let t = &self.tally();
        let counts = pb::TargetCounts {
            total: t.total() as u32,
            pending: t.pending as u32,
            running: t.running as u32,
            done: t.done as u32,
            failed: t.failed as u32,
            cancelled: t.cancelled as u32,
        };
        let (done, total, rate) = (t.bytes_done, t.bytes_total, t.rate);
        let mut names = BlobNames::default();
        let mut targets: Vec<pb::TargetProgress> = (self.targets.iter())
            .filter(|_| with_targets)
            .filter(|(_, t)| since == 0 || t.version > since)
            .map(|(key, t)| target_pb(key, t, &mut names))
            .collect();
        if with_targets && since == 0 {
            for (agent, blob, size) in self.rest.iter().flat_map(Rest::iter) {
                let key = (agent.to_string(), blob);
                targets.push(target_pb(&key, &Target::new(size, false), &mut names));
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

    /// The record as persisted (targets optional). The API returns
    /// [`Job::to_pb_redacted`].
    pub fn to_pb(&self, with_targets: bool, now: SystemTime) -> pb::Job {
        let mut job = self.record.clone();
        job.progress = Some(self.progress(with_targets, 0, now));
        job
    }

    /// The record as GetJob and ListJobs return it: [`Job::to_pb`] with every origin
    /// header's value replaced (they may be credentials; the names stay, so a caller can
    /// see which headers a job carries), and the URL's credentials too.
    pub fn to_pb_redacted(&self, with_targets: bool, now: SystemTime) -> pb::Job {
        let mut job = self.to_pb(with_targets, now);
        hide_header_values(&mut job);
        for origin in job.origins.values_mut() {
            if let Some(pb::origin::Origin::Http(h)) = &mut origin.origin {
                h.url = redacted_url(&h.url);
            }
        }
        job
    }

    /// The record as the database keeps it: every origin header's value replaced (they may
    /// be credentials, and secrets have no business at rest in a job record). A job read
    /// back after a restart has lost them: its seeds go without (see [`Job::from_pb`]).
    ///
    /// Every target is in it, those not built yet by rule (the writer lists them); what is
    /// stored afterwards are changes (`record_changes`).
    pub fn record_whole(&mut self, now: SystemTime) -> JobRecord {
        let mut names = BlobNames::default();
        let built = (self.targets.iter())
            .map(|(key, t)| target_pb(key, t, &mut names))
            .collect();
        let mut record = self.header_with(built, now);
        record.whole = true;
        record.pending = (self.rest.as_ref())
            .filter(|r| !r.all_built())
            .map(Rest::record);
        self.stored = Some(self.version);
        self.pass = None;
        record
    }

    /// [`Job::record_whole`] with only the targets changed since the last record handed to
    /// the writer (the database keeps the others in its log of changes, and folds the log
    /// itself when it grows: `crate::db`), or all of them if none was.
    pub fn record_changes(&mut self, now: SystemTime) -> JobRecord {
        let Some(stored) = self.stored else {
            return self.record_whole(now);
        };
        // Behind a pass under way, what changed since it began; ahead of it, since `stored`.
        let pass = self.pass.take();
        let mut names = BlobNames::default();
        let changed: Vec<pb::TargetProgress> = (self.targets.iter())
            .filter(|(key, t)| match &pass {
                Some((upto, after)) if *key <= after => t.version > *upto,
                _ => t.version > stored,
            })
            .map(|(key, t)| target_pb(key, t, &mut names))
            .collect();
        self.stored = Some(self.version);
        self.header_with(changed, now)
    }

    /// [`Job::record_changes`] a slice at a time: the changed ones among the next `limit`
    /// targets, and whether the pass over them all is done. The changes a pass has not
    /// reached yet stay unstored until it does; a target changed behind it is written by
    /// the next pass. The periodic flush takes these, so that the changes of a
    /// 20,000-target wave are not built all at once on the state task (~25 ms).
    pub fn record_some_changes(&mut self, limit: usize, now: SystemTime) -> (JobRecord, bool) {
        let Some(stored) = self.stored else {
            return (self.record_whole(now), true);
        };
        let (upto, after) = match self.pass.take() {
            Some((upto, after)) => (upto, Some(after)),
            None => (self.version, None),
        };
        let mut scanned = 0;
        let mut last = None;
        let mut changed = Vec::new();
        let mut names = BlobNames::default();
        for (key, t) in targets_after(&self.targets, after.as_ref()).take(limit) {
            scanned += 1;
            last = Some(key);
            if t.version > stored {
                changed.push(target_pb(key, t, &mut names));
            }
        }
        let done = scanned < limit;
        match last {
            Some(key) if !done => self.pass = Some((upto, key.clone())),
            _ => self.stored = Some(upto),
        }
        (self.header_with(changed, now), done)
    }

    /// The job's record without its header values, with `targets`.
    fn header_with(&self, targets: Vec<pb::TargetProgress>, now: SystemTime) -> JobRecord {
        let mut job = self.to_pb(false, now);
        hide_header_values(&mut job);
        JobRecord {
            job,
            targets,
            whole: false,
            pending: None,
        }
    }

    /// A write of this job failed: the next one writes it whole.
    pub fn forget_stored(&mut self) {
        self.stored = None;
        self.pass = None;
    }

    /// Rebuilds a job from its persisted record. Running targets go back to pending: their
    /// agents will report what they hold when they reconnect.
    pub fn from_pb(mut record: pb::Job) -> Option<Self> {
        let progress = record.progress.take()?;
        // Header values were not stored (`record_whole`): seeds after the restart go
        // without them rather than with the placeholder.
        for (blob, origin) in &mut record.origins {
            if let Some(pb::origin::Origin::Http(h)) = &mut origin.origin {
                let lost: Vec<String> = (h.headers.iter())
                    .filter(|(_, v)| *v == REDACTED)
                    .map(|(k, _)| k.clone())
                    .collect();
                if !lost.is_empty() {
                    tracing::warn!(job = record.job_id, blob, headers = ?lost, "a job's origin headers are not kept across a restart: its seeds go without them (configure [[origin.http]] on the agents for credentials that last)");
                    h.headers.retain(|_, v| v != REDACTED);
                }
            }
        }
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
            job.add_target(
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
                    ended_at: (t.finished_at)
                        .filter(|_| state != TargetState::Pending)
                        .and_then(|at| SystemTime::try_from(at).ok()),
                },
            );
        }
        Some(job)
    }
}

/// The entries of `map` after `after` in key order (all of them if `None`).
pub fn targets_after<'a, V>(
    map: &'a BTreeMap<TargetKey, V>,
    after: Option<&TargetKey>,
) -> impl Iterator<Item = (&'a TargetKey, &'a V)> {
    use std::ops::Bound;
    let from = after.map_or(Bound::Unbounded, |k| Bound::Excluded(k.clone()));
    map.range((from, Bound::Unbounded))
}

/// The names of a job's few blobs, each written out once per record: 20,000 targets'
/// digests formatted one by one were a quarter of a big job's record.
#[derive(Default)]
struct BlobNames(Vec<(Digest, String)>);

impl BlobNames {
    fn of(&mut self, blob: &Digest) -> String {
        if let Some((_, name)) = self.0.iter().find(|(d, _)| d == blob) {
            return name.clone();
        }
        let name = blob.to_string();
        self.0.push((*blob, name.clone()));
        name
    }
}

/// One target as the API and the database see it.
fn target_pb((agent, blob): &TargetKey, t: &Target, names: &mut BlobNames) -> pb::TargetProgress {
    pb::TargetProgress {
        agent_id: agent.clone(),
        blob: names.of(blob),
        state: t.state as i32,
        reason: t.reason as i32,
        message: t.message.clone(),
        bytes_done: t.bytes_done,
        bytes_total: t.bytes_total,
        rate_bytes_per_sec: t.rate,
        eta_ms: eta_ms(t.bytes_total - t.bytes_done.min(t.bytes_total), t.rate),
        finished_at: t.ended_at.map(Into::into),
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
mod tests;
