//! Shared helpers for Shoal's end-to-end tests (see `tests/tests/`).
//!
//! Real-tool fixtures, started by the tests themselves on loopback: an OCI registry
//! ([`registry`]), OCI images built offline and moved with skopeo ([`oci_image`]), and
//! containerd with `ctr` ([`containerd`]). [`tools`] finds their binaries. [`fuzz`] is a small mutation fuzzer
//! for `tests/fuzz.rs`. [`impostor`] is an agent of a test's own, saying on its session what the
//! test makes it say.

pub mod containerd;
pub mod fuzz;
pub mod impostor;
pub mod netns;
pub mod oci_image;
pub mod registry;
pub mod tools;
