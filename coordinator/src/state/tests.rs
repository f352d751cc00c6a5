//! The state machine driven directly through [`State::step`] and
//! [`State::handle_timeout`], as the driver drives it, on a fake clock: no sleeps. Sessions
//! are plain channels, the database a real redb file in a temporary directory, written by
//! the real writer thread: an answer that waits for a write comes from it (see [`S::ask`]),
//! and dropping an [`S`] waits until every write queued is stored, as a restart would find
//! the file.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shoal_planner::{AssignerConfig, SeederConfig, Time};
use shoal_proto::pb::v1::{self as pb, agent_message::Msg, coordinator_message};
use shoal_proto::{Digest, Manifest};
use tokio::sync::{mpsc, oneshot};

use super::{ApiError, Now, Reply, Request, SessionId, State, StateConfig};
use crate::db::Db;

pub(crate) const TOKEN: &str = "t";

fn config(lease: Duration) -> StateConfig {
    StateConfig {
        join_token: TOKEN.into(),
        lease,
        heartbeat: lease / 4,
        job_retention: Duration::from_secs(3600),
        assigner: AssignerConfig::default(),
        seeder: SeederConfig {
            stripe_min_bytes: 8 << 10,
            max_seeders_per_blob: 4,
            ..SeederConfig::default()
        },
        seed: 7,
        // Every test's jobs stay under it; `one_job_cannot_create_more_targets_than_the_limit`
        // sets its own.
        max_targets_per_job: 10_000,
        trust_registrations: false,
        stranded_after: Duration::from_secs(30),
        certificate_validity: Some(Duration::from_secs(3600)),
    }
}

/// A state and its fake clock.
struct S {
    s: State,
    now: Now,
    /// The disk's faults, to set while the test runs.
    faults: Arc<crate::db::Faults>,
    /// Declared after `s`, so dropped after it: then every write it queued is stored.
    _writer: WriterDone,
}

/// Waits, when dropped, until the writer has stored its queue and closed the file.
struct WriterDone(Option<crate::writer::Stopped>);

impl Drop for WriterDone {
    fn drop(&mut self) {
        if let Some(stopped) = self.0.take() {
            let stored = stopped.wait_blocking();
            if !std::thread::panicking() {
                stored.expect("the writer stored everything");
            }
        }
    }
}

impl std::ops::Deref for S {
    type Target = State;
    fn deref(&self) -> &State {
        &self.s
    }
}

impl std::ops::DerefMut for S {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.s
    }
}

impl S {
    /// Sends a request through `step`, as the gRPC layer does, and takes its answer: given
    /// within the step, or by the writer once the write it waits for is stored (real time,
    /// no step needed).
    fn ask<R>(&mut self, make: impl FnOnce(Reply<R>) -> Request) -> Result<R, ApiError> {
        let (tx, rx) = oneshot::channel();
        let now = self.now;
        self.s.step(make(tx), now);
        wait(rx)
    }

    /// Moves the clock on by `d`, running every timer that falls due on the way, in order.
    fn advance(&mut self, d: Duration) {
        let end = self.now.mono + d;
        loop {
            let due = self.s.poll_timeout();
            if due > end {
                break;
            }
            self.set_clock(due.max(self.now.mono));
            let now = self.now;
            self.s.handle_timeout(now);
        }
        self.set_clock(end);
    }

    fn set_clock(&mut self, t: Time) {
        let elapsed = t.saturating_since(self.now.mono);
        self.now = Now {
            mono: t,
            wall: self.now.wall + elapsed,
        };
    }
}

/// The fake clock starts at 2026-01-01 on the wall and 0 on the monotonic clock.
fn start() -> Now {
    Now {
        mono: Time::ZERO,
        wall: SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
    }
}

fn state(dir: &std::path::Path, lease: Duration) -> S {
    state_at(dir, lease, start())
}

