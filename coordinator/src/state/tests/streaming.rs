//! Streaming seeds: the targets waiting for a blob seeded whole fetch it from the seeder
//! while the seed runs, with a provisional manifest whose digests the coordinator passes on
//! as the seeder reports them; the seed's end hands their orders to the assigner unchanged.

use super::seeding::{Cluster, cluster, distribute_from_origin, http_origin, messages};
use super::*;

fn table(digests: &[Digest]) -> Vec<u8> {
    Digest::table_bytes(digests)
}

fn chunks_seeded(order: &pb::FetchOrder, m: &Manifest, first: u32, n: usize) -> Msg {
    let digests = &m.chunk_digests()[first as usize..first as usize + n];
    Msg::ChunksSeeded(pb::ChunksSeeded {
        order_id: order.order_id,
        blob_digest: order.blob_digest.clone(),
        first_chunk: first,
        chunk_digests: table(digests),
        size: m.size(),
        chunk_size: m.chunk_size(),
        name: m.name().unwrap_or_default().into(),
    })
}

fn peers(o: &pb::FetchOrder) -> &pb::FromPeers {
    match &o.kind {
        Some(pb::fetch_order::Kind::Peers(p)) => p,
        other => panic!("not an order from peers: {other:?}"),
    }
}

fn a_blob() -> Manifest {
    let data: Vec<u8> = (0..4 * 4096u32).map(|i| (i % 251) as u8).collect();
    Manifest::from_reader(&data[..], 4096).expect("manifest")
}

#[test]
fn waiting_targets_fetch_a_whole_seed_while_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 4);
    let m = a_blob();
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1", "a2"], http_origin())
        .expect("distribute");
    let (seeder, seed) = c.orders().pop().expect("one seed order");
    let targets: Vec<usize> = (0..3).filter(|i| *i != seeder).collect();

    // The first digests: the other targets get orders from peers at once.
    c.say(seeder, chunks_seeded(&seed, &m, 0, 1));
    let sent = c.orders();
    let ordered: Vec<usize> = sent.iter().map(|(i, _)| *i).collect();
    assert_eq!(ordered, targets, "{sent:?}");
    let mut order_of = BTreeMap::new();
    let mut stripes = BTreeSet::new();
    for (agent, o) in &sent {
        let p = peers(o);
        assert!(p.provisional && !p.verified, "{o:?}");
        let wire = Manifest::try_from(p.manifest.as_ref().expect("manifest")).expect("valid");
        assert_eq!(wire.known_count(), 1);
        assert_eq!(wire.chunk_digests()[0], m.chunk_digests()[0]);
        let ids: BTreeSet<&str> = p.sources.iter().map(|s| s.agent_id.as_str()).collect();
        let other = targets
            .iter()
            .find(|t| *t != agent)
            .expect("another target");
        assert_eq!(
            ids,
            [format!("a{seeder}"), format!("a{other}")]
                .iter()
                .map(String::as_str)
                .collect(),
            "the seeder and the other target"
        );
        let of_seeder = (p.sources.iter())
            .find(|s| s.agent_id == format!("a{seeder}"))
            .expect("seeder");
        assert_eq!(of_seeder.stripes, 2);
        stripes.insert(of_seeder.stripe);
        order_of.insert(*agent, o.order_id);
    }
    assert_eq!(stripes.len(), 2, "each target its own stripe of the seeder");
    let (_, progress) = target_state(&mut c.s, &job);
    assert!(
        (progress.iter()).all(|t| t.state() == pb::TargetState::Running),
        "{progress:?}"
    );

    // A stale report (another order id) teaches nothing.
    let mut stale = seed.clone();
    stale.order_id += 1000;
    c.say(seeder, chunks_seeded(&stale, &m, 1, 1));
    for t in &targets {
        assert!(messages(&mut c, *t).is_empty());
    }

    // Later digests go to every target's order.
    c.say(seeder, chunks_seeded(&seed, &m, 1, 2));
    for t in &targets {
        let got = messages(&mut c, *t);
        let digests: Vec<&pb::ChunkDigests> = (got.iter())
            .filter_map(|m| match m {
                coordinator_message::Msg::ChunkDigests(d) => Some(d),
                _ => None,
            })
            .collect();
        assert_eq!(digests.len(), 1, "{got:?}");
        assert_eq!(digests[0].order_id, order_of[t]);
        assert_eq!(digests[0].first_chunk, 1);
        assert_eq!(digests[0].chunk_digests, table(&m.chunk_digests()[1..3]));
    }

    // A target that asks while the stream runs joins it at once; the others' stripe of
    // the seeder changes.
    distribute_from_origin(&mut c.s, m.digest(), &["a3"], http_origin()).expect("second job");
    let got: Vec<Vec<coordinator_message::Msg>> = (0..4).map(|a| messages(&mut c, a)).collect();
    let order = match &got[3][..] {
        [coordinator_message::Msg::FetchOrder(o)] => o,
        other => panic!("one order for a3: {other:?}"),
    };
    let wire = peers(order).manifest.as_ref().expect("manifest");
    assert_eq!(Manifest::try_from(wire).expect("valid").known_count(), 3);
    order_of.insert(3, order.order_id);
    for t in &targets {
        let got = &got[*t];
        assert!(
            got.iter().any(|m| matches!(m,
                coordinator_message::Msg::SourceUpdate(u) if u.add.iter().any(|s| s.stripes == 3))),
            "{got:?}"
        );
    }

    // The seed ends: the targets' orders go on under the same ids, with the manifest whole.
    c.say(seeder, chunks_seeded(&seed, &m, 3, 1));
    register(&mut c.s, c.sessions[seeder], &m);
    let resent = c.orders();
    assert_eq!(resent.len(), 3, "{resent:?}");
    for (agent, o) in resent {
        assert_eq!(
            Some(&o.order_id),
            order_of.get(&agent),
            "agent {agent} kept its order id"
        );
        let p = peers(&o);
        assert!(!p.provisional);
        assert!(
            !p.verified,
            "only the seeder vouches for the blob so far: targets read it whole"
        );
        let wire = Manifest::try_from(p.manifest.as_ref().expect("manifest")).expect("valid");
        assert_eq!(wire, m);
    }
    for t in targets.into_iter().chain([3]) {
        let done = Msg::BlobDone(pb::BlobDone {
            blob_digest: m.digest().as_bytes().to_vec(),
        });
        c.say(t, done);
    }
    let (_, progress) = target_state(&mut c.s, &job);
    assert!(
        (progress.iter()).all(|t| t.state() == pb::TargetState::Done),
        "{progress:?}"
    );
}

