//! Durable state in one redb file: the blob catalog, the jobs, the order-id counter and
//! the hashes of agents' secrets. Everything else is soft, rebuilt when agents reconnect.
//!
//! The state reads it once, at startup; from then on only the writer (`crate::writer`)
//! touches it, with [`Db::apply`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use prost::Message as _;
use redb::{Database, ReadableTable, TableDefinition};
use shoal_proto::pb::v1 as pb;

const BLOBS: TableDefinition<'_, &[u8], &[u8]> = TableDefinition::new("blobs");
/// Job id -> the job without its targets (`Job { progress: JobProgress { targets: [] } }`).
const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
/// (job id, sequence) -> [`StoredTargets`]: a job's targets as a log. A job's record
/// written whole replaces its log with one entry; a flush appends one entry holding only
/// the targets that changed. Loading replays the entries in order, the last word on each
/// (agent, blob) winning. So a write costs one row however many targets a job has: the
/// 20,000 rows a big job's creation wrote one by one cost a commit of 125-170 ms, on the
/// path of the Distribute's answer.
const JOB_LOG: TableDefinition<'_, (&str, u64), &[u8]> = TableDefinition::new("job_log");
/// (job id, agent id, blob) -> that target's `TargetProgress`: how targets were stored
/// before [`JOB_LOG`]. `Db::open` moves its rows into the log and deletes it.
const JOB_TARGETS: TableDefinition<'_, (&str, &str, &str), &[u8]> =
    TableDefinition::new("job_targets");
/// Small named values: `order_ceiling`, the order id no order of this state reaches.
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
const ORDER_CEILING: &str = "order_ceiling";
/// Agent id -> SHA-256 of the secret issued with it (the proof a rejoin under that id needs).
const AGENT_SECRETS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("agent_secrets");
/// Agent ids an operator removed -> when (Unix seconds): their certificates are revoked and
/// the ids are never given back.
const REVOKED_AGENTS: TableDefinition<'_, &str, u64> = TableDefinition::new("revoked_agents");

#[derive(Clone, Debug, thiserror::Error)]
#[error("coordinator state database: {0}")]
pub struct DbError(String);

impl DbError {
    pub fn from_message(message: &str) -> Self {
        Self(message.to_string())
    }
}

fn err(e: impl std::fmt::Display) -> DbError {
    DbError(e.to_string())
}

/// A row that does not decode (a bit flipped on disk, a write from a newer version) costs
/// that row, not the coordinator's start: it is logged and counted, and left in place for
/// inspection (a later write of the same key replaces it).
fn bad_row(table: &str, key: &str, e: &prost::DecodeError) {
    tracing::error!(table, key, error = %e, "skipping a row of the state database that does not decode");
    metrics::counter!(crate::metrics::BAD_ROWS, "table" => table.to_string()).increment(1);
}

/// A catalog entry as stored: the manifest and who registered it when.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredBlob {
    #[prost(message, optional, tag = "1")]
    pub manifest: Option<pb::Manifest>,
    #[prost(string, tag = "2")]
    pub registered_by: String,
    #[prost(message, optional, tag = "3")]
    pub registered_at: Option<prost_types::Timestamp>,
    /// Only its registrant vouches for it so far (rows written before this field were
    /// all confirmed).
    #[prost(bool, tag = "4")]
    pub unconfirmed: bool,
}

/// One entry of a job's target log ([`JOB_LOG`]).
#[derive(Clone, PartialEq, prost::Message)]
struct StoredTargets {
    #[prost(message, repeated, tag = "1")]
    targets: Vec<pb::TargetProgress>,
}

/// A job to write: its header (`job`, its progress without targets) and all its targets
/// (`whole`) or those changed since its last record (the database keeps the others). The
/// two apart, so that the writer encodes each as it is: a 20,000-target job's first record
/// used to be copied twice on the way (~2 MB of strings), on the path of its Distribute's
/// answer.
#[derive(Clone, Debug)]
pub struct JobRecord {
    pub job: pb::Job,
    pub targets: Vec<pb::TargetProgress>,
    pub whole: bool,
    /// With `whole`: targets listed by rule, not one by one (written before `targets`,
    /// which have the last word on any target both name).
    pub pending: Option<PendingTargets>,
}

