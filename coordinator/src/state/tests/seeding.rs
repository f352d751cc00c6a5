//! Seeding a blob that no agent holds from its origin: one seeder, the others wait, then
//! fetch from peers; failures move the seed to another agent or end the targets.

use super::*;

pub(super) fn http_origin() -> pb::Origin {
    pb::Origin {
        origin: Some(pb::origin::Origin::Http(pb::HttpOrigin {
            url: "http://127.0.0.1:1/model.bin".into(),
            headers: Default::default(),
            size: 0,
            etag: String::new(),
        })),
    }
}

pub(super) fn distribute_from_origin(
    s: &mut S,
    blob: Digest,
    ids: &[&str],
    origin: pb::Origin,
) -> Result<String, ApiError> {
    let req = pb::DistributeRequest {
        blobs: vec![blob.to_string()],
        targets: agents(ids),
        origins: [(blob.to_string(), origin)].into(),
        ..Default::default()
    };
    distribute_req(s, req)
}

pub(super) struct Cluster {
    pub(super) s: S,
    pub(super) sessions: Vec<SessionId>,
    pub(super) inboxes: Vec<Inbox>,
}

pub(super) fn cluster(dir: &std::path::Path, n: usize) -> Cluster {
    let mut s = state(dir, Duration::from_secs(30));
    let mut sessions = Vec::new();
    let mut inboxes = Vec::new();
    for i in 0..n {
        let joined = join(&mut s, &format!("a{i}"), 10 + i as u16);
        let (session, inbox) = open(&mut s, &joined);
        sessions.push(session);
        inboxes.push(inbox);
    }
    Cluster {
        s,
        sessions,
        inboxes,
    }
}

/// Every message agent `agent` received since the last call.
pub(super) fn messages(c: &mut Cluster, agent: usize) -> Vec<coordinator_message::Msg> {
    let mut out = Vec::new();
    while let Ok(Ok(m)) = c.inboxes[agent].try_recv() {
        out.extend(m.msg);
    }
    out
}

impl Cluster {
    /// (agent index, order) of every order sent since the last call.
    pub(super) fn orders(&mut self) -> Vec<(usize, pb::FetchOrder)> {
        let mut out = Vec::new();
        for (i, inbox) in self.inboxes.iter_mut().enumerate() {
            out.extend(orders(inbox).into_iter().map(|o| (i, o)));
        }
        out
    }

    pub(super) fn fail(&mut self, agent: usize, order: &pb::FetchOrder, reason: pb::FailureReason) {
        let msg = Msg::BlobFailed(pb::BlobFailed {
            order_id: order.order_id,
            blob_digest: order.blob_digest.clone(),
            reason: reason as i32,
            message: "upstream said no".into(),
        });
        self.say(agent, msg);
    }

    /// Agent `agent` sends `msg`.
    pub(super) fn say(&mut self, agent: usize, msg: Msg) {
        say(&mut self.s, self.sessions[agent], msg);
    }
}

#[test]
fn one_seeder_fetches_from_the_origin_and_the_others_then_fetch_from_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = manifest();
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1", "a2"], http_origin())
        .expect("distribute");
    // A second job for the same blob while it is being seeded: still one fetch.
    distribute_from_origin(&mut c.s, m.digest(), &["a1"], http_origin()).expect("second job");

    let sent = c.orders();
    assert_eq!(sent.len(), 1, "exactly one seed order: {sent:?}");
    let (seeder, order) = &sent[0];
    assert!(!is_peer_fetch(order), "a seed order carries no manifest");
    assert_eq!(origin_of(order), Some(&http_origin()));

    register(&mut c.s, c.sessions[*seeder], &m);
    let sent = c.orders();
    let others: BTreeSet<usize> = (0..3).filter(|i| i != seeder).collect();
    let ordered: BTreeSet<usize> = sent.iter().map(|(i, _)| *i).collect();
    assert_eq!(ordered, others, "the waiting targets get ordinary orders");
    for (_, o) in &sent {
        assert!(is_peer_fetch(o));
        let sources: Vec<&str> = super::sources_of(o)
            .iter()
            .map(|s| s.agent_id.as_str())
            .collect();
        assert!(
            sources.contains(&format!("a{seeder}").as_str()),
            "{sources:?}"
        );
    }
    let (_, targets) = target_state(&mut c.s, &job);
    let size = m.size();
    assert!(targets.iter().all(|t| t.bytes_total == size), "{targets:?}");
    let done: Vec<_> = (targets.iter())
        .filter(|t| t.state() == pb::TargetState::Done)
        .map(|t| t.agent_id.clone())
        .collect();
    assert_eq!(done, vec![format!("a{seeder}")]);
}

