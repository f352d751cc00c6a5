//! A real containerd (Debian's 1.6) with its own root, state and sockets in a temporary
//! directory, driven with `ctr`: the client Shoal's OCI mirror serves on Kubernetes nodes.
//!
//! Only what pulling and unpacking images needs is loaded: CRI, the runtimes and task
//! services (which want runc, cgroups and shims) and the snapshotters that need special
//! filesystems are disabled, so it runs as root in a container without systemd.
//!
//! ## Plain-HTTP registries and mirrors (containerd 1.6.20)
//! `ctr images pull --hosts-dir DIR` reads `DIR/<registry host>/hosts.toml`. 1.6.20 rejects a
//! file without any `[host."…"]` table ("failed to decode hosts.toml: invalid `host` tree",
//! logged, then the file is ignored), so [`write_hosts_toml`] always writes at least one:
//! ```toml
//! server = "http://127.0.0.1:PORT"
//!
//! [host."http://127.0.0.1:PORT"]
//!   capabilities = ["pull", "resolve"]
//! ```
//! Hosts are tried in file order, then `server`. With `http://` URLs no `--plain-http` is
//! needed. (Without a usable hosts.toml, 1.6 also talks plain HTTP to a `127.0.0.1` or
//! `localhost` registry by default: a test that means to go through a mirror must check that
//! the mirror was used, not only that the pull worked.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use sha2::{Digest as _, Sha256};

use crate::tools;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The snapshotter [`Containerd::pull`] unpacks into unless told otherwise.
///
/// `overlayfs` is containerd's default and what Kubernetes nodes run, and it works here
/// (root, ext4 under the temporary directory, `overlay` in `/proc/filesystems`); unpacking
/// mounts nothing lasting (containerd's apply mounts are temporary, under `root/tmpmounts`).
/// `native` also works (plain copies, no overlay mounts, but every layer copies its parent's
/// whole tree): use it where the temporary directory is itself on overlayfs, which cannot be
/// an overlay upper directory.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";