fn state_at(dir: &std::path::Path, lease: Duration, now: Now) -> S {
    state_with(dir, config(lease), now)
}

fn state_with(dir: &std::path::Path, config: StateConfig, now: Now) -> S {
    let db = Db::open(&dir.join("db.redb")).expect("db");
    let faults = db.faults();
    let ca = Arc::new(shoal_pki::ClusterCa::generate().expect("ca"));
    let (s, stopped) = State::new(config, db, ca, now).expect("state");
    S {
        s,
        now,
        faults,
        _writer: WriterDone(Some(stopped)),
    }
}

type Inbox = mpsc::Receiver<Result<pb::CoordinatorMessage, tonic::Status>>;

thread_local! {
    /// The secret each agent id was issued in this test, as an agent keeps it on disk: a
    /// rejoin (also after a coordinator restart) presents it.
    static SECRETS: std::cell::RefCell<BTreeMap<String, String>> = Default::default();
}

fn join(s: &mut S, id: &str, port: u16) -> pb::JoinResponse {
    let secret = SECRETS.with(|m| m.borrow().get(id).cloned().unwrap_or_default());
    join_with_secret(s, id, &secret, port)
}

/// A Join as agent `id` (with `secret`, if any) announcing 127.0.0.1:`port` and 1 GiB/s each
/// way.
pub(crate) fn join_request(id: &str, secret: &str, port: u16) -> pb::JoinRequest {
    pb::JoinRequest {
        token: TOKEN.into(),
        quic_addresses: vec![format!("127.0.0.1:{port}")],
        upload_capacity_bytes_per_sec: 1 << 30,
        download_capacity_bytes_per_sec: 1 << 30,
        previous_agent_id: id.into(),
        protocol: shoal_proto::SESSION_PROTOCOL,
        agent_secret: secret.into(),
        ..Default::default()
    }
}

fn join_with_secret(s: &mut S, id: &str, secret: &str, port: u16) -> pb::JoinResponse {
    let req = join_request(id, secret, port);
    let joined = s.ask(|r| Request::Join(req, r)).expect("join");
    if !joined.agent_secret.is_empty() {
        SECRETS.with(|m| {
            (m.borrow_mut()).insert(joined.agent_id.clone(), joined.agent_secret.clone())
        });
    }
    joined
}

fn open(s: &mut S, joined: &pb::JoinResponse) -> (SessionId, Inbox) {
    let (tx, rx) = mpsc::channel(64);
    let hello = pb::Hello {
        agent_id: joined.agent_id.clone(),
        session_token: joined.session_token.clone(),
        quic_addresses: vec![],
    };
    let session = s
        .ask(|reply| Request::OpenSession { hello, tx, reply })
        .expect("session");
    (session, rx)
}

/// Agents `t0`, `t1`, … `n` of them, joined (on ports from `port`) with their sessions
/// open: their ids and sessions.
fn agents_open(s: &mut S, n: usize, port: u16) -> (Vec<String>, Vec<(SessionId, Inbox)>) {
    let ids: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
    let mut sessions = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let joined = join(s, id, port + i as u16);
        sessions.push(open(s, &joined));
    }
    (ids, sessions)
}

fn say(s: &mut S, session: SessionId, msg: Msg) {
    let now = s.now;
    s.s.step(Request::FromAgent { session, msg }, now);
}

pub(crate) fn manifest() -> Manifest {
    Manifest::from_reader(&[7u8; 3 * 4096][..], 4096).expect("manifest")
}

fn register(s: &mut S, session: SessionId, m: &Manifest) {
    let reg = pb::BlobRegistered {
        manifest: Some(pb::Manifest::from(m)),
    };
    say(s, session, Msg::BlobRegistered(reg));
}

fn agents(ids: &[&str]) -> Option<pb::TargetSelector> {
    Some(pb::TargetSelector {
        selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
            agent_ids: ids.iter().map(|a| a.to_string()).collect(),
        })),
    })
}

