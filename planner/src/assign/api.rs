//! What goes in and out of the [`Assigner`](super::Assigner).

use std::time::Duration;

use crate::{BlobId, HostId, RackId, ZoneId};

/// A target's urgency: higher is served first when sources are scarce.
pub type Priority = i32;

/// What the driver tells the assigner. Events about hosts that are down (never came up, or
/// whose lease expired) are ignored, except [`Event::HostUp`] and [`Event::Want`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Event {
    /// A host joined or reconnected. A host already up is first taken down (its soft state,
    /// inventory and orders, is dropped: it reports its inventory again with `Holds`); its
    /// wants survive and are re-ordered. Starts its lease.
    HostUp {
        host: HostId,
        zone: ZoneId,
        rack: RackId,
        upload_bps: u64,
        download_bps: u64,
    },
    /// What a host's links deliver changed (the agent learned it from its traffic): plans
    /// made from now on use these rates. Downloads it already serves keep their shares,
    /// even if they now add up to more than its new upload; it takes no new one until they
    /// fit.
    HostCapacity {
        host: HostId,
        upload_bps: u64,
        download_bps: u64,
    },
    /// A host crashed or left: its downloaders are re-planned, its own downloads released.
    HostDown { host: HostId },
    /// Renews the host's lease. Any message from an agent may be turned into one.
    Heartbeat { host: HostId },
    /// Size and chunk count of a blob. Optional: events for unknown blobs create them.
    BlobKnown {
        blob: BlobId,
        size: u64,
        chunk_count: u32,
    },
    /// Inventory or progress: `host` holds `chunks` verified chunks of `blob`. `chunks == 0`
    /// and `!complete` means it no longer holds any (evicted). `complete` while the host
    /// has a download of the blob counts as [`Event::Done`].
    Holds {
        host: HostId,
        blob: BlobId,
        chunks: u32,
        complete: bool,
    },
    /// A job wants `blob` on `host`. Repeating it only updates the priority. Survives the
    /// host going down; a host that already holds the blob complete is left alone.
    Want {
        blob: BlobId,
        host: HostId,
        priority: Priority,
    },
    /// The job no longer wants it: the order is cancelled if one was sent.
    Unwant { blob: BlobId, host: HostId },
    /// The host finished and verified the blob.
    Done { host: HostId, blob: BlobId },
    /// The host's download failed and stopped. Retried with exponential backoff up to
    /// [`AssignerConfig::max_attempts`] orders, then dropped with [`Notice::GaveUp`]. Why
    /// it failed is the driver's to report: every failure is retried alike.
    Failed { host: HostId, blob: BlobId },
    /// `source` made no progress for `host`: it is replaced and never given to this target
    /// for this download again.
    SourceStalled {
        host: HostId,
        blob: BlobId,
        source: HostId,
    },
    /// `source` sent a chunk of `blob` that failed verification: `host` never uses it for
    /// that blob again; once [`super::CORRUPT_QUORUM`] distinct hosts have reported it, no
    /// one does. Every report is counted in the stats.
    SourceCorrupt {
        host: HostId,
        blob: BlobId,
        source: HostId,
    },
    /// The manifest `blob`'s chunks were checked against was wrong and is replaced: the
    /// reports of corrupt sources made against it are forgotten (their chunks may well be
    /// right). Running downloads keep the sources each excluded.
    ManifestReplaced { blob: BlobId },
}

/// An order for one agent. Every command names the host it must be sent to.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Command {
    /// Start downloading `blob`, pulling from `sources` (nearest and most complete first).
    /// Only sent with at least one source: targets without any wait for a holder.
    Fetch {
        host: HostId,
        blob: BlobId,
        sources: Vec<HostId>,
    },
    /// Replace the source set of a running download. May be empty: keep what is verified,
    /// stop requesting, and wait for the next update.
    UpdateSources {
        host: HostId,
        blob: BlobId,
        sources: Vec<HostId>,
    },
    /// Stop downloading `blob`; verified chunks may be kept.
    Cancel { host: HostId, blob: BlobId },
}

impl Command {
    /// The agent this command is for.
    pub fn host(&self) -> HostId {
        match self {
            Command::Fetch { host, .. }
            | Command::UpdateSources { host, .. }
            | Command::Cancel { host, .. } => *host,
        }
    }
}

