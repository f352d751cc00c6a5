//! Metric names of the agent, in one place. The agent records through the `metrics` facade;
//! the binary installs the exporter (Prometheus).

/// Bytes received and verified, labelled `source` = [`SOURCE_PEER`] or [`SOURCE_ORIGIN`].
pub const BYTES_IN: &str = "shoal_agent_received_bytes_total";
/// Bytes of chunks served to peers.
pub const BYTES_OUT: &str = "shoal_agent_served_bytes_total";
/// Chunks received that matched the manifest and were stored.
pub const CHUNKS_VERIFIED: &str = "shoal_agent_chunks_verified_total";
/// Chunks received that did not match the manifest (the peer was dropped).
pub const CHUNKS_REJECTED: &str = "shoal_agent_chunks_rejected_total";
/// Blobs read back whole against their digest (a manifest nobody but its registrant
/// vouched for, a pull, a scrub of the whole blob): each costs one read of the blob.
pub const WHOLE_READS: &str = "shoal_agent_whole_blob_reads_total";
/// Fetch orders currently running.
pub const ACTIVE_TRANSFERS: &str = "shoal_agent_transfers_active";
/// Fetch orders finished, labelled `outcome` = `done` | `failed`.
pub const TRANSFERS_FINISHED: &str = "shoal_agent_transfers_finished_total";
/// 1 while the session with the coordinator is up, else 0.
pub const SESSION_CONNECTED: &str = "shoal_agent_session_connected";
/// When the agent's certificate expires (Unix seconds); renewed at half of its validity.
pub const CERTIFICATE_EXPIRY: &str = "shoal_agent_certificate_expiry_timestamp_seconds";
/// Bytes ingested by local pushes.
pub const BYTES_PUSHED: &str = "shoal_agent_pushed_bytes_total";

/// Requests the OCI mirror answered, labelled `kind` = `manifest` | `blob`.
pub const MIRROR_REQUESTS: &str = "shoal_mirror_requests_total";
/// Blob bytes the mirror sent to clients, labelled `source`: `local` (held before the
/// request), `peers` (fetched from peers for it), `seed` (fetched from the upstream by this
/// agent as the cluster's seeder), `fallback` (from the upstream directly, Shoal bypassed).
pub const MIRROR_BYTES: &str = "shoal_mirror_sent_bytes_total";
/// Blob pulls that fell back to the upstream (peers stalled or the distribution failed).
pub const MIRROR_FALLBACKS: &str = "shoal_mirror_fallbacks_total";
/// Seconds from a blob request to its first byte, labelled `source` as `MIRROR_BYTES`.
pub const MIRROR_FIRST_BYTE: &str = "shoal_mirror_first_byte_seconds";

/// What this agent's uplink delivered while it had chunks to send (its learned upload
/// capacity), bytes per second.
pub const UPLOAD_CAPACITY: &str = "shoal_agent_upload_capacity_bytes_per_second";
/// The most this agent has received at once (its learned download capacity, fading with a
/// ten-minute half-life, at most its configured limit), bytes per second.
pub const DOWNLOAD_CAPACITY: &str = "shoal_agent_download_capacity_bytes_per_second";
/// Per QUIC connection, labelled `peer` (the peer's endpoint address): smoothed RTT.
pub const QUIC_RTT: &str = "shoal_agent_quic_rtt_seconds";
/// Per QUIC connection: congestion window.
pub const QUIC_CWND: &str = "shoal_agent_quic_congestion_window_bytes";
/// Per QUIC connection: packets sent, and those declared lost.
pub const QUIC_SENT_PACKETS: &str = "shoal_agent_quic_sent_packets_total";
pub const QUIC_LOST_PACKETS: &str = "shoal_agent_quic_lost_packets_total";
/// Per QUIC connection: congestion events (window reductions).
pub const QUIC_CONGESTION_EVENTS: &str = "shoal_agent_quic_congestion_events_total";
/// Endgame duplicate chunk requests made by downloads.
pub const DUPLICATE_REQUESTS: &str = "shoal_agent_duplicate_requests_total";
/// Chunk bytes received that were already held (lost endgame races, late replies).
pub const WASTED_BYTES: &str = "shoal_agent_wasted_bytes_total";
/// Chunk digests learned from a seed still running elsewhere (orders with a provisional
/// manifest): those chunks came from peers before the blob was whole anywhere.
pub const STREAMED_DIGESTS: &str = "shoal_agent_streamed_digests_total";
/// Chunk tables of orders that came without them, by `from`: `peer` (a source served it)
/// or `coordinator` (none did, and the agent asked).
pub const CHUNK_TABLES: &str = "shoal_agent_chunk_tables_total";

/// Bytes of stored chunks the background scrub read back and hashed.
pub const SCRUBBED_BYTES: &str = "shoal_agent_scrubbed_bytes_total";
/// Stored chunks found corrupt when read back (by the scrub, or for a peer that rejected
/// one): each was dropped and is fetched again if its blob is wanted here.
pub const CORRUPT_CHUNKS: &str = "shoal_agent_corrupt_chunks_found_total";
/// Blobs dropped because an fdatasync of their data failed (a failing disk): a lost write is
/// never retried and trusted.
pub const LOST_WRITES: &str = "shoal_agent_lost_writes_total";