fn distribute_req(s: &mut S, req: pb::DistributeRequest) -> Result<String, ApiError> {
    s.ask(|r| Request::Distribute(req, Default::default(), r))
        .map(|r| r.job_id)
}

fn distribute(s: &mut S, blob: Digest, ids: &[&str]) -> Result<String, ApiError> {
    let req = pb::DistributeRequest {
        blobs: vec![blob.to_string()],
        targets: agents(ids),
        ..Default::default()
    };
    distribute_req(s, req)
}

fn orders(inbox: &mut Inbox) -> Vec<pb::FetchOrder> {
    let mut out = Vec::new();
    while let Ok(Ok(msg)) = inbox.try_recv() {
        if let Some(coordinator_message::Msg::FetchOrder(o)) = msg.msg {
            out.push(o);
        }
    }
    out
}

fn get_job(s: &mut S, job: &str, include_targets: bool) -> Result<pb::Job, ApiError> {
    let req = pb::GetJobRequest {
        job_id: job.into(),
        include_targets,
    };
    s.ask(|r| Request::GetJob(req, r))
        .map(|r| r.job.expect("job"))
}

fn target_state(s: &mut S, job: &str) -> (pb::JobState, Vec<pb::TargetProgress>) {
    let job = get_job(s, job, true).expect("job");
    (job.state(), job.progress.expect("progress").targets)
}

/// A state with agent "seeder" connected and holding `manifest()`.
fn with_seeder(dir: &std::path::Path, lease: Duration) -> (S, Manifest, Inbox) {
    let mut s = state(dir, lease);
    let seeder = join(&mut s, "seeder", 1);
    let (session, inbox) = open(&mut s, &seeder);
    let m = manifest();
    register(&mut s, session, &m);
    (s, m, inbox)
}

#[test]
fn an_agent_of_another_session_protocol_is_refused_at_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = state(dir.path(), Duration::from_secs(10));
    let req = pb::JoinRequest {
        token: TOKEN.into(),
        quic_addresses: vec!["127.0.0.1:7401".into()],
        protocol: 0,
        ..Default::default()
    };
    let err = s
        .ask(|r| Request::Join(req, r))
        .expect_err("protocol 0 is refused");
    match err {
        ApiError::FailedPrecondition(m) => {
            assert!(
                m.contains("protocol 0") && m.contains("same Shoal release"),
                "{m}"
            )
        }
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
    assert_eq!(s.agents.iter().count(), 0, "nothing was recorded");
}

#[test]
fn an_order_made_before_the_session_opens_is_delivered_when_it_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _seeder_inbox) = with_seeder(dir.path(), Duration::from_secs(30));

    // The target joined (so it can be named) but its session is not open yet.
    let target = join(&mut s, "target", 2);
    distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let (_, mut inbox) = open(&mut s, &target);
    let got = orders(&mut inbox);
    assert_eq!(got.len(), 1, "the order must arrive once the session opens");
    assert_eq!(got[0].blob_digest, m.digest().as_bytes().to_vec());
    assert_eq!(sources_of(&got[0])[0].agent_id, "seeder");
}

#[test]
fn a_stale_failure_report_does_not_cost_the_current_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, mut inbox) = open(&mut s, &target);
    distribute(&mut s, m.digest(), &["target"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order");

    let failed = |order_id| {
        Msg::BlobFailed(pb::BlobFailed {
            order_id,
            blob_digest: m.digest().as_bytes().to_vec(),
            reason: pb::FailureReason::IoError as i32,
            message: "disk".into(),
        })
    };
    say(&mut s, session, failed(order.order_id - 1));
    assert_eq!(s.assigner.stats().failures, 0, "stale report counted");
    say(&mut s, session, failed(order.order_id));
    assert_eq!(s.assigner.stats().failures, 1);
}

#[test]
fn registering_a_wanted_blob_completes_the_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let (session, _inbox) = open(&mut s, &target);
    let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");

    // The target got the blob by other means (a local push) and registers it.
    register(&mut s, session, &m);
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Done, "{targets:?}");
}

