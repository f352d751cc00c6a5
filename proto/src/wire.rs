//! The agent-to-agent QUIC wire codec (ALPN `shoal/1`). Pure: bytes in, frames out, no IO.
//!
//! Every frame is `version: u8 | kind: u8 | len: u32 BE | payload[len]`. Two stream kinds use
//! it:
//! - a chunk stream (one bidirectional stream per request): the client sends
//!   [`Frame::ChunkRequest`], the server answers [`Frame::ChunkData`] or [`Frame::Error`];
//! - a have-stream (one per blob): the client sends [`Frame::HaveRequest`], the server answers
//!   one [`Frame::HaveBitfield`] and then [`Frame::HaveDelta`]s as chunks are verified;
//! - a rejection notice: the client sends [`Frame::ChunkRejected`] for a chunk this server sent
//!   that did not match the manifest, and the server closes the stream without an answer. A
//!   server older than the frame answers `Error(BadRequest)` (unknown kind), which the client
//!   ignores: the frame needs no new version;
//! - a table request: the client sends [`Frame::TableRequest`] for a blob whose order came
//!   without its chunk table, the server answers [`Frame::Table`] (the table's bytes, which
//!   the client checks against the digest its order names) or [`Frame::Error`]. A server
//!   older than the frame answers `Error(BadRequest)`, as for any source without the table.
//!
//! [`decode`] returns `Ok(None)` while a frame is incomplete and consumes nothing; it returns
//! an error as soon as the bytes cannot be a valid frame, including a declared length above
//! [`MAX_FRAME_LEN`], so a peer cannot make us buffer without bound.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{ChunkIndex, Digest};

/// The wire version this code speaks. A peer sending another version is refused.
pub const VERSION: u8 = 1;
/// The QUIC ALPN protocol identifier.
pub const ALPN: &[u8] = b"shoal/1";
/// Length of a frame header in bytes.
pub const HEADER_LEN: usize = 6;
/// Largest payload accepted: the largest chunk (16 MiB) plus its index.
pub const MAX_FRAME_LEN: usize = (16 << 20) + 4;
/// Largest chunk table a [`Frame::Table`] carries (the frame cap allows no more): 512 Ki
/// chunks, 512 GiB in 1 MiB chunks. A larger blob's orders carry their table themselves.
pub const MAX_TABLE_LEN: usize = 16 << 20;
const _: () = assert!(MAX_TABLE_LEN <= MAX_FRAME_LEN);
/// Largest error message carried, in bytes; longer messages are truncated on encode.
pub const MAX_MESSAGE_LEN: usize = 1024;

const KIND_CHUNK_REQUEST: u8 = 1;
const KIND_CHUNK_DATA: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_HAVE_REQUEST: u8 = 4;
const KIND_HAVE_BITFIELD: u8 = 5;
const KIND_HAVE_DELTA: u8 = 6;
const KIND_CHUNK_REJECTED: u8 = 7;
const KIND_TABLE_REQUEST: u8 = 8;
const KIND_TABLE: u8 = 9;

/// One message between agents.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Frame {
    /// Ask for one chunk of a blob.
    ChunkRequest { blob: Digest, index: ChunkIndex },
    /// The requested chunk's bytes. Unverified until the receiver checks the manifest.
    ChunkData { index: ChunkIndex, data: Bytes },
    /// The request could not be served.
    Error {
        status: ErrorStatus,
        message: String,
    },
    /// Open a have-stream: tell me which chunks of `blob` you hold, and then each new one.
    HaveRequest { blob: Digest },
    /// Which of `chunk_count` chunks the sender holds, bit `i` of byte `i / 8` (LSB first).
    HaveBitfield { chunk_count: u32, bits: Bytes },
    /// Chunks verified since the last have-message.
    HaveDelta { indices: Vec<ChunkIndex> },
    /// The chunk `index` of `blob` the receiver served failed verification here: it should
    /// read its copy back and drop it if it rotted.
    ChunkRejected { blob: Digest, index: ChunkIndex },
    /// Send me the chunk table of `blob`'s manifest.
    TableRequest { blob: Digest },
    /// A manifest's chunk table: 32 bytes per chunk, as `Manifest.chunk_digests`. Unverified
    /// until the receiver checks it against the digest of the table its order names.
    Table { digests: Bytes },
}

