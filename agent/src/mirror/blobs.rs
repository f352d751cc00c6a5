//! Blobs through Shoal. A blob this agent holds is served from the store. Otherwise the
//! mirror asks the coordinator to distribute it here, with the upstream registry as its
//! origin (the coordinator elects one seeder per blob cluster-wide, so each byte leaves the
//! upstream once), and streams it to the client in order as it arrives:
//! - from the store, chunk by chunk, each verified against the manifest, as peers deliver;
//! - or, when this agent is the seeder, from its part file as the upstream's bytes land.
//!
//! If nothing arrives for `mirror.fallback_after_ms`, or the distribution fails, the rest of
//! the requested range comes from the upstream directly.

use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use shoal_origin::ByteRange;
use shoal_proto::pb::v1 as pb;
use shoal_proto::{ChunkIndex, Digest};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::mpsc;

use super::{Mirror, channel_body, error, ms, upstream_error};
use crate::bring::{self, Bringing};
use crate::metrics as m;
use crate::orders::{IngestState, IngestView};

type Tx = mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Pieces read from a part file at most this large.
const PIECE: usize = 256 << 10;
/// Longest wait between looks at the store when no notification comes.
const POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// Wait between looks for the manifest, before the order has reached the store.
const POLL_MANIFEST: std::time::Duration = std::time::Duration::from_millis(2);

pub(super) async fn serve(
    mirror: &Mirror,
    registry: &str,
    name: &str,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Response {
    let digest: Digest = match digest.parse() {
        Ok(d) => d,
        Err(e) => return error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", &e.to_string()),
    };
    let size = match size_of(mirror, registry, name, &digest).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    // RFC 9110: a Range of another unit, or one that does not parse, is ignored (whole
    // blob, 200); HEAD answers for the whole blob too. A bytes range beyond the end is 416.
    let spec = (headers.get(header::RANGE))
        .and_then(|v| v.to_str().ok())
        .filter(|s| !head && s.trim_start().starts_with("bytes=") && !s.contains(','));
    let range = match spec {
        None => None,
        Some(spec) => match parse_range(spec, size) {
            Some(r) => Some(r),
            None => {
                let mut r = error(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "SIZE_INVALID",
                    &format!("range {spec:?} is not satisfiable for {size} bytes"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    r.headers_mut().insert(header::CONTENT_RANGE, v);
                }
                return r;
            }
        },
    };
    let (start, end) = range.unwrap_or((0, size.saturating_sub(1)));
    let len = if size == 0 { 0 } else { end - start + 1 };
    metrics::counter!(m::MIRROR_REQUESTS, "kind" => "blob").increment(1);
    let mut response = if head || len == 0 {
        StatusCode::OK.into_response()
    } else {
        let (tx, body) = channel_body();
        let pull = Pull {
            shared: mirror.clone(),
            registry: registry.to_string(),
            name: name.to_string(),
            digest,
            size,
            requested: Instant::now(),
            first_byte: None,
        };
        tokio::spawn(pull.run(start, end, tx));
        body.into_response()
    };
    if range.is_some() && !head {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")) {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    let h = response.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&digest.to_string()) {
        h.insert("Docker-Content-Digest", v);
    }
    response
}

/// The blob's size: from the store, else the coordinator's catalog, else a HEAD to the
/// upstream (which also tells whether the upstream has it at all).
async fn size_of(
    shared: &Mirror,
    registry: &str,
    name: &str,
    digest: &Digest,
) -> Result<u64, Response> {
    if let Some(manifest) = shared.store.manifest(digest) {
        return Ok(manifest.size());
    }
    let known = (shared.coordinator.client())
        .get_blob(pb::GetBlobRequest {
            digest: digest.to_string(),
            include_manifest: false,
        })
        .await;
    if let Ok(r) = known {
        if let Some(b) = r.into_inner().blob.filter(|b| b.complete_holders > 0) {
            return Ok(b.size);
        }
    }
    shared
        .origin
        .head_blob(registry, name, digest)
        .await
        .map_err(|e| {
            tracing::warn!(registry, name, blob = %digest, error = %e, "blob HEAD to upstream failed");
            upstream_error(&e, "BLOB_UNKNOWN")
        })
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against `size`, as an inclusive (start, end).
/// None if unsatisfiable or not a single range.
fn parse_range(spec: &str, size: u64) -> Option<(u64, u64)> {
    let spec = spec.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().ok()?;
        let end = if b.is_empty() {
            size - 1
        } else {
            b.parse::<u64>().ok()?.min(size - 1)
        };
        (start, end)
    };
    (start <= end && start < size).then_some((start, end))
}

/// One GET of a blob being streamed to a client.
struct Pull {
    shared: Mirror,
    registry: String,
    name: String,
    digest: Digest,
    size: u64,
    requested: Instant,
    first_byte: Option<Instant>,
}

/// Where served bytes came from (the `source` label of `shoal_mirror_sent_bytes_total`).
#[derive(Clone, Copy, Debug)]
enum Source {
    /// Already in the store when asked.
    Local,
    /// Fetched from peers during the request.
    Peers,
    /// Fetched from the upstream by this agent as the blob's seeder.
    Seed,
    /// Fetched from the upstream directly, Shoal bypassed.
    Fallback,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Local => "local",
            Source::Peers => "peers",
            Source::Seed => "seed",
            Source::Fallback => "fallback",
        }
    }
}

