//! Feeds arbitrary bytes to the wire decoder: it must never panic, never consume bytes when it
//! answers "incomplete", and everything it accepts must re-encode to the bytes it consumed
//! (`shoal_proto::wire::check_decoder`, which `tests/tests/fuzz.rs` also runs on stable).
//!
//! `cargo +nightly fuzz run decode` from `proto/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| shoal_proto::wire::check_decoder(data));
