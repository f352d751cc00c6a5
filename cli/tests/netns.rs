//! Shoal on real, shaped links (network namespaces, `tbf`, one `shoal` process per role and
//! host; `shoal_tests::netns`): a blob pushed on one host reaches three others through
//! `shoal distribute`, every copy bit-identical, the seeder's uplink carrying little more
//! than one copy, and no more bytes received than kept beyond a few chunks.
//!
//! Correctness only: timing goals live in the `netns` benchmark (`docs/BENCHMARKS.md`).
//! Needs root and iproute2 (`apt-get install iproute2`; scripts/test-all.sh does).

use anyhow::{Context, Result};
use shoal_tests::netns::Fabric;
use shoal_tests::netns::shoal::{Cluster, Options};

const SIZE: usize = 32 << 20;

#[test]
fn distribute_on_shaped_links_delivers_identical_copies_without_waste() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Host 0 seeds; hosts 1-3 are targets. 4 × 100 Mbit/s is well within two cores.
    let fabric = Fabric::new(&[100; 4])?;
    let no_extra = |_: usize| String::new();
    let as_is = |c| c;
    let cluster = Cluster::start(
        &fabric,
        Options {
            shoal: env!("CARGO_BIN_EXE_shoal").into(),
            dir: dir.path().join("cluster"),
            agent_toml: &no_extra,
            coordinator_toml: "",
            wrap: &as_is,
        },
    )?;
    let content: Vec<u8> = (0..SIZE)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let file = dir.path().join("blob");
    std::fs::write(&file, &content)?;
    let digest = cluster.push(&file)?;

    let out = cluster
        .shoal(0)
        .args([
            "distribute",
            &digest,
            "--to",
            "role=target",
            "--coordinator",
        ])
        .arg(cluster.coordinator_url())
        .output()?;
    assert!(
        out.status.success(),
        "distribute: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    for h in 1..=3 {
        let copy = dir.path().join(format!("copy-{h}"));
        cluster.copy_out(h, &digest, &copy)?;
        assert!(std::fs::read(&copy)? == content, "host {h}'s copy differs");
    }
    let size = SIZE as f64;
    let seeder = cluster.metric(0, "shoal_agent_served_bytes_total")? / size;
    eprintln!("the seeder sent {seeder:.2} copies");
    // A seeder that queues only what its uplink drains soon (transport/uplink.rs) leaves the
    // rest to peers: 1.22-1.38 copies measured here, where it sent 1.34-1.53 before. Issue
    // 13 asks for 1.3, not met yet in this small shape (32 chunks, three targets); this bound
    // catches a seeder that serves targets what peers could relay.
    assert!(seeder <= 1.5, "the seeder sent {seeder:.2} copies");
    // The agents' view of their links is exported: QUIC's packets and losses per connection,
    // and the seeder's learned upload capacity, below the 100 Mbit/s link and not far off it.
    // The metrics are sampled every second: wait for a sample after the transfer.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = cluster.metric(0, "shoal_agent_quic_sent_packets_total")?;
    let lost = cluster.metric(0, "shoal_agent_quic_lost_packets_total")?;
    // Counters of pooled connections only (a connection closed meanwhile drops out).
    assert!(
        sent > 1000.0 && lost < sent,
        "{sent} packets sent, {lost} lost"
    );
    let capacity = cluster.metric(0, "shoal_agent_upload_capacity_bytes_per_second")?;
    assert!(
        (0.5 * 12.5e6..=1.05 * 12.5e6).contains(&capacity),
        "learned upload capacity {capacity} B/s on a 12.5 MB/s link"
    );
    // The coordinator plans with what the agents learned, not the 10 Gbit/s they declared
    // (no limits are configured here): the seeder's upload and the targets' downloads, seen
    // in `shoal agents -o json` once a load report (every 5 s) carried them.
    let link = 12.5e6;
    let learned = (0..30).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let out = cluster
            .shoal(0)
            .args(["agents", "-o", "json", "--coordinator"])
            .arg(cluster.coordinator_url())
            .output()
            .ok()?;
        let agents: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let capacity = |h: usize, key: &str| -> Option<f64> {
            let id = (cluster.hosts.iter()).find_map(|(id, &host)| (host == h).then_some(id))?;
            (agents.as_array()?.iter())
                .find(|a| a["agent_id"] == id.as_str())
                .and_then(|a| a[key].as_f64())
        };
        let up = capacity(0, "upload_capacity_bytes_per_sec")?;
        let down: Vec<f64> = (1..=3)
            .map(|h| capacity(h, "download_capacity_bytes_per_sec"))
            .collect::<Option<_>>()?;
        let declared = capacity(0, "declared_upload_capacity_bytes_per_sec")?;
        (up < declared && down.iter().all(|&d| d < declared)).then_some((up, down))
    });
    let (up, down) = learned.context("the coordinator never got learned capacities")?;
    eprintln!("learned: the seeder's upload {up:.0} B/s, the targets' downloads {down:.0?} B/s");
    assert!(
        (0.3 * link..=1.1 * link).contains(&up),
        "the seeder's learned upload {up} B/s on a {link} B/s link"
    );
    for d in down {
        assert!(
            (0.3 * link..=1.1 * link).contains(&d),
            "a target's learned download {d} B/s on a {link} B/s link"
        );
    }
    let mut received = 0.0;
    for h in 1..=3 {
        received += cluster.metric(h, "shoal_agent_received_bytes_total")?;
    }
    // Endgame duplicates are the only bytes received and not kept: a few chunks per target,
    // which the targets count themselves.
    let wasted = received - 3.0 * size;
    let mut counted = 0.0;
    for h in 1..=3 {
        counted += cluster.metric(h, "shoal_agent_wasted_bytes_total")?;
    }
    assert!(
        (counted - wasted).abs() <= f64::from(1u32 << 20),
        "targets counted {counted} wasted bytes, {wasted} received beyond the copies"
    );
    assert!(
        wasted <= 3.0 * 4.0 * f64::from(1u32 << 20),
        "{:.1} MiB received beyond the copies kept",
        wasted / f64::from(1u32 << 20)
    );
    Ok(())
}
