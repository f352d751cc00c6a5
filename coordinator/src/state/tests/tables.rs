//! Orders that leave a large chunk table to the agent's sources: the order names the
//! table's digest, a source that holds the blob serves the table, and the coordinator sends
//! it only when asked (`TableWanted`) or when no source could have it.

use super::seeding::{Cluster, cluster, distribute_from_origin, http_origin, messages};
use super::*;
use shoal_planner::HostId;

/// A blob of `chunks` chunks of 4 KiB.
fn blob_of(chunks: u32) -> Manifest {
    let data: Vec<u8> = (0..chunks * 4096)
        .map(|i| (i % 253) as u8 ^ (i >> 12) as u8)
        .collect();
    Manifest::from_reader(&data[..], 4096).expect("manifest")
}

fn peers(o: &pb::FetchOrder) -> &pb::FromPeers {
    match &o.kind {
        Some(pb::fetch_order::Kind::Peers(p)) => p,
        other => panic!("not an order from peers: {other:?}"),
    }
}

fn table(m: &Manifest) -> Vec<u8> {
    Digest::table_bytes(m.chunk_digests())
}

/// Asserts the order carries `m` without its table, and the table's digest.
fn assert_slim(o: &pb::FetchOrder, m: &Manifest) {
    let p = peers(o);
    let wire = p.manifest.as_ref().expect("manifest");
    assert!(wire.chunk_digests.is_empty(), "no table in the order");
    assert_eq!(p.table_digest, Digest::of(&table(m)).as_bytes().to_vec());
    assert_eq!((wire.size, wire.chunk_size), (m.size(), m.chunk_size()));
    assert_eq!(wire.digest, m.digest().as_bytes().to_vec());
}

/// Asserts the order carries `m` whole.
fn assert_whole(o: &pb::FetchOrder, m: &Manifest) {
    let p = peers(o);
    assert!(p.table_digest.is_empty(), "{p:?}");
    let wire = p.manifest.as_ref().expect("manifest");
    assert_eq!(wire.chunk_digests, table(m));
}

fn table_wanted(o: &pb::FetchOrder) -> Msg {
    Msg::TableWanted(pb::TableWanted {
        order_id: o.order_id,
        blob_digest: o.blob_digest.clone(),
    })
}

fn digests_sent(c: &mut Cluster, agent: usize) -> Vec<pb::ChunkDigests> {
    (messages(c, agent).into_iter())
        .filter_map(|m| match m {
            coordinator_message::Msg::ChunkDigests(d) => Some(d),
            _ => None,
        })
        .collect()
}

#[test]
fn a_large_table_is_left_to_a_source_that_holds_the_blob_and_sent_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let (large, small) = (blob_of(65), blob_of(64));
    register(&mut c.s, c.sessions[0], &large);
    register(&mut c.s, c.sessions[0], &small);

    distribute(&mut c.s, large.digest(), &["a1", "a2"]).expect("distribute");
    let sent = c.orders();
    assert_eq!(sent.len(), 2, "{sent:?}");
    for (_, o) in &sent {
        assert_eq!(sources_of(o)[0].agent_id, "a0");
        assert_slim(o, &large);
    }
    // Up to 64 chunks, one round trip to a peer costs more than the table.
    distribute(&mut c.s, small.digest(), &["a1"]).expect("distribute");
    let (_, o) = c.orders().pop().expect("an order");
    assert_whole(&o, &small);

    // No source served it: the whole table, for that order.
    let (agent, o) = &sent[0];
    c.say(*agent, table_wanted(o));
    let got = digests_sent(&mut c, *agent);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(
        (got[0].order_id, got[0].first_chunk),
        (o.order_id, 0),
        "{got:?}"
    );
    assert_eq!(got[0].chunk_digests, table(&large));
    // An order that is not (or no longer) the agent's gets no table but a cancel: its task
    // would otherwise wait for an answer.
    let mut stale = o.clone();
    stale.order_id += 1000;
    c.say(*agent, table_wanted(&stale));
    let other = if *agent == 1 { 2 } else { 1 };
    c.say(other, table_wanted(o));
    for (who, id) in [(*agent, stale.order_id), (other, o.order_id)] {
        let got = messages(&mut c, who);
        assert!(
            matches!(&got[..], [coordinator_message::Msg::Cancel(x)] if x.order_id == id),
            "{got:?}"
        );
    }
}

