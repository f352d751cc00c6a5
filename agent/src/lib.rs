//! The Shoal agent: a content store of verified chunks and the QUIC transport that moves them
//! between agents.

pub mod store;
pub mod transport;
