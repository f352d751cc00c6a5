//! The serving side: answers chunk requests, have-streams and table requests on every
//! connection, and takes rejection notices (see `recheck.rs`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::BytesMut;
use shoal_proto::wire::{self, ErrorStatus, Frame};
use shoal_proto::{ChunkIndex, Digest};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::Inner;
use super::peers::{PeerKey, peer_key};
use crate::store::StoreError;

/// Requests are tiny; anything longer than this before a full frame is a bad request.
const MAX_REQUEST_LEN: usize = 256;

/// The application close code of a connection refused for the peer's connection count.
const TOO_MANY_CONNECTIONS: u32 = 0x5301;

/// How long a table request waits for a manifest this agent does not hold yet, looking
/// every [`TABLE_POLL`].
const TABLE_WAIT: std::time::Duration = std::time::Duration::from_millis(1000);
const TABLE_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Send priority of have-streams; chunk streams keep quinn's default of 0.
const HAVE_STREAM_PRIORITY: i32 = 1;

/// Counters of the serving side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeStats {
    pub chunks_served: u64,
    pub bytes_served: u64,
    pub busy_rejections: u64,
    /// Chunk requests and have-streams answered NotFound.
    pub not_found: u64,
}

#[derive(Debug, Default)]
pub(super) struct Counters {
    chunks_served: AtomicU64,
    bytes_served: AtomicU64,
    busy_rejections: AtomicU64,
    not_found: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> ServeStats {
        ServeStats {
            chunks_served: self.chunks_served.load(Ordering::Relaxed),
            bytes_served: self.bytes_served.load(Ordering::Relaxed),
            busy_rejections: self.busy_rejections.load(Ordering::Relaxed),
            not_found: self.not_found.load(Ordering::Relaxed),
        }
    }
}

/// Accepts incoming connections until the endpoint closes or is dropped.
pub(super) async fn accept_loop(inner: Weak<Inner>) {
    loop {
        let Some(endpoint) = inner.upgrade().map(|i| i.endpoint.clone()) else {
            return;
        };
        let Some(incoming) = endpoint.accept().await else {
            return;
        };
        drop(endpoint);
        let inner = inner.clone();
        tokio::spawn(async move {
            match incoming.await {
                Ok(conn) => {
                    if let Some(inner) = inner.upgrade() {
                        if let Some(id) = inner.revoked_peer(&conn) {
                            tracing::info!(agent = id, peer = %conn.remote_address(), "refused a revoked agent");
                            conn.close(0u32.into(), b"revoked");
                            return;
                        }
                        inner.adopt(conn, true);
                    }
                }
                // A peer with a certificate the CA did not sign ends here.
                Err(e) => tracing::debug!(error = %e, "incoming QUIC handshake failed"),
            }
        });
    }
}

/// Serves every stream the peer opens on `conn` until it closes; closes an `incoming` one at
/// once if the peer already has `max_connections_per_peer` others, or all peers
/// `max_connections`.
pub(super) async fn serve_connection(inner: Weak<Inner>, conn: quinn::Connection, incoming: bool) {
    let key = peer_key(&conn);
    // Only connections peers open count against the caps: this agent's own dials (to its
    // sources) must never be closed because others filled them.
    let slot = match inner.upgrade() {
        Some(i) if incoming => {
            let peers = i.peers.clone();
            peers
                .connect(
                    key,
                    i.config.max_connections_per_peer,
                    i.config.max_connections,
                )
                .map(Some)
        }
        Some(_) => Some(None),
        None => None,
    };
    let Some(_slot) = slot else {
        tracing::warn!(peer = %conn.remote_address(), "closing a connection: the peer has too many");
        conn.close(
            TOO_MANY_CONNECTIONS.into(),
            b"too many connections from this peer",
        );
        return;
    };
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = %conn.remote_address(), error = %e, "connection closed");
                return;
            }
        };
        let Some(inner) = inner.upgrade() else { return };
        let from = conn.remote_address();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(&inner, key, from, send, recv).await {
                tracing::debug!(error = %e, "stream ended with error");
            }
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("reading request: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing response: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream already closed")]
    Closed(#[from] quinn::ClosedStream),
    #[error("request timed out")]
    Timeout,
}