#[test]
fn a_seeder_whose_digests_contradict_the_stream_fails_it_and_its_targets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut c, job, m, seeder, seed) = seeding_three(dir.path());
    c.say(seeder, chunks_seeded(&seed, &m, 0, 2));
    assert_eq!(c.orders().len(), 2);
    c.say(seeder, wrong_digests(&seed, &m, 1, 1));
    let (state, progress) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Failed, "{progress:?}");
    for t in &progress {
        assert_eq!(t.reason(), pb::FailureReason::DigestMismatch, "{t:?}");
    }
    for agent in 0..3 {
        let got = messages(&mut c, agent);
        assert!(
            got.iter()
                .any(|m| matches!(m, coordinator_message::Msg::Cancel(_))),
            "agent {agent}'s order is cancelled: {got:?}"
        );
    }
}

/// Three agents wanting `a_blob()` from an HTTP origin: the cluster, the job, the blob, and
/// the seeder with its seed order.
fn seeding_three(dir: &std::path::Path) -> (Cluster, String, Manifest, usize, pb::FetchOrder) {
    let mut c = cluster(dir, 3);
    let m = a_blob();
    let job = distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1", "a2"], http_origin())
        .expect("distribute");
    let (seeder, seed) = c.orders().pop().expect("one seed order");
    (c, job, m, seeder, seed)
}

