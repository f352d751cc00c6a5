//! Issue 14's deploy: an image in a real `docker-registry` on host 0, a real containerd on
//! every target, and `ctr images pull` on every target at once, either straight from the
//! registry (`containerd-direct`) or through each host's agent's OCI mirror
//! (`containerd-shoal`: coordinator and agents as in the other Shoal systems, each target's
//! containerd configured with a `hosts.toml` naming its own agent's mirror on
//! `127.0.0.1:7403` of its namespace).
//!
//! The image has `--layers` uncompressed layers (two by default) that split the blob size
//! (random bytes: gzip would only cost CPU). The bound is the image's size ÷ the link. Reported besides the
//! times: the registry's blob bytes ÷ the image's, and for Shoal the mirrors' fallbacks to
//! the registry (which should be 0) and how many chunks the targets fetched while the seed
//! ran. `ctr` runs in the target's namespace (containerd 1.6's client fetches the content
//! itself); the daemons need no network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use shoal_tests::containerd::{Containerd, write_hosts_toml};
use shoal_tests::netns::CpuGroup;
use shoal_tests::netns::shoal::{Cluster, Options};
use shoal_tests::oci_image::{self, ImageSpec, LayerSpec};
use shoal_tests::registry::parse_access_log;
use shoal_tests::tools;

use super::{Bench, Outcome, Procs};

const REGISTRY_PORT: u16 = 5000;
const MIRROR: &str = "127.0.0.1:7403";
const REPOSITORY: &str = "bench/app";

/// How the targets' containerds get the image.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Via {
    /// Straight from the registry.
    Direct,
    /// Through each host's agent's mirror, cold.
    Shoal,
    /// Through the mirror after `shoal preheat --to role=target` has put the layers in every
    /// target's store: what containerd itself costs here (fetching from a local mirror,
    /// verifying, unpacking), the floor of the other two.
    Preheated,
}

/// Whether a layer's bytes have reached containerd `root`'s content store: an ingest whose
/// ref names a layer (containerd's fetcher names them `layer-sha256:…`, and its metadata
/// store prefixes the namespace) with data, or a layer's blob already committed (a small
/// layer can finish between two looks).
fn layer_bytes_arrived(root: &Path) -> bool {
    let content = root.join("io.containerd.content.v1.content");
    let ingests = std::fs::read_dir(content.join("ingest"))
        .into_iter()
        .flatten();
    for ingest in ingests.flatten() {
        let dir = ingest.path();
        let is_layer =
            std::fs::read_to_string(dir.join("ref")).is_ok_and(|r| r.contains("layer-sha256:"));
        if is_layer && std::fs::metadata(dir.join("data")).is_ok_and(|m| m.len() > 0) {
            return true;
        }
    }
    // Manifests and configs are a few KiB; a committed blob of over 1 MiB is a layer.
    let blobs = std::fs::read_dir(content.join("blobs/sha256"))
        .into_iter()
        .flatten();
    blobs
        .flatten()
        .any(|b| b.metadata().is_ok_and(|m| m.len() > 1 << 20))
}

/// An image pushed to the registry, and its layers' size in bytes.
pub(super) struct Image {
    reference: String,
    bytes: u64,
    layers: Vec<(String, u64)>,
}

impl Bench {
    fn registry_host(&self) -> String {
        format!("{}:{REGISTRY_PORT}", self.fabric.ip(0))
    }

    /// The images of a run: one of `--layers` layers (`deploy`: six that share a base layer
    /// of half the size and each add a layer of their own), by repository.
    fn images(&self, deploy: bool) -> Vec<(String, ImageSpec)> {
        if deploy {
            let half = self.size / 2;
            return (0..6u64)
                .map(|i| {
                    let spec = ImageSpec {
                        layers: vec![
                            LayerSpec::default().file("opt/base.bin", half, 100),
                            LayerSpec::default().file("opt/app.bin", self.size - half, i + 1),
                        ],
                        tag: "v1".into(),
                    };
                    (format!("{REPOSITORY}{i}"), spec)
                })
                .collect();
        }
        let n = self.args.layers.max(1);
        let each = self.size / n;
        let spec = ImageSpec {
            layers: (0..n)
                .map(|i| {
                    let size = if i + 1 == n {
                        self.size - each * (n - 1)
                    } else {
                        each
                    };
                    LayerSpec::default().file(&format!("opt/app/{i}.bin"), size, i + 1)
                })
                .collect(),
            tag: "v1".into(),
        };
        vec![(REPOSITORY.to_string(), spec)]
    }

