//! Deterministic discrete-event datacenter simulator driving Shoal's real planner.
//!
//! [`engine`] runs a [`spec::Spec`] under one of three strategies: Shoal (the coordinator's
//! `Assigner` and the agent's `ChunkPicker`, exactly the code the binaries run), a single
//! origin, and a random mesh. [`scenarios`] builds the named workloads; [`report`] prints
//! the table and judges the goals. The model and its simplifications are described in
//! `docs/ARCHITECTURE.md`.
//!
//! [`control`] models the coordinator's own CPU under many agents (the load generator's
//! scenario), with the coordinator's turn rules, and S coordinators sharded by blob.

pub mod control;
pub mod engine;
pub mod report;
pub mod scenarios;
pub mod spec;

pub use engine::{Checks, Outcome, Strategy, run};
pub use spec::{Fault, HostSpec, Params, Spec};