#[test]
fn a_failed_seed_moves_to_another_agent_then_fails_every_target() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = manifest();
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1", "a2"], http_origin())
        .expect("distribute");
    let mut seeders = BTreeSet::new();
    for _ in 0..3 {
        let sent = c.orders();
        assert_eq!(sent.len(), 1, "{sent:?}");
        let (agent, order) = sent.into_iter().next().expect("order");
        assert!(seeders.insert(agent), "agent {agent} seeded twice");
        c.fail(agent, &order, pb::FailureReason::OriginError);
    }
    assert!(c.orders().is_empty(), "no fourth seeder");
    let (state, targets) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Failed);
    for t in &targets {
        assert_eq!(t.reason(), pb::FailureReason::OriginError, "{t:?}");
        assert!(t.message.contains("upstream said no"), "{t:?}");
    }
}

#[test]
fn an_origin_without_the_blob_fails_every_target_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = manifest();
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1", "a2"], http_origin())
        .expect("distribute");
    let (agent, order) = c.orders().pop().expect("seed order");
    c.fail(agent, &order, pb::FailureReason::Invalid);
    assert!(c.orders().is_empty(), "a 404 is not retried elsewhere");
    let (state, targets) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Failed, "{targets:?}");
}

#[test]
fn a_lone_target_whose_seed_fails_does_not_wait_forever() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 1);
    let m = manifest();
    let job =
        distribute_from_origin(&mut c.s, m.digest(), &["a0"], http_origin()).expect("distribute");
    let (agent, order) = c.orders().pop().expect("seed order");
    c.fail(agent, &order, pb::FailureReason::OriginError);
    let (state, _) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Failed);
}

#[test]
fn origins_are_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 1);
    let m = manifest();
    let err = distribute(&mut c.s, m.digest(), &["a0"]).expect_err("no origin");
    assert!(matches!(err, ApiError::NotFound(_)), "{err:?}");
    for bad in [
        pb::origin::Origin::Http(pb::HttpOrigin {
            url: "ftp://x/y".into(),
            headers: Default::default(),
            size: 0,
            etag: String::new(),
        }),
        pb::origin::Origin::Oci(pb::OciOrigin {
            registry: "127.0.0.1:5000".into(),
            repository: "../etc".into(),
            plain_http: true,
            size: 0,
        }),
    ] {
        let origin = pb::Origin { origin: Some(bad) };
        let err =
            distribute_from_origin(&mut c.s, m.digest(), &["a0"], origin).expect_err("bad origin");
        assert!(matches!(err, ApiError::InvalidArgument(_)), "{err:?}");
    }
    assert!(c.orders().is_empty());
}

#[test]
fn a_seed_survives_a_coordinator_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = manifest();
    let job = {
        let mut c = cluster(dir.path(), 2);
        let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1"], http_origin())
            .expect("distribute");
        c.s.advance(super::super::HOUSEKEEPING);
        job
    };
    // A new coordinator on the same state: the agents come back, the seed starts again.
    let mut c = cluster(dir.path(), 2);
    let sent = c.orders();
    assert_eq!(sent.len(), 1, "{sent:?}");
    let (seeder, order) = &sent[0];
    assert!(!is_peer_fetch(order));
    register(&mut c.s, c.sessions[*seeder], &m);
    assert_eq!(
        c.orders().len(),
        1,
        "the other target fetches from the seeder"
    );
    let (state, _) = target_state(&mut c.s, &job);
    assert_ne!(state, pb::JobState::Failed);
}

/// A 4 MiB blob of 1 MiB chunks (the chunk size of manifests assembled from ranges), with
/// plain chunk digests: what range seeders, hashing their ranges apart, report.
fn big_manifest() -> Manifest {
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let mut b = shoal_proto::ManifestBuilder::plain(shoal_proto::CHUNK_SIZE).expect("builder");
    b.update(&data);
    b.finish().expect("manifest")
}

pub(super) fn sized_origin(size: u64) -> pb::Origin {
    pb::Origin {
        origin: Some(pb::origin::Origin::Http(pb::HttpOrigin {
            url: "http://127.0.0.1:1/big.bin".into(),
            headers: Default::default(),
            size,
            etag: String::new(),
        })),
    }
}

