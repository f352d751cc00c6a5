//! Who vouches for a manifest: a registration is its registrant's word until another agent
//! reads the blob whole; one that two targets find wrong is dropped and its registrant
//! quarantined; blobs the catalog lacks are asked of their holders.

use super::persistence::settle;
use super::seeding::{Cluster, cluster, messages};
use super::*;
use crate::state::catalog::Trust;

fn verified(o: &pb::FetchOrder) -> bool {
    match &o.kind {
        Some(pb::fetch_order::Kind::Peers(p)) => p.verified,
        other => panic!("not an order from peers: {other:?}"),
    }
}

/// The one order agent `agent` got since the last look (other agents' are dropped).
fn order_of(c: &mut Cluster, agent: usize) -> pb::FetchOrder {
    let got: Vec<_> = (c.orders().into_iter())
        .filter(|(a, _)| *a == agent)
        .collect();
    match &got[..] {
        [(_, o)] => o.clone(),
        other => panic!("one order for a{agent}: {other:?}"),
    }
}

fn done(m: &Manifest) -> Msg {
    Msg::BlobDone(pb::BlobDone {
        blob_digest: m.digest().as_bytes().to_vec(),
    })
}

fn mismatch(order: &pb::FetchOrder) -> Msg {
    Msg::BlobFailed(pb::BlobFailed {
        order_id: order.order_id,
        blob_digest: order.blob_digest.clone(),
        reason: pb::FailureReason::DigestMismatch as i32,
        message: "the blob does not match its digest".into(),
    })
}

fn whole(m: &Manifest) -> Msg {
    Msg::Inventory(pb::Inventory {
        replace: true,
        blobs: vec![pb::HeldBlob {
            blob_digest: m.digest().as_bytes().to_vec(),
            complete: true,
            ..Default::default()
        }],
        removed_blobs: vec![],
    })
}

/// `m`'s digest and size with chunk digests of other bytes: what a lying agent registers.
fn lie_about(m: &Manifest) -> Manifest {
    let chunks = (0..m.chunk_count())
        .map(|i| Digest::of(&i.to_be_bytes()))
        .collect();
    Manifest::new(m.digest(), m.size(), m.chunk_size(), chunks).expect("manifest")
}

fn asked_to_register(got: &[coordinator_message::Msg]) -> Vec<Digest> {
    (got.iter())
        .filter_map(|m| match m {
            coordinator_message::Msg::RegisterBlobs(r) => Some(&r.blob_digests),
            _ => None,
        })
        .flatten()
        .map(|d| Digest::from_slice(d).expect("digest"))
        .collect()
}

#[test]
fn a_registration_is_vouched_for_only_by_another_agent_that_read_the_blob_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 4);
    let m = manifest();
    register(&mut c.s, c.sessions[0], &m);
    distribute(&mut c.s, m.digest(), &["a1"]).expect("distribute");
    assert!(!verified(&order_of(&mut c, 1)), "only a0's word so far");
    // The registrant saying it again is still only its word.
    c.say(0, done(&m));
    register(&mut c.s, c.sessions[0], &m);
    distribute(&mut c.s, m.digest(), &["a2"]).expect("distribute");
    assert!(!verified(&order_of(&mut c, 2)));
    c.say(1, done(&m));
    distribute(&mut c.s, m.digest(), &["a3"]).expect("distribute");
    assert!(verified(&order_of(&mut c, 3)), "a1 read it whole");

    // Persisted as verified: a restarted coordinator still vouches for it.
    settle(&mut c.s);
    let now = c.s.now;
    drop(c);
    let s = state_at(dir.path(), Duration::from_secs(30), now);
    assert_eq!(s.catalog.trust(&m.digest()), Some(Trust::Verified));
}

/// `trust_registrations`: an operator of trusted nodes takes one agent's word.
#[test]
fn with_trust_registrations_a_registration_is_verified_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = StateConfig {
        trust_registrations: true,
        ..super::config(Duration::from_secs(30))
    };
    let mut s = super::state_with(dir.path(), config, super::start());
    let joined: Vec<_> = (0..2)
        .map(|i| join(&mut s, &format!("a{i}"), 10 + i))
        .collect();
    let (session, _inbox) = open(&mut s, &joined[0]);
    let (_, mut inbox) = open(&mut s, &joined[1]);
    let m = manifest();
    register(&mut s, session, &m);
    assert_eq!(s.catalog.trust(&m.digest()), Some(Trust::Verified));
    distribute(&mut s, m.digest(), &["a1"]).expect("distribute");
    let sent = orders(&mut inbox);
    assert!(sent.len() == 1 && verified(&sent[0]), "{sent:?}");
}

