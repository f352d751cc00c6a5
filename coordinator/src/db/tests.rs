//! The database's own tests: rows, logs of changes, folds, and what a bad row costs.

use super::*;

/// A row that does not decode is skipped; the others load, and the database still
/// opens and writes.
#[test]
fn a_bad_row_costs_only_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let db = Db::open(&path).expect("open");
    let job = pb::Job {
        job_id: "job-good".into(),
        ..Default::default()
    };
    db.apply(&[Write::Jobs(vec![whole(job)])]).expect("put");
    let blob = StoredBlob {
        registered_by: "a".into(),
        ..Default::default()
    };
    db.apply(&[Write::Blob([1; 32], blob.clone())])
        .expect("put");
    {
        // What a flipped bit or a newer writer leaves: bytes that are no protobuf.
        let txn = db.db.begin_write().expect("txn");
        txn.open_table(JOBS)
            .expect("jobs")
            .insert("job-bad", &[0xff, 0xff, 0xff][..])
            .expect("insert");
        txn.open_table(BLOBS)
            .expect("blobs")
            .insert(&[2u8; 32][..], &[0x0a, 0x7f][..])
            .expect("insert");
        txn.commit().expect("commit");
    }
    drop(db);
    let db = Db::open(&path).expect("reopen");
    let jobs = db.jobs().expect("jobs load");
    assert_eq!(
        jobs.iter().map(|j| j.job_id.as_str()).collect::<Vec<_>>(),
        ["job-good"]
    );
    let blobs = db.blobs().expect("blobs load");
    assert_eq!(blobs, vec![blob]);
    let job = pb::Job {
        job_id: "job-bad".into(),
        ..Default::default()
    };
    (db.apply(&[Write::Jobs(vec![whole(job)])])).expect("the bad row's key is written over");
    assert_eq!(db.jobs().expect("jobs").len(), 2);
}

fn target(agent: &str, bytes_done: u64) -> pb::TargetProgress {
    pb::TargetProgress {
        agent_id: agent.into(),
        blob: "sha256:00".into(),
        bytes_done,
        ..Default::default()
    }
}

