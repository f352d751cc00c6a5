//! A blob registered with a provisional manifest (being seeded elsewhere, its chunk
//! digests arriving as the seeder stores them): no chunk is accepted before its digest is
//! known, learned digests never change, a manifest that agrees teaches the rest, and a
//! provisional blob does not survive a restart, since nothing vouches for its unknown
//! digests.

#[path = "support/store.rs"]
mod util;

use shoal_agent::store::StoreError;
use shoal_proto::{ChunkIndex, Digest, Manifest, VerifyError};
use util::*;

const QUOTA: u64 = 1 << 30;

#[test]
fn chunks_go_in_only_once_their_digests_are_learned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(1, 3 * CHUNK as usize + 10);
    let d = m.digest();
    let provisional = Manifest::provisional(d, m.size(), CHUNK).expect("provisional");
    store.insert_manifest(&provisional).expect("insert");
    store.insert_manifest(&provisional).expect("idempotent");
    assert!(matches!(
        store.put_chunk(&d, ChunkIndex(1), chunk(&data, &m, 1)),
        Err(StoreError::Verify(VerifyError::UnknownDigest { .. }))
    ));
    assert!(present(&store, &m).is_empty());

    let digests = m.chunk_digests();
    assert!(matches!(store.learn_digests(&d, 1, &digests[1..2]), Ok(1)));
    // Chained: chunk 1 is checked from chunk 0's value, not known yet.
    assert!(matches!(
        store.put_chunk(&d, ChunkIndex(1), chunk(&data, &m, 1)),
        Err(StoreError::Verify(VerifyError::UnknownDigest {
            index: ChunkIndex(0)
        }))
    ));
    assert!(matches!(store.learn_digests(&d, 0, &digests[..1]), Ok(1)));
    put(&store, &data, &m, [1]);
    // A wrong chunk against a learned digest is refused as ever.
    store
        .learn_digests(&d, 2, &digests[2..3])
        .expect("learn chunk 2");
    let mut bad = chunk(&data, &m, 2).to_vec();
    bad[0] ^= 1;
    assert!(matches!(
        store.put_chunk(&d, ChunkIndex(2), &bad),
        Err(StoreError::Verify(VerifyError::WrongChain { .. }))
    ));
    // A contradiction is refused and changes nothing.
    let wrong = [Digest::of(b"not chunk 1")];
    assert!(matches!(
        store.learn_digests(&d, 1, &wrong),
        Err(StoreError::DigestConflict(_))
    ));
    assert!(matches!(
        store.learn_digests(&d, 3, &digests[..2]),
        Err(StoreError::DigestConflict(_))
    ));
    assert_eq!(
        store.manifest(&d).map(|m| m.known_count()),
        Some(3),
        "nothing learned from refused digests"
    );
    // The seeded blob's real manifest teaches the rest; one that disagrees is a conflict.
    let (_, other) = blob(2, m.size() as usize);
    let lying = Manifest::new(d, m.size(), CHUNK, other.chunk_digests().to_vec()).expect("m");
    assert!(matches!(
        store.insert_manifest(&lying),
        Err(StoreError::ManifestConflict(_))
    ));
    store.insert_manifest(&m).expect("the real manifest");
    assert_eq!(store.manifest(&d).as_deref(), Some(&m));
    put(&store, &data, &m, [0, 2, 3]);
    assert!(store.is_complete(&d));
    store.verify_blob(&d).expect("whole blob matches");

    // Complete, its manifest file is the real one: it survives a restart.
    drop(store);
    let store = open(dir.path(), QUOTA);
    assert_eq!(store.manifest(&d).as_deref(), Some(&m));
    assert_eq!(present(&store, &m), vec![0, 1, 2, 3]);
}

#[test]
fn a_blob_still_provisional_is_dropped_at_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(3, 2 * CHUNK as usize);
    let d = m.digest();
    let provisional = Manifest::provisional(d, m.size(), CHUNK).expect("provisional");
    store.insert_manifest(&provisional).expect("insert");
    store
        .learn_digests(&d, 0, &m.chunk_digests()[..1])
        .expect("learn");
    put(&store, &data, &m, [0]);
    store.flush().expect("flush");
    drop(store);
    let store = open(dir.path(), QUOTA);
    assert!(store.manifest(&d).is_none(), "dropped, to be fetched again");
    assert_eq!(store.usage_bytes(), 0);
}

#[test]
fn a_provisional_manifest_for_a_blob_held_whole_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(4, 2 * CHUNK as usize + 1);
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, [0, 1, 2]);
    let provisional = Manifest::provisional(m.digest(), m.size(), CHUNK).expect("provisional");
    store.insert_manifest(&provisional).expect("agrees");
    assert_eq!(store.manifest(&m.digest()).as_deref(), Some(&m));
    let shorter = Manifest::provisional(m.digest(), m.size() - 1, CHUNK).expect("provisional");
    assert!(matches!(
        store.insert_manifest(&shorter),
        Err(StoreError::ManifestConflict(_))
    ));
    // A stream's (chained) provisional manifest is never completed by plain chunk digests:
    // they are values of another kind.
    let (odata, om) = blob(7, 2 * CHUNK as usize);
    let provisional = Manifest::provisional(om.digest(), om.size(), CHUNK).expect("provisional");
    store.insert_manifest(&provisional).expect("insert");
    let mut plain = shoal_proto::ManifestBuilder::plain(CHUNK).expect("builder");
    plain.update(&odata);
    assert!(matches!(
        store.insert_manifest(&plain.finish().expect("manifest")),
        Err(StoreError::ManifestConflict(_))
    ));
    store
        .insert_manifest(&om)
        .expect("the chained one completes it");
}

#[test]
fn a_complete_blob_vouched_for_by_a_verified_manifest_is_not_read_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path(), QUOTA);
    let (data, m) = blob(5, 3 * CHUNK as usize);
    let d = m.digest();
    store.insert_manifest(&m).expect("insert");
    put(&store, &data, &m, [0, 1]);
    assert!(matches!(
        store.trust_verified(&d),
        Err(StoreError::ChunkMissing { .. })
    ));
    put(&store, &data, &m, [2]);
    store.trust_verified(&d).expect("complete");
    // Trusted: not read again, even after the data changed behind the store's back (which
    // only a full verify_blob finds).
    let data_file = store.data_path(&d).expect("data file");
    std::fs::write(&data_file, vec![0u8; data.len()]).expect("alter");
    store.ensure_verified(&d).expect("trusted, not read");
    assert!(matches!(store.verify_blob(&d), Err(StoreError::Verify(_))));
    // A provisional manifest vouches for nothing.
    let (pdata, pm) = blob(6, CHUNK as usize);
    let provisional = Manifest::provisional(pm.digest(), pm.size(), CHUNK).expect("provisional");
    store.insert_manifest(&provisional).expect("insert");
    assert!(store.trust_verified(&pm.digest()).is_err());
    let _ = pdata;
}
