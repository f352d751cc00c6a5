//! Helpers shared by the content store tests (`#[path]`-included by each `store*.rs`).
#![allow(dead_code)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use shoal_agent::store::{PutOutcome, Store, StoreConfig};
use shoal_proto::{ChunkIndex, Digest, Manifest};

/// Chunk size used by the tests: the smallest a manifest allows.
pub const CHUNK: u32 = 4096;

/// A blob of `len` pseudo-random bytes, different for each `seed`, and its manifest.
pub fn blob(seed: u64, len: usize) -> (Vec<u8>, Manifest) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let manifest = Manifest::from_reader(&data[..], CHUNK).expect("manifest");
    (data, manifest)
}

/// The bytes of chunk `i` of `data`.
pub fn chunk<'a>(data: &'a [u8], manifest: &Manifest, i: u32) -> &'a [u8] {
    let r = manifest.chunk_range(ChunkIndex(i)).expect("chunk in range");
    &data[r.start as usize..r.end as usize]
}

pub fn open(root: &Path, quota_bytes: u64) -> Store {
    Store::open(StoreConfig {
        root: root.to_path_buf(),
        quota_bytes,
    })
    .expect("open store")
}

/// Puts chunks `indices` of `data`, asserting each is new.
pub fn put(
    store: &Store,
    data: &[u8],
    manifest: &Manifest,
    indices: impl IntoIterator<Item = u32>,
) {
    for i in indices {
        let outcome = store
            .put_chunk(&manifest.digest(), ChunkIndex(i), chunk(data, manifest, i))
            .unwrap_or_else(|e| panic!("put chunk {i}: {e}"));
        assert_eq!(outcome, PutOutcome::Stored, "chunk {i}");
    }
}

/// Indices of the chunks the store has for `blob`.
pub fn present(store: &Store, manifest: &Manifest) -> Vec<u32> {
    manifest
        .chunk_indices()
        .filter(|&i| store.has_chunk(&manifest.digest(), i))
        .map(|i| i.0)
        .collect()
}

/// Asserts every present chunk reads back as the original bytes.
pub fn assert_present_chunks_match(store: &Store, data: &[u8], manifest: &Manifest) {
    for i in present(store, manifest) {
        let got = store
            .get_chunk(&manifest.digest(), ChunkIndex(i))
            .expect("get present chunk");
        assert_eq!(&got[..], chunk(data, manifest, i), "chunk {i} bytes");
    }
}

pub fn blobs_dir(root: &Path) -> PathBuf {
    root.join("blobs")
}

pub fn data_file(root: &Path, blob: &Digest) -> PathBuf {
    blobs_dir(root).join(format!("{}.data", blob.hex()))
}

pub fn journal_file(root: &Path, blob: &Digest) -> PathBuf {
    blobs_dir(root).join(format!("{}.chunks", blob.hex()))
}

pub fn manifest_file(root: &Path, blob: &Digest) -> PathBuf {
    blobs_dir(root).join(format!("{}.manifest", blob.hex()))
}

/// Overwrites bytes of a file behind the store's back.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(bytes, offset).expect("write");
}

/// Appends bytes to a file behind the store's back.
pub fn append(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .expect("open for appending");
    std::io::Write::write_all(&mut f, bytes).expect("append");
}

/// A journal chunk record as the store writes it.
pub fn chunk_record(i: u32) -> [u8; 8] {
    let mut r = [0u8; 8];
    r[..4].copy_from_slice(&i.to_le_bytes());
    r[4..].copy_from_slice(&(!i).to_le_bytes());
    r
}

/// Flips one byte of chunk `i` in the blob's data file.
pub fn corrupt_chunk_on_disk(root: &Path, manifest: &Manifest, i: u32) {
    let path = data_file(root, &manifest.digest());
    let offset = manifest.chunk_range(ChunkIndex(i)).expect("range").start + 10;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open data");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).expect("write");
}
