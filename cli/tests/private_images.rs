//! Private images through the mirror (docs/SECURITY.md): a repository the upstream does
//! not serve anonymously is served only to a client whose own credentials the upstream
//! accepts, however warm this agent's cache and store, or its peers', are. The upstream is
//! the CNCF registry (`docker-registry`) with HTTP Basic users; the clients are `skopeo`,
//! `containerd` (`ctr --user`) and plain HTTP requests; the agents are real `shoal` processes whose own configured
//! credentials could pull anything.

#[path = "cluster/harness.rs"]
mod harness;

use anyhow::{Context, Result, ensure};
use harness::{Cluster, read};

use shoal_tests::oci_image::{self, ImageSpec, basic_authorization};
use shoal_tests::registry::{Registry, http_get};

const NODE: (&str, &str) = ("node", "node-secret");
const ALICE: (&str, &str) = ("alice", "alice-secret");

fn skopeo_pull(
    mirror: std::net::SocketAddr,
    dest: &std::path::Path,
    creds: Option<(&str, &str)>,
) -> Result<()> {
    let args: Vec<String> = creds
        .map(|(u, p)| vec![format!("--src-creds={u}:{p}")])
        .unwrap_or_default();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    oci_image::skopeo_copy_to_dir(&format!("docker://{mirror}/team/private:v1"), dest, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_is_served_only_to_clients_the_upstream_lets_pull_it() -> Result<()> {
    let registry = Registry::start_with_users(&[NODE, ALICE])?;
    let host = registry.host();
    let layouts = tempfile::tempdir()?;
    let layout = layouts.path().join("private");
    let built = oci_image::build_layout(&layout, &ImageSpec::sample("v1", 7))?;
    oci_image::push_to_registry_as(&layout, "v1", &host, "team/private", Some(NODE))?;
    // Both agents (and the coordinator) pull with the node's credentials.
    let origin = format!(
        "[origin]\n[[origin.registries]]\nhost = \"{host}\"\nplain_http = true\nusername = \"{}\"\npassword = \"{}\"\n",
        NODE.0, NODE.1
    );
    let agent =
        format!("chunk_size = 262144\n\n[mirror]\ndefault_registry = \"{host}\"\n\n{origin}");
    let cluster = Cluster::start_configured(2, &[], 10_000, &origin, &agent).await?;
    let logs = || {
        (cluster.agents.iter())
            .map(|a| read(&a.proc.log))
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let out = tempfile::tempdir()?;
    let (a, b) = (cluster.agents[0].mirror, cluster.agents[1].mirror);

    // Anonymous, or with credentials the registry refuses: nothing.
    let anonymous = skopeo_pull(a, &out.path().join("anonymous"), None);
    ensure!(
        anonymous.is_err(),
        "an anonymous client pulled a private image"
    );
    let wrong = skopeo_pull(a, &out.path().join("wrong"), Some((ALICE.0, "not-hers")));
    ensure!(
        wrong.is_err(),
        "a client with a wrong password pulled a private image"
    );

    // Its own valid credentials: the image, bit for bit.
    skopeo_pull(a, &out.path().join("alice"), Some(ALICE)).with_context(logs)?;
    let copy = oci_image::dir_file_digests(&out.path().join("alice"))?;
    for (digest, _) in &built.layers {
        let hex = digest.trim_start_matches("sha256:");
        ensure!(
            copy.get(hex) == Some(digest),
            "layer {digest} missing: {copy:?}"
        );
    }

    // The layers are now in A's store (and reach B from A): still nothing without
    // credentials, on either mirror; a 401 that asks for them, as a registry would.
    let layer = &built.layers[0].0;
    let path = format!("/v2/team/private/blobs/{layer}");
    for mirror in [a, b] {
        let r = http_get(&mirror.to_string(), &path, &[])?;
        ensure!(
            r.status == 401,
            "anonymous blob GET on {mirror}: {}",
            r.status
        );
        let challenge = r.header("www-authenticate").unwrap_or_default();
        ensure!(challenge.starts_with("Basic "), "challenge: {challenge:?}");
        let bad = basic_authorization(ALICE.0, "not-hers");
        let r = http_get(&mirror.to_string(), &path, &[("Authorization", &bad)])?;
        ensure!(
            r.status == 403,
            "wrong credentials on {mirror}: {}",
            r.status
        );
    }
    let good = basic_authorization(ALICE.0, ALICE.1);
    let r = http_get(&b.to_string(), &path, &[("Authorization", &good)])?;
    ensure!(
        r.status == 200,
        "B with valid credentials: {} {}",
        r.status,
        logs()
    );
    ensure!(
        oci_image::sha256_digest(&r.body) == *layer,
        "B served other bytes for {layer}"
    );

    // containerd pointed at B's mirror: refused without credentials (the mirror and the
    // registry both ask for them), pulled with the user's own, and through the mirror.
    let hosts = tempfile::tempdir()?;
    harness::containerd_config(&host, &format!("http://{b}"), hosts.path())?;
    let containerd = shoal_tests::containerd::Containerd::start()?;
    let reference = format!("{host}/team/private:v1");
    let snapshotter = shoal_tests::containerd::DEFAULT_SNAPSHOTTER;
    let refused = containerd.pull(&reference, hosts.path(), snapshotter);
    ensure!(
        refused.is_err(),
        "containerd pulled a private image without credentials"
    );
    let user = format!("{}:{}", ALICE.0, ALICE.1);
    containerd
        .pull_with(&reference, hosts.path(), snapshotter, &["--user", &user])
        .with_context(|| format!("containerd log:\n{}", containerd.log()))?;
    let direct: Vec<_> = (registry.access_log().into_iter())
        .filter(|e| e.path.contains("/blobs/") && e.user_agent.contains("containerd"))
        .collect();
    ensure!(
        direct.is_empty(),
        "containerd went to the upstream: {direct:?}"
    );
    Ok(())
}
