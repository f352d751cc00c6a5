use bytes::{Buf, Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest::from_bytes)
}

fn status() -> impl Strategy<Value = ErrorStatus> {
    prop_oneof![
        Just(ErrorStatus::NotFound),
        Just(ErrorStatus::Busy),
        Just(ErrorStatus::BadRequest),
        Just(ErrorStatus::Internal),
    ]
}

fn bitfield() -> impl Strategy<Value = Frame> {
    proptest::collection::vec(any::<bool>(), 0..200).prop_map(|have| {
        let mut bits = vec![0u8; have.len().div_ceil(8)];
        for (i, h) in have.iter().enumerate() {
            if *h {
                bitfield_set(&mut bits, ChunkIndex(i as u32));
            }
        }
        Frame::HaveBitfield {
            chunk_count: have.len() as u32,
            bits: bits.into(),
        }
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (digest(), any::<u32>()).prop_map(|(blob, i)| Frame::ChunkRequest {
            blob,
            index: ChunkIndex(i)
        }),
        (
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..4096)
        )
            .prop_map(|(i, d)| {
                Frame::ChunkData {
                    index: ChunkIndex(i),
                    data: d.into(),
                }
            }),
        (status(), "\\PC{0,64}").prop_map(|(status, message)| Frame::Error { status, message }),
        digest().prop_map(|blob| Frame::HaveRequest { blob }),
        bitfield(),
        proptest::collection::vec(any::<u32>(), 0..64).prop_map(|v| Frame::HaveDelta {
            indices: v.into_iter().map(ChunkIndex).collect()
        }),
        (digest(), any::<u32>()).prop_map(|(blob, i)| Frame::ChunkRejected {
            blob,
            index: ChunkIndex(i)
        }),
        digest().prop_map(|blob| Frame::TableRequest { blob }),
        proptest::collection::vec(digest(), 0..64).prop_map(|v| Frame::Table {
            digests: Digest::table_bytes(&v).into()
        }),
    ]
}

