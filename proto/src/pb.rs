//! Generated protobuf messages and gRPC clients/servers of the `shoal.v1`
//! package (see `proto/shoal/v1/*.proto`).
//!
//! - `v1::coordinator_client` / `v1::coordinator_server`: public job API.
//! - `v1::agent_session_client` / `v1::agent_session_server`: agent <-> coordinator.
//! - `v1::agent_local_client` / `v1::agent_local_server`: the agent's local API.

/// The `shoal.v1` package.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    rustdoc::bare_urls,
    rustdoc::broken_intra_doc_links,
    rustdoc::invalid_html_tags,
    unreachable_pub,
    unused_qualifications
)]
pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// Encoded `google.protobuf.FileDescriptorSet` of `shoal.v1` and its imports
/// (with comments), for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/shoal_descriptor.bin"));