async fn serve_stream(
    inner: &Arc<Inner>,
    peer: PeerKey,
    from: std::net::SocketAddr,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), StreamError> {
    let request = tokio::time::timeout(inner.config.request_timeout, read_request(&mut recv))
        .await
        .map_err(|_| StreamError::Timeout)??;
    match request {
        Ok(Frame::ChunkRequest { blob, index }) => {
            let served = tokio::time::timeout(
                inner.config.request_timeout,
                serve_chunk(inner, peer, &mut send, blob, index),
            )
            .await;
            match served {
                Ok(r) => r,
                Err(_) => {
                    let _ = send.reset(0u32.into());
                    Err(StreamError::Timeout)
                }
            }
        }
        Ok(Frame::HaveRequest { blob }) => serve_have(inner, &mut send, blob).await,
        Ok(Frame::TableRequest { blob }) => {
            let served = tokio::time::timeout(
                inner.config.request_timeout,
                serve_table(inner, &mut send, blob),
            )
            .await;
            served.unwrap_or_else(|_| {
                let _ = send.reset(0u32.into());
                Err(StreamError::Timeout)
            })
        }
        Ok(Frame::ChunkRejected { blob, index }) => {
            (inner.rechecks).rejected(&inner.store, from, blob, index);
            send.finish()?;
            Ok(())
        }
        Ok(other) => {
            reply_error(
                &mut send,
                ErrorStatus::BadRequest,
                &format!("unexpected {other:?}"),
            )
            .await
        }
        Err(e) => reply_error(&mut send, ErrorStatus::BadRequest, &e.to_string()).await,
    }
}

/// Reads the one request frame of a stream; `Ok(Err(_))` is a malformed request.
async fn read_request(
    recv: &mut quinn::RecvStream,
) -> Result<Result<Frame, wire::WireError>, quinn::ReadError> {
    let mut buf = BytesMut::with_capacity(64);
    loop {
        match wire::decode(&mut buf) {
            Ok(Some(frame)) => return Ok(Ok(frame)),
            Ok(None) if buf.len() < MAX_REQUEST_LEN => {}
            Ok(None) => {
                return Ok(Err(wire::WireError::Malformed {
                    kind: "request",
                    reason: "longer than 256 bytes",
                }));
            }
            Err(e) => return Ok(Err(e)),
        }
        match recv.read_chunk(MAX_REQUEST_LEN, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => {
                return Ok(Err(wire::WireError::Malformed {
                    kind: "request",
                    reason: "stream ended before a whole frame",
                }));
            }
        }
    }
}

async fn serve_chunk(
    inner: &Arc<Inner>,
    peer: PeerKey,
    send: &mut quinn::SendStream,
    blob: Digest,
    index: ChunkIndex,
) -> Result<(), StreamError> {
    let Ok(_permit) = inner.served_limit.clone().try_acquire_owned() else {
        inner.stats.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return reply_error(send, ErrorStatus::Busy, "serving at capacity").await;
    };
    let Some(_share) = inner.peers.serve(peer, inner.config.max_served_per_peer) else {
        inner.stats.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return reply_error(send, ErrorStatus::Busy, "serving this peer's share").await;
    };
    let store = inner.store.clone();
    let read = tokio::task::spawn_blocking(move || store.get_chunk(&blob, index)).await;
    let data = match read {
        Ok(Ok(data)) => data,
        Ok(Err(StoreError::UnknownBlob(_) | StoreError::ChunkMissing { .. })) => {
            inner.stats.not_found.fetch_add(1, Ordering::Relaxed);
            return reply_error(
                send,
                ErrorStatus::NotFound,
                &format!("no chunk {index} of {blob}"),
            )
            .await;
        }
        Ok(Err(e)) => {
            tracing::warn!(%blob, %index, error = %e, "reading chunk to serve failed");
            return reply_error(send, ErrorStatus::Internal, "store read failed").await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "chunk read task failed");
            return reply_error(send, ErrorStatus::Internal, "store read failed").await;
        }
    };
    inner.serving.served(&inner.store, &blob);
    let len = data.len() as u64;
    // Past a short wait behind what the uplink already has to send, the peer had better ask
    // someone else (see `uplink`).
    let Some(admitted) = inner.uplink.admit(peer, len) else {
        inner.stats.busy_rejections.fetch_add(1, Ordering::Relaxed);
        return reply_error(send, ErrorStatus::Busy, "upload queue full").await;
    };
    if let Some(limit) = &inner.config.upload_limit {
        // Past a short wait, tell the peer to go elsewhere now: a request held longer would
        // leave it without a byte from us long enough to take us for stalled.
        let max_wait = (inner.config.max_upload_wait).min(inner.config.request_timeout / 2);
        match limit.try_reserve_within(len, max_wait) {
            Some(wait) if wait.is_zero() => {}
            Some(wait) => tokio::time::sleep(wait).await,
            None => {
                inner.stats.busy_rejections.fetch_add(1, Ordering::Relaxed);
                return reply_error(send, ErrorStatus::Busy, "upload cap saturated").await;
            }
        }
    }
    let header = bytes::Bytes::copy_from_slice(&wire::chunk_data_header(index, data.len()));
    // write_all_chunks hands the Bytes to quinn without copying the chunk.
    send.write_all_chunks(&mut [header, data]).await?;
    send.finish()?;
    // The bytes are queued in QUIC, not sent: they leave the backlog when the peer has
    // acknowledged them all.
    if let Ok(None) = send.stopped().await {
        admitted.delivered();
    }
    inner.stats.chunks_served.fetch_add(1, Ordering::Relaxed);
    inner.stats.bytes_served.fetch_add(len, Ordering::Relaxed);
    metrics::counter!(crate::metrics::BYTES_OUT).increment(len);
    Ok(())
}