fn job(id: &str, targets: Vec<pb::TargetProgress>) -> pb::Job {
    pb::Job {
        job_id: id.into(),
        progress: Some(pb::JobProgress {
            targets,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The targets of a job as loaded: (agent, bytes done).
fn loaded(db: &Db, id: &str) -> Vec<(String, u64)> {
    let jobs = db.jobs().expect("load");
    let job = jobs.iter().find(|j| j.job_id == id).expect("job");
    let p = job.progress.as_ref().expect("progress");
    (p.targets.iter())
        .map(|t| (t.agent_id.clone(), t.bytes_done))
        .collect()
}

fn whole(job: pb::Job) -> JobRecord {
    JobRecord::new(job, true)
}

fn changes(job: pb::Job) -> JobRecord {
    JobRecord::new(job, false)
}

/// The entries of job `id`'s log.
fn log_entries(db: &Db, id: &str) -> usize {
    let txn = db.db.begin_read().expect("txn");
    let log = txn.open_table(JOB_LOG).expect("log");
    log.range((id, 0)..=(id, u64::MAX)).expect("range").count()
}

/// The log's entries are written without a copy of their targets, and read back as
/// the message they always were.
#[test]
fn a_log_entry_is_encoded_as_its_message() {
    let targets = vec![target("a", 1), target("b", 2)];
    let bytes = encode_targets(&targets);
    assert_eq!(
        bytes,
        StoredTargets {
            targets: targets.clone()
        }
        .encode_to_vec()
    );
    assert_eq!(
        StoredTargets::decode(&bytes[..]).expect("decodes").targets,
        targets
    );
    assert!(encode_targets(&[]).is_empty());
}

/// A write lists the targets that changed; the others keep what was stored. A whole
/// write replaces the log with one entry, and forgetting the job removes it all.
#[test]
fn a_job_write_replaces_only_the_targets_it_lists() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(&dir.path().join("state.redb")).expect("open");
    let first = job("j", vec![target("a", 0), target("b", 0), target("c", 0)]);
    db.apply(&[Write::Jobs(vec![
        whole(first),
        whole(job("k", vec![target("a", 1)])),
    ])])
    .expect("put");
    db.apply(&[Write::Jobs(vec![changes(job("j", vec![target("b", 7)]))])])
        .expect("changes");
    db.apply(&[Write::Jobs(vec![changes(job("j", vec![]))])])
        .expect("a header alone");
    db.apply(&[Write::Jobs(vec![changes(job(
        "j",
        vec![target("c", 2), target("b", 8)],
    ))])])
    .expect("changes");
    assert_eq!(
        loaded(&db, "j"),
        [("a".into(), 0), ("b".into(), 8), ("c".into(), 2)],
        "each target's last word"
    );
    assert_eq!(log_entries(&db, "j"), 3, "one entry per write with targets");
    db.apply(&[Write::Jobs(vec![whole(job(
        "j",
        vec![target("a", 5), target("b", 8), target("c", 2)],
    ))])])
    .expect("whole");
    assert_eq!(log_entries(&db, "j"), 1, "a whole write replaces the log");
    db.apply(&[Write::Jobs(vec![changes(job("j", vec![target("a", 6)]))])])
        .expect("changes");
    assert_eq!(
        loaded(&db, "j"),
        [("a".into(), 6), ("b".into(), 8), ("c".into(), 2)]
    );
    db.apply(&[Write::ForgetJob("j".into())]).expect("forget");
    let ids: Vec<String> = db
        .jobs()
        .expect("load")
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(
        ids,
        ["k"],
        "the job and its targets are gone, the other stays"
    );
    assert_eq!(loaded(&db, "k"), [("a".into(), 1)]);
    assert_eq!(log_entries(&db, "j"), 0, "j's log is removed");
    assert_eq!(log_entries(&db, "k"), 1);
}

/// A job's log of changes is folded into one entry (each target's last word) once it
/// holds more than [`LOG_BEYOND_WHOLE`] times the job's targets (and 64), by the
/// database itself: the job only ever sends its changes. Also after a reopen, when the
/// sizes are not known.
#[test]
fn a_jobs_log_folds_itself_once_it_outgrows_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let db = Db::open(&path).expect("open");
    let three = || vec![target("a", 0), target("b", 0), target("c", 0)];
    db.apply(&[Write::Jobs(vec![whole(job("j", three()))])])
        .expect("whole");
    let bound = LOG_BEYOND_WHOLE * 3 + 64;
    let mut most = 0;
    for i in 1..=3 * bound as u64 {
        let one = changes(job("j", vec![target("b", i)]));
        db.apply(&[Write::Jobs(vec![one])]).expect("changes");
        most = most.max(log_entries(&db, "j"));
    }
    assert!(most <= bound - 3 + 2, "the log reached {most} entries");
    assert!(log_entries(&db, "j") < most, "it was folded");
    let last = 3 * bound as u64;
    assert_eq!(
        loaded(&db, "j"),
        [("a".into(), 0), ("b".into(), last), ("c".into(), 0)]
    );
    // Reopened, the database knows no sizes: the next write of changes folds.
    drop(db);
    let db = Db::open(&path).expect("reopen");
    db.apply(&[Write::Jobs(vec![changes(job("j", vec![target("c", 9)]))])])
        .expect("changes");
    assert_eq!(log_entries(&db, "j"), 1);
    assert_eq!(
        loaded(&db, "j"),
        [("a".into(), 0), ("b".into(), last), ("c".into(), 9)]
    );
}

/// Databases written before the log move to it when opened, so a later write of the
/// changed targets loses none: targets inside the job's row (the first format), and a
/// row per target (the second).
#[test]
fn targets_stored_the_older_ways_move_to_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("state.redb");
    let db = Db::open(&path).expect("open");
    {
        let embedded = job("j", vec![target("a", 3), target("b", 0)]);
        let header = job("k", vec![]);
        let txn = db.db.begin_write().expect("txn");
        let mut jobs = txn.open_table(JOBS).expect("jobs");
        jobs.insert("j", &embedded.encode_to_vec()[..])
            .expect("insert");
        jobs.insert("k", &header.encode_to_vec()[..])
            .expect("insert");
        let mut rows = txn.open_table(JOB_TARGETS).expect("rows");
        for t in [target("x", 4), target("y", 5)] {
            rows.insert(
                ("k", t.agent_id.as_str(), t.blob.as_str()),
                &t.encode_to_vec()[..],
            )
            .expect("insert");
        }
        drop((jobs, rows));
        txn.commit().expect("commit");
    }
    drop(db);
    let db = Db::open(&path).expect("reopen");
    db.apply(&[Write::Jobs(vec![
        changes(job("j", vec![target("b", 9)])),
        changes(job("k", vec![target("y", 6)])),
    ])])
    .expect("changes");
    assert_eq!(loaded(&db, "j"), [("a".into(), 3), ("b".into(), 9)]);
    assert_eq!(loaded(&db, "k"), [("x".into(), 4), ("y".into(), 6)]);
    let txn = db.db.begin_read().expect("txn");
    let tables: Vec<String> = (txn.list_tables().expect("tables"))
        .map(|t| redb::TableHandle::name(&t).to_string())
        .collect();
    assert!(!tables.contains(&"job_targets".to_string()), "{tables:?}");
}

/// A whole record's targets listed by rule are written as pending targets, each of its
/// blob's size, before those listed one by one, which have the last word on a target both
/// name.
#[test]
fn targets_listed_by_rule_are_expanded_and_the_listed_ones_win() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(&dir.path().join("state.redb")).expect("open");
    let mut record = whole(job("j", vec![target("b", 7)]));
    record.pending = Some(PendingTargets {
        agents: vec!["a".to_string(), "b".to_string(), "c".to_string()].into(),
        blobs: vec![("sha256:00".into(), 9), ("sha256:01".into(), 4)],
        // a × 00 is not listed by rule (built before the record).
        from: 1,
    });
    assert_eq!(record.listed(), 6);
    db.apply(&[Write::Jobs(vec![record])]).expect("put");
    let jobs = db.jobs().expect("load");
    let targets = &jobs[0].progress.as_ref().expect("progress").targets;
    let got: Vec<(&str, &str, u64, u64, pb::TargetState)> = (targets.iter())
        .map(|t| {
            let (a, b) = (t.agent_id.as_str(), t.blob.as_str());
            (a, b, t.bytes_done, t.bytes_total, t.state())
        })
        .collect();
    use pb::TargetState::{Pending, Unspecified};
    assert_eq!(
        got,
        [
            ("a", "sha256:01", 0, 4, Pending),
            ("b", "sha256:00", 7, 0, Unspecified),
            ("b", "sha256:01", 0, 4, Pending),
            ("c", "sha256:00", 0, 9, Pending),
            ("c", "sha256:01", 0, 4, Pending),
        ]
    );
}
