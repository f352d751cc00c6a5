//! Cold pulls of one image through several agents' mirrors at once, from a registry slower
//! than the agents (a real `docker-registry` behind a throttling TCP proxy, as a registry
//! across a WAN or under load is): each layer leaves the registry once, and the other
//! agents fetch its chunks from the seeding agent while the seed still runs (streaming
//! seeds), not after it. Every copy is checked bit for bit.

#[path = "cluster/harness.rs"]
mod harness;

use std::time::Duration;

use anyhow::{Result, ensure};
use harness::Cluster;
use shoal_tests::oci_image::{self, ImageSpec, LayerSpec};
use shoal_tests::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes per second the proxy lets through from the registry.
const RATE: u64 = 4 << 20;

/// A TCP proxy on loopback to `upstream` that sends the upstream's bytes at `RATE`.
async fn throttling_proxy(upstream: std::net::SocketAddr) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs_f64(n as f64 / RATE as f64)).await;
                }
                let _ = cw.shutdown().await;
                up.abort();
            });
        }
    });
    Ok(addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_pulling_a_cold_image_at_once_stream_it_from_the_seeder() -> Result<()> {
    let registry = Registry::start()?;
    let proxy = throttling_proxy(registry.addr()).await?.to_string();
    // The agents know the registry only through the proxy.
    let origin =
        format!("[origin]\n[[origin.registries]]\nhost = \"{proxy}\"\nplain_http = true\n");
    let agent_toml =
        format!("chunk_size = 262144\n\n[mirror]\ndefault_registry = \"{proxy}\"\n\n{origin}");
    let cluster = Cluster::start_configured(3, &[], 10_000, &origin, &agent_toml).await?;
    let files = tempfile::tempdir()?;
    let layout = files.path().join("layout");
    let spec = ImageSpec {
        layers: vec![LayerSpec::default().file("opt/model.bin", 6 << 20, 21)],
        tag: "v1".into(),
    };
    let built = oci_image::build_layout(&layout, &spec)?;
    oci_image::push_to_registry(&layout, "v1", &registry.host(), "team/app")?;

    let pulls: Vec<_> = (cluster.agents.iter().enumerate())
        .map(|(i, agent)| {
            let (mirror, dest) = (agent.mirror, files.path().join(format!("copy-{i}")));
            std::thread::spawn(move || {
                oci_image::skopeo_copy_to_dir(
                    &format!("docker://{mirror}/team/app:v1"),
                    &dest,
                    &[],
                )?;
                oci_image::dir_file_digests(&dest)
            })
        })
        .collect();
    for (i, p) in pulls.into_iter().enumerate() {
        let copy = p.join().expect("pull thread")?;
        for (digest, _) in &built.layers {
            let hex = digest.trim_start_matches("sha256:");
            ensure!(
                copy.get(hex) == Some(digest),
                "pull {i}: layer {digest} missing or different"
            );
        }
    }
    // The layer left the registry once (in one GET or in parallel ranges).
    let (layer, size) = &built.layers[0];
    let sent: u64 = (registry.access_log().iter())
        .filter(|e| e.method == "GET" && e.path.ends_with(&format!("/blobs/{layer}")))
        .map(|e| e.bytes)
        .sum();
    ensure!(
        sent == *size,
        "the registry sent {sent} bytes of the {size}-byte layer"
    );
    let mut streamed = Vec::new();
    for agent in &cluster.agents {
        streamed.push(agent.metric("shoal_agent_streamed_digests_total")?);
        ensure!(
            agent.metric("shoal_mirror_fallbacks_total")? == 0.0,
            "a mirror fell back"
        );
    }
    let joined = streamed.iter().filter(|n| **n > 0.0).count();
    ensure!(
        joined == 2,
        "agents that fetched while the seed ran: {streamed:?}"
    );
    Ok(())
}
