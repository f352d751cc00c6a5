//! Seeding: an order without a manifest. This agent fetches the blob from its origin (an OCI
//! registry or an HTTP URL), builds the manifest while the bytes arrive, checks the whole
//! blob against its digest, stores it and registers the manifest, so that every other agent
//! can fetch it from peers (see the coordinator's `seeding.rs`).
//!
//! The bytes go to a part file first: chunk digests are unknown until the end, and the store
//! holds only verified chunks. While the fetch runs, the part file and how much of it is
//! written are published in [`Ingests`], so that the OCI mirror can stream the blob to a
//! client on this agent from its first byte (the client checks the digest itself, as it
//! does with any registry; the store never holds an unverified byte).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_origin::{ByteRange, OriginError};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::FailureReason;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::{Digest, Manifest, ManifestBuilder};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::agent::Shared;
use crate::order::Failure;

/// Bytes written to the part file between two flushes that let readers see them.
const PUBLISH_EVERY: u64 = 256 << 10;

/// Flushes the part file, then tells readers how much of it they may read.
async fn publish(
    file: &mut tokio::io::BufWriter<tokio::fs::File>,
    written: u64,
    published: &mut u64,
    tx: &watch::Sender<IngestState>,
) -> Result<(), OriginError> {
    file.flush()
        .await
        .map_err(|e| OriginError::Unreachable(format!("writing the part file: {e}")))?;
    metrics::counter!(crate::metrics::BYTES_IN, "source" => crate::metrics::SOURCE_ORIGIN)
        .increment(written - *published);
    *published = written;
    tx.send_replace(IngestState::Writing { written });
    Ok(())
}

/// Attempts per seed order; after the first, each resumes where the last one stopped.
const ATTEMPTS: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Where a running ingest stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum IngestState {
    /// Bytes written to the part file so far.
    Writing {
        written: u64,
    },
    /// Verified and in the store.
    Done,
    Failed(String),
}

/// A running ingest, as the mirror sees it.
#[derive(Clone, Debug)]
pub(crate) struct Ingest {
    pub part: PathBuf,
    pub state: watch::Receiver<IngestState>,
}

/// The ingests running on this agent, by blob, and the ranges it seeded.
#[derive(Debug, Default)]
pub(crate) struct Ingests {
    table: Mutex<HashMap<Digest, Ingest>>,
    /// By (blob, first chunk): an agent may seed several ranges of one blob.
    ranges: Mutex<HashMap<(Digest, u32), RangePart>>,
}

/// A range seeded here, waiting in its part file for the blob's manifest.
#[derive(Debug)]
struct RangePart {
    part: PathBuf,
    first_chunk: u32,
    chunks: u32,
}

impl Ingests {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Ingest>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, blob: &Digest) -> Option<Ingest> {
        self.lock().get(blob).cloned()
    }

    fn ranges_lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Digest, u32), RangePart>> {
        self.ranges.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A part file removed when dropped, unless taken.
struct PartFile(Option<PathBuf>);

impl Drop for PartFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Removes the table entry and the part file, however the ingest ends.
/// (Readers that opened the part file keep reading it; nobody new finds it.)
struct Registration<'a> {
    ingests: &'a Ingests,
    blob: Digest,
    _part: PartFile,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.ingests.lock().remove(&self.blob);
    }
}

/// The directory of part files, beside the store (same filesystem), created if missing.
async fn part_dir(shared: &Shared) -> Result<PathBuf, Failure> {
    let dir = shared.config.data_dir.join("ingest");
    tokio::fs::create_dir_all(&dir).await.map_err(|e| {
        Failure::new(
            FailureReason::IoError,
            format!("creating {}: {e}", dir.display()),
        )
    })?;
    Ok(dir)
}

/// Maps an origin's answer to what the coordinator should do: a definitive answer (the
/// origin lacks the blob, or serves other bytes) fails every target; anything else lets
/// another agent try.
fn origin_failure(e: &OriginError) -> Failure {
    let reason = match e {
        OriginError::NotFound(_) | OriginError::Invalid(_) | OriginError::TooLarge { .. } => {
            FailureReason::Invalid
        }
        OriginError::DigestMismatch { .. } => FailureReason::DigestMismatch,
        _ => FailureReason::OriginError,
    };
    Failure::new(reason, e.to_string())
}

