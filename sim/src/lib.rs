//! Deterministic discrete-event datacenter simulator driving `shoal-planner`.
//!
//! Empty until the simulator issue fills it.
