//! The Shoal agent: a content store of verified chunks, the QUIC transport that moves them
//! between agents, the control session with the coordinator that says what to fetch from
//! whom, and the local API (push, pull, status) on a Unix socket.
//!
//! [`Agent::start`] runs it all; [`run`] adds waiting for a shutdown signal.

mod agent;
mod backoff;
mod bring;
mod capacity;
pub mod config;
mod counters;
mod download;
mod error;
mod execute;
mod failure;
pub mod health;
mod ingest;
pub mod limiter;
mod link;
pub mod local_api;
pub mod metrics;
pub mod mirror;
mod orders;
mod readers;
mod renew;
mod repair;
mod scrub;
mod session;
mod shutdown;
pub mod store;
pub mod transport;
mod trust;

pub use agent::{Agent, AgentStats, run};
pub use config::AgentConfig;
pub use error::AgentError;
pub use limiter::RateLimiter;