#[test]
fn a_manifest_assembled_from_ranges_goes_whole_to_its_range_seeders() {
    use super::seeding::{range_seeded, sized_origin};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    // 80 chunks of 1 MiB (the chunk size of assembled manifests); the coordinator never
    // reads the bytes, so made-up digests do.
    let chunks: Vec<Digest> = (0..80u8).map(|i| Digest::of(&[i])).collect();
    let m = Manifest::new(
        Digest::of(b"big"),
        80 << 20,
        shoal_proto::CHUNK_SIZE,
        chunks,
    )
    .expect("manifest");
    distribute_from_origin(
        &mut c.s,
        m.digest(),
        &["a0", "a1", "a2"],
        sized_origin(m.size()),
    )
    .expect("distribute");
    let sent = c.orders();
    assert_eq!(sent.len(), 3, "one range each: {sent:?}");
    for (agent, order) in &sent {
        range_seeded(&mut c, *agent, order, &m);
    }
    // Each seeder's sources are the others, whose ranges wait for this very table.
    let ordered = c.orders();
    assert_eq!(ordered.len(), 3, "{ordered:?}");
    for (_, o) in &ordered {
        assert_whole(o, &m);
    }
}

#[test]
fn a_stream_target_gets_the_whole_table_and_a_later_target_the_digest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 3);
    let m = blob_of(80);
    distribute_from_origin(&mut c.s, m.digest(), &["a0", "a1"], http_origin()).expect("distribute");
    let (seeder, seed) = c.orders().pop().expect("one seed order");
    let target = 1 - seeder;
    c.say(
        seeder,
        Msg::ChunksSeeded(pb::ChunksSeeded {
            order_id: seed.order_id,
            blob_digest: seed.blob_digest.clone(),
            first_chunk: 0,
            chunk_digests: Digest::table_bytes(&m.chunk_digests()[..79]),
            size: m.size(),
            chunk_size: m.chunk_size(),
            name: String::new(),
        }),
    );
    let (agent, streamed) = c.orders().pop().expect("a stream order");
    assert_eq!(agent, target);
    assert!(peers(&streamed).provisional);
    // The seed ends: the stream's order goes on, and its resend brings the last digest,
    // whose table the agent needs (it runs the order under the provisional manifest).
    register(&mut c.s, c.sessions[seeder], &m);
    let resent: Vec<_> = (c.orders().into_iter())
        .filter(|(a, _)| *a == target)
        .collect();
    assert_eq!(resent.len(), 1, "{resent:?}");
    assert_eq!(resent[0].1.order_id, streamed.order_id);
    assert_whole(&resent[0].1, &m);

    // A target that comes later fetches from holders: the digest only.
    distribute(&mut c.s, m.digest(), &["a2"]).expect("distribute");
    let (_, later) = c.orders().pop().expect("an order");
    assert_slim(&later, &m);
}

#[test]
fn a_source_that_runs_an_order_for_the_blob_or_waits_for_one_will_serve_the_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = cluster(dir.path(), 4);
    let m = blob_of(65);
    register(&mut c.s, c.sessions[0], &m);
    let blob = m.digest();
    let host = |c: &Cluster, i: usize| c.s.agents.host_of(&format!("a{i}")).expect("host");
    let (h1, h2, h3) = (host(&c, 1), host(&c, 2), host(&c, 3));
    let deliver = |c: &mut Cluster, to: HostId, from: HostId| {
        c.s.orders.issue_peers(to, blob, [(from, (0, 0))].into());
        c.s.deliver_order(to, blob);
    };
    // a2 holds nothing and is wanted by no job: it would never have the table.
    deliver(&mut c, h1, h2);
    let (_, o) = c.orders().pop().expect("an order");
    assert_whole(&o, &m);
    // a2 runs an order from peers for the blob: it has the table, or is learning it.
    deliver(&mut c, h2, h3);
    c.orders();
    deliver(&mut c, h1, h2);
    let (_, o) = c.orders().pop().expect("an order");
    assert_slim(&o, &m);
    // a3 is wanted by a job, its order still to come.
    distribute(&mut c.s, blob, &["a3"]).expect("distribute");
    c.s.orders.remove(h3, blob);
    c.orders();
    deliver(&mut c, h1, h3);
    let (_, o) = c.orders().pop().expect("an order");
    assert_slim(&o, &m);
}
