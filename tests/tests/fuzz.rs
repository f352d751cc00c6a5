//! Stable-toolchain fuzzing of what Shoal decodes from others (issue 15 item 8): the QUIC
//! wire decoder, manifests, OCI references, registry token challenges and configuration
//! files. Each target runs for `SHOAL_FUZZ_SECS` (4 s by default) of mutated inputs around
//! valid seeds and its regression corpus in `tests/fuzz/<target>/`; see `src/fuzz.rs`.

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use shoal_proto::pb::v1 as pb;
use shoal_proto::wire::{self, ErrorStatus, Frame};
use shoal_proto::{ChunkIndex, Digest, Manifest};
use shoal_tests::fuzz;

fn report(target: &str, result: Result<u64, String>) {
    match result {
        Ok(tried) => eprintln!("{target}: {tried} inputs"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn wire_decoder() {
    let blob = Digest::of(b"blob");
    let frames = [
        Frame::ChunkRequest {
            blob,
            index: ChunkIndex(3),
        },
        Frame::ChunkData {
            index: ChunkIndex(1),
            data: Bytes::from_static(b"chunk bytes"),
        },
        Frame::Error {
            status: ErrorStatus::Busy,
            message: "busy".into(),
        },
        Frame::HaveRequest { blob },
        Frame::HaveBitfield {
            chunk_count: 12,
            bits: Bytes::from_static(&[0xff, 0x0f]),
        },
        Frame::HaveDelta {
            indices: vec![ChunkIndex(0), ChunkIndex(9)],
        },
        Frame::ChunkRejected {
            blob,
            index: ChunkIndex(2),
        },
    ];
    let mut all = BytesMut::new();
    let mut seeds = Vec::new();
    for f in &frames {
        let mut one = BytesMut::new();
        f.encode(&mut one);
        f.encode(&mut all);
        seeds.push(one.to_vec());
    }
    seeds.push(all.to_vec());
    // Never a panic; "incomplete" consumes nothing; what is accepted re-encodes to the
    // bytes it was read from.
    report("wire", fuzz::run("wire", &seeds, wire::check_decoder));
}

#[test]
fn manifests() {
    let seeds: Vec<Vec<u8>> = [(&[7u8; 3 * 4096][..], 4096), (&[1u8; 10][..], 4096)]
        .into_iter()
        .map(|(data, chunk)| {
            let m = Manifest::from_reader(data, chunk).expect("manifest");
            pb::Manifest::from(&m).encode_to_vec()
        })
        .collect();
    // Whatever a peer or registrant sends: refused, or a manifest that survives a round trip.
    report(
        "manifest",
        fuzz::run("manifest", &seeds, |data| {
            let Ok(message) = pb::Manifest::decode(data) else {
                return;
            };
            if let Ok(m) = Manifest::try_from(&message) {
                let again = Manifest::try_from(&pb::Manifest::from(&m)).expect("round trip");
                assert_eq!(again.digest(), m.digest());
                assert_eq!(again.chunk_count(), m.chunk_count());
            }
        }),
    );
}

#[test]
fn oci_references() {
    let seeds: Vec<Vec<u8>> = [
        "docker.io/library/alpine:3.20",
        "registry.example.com:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "localhost/a/b/c:v1.2-rc_3",
        "[::1]:5000/x:y",
        "alpine",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // A reference that parses prints as one that parses to the same thing.
    report(
        "reference",
        fuzz::run("reference", &seeds, |data| {
            let Ok(text) = std::str::from_utf8(data) else {
                return;
            };
            shoal_origin::validate_tag(text).ok();
            shoal_origin::validate_repository(text).ok();
            if let Ok(r) = text.parse::<shoal_origin::Reference>() {
                let printed = r.to_string();
                let again: shoal_origin::Reference = printed
                    .parse()
                    .unwrap_or_else(|e| panic!("{printed:?} (from {text:?}) does not parse: {e}"));
                assert_eq!(again, r, "{text:?}");
            }
        }),
    );
}

#[test]
fn registry_token_challenges() {
    let seeds: Vec<Vec<u8>> = [
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        r#"Basic realm="registry", Bearer realm="https://r/token""#,
        r#"Bearer realm="a\"b",error="insufficient_scope""#,
        "Bearer realm=https://x/t,service=s",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    report(
        "challenge",
        fuzz::run("challenge", &seeds, |data| {
            let text = String::from_utf8_lossy(data);
            shoal_origin::parse_www_authenticate(&text);
        }),
    );
}

#[test]
fn configuration_files() {
    let seeds: Vec<Vec<u8>> = [
        "listen = \"0.0.0.0:7400\"\njoin_token = \"t\"\nlease_ms = \"10s\"\nheartbeat_ms = 2000\njob_retention_hours = \"7d\"\nmax_api_request_bytes = \"16MiB\"\nagent_certificate_validity_ms = \"24h\"\n[[api_tokens]]\nname = \"ci\"\nrole = \"deployer\"\ntoken_file = \"/t\"\n[origin]\nmin_bytes_per_sec = \"1MB/s\"\n",
        "coordinator = \"https://c:7400\"\njoin_token = \"t\"\nquota_bytes = \"100GiB\"\nupload_limit_bytes_per_sec = \"200Mbit/s\"\nchunk_size = \"1MiB\"\nlabels = { zone = \"a\" }\n[mirror]\nfallback_after_ms = \"2s\"\n",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // A file is refused with an error, or loads and is checked: never a panic, whatever the
    // numbers and units.
    report(
        "config",
        fuzz::run("config", &seeds, |data| {
            let Ok(text) = std::str::from_utf8(data) else {
                return;
            };
            if let Ok(c) = toml::from_str::<shoal_coordinator::CoordinatorConfig>(text) {
                let _ = c.validate();
            }
            if let Ok(a) = toml::from_str::<shoal_agent::AgentConfig>(text) {
                let _ = a.validate();
            }
        }),
    );
}
