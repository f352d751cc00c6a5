//! Micro benchmarks of the per-byte costs on the data path: hashing, the store, the codec.
//! Run with `cargo bench -p shoal-benches --bench micro`.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal_agent::store::{ChunkCheck, Reread, Store, StoreConfig};
use shoal_proto::wire::{self, Frame};
use shoal_proto::{CHUNK_SIZE, ChunkIndex, Digest, ManifestBuilder};

const CHUNKS: u32 = 256;

fn chunk() -> Vec<u8> {
    (0..CHUNK_SIZE as usize)
        .map(|i| (i * 7 % 251) as u8)
        .collect()
}

fn sha256(c: &mut Criterion) {
    let data = chunk();
    let mut g = c.benchmark_group("sha256");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("1MiB", |b| b.iter(|| Digest::of(black_box(&data))));
    g.finish();
    // Making a manifest (a push, a seed): chained hashes each byte once, plain twice (the
    // blob's hash and the chunk's).
    let mut g = c.benchmark_group("manifest_build");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("chained 1MiB", |b| {
        let mut builder = ManifestBuilder::new(CHUNK_SIZE).expect("builder");
        b.iter(|| builder.update(black_box(&data)))
    });
    g.bench_function("plain 1MiB", |b| {
        let mut builder = ManifestBuilder::plain(CHUNK_SIZE).expect("builder");
        b.iter(|| builder.update(black_box(&data)))
    });
    g.finish();
}

fn store(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(StoreConfig {
        root: dir.path().into(),
        quota_bytes: 1 << 40,
    })
    .expect("store");
    // A 256 MiB blob whose chunks all hold the same bytes, so one buffer serves every put.
    let data = chunk();
    let mut builder = ManifestBuilder::new(CHUNK_SIZE).expect("builder");
    for _ in 0..CHUNKS {
        builder.update(&data);
    }
    let manifest = builder.finish().expect("manifest");
    store.insert_manifest(&manifest).expect("insert");

    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Bytes(data.len() as u64));
    let mut i = 0u32;
    g.bench_function("put_chunk_1MiB (verify + write)", |b| {
        b.iter(|| {
            // Remove and re-insert once all are present so every put really writes.
            if i == CHUNKS {
                store.remove(&manifest.digest()).expect("remove");
                store.insert_manifest(&manifest).expect("insert");
                i = 0;
            }
            store
                .put_chunk(&manifest.digest(), ChunkIndex(i), &data)
                .expect("put");
            i += 1;
        })
    });
    for i in manifest.chunk_indices() {
        store.put_chunk(&manifest.digest(), i, &data).expect("put");
    }
    let mut i = 0u32;
    g.bench_function("get_chunk_1MiB", |b| {
        b.iter(|| {
            i = (i + 1) % CHUNKS;
            black_box(
                store
                    .get_chunk(&manifest.digest(), ChunkIndex(i))
                    .expect("get"),
            )
        })
    });
    // What serving would cost if it re-hashed every chunk it reads (it does not).
    let mut i = 0u32;
    g.bench_function("get_chunk_1MiB + verify (verify on serve)", |b| {
        b.iter(|| {
            i = (i + 1) % CHUNKS;
            let data = store
                .get_chunk(&manifest.digest(), ChunkIndex(i))
                .expect("get");
            manifest.verify_chunk(ChunkIndex(i), &data).expect("intact");
            black_box(data)
        })
    });
    // The scrub's read: O_DIRECT from the disk, then SHA-256.
    let mut i = 0u32;
    g.bench_function("check_chunk_1MiB (scrub: O_DIRECT + verify)", |b| {
        b.iter(|| {
            i = (i + 1) % CHUNKS;
            let checked = store
                .check_chunk(&manifest.digest(), ChunkIndex(i), Reread::Disk)
                .expect("check");
            assert_eq!(checked, ChunkCheck::Intact);
        })
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    let data = Bytes::from(chunk());
    let frame = Frame::ChunkData {
        index: ChunkIndex(3),
        data: data.clone(),
    };
    let encoded = frame.to_bytes();
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("decode_chunk_1MiB (zero-copy)", |b| {
        b.iter(|| {
            let mut buf = encoded.clone();
            black_box(wire::decode(&mut buf).expect("valid"))
        })
    });
    g.bench_function("chunk_data_header", |b| {
        b.iter(|| black_box(wire::chunk_data_header(ChunkIndex(3), data.len())))
    });
    let request = Frame::ChunkRequest {
        blob: Digest::of(b"x"),
        index: ChunkIndex(9),
    };
    g.throughput(Throughput::Elements(1));
    g.bench_function("request_round_trip", |b| {
        let mut buf = BytesMut::with_capacity(64);
        b.iter(|| {
            request.encode(&mut buf);
            black_box(wire::decode(&mut buf).expect("valid"))
        })
    });
    g.finish();
}

criterion_group!(benches, sha256, store, codec);
criterion_main!(benches);
