//! The fetching side: chunk requests and have-streams to one peer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use shoal_proto::wire::{self, ErrorStatus, Frame};
use shoal_proto::{ChunkIndex, Digest, Manifest};
use tokio::sync::Semaphore;

use super::{ChunkEndpoint, TransportConfig, TransportError};
use crate::store::{PutOutcome, Store, StoreError};

/// Why fetching a chunk failed. `Corrupt` means the peer lied: drop and report it.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("peer {peer}: connection lost: {source}")]
    Connection {
        peer: SocketAddr,
        source: quinn::ConnectionError,
    },
    #[error("peer {peer}: stream failed: {reason}")]
    Stream { peer: SocketAddr, reason: String },
    #[error("peer {peer}: request timed out after {after:?}")]
    Timeout { peer: SocketAddr, after: Duration },
    #[error("peer {peer} answered {status:?}: {message}")]
    Refused {
        peer: SocketAddr,
        status: ErrorStatus,
        message: String,
    },
    #[error("peer {peer} broke the protocol: {reason}")]
    Protocol { peer: SocketAddr, reason: String },
    #[error("peer {peer} sent a corrupted chunk {index}: {reason}")]
    Corrupt {
        peer: SocketAddr,
        index: ChunkIndex,
        reason: String,
    },
    #[error("storing chunk: {0}")]
    Store(#[from] StoreError),
}

impl FetchError {
    /// Whether the peer said it is at capacity (try another source or later).
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            FetchError::Refused {
                status: ErrorStatus::Busy,
                ..
            }
        )
    }
}

/// The connection to one peer. Cheap to clone; clones share the in-flight limit.
#[derive(Clone, Debug)]
pub struct Peer {
    conn: quinn::Connection,
    in_flight: Arc<Semaphore>,
    request_timeout: Duration,
    download_limit: Option<Arc<crate::limiter::RateLimiter>>,
}

impl Peer {
    pub(super) fn new(conn: quinn::Connection, config: &TransportConfig) -> Self {
        Self {
            conn,
            in_flight: Arc::new(Semaphore::new(config.max_requests_in_flight as usize)),
            request_timeout: config.request_timeout,
            download_limit: config.download_limit.clone(),
        }
    }

    /// The connection's current smoothed round-trip time.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    pub fn addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// The agent id in the certificate the peer presented.
    pub fn agent_id(&self) -> Option<String> {
        super::peer_agent_id(&self.conn)
    }

    /// Closes the connection (the peer is told why).
    pub(super) fn close(&self, why: &[u8]) {
        self.conn.close(0u32.into(), why);
    }

    pub(super) fn is_open(&self) -> bool {
        self.conn.close_reason().is_none()
    }

    /// Bytes received on the connection so far (every packet: chunk data, have-streams,
    /// acknowledgements, keep-alives): whether the peer is still sending anything at all.
    pub fn rx_bytes(&self) -> u64 {
        self.conn.stats().udp_rx.bytes
    }

    pub(super) fn connection_stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Identifies the underlying connection: clones share it, a redialled peer differs.
    pub fn connection_id(&self) -> usize {
        self.conn.stable_id()
    }

