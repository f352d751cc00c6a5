//! Every scheduling decision in Shoal, IO-free: no tokio, no sockets, no clock.
//!
//! Four state machines, in the style of `quinn-proto` (events in, `poll_*` out, time passed
//! in, randomness seeded by the caller, deterministic iteration):
//!
//! - [`Assigner`] (coordinator side, per (blob, host)): which hosts each target pulls a blob
//!   from, with bounded fan-out and upload capacity accounted per source, same rack before
//!   same zone before elsewhere, host leases, and re-planning when sources come and go.
//! - [`ChunkPicker`] (agent side, per chunk of one download): which chunk to ask which
//!   assigned source for next (random first, then rarest-first, endgame duplicates), and how
//!   many requests to keep in flight per source (bandwidth × delay).
//! - [`Seeder`] (coordinator side, per blob nobody holds): which targets fetch a blob from
//!   its origin (whole, or in ranges), failover when they fail, and single flight for URLs
//!   pulled without a digest.
//! - [`Turns`] (coordinator side, per turn of its one state thread): whether a read, a batch
//!   of the agents' messages or the due timers go next, and how long the timer rests after
//!   sending orders.
//!
//! The coordinator, the agent and the simulator are drivers; given the same seed and the
//! same inputs, the machines produce the same outputs.

mod assign;
mod by_host;
mod chunkset;
mod pick;
mod seed;
mod tiered;
mod time;
mod turns;

#[cfg(test)]
mod swarm_tests;

pub use assign::{Assigner, AssignerConfig, AssignerStats, Command, Event, Notice, Priority};
pub use chunkset::ChunkSet;
pub use pick::{ChunkPicker, PickerConfig, PickerStats};
pub use seed::{
    GiveUp, LastError, SeedCommand, SeedEvent, SeedFault, SeedNotice, Seeder, SeederConfig,
    SeederStats, UrlAnswer, UrlKey,
};
pub use time::Time;
pub use turns::{Turn, TurnConfig, Turns, Waiting};

pub use shoal_proto::{BlobId, ChunkIndex};

/// A host as the planner knows it: a dense number the driver maps its agent ids onto.
///
/// The same `HostId` must mean the same agent for the lifetime of an [`Assigner`]; the agent
/// side uses the ids it finds in fetch orders to name sources in its [`ChunkPicker`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct HostId(pub u32);

/// A failure domain / network zone, interned by the driver from the agent's labels.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ZoneId(pub u32);

/// A rack, interned by the driver. Two hosts share a rack only if they share the zone too,
/// so rack numbers may repeat across zones.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct RackId(pub u32);

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host{}", self.0)
    }
}
