//! Metric names of the coordinator, exported by the binary's Prometheus endpoint.

/// Agents with a live session.
pub const AGENTS_READY: &str = "shoal_coordinator_agents_ready";
/// Jobs by state (`state` label).
pub const JOBS: &str = "shoal_coordinator_jobs";
/// Bytes verified on targets of unfinished jobs.
pub const JOB_BYTES_DONE: &str = "shoal_coordinator_job_bytes_done";
/// Blobs in the catalog.
pub const BLOBS: &str = "shoal_coordinator_blobs";
/// Planner decisions, by kind (`kind` label: order, source_update, cancel, replan, ...).
pub const PLANNER_DECISIONS: &str = "shoal_coordinator_planner_decisions_total";
/// Rows of the state database skipped at load because they do not decode (`table` label).
pub const BAD_ROWS: &str = "shoal_coordinator_bad_state_rows_total";