/// Bytes of blobs in the store, complete or not.
pub const STORE_USED: &str = "shoal_agent_store_used_bytes";
/// The store's quota (`quota_bytes`): eviction keeps [`STORE_USED`] under it.
pub const STORE_QUOTA: &str = "shoal_agent_store_quota_bytes";

/// How often the agent records its transport's state and its store's fill.
pub const GAUGES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Label value of [`BYTES_IN`] for bytes from peer agents.
pub const SOURCE_PEER: &str = "peer";
/// Label value of [`BYTES_IN`] for bytes from an origin.
pub const SOURCE_ORIGIN: &str = "origin";

/// Describes every metric (units and help text) to whichever recorder is installed, and sets
/// the counters that dashboards and alerts read to zero, so that they have a series (with
/// every label value) before their first event.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    for source in [SOURCE_PEER, SOURCE_ORIGIN] {
        metrics::counter!(BYTES_IN, "source" => source).increment(0);
    }
    for outcome in ["done", "failed"] {
        metrics::counter!(TRANSFERS_FINISHED, "outcome" => outcome).increment(0);
    }
    for counter in [
        BYTES_OUT,
        CHUNKS_VERIFIED,
        CHUNKS_REJECTED,
        MIRROR_FALLBACKS,
        DUPLICATE_REQUESTS,
        WASTED_BYTES,
        SCRUBBED_BYTES,
        CORRUPT_CHUNKS,
        LOST_WRITES,
    ] {
        metrics::counter!(counter).increment(0);
    }
    describe_counter!(
        BYTES_IN,
        Unit::Bytes,
        "Bytes received and verified, by source kind"
    );
    describe_counter!(BYTES_OUT, Unit::Bytes, "Bytes of chunks served to peers");
    describe_counter!(
        shoal_origin::THROTTLED,
        "429 Too Many Requests answers from registries, by registry"
    );
    describe_counter!(CHUNKS_VERIFIED, "Chunks received, verified and stored");
    describe_counter!(CHUNKS_REJECTED, "Chunks received that failed verification");
    describe_counter!(WHOLE_READS, "Blobs read back whole against their digest");
    describe_gauge!(ACTIVE_TRANSFERS, "Fetch orders running");
    describe_counter!(TRANSFERS_FINISHED, "Fetch orders finished, by outcome");
    describe_gauge!(SESSION_CONNECTED, "1 while the coordinator session is up");
    describe_gauge!(
        CERTIFICATE_EXPIRY,
        "When the agent's certificate expires, Unix seconds (renewed at half of its validity)"
    );
    describe_counter!(BYTES_PUSHED, Unit::Bytes, "Bytes ingested by local pushes");
    describe_counter!(
        MIRROR_REQUESTS,
        "Requests answered by the OCI mirror, by kind"
    );
    describe_counter!(
        MIRROR_BYTES,
        Unit::Bytes,
        "Blob bytes the OCI mirror sent, by where they came from"
    );
    describe_counter!(
        MIRROR_FALLBACKS,
        "Mirror blob pulls that fell back to the upstream"
    );
    describe_gauge!(
        UPLOAD_CAPACITY,
        "Learned upload capacity: what the uplink delivered while it had chunks to send"
    );
    describe_gauge!(
        DOWNLOAD_CAPACITY,
        "Learned download capacity: the most received at once, fading, at most the limit"
    );
    describe_gauge!(QUIC_RTT, Unit::Seconds, "Smoothed RTT per QUIC connection");
    describe_gauge!(
        QUIC_CWND,
        Unit::Bytes,
        "Congestion window per QUIC connection"
    );
    describe_counter!(QUIC_SENT_PACKETS, "Packets sent per QUIC connection");
    describe_counter!(QUIC_LOST_PACKETS, "Packets lost per QUIC connection");
    describe_counter!(
        QUIC_CONGESTION_EVENTS,
        "Congestion events per QUIC connection"
    );
    describe_counter!(DUPLICATE_REQUESTS, "Endgame duplicate chunk requests");
    describe_counter!(
        WASTED_BYTES,
        Unit::Bytes,
        "Chunk bytes received that were already held"
    );
    describe_counter!(
        STREAMED_DIGESTS,
        "Chunk digests learned from a seed still running on another agent"
    );
    describe_counter!(
        CHUNK_TABLES,
        "Chunk tables of orders that came without them, by where they came from (peer, coordinator)"
    );
    describe_counter!(
        SCRUBBED_BYTES,
        Unit::Bytes,
        "Bytes of stored chunks the background scrub read back and hashed"
    );
    describe_counter!(
        CORRUPT_CHUNKS,
        "Stored chunks found corrupt when read back (scrub or a peer's rejection); dropped and fetched again"
    );
    describe_counter!(
        LOST_WRITES,
        "Blobs dropped because an fdatasync of their data failed"
    );
    describe_gauge!(
        STORE_USED,
        Unit::Bytes,
        "Bytes of blobs in the store, complete or not"
    );
    describe_gauge!(STORE_QUOTA, Unit::Bytes, "The store's quota");
    describe_histogram!(
        MIRROR_FIRST_BYTE,
        Unit::Seconds,
        "Time from a mirror blob request to its first byte"
    );
}
