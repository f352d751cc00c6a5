//! CRI-O, Podman and Skopeo through the mirror: `shoal registries-conf` writes a
//! `registries.conf` drop-in, and the real `skopeo`, reading it, pulls an image from a real
//! `docker-registry` through the agent's mirror, which finds the upstream in the mirror
//! location's path (those tools send no `?ns=`).

#[path = "cluster/harness.rs"]
mod harness;

use anyhow::{Result, ensure};
use harness::Cluster;
use shoal_tests::oci_image::{self, ImageSpec};
use shoal_tests::registry::Registry;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_reading_the_drop_in_pulls_through_the_mirror() -> Result<()> {
    let registry = Registry::start()?;
    let host = registry.host();
    let origin = format!("[origin]\n[[origin.registries]]\nhost = \"{host}\"\nplain_http = true\n");
    // The mirror's default registry is another one: only the path can name this upstream.
    let agent_toml = format!(
        "chunk_size = 262144\n\n[mirror]\ndefault_registry = \"unused.invalid\"\n\n{origin}"
    );
    let cluster = Cluster::start_configured(1, &[], 10_000, &origin, &agent_toml).await?;
    let files = tempfile::tempdir()?;
    let layout = files.path().join("layout");
    let built = oci_image::build_layout(&layout, &ImageSpec::sample("v1", 7))?;
    oci_image::push_to_registry(&layout, "v1", &host, "team/app")?;

    let conf = files.path().join("registries.conf.d/50-shoal.conf");
    let mirror = format!("http://{}", cluster.agents[0].mirror);
    let out = harness::shoal()
        .args([
            "registries-conf",
            "--registry",
            &host,
            "--insecure",
            "--mirror",
            &mirror,
        ])
        .arg("--file")
        .arg(&conf)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&conf)?;
    let encoded = host.replace(':', "__");
    ensure!(text.contains(&format!("/{encoded}\"")), "{text}");

    let dest = files.path().join("copy");
    // --registries-conf is skopeo's global option: before the subcommand.
    let skopeo = shoal_tests::tools::require("skopeo", "skopeo");
    shoal_tests::tools::run(
        std::process::Command::new(skopeo)
            .arg("--registries-conf")
            .arg(&conf)
            .args(["--insecure-policy", "copy", "--quiet"])
            .arg(format!("docker://{host}/team/app:v1"))
            .arg(format!("dir:{}", dest.display())),
    )?;
    let copy = oci_image::dir_file_digests(&dest)?;
    for (digest, _) in &built.layers {
        let hex = digest.trim_start_matches("sha256:");
        ensure!(
            copy.get(hex) == Some(digest),
            "layer {digest} missing or different: {copy:?}"
        );
    }
    // Every blob reached skopeo through the mirror: the registry served blobs to the agent
    // only, and the mirror served them.
    let from_skopeo: Vec<_> = (registry.access_log().into_iter())
        .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
        .filter(|e| !e.user_agent.starts_with("shoal/"))
        .collect();
    ensure!(
        from_skopeo.is_empty(),
        "blobs fetched around the mirror: {from_skopeo:?}"
    );
    let served = cluster.agents[0].metric("shoal_mirror_sent_bytes_total")?;
    let layers: u64 = built.layers.iter().map(|(_, n)| n).sum();
    ensure!(
        served as u64 >= layers,
        "the mirror served {served} bytes of {layers}"
    );
    Ok(())
}