    /// Starts `docker-registry` on host 0 and pushes `images` with skopeo. Returns them and
    /// the registry's log.
    fn registry(
        &self,
        procs: &mut Procs,
        cpu: &CpuGroup,
        images: &[(String, ImageSpec)],
    ) -> Result<(Vec<Image>, PathBuf)> {
        let registry = tools::require("/usr/bin/docker-registry", "docker-registry");
        let skopeo = tools::require("skopeo", "skopeo");
        let dir = self.dir.join("registry");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  accesslog:\n    disabled: false\n  level: info\n  formatter: text\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {}\n  secret: shoal-bench-not-a-secret\n",
                dir.join("storage").display(),
                self.registry_host()
            ),
        )?;
        let log = self.log("registry");
        let mut c = self.fabric.command(0, registry);
        c.arg("serve").arg(&config);
        procs.spawn_logged(cpu.wrap(c), &log)?;

        let mut out = Vec::new();
        for (repository, spec) in images {
            let layout = self
                .dir
                .join(format!("image-{}", repository.replace('/', "_")));
            let _ = std::fs::remove_dir_all(&layout);
            let built = oci_image::build_layout_uncompressed(&layout, spec)?;
            let bytes = built.layers.iter().map(|(_, s)| s).sum::<u64>();
            let reference = format!("{}/{repository}:v1", self.registry_host());
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let pushed = self
                    .fabric
                    .command(0, &skopeo)
                    .args(["copy", "--dest-tls-verify=false", "--quiet"])
                    .arg(format!("oci:{}:v1", layout.display()))
                    .arg(format!("docker://{reference}"))
                    .output()?;
                if pushed.status.success() {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "skopeo copy to the registry: {}",
                    String::from_utf8_lossy(&pushed.stderr)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = std::fs::remove_dir_all(&layout);
            out.push(Image {
                reference,
                bytes,
                layers: built.layers.clone(),
            });
        }
        Ok((out, log))
    }

    /// Blob bytes the registry sent since `from` lines of its log.
    fn registry_blob_bytes(log: &Path, from: usize) -> Result<u64> {
        let text = std::fs::read_to_string(log)?;
        let lines: Vec<&str> = text.lines().skip(from).collect();
        Ok(parse_access_log(&lines.join("\n"))
            .iter()
            .filter(|e| e.method == "GET" && e.path.contains("/blobs/"))
            .map(|e| e.bytes)
            .sum())
    }

    /// `deploy`: every target pulls one of six images that share a base layer (target `h`
    /// the image `(h - 1) % 6`), else all the same image.
    pub(super) fn containerd(&self, via: Via, deploy: bool) -> Result<Outcome> {
        let through_shoal = via != Via::Direct;
        let name = match (deploy, via) {
            (false, Via::Shoal) => "containerd-shoal",
            (false, Via::Preheated) => "containerd-preheated",
            (false, Via::Direct) => "containerd-direct",
            (true, Via::Shoal) => "deploy-shoal",
            (true, Via::Preheated) => "deploy-preheated",
            (true, Via::Direct) => "deploy-direct",
        };
        let ctr = tools::require("ctr", "containerd");
        let run = self.dir.join(name);
        let _ = std::fs::remove_dir_all(&run);
        std::fs::create_dir_all(&run)?;
        let cpu = CpuGroup::new(name)?;
        let mut procs = Procs::default();
        let (images, registry_log) = self.registry(&mut procs, &cpu, &self.images(deploy))?;
        let image_of = |h: usize| &images[(h - 1) % images.len()];
        // The distinct layers the targets pull: what the registry should send once.
        let unique: u64 = (self.targets())
            .flat_map(|h| image_of(h).layers.iter().cloned())
            .collect::<BTreeMap<String, u64>>()
            .values()
            .sum();

        let registry = self.registry_host();
        let agent_toml = |_: usize| {
            format!(
                "mirror_listen = \"{MIRROR}\"\n\n[mirror]\ndefault_registry = \"{registry}\"\n\n\
                 [origin]\n[[origin.registries]]\nhost = \"{registry}\"\nplain_http = true\n"
            )
        };
        let wrap = |c| cpu.wrap(c);
        // The coordinator resolves a preheated image's layers from the registry.
        let coordinator_toml = format!(
            "{}\n\n[origin]\n[[origin.registries]]\nhost = \"{registry}\"\nplain_http = true\n",
            self.args.coordinator_toml.replace("\\n", "\n")
        );
        let cluster = if through_shoal {
            Some(Cluster::start(
                &self.fabric,
                Options {
                    shoal: self.shoal.clone(),
                    dir: run.join("cluster"),
                    agent_toml: &agent_toml,
                    coordinator_toml: &coordinator_toml,
                    wrap: &wrap,
                },
            )?)
        } else {
            None
        };
        let mut daemons = BTreeMap::new();
        for h in self.targets() {
            let hosts_dir = run.join(format!("hosts-{h}"));
            let mirror = format!("http://{MIRROR}");
            let mirrors: &[&str] = if through_shoal { &[&mirror] } else { &[] };
            write_hosts_toml(&hosts_dir, &registry, mirrors)?;
            daemons.insert(h, (Containerd::start()?, hosts_dir));
        }
        if let (Via::Preheated, Some(cluster)) = (via, &cluster) {
            for image in &images {
                let out = (cluster.shoal(0))
                    .args(["preheat", &image.reference, "--to", "role=target"])
                    .args(["--coordinator", &cluster.coordinator_url()])
                    .output()?;
                ensure!(
                    out.status.success(),
                    "shoal preheat {}: {}",
                    image.reference,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let log_start = std::fs::read_to_string(&registry_log)?.lines().count();

        let before = cpu.usage()?;
        let started = Instant::now();
        let mut pulls = Vec::new();
        for (h, (daemon, hosts_dir)) in &daemons {
            let mut c = self.fabric.command(*h, &ctr);
            c.arg("--address")
                .arg(daemon.socket())
                .args(["images", "pull", "--hosts-dir"])
                .arg(hosts_dir)
                .args(["--snapshotter", "overlayfs", &image_of(*h).reference]);
            let p = procs.spawn_logged(cpu.wrap(c), &self.log(&format!("{name}-ctr-{h}")))?;
            pulls.push((*h, p));
        }
        let limit = Duration::from_secs_f64(self.bound(1) * 20.0 + 60.0);
        let (mut done, mut first_byte) = (BTreeMap::new(), BTreeMap::new());
        while done.len() < pulls.len() {
            ensure!(started.elapsed() < limit, "the pulls did not finish");
            for &(h, p) in &pulls {
                if !first_byte.contains_key(&h) && layer_bytes_arrived(daemons[&h].0.root()) {
                    first_byte.insert(h, started.elapsed().as_secs_f64());
                }
                if done.contains_key(&h) {
                    continue;
                }
                if let Some(status) = procs.child(p).try_wait()? {
                    ensure!(
                        status.success(),
                        "ctr images pull on host {h} failed (see {})",
                        self.log(&format!("{name}-ctr-{h}")).display()
                    );
                    done.insert(h, started.elapsed().as_secs_f64());
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let used = cpu.usage()? - before;
        for (h, (daemon, _)) in &daemons {
            let have = daemon.images()?;
            ensure!(
                have.contains(&image_of(*h).reference),
                "host {h}'s containerd lacks its image: {have:?}"
            );
        }
        // The outcome per system is in bound multiples of the blob; an image is the blob
        // plus its tar headers.
        let done = (done.into_iter())
            .map(|(h, t)| (h, t * self.size as f64 / image_of(h).bytes as f64))
            .collect();
        let registry_bytes = Self::registry_blob_bytes(&registry_log, log_start)?;
        let mut firsts: Vec<f64> = first_byte.values().copied().collect();
        firsts.sort_by(f64::total_cmp);
        let mut note = format!(
            "first layer byte p50 {:.2} s, max {:.2} s; registry sent {:.2}× the distinct layers",
            firsts.get(firsts.len() / 2).copied().unwrap_or(f64::NAN),
            firsts.last().copied().unwrap_or(f64::NAN),
            registry_bytes as f64 / unique as f64
        );
        if let Some(cluster) = &cluster {
            let (mut fallbacks, mut streamed) = (0.0, 0.0);
            for h in self.targets() {
                fallbacks += cluster.metric(h, "shoal_mirror_fallbacks_total")?;
                streamed += cluster.metric(h, "shoal_agent_streamed_digests_total")?;
            }
            note += &format!(
                "; {fallbacks} mirror fallbacks; {streamed} chunk digests streamed to targets"
            );
        }
        drop(daemons);
        drop(cluster);
        drop(procs);
        let _ = std::fs::remove_dir_all(self.dir.join("registry/storage"));
        // The stores go; the logs stay (in --work-dir) for a look afterwards.
        for h in 0..self.fabric.hosts() {
            let _ = std::fs::remove_dir_all(run.join(format!("cluster/h{h}/store")));
        }
        Ok(Outcome { done, used, note })
    }
}