/// A running containerd. Dropping it kills the process and unmounts anything still mounted
/// under its root, so the temporary directory can be removed.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    ctr: PathBuf,
    socket: PathBuf,
    root: PathBuf,
    log_path: PathBuf,
    // Last: removed after the process is gone and its mounts are undone.
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts `containerd --config <tempdir>/config.toml` and waits (up to 20 s) until
    /// `ctr version` reaches it.
    ///
    /// # Panics
    /// If `containerd` or `ctr` is not installed (see [`tools::require`]).
    pub fn start() -> Result<Containerd> {
        let binary = tools::require("containerd", "containerd");
        let ctr = tools::require("ctr", "containerd");
        let dir = tempfile::Builder::new()
            .prefix("shoal-containerd-")
            .tempdir()?;
        let base = dir.path();
        let socket = base.join("containerd.sock");
        // sun_path holds 107 bytes and a NUL; a long TMPDIR would fail obscurely.
        ensure!(
            socket.as_os_str().len() < 100,
            "{} is too long for a unix socket: set TMPDIR to a shorter directory",
            socket.display()
        );
        let root = base.join("root");
        let config_path = base.join("config.toml");
        let log_path = base.join("containerd.log");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# Pull and unpack only: no CRI, no runtimes or tasks (they need runc, cgroups and shims),
# no snapshotters that need btrfs, zfs, aufs or device-mapper.
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.runtime.v1.linux",
  "io.containerd.runtime.v2.task",
  "io.containerd.monitor.v1.cgroups",
  "io.containerd.service.v1.tasks-service",
  "io.containerd.grpc.v1.tasks",
  "io.containerd.internal.v1.restart",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{ttrpc}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
            root = root.display(),
            state = base.join("state").display(),
            socket = socket.display(),
            ttrpc = base.join("containerd-ttrpc.sock").display(),
            opt = base.join("opt").display(),
        );
        std::fs::write(&config_path, config)?;
        let child = tools::spawn_logged(
            Command::new(&binary).arg("--config").arg(&config_path),
            &log_path,
        )?;
        let mut containerd = Containerd {
            child,
            ctr,
            socket,
            root,
            log_path,
            dir,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "containerd exited ({status}) before serving; log tail:\n{}",
                    tools::tail(&self.log(), 30)
                );
            }
            match self.ctr(&["version"]) {
                Ok(_) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => bail!(
                    "containerd does not answer on {} after {START_TIMEOUT:?} ({e:#}); \
                     log tail:\n{}",
                    self.socket.display(),
                    tools::tail(&self.log(), 30)
                ),
            }
        }
    }

    /// The gRPC socket (`ctr --address`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's `root` (content store, snapshots, metadata).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A directory in the fixture's temporary directory, for hosts.toml files and the like.
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything containerd logged so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Runs `ctr --address <socket> <args>` and returns its stdout; the error has its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        tools::run(
            Command::new(&self.ctr)
                .arg("--address")
                .arg(&self.socket)
                .args(args),
        )
    }

    /// `ctr images pull --hosts-dir <hosts_dir> --snapshotter <snapshotter> <image_ref>`:
    /// fetches and unpacks. Fails also when ctr exits 0 but logged an error (a hosts.toml it
    /// could not read is logged and ignored). Returns ctr's output.
    pub fn pull(&self, image_ref: &str, hosts_dir: &Path, snapshotter: &str) -> Result<String> {
        self.pull_with(image_ref, hosts_dir, snapshotter, &[])
    }

    /// [`Containerd::pull`] with more arguments for `ctr images pull` (`--user u:p`).
    pub fn pull_with(
        &self,
        image_ref: &str,
        hosts_dir: &Path,
        snapshotter: &str,
        extra: &[&str],
    ) -> Result<String> {
        let output = Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(["images", "pull", "--hosts-dir"])
            .arg(hosts_dir)
            .args(["--snapshotter", snapshotter])
            .args(extra)
            .arg(image_ref)
            .stdin(Stdio::null())
            .output()
            .context("spawning ctr")?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        // ctr's progress display keeps polling after the pull's context ended and logs that
        // as an error although the pull is done ("failed to get content info ... context
        // canceled", "active check failed ... context canceled"): an error whose cause is
        // only the ended context is not one. Any other error line is real (a hosts.toml
        // containerd could not read is only logged).
        let real_error = stderr
            .lines()
            .any(|l| l.contains("level=error") && !l.contains("context canceled"));
        if !output.status.success() || real_error {
            let log = self.log();
            let daemon_messages: Vec<&str> = log
                .lines()
                .filter(|line| !line.contains("loading plugin"))
                .collect();
            bail!(
                "ctr images pull {image_ref} ({}):\nstderr: {}\nstdout: {}\ncontainerd log tail:\n{}",
                output.status,
                stderr.trim_end(),
                tools::tail(stdout.trim_end(), 10),
                tools::tail(&daemon_messages.join("\n"), 10)
            );
        }
        Ok(stdout)
    }

    /// The image references containerd has (`ctr images ls -q`).
    pub fn images(&self) -> Result<Vec<String>> {
        Ok(self
            .ctr(&["images", "ls", "-q"])?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// The keys of the committed snapshots in `snapshotter`: after an unpack, the chain ID
    /// of every layer (see [`chain_ids`]).
    pub fn committed_snapshots(&self, snapshotter: &str) -> Result<Vec<String>> {
        let listing = self.ctr(&["snapshots", "--snapshotter", snapshotter, "ls"])?;
        Ok(listing
            .lines()
            .skip(1)
            .filter(|line| line.split_whitespace().last() == Some("Committed"))
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Err(e) = unmount_under(self.dir.path()) {
            // The temporary directory cannot be removed with mounts in it: say so loudly.
            eprintln!("containerd fixture: {e:#}");
        }
    }
}

/// Unmounts every mount point under `dir`, deepest first (lazily if a plain unmount fails).
fn unmount_under(dir: &Path) -> Result<()> {
    let mut mounts = mounts_under(dir)?;
    if mounts.is_empty() {
        return Ok(());
    }
    mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
    let umount = tools::require("umount", "mount");
    for mount in &mounts {
        if tools::run(Command::new(&umount).arg(mount)).is_err() {
            tools::run(Command::new(&umount).arg("-l").arg(mount))?;
        }
    }
    let left = mounts_under(dir)?;
    ensure!(left.is_empty(), "still mounted after unmounting: {left:?}");
    Ok(())
}

/// Mount points at or under `dir`, from `/proc/self/mountinfo`.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(&dir))
        .collect())
}

/// Mountinfo writes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::new();
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match u8::from_str_radix(rest.get(i + 1..i + 4).unwrap_or_default(), 8) {
            Ok(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            Err(_) => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Writes `<hosts_dir>/<registry_host>/hosts.toml` for `ctr images pull --hosts-dir`:
/// `server = "http://<registry_host>"` and one `[host."<url>"]` with the pull and resolve
/// capabilities per mirror URL (e.g. `http://127.0.0.1:PORT`), tried in order before the
/// server. With no mirrors, the server itself is the one host entry (see the module doc:
/// containerd 1.6.20 needs one). Returns the file's path.
pub fn write_hosts_toml(
    hosts_dir: &Path,
    registry_host: &str,
    mirrors: &[&str],
) -> Result<PathBuf> {
    let server = format!("http://{registry_host}");
    let hosts: Vec<&str> = if mirrors.is_empty() {
        vec![&server]
    } else {
        mirrors.to_vec()
    };
    let mut toml = format!("server = \"{server}\"\n");
    for host in hosts {
        toml.push_str(&format!(
            "\n[host.\"{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        ));
    }
    let dir = hosts_dir.join(registry_host);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("hosts.toml");
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// The snapshot chain IDs of an image's layers, bottom first, from its config's `diff_ids`
/// (`sha256:<hex>`): the first is its diff ID, each next one
/// `sha256(parent chain ID + " " + diff ID)`. The last names the image's top snapshot.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match chain.last() {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        chain.push(next);
    }
    chain
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn hosts_toml_has_a_host_entry_even_without_mirrors() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_hosts_toml(dir.path(), "127.0.0.1:5000", &[]).unwrap();
        assert_eq!(path, dir.path().join("127.0.0.1:5000/hosts.toml"));
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            "server = \"http://127.0.0.1:5000\"\n\n\
             [host.\"http://127.0.0.1:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
    }
}
