//! Shoal's benchmarks: criterion micro benches in `benches/`, throughput binaries in `src/bin/`.

pub mod cluster;
