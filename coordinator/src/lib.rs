//! The Shoal coordinator: tracks agents and blobs, plans transfers.
//!
//! Empty until the control-plane issue fills it; the gRPC contract it will serve is
//! `shoal_proto::pb::v1::coordinator_server`.
