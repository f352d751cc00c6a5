//! Every scheduling decision in Shoal, IO-free: no tokio, no sockets, no clock.
//!
//! Empty until the control-plane issue fills it: the coordinator's assignment of sources per
//! (blob, host) and the agent's chunk picking. It already depends only on `shoal-proto`, which
//! is the purity boundary this crate must keep.