    /// Resolves when the connection is closed (by either side, or lost), with the reason.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    /// Fetches chunk `index` of the blob into `buf` (resized to the chunk's length). The bytes
    /// are NOT verified here: the store verifies them once, on put.
    pub async fn fetch_chunk(
        &self,
        manifest: &Manifest,
        index: ChunkIndex,
        buf: &mut Vec<u8>,
    ) -> Result<(), FetchError> {
        let peer = self.addr();
        let expected = manifest
            .chunk_len(index)
            .map_err(|e| FetchError::Protocol {
                peer,
                reason: e.to_string(),
            })?;
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| FetchError::Stream {
                peer,
                reason: "peer handle closed".into(),
            })?;
        let request = Frame::ChunkRequest {
            blob: manifest.digest(),
            index,
        }
        .to_bytes();
        let timed_out = || FetchError::Timeout {
            peer,
            after: self.request_timeout,
        };
        let mut deadline = tokio::time::Instant::now() + self.request_timeout;
        let asked = async {
            let (mut send, mut recv) = self
                .conn
                .open_bi()
                .await
                .map_err(|source| FetchError::Connection { peer, source })?;
            send.write_all(&request)
                .await
                .map_err(|e| stream(peer, e))?;
            send.finish().map_err(|e| stream(peer, e))?;
            let header = read_header(&mut recv, peer).await?;
            if !header.is_chunk_data() {
                return Err(refusal(header, &mut recv, peer).await);
            }
            if header.len < 4 {
                return Err(FetchError::Protocol {
                    peer,
                    reason: format!("chunk data frame of {} bytes has no index", header.len),
                });
            }
            if header.len != 4 + expected {
                return Err(FetchError::Corrupt {
                    peer,
                    index,
                    reason: format!("{} bytes sent, chunk is {expected}", header.len - 4),
                });
            }
            Ok(recv)
        };
        let mut recv = tokio::time::timeout_at(deadline, asked)
            .await
            .map_err(|_| timed_out())??;
        // The chunk is coming: pay for its bytes now (a refusal or failure before this costs
        // no tokens). Waiting on our own cap does not count against the request's time.
        if let Some(limit) = &self.download_limit {
            let started = tokio::time::Instant::now();
            limit.acquire(expected as u64).await;
            deadline += started.elapsed();
        }
        let body = async {
            let mut got_index = [0u8; 4];
            recv.read_exact(&mut got_index)
                .await
                .map_err(|e| stream(peer, e))?;
            if u32::from_be_bytes(got_index) != index.0 {
                return Err(FetchError::Protocol {
                    peer,
                    reason: format!(
                        "asked for chunk {index}, got #{}",
                        u32::from_be_bytes(got_index)
                    ),
                });
            }
            buf.resize(expected, 0);
            recv.read_exact(buf).await.map_err(|e| stream(peer, e))?;
            Ok(())
        };
        tokio::time::timeout_at(deadline, body)
            .await
            .map_err(|_| timed_out())?
    }

    /// Fetches chunk `index` and puts it in `store`, which verifies it against the manifest.
    /// A chunk that fails verification is not stored and comes back as `Corrupt`.
    pub async fn fetch_into_store(
        &self,
        store: &Store,
        manifest: &Manifest,
        index: ChunkIndex,
        buf: Vec<u8>,
    ) -> (Result<PutOutcome, FetchError>, Vec<u8>) {
        let mut buf = buf;
        if let Err(e) = self.fetch_chunk(manifest, index, &mut buf).await {
            return (Err(e), buf);
        }
        let peer = self.addr();
        let store = store.clone();
        let blob = manifest.digest();
        let put = tokio::task::spawn_blocking(move || {
            let r = store.put_chunk(&blob, index, &buf);
            (r, buf)
        })
        .await;
        match put {
            Ok((Ok(outcome), buf)) => (Ok(outcome), buf),
            Ok((Err(StoreError::Verify(e)), buf)) => (
                Err(FetchError::Corrupt {
                    peer,
                    index,
                    reason: e.to_string(),
                }),
                buf,
            ),
            Ok((Err(e), buf)) => (Err(e.into()), buf),
            Err(e) => (
                Err(FetchError::Stream {
                    peer,
                    reason: format!("store task failed: {e}"),
                }),
                Vec::new(),
            ),
        }
    }

    /// Tells the peer that chunk `index` of `blob` it sent failed verification here, so that it
    /// reads its copy back and drops it if it rotted. Best effort: waits at most the request
    /// timeout for the peer to take the notice; a peer of an older release answers BadRequest,
    /// which is ignored like any other answer.
    pub async fn report_corrupt(&self, blob: Digest, index: ChunkIndex) -> Result<(), FetchError> {
        let peer = self.addr();
        let notice = async {
            let mut recv = self.request(Frame::ChunkRejected { blob, index }).await?;
            // The peer closes its side once it has read the notice.
            recv.read_to_end(wire::HEADER_LEN + wire::MAX_MESSAGE_LEN + 1)
                .await
                .map_err(|e| stream(peer, e))?;
            Ok(())
        };
        tokio::time::timeout(self.request_timeout, notice)
            .await
            .map_err(|_| FetchError::Timeout {
                peer,
                after: self.request_timeout,
            })?
    }

    /// Asks for the chunk table of `blob`'s manifest, of exactly `len` bytes. NOT verified
    /// here: the caller checks it against the digest its order names.
    pub async fn fetch_table(&self, blob: Digest, len: usize) -> Result<Bytes, FetchError> {
        let peer = self.addr();
        let asked = async {
            let mut recv = self.request(Frame::TableRequest { blob }).await?;
            let answer = recv
                .read_to_end(wire::HEADER_LEN + len.max(wire::MAX_MESSAGE_LEN + 1))
                .await
                .map_err(|e| stream(peer, e))?;
            match wire::decode(&mut Bytes::from(answer)) {
                Ok(Some(Frame::Table { digests })) if digests.len() == len => Ok(digests),
                Ok(Some(Frame::Table { digests })) => Err(FetchError::Protocol {
                    peer,
                    reason: format!("a table of {} bytes, not {len}", digests.len()),
                }),
                Ok(Some(Frame::Error { status, message })) => Err(FetchError::Refused {
                    peer,
                    status,
                    message,
                }),
                Ok(other) => Err(FetchError::Protocol {
                    peer,
                    reason: format!("unexpected answer {other:?}"),
                }),
                Err(e) => Err(FetchError::Protocol {
                    peer,
                    reason: e.to_string(),
                }),
            }
        };
        tokio::time::timeout(self.request_timeout, asked)
            .await
            .map_err(|_| FetchError::Timeout {
                peer,
                after: self.request_timeout,
            })?
    }

    /// Opens a stream, sends `frame` as its one request and finishes the sending side;
    /// returns the receiving side for the answer.
    async fn request(&self, frame: Frame) -> Result<quinn::RecvStream, FetchError> {
        let peer = self.addr();
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|source| FetchError::Connection { peer, source })?;
        send.write_all(&frame.to_bytes())
            .await
            .map_err(|e| stream(peer, e))?;
        send.finish().map_err(|e| stream(peer, e))?;
        Ok(recv)
    }

    /// Opens a have-stream for `blob`: first a bitfield, then deltas.
    pub async fn watch_have(&self, blob: Digest) -> Result<HaveStream, FetchError> {
        let peer = self.addr();
        let recv = self.request(Frame::HaveRequest { blob }).await?;
        Ok(HaveStream {
            peer,
            recv,
            buf: BytesMut::new(),
        })
    }
}

