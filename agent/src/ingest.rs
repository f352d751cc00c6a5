//! Seeding: an order without a manifest. This agent fetches the blob from its origin (an OCI
//! registry or an HTTP URL), builds the manifest while the bytes arrive, checks the whole
//! blob against its digest, stores it and registers the manifest, so that every other agent
//! can fetch it from peers (the planner's `Seeder` decides who seeds what).
//!
//! The bytes go to a part file first: chunk digests are unknown until the end, and the store
//! holds only verified chunks. While the fetch runs, the part file and how much of it is
//! written are published in the order's entry ([`RunningOrders::set_ingest`]), so that the
//! OCI mirror can stream the blob to a client on this agent from its first byte (the client
//! checks the digest itself, as it does with any registry; the store never holds an
//! unverified byte).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use shoal_origin::{ByteRange, OriginError};
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::FailureReason;
use shoal_proto::pb::v1::agent_message::Msg;
use shoal_proto::{ChunkIndex, Digest, Manifest, ManifestBuilder};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::failure::Failure;
use crate::link::Coordinator;
use crate::orders::{IngestState, IngestView, RunningOrders};
use crate::store::{ImportError, Store, StoreError};

mod stream;
use stream::Streamer;

/// What seeding needs: the store, the origin client, where part files go, the coordinator
/// (to register what it seeded) and the order table (to publish a running fetch's part
/// file). Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Ingester {
    pub store: Store,
    pub origin: shoal_origin::Client,
    /// Part files, beside the store (same filesystem).
    pub part_dir: PathBuf,
    /// Chunk size of manifests built here.
    pub chunk_size: u32,
    pub coordinator: Coordinator,
    pub orders: RunningOrders,
    /// Ranges seeded here, waiting for their blob's manifest.
    pub ranges: SeededRanges,
}

/// Bytes written to the part file between two flushes that let readers see them.
const PUBLISH_EVERY: u64 = 256 << 10;

/// Flushes the part file, then tells readers how much of it they may read.
async fn publish(
    file: &mut tokio::io::BufWriter<tokio::fs::File>,
    written: u64,
    published: &mut u64,
    tx: &watch::Sender<IngestState>,
) -> Result<(), FetchError> {
    file.flush()
        .await
        .map_err(|e| FetchError::Local(Failure::from_local_io("writing the part file", &e)))?;
    metrics::counter!(crate::metrics::BYTES_IN, "source" => crate::metrics::SOURCE_ORIGIN)
        .increment(written - *published);
    *published = written;
    tx.send_replace(IngestState::Writing { written });
    Ok(())
}

/// Attempts per seed order; after the first, each resumes where the last one stopped.
const ATTEMPTS: u32 = 3;
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// Why an origin fetch stopped: the origin's fault (a retry, or another seeder, may do
/// better), or this agent's own disk (which says nothing about the origin: never retried
/// against it, never reported as an origin error).
#[derive(Debug)]
enum FetchError {
    Origin(OriginError),
    Local(Failure),
}

impl From<OriginError> for FetchError {
    fn from(e: OriginError) -> Self {
        FetchError::Origin(e)
    }
}

/// Ranges seeded here, waiting in their part files for the blob's manifest, by (blob,
/// first chunk): an agent may seed several ranges of one blob. They outlive the range
/// orders that fetched them; the blob's fetch order takes them ([`Ingester::import_ranges`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct SeededRanges {
    table: Arc<Mutex<HashMap<(Digest, u32), RangePart>>>,
}

impl SeededRanges {
    fn lock(&self) -> MutexGuard<'_, HashMap<(Digest, u32), RangePart>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A range seeded here, waiting in its part file for the blob's manifest.
#[derive(Debug)]
struct RangePart {
    part: PathBuf,
    first_chunk: u32,
    chunks: u32,
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

/// Withdraws a running fetch's part file from the order table and removes the file,
/// however the fetch ends. (Readers that opened the part file keep reading it; nobody new
/// finds it.)
struct Published<'a> {
    orders: &'a RunningOrders,
    order_id: u64,
    _part: PartFile,
}

impl Drop for Published<'_> {
    fn drop(&mut self) {
        self.orders.set_ingest(self.order_id, None);
    }
}