#[test]
fn an_unconfirmed_registration_survives_a_restart_unconfirmed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 1);
    let m = manifest();
    register(&mut c.s, c.sessions[0], &m);
    settle(&mut c.s);
    let now = c.s.now;
    drop(c);
    let s = state_at(dir.path(), Duration::from_secs(30), now);
    assert_eq!(s.catalog.trust(&m.digest()), Some(Trust::Registered));
}

#[test]
fn a_wrong_manifest_is_dropped_by_two_targets_and_its_registrant_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 5);
    let m = manifest();
    // a0 lies first; a4, which holds the real blob, registers it after: the catalog keeps
    // the first, and a4 is a holder of it.
    register(&mut c.s, c.sessions[0], &lie_about(&m));
    register(&mut c.s, c.sessions[4], &m);
    c.say(4, whole(&m));
    let job = distribute(&mut c.s, m.digest(), &["a1", "a2"]).expect("distribute");
    let sent = c.orders();
    let order = |agent| {
        (sent
            .iter()
            .find(|(a, _)| *a == agent)
            .map(|(_, o)| o.clone()))
        .expect("an order")
    };
    let (o1, o2) = (order(1), order(2));
    assert!(!verified(&o1) && !verified(&o2));

    // One target's word is not enough: a1's order fails as any failure does.
    c.say(1, mismatch(&o1));
    assert_eq!(c.s.catalog.trust(&m.digest()), Some(Trust::Registered));
    assert_eq!(target_state(&mut c.s, &job).0, pb::JobState::Running);
    for a in 0..5 {
        messages(&mut c, a);
    }

    // A second target's decides.
    c.say(2, mismatch(&o2));
    assert_eq!(
        c.s.catalog.trust(&m.digest()),
        None,
        "the manifest is dropped"
    );
    let (state, targets) = target_state(&mut c.s, &job);
    assert_eq!(state, pb::JobState::Failed);
    for t in &targets {
        assert!(
            t.message.contains("a0 is quarantined") || t.message.contains("agent a0"),
            "{t:?}"
        );
    }
    let to_liar = messages(&mut c, 0);
    assert!(
        (to_liar.iter())
            .any(|m| matches!(m, coordinator_message::Msg::DropBlob(d) if !d.unpin_only)),
        "the registrant drops its copy: {to_liar:?}"
    );
    assert_eq!(
        asked_to_register(&messages(&mut c, 4)),
        [m.digest()],
        "the other holder is asked"
    );
    let listed =
        c.s.ask(|r| Request::ListAgents(Default::default(), r))
            .expect("list");
    for a in &listed.agents {
        assert_eq!(a.quarantined.is_empty(), a.agent_id != "a0", "{a:?}");
    }

    // The liar's word is no longer taken; the honest holder's registration restores the
    // digest, and the liar is no source of it.
    register(&mut c.s, c.sessions[0], &lie_about(&m));
    c.say(0, whole(&m));
    assert_eq!(c.s.catalog.trust(&m.digest()), None);
    register(&mut c.s, c.sessions[4], &m);
    assert_eq!(c.s.catalog.manifest(&m.digest()).as_deref(), Some(&m));
    c.say(0, whole(&m));
    distribute(&mut c.s, m.digest(), &["a3"]).expect("distribute");
    let o3 = order_of(&mut c, 3);
    let sources: Vec<&str> = sources_of(&o3)
        .iter()
        .map(|s| s.agent_id.as_str())
        .collect();
    assert_eq!(sources, ["a4"]);
}

#[test]
fn blobs_the_catalog_lacks_are_asked_of_two_holders_and_all_count_once_known() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 4);
    let m = manifest();
    for a in 0..3 {
        c.say(a, whole(&m));
    }
    let asked: Vec<usize> = (0..4)
        .filter(|a| !asked_to_register(&messages(&mut c, *a)).is_empty())
        .collect();
    assert_eq!(asked, [0, 1], "two holders at a time");
    register(&mut c.s, c.sessions[0], &m);
    assert_eq!(
        c.s.catalog.complete_holders(&m.digest()),
        3,
        "a2 reported it too"
    );
    assert_eq!(c.s.catalog.trust(&m.digest()), Some(Trust::Registered));
    register(&mut c.s, c.sessions[1], &m);
    assert_eq!(
        c.s.catalog.trust(&m.digest()),
        Some(Trust::Verified),
        "two agents registered the same manifest"
    );
    distribute(&mut c.s, m.digest(), &["a3"]).expect("distribute");
    assert_eq!(sources_of(&order_of(&mut c, 3)).len(), 3);
}