/// Fetches `blob` from `origin` into the store and registers it. Returns (size, bytes
/// fetched from the origin).
pub(crate) async fn ingest(
    shared: &Arc<Shared>,
    order: &pb::FetchOrder,
    from: &pb::FromOrigin,
    blob: Digest,
) -> Result<(u64, u64), Failure> {
    let origin = (from.origin.as_ref().and_then(|o| o.origin.clone()))
        .ok_or_else(|| Failure::new(FailureReason::Invalid, "a seed order without an origin"))?;
    if let Some(m) = shared
        .store
        .manifest(&blob)
        .filter(|_| shared.store.is_complete(&blob))
    {
        register(shared, &m, order);
        return Ok((m.size(), 0));
    }
    let dir = part_dir(shared).await?;
    let part = dir.join(format!("{}.{}.part", blob.hex(), order.order_id));
    let (tx, rx) = watch::channel(IngestState::Writing { written: 0 });
    shared.ingests.lock().insert(
        blob,
        Ingest {
            part: part.clone(),
            state: rx,
        },
    );
    let _registration = Registration {
        ingests: &shared.ingests,
        blob,
        _part: PartFile(Some(part.clone())),
    };
    let outcome = fetch_and_store(shared, order, blob, &origin, &part, &tx).await;
    let _ = tx.send(match &outcome {
        Ok(_) => IngestState::Done,
        Err(f) => IngestState::Failed(f.message.clone()),
    });
    outcome
}

async fn fetch_and_store(
    shared: &Arc<Shared>,
    order: &pb::FetchOrder,
    blob: Digest,
    origin: &pb::origin::Origin,
    part: &std::path::Path,
    tx: &watch::Sender<IngestState>,
) -> Result<(u64, u64), Failure> {
    let (manifest, written) = fetch(shared, origin, blob, Some(blob), part, tx, None).await?;
    store_part(shared, &manifest, part).await?;
    register(shared, &manifest, order);
    Ok((manifest.size(), written))
}

/// Fetches the origin's content into `part`, resuming after a broken transfer, and builds
/// its manifest; checks it against `expected` if given. Returns (manifest, bytes fetched).
/// A range of a blob to fetch, and the chunk size its digests are computed with.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    chunk_size: u32,
}