#[test]
fn after_a_restart_targets_of_agents_that_never_return_fail_agent_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lease = Duration::from_secs(10);
    let (job, first_order, stopped) = {
        let (mut s, m, _i) = with_seeder(dir.path(), lease);
        let target = join(&mut s, "target", 2);
        let (_, mut inbox) = open(&mut s, &target);
        let job = distribute(&mut s, m.digest(), &["target"]).expect("distribute");
        let order = orders(&mut inbox).pop().expect("order").order_id;
        s.advance(Duration::from_secs(1));
        (job, order, s.now)
    };

    // A new incarnation on the same database, its wall clock stepped back an hour and its
    // monotonic clock from zero; only the seeder comes back.
    let restarted = Now {
        mono: Time::ZERO,
        wall: stopped.wall - Duration::from_secs(3600),
    };
    let mut s = state_at(dir.path(), lease, restarted);
    let seeder = join(&mut s, "seeder", 1);
    let (seeder_session, _i) = open(&mut s, &seeder);
    let m = manifest();
    register(&mut s, seeder_session, &m);
    let target = join(&mut s, "late", 3);
    let (_, mut inbox) = open(&mut s, &target);
    distribute(&mut s, m.digest(), &["late"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order").order_id;
    assert!(
        order > first_order,
        "order ids must not repeat across restarts, whatever the clock: {order} after {first_order}"
    );
    // The seeder keeps its lease alive; "target" never returns.
    for _ in 0..4 {
        s.advance(lease / 4);
        say(&mut s, seeder_session, Msg::Heartbeat(pb::Heartbeat {}));
    }
    s.advance(Duration::from_secs(1));
    let (state, targets) = target_state(&mut s, &job);
    assert_eq!(state, pb::JobState::Failed);
    assert_eq!(
        targets[0].reason(),
        pb::FailureReason::AgentLost,
        "{targets:?}"
    );
    assert!(
        targets[0].message.contains("target"),
        "{}",
        targets[0].message
    );
}

#[test]
fn downloaders_of_one_source_get_different_stripes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let mut inboxes = Vec::new();
    for (i, id) in ["t1", "t2", "t3"].iter().enumerate() {
        let joined = join(&mut s, id, 10 + i as u16);
        inboxes.push(open(&mut s, &joined).1);
    }
    distribute(&mut s, m.digest(), &["t1", "t2", "t3"]).expect("distribute");
    let mut stripes = BTreeSet::new();
    for inbox in &mut inboxes {
        let order = orders(inbox).pop().expect("order");
        let from_seeder = (sources_of(&order).iter())
            .find(|src| src.agent_id == "seeder")
            .expect("the seeder is a source");
        // The seeder's chunks are split between its three downloaders.
        assert_eq!(from_seeder.stripes, 3);
        stripes.insert(from_seeder.stripe);
    }
    assert_eq!(
        stripes.len(),
        3,
        "each downloader of the seeder has its own stripe"
    );
}

#[test]
fn a_downloader_hears_when_its_stripe_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let first = join(&mut s, "t1", 10);
    let mut inbox = open(&mut s, &first).1;
    distribute(&mut s, m.digest(), &["t1"]).expect("distribute");
    let order = orders(&mut inbox).pop().expect("order");
    let seeder = |sources: &[pb::Source]| {
        (sources.iter())
            .find(|src| src.agent_id == "seeder")
            .map(|src| (src.stripe, src.stripes))
    };
    assert_eq!(
        seeder(sources_of(&order)),
        Some((0, 1)),
        "alone: every chunk"
    );
    // A second downloader of the seeder: t1 is told its new stripe, or both would ask the
    // seeder for every chunk.
    let second = join(&mut s, "t2", 11);
    let _i2 = open(&mut s, &second).1;
    distribute(&mut s, m.digest(), &["t2"]).expect("distribute");
    let mut stripe = None;
    while let Ok(Ok(msg)) = inbox.try_recv() {
        if let Some(coordinator_message::Msg::SourceUpdate(u)) = msg.msg {
            stripe = seeder(&u.add).or(stripe);
        }
    }
    assert_eq!(stripe.map(|(_, n)| n), Some(2), "t1 got no stripe update");
}