/// Sends the blob's bitfield, then deltas as chunks are verified, until the blob is complete
/// or the client stops the stream.
async fn serve_have(
    inner: &Arc<Inner>,
    send: &mut quinn::SendStream,
    blob: Digest,
) -> Result<(), StreamError> {
    // Availability news is tiny and everyone's picks wait on it: it goes before any chunk
    // data queued on this connection.
    let _ = send.set_priority(HAVE_STREAM_PRIORITY);
    // Subscribe before the snapshot so no chunk verified in between is missed.
    let (Some(mut updates), Some((chunk_count, bits))) =
        (inner.store.subscribe(&blob), inner.store.bitfield(&blob))
    else {
        inner.stats.not_found.fetch_add(1, Ordering::Relaxed);
        return reply_error(send, ErrorStatus::NotFound, &format!("no blob {blob}")).await;
    };
    // A full first bitfield already says everything; otherwise the stream ends with one,
    // which covers whatever deltas were still queued when the blob completed.
    let mut final_bitfield = bits.iter().map(|b| b.count_ones()).sum::<u32>() < chunk_count;
    send.write_all(&Frame::HaveBitfield { chunk_count, bits }.to_bytes())
        .await?;
    loop {
        if inner.store.is_complete(&blob) {
            break;
        }
        let first = tokio::select! {
            r = updates.recv() => r,
            _ = send.stopped() => return Ok(()),
        };
        let mut indices = Vec::new();
        let mut lagged = false;
        match first {
            Ok(i) => indices.push(i),
            Err(RecvError::Lagged(_)) => lagged = true,
            Err(RecvError::Closed) => {
                // The blob is gone from the store: nothing more to tell.
                final_bitfield = false;
                break;
            }
        }
        // Batch whatever else is already waiting into the same delta.
        while !lagged {
            match updates.try_recv() {
                Ok(i) => indices.push(i),
                Err(TryRecvError::Lagged(_)) => lagged = true,
                Err(TryRecvError::Empty | TryRecvError::Closed) => break,
            }
        }
        if lagged {
            // Fell behind: resend the whole picture rather than guess.
            let Some((chunk_count, bits)) = inner.store.bitfield(&blob) else {
                final_bitfield = false;
                break;
            };
            send.write_all(&Frame::HaveBitfield { chunk_count, bits }.to_bytes())
                .await?;
            continue;
        }
        send.write_all(&Frame::HaveDelta { indices }.to_bytes())
            .await?;
    }
    if final_bitfield && let Some((chunk_count, bits)) = inner.store.bitfield(&blob) {
        send.write_all(&Frame::HaveBitfield { chunk_count, bits }.to_bytes())
            .await?;
    }
    send.finish()?;
    Ok(())
}

/// Sends the chunk table of `blob`'s manifest, if this agent holds one that is final (a
/// provisional one is still learning its digests), or does within [`TABLE_WAIT`]: the
/// coordinator names a target as a source as soon as its own order is out, and that order
/// may have come without its table too (which this agent is learning meanwhile).
async fn serve_table(
    inner: &Arc<Inner>,
    send: &mut quinn::SendStream,
    blob: Digest,
) -> Result<(), StreamError> {
    let deadline = tokio::time::Instant::now() + TABLE_WAIT;
    let manifest = loop {
        if let Some(m) = (inner.store.manifest(&blob)).filter(|m| !m.is_provisional()) {
            break Some(m);
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(TABLE_POLL).await;
    };
    let Some(manifest) = manifest else {
        inner.stats.not_found.fetch_add(1, Ordering::Relaxed);
        return reply_error(send, ErrorStatus::NotFound, &format!("no table of {blob}")).await;
    };
    let digests = Digest::table_bytes(manifest.chunk_digests());
    if digests.len() > wire::MAX_TABLE_LEN {
        return reply_error(send, ErrorStatus::NotFound, "table too large for a frame").await;
    }
    send.write_all(
        &Frame::Table {
            digests: digests.into(),
        }
        .to_bytes(),
    )
    .await?;
    send.finish()?;
    Ok(())
}

async fn reply_error(
    send: &mut quinn::SendStream,
    status: ErrorStatus,
    message: &str,
) -> Result<(), StreamError> {
    send.write_all(
        &Frame::Error {
            status,
            message: message.to_string(),
        }
        .to_bytes(),
    )
    .await?;
    send.finish()?;
    Ok(())
}