/// `blob` addresses the content at an OCI origin; `expected` is the digest the content
/// must have, checked at the end (none for a range, or a URL without a digest).
#[allow(clippy::too_many_arguments)]
async fn fetch(
    shared: &Shared,
    origin: &pb::origin::Origin,
    blob: Digest,
    expected: Option<Digest>,
    part: &std::path::Path,
    tx: &watch::Sender<IngestState>,
    span: Option<Span>,
) -> Result<(Manifest, u64), Failure> {
    let io = |what: &str, e: std::io::Error| {
        Failure::new(
            FailureReason::IoError,
            format!("{what} {}: {e}", part.display()),
        )
    };
    // Body pieces are a few KiB: buffered, the part file gets one write per PUBLISH_EVERY
    // instead of one blocking hand-off per piece.
    let file = tokio::fs::File::create(part)
        .await
        .map_err(|e| io("creating", e))?;
    let mut file = tokio::io::BufWriter::with_capacity(PUBLISH_EVERY as usize, file);
    let chunk_size = span.map_or(shared.config.chunk_size, |s| s.chunk_size);
    let mut builder = ManifestBuilder::new(chunk_size)
        .map_err(|e| Failure::new(FailureReason::Internal, e.to_string()))?;
    let mut written = 0u64;
    let mut published = 0u64;
    let mut size = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let range = match span {
            Some(s) => Some(ByteRange {
                start: s.start + written,
                end_inclusive: Some(s.end - 1),
            }),
            None => (written > 0).then_some(ByteRange {
                start: written,
                end_inclusive: None,
            }),
        };
        let read = async {
            // An origin that ignores Range still gives exactly the range: the client skips
            // what comes before it.
            let mut body = open(shared, origin, &blob, range).await?;
            if size.is_none() {
                size = body.len.map(|l| l + written);
            }
            while let Some(bytes) = body.chunk().await? {
                if written + bytes.len() as u64 > shoal_proto::MAX_BLOB_SIZE {
                    return Err(OriginError::TooLarge {
                        what: "blob".into(),
                        limit: shoal_proto::MAX_BLOB_SIZE,
                    });
                }
                file.write_all(&bytes)
                    .await
                    .map_err(|e| OriginError::Unreachable(format!("writing the part file: {e}")))?;
                builder.update(&bytes);
                written += bytes.len() as u64;
                // Readers of the part file (the mirror) may only see flushed bytes.
                if written - published >= PUBLISH_EVERY {
                    publish(&mut file, written, &mut published, tx).await?;
                }
            }
            publish(&mut file, written, &mut published, tx).await?;
            Ok(())
        };
        match read.await {
            Ok(()) => break,
            Err(e) => {
                let failure = origin_failure(&e);
                let retry = failure.reason == FailureReason::OriginError && attempt < ATTEMPTS;
                tracing::warn!(?expected, attempt, written, error = %e, retry, "origin fetch failed");
                if !retry {
                    return Err(failure);
                }
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
    file.flush().await.map_err(|e| io("writing", e))?;
    drop(file);
    if size.is_some_and(|s| s != written) {
        return Err(Failure::new(
            FailureReason::OriginError,
            format!("the origin announced {size:?} bytes and sent {written}"),
        ));
    }
    let manifest = builder.finish().map_err(|e| {
        Failure::new(
            FailureReason::Invalid,
            format!("the origin's content cannot be a blob: {e}"),
        )
    })?;
    if let Some(want) = expected.filter(|d| *d != manifest.digest()) {
        return Err(Failure::new(
            FailureReason::DigestMismatch,
            format!(
                "the origin's content hashes to {}, expected {want}",
                manifest.digest()
            ),
        ));
    }
    Ok((manifest, written))
}

/// Fetches a URL whose digest is not known into the store, on this agent alone, and
/// registers it. (With a digest, a pull goes through the coordinator's seeding instead, so
/// that the cluster fetches it once.)
pub(crate) async fn fetch_url(shared: &Arc<Shared>, url: &str) -> Result<Manifest, Failure> {
    let origin = pb::origin::Origin::Http(pb::HttpOrigin {
        url: url.to_string(),
        headers: Default::default(),
        size: 0,
    });
    let dir = part_dir(shared).await?;
    let part = dir.join(format!("url-{:016x}.part", rand::random::<u64>()));
    let (tx, _rx) = watch::channel(IngestState::Writing { written: 0 });
    let _part = PartFile(Some(part.clone()));
    // A URL addresses its content itself: the digest argument is unused for it.
    let unaddressed = Digest::from_bytes([0; 32]);
    let (manifest, _) = fetch(shared, &origin, unaddressed, None, &part, &tx, None).await?;
    store_part(shared, &manifest, &part).await?;
    register(shared, &manifest, &pb::FetchOrder::default());
    Ok(manifest)
}

async fn open(
    shared: &Shared,
    origin: &pb::origin::Origin,
    blob: &Digest,
    range: Option<ByteRange>,
) -> Result<shoal_origin::Body, OriginError> {
    use pb::origin::Origin as O;
    match origin {
        O::Http(h) => {
            let headers: Vec<(String, String)> = (h.headers.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            shared.origin.get_url(&h.url, &headers, range).await
        }
        O::Oci(o) => {
            (shared.origin)
                .get_blob(&o.registry, &o.repository, blob, range)
                .await
        }
    }
}

/// Copies the verified part file into the store, chunk by chunk (the store checks each
/// chunk against the manifest once more).
async fn store_part(
    shared: &Shared,
    manifest: &Manifest,
    part: &std::path::Path,
) -> Result<(), Failure> {
    let store = shared.store.clone();
    let manifest = manifest.clone();
    let part = part.to_path_buf();
    let copied = tokio::task::spawn_blocking(move || -> Result<(), Failure> {
        // This agent's store disagreeing (another manifest for the digest) says nothing
        // about the origin: another seeder may succeed, so not a definitive failure.
        let from_store = |e: &crate::store::StoreError| {
            let mut f = Failure::from_store(e);
            if matches!(e, crate::store::StoreError::ManifestConflict(_)) {
                f.reason = FailureReason::IoError;
            }
            f
        };
        store
            .insert_manifest(&manifest)
            .map_err(|e| from_store(&e))?;
        let digest = manifest.digest();
        let _hold = store.hold(&digest).map_err(|e| from_store(&e))?;
        copy_chunks(&store, &manifest, &part, manifest.chunk_indices()).map_err(|e| match e {
            CopyError::Read(e) => Failure::new(
                FailureReason::IoError,
                format!("reading {}: {e}", part.display()),
            ),
            CopyError::Store(e) => from_store(&e),
        })?;
        store.ensure_verified(&digest).map_err(|e| from_store(&e))
    });
    copied
        .await
        .map_err(|e| Failure::new(FailureReason::Internal, format!("store task failed: {e}")))?
}

enum CopyError {
    Read(std::io::Error),
    Store(crate::store::StoreError),
}

/// Moves the chunks `indices` of `manifest`, laid out one after another in the file at
/// `part`, into the store (each verified there); returns how many were new. Blocking.
fn copy_chunks(
    store: &crate::store::Store,
    manifest: &Manifest,
    part: &std::path::Path,
    indices: impl Iterator<Item = shoal_proto::ChunkIndex>,
) -> Result<u32, CopyError> {
    use std::io::Read;
    let digest = manifest.digest();
    let mut file = std::fs::File::open(part).map_err(CopyError::Read)?;
    let mut buf = vec![0u8; manifest.chunk_size() as usize];
    let mut stored = 0;
    for index in indices {
        let len = manifest
            .chunk_len(index)
            .map_err(|e| CopyError::Store(e.into()))?;
        file.read_exact(&mut buf[..len]).map_err(CopyError::Read)?;
        let outcome = (store.put_chunk(&digest, index, &buf[..len])).map_err(CopyError::Store)?;
        if outcome == crate::store::PutOutcome::Stored {
            stored += 1;
        }
    }
    Ok(stored)
}

fn register(shared: &Shared, manifest: &Manifest, order: &pb::FetchOrder) {
    tracing::info!(blob = %manifest.digest(), size = manifest.size(), "seeded from the origin");
    shared.send(Msg::BlobRegistered(pb::BlobRegistered {
        manifest: Some(pb::Manifest::from(manifest)),
        pinned: false,
        order_id: order.order_id,
    }));
}

/// A striped seed order: fetches one range of the blob from the origin, keeps the bytes in
/// a part file, and reports the range's chunk digests (`RangeSeeded`). The bytes go into the
/// store when the manifest comes, with the blob's ordinary order ([`import_range`]).
pub(crate) async fn seed_range(
    shared: &Arc<Shared>,
    order: &pb::FetchOrder,
    range: &pb::OriginRange,
    blob: Digest,
) -> Result<(), Failure> {
    let origin = (range.origin.as_ref().and_then(|o| o.origin.clone())).ok_or_else(|| {
        Failure::new(
            FailureReason::Invalid,
            "a range seed order without an origin",
        )
    })?;
    let span = Span {
        start: range.start,
        end: range.end,
        chunk_size: range.chunk_size,
    };
    let chunk = u64::from(span.chunk_size);
    if chunk == 0 || span.start % chunk != 0 || span.end <= span.start {
        return Err(Failure::new(
            FailureReason::Invalid,
            format!(
                "bad range {}..{} of chunk size {chunk}",
                span.start, span.end
            ),
        ));
    }
    let dir = part_dir(shared).await?;
    let part = dir.join(format!("{}.range-{}.part", blob.hex(), span.start));
    let (tx, _rx) = watch::channel(IngestState::Writing { written: 0 });
    // Removed unless the range is kept: on failure, and when the order is cancelled (this
    // future dropped).
    let mut unkept = PartFile(Some(part.clone()));
    let (range, _) = fetch(shared, &origin, blob, None, &part, &tx, Some(span)).await?;
    if range.size() != span.end - span.start {
        return Err(Failure::new(
            FailureReason::OriginError,
            format!(
                "the origin sent {} bytes for a range of {}",
                range.size(),
                span.end - span.start
            ),
        ));
    }
    let first_chunk = (span.start / chunk) as u32;
    unkept.0 = None;
    // The same range seeded again (its order resent) has the same part file: replace it.
    shared.ingests.ranges_lock().insert(
        (blob, first_chunk),
        RangePart {
            part,
            first_chunk,
            chunks: range.chunk_count(),
        },
    );
    tracing::info!(%blob, start = span.start, end = span.end, "seeded a range from the origin");
    shared.send(Msg::RangeSeeded(pb::RangeSeeded {
        order_id: order.order_id,
        blob_digest: blob.as_bytes().to_vec(),
        first_chunk,
        chunk_digests: (range.chunk_digests().iter())
            .map(|d| d.as_bytes().to_vec())
            .collect(),
    }));
    Ok(())
}

/// Moves a range seeded here into the store, now that the blob's manifest is known (each
/// chunk is verified against it); then removes the part file. A range that does not fit is
/// dropped: those chunks are fetched from peers instead.
pub(crate) async fn import_range(shared: &Shared, manifest: &Manifest) {
    let digest = manifest.digest();
    let ranges: Vec<RangePart> = {
        let mut table = shared.ingests.ranges_lock();
        let keys: Vec<(Digest, u32)> = table.keys().filter(|k| k.0 == digest).copied().collect();
        keys.iter().filter_map(|k| table.remove(k)).collect()
    };
    for range in ranges {
        import_one(shared, manifest, range).await;
    }
}

async fn import_one(shared: &Shared, manifest: &Manifest, range: RangePart) {
    let digest = manifest.digest();
    let store = shared.store.clone();
    let manifest = manifest.clone();
    let imported = tokio::task::spawn_blocking(move || -> Result<u32, String> {
        let indices = (0..range.chunks).map(|i| shoal_proto::ChunkIndex(range.first_chunk + i));
        let n = copy_chunks(&store, &manifest, &range.part, indices).map_err(|e| match e {
            CopyError::Read(e) => e.to_string(),
            CopyError::Store(e) => e.to_string(),
        })?;
        let _ = std::fs::remove_file(&range.part);
        Ok(n)
    })
    .await;
    match imported {
        Ok(Ok(n)) => {
            tracing::info!(blob = %digest, chunks = n, "seeded range moved into the store")
        }
        Ok(Err(e)) => tracing::warn!(blob = %digest, error = e, "seeded range dropped"),
        Err(e) => tracing::warn!(blob = %digest, error = %e, "seeded range import failed"),
    }
}