fn stream(peer: SocketAddr, e: impl std::fmt::Display) -> FetchError {
    FetchError::Stream {
        peer,
        reason: e.to_string(),
    }
}

async fn read_header(
    recv: &mut quinn::RecvStream,
    peer: SocketAddr,
) -> Result<wire::FrameHeader, FetchError> {
    let mut header = [0u8; wire::HEADER_LEN];
    recv.read_exact(&mut header)
        .await
        .map_err(|e| stream(peer, e))?;
    wire::decode_header(header).map_err(|e| FetchError::Protocol {
        peer,
        reason: e.to_string(),
    })
}

/// Reads the rest of a non-chunk answer and turns it into an error.
async fn refusal(
    header: wire::FrameHeader,
    recv: &mut quinn::RecvStream,
    peer: SocketAddr,
) -> FetchError {
    let mut frame = BytesMut::from(&header.to_bytes()[..]);
    frame.resize(wire::HEADER_LEN + header.len, 0);
    if let Err(e) = recv.read_exact(&mut frame[wire::HEADER_LEN..]).await {
        return stream(peer, e);
    }
    match wire::decode(&mut frame) {
        Ok(Some(Frame::Error { status, message })) => FetchError::Refused {
            peer,
            status,
            message,
        },
        Ok(other) => FetchError::Protocol {
            peer,
            reason: format!("unexpected answer {other:?}"),
        },
        Err(e) => FetchError::Protocol {
            peer,
            reason: e.to_string(),
        },
    }
}

/// What a peer holds of one blob, as it changes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum HaveUpdate {
    /// The full picture: bit `i` set when the peer holds chunk `i`.
    Bitfield { chunk_count: u32, bits: Bytes },
    /// Chunks the peer verified since the last update.
    Delta(Vec<ChunkIndex>),
}

