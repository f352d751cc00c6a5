//! The Shoal agent: a content store of verified chunks, the QUIC transport that moves them
//! between agents, the control session with the coordinator that says what to fetch from
//! whom, and the local API (push, pull, status) on a Unix socket.
//!
//! [`Agent::start`] runs it all; [`run`] adds waiting for a shutdown signal.

mod agent;
pub mod config;
mod download;
pub mod health;
mod ingest;
pub mod limiter;
pub mod local_api;
pub mod metrics;
pub mod mirror;
mod order;
mod session;
pub mod store;
mod transfers;
pub mod transport;

pub use agent::{Agent, AgentError, AgentStats, run};
pub use config::AgentConfig;
pub use limiter::RateLimiter;