/// A job's targets not built yet, as its whole record lists them: each of `agents` with
/// each of `blobs` (digest, size), from the `from`th on, in that order, all pending. The
/// writer expands them, so that a 20,000-target Distribute's first record is not built on
/// the state task.
#[derive(Clone, Debug)]
pub struct PendingTargets {
    pub agents: std::sync::Arc<[String]>,
    pub blobs: Vec<(String, u64)>,
    pub from: usize,
}

impl PendingTargets {
    /// Where a job's `i`th target sits when each agent wants `blobs` blobs: (its agent's
    /// index, its blob's index). Targets go agent by agent, each agent's blobs in order; the
    /// state's job builds them in the same order (`state::job::Rest`).
    pub fn place(i: usize, blobs: usize) -> (usize, usize) {
        let per_agent = blobs.max(1);
        (i / per_agent, i % per_agent)
    }

    fn len(&self) -> usize {
        (self.agents.len() * self.blobs.len()).saturating_sub(self.from)
    }

    fn expand(&self) -> impl Iterator<Item = pb::TargetProgress> + '_ {
        (self.from..self.agents.len() * self.blobs.len()).map(move |i| {
            let (agent, blob) = Self::place(i, self.blobs.len());
            let (blob, size) = &self.blobs[blob];
            pb::TargetProgress {
                agent_id: self.agents[agent].clone(),
                blob: blob.clone(),
                state: pb::TargetState::Pending as i32,
                bytes_total: *size,
                ..Default::default()
            }
        })
    }
}

impl JobRecord {
    /// The record of `job`, its targets taken out of its progress.
    pub fn new(mut job: pb::Job, whole: bool) -> JobRecord {
        let targets = (job.progress.as_mut())
            .map(|p| std::mem::take(&mut p.targets))
            .unwrap_or_default();
        JobRecord {
            job,
            targets,
            whole,
            pending: None,
        }
    }

    /// How many targets it lists.
    fn listed(&self) -> usize {
        self.targets.len() + self.pending.as_ref().map_or(0, PendingTargets::len)
    }
}

/// One change to the database. The writer (`crate::writer`) applies the changes queued
/// at once in one transaction, in the order they were queued.
#[derive(Clone, Debug)]
pub enum Write {
    /// Jobs: each header, and the targets it lists (see [`JobRecord`]).
    Jobs(Vec<JobRecord>),
    ForgetJob(String),
    Blob([u8; 32], StoredBlob),
    ForgetBlob([u8; 32]),
    /// Reserves order ids below this: once stored, no later run issues them.
    OrderCeiling(u64),
    /// Agent id and the SHA-256 of the secret issued with it.
    AgentSecret(String, [u8; 32]),
    /// Agent id removed by an operator, and when (Unix seconds): its secret is forgotten.
    RevokeAgent(String, u64),
}

#[derive(Debug)]
pub struct Db {
    db: Database,
    /// Per job, how big its log is (see [`fold_log`]); a job missing here is folded at its
    /// next write of changes, which counts it.
    logs: std::sync::Mutex<HashMap<String, LogSize>>,
    #[cfg(test)]
    faults: std::sync::Arc<Faults>,
}

/// Tests only: a disk that is slow, or that fails.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Faults {
    /// Each commit first sleeps this many milliseconds.
    pub commit_delay_ms: std::sync::atomic::AtomicU64,
    /// Each commit fails (after the delay), as an I/O error would: nothing is written.
    pub fail_commits: std::sync::atomic::AtomicBool,
    /// Commits wait while this is set: a disk that answers when the test says so.
    pub hold_commits: std::sync::atomic::AtomicBool,
}