/// Why `got` bytes from a named origin are another file than its name's: the name fixes the
/// size (the file changed since the name was made); None if they may be the same.
fn changed_since_named(origin: &pb::origin::Origin, got: u64) -> Option<String> {
    let pb::origin::Origin::Http(h) = origin else {
        return None;
    };
    (got != h.size).then(|| {
        format!(
            "the origin has {got} bytes for a name made when it had {}: it changed",
            h.size
        )
    })
}

/// The manifest of what a named origin sent, under its name; refused if the content is not
/// the size the name says (an answer without a length passes the check before its bytes).
fn as_named(
    manifest: Manifest,
    origin: &pb::origin::Origin,
    name: &str,
) -> Result<Manifest, Failure> {
    if let Some(changed) = changed_since_named(origin, manifest.size()) {
        return Err(Failure::new(FailureReason::Invalid, changed));
    }
    manifest
        .named(name)
        .map_err(|e| Failure::new(FailureReason::Internal, e.to_string()))
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
        // If-Match failed: the content of a blob named by its ETag is gone from the origin,
        // and no other seeder will find it.
        OriginError::Upstream { status: 412, .. } => FailureReason::Invalid,
        _ => FailureReason::OriginError,
    };
    Failure::new(reason, e.to_string())
}

/// What of the origin's content a fetch brings: all of it (streamed into the store as it
/// comes, with a [`Streamer`]), or one range.
enum Extent<'a> {
    Whole(Option<&'a mut Streamer>),
    Range(Span),
}

/// A range of a blob to fetch, and the chunk size its digests are computed with.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: u64,
    end: u64,
    chunk_size: u32,
}

impl Ingester {
    /// The directory of part files, created if missing.
    async fn part_dir(&self) -> Result<&Path, Failure> {
        tokio::fs::create_dir_all(&self.part_dir)
            .await
            .map_err(|e| {
                Failure::from_local_io(&format!("creating {}", self.part_dir.display()), &e)
            })?;
        Ok(&self.part_dir)
    }

    /// Fetches `blob` from `origin` into the store and registers it. Returns (size, bytes
    /// fetched from the origin).
    pub(crate) async fn ingest(
        &self,
        order: &pb::FetchOrder,
        from: &pb::FromOrigin,
        blob: Digest,
    ) -> Result<(u64, u64), Failure> {
        let origin = (from.origin.as_ref().and_then(|o| o.origin.clone())).ok_or_else(|| {
            Failure::new(FailureReason::Invalid, "a seed order without an origin")
        })?;
        if let Some(m) = (self.store.manifest(&blob)).filter(|_| self.store.is_complete(&blob)) {
            // Registered only if it still matches its digest (never on trust: it may have
            // come from a stream whose seed did not finish).
            let store = self.store.clone();
            let checked = tokio::task::spawn_blocking(move || store.ensure_verified(&blob)).await;
            if matches!(checked, Ok(Ok(()))) {
                self.register(&m, order.order_id);
                return Ok((m.size(), 0));
            }
            tracing::warn!(%blob, "a complete blob in the store does not match its digest: fetching it again");
            let _ = self.store.remove(&blob);
        }
        let part = (self.part_dir().await?).join(format!("{}.{}.part", blob.hex(), order.order_id));
        let (tx, rx) = watch::channel(IngestState::Writing { written: 0 });
        let view = IngestView {
            part: part.clone(),
            state: rx,
        };
        self.orders.set_ingest(order.order_id, Some(view));
        let _published = Published {
            orders: &self.orders,
            order_id: order.order_id,
            _part: PartFile(Some(part.clone())),
        };
        // A blob named by its origin has no digest to check the content against: it gets
        // the chained manifest of what the origin sent, under the name.
        let name = origin.name_of(&blob);
        let mut streamer = Streamer::new(
            self.store.clone(),
            self.coordinator.clone(),
            blob,
            name.clone(),
            order.order_id,
            self.chunk_size,
        );
        let outcome = async {
            let expected = name.is_none().then_some(blob);
            let fetched = self
                .fetch(
                    &origin,
                    blob,
                    expected,
                    &part,
                    &tx,
                    Extent::Whole(Some(&mut streamer)),
                )
                .await
                .and_then(|(manifest, written)| match &name {
                    Some(name) => Ok((as_named(manifest, &origin, name)?, written)),
                    None => Ok((manifest, written)),
                });
            let (manifest, written) = match fetched {
                Ok(f) => f,
                Err(f) => {
                    streamer.discard();
                    return Err(f);
                }
            };
            streamer.finish(&manifest).await;
            self.store_part(&manifest, &part).await?;
            self.register(&manifest, order.order_id);
            Ok::<_, Failure>((manifest.size(), written))
        }
        .await;
        let _ = tx.send(match &outcome {
            Ok(_) => IngestState::Done,
            Err(f) => IngestState::Failed(f.message.clone()),
        });
        outcome
    }