pub(super) fn range_seeded(c: &mut Cluster, agent: usize, order: &pb::FetchOrder, m: &Manifest) {
    let chunk = u64::from(range_of(order).2);
    let first = (range_of(order).0 / chunk) as usize;
    let n = (range_of(order).1 - range_of(order).0).div_ceil(chunk) as usize;
    let msg = Msg::RangeSeeded(pb::RangeSeeded {
        order_id: order.order_id,
        blob_digest: order.blob_digest.clone(),
        first_chunk: first as u32,
        chunk_digests: m.chunk_digests()[first..first + n]
            .iter()
            .map(|d| d.as_bytes().to_vec())
            .collect(),
    });
    c.say(agent, msg);
}

#[test]
fn a_large_blob_is_seeded_in_ranges_and_its_manifest_assembled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = big_manifest();
    let job = distribute_from_origin(
        &mut c.s,
        m.digest(),
        &["a0", "a1", "a2"],
        sized_origin(m.size()),
    )
    .expect("distribute");
    let sent = c.orders();
    assert_eq!(sent.len(), 3, "one range per agent: {sent:?}");
    let mut covered: Vec<(u64, u64)> = sent
        .iter()
        .map(|(_, o)| (range_of(o).0, range_of(o).1))
        .collect();
    covered.sort();
    assert_eq!(
        covered,
        vec![(0, 2 << 20), (2 << 20, 3 << 20), (3 << 20, 4 << 20)]
    );
    for (_, o) in &sent {
        assert!(!is_peer_fetch(o));
        assert_eq!(range_of(o).2, shoal_proto::CHUNK_SIZE);
    }
    // Two ranges in: still waiting. The third: the manifest is the blob's, and every
    // target gets an ordinary order (each seeder holds only its range).
    for (agent, order) in &sent[..2] {
        range_seeded(&mut c, *agent, order, &m);
    }
    assert!(c.orders().is_empty());
    let (agent, order) = &sent[2];
    range_seeded(&mut c, *agent, order, &m);
    let got =
        c.s.catalog
            .manifest(&m.digest())
            .expect("manifest assembled");
    assert_eq!(got.as_ref(), &m);
    let ordered: BTreeSet<usize> = c.orders().iter().map(|(i, _)| *i).collect();
    assert_eq!(ordered, (0..3).collect(), "every target fetches the rest");
    let (state, targets) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Running, "{targets:?}");
}

#[test]
fn a_failed_range_moves_to_another_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = big_manifest();
    distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1"], sized_origin(m.size()))
        .expect("distribute");
    let sent = c.orders();
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (agent, order) = sent[0].clone();
    c.fail(agent, &order, pb::FailureReason::OriginError);
    // The other agent finishes its range first, then takes the failed one.
    let (other, other_order) = sent[1].clone();
    range_seeded(&mut c, other, &other_order, &m);
    let again = c.orders();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].0, other);
    assert_eq!(
        (range_of(&again[0].1).0, range_of(&again[0].1).1),
        (range_of(&order).0, range_of(&order).1)
    );
    range_seeded(&mut c, other, &again[0].1, &m);
    assert!(c.s.catalog.manifest(&m.digest()).is_some());
}

#[test]
fn a_blob_assembled_from_ranges_that_fails_its_digest_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 2);
    let m = big_manifest();
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1"], sized_origin(m.size()))
        .expect("distribute");
    for (agent, order) in c.orders() {
        range_seeded(&mut c, agent, &order, &m);
    }
    assert!(c.s.catalog.manifest(&m.digest()).is_some());
    let (agent, order) = c.orders().pop().expect("an ordinary order");
    c.fail(agent, &order, pb::FailureReason::DigestMismatch);
    assert!(
        c.s.catalog.manifest(&m.digest()).is_none(),
        "the unverified manifest is dropped"
    );
    let (job_state, targets) = target_state(&mut c.s, &job);
    assert_eq!(job_state, pb::JobState::Failed, "{targets:?}");
    assert!(
        targets
            .iter()
            .all(|t| t.reason() == pb::FailureReason::DigestMismatch),
        "{targets:?}"
    );
    // It was never written down either: a restarted coordinator does not know it.
    c.s.advance(super::super::HOUSEKEEPING);
    drop(c);
    let s = state(dir.path(), Duration::from_secs(30));
    assert!(s.catalog.manifest(&m.digest()).is_none());
}

fn is_peer_fetch(o: &pb::FetchOrder) -> bool {
    matches!(o.kind, Some(pb::fetch_order::Kind::Peers(_)))
}

fn origin_of(o: &pb::FetchOrder) -> Option<&pb::Origin> {
    match &o.kind {
        Some(pb::fetch_order::Kind::Origin(f)) => f.origin.as_ref(),
        Some(pb::fetch_order::Kind::OriginRange(r)) => r.origin.as_ref(),
        _ => None,
    }
}