/// A `ChunksSeeded` for `m`'s blob carrying the digests of other bytes.
fn wrong_digests(seed: &pb::FetchOrder, m: &Manifest, first: u32, n: usize) -> Msg {
    let mut wrong = chunks_seeded(seed, &a_blob_of_other_bytes(), first, n);
    if let Msg::ChunksSeeded(w) = &mut wrong {
        w.blob_digest = m.digest().as_bytes().to_vec();
    }
    wrong
}

fn a_blob_of_other_bytes() -> Manifest {
    Manifest::from_reader(&[9u8; 4 * 4096][..], 4096).expect("manifest")
}

#[test]
fn a_lost_seeder_leaves_the_stream_and_its_successor_joins_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 4);
    let m = a_blob();
    distribute_from_origin(
        &mut c.s,
        m.digest(),
        &["a0", "a1", "a2", "a3"],
        http_origin(),
    )
    .expect("distribute");
    let (seeder, seed) = c.orders().pop().expect("one seed order");
    c.say(seeder, chunks_seeded(&seed, &m, 0, 2));
    let targets: Vec<usize> = (0..4).filter(|i| *i != seeder).collect();
    assert_eq!(c.orders().len(), 3);

    // Everyone but the seeder keeps its lease; the seeder's runs out.
    c.s.advance(Duration::from_secs(20));
    for t in &targets {
        c.say(*t, Msg::Heartbeat(pb::Heartbeat::default()));
    }
    c.s.advance(Duration::from_secs(15));
    let lost = format!("a{seeder}");
    let mut successor = None;
    let mut told_lost = 0;
    for t in &targets {
        for msg in messages(&mut c, *t) {
            match msg {
                coordinator_message::Msg::FetchOrder(o)
                    if !matches!(o.kind, Some(pb::fetch_order::Kind::Peers(_))) =>
                {
                    successor = Some((*t, o));
                }
                coordinator_message::Msg::SourceUpdate(u) => {
                    assert!(!u.add.iter().any(|s| s.agent_id == lost), "{u:?}");
                    told_lost += usize::from(u.remove.contains(&lost));
                }
                _ => {}
            }
        }
    }
    assert!(
        told_lost >= 2,
        "the targets stop asking the lost seeder: {told_lost}"
    );
    let (successor, seed2) = successor.expect("another target seeds the blob");
    // The successor's chunks join the stream: the others take it as a strict source.
    c.say(successor, chunks_seeded(&seed2, &m, 0, 3));
    for t in targets.iter().filter(|t| **t != successor) {
        let got = messages(&mut c, *t);
        let added: Vec<&pb::Source> = (got.iter())
            .filter_map(|m| match m {
                coordinator_message::Msg::SourceUpdate(u) => Some(u.add.iter()),
                _ => None,
            })
            .flatten()
            .filter(|s| s.agent_id == format!("a{successor}"))
            .collect();
        assert!(
            added.iter().any(|s| s.stripe_only),
            "target {t} takes the new seeder as a strict source: {got:?}"
        );
    }
}

#[test]
fn a_failed_seed_ends_its_stream_and_the_next_seed_starts_afresh() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut c, job, m, seeder, seed) = seeding_three(dir.path());
    // The first seeder streams digests of other bytes (a stale object at the origin), then
    // fails as an origin failure would.
    c.say(seeder, wrong_digests(&seed, &m, 0, 2));
    let streamed: Vec<usize> = c.orders().into_iter().map(|(i, _)| i).collect();
    assert_eq!(streamed.len(), 2);
    c.fail(seeder, &seed, pb::FailureReason::OriginError);
    let mut next = None;
    for t in &streamed {
        let got = messages(&mut c, *t);
        assert!(
            got.iter()
                .any(|m| matches!(m, coordinator_message::Msg::Cancel(_))),
            "target {t}'s stream order stops: {got:?}"
        );
        for msg in got {
            if let coordinator_message::Msg::FetchOrder(o) = msg {
                next = Some((*t, o));
            }
        }
    }
    let (seeder2, seed2) = next.expect("another target seeds it");
    // The right digests now: no contradiction with the failed seed's, and the stream
    // starts again for the other two targets (the failed seeder among them).
    c.say(seeder2, chunks_seeded(&seed2, &m, 0, 2));
    let sent = c.orders();
    let to: BTreeSet<usize> = sent.iter().map(|(i, _)| *i).collect();
    assert_eq!(to, (0..3).filter(|i| *i != seeder2).collect(), "{sent:?}");
    for (_, o) in &sent {
        let wire = peers(o).manifest.as_ref().expect("manifest");
        let wire = Manifest::try_from(wire).expect("valid");
        assert_eq!(&wire.chunk_digests()[..2], &m.chunk_digests()[..2]);
    }
    let (state, _) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Running);
}