    /// Fetches the origin's content into `part`, resuming after a broken transfer, and
    /// builds its manifest. `blob` addresses the content at an OCI origin; `expected` is
    /// the digest the content must have, checked at the end (none for a range, or a URL
    /// without a digest). Returns (manifest, bytes fetched).
    async fn fetch(
        &self,
        origin: &pb::origin::Origin,
        blob: Digest,
        expected: Option<Digest>,
        part: &Path,
        tx: &watch::Sender<IngestState>,
        extent: Extent<'_>,
    ) -> Result<(Manifest, u64), Failure> {
        let (span, mut stream) = match extent {
            Extent::Whole(stream) => (None, stream),
            Extent::Range(span) => (Some(span), None),
        };
        let local = |what: &str, e: std::io::Error| {
            Failure::from_local_io(&format!("{what} {}", part.display()), &e)
        };
        // Body pieces are a few KiB: buffered, the part file gets one write per
        // PUBLISH_EVERY instead of one blocking hand-off per piece.
        let file = tokio::fs::File::create(part)
            .await
            .map_err(|e| local("creating", e))?;
        let mut file = tokio::io::BufWriter::with_capacity(PUBLISH_EVERY as usize, file);
        let chunk_size = span.map_or(self.chunk_size, |s| s.chunk_size);
        // A range is hashed apart from the bytes before it: plain chunk digests. A whole
        // blob read in order gets a chained manifest (each byte hashed once).
        let builder = match span {
            Some(_) => ManifestBuilder::plain(chunk_size),
            None => ManifestBuilder::new(chunk_size),
        };
        let mut builder =
            builder.map_err(|e| Failure::new(FailureReason::Internal, e.to_string()))?;
        let mut written = 0u64;
        let mut published = 0u64;
        let mut size = None;
        // The first answer's ETag: a resumed read of another version would join two files.
        // Checked only where nothing else will be (a whole URL read without a digest): a
        // blob with a digest is checked against it, and a registry's CDN may vary its ETags.
        let mut etag: Option<String> = None;
        let unchecked = expected.is_none() && span.is_none();
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
                // A whole blob from where it stands, in parallel ranges where the origin
                // serves them; a range as one GET (it is one of several seeders' already).
                // An origin that ignores Range still gives exactly what was asked: the
                // client skips what comes before it.
                let mut body = match span {
                    Some(_) => {
                        shoal_origin::Whole::one(open(&self.origin, origin, &blob, range).await?)
                    }
                    None => {
                        let registry = match origin {
                            pb::origin::Origin::Oci(o) => Some(o.registry.as_str()),
                            pb::origin::Origin::Http(_) => None,
                        };
                        let mut ranges = self.origin.ranges(registry);
                        if attempt > 1 {
                            // A read in ranges broke (a range answered whole, another ETag, a
                            // failed request among many): the rest comes as one GET.
                            ranges.connections = 1;
                        }
                        let open = opener(&self.origin, origin, blob);
                        shoal_origin::open_whole(written, ranges, open).await?
                    }
                };
                if size.is_none() {
                    size = body.len.map(|l| l + written);
                }
                match (&etag, &body.etag) {
                    (Some(first), Some(now)) if first != now => {
                        return Err(FetchError::Origin(OriginError::Invalid(format!(
                            "the origin's content changed while it was read (ETag {first}, \
                             then {now}, after {written} bytes)"
                        ))));
                    }
                    (None, now) if unchecked => etag.clone_from(now),
                    _ => {}
                }
                // A name fixes the size: another one is another file, known before its bytes.
                if let Some(got) = size
                    && origin.name_of(&blob).is_some()
                    && let Some(changed) = changed_since_named(origin, got)
                {
                    return Err(FetchError::Origin(OriginError::Invalid(changed)));
                }
                if let (Some(s), Some(size)) = (stream.as_deref_mut(), size) {
                    s.start(size).await;
                }
                while let Some(bytes) = body.chunk().await? {
                    if written + bytes.len() as u64 > shoal_proto::MAX_BLOB_SIZE {
                        return Err(FetchError::Origin(OriginError::TooLarge {
                            what: "blob".into(),
                            limit: shoal_proto::MAX_BLOB_SIZE,
                        }));
                    }
                    file.write_all(&bytes).await.map_err(|e| {
                        FetchError::Local(Failure::from_local_io("writing the part file", &e))
                    })?;
                    builder.update(&bytes);
                    if let Some(s) = stream.as_deref_mut() {
                        s.feed(&bytes, builder.chunks_done()).await;
                    }
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
                Err(FetchError::Local(f)) => {
                    tracing::warn!(
                        ?expected,
                        written,
                        error = f.message,
                        "local disk fault while seeding"
                    );
                    return Err(f);
                }
                Err(FetchError::Origin(e)) => {
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
        file.flush().await.map_err(|e| local("writing", e))?;
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
    /// registers it. (With a digest, a pull goes through the coordinator's seeding instead,
    /// so that the cluster fetches it once.)
    pub(crate) async fn fetch_url(&self, url: &str) -> Result<Manifest, Failure> {
        let origin = pb::origin::Origin::Http(pb::HttpOrigin::plain(url));
        let part =
            (self.part_dir().await?).join(format!("url-{:016x}.part", rand::random::<u64>()));
        let (tx, _rx) = watch::channel(IngestState::Writing { written: 0 });
        let _part = PartFile(Some(part.clone()));
        // A URL addresses its content itself: the digest argument is unused for it.
        let unaddressed = Digest::from_bytes([0; 32]);
        let (manifest, _) = self
            .fetch(&origin, unaddressed, None, &part, &tx, Extent::Whole(None))
            .await?;
        self.store_part(&manifest, &part).await?;
        self.register(&manifest, 0);
        Ok(manifest)
    }

    /// Copies the verified part file into the store, chunk by chunk (the store checks each
    /// chunk against the manifest once more). Every error is this agent's own.
    async fn store_part(&self, manifest: &Manifest, part: &Path) -> Result<(), Failure> {
        let store = self.store.clone();
        let manifest = manifest.clone();
        let part = part.to_path_buf();
        let copied = tokio::task::spawn_blocking(move || -> Result<(), Failure> {
            // This agent's store disagreeing (another manifest for the digest) says
            // nothing about the origin: another seeder may succeed, so not definitive.
            let from_store = |e: &StoreError| {
                let mut f = Failure::from_store(e);
                if matches!(e, StoreError::ManifestConflict(_)) {
                    f.reason = FailureReason::IoError;
                }
                f
            };
            store
                .insert_manifest(&manifest)
                .map_err(|e| from_store(&e))?;
            let digest = manifest.digest();
            let _hold = store.hold(&digest).map_err(|e| from_store(&e))?;
            // Streamed into the store while it came: nothing left to copy.
            let streamed = store.is_complete(&digest);
            (!streamed)
                .then(|| copy_part(&store, &manifest, &part, manifest.chunk_indices()))
                .transpose()
                .map_err(|e| match e {
                    ImportError::Store(e) => from_store(&e),
                    other => Failure::new(
                        FailureReason::IoError,
                        format!("reading {}: {other}", part.display()),
                    ),
                })?;
            store.ensure_verified(&digest).map_err(|e| from_store(&e))
        });
        copied
            .await
            .map_err(|e| Failure::new(FailureReason::Internal, format!("store task failed: {e}")))?
    }

    fn register(&self, manifest: &Manifest, order_id: u64) {
        tracing::info!(order_id, blob = %manifest.digest(), size = manifest.size(), "seeded from the origin");
        self.coordinator
            .send(Msg::BlobRegistered(pb::BlobRegistered {
                manifest: Some(pb::Manifest::from(manifest)),
            }));
    }

    /// A striped seed order: fetches one range of the blob from the origin, keeps the bytes
    /// in a part file, and reports the range's chunk digests (`RangeSeeded`). The bytes go
    /// into the store when the manifest comes, with the blob's ordinary order
    /// ([`Ingester::import_ranges`]).
    pub(crate) async fn seed_range(
        &self,
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
        let part =
            (self.part_dir().await?).join(format!("{}.range-{}.part", blob.hex(), span.start));
        let (tx, _rx) = watch::channel(IngestState::Writing { written: 0 });
        // Removed unless the range is kept: on failure, and when the order is cancelled
        // (this future dropped).
        let mut unkept = PartFile(Some(part.clone()));
        let (range, _) = self
            .fetch(&origin, blob, None, &part, &tx, Extent::Range(span))
            .await?;
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
        self.ranges.lock().insert(
            (blob, first_chunk),
            RangePart {
                part,
                first_chunk,
                chunks: range.chunk_count(),
            },
        );
        tracing::info!(%blob, start = span.start, end = span.end, "seeded a range from the origin");
        self.coordinator.send(Msg::RangeSeeded(pb::RangeSeeded {
            order_id: order.order_id,
            blob_digest: blob.as_bytes().to_vec(),
            first_chunk,
            chunk_digests: (range.chunk_digests().iter())
                .map(|d| d.as_bytes().to_vec())
                .collect(),
        }));
        Ok(())
    }

    /// Moves the ranges seeded here into the store, now that the blob's manifest is known
    /// (each chunk is verified against it); then removes their part files. A range that
    /// does not fit is dropped: those chunks are fetched from peers instead.
    pub(crate) async fn import_ranges(&self, manifest: &Manifest) {
        let digest = manifest.digest();
        let ranges: Vec<RangePart> = {
            let mut table = self.ranges.lock();
            let keys: Vec<(Digest, u32)> =
                table.keys().filter(|k| k.0 == digest).copied().collect();
            keys.iter().filter_map(|k| table.remove(k)).collect()
        };
        for range in ranges {
            self.import_range(manifest, range).await;
        }
    }

    async fn import_range(&self, manifest: &Manifest, range: RangePart) {
        let digest = manifest.digest();
        let store = self.store.clone();
        let manifest = manifest.clone();
        let imported = tokio::task::spawn_blocking(move || -> Result<u32, String> {
            let indices = (0..range.chunks).map(|i| ChunkIndex(range.first_chunk + i));
            let n =
                copy_part(&store, &manifest, &range.part, indices).map_err(|e| e.to_string())?;
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
}

/// Opens `origin`'s content (`blob` addresses it at an OCI origin), or a range of it.
async fn open(
    client: &shoal_origin::Client,
    origin: &pb::origin::Origin,
    blob: &Digest,
    range: Option<ByteRange>,
) -> Result<shoal_origin::Body, OriginError> {
    use pb::origin::Origin as O;
    match origin {
        O::Http(h) => {
            let mut headers: Vec<(String, String)> = (h.headers.iter())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            // Only a strong ETag may be matched (RFC 9110 13.1.1): a weak one would fail
            // every time.
            if shoal_proto::is_strong(&h.etag) {
                headers.push(("If-Match".into(), h.etag.clone()));
            }
            client.get_url(&h.url, &headers, range).await
        }
        O::Oci(o) => {
            client
                .get_blob(&o.registry, &o.repository, blob, range)
                .await
        }
    }
}

/// [`open`] for the ranged GETs of a whole blob read in parallel.
fn opener(
    client: &shoal_origin::Client,
    origin: &pb::origin::Origin,
    blob: Digest,
) -> shoal_origin::Open {
    let (client, origin) = (client.clone(), origin.clone());
    std::sync::Arc::new(move |range| {
        let (client, origin) = (client.clone(), origin.clone());
        Box::pin(async move { open(&client, &origin, &blob, range).await })
    })
}

/// Moves the chunks `indices` of `manifest`, laid out one after another in the part file,
/// into the store; how many were new. Blocking.
fn copy_part(
    store: &Store,
    manifest: &Manifest,
    part: &Path,
    indices: impl Iterator<Item = ChunkIndex>,
) -> Result<u32, ImportError> {
    let mut file = std::fs::File::open(part).map_err(ImportError::Read)?;
    store.import_chunks(manifest, &mut file, indices, |_| {})
}

#[cfg(test)]
mod tests;