/// Outcomes for the job layer, not for agents.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Notice {
    /// `host` failed `blob` [`AssignerConfig::max_attempts`] times; the assigner stopped
    /// planning it (as if unwanted). A new `Want` starts over.
    GaveUp {
        host: HostId,
        blob: BlobId,
        attempts: u32,
    },
}

/// Default of [`AssignerConfig::restripe_delay`].
pub const RESTRIPE_DELAY_MS: u64 = 100;

/// Tunables. [`Default`] gives the v1 policy.
#[derive(Clone, Debug)]
pub struct AssignerConfig {
    /// K: most sources one target pulls a blob from at once. Four, not six as before: on the
    /// real-network benchmark N = 16 went from 2.10-2.23 to 1.92-1.93 the bound with less CPU
    /// per byte (fewer connections), N = 8 stayed (1.26-1.30), and the simulator's
    /// scenarios were the same or better (kraken-bench p99 1.065 -> 1.027); BENCHMARKS,
    /// stop 32.
    pub max_sources: usize,
    /// F: most downloads one source serves at once, over all blobs.
    pub max_uploads: usize,
    /// A download with no complete source that reports no progress for this long is
    /// given one (it may sit among partial holders that all lack the same chunks).
    pub stuck_after: Duration,
    /// A host silent (no `Heartbeat`/`HostUp`) for this long is down.
    pub lease: Duration,
    /// Orders per (blob, host) before giving up on repeated `Failed`.
    pub max_attempts: u32,
    /// Wait before the first retry after `Failed`; doubles each further attempt.
    pub retry_backoff: Duration,
    /// A download without a complete source whose rate over `stuck_after` is below this
    /// fraction of its share of the target's link is slow: like a stuck one, it gets a
    /// complete holder with room in place of its least advanced source. 0 = off.
    pub slow_fraction: f64,
    /// How long the other downloaders of a source wait before their stripes follow a
    /// change in who it serves (see `Assigner::stripe`): changes within this window go out
    /// as one `UpdateSources` per download. Zero: at once.
    pub restripe_delay: Duration,
    /// Wants planned at once per batch or timeout; a bigger burst (one `Distribute` to
    /// thousands of hosts) is planned a slice per `handle_timeout`, so the driver can
    /// handle other work between slices (see `intake`).
    pub intake_slice: usize,
}

impl Default for AssignerConfig {
    fn default() -> Self {
        Self {
            max_sources: 4,
            max_uploads: 256,
            stuck_after: Duration::from_secs(2),
            lease: Duration::from_secs(10),
            max_attempts: 3,
            retry_backoff: Duration::from_secs(1),
            slow_fraction: 0.5,
            restripe_delay: Duration::from_millis(RESTRIPE_DELAY_MS),
            intake_slice: 128,
        }
    }
}

/// Counters, read by the driver and exported as metrics there.
#[derive(Clone, Default, PartialEq, Eq, Debug)]
pub struct AssignerStats {
    /// `Fetch` commands sent.
    pub orders: u64,
    /// `UpdateSources` commands sent.
    pub source_updates: u64,
    /// `Cancel` commands sent.
    pub cancels: u64,
    /// Source slots handed out (one per (source, target) pairing).
    pub assignments: u64,
    /// Downloads re-planned because a source left, stalled, lied or was evicted.
    pub replans: u64,
    /// Sources found by splitting an edge (see `Assigner::split_edges`).
    pub splits: u64,
    /// `UpdateSources` commands (counted in `source_updates`) whose sources did not change,
    /// only their stripes.
    pub stripe_updates: u64,
    /// Stripe changes folded into a later command by `restripe_delay`.
    pub restripes_coalesced: u64,
    /// Downloads finished.
    pub completions: u64,
    /// Wants that waited for a later slice (see [`AssignerConfig::intake_slice`]).
    pub wants_queued: u64,
    /// `Failed` events.
    pub failures: u64,
    /// Downloads dropped after `max_attempts`.
    pub gave_up: u64,
    /// `SourceStalled` events.
    pub stalls: u64,
    /// `SourceCorrupt` events (every report, including repeats).
    pub corrupt_reports: u64,
    /// Hosts taken down because their lease expired.
    pub lease_expiries: u64,
    /// Hosts taken down for any reason (lease, `HostDown`, reconnect).
    pub host_downs: u64,
    /// Candidate (source, target) pairs checked for room: the planner's work. Bounded per
    /// event (see `OFFER_SCAN_LIMIT`, `TOP_UP_SCAN_LIMIT`), so it grows with the events,
    /// not with the swarm.
    pub candidates_examined: u64,
}