#[test]
fn a_stream_target_whose_order_fails_gets_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut c, _, m, seeder, seed) = seeding_three(dir.path());
    c.say(seeder, chunks_seeded(&seed, &m, 0, 1));
    let (target, order) = c.orders().pop().expect("stream orders");
    c.fail(target, &order, pb::FailureReason::IoError);
    let again: Vec<_> = c
        .orders()
        .into_iter()
        .filter(|(i, _)| *i == target)
        .collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_ne!(again[0].1.order_id, order.order_id, "a new order");
    assert!(peers(&again[0].1).provisional);
}

#[test]
fn a_blob_named_by_its_url_is_seeded_whole_and_streamed_under_its_name() {
    // 4 MiB of 1 MiB chunks from an origin that gave its size: unnamed, three agents would
    // each seed a range (`a_large_blob_is_seeded_in_ranges_and_its_manifest_assembled`).
    // Named, the chain needs one reader in order: one whole seed, streamed.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let content = Manifest::from_reader(&data[..], shoal_proto::CHUNK_SIZE).expect("manifest");
    let h = pb::HttpOrigin {
        url: "http://127.0.0.1:1/model.bin".into(),
        headers: Default::default(),
        size: content.size(),
        etag: "\"v1\"".into(),
    };
    let m = content.clone().named(&h.content_name()).expect("named");
    let origin = pb::Origin {
        origin: Some(pb::origin::Origin::Http(h)),
    };
    distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1", "a2"], origin).expect("distribute");
    let sent = c.orders();
    let [(seeder, seed)] = &sent[..] else {
        panic!("one whole seed order: {sent:?}");
    };
    assert!(
        matches!(seed.kind, Some(pb::fetch_order::Kind::Origin(_))),
        "{seed:?}"
    );
    let seeder = *seeder;

    // Digests reported without the name do not fit the blob: nobody is ordered.
    let mut unnamed = chunks_seeded(seed, &m, 0, 1);
    if let Msg::ChunksSeeded(c) = &mut unnamed {
        c.name.clear();
    }
    c.say(seeder, unnamed);
    assert!(c.orders().is_empty());

    // With it, the other targets stream under the name.
    c.say(seeder, chunks_seeded(seed, &m, 0, 1));
    let sent = c.orders();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for (_, o) in &sent {
        let wire =
            Manifest::try_from(peers(o).manifest.as_ref().expect("manifest")).expect("valid");
        assert_eq!(wire.name(), m.name());
        assert_eq!(wire.digest(), m.digest());
    }
    // Another agent cannot name the content: its registration of the name is ignored.
    let other: Vec<u8> = data.iter().map(|b| b ^ 1).collect();
    let forged = (Manifest::from_reader(&other[..], shoal_proto::CHUNK_SIZE).expect("manifest"))
        .named(m.name().expect("named"))
        .expect("forged");
    register(&mut c.s, c.sessions[sent[0].0], &forged);
    assert!(c.s.catalog.manifest(&m.digest()).is_none());
    // The last value, the content's digest, comes with the seed's end.
    c.say(seeder, chunks_seeded(seed, &m, 1, 3));
    register(&mut c.s, c.sessions[seeder], &m);
    let got = c.s.catalog.manifest(&m.digest()).expect("registered");
    assert_eq!(got.content_digest(), Some(Digest::of(&data)));
    for (_, o) in c.orders() {
        let wire =
            Manifest::try_from(peers(&o).manifest.as_ref().expect("manifest")).expect("valid");
        assert_eq!(wire, m);
    }
}