impl Db {
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let db = Database::create(path).map_err(err)?;
        let txn = db.begin_write().map_err(err)?;
        txn.open_table(BLOBS).map_err(err)?;
        txn.open_table(JOBS).map_err(err)?;
        txn.open_table(JOB_LOG).map_err(err)?;
        move_embedded_targets(&txn)?;
        move_target_rows(&txn)?;
        txn.open_table(META).map_err(err)?;
        txn.open_table(AGENT_SECRETS).map_err(err)?;
        txn.open_table(REVOKED_AGENTS).map_err(err)?;
        txn.commit().map_err(err)?;
        Ok(Self {
            db,
            logs: Default::default(),
            #[cfg(test)]
            faults: Default::default(),
        })
    }

    /// Tests only: the faults of this handle's disk, to set while it runs.
    #[cfg(test)]
    pub fn faults(&self) -> std::sync::Arc<Faults> {
        self.faults.clone()
    }

    /// Applies `writes` in order in one transaction, and commits it durably (redb's
    /// default: fsync before it returns). All or none.
    pub fn apply<'a>(&self, writes: impl IntoIterator<Item = &'a Write>) -> Result<(), DbError> {
        let txn = self.db.begin_write().map_err(err)?;
        let mut shared = (self.logs.lock())
            .map_err(|_| DbError::from_message("the job logs' sizes were poisoned"))?;
        // The sizes this transaction leaves the logs with (`None`: forgotten), kept only if
        // it commits.
        let mut logs: HashMap<String, Option<LogSize>> = HashMap::new();
        {
            let mut blobs = txn.open_table(BLOBS).map_err(err)?;
            let mut jobs = txn.open_table(JOBS).map_err(err)?;
            let mut log = txn.open_table(JOB_LOG).map_err(err)?;
            let mut meta = txn.open_table(META).map_err(err)?;
            let mut secrets = txn.open_table(AGENT_SECRETS).map_err(err)?;
            let mut revoked = txn.open_table(REVOKED_AGENTS).map_err(err)?;
            for write in writes {
                match write {
                    Write::Jobs(list) => {
                        for record in list {
                            put_job(&mut jobs, &mut log, record)?;
                            let id = &record.job.job_id;
                            let listed = record.listed();
                            let size = if record.whole {
                                Some(LogSize {
                                    targets: listed,
                                    logged: listed,
                                })
                            } else {
                                let before = match logs.get(id) {
                                    Some(s) => *s,
                                    None => shared.get(id).copied(),
                                };
                                before.map(|s| LogSize {
                                    logged: s.logged + listed,
                                    ..s
                                })
                            };
                            let size = match size {
                                Some(s) if !s.outgrown() => s,
                                _ => {
                                    let targets = fold_log(&mut log, id)?;
                                    LogSize {
                                        targets,
                                        logged: targets,
                                    }
                                }
                            };
                            logs.insert(id.clone(), Some(size));
                        }
                    }
                    Write::ForgetJob(id) => {
                        jobs.remove(id.as_str()).map_err(err)?;
                        clear_log(&mut log, id)?;
                        logs.insert(id.clone(), None);
                    }
                    Write::Blob(digest, blob) => {
                        let bytes = blob.encode_to_vec();
                        blobs.insert(&digest[..], &bytes[..]).map_err(err)?;
                    }
                    Write::ForgetBlob(digest) => {
                        blobs.remove(&digest[..]).map_err(err)?;
                    }
                    Write::OrderCeiling(ceiling) => {
                        meta.insert(ORDER_CEILING, *ceiling).map_err(err)?;
                    }
                    Write::AgentSecret(id, hash) => {
                        secrets.insert(id.as_str(), &hash[..]).map_err(err)?;
                    }
                    Write::RevokeAgent(id, at) => {
                        secrets.remove(id.as_str()).map_err(err)?;
                        revoked.insert(id.as_str(), *at).map_err(err)?;
                    }
                }
            }
        }
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::Relaxed;
            let ms = self.faults.commit_delay_ms.load(Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            while self.faults.hold_commits.load(Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            if self.faults.fail_commits.load(Relaxed) {
                return Err(err("injected I/O error"));
            }
        }
        txn.commit().map_err(err)?;
        for (id, size) in logs {
            match size {
                Some(size) => shared.insert(id, size),
                None => shared.remove(&id),
            };
        }
        Ok(())
    }

    /// The order-id ceiling last reserved, if any was.
    pub fn order_ceiling(&self) -> Result<Option<u64>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(META).map_err(err)?;
        Ok(table.get(ORDER_CEILING).map_err(err)?.map(|v| v.value()))
    }

    /// Every agent id a secret was issued with, and the secret's hash. A row of the wrong
    /// length still says a secret was issued: no secret matches it (never "none on
    /// record", which would let the next claimer take the id).
    pub fn agent_secrets(&self) -> Result<Vec<(String, [u8; 32])>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(AGENT_SECRETS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let hash = <[u8; 32]>::try_from(v.value()).unwrap_or([0; 32]);
            out.push((k.value().to_string(), hash));
        }
        Ok(out)
    }

    /// The agent ids an operator removed.
    pub fn revoked_agents(&self) -> Result<Vec<String>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(REVOKED_AGENTS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            out.push(row.map_err(err)?.0.value().to_string());
        }
        Ok(out)
    }

    pub fn blobs(&self) -> Result<Vec<StoredBlob>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let table = txn.open_table(BLOBS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match StoredBlob::decode(v.value()) {
                Ok(blob) => out.push(blob),
                Err(e) => bad_row("blobs", &hex::encode(k.value()), &e),
            }
        }
        Ok(out)
    }

    /// Every job with its targets.
    pub fn jobs(&self) -> Result<Vec<pb::Job>, DbError> {
        let txn = self.db.begin_read().map_err(err)?;
        let mut by_job: BTreeMap<String, LastWords> = BTreeMap::new();
        let log = txn.open_table(JOB_LOG).map_err(err)?;
        for row in log.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (job, seq) = k.value();
            let targets = by_job.entry(job.to_string()).or_default();
            take_in(targets, job, seq, v.value());
        }
        let table = txn.open_table(JOBS).map_err(err)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            match pb::Job::decode(v.value()) {
                Ok(mut job) => {
                    if let (Some(p), Some(targets)) =
                        (job.progress.as_mut(), by_job.remove(&job.job_id))
                    {
                        p.targets.extend(targets.into_values());
                    }
                    out.push(job)
                }
                Err(e) => bad_row("jobs", k.value(), &e),
            }
        }
        Ok(out)
    }
}