proptest! {
    #[test]
    fn every_frame_round_trips(f in frame()) {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        prop_assert_eq!(buf.len(), HEADER_LEN + f.payload_len());
        let got = decode(&mut buf);
        prop_assert_eq!(got, Ok(Some(f)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn every_prefix_is_incomplete_and_untouched(f in frame(), cut in 0usize..10_000) {
        let bytes = f.to_bytes();
        let cut = cut % bytes.len();
        let mut prefix = bytes.slice(..cut);
        prop_assert_eq!(decode(&mut prefix), Ok(None));
        prop_assert_eq!(prefix.len(), cut);
    }

    #[test]
    fn frames_split_across_buffers_decode_the_same(a in frame(), b in frame(), cut in 0usize..10_000) {
        let mut all = BytesMut::new();
        a.encode(&mut all);
        b.encode(&mut all);
        let all = all.freeze();
        let cut = cut % all.len();
        let mut chained = all.slice(..cut).chain(all.slice(cut..));
        prop_assert_eq!(decode(&mut chained), Ok(Some(a)));
        prop_assert_eq!(decode(&mut chained), Ok(Some(b)));
        prop_assert_eq!(chained.remaining(), 0);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut buf = Bytes::from(bytes);
        while let Ok(Some(_)) = decode(&mut buf) {}
    }
}

#[test]
fn chunk_data_header_matches_full_encoding() {
    let data = Bytes::from_static(b"hello chunk");
    let frame = Frame::ChunkData {
        index: ChunkIndex(7),
        data: data.clone(),
    };
    let mut joined = BytesMut::from(&chunk_data_header(ChunkIndex(7), data.len())[..]);
    joined.extend_from_slice(&data);
    assert_eq!(joined.freeze(), frame.to_bytes());
}

#[test]
fn chunk_payload_is_split_off_without_copying() {
    let frame = Frame::ChunkData {
        index: ChunkIndex(1),
        data: Bytes::from(vec![9u8; 1 << 16]),
    };
    let mut buf = frame.to_bytes();
    let base = buf.as_ptr() as usize;
    let Ok(Some(Frame::ChunkData { data, .. })) = decode(&mut buf) else {
        panic!("expected chunk data");
    };
    assert_eq!(data.as_ptr() as usize, base + HEADER_LEN + 4);
}

fn raw(version: u8, kind: u8, payload: &[u8]) -> Bytes {
    let mut v = vec![version, kind];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v.into()
}

#[test]
fn malformed_frames_are_rejected_precisely() {
    let cases: Vec<(Bytes, WireError)> = vec![
        (
            raw(2, KIND_CHUNK_REQUEST, &[0; 36]),
            WireError::UnsupportedVersion(2),
        ),
        (raw(VERSION, 0, &[]), WireError::UnknownKind(0)),
        (raw(VERSION, 99, &[]), WireError::UnknownKind(99)),
        (
            raw(VERSION, KIND_CHUNK_REQUEST, &[0; 35]),
            WireError::Malformed {
                kind: "chunk request",
                reason: "payload must be 36 bytes",
            },
        ),
        (
            raw(VERSION, KIND_CHUNK_DATA, &[0; 3]),
            WireError::Malformed {
                kind: "chunk data",
                reason: "payload shorter than the chunk index",
            },
        ),
        (
            raw(VERSION, KIND_ERROR, &[9, b'x']),
            WireError::Malformed {
                kind: "error",
                reason: "unknown status",
            },
        ),
        (
            raw(VERSION, KIND_ERROR, &[1, 0xff, 0xfe]),
            WireError::Malformed {
                kind: "error",
                reason: "message not UTF-8",
            },
        ),
        (
            raw(VERSION, KIND_HAVE_BITFIELD, &[0, 0, 0, 9, 0xff]),
            WireError::Malformed {
                kind: "have bitfield",
                reason: "bitfield length does not match chunk count",
            },
        ),
        (
            raw(VERSION, KIND_HAVE_BITFIELD, &[0, 0, 0, 3, 0b1000]),
            WireError::Malformed {
                kind: "have bitfield",
                reason: "bits set past the last chunk",
            },
        ),
        (
            raw(VERSION, KIND_HAVE_DELTA, &[0; 5]),
            WireError::Malformed {
                kind: "have delta",
                reason: "payload not a whole number of indices",
            },
        ),
        (
            raw(VERSION, KIND_CHUNK_REJECTED, &[0; 37]),
            WireError::Malformed {
                kind: "chunk rejected",
                reason: "payload must be 36 bytes",
            },
        ),
        (
            raw(VERSION, KIND_TABLE_REQUEST, &[0; 33]),
            WireError::Malformed {
                kind: "table request",
                reason: "payload must be 32 bytes",
            },
        ),
        (
            raw(VERSION, KIND_TABLE, &[0; 33]),
            WireError::Malformed {
                kind: "table",
                reason: "payload not a whole number of digests",
            },
        ),
        (
            raw(VERSION, KIND_TABLE + 1, &[]),
            WireError::UnknownKind(KIND_TABLE + 1),
        ),
    ];
    for (mut bytes, want) in cases {
        assert_eq!(decode(&mut bytes), Err(want.clone()), "{want}");
    }
}

#[test]
fn the_largest_table_fits_a_frame() {
    let table = Frame::Table {
        digests: vec![7u8; MAX_TABLE_LEN].into(),
    };
    let mut bytes = table.to_bytes();
    assert_eq!(decode(&mut bytes), Ok(Some(table)));
}

#[test]
fn oversized_length_is_rejected_before_buffering() {
    // Only the header has arrived, declaring a huge payload: reject now, do not wait for it.
    let mut header = Bytes::from(vec![VERSION, KIND_CHUNK_DATA, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(
        decode(&mut header),
        Err(WireError::FrameTooLarge {
            len: u32::MAX as usize,
            max: MAX_FRAME_LEN
        })
    );
}

#[test]
fn long_error_messages_are_truncated_on_a_char_boundary() {
    let frame = Frame::Error {
        status: ErrorStatus::Busy,
        message: "é".repeat(1000),
    };
    let mut bytes = frame.to_bytes();
    let Ok(Some(Frame::Error { message, .. })) = decode(&mut bytes) else {
        panic!("expected error frame");
    };
    assert_eq!(message.len(), MAX_MESSAGE_LEN);
}

#[test]
fn bitfield_helpers() {
    let mut bits = vec![0u8; 2];
    bitfield_set(&mut bits, ChunkIndex(9));
    assert!(bitfield_get(&bits, ChunkIndex(9)));
    assert!(!bitfield_get(&bits, ChunkIndex(8)));
    assert!(!bitfield_get(&bits, ChunkIndex(100)));
}
