//! The local socket as other users on the node meet it: real agent, real `shoal` CLI run
//! under other uids (`setpriv`). The socket is mode 0660 with the configured group; a user
//! outside it cannot connect; a member may push from and pull into the agent's
//! `local_allowed_paths` only (symbolic links resolved), while root may use any path.

#[path = "cluster/harness.rs"]
mod harness;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use harness::Cluster;

const GROUP: u32 = 4242;

/// `shoal` as uid/gid `id` (no supplementary groups).
fn shoal_as(id: u32, args: &[&str]) -> Result<Output> {
    let setpriv = shoal_tests::tools::require("setpriv", "util-linux");
    Ok(Command::new(setpriv)
        .args([
            "--reuid",
            &id.to_string(),
            "--regid",
            &id.to_string(),
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .output()?)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn open_dir(path: &Path) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_use_the_socket_only_as_configured() -> Result<()> {
    let outer = tempfile::tempdir()?;
    open_dir(outer.path())?;
    let (shared, private) = (outer.path().join("shared"), outer.path().join("private"));
    for dir in [&shared, &private] {
        std::fs::create_dir(dir)?;
    }
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777))?;
    open_dir(&private)?;
    let agent_toml = format!(
        "local_socket_group = \"{GROUP}\"\nlocal_allowed_paths = [\"{}\"]\n",
        shared.display()
    );
    let cluster = Cluster::start_configured(1, &[], 10_000, "", &agent_toml).await?;
    let dir = &cluster.agents[0].dir;
    let socket = dir.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "no socket at {}",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other users must get through the directories to reach the socket at all.
    open_dir(dir)?;
    open_dir(dir.parent().context("cluster dir")?)?;
    let meta = std::fs::metadata(&socket)?;
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), GROUP, "socket group");

    let blob: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (in_shared, in_private) = (shared.join("blob"), private.join("blob"));
    std::fs::write(&in_shared, &blob)?;
    std::fs::write(&in_private, &blob)?;
    std::fs::set_permissions(&in_shared, std::fs::Permissions::from_mode(0o644))?;
    let link = shared.join("link");
    std::os::unix::fs::symlink(&in_private, &link)?;
    let sock = socket.to_str().context("utf8")?;
    let path = |p: &Path| p.to_str().map(String::from).context("utf8");

    // Not in the group: cannot connect.
    let o = shoal_as(GROUP + 1, &["push", &path(&in_shared)?, "--socket", sock])?;
    ensure!(!o.status.success(), "an outsider pushed: {}", stderr(&o));

    // In the group: outside the allowed paths, or through a link out of them, refused.
    for file in [&in_private, &link] {
        let o = shoal_as(GROUP, &["push", &path(file)?, "--socket", sock])?;
        ensure!(!o.status.success(), "pushed {}", file.display());
        ensure!(
            stderr(&o).contains("local_allowed_paths"),
            "{}: {}",
            file.display(),
            stderr(&o)
        );
    }
    // Inside: pushed, and pulled back into the shared directory only.
    let o = shoal_as(GROUP, &["push", &path(&in_shared)?, "--socket", sock])?;
    ensure!(
        o.status.success(),
        "push from the allowed path: {}",
        stderr(&o)
    );
    let digest = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .context("push printed no digest")?
        .to_string();
    let denied = private.join("out");
    let o = shoal_as(
        GROUP,
        &["pull", &digest, "-o", &path(&denied)?, "--socket", sock],
    )?;
    ensure!(!o.status.success(), "pulled into {}", denied.display());
    ensure!(stderr(&o).contains("local_allowed_paths"), "{}", stderr(&o));
    ensure!(!denied.exists(), "a refused pull wrote its file");
    let out = shared.join("out");
    let o = shoal_as(
        GROUP,
        &["pull", &digest, "-o", &path(&out)?, "--socket", sock],
    )?;
    ensure!(
        o.status.success(),
        "pull into the allowed path: {}",
        stderr(&o)
    );
    assert!(std::fs::read(&out)? == blob, "the pulled copy differs");

    // A URL is fetched from the agent's network position: root and the agent's user only.
    let url_out = shared.join("url-out");
    let o = shoal_as(
        GROUP,
        &[
            "pull",
            "http://127.0.0.1:9/x",
            "-o",
            &path(&url_out)?,
            "--socket",
            sock,
        ],
    )?;
    ensure!(!o.status.success(), "a group member had a URL fetched");
    ensure!(stderr(&o).contains("URL"), "{}", stderr(&o));

    // Root may use any path.
    let o = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["push", &path(&in_private)?, "--socket", sock])
        .output()?;
    ensure!(o.status.success(), "root's push: {}", stderr(&o));
    Ok(())
}