/// Writes a job's row without its targets, and its targets as an entry of its log: the
/// only one if `whole`, else after the others.
fn put_job(
    jobs: &mut redb::Table<'_, &str, &[u8]>,
    log: &mut redb::Table<'_, (&str, u64), &[u8]>,
    record: &JobRecord,
) -> Result<(), DbError> {
    let id = record.job.job_id.as_str();
    let seq = if record.whole {
        clear_log(log, id)?;
        0
    } else {
        next_seq(log, id)?
    };
    if record.whole || !record.targets.is_empty() {
        // The listed targets after those by rule: theirs is the last word.
        let mut entry = Vec::new();
        for t in record.pending.iter().flat_map(PendingTargets::expand) {
            encode_target(&t, &mut entry);
        }
        for t in &record.targets {
            encode_target(t, &mut entry);
        }
        log.insert((id, seq), &entry[..]).map_err(err)?;
    }
    jobs.insert(id, &record.job.encode_to_vec()[..])
        .map_err(err)?;
    Ok(())
}

/// `StoredTargets { targets }` encoded, without a copy of `targets` to put in one.
fn encode_targets(targets: &[pb::TargetProgress]) -> Vec<u8> {
    use prost::encoding::message;
    let mut buf = Vec::with_capacity(message::encoded_len_repeated(1, targets));
    for t in targets {
        encode_target(t, &mut buf);
    }
    buf
}

/// Appends one target to a log entry (a repeated field 1, as [`encode_targets`] writes).
fn encode_target(target: &pb::TargetProgress, buf: &mut Vec<u8>) {
    prost::encoding::message::encode(1, target, buf);
}

/// The sequence number after the last entry of job `id`'s log (0 if it has none).
fn next_seq(log: &redb::Table<'_, (&str, u64), &[u8]>, id: &str) -> Result<u64, DbError> {
    let last = (log.range((id, 0)..=(id, u64::MAX)).map_err(err)?)
        .next_back()
        .transpose()
        .map_err(err)?
        .map(|(k, _)| k.value().1);
    Ok(last.map_or(0, |s| s + 1))
}

/// How big a job's log is: the targets of the job (as of its last fold or whole write) and
/// the target records its entries hold.
#[derive(Clone, Copy, Debug)]
struct LogSize {
    targets: usize,
    logged: usize,
}