/// (start, end, chunk size) of a range seed order; zeros for any other.
fn range_of(o: &pb::FetchOrder) -> (u64, u64, u32) {
    match &o.kind {
        Some(pb::fetch_order::Kind::OriginRange(r)) => (r.start, r.end, r.chunk_size),
        _ => (0, 0, 0),
    }
}

/// Origin headers (credentials, often) reach the seeder's order, but GetJob and ListJobs
/// show only their names, and the database never holds their values.
#[test]
fn origin_header_values_reach_the_seeder_but_never_the_api_nor_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 2);
    let m = manifest();
    let mut origin = http_origin();
    if let Some(pb::origin::Origin::Http(h)) = &mut origin.origin {
        h.headers
            .insert("Authorization".into(), "Bearer hf_secret".into());
        h.url = "http://bob:pw_secret@127.0.0.1:1/m.bin?X-Amz-Signature=sig_secret&v=1".into();
    }
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1"], origin.clone())
        .expect("distribute");
    let sent = c.orders();
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        origin_of(&sent[0].1),
        Some(&origin),
        "the seeder needs the header's value"
    );

    let shown = |j: &pb::Job| -> Vec<(String, String)> {
        (j.origins.values())
            .filter_map(|o| match &o.origin {
                Some(pb::origin::Origin::Http(h)) => Some(h.headers.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let redacted = vec![("Authorization".to_string(), "<redacted>".to_string())];
    let got = get_job(&mut c.s, &job, true).expect("job");
    assert_eq!(shown(&got), redacted);
    let listed =
        c.s.ask(|r| Request::ListJobs(pb::ListJobsRequest::default(), r))
            .expect("list");
    assert_eq!(listed.jobs.len(), 1);
    assert_eq!(shown(&listed.jobs[0]), redacted);
    let text = format!("{got:?}{listed:?}");
    for secret in ["hf_secret", "pw_secret", "sig_secret", "bob"] {
        assert!(!text.contains(secret), "{secret}: {text}");
    }
    assert!(text.contains("X-Amz-Signature="), "query keys stay: {text}");

    // On disk: the names only. After a restart the job's origin has no such header, rather
    // than the placeholder as its value.
    super::persistence::settle(&mut c.s);
    let now = c.s.now;
    drop(c);
    let db = std::fs::read(dir.path().join("db.redb")).expect("db file");
    assert!(
        !db.windows(b"hf_secret".len()).any(|w| w == b"hf_secret"),
        "the header's value is in the database"
    );
    let s = state_at(dir.path(), Duration::from_secs(30), now);
    let job = s
        .jobs
        .get(&job)
        .map(|j| j.to_pb(false, now.wall))
        .expect("job");
    assert_eq!(shown(&job), vec![], "{job:?}");
}

/// One Distribute cannot create more targets than `max_targets_per_job`, and cannot give an
/// origin a size past the largest blob (which would overflow range arithmetic).
#[test]
fn one_job_cannot_create_more_targets_than_the_limit_or_a_giant_origin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StateConfig {
        max_targets_per_job: 4,
        ..super::config(Duration::from_secs(30))
    };
    let mut s = super::state_with(dir.path(), config, super::start());
    for (i, id) in ["a0", "a1", "a2"].iter().enumerate() {
        join(&mut s, id, 10 + i as u16);
    }
    let blobs: Vec<Digest> = (0..2u8).map(|i| Digest::of(&[i])).collect();
    let req = |ids: &[&str]| pb::DistributeRequest {
        blobs: blobs.iter().map(|b| b.to_string()).collect(),
        targets: agents(ids),
        origins: blobs
            .iter()
            .map(|b| (b.to_string(), http_origin()))
            .collect(),
        ..Default::default()
    };
    let err = distribute_req(&mut s, req(&["a0", "a1", "a2"])).expect_err("6 targets > 4");
    assert!(
        matches!(&err, ApiError::InvalidArgument(m) if m.contains("max_targets_per_job")),
        "{err:?}"
    );
    distribute_req(&mut s, req(&["a0", "a1"])).expect("4 targets");

    let mut giant = http_origin();
    if let Some(pb::origin::Origin::Http(h)) = &mut giant.origin {
        h.size = u64::MAX - 1;
    }
    let err = distribute_from_origin(&mut s, Digest::of(b"giant"), &["a0"], giant)
        .expect_err("a size past the largest blob");
    assert!(
        matches!(&err, ApiError::InvalidArgument(m) if m.contains("largest blob")),
        "{err:?}"
    );
}