impl Pull {
    async fn send(&mut self, tx: &Tx, bytes: Bytes, source: Source) -> bool {
        if self.first_byte.is_none() {
            let now = Instant::now();
            self.first_byte = Some(now);
            metrics::histogram!(m::MIRROR_FIRST_BYTE, "source" => source.label())
                .record((now - self.requested).as_secs_f64());
        }
        metrics::counter!(m::MIRROR_BYTES, "source" => source.label())
            .increment(bytes.len() as u64);
        tx.send(Ok(bytes)).await.is_ok()
    }

    async fn run(mut self, start: u64, end: u64, tx: Tx) {
        let outcome = self.stream(start, end, &tx).await;
        let ttfb_ms = self
            .first_byte
            .map(|t| (t - self.requested).as_millis() as u64);
        match outcome {
            Ok(sources) => tracing::info!(
                blob = %self.digest, repository = self.name, bytes = end - start + 1,
                ttfb_ms, local = sources[0], peers = sources[1], seed = sources[2],
                fallback = sources[3], "mirror served a blob"
            ),
            Err(message) => {
                tracing::warn!(blob = %self.digest, repository = self.name, message, "mirror blob pull failed");
                let _ = tx.send(Err(std::io::Error::other(message))).await;
            }
        }
    }

    /// Streams [start, end]; returns the bytes per source (local, peers, seed, fallback).
    async fn stream(&mut self, start: u64, end: u64, tx: &Tx) -> Result<[u64; 4], String> {
        let mut counts = [0u64; 4];
        let mut pos = start;
        let shared = self.shared.clone();
        let digest = self.digest;
        let complete_at_start = shared.store.is_complete(&digest);
        // Kept from eviction while served; released when the response ends.
        let mut hold = None;
        let mut failed: Option<Bringing> = None;
        if !complete_at_start {
            match self.distribute().await {
                Ok(b) => failed = Some(b),
                Err(e) => {
                    tracing::warn!(blob = %digest, error = e, "mirror: the coordinator cannot distribute the blob; falling back to the upstream");
                    return self.fallback(pos, end, tx, counts, &e).await;
                }
            }
        }
        let fallback_after = ms(shared.config.fallback_after_ms);
        let mut last_progress = Instant::now();
        // Tells the download which chunks this client needs next (in-order streaming).
        let reader = shared.readers.enter(digest, 0);
        let mut arrivals = None;
        // Looks for the manifest soon, then less often while a long seed runs.
        let mut manifest_wait = POLL_MANIFEST;
        while pos <= end {
            // 1. The chunk is in the store: verified bytes.
            // Subscribed before looking, so a chunk landing in between is not missed.
            if arrivals.is_none() {
                arrivals = shared.store.subscribe(&digest);
            }
            if let Some(manifest) = shared.store.manifest(&digest) {
                if hold.is_none() {
                    hold = shared.store.hold(&digest).ok();
                }
                let chunk = (pos / u64::from(manifest.chunk_size())) as u32;
                reader.at(chunk);
                let index = ChunkIndex(chunk);
                if shared.store.has_chunk(&digest, index) {
                    let store = shared.store.clone();
                    let data = tokio::task::spawn_blocking(move || store.get_chunk(&digest, index))
                        .await
                        .map_err(|e| format!("store task failed: {e}"))?
                        .map_err(|e| format!("reading {digest} from the store: {e}"))?;
                    let offset = u64::from(chunk) * u64::from(manifest.chunk_size());
                    let from = (pos - offset) as usize;
                    let to = ((end + 1 - offset) as usize).min(data.len());
                    let source = if complete_at_start {
                        Source::Local
                    } else {
                        Source::Peers
                    };
                    if from >= to {
                        // The blob is shorter than the size announced to the client.
                        return Err(format!(
                            "{digest} is {} bytes, not the {} announced",
                            manifest.size(),
                            self.size
                        ));
                    }
                    let piece = data.slice(from..to);
                    let n = piece.len() as u64;
                    if !self.send(tx, piece, source).await {
                        return Ok(counts); // The client went away.
                    }
                    counts[source as usize] += n;
                    pos += n;
                    last_progress = Instant::now();
                    continue;
                }
            }
            // 2. This agent is the seeder: the upstream's bytes, as they land.
            if let Some(ingest) = shared.orders.ingest(&digest) {
                match self.stream_part_file(&ingest, pos, end, tx).await {
                    Ok(n) => {
                        counts[Source::Seed as usize] += n;
                        pos += n;
                        if n > 0 {
                            last_progress = Instant::now();
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(blob = %digest, error = e, "mirror: seeding failed; falling back to the upstream");
                        return self.fallback(pos, end, tx, counts, &e).await;
                    }
                }
            }
            // 3. Wait for the next chunk, a failure, or the stall deadline.
            if let Some(why) = failed.as_ref().and_then(Bringing::has_failed) {
                let why = format!("distribution {why}");
                return self.fallback(pos, end, tx, counts, &why).await;
            }
            // The stall clock runs only once chunks can flow (the manifest is here): before
            // that the blob is being seeded, which takes as long as the upstream needs, and
            // a failed seed ends the wait through `failed`.
            if arrivals.is_none() {
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= fallback_after {
                let why = format!("no data from peers for {} ms", fallback_after.as_millis());
                return self.fallback(pos, end, tx, counts, &why).await;
            }
            match arrivals.as_mut() {
                Some(arrivals) => {
                    let _ = tokio::time::timeout(POLL, arrivals.recv()).await;
                }
                None => {
                    tokio::time::sleep(manifest_wait).await;
                    manifest_wait = (manifest_wait * 2).min(POLL);
                }
            }
        }
        Ok(counts)
    }

    /// Streams from the seeder's part file; returns the bytes sent (0 if none were ready).
    async fn stream_part_file(
        &mut self,
        ingest: &IngestView,
        pos: u64,
        end: u64,
        tx: &Tx,
    ) -> Result<u64, String> {
        let mut state = ingest.state.clone();
        // Opened before looking at the state: once the ingest ends the file is removed,
        // but an open handle still reads it.
        let mut file = match tokio::fs::File::open(&ingest.part).await {
            Ok(f) => f,
            Err(_) => {
                // Gone already: the ingest ended. The store has it, or it failed.
                return match state.borrow().clone() {
                    IngestState::Failed(m) => Err(m),
                    _ => Ok(0),
                };
            }
        };
        file.seek(std::io::SeekFrom::Start(pos))
            .await
            .map_err(|e| format!("reading the part file: {e}"))?;
        let mut sent = 0u64;
        loop {
            let available = match state.borrow_and_update().clone() {
                IngestState::Writing { written } => written,
                IngestState::Done => self.size,
                IngestState::Failed(m) => return Err(m),
            };
            let want = (end + 1).min(available).saturating_sub(pos + sent);
            if want == 0 {
                if pos + sent > end || matches!(*state.borrow(), IngestState::Done) {
                    return Ok(sent);
                }
                if state.changed().await.is_err() {
                    return Ok(sent); // The ingest ended; the store has it or it failed.
                }
                continue;
            }
            let n = (want as usize).min(PIECE);
            let mut piece = bytes::BytesMut::zeroed(n);
            file.read_exact(&mut piece)
                .await
                .map_err(|e| format!("reading the part file: {e}"))?;
            if !self.send(tx, piece.freeze(), Source::Seed).await {
                return Ok(sent);
            }
            sent += n as u64;
        }
    }

    /// Asks the coordinator to bring the blob here from the upstream, and watches the job.
    async fn distribute(&self) -> Result<Bringing, String> {
        let shared = &self.shared;
        let plain_http = shared.origin.config().registry(&self.registry).plain_http;
        let origin = pb::Origin {
            origin: Some(pb::origin::Origin::Oci(pb::OciOrigin {
                registry: self.registry.clone(),
                repository: self.name.clone(),
                plain_http,
                size: self.size,
            })),
        };
        let request = bring::Request {
            blob: self.digest,
            origin: Some(origin),
            priority: pb::Priority::High,
            deadline_ms: 0,
            description: format!("mirror pull of {}/{}", self.registry, self.name),
        };
        (bring::bring_here(&shared.coordinator, request).await).map_err(|s| s.message().to_string())
    }

    /// Streams [pos, end] from the upstream, bypassing Shoal.
    async fn fallback(
        &mut self,
        pos: u64,
        end: u64,
        tx: &Tx,
        mut counts: [u64; 4],
        why: &str,
    ) -> Result<[u64; 4], String> {
        metrics::counter!(m::MIRROR_FALLBACKS).increment(1);
        tracing::warn!(blob = %self.digest, registry = self.registry, from = pos, why, "mirror: fetching from the upstream directly");
        let range = ByteRange {
            start: pos,
            end_inclusive: Some(end),
        };
        let mut body = (self.shared.origin)
            .get_blob(&self.registry, &self.name, &self.digest, Some(range))
            .await
            .map_err(|e| format!("{why}; the upstream fallback failed too: {e}"))?;
        if pos > 0 && !body.partial {
            return Err(format!(
                "{why}; the upstream ignored the Range request of the fallback"
            ));
        }
        let mut sent = 0u64;
        let want = end + 1 - pos;
        while let Some(piece) = body
            .chunk()
            .await
            .map_err(|e| format!("upstream fallback: {e}"))?
        {
            let piece = piece.slice(..piece.len().min((want - sent) as usize));
            sent += piece.len() as u64;
            if !self.send(tx, piece, Source::Fallback).await {
                counts[Source::Fallback as usize] += sent;
                return Ok(counts); // The client went away.
            }
            if sent >= want {
                break;
            }
        }
        counts[Source::Fallback as usize] += sent;
        if sent < want {
            return Err(format!(
                "upstream fallback ended after {sent} of {want} bytes"
            ));
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-200", 100), Some((0, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-4", 100), None);
        assert_eq!(parse_range("bytes=0-1,4-5", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
    }
}