/// A job's log is folded once it holds more than this many times the job's targets (and
/// 64), so that a job's writes of changes do not grow the file without end.
const LOG_BEYOND_WHOLE: usize = 2;

impl LogSize {
    fn outgrown(&self) -> bool {
        self.logged > LOG_BEYOND_WHOLE * self.targets + 64
    }
}

/// Folds job `id`'s log into one entry, each target's last word (as [`Db::jobs`] reads
/// it); returns how many targets it holds. Here, on the writer's thread: the state task
/// used to send the whole job instead, every target of a 20,000-target job built at once in
/// the middle of its wave.
fn fold_log(log: &mut redb::Table<'_, (&str, u64), &[u8]>, id: &str) -> Result<usize, DbError> {
    let mut targets = LastWords::new();
    for row in log.range((id, 0)..=(id, u64::MAX)).map_err(err)? {
        let (k, v) = row.map_err(err)?;
        take_in(&mut targets, id, k.value().1, v.value());
    }
    clear_log(log, id)?;
    let targets: Vec<pb::TargetProgress> = targets.into_values().collect();
    log.insert((id, 0), &encode_targets(&targets)[..])
        .map_err(err)?;
    Ok(targets.len())
}

/// A job's targets, each (agent, blob)'s last word, in key order.
type LastWords = BTreeMap<(String, String), pb::TargetProgress>;

/// Takes in entry `seq` of job `id`'s log: each target it lists replaces its earlier word.
/// An entry that does not decode is skipped (and counted).
fn take_in(targets: &mut LastWords, id: &str, seq: u64, entry: &[u8]) {
    match StoredTargets::decode(entry) {
        Ok(entry) => {
            for t in entry.targets {
                targets.insert((t.agent_id.clone(), t.blob.clone()), t);
            }
        }
        Err(e) => bad_row("job_log", &format!("{id}/{seq}"), &e),
    }
}

/// Removes every entry of job `id`'s log.
fn clear_log(log: &mut redb::Table<'_, (&str, u64), &[u8]>, id: &str) -> Result<(), DbError> {
    log.retain_in((id, 0)..=(id, u64::MAX), |_, _| false)
        .map_err(err)
}

/// Jobs stored with their targets in their own row (before target rows): the targets move
/// to the job's log, so that a later flush of only the changed ones loses none.
fn move_embedded_targets(txn: &redb::WriteTransaction) -> Result<(), DbError> {
    let mut jobs = txn.open_table(JOBS).map_err(err)?;
    let mut log = txn.open_table(JOB_LOG).map_err(err)?;
    let mut embedded = Vec::new();
    for row in jobs.iter().map_err(err)? {
        let (_, v) = row.map_err(err)?;
        if let Ok(job) = pb::Job::decode(v.value())
            && job.progress.as_ref().is_some_and(|p| !p.targets.is_empty())
        {
            embedded.push(JobRecord::new(job, true));
        }
    }
    for record in &embedded {
        put_job(&mut jobs, &mut log, record)?;
    }
    Ok(())
}

/// Targets stored a row each ([`JOB_TARGETS`], before the log): each job's rows become
/// one entry of its log, and the table goes.
fn move_target_rows(txn: &redb::WriteTransaction) -> Result<(), DbError> {
    let mut by_job: BTreeMap<String, Vec<pb::TargetProgress>> = BTreeMap::new();
    {
        let rows = txn.open_table(JOB_TARGETS).map_err(err)?;
        for row in rows.iter().map_err(err)? {
            let (k, v) = row.map_err(err)?;
            let (job, agent, blob) = k.value();
            match pb::TargetProgress::decode(v.value()) {
                Ok(t) => by_job.entry(job.to_string()).or_default().push(t),
                Err(e) => bad_row("job_targets", &format!("{job}/{agent}/{blob}"), &e),
            }
        }
    }
    let mut log = txn.open_table(JOB_LOG).map_err(err)?;
    for (id, targets) in by_job {
        // After what the log holds already (nothing, unless an earlier open was cut off).
        let seq = next_seq(&log, &id)?;
        log.insert((id.as_str(), seq), &encode_targets(&targets)[..])
            .map_err(err)?;
    }
    drop(log);
    txn.delete_table(JOB_TARGETS).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests;
