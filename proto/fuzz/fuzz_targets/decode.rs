//! Feeds arbitrary bytes to the wire decoder: it must never panic, never consume bytes when it
//! answers "incomplete", and everything it accepts must re-encode to the bytes it consumed.
//!
//! `cargo +nightly fuzz run decode` from `proto/`.
#![no_main]

use bytes::{Buf, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use shoal_proto::wire;

fuzz_target!(|data: &[u8]| {
    let mut buf = Bytes::copy_from_slice(data);
    loop {
        let before = buf.remaining();
        match wire::decode(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = before - buf.remaining();
                let start = data.len() - before;
                let mut again = BytesMut::new();
                frame.encode(&mut again);
                assert_eq!(&again[..], &data[start..start + consumed]);
            }
            Ok(None) => {
                assert_eq!(buf.remaining(), before);
                break;
            }
            Err(_) => break,
        }
    }
});