#[test]
fn lists_page_through_everything_once() {
    let items = |keys: &[&'static str]| keys.iter().map(|k| (*k, *k)).collect::<Vec<_>>();
    let (first, token) = super::page_in_order(items(&["a", "b", "c"]).into_iter(), 2);
    assert_eq!((first, token.as_str()), (vec!["a", "b"], "b"));
    let (last, token) = super::page_in_order(items(&["c"]).into_iter(), 2);
    assert_eq!((last, token.as_str()), (vec!["c"], ""));
    let (exact, token) = super::page_in_order(items(&["a", "b"]).into_iter(), 2);
    assert_eq!((exact, token.as_str()), (vec!["a", "b"], ""));

    // ListJobs: most recent first, pages of one.
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    let target = join(&mut s, "target", 2);
    let _t = open(&mut s, &target);
    let older = distribute(&mut s, m.digest(), &["target"]).expect("job");
    s.advance(Duration::from_millis(5));
    let newer = distribute(&mut s, m.digest(), &["target"]).expect("job");
    let list = |s: &mut S, state: pb::JobState, page_size: u32, token: &str| {
        let req = pb::ListJobsRequest {
            state: state as i32,
            page_size,
            page_token: token.into(),
        };
        s.ask(|r| Request::ListJobs(req, r)).expect("list")
    };
    let any = pb::JobState::Unspecified;
    let p1 = list(&mut s, any, 1, "");
    assert_eq!(p1.jobs[0].job_id, newer);
    // A job created between pages is before the cursor: the next page does not shift.
    s.advance(Duration::from_millis(5));
    let newest = distribute(&mut s, m.digest(), &["target"]).expect("job");
    let p2 = list(&mut s, any, 1, &p1.next_page_token);
    assert_eq!(p2.jobs[0].job_id, older);
    assert!(p2.next_page_token.is_empty());
    assert_eq!(list(&mut s, any, 1, "").jobs[0].job_id, newest);
    // A state filter skips within the order: only the cancelled one.
    let cancel = pb::CancelJobRequest {
        job_id: newer.clone(),
        ..Default::default()
    };
    s.ask(|r| Request::CancelJob(cancel, None, r))
        .expect("cancel");
    let only = list(&mut s, pb::JobState::Cancelled, 10, "");
    let ids: Vec<&str> = only.jobs.iter().map(|j| j.job_id.as_str()).collect();
    assert_eq!(
        (ids, only.next_page_token.as_str()),
        (vec![newer.as_str()], "")
    );

    // ListAgents: in id order from its index, a filter skipping within a page.
    let (ids, _sessions) = agents_open(&mut s, 3, 10);
    join(&mut s, "t10", 20); // joined, no session: not ready
    let mut agents = |state: pb::AgentState, token: &str| {
        let req = pb::ListAgentsRequest {
            page_size: 2,
            page_token: token.into(),
            state: state as i32,
            ..Default::default()
        };
        let r = s.ask(|r| Request::ListAgents(req, r)).expect("list");
        let ids: Vec<String> = r.agents.into_iter().map(|a| a.agent_id).collect();
        (ids, r.next_page_token)
    };
    let mut listed = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = agents(pb::AgentState::Ready, &token);
        assert!(page.len() <= 2, "{page:?}");
        listed.extend(page);
        if next.is_empty() {
            break;
        }
        token = next;
    }
    let mut ready: Vec<String> = ["seeder", "target"].map(String::from).into();
    ready.extend(ids);
    ready.sort();
    assert_eq!(listed, ready, "every ready agent once, in id order");
    // Any state: t10 (not ready) sorts between t1 and t2; a page ending before the last
    // gives the next token.
    let all = agents(pb::AgentState::Unspecified, "t1");
    assert_eq!(
        all,
        (vec!["t10".to_string(), "t2".to_string()], "t2".into())
    );

    // ListBlobs: in digest order from the catalog's map; a token that is no digest still
    // pages by the string order.
    for data in [[1u8; 4096], [2u8; 4096]] {
        let m = Manifest::from_reader(&data[..], 4096).expect("manifest");
        register(&mut s, _t.0, &m);
    }
    let mut blobs = |token: &str| {
        let req = pb::ListBlobsRequest {
            page_size: 2,
            page_token: token.into(),
        };
        let r = s.ask(|r| Request::ListBlobs(req, r)).expect("list");
        let digests: Vec<String> = r.blobs.into_iter().map(|b| b.digest).collect();
        (digests, r.next_page_token)
    };
    let (first, token) = blobs("");
    let (second, end) = blobs(&token);
    assert!(end.is_empty() && token == first[1], "{first:?} {token}");
    let listed: Vec<String> = first.iter().chain(&second).cloned().collect();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!((listed.len(), &listed), (3, &sorted));
    assert_eq!(blobs("sha256:").0, first, "no digest: what sorts after it");
    assert_eq!(blobs("zzz"), (Vec::new(), String::new()));
}