/// Why a request was refused.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ErrorStatus {
    /// The server does not hold that blob or chunk.
    NotFound = 1,
    /// The server is at its cap of concurrent requests; try another source or later.
    Busy = 2,
    /// The request was malformed.
    BadRequest = 3,
    /// The server failed to read its own store.
    Internal = 4,
}

impl ErrorStatus {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::NotFound,
            2 => Self::Busy,
            3 => Self::BadRequest,
            4 => Self::Internal,
            _ => return None,
        })
    }
}

/// Why bytes are not a valid frame. Any of these ends the stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unsupported wire version {0}; this agent speaks version {VERSION}")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("malformed {kind} frame: {reason}")]
    Malformed {
        kind: &'static str,
        reason: &'static str,
    },
}

/// Decodes one frame from the front of `buf`. `Ok(None)`: not enough bytes yet, nothing was
/// consumed. `Ok(Some(frame))`: exactly that frame was consumed. The chunk payload is split
/// off without copying when `buf` is `Bytes` or `BytesMut`.
pub fn decode(buf: &mut impl Buf) -> Result<Option<Frame>, WireError> {
    let Some(header) = peek_header(buf) else {
        return Ok(None);
    };
    let FrameHeader { kind, len } = decode_header(header)?;
    if buf.remaining() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let payload = buf.copy_to_bytes(len);
    parse_payload(kind, payload).map(Some)
}

/// A checked frame header: for readers that stream a large payload straight into their own
/// buffer instead of buffering the whole frame first.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameHeader {
    kind: u8,
    /// Payload length in bytes, at most [`MAX_FRAME_LEN`].
    pub len: usize,
}

impl FrameHeader {
    /// Whether the payload is a chunk (`index: u32` then the chunk's bytes).
    pub fn is_chunk_data(&self) -> bool {
        self.kind == KIND_CHUNK_DATA
    }

    /// The header's own bytes, to re-join with its payload for [`decode`].
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        put_header(&mut &mut out[..], self.kind, self.len);
        out
    }
}

/// The decoder's contract, checked on `data` (a fuzz target: `tests/tests/fuzz.rs` on stable,
/// `proto/fuzz` with cargo-fuzz): it never panics, answers "incomplete" without consuming
/// anything, and every frame it accepts re-encodes to the bytes it was read from. Panics when
/// the contract breaks.
#[doc(hidden)]
pub fn check_decoder(data: &[u8]) {
    let mut buf = Bytes::copy_from_slice(data);
    loop {
        let before = buf.remaining();
        match decode(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = before - buf.remaining();
                let start = data.len() - before;
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                assert_eq!(&again[..], &data[start..start + consumed]);
            }
            Ok(None) => {
                assert_eq!(
                    buf.remaining(),
                    before,
                    "incomplete, yet bytes were consumed"
                );
                break;
            }
            Err(_) => break,
        }
    }
}