/// The receiving end of a have-stream.
#[derive(Debug)]
pub struct HaveStream {
    peer: SocketAddr,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

impl HaveStream {
    /// The next update; `Ok(None)` when the peer holds the whole blob and closed the stream.
    pub async fn next(&mut self) -> Result<Option<HaveUpdate>, FetchError> {
        let peer = self.peer;
        loop {
            match wire::decode(&mut self.buf) {
                Ok(Some(Frame::HaveBitfield { chunk_count, bits })) => {
                    return Ok(Some(HaveUpdate::Bitfield { chunk_count, bits }));
                }
                Ok(Some(Frame::HaveDelta { indices })) => {
                    return Ok(Some(HaveUpdate::Delta(indices)));
                }
                Ok(Some(Frame::Error { status, message })) => {
                    return Err(FetchError::Refused {
                        peer,
                        status,
                        message,
                    });
                }
                Ok(Some(other)) => {
                    return Err(FetchError::Protocol {
                        peer,
                        reason: format!("unexpected {other:?} on a have-stream"),
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(FetchError::Protocol {
                        peer,
                        reason: e.to_string(),
                    });
                }
            }
            match self
                .recv
                .read_chunk(64 << 10, true)
                .await
                .map_err(|e| stream(peer, e))?
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(FetchError::Protocol {
                        peer,
                        reason: "have-stream ended inside a frame".into(),
                    });
                }
            }
        }
    }
}

/// Pause before asking again a peer that answered Busy.
const BUSY_RETRY: Duration = Duration::from_millis(50);

/// What [`ChunkEndpoint::fetch_blob`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchReport {
    pub chunks_stored: u32,
    pub bytes_stored: u64,
    pub elapsed: Duration,
}

impl ChunkEndpoint {
    /// Fetches every chunk of `manifest` that the local store lacks from `peer`, keeping
    /// `max_requests_in_flight` requests going, verifying each on put. The manifest must be in
    /// the local store already. A Busy answer is asked again after a pause; any other error stops
    /// it, and chunks stored so far stay stored.
    pub async fn fetch_blob(
        &self,
        peer: SocketAddr,
        manifest: &Manifest,
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let peer = self.peer(peer).await?;
        let store = self.store().clone();
        let blob = manifest.digest();
        let missing: Vec<ChunkIndex> = manifest
            .chunk_indices()
            .filter(|i| !store.has_chunk(&blob, *i))
            .collect();
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let missing = Arc::new(missing);
        let manifest = Arc::new(manifest.clone());
        let workers = self.inner.config.max_requests_in_flight.max(1) as usize;
        let mut tasks = tokio::task::JoinSet::<Result<(u32, u64), FetchError>>::new();
        for _ in 0..workers {
            let (peer, store, manifest, missing, next) = (
                peer.clone(),
                store.clone(),
                manifest.clone(),
                missing.clone(),
                next.clone(),
            );
            tasks.spawn(async move {
                let mut buf = Vec::with_capacity(manifest.chunk_size() as usize);
                let (mut chunks, mut bytes) = (0u32, 0u64);
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(&index) = missing.get(n) else {
                        return Ok((chunks, bytes));
                    };
                    // Busy is back-pressure (a full server, a saturated upload cap): ask
                    // again shortly, as downloads do.
                    let result = loop {
                        let (result, returned) =
                            peer.fetch_into_store(&store, &manifest, index, buf).await;
                        buf = returned;
                        match result {
                            Err(e) if e.is_busy() => tokio::time::sleep(BUSY_RETRY).await,
                            other => break other,
                        }
                    };
                    if result? == PutOutcome::Stored {
                        chunks += 1;
                        bytes += buf.len() as u64;
                    }
                }
            });
        }
        let mut report = FetchReport {
            chunks_stored: 0,
            bytes_stored: 0,
            elapsed: Duration::ZERO,
        };
        while let Some(joined) = tasks.join_next().await {
            let (chunks, bytes) = joined.map_err(|e| FetchError::Stream {
                peer: peer.addr(),
                reason: e.to_string(),
            })??;
            report.chunks_stored += chunks;
            report.bytes_stored += bytes;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }
}