#[test]
fn finished_jobs_are_forgotten_after_the_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut s, m, _i) = with_seeder(dir.path(), Duration::from_secs(30));
    // Targeting the holder: done at once.
    let job = distribute(&mut s, m.digest(), &["seeder"]).expect("job");
    s.advance(Duration::from_secs(3599));
    assert!(
        get_job(&mut s, &job, false).is_ok(),
        "kept within the retention"
    );
    s.advance(Duration::from_secs(2));
    assert!(matches!(
        get_job(&mut s, &job, false),
        Err(ApiError::NotFound(_))
    ));
    let mut s = restarted(s, dir.path(), Duration::from_secs(30));
    assert!(
        matches!(get_job(&mut s, &job, false), Err(ApiError::NotFound(_))),
        "deleted from disk too"
    );
}

mod building;
mod bursts;
mod persistence;
mod reports;
mod seeding;
mod session;
mod stranded;
mod streaming;
mod tables;
mod urls;
mod vetting;

/// The sources of a FromPeers order (none for any other kind).
fn sources_of(o: &pb::FetchOrder) -> &[pb::Source] {
    match &o.kind {
        Some(pb::fetch_order::Kind::Peers(p)) => &p.sources,
        _ => &[],
    }
}

/// The answer on `rx`, which the step gave or the writer gives once its write is stored (the
/// writer is a real thread: this blocks until it answers; nextest ends a hung test).
fn wait<R>(rx: oneshot::Receiver<Result<R, ApiError>>) -> Result<R, ApiError> {
    rx.blocking_recv()
        .unwrap_or_else(|e| panic!("the request was not answered: {e:?}"))
}

/// Blocks until the writer has applied everything queued before this call: it applies in
/// queue order, so an empty write queued now is done only after them. No clock, no polling.
/// `s` stopped and started again on its database, at its clock's time.
fn restarted(s: S, dir: &std::path::Path, lease: Duration) -> S {
    let now = s.now;
    drop(s);
    state_at(dir, lease, now)
}

fn writes_applied(s: &S) {
    let (tx, rx) = std::sync::mpsc::channel();
    s.writer
        .write_then(crate::db::Write::Jobs(Vec::new()), move |_| {
            let _ = tx.send(());
        });
    rx.recv().expect("the writer ran the barrier");
}