/// Checks a frame header: version, kind and the length cap.
pub fn decode_header(header: [u8; HEADER_LEN]) -> Result<FrameHeader, WireError> {
    let [version, kind, l0, l1, l2, l3] = header;
    if version != VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    if !(KIND_CHUNK_REQUEST..=KIND_TABLE).contains(&kind) {
        return Err(WireError::UnknownKind(kind));
    }
    let len = u32::from_be_bytes([l0, l1, l2, l3]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(WireError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(FrameHeader { kind, len })
}

/// Reads the header without consuming it, whatever the `Buf`'s chunking.
fn peek_header(buf: &impl Buf) -> Option<[u8; HEADER_LEN]> {
    if buf.remaining() < HEADER_LEN {
        return None;
    }
    let mut header = [0u8; HEADER_LEN];
    let first = buf.chunk();
    if first.len() >= HEADER_LEN {
        header.copy_from_slice(&first[..HEADER_LEN]);
        return Some(header);
    }
    // Rare: the header spans several chunks. Six bytes span at most six non-empty slices.
    let mut slices = [std::io::IoSlice::new(&[]); HEADER_LEN];
    let n = buf.chunks_vectored(&mut slices);
    let mut filled = 0;
    for s in &slices[..n] {
        let take = (HEADER_LEN - filled).min(s.len());
        header[filled..filled + take].copy_from_slice(&s[..take]);
        filled += take;
        if filled == HEADER_LEN {
            return Some(header);
        }
    }
    None
}

fn parse_payload(kind: u8, mut p: Bytes) -> Result<Frame, WireError> {
    let malformed = |kind, reason| WireError::Malformed { kind, reason };
    Ok(match kind {
        KIND_CHUNK_REQUEST => {
            if p.len() != Digest::LEN + 4 {
                return Err(malformed("chunk request", "payload must be 36 bytes"));
            }
            let blob = take_digest(&mut p);
            Frame::ChunkRequest {
                blob,
                index: ChunkIndex(p.get_u32()),
            }
        }
        KIND_CHUNK_DATA => {
            if p.len() < 4 {
                return Err(malformed(
                    "chunk data",
                    "payload shorter than the chunk index",
                ));
            }
            let index = ChunkIndex(p.get_u32());
            Frame::ChunkData { index, data: p }
        }
        KIND_ERROR => {
            if p.is_empty() {
                return Err(malformed("error", "missing status"));
            }
            let status = ErrorStatus::from_u8(p.get_u8())
                .ok_or_else(|| malformed("error", "unknown status"))?;
            if p.len() > MAX_MESSAGE_LEN {
                return Err(malformed("error", "message longer than 1024 bytes"));
            }
            let message = String::from_utf8(p.to_vec())
                .map_err(|_| malformed("error", "message not UTF-8"))?;
            Frame::Error { status, message }
        }
        KIND_HAVE_REQUEST => {
            if p.len() != Digest::LEN {
                return Err(malformed("have request", "payload must be 32 bytes"));
            }
            Frame::HaveRequest {
                blob: take_digest(&mut p),
            }
        }
        KIND_HAVE_BITFIELD => {
            if p.len() < 4 {
                return Err(malformed(
                    "have bitfield",
                    "payload shorter than the chunk count",
                ));
            }
            let chunk_count = p.get_u32();
            if p.len() != (chunk_count as usize).div_ceil(8) {
                return Err(malformed(
                    "have bitfield",
                    "bitfield length does not match chunk count",
                ));
            }
            let spare = (8 - chunk_count % 8) % 8;
            if spare > 0 && p.last().is_some_and(|last| last >> (8 - spare) != 0) {
                return Err(malformed("have bitfield", "bits set past the last chunk"));
            }
            Frame::HaveBitfield {
                chunk_count,
                bits: p,
            }
        }
        KIND_HAVE_DELTA => {
            if p.len() % 4 != 0 {
                return Err(malformed(
                    "have delta",
                    "payload not a whole number of indices",
                ));
            }
            let mut indices = Vec::with_capacity(p.len() / 4);
            while p.has_remaining() {
                indices.push(ChunkIndex(p.get_u32()));
            }
            Frame::HaveDelta { indices }
        }
        KIND_CHUNK_REJECTED => {
            if p.len() != Digest::LEN + 4 {
                return Err(malformed("chunk rejected", "payload must be 36 bytes"));
            }
            let blob = take_digest(&mut p);
            Frame::ChunkRejected {
                blob,
                index: ChunkIndex(p.get_u32()),
            }
        }
        KIND_TABLE_REQUEST => {
            if p.len() != Digest::LEN {
                return Err(malformed("table request", "payload must be 32 bytes"));
            }
            Frame::TableRequest {
                blob: take_digest(&mut p),
            }
        }
        KIND_TABLE => {
            if p.len() % Digest::LEN != 0 {
                return Err(malformed("table", "payload not a whole number of digests"));
            }
            Frame::Table { digests: p }
        }
        _ => return Err(WireError::UnknownKind(kind)),
    })
}

fn take_digest(p: &mut Bytes) -> Digest {
    let mut raw = [0u8; Digest::LEN];
    p.copy_to_slice(&mut raw);
    Digest::from_bytes(raw)
}

impl Frame {
    /// The payload length this frame encodes to.
    pub fn payload_len(&self) -> usize {
        match self {
            Frame::ChunkRequest { .. } | Frame::ChunkRejected { .. } => Digest::LEN + 4,
            Frame::ChunkData { data, .. } => 4 + data.len(),
            Frame::Error { message, .. } => 1 + truncated(message).len(),
            Frame::HaveRequest { .. } | Frame::TableRequest { .. } => Digest::LEN,
            Frame::Table { digests } => digests.len(),
            Frame::HaveBitfield { bits, .. } => 4 + bits.len(),
            Frame::HaveDelta { indices } => 4 * indices.len(),
        }
    }

    fn kind(&self) -> u8 {
        match self {
            Frame::ChunkRequest { .. } => KIND_CHUNK_REQUEST,
            Frame::ChunkData { .. } => KIND_CHUNK_DATA,
            Frame::Error { .. } => KIND_ERROR,
            Frame::HaveRequest { .. } => KIND_HAVE_REQUEST,
            Frame::HaveBitfield { .. } => KIND_HAVE_BITFIELD,
            Frame::HaveDelta { .. } => KIND_HAVE_DELTA,
            Frame::ChunkRejected { .. } => KIND_CHUNK_REJECTED,
            Frame::TableRequest { .. } => KIND_TABLE_REQUEST,
            Frame::Table { .. } => KIND_TABLE,
        }
    }

    /// Appends the whole frame to `dst`. For chunk data on the hot path, prefer
    /// [`chunk_data_header`] and send the `Bytes` itself, which copies nothing.
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(HEADER_LEN + self.payload_len());
        put_header(dst, self.kind(), self.payload_len());
        match self {
            Frame::ChunkRequest { blob, index } | Frame::ChunkRejected { blob, index } => {
                dst.put_slice(blob.as_bytes());
                dst.put_u32(index.0);
            }
            Frame::ChunkData { index, data } => {
                dst.put_u32(index.0);
                dst.put_slice(data);
            }
            Frame::Error { status, message } => {
                dst.put_u8(*status as u8);
                dst.put_slice(truncated(message).as_bytes());
            }
            Frame::HaveRequest { blob } | Frame::TableRequest { blob } => {
                dst.put_slice(blob.as_bytes())
            }
            Frame::Table { digests } => dst.put_slice(digests),
            Frame::HaveBitfield { chunk_count, bits } => {
                dst.put_u32(*chunk_count);
                dst.put_slice(bits);
            }
            Frame::HaveDelta { indices } => {
                for i in indices {
                    dst.put_u32(i.0);
                }
            }
        }
    }

    /// The frame as one `Bytes`.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

/// The header and index of a [`Frame::ChunkData`] carrying `data_len` bytes; send these 10
/// bytes and then the chunk's `Bytes` to avoid copying the chunk.
pub fn chunk_data_header(index: ChunkIndex, data_len: usize) -> [u8; HEADER_LEN + 4] {
    let mut out = [0u8; HEADER_LEN + 4];
    let mut dst = &mut out[..];
    put_header(&mut dst, KIND_CHUNK_DATA, 4 + data_len);
    dst.put_u32(index.0);
    out
}

fn put_header(dst: &mut impl BufMut, kind: u8, len: usize) {
    dst.put_u8(VERSION);
    dst.put_u8(kind);
    // Callers never build payloads near 4 GiB; chunks are at most 16 MiB.
    dst.put_u32(len as u32);
}

fn truncated(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_LEN {
        return message;
    }
    let mut end = MAX_MESSAGE_LEN;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Sets bit `index` in a have-bitfield.
pub fn bitfield_set(bits: &mut [u8], index: ChunkIndex) {
    bits[index.as_usize() / 8] |= 1 << (index.0 % 8);
}

/// Whether bit `index` is set in a have-bitfield; out of range reads as absent.
pub fn bitfield_get(bits: &[u8], index: ChunkIndex) -> bool {
    bits.get(index.as_usize() / 8)
        .is_some_and(|b| b & (1 << (index.0 % 8)) != 0)
}

#[cfg(test)]
mod tests;
