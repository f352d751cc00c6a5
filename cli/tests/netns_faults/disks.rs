//! Disks that fail: a target's too small for the blob, a chunk rotted at the only complete
//! holder.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Result, ensure};
use shoal_proto::pb::v1::{FailureReason, JobState};
use shoal_tests::netns::Fabric;
use shoal_tests::netns::shoal::Cluster;

use super::{Setup, content, distribute, end_of, push, start, start_with, workdir};

/// A tmpfs mounted at a path until dropped (on every exit path of the test).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()?;
        ensure!(
            out.status.success(),
            "mounting a tmpfs at {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the agent may still hold files open while the cluster is torn down.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_target_whose_disk_is_too_small_fails_clearly_and_still_takes_what_fits() -> Result<()> {
    let (_tmp, dir) = workdir()?;
    // Host 3's store lives on 8 MiB: the 24 MiB blob cannot fit, a 2 MiB one can.
    let _disk = Tmpfs::mount(&dir.join("cluster/h3/store"), "8m")?;
    let fabric = Fabric::new(&[100; 4])?;
    let run = start(&fabric, &dir)?;
    let job = run.end()?;
    run.expect_failed_on(&job, &[3], FailureReason::DiskFull)?;
    for h in 1..3 {
        run.check_copy(h)?;
    }
    // The agent is not wedged by it: a blob that fits is delivered.
    let small = content(2 << 20, 7);
    let digest = push(&run.cluster, &dir, "small", &small)?;
    let again = distribute(&run.cluster, &digest, "host=h3")?;
    let job = end_of(&run.cluster, &again, &dir)?;
    ensure!(job.state() == JobState::Done, "{job:?}");
    let copy = dir.join("small-copy");
    run.cluster.copy_out(3, &digest, &copy)?;
    ensure!(
        std::fs::read(&copy)? == small,
        "host 3's small copy differs"
    );
    Ok(())
}

/// Flips one byte of chunk 5 of `digest` in host 0's store, as rot on its disk.
fn rot_chunk_5(dir: &Path, digest: &str) -> Result<()> {
    let hex = digest.trim_start_matches("sha256:");
    let data = dir.join(format!("cluster/h0/store/blobs/{hex}.data"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)?;
    let at = (5u64 << 20) + 4321;
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at)?;
    file.write_all_at(&[byte[0] ^ 0x40], at)?;
    file.sync_data()?;
    Ok(())
}

#[test]
fn a_chunk_rotted_at_the_only_complete_holder_fails_the_job_and_nothing_corrupt_is_kept()
-> Result<()> {
    let (_tmp, dir) = workdir()?;
    let fabric = Fabric::new(&[100; 4])?;
    let rot = |_: &Cluster<'_>, digest: &str| rot_chunk_5(&dir, digest);
    let setup = Setup {
        // Seconds rather than the default 30 s to give up on what nobody has.
        coordinator_toml: "stranded_after_ms = 5000\n",
        before_job: &rot,
        ..Setup::default()
    };
    let run = start_with(&fabric, &dir, setup)?;
    let job = run.end()?;
    // Chunk 5 exists nowhere any more: every target fails, saying so.
    ensure!(job.state() == JobState::Failed, "{job:?}");
    let targets = job.progress.map(|p| p.targets).unwrap_or_default();
    ensure!(targets.len() == 3, "{targets:?}");
    for t in &targets {
        ensure!(
            t.reason() == FailureReason::NoSource && t.message.contains("lost"),
            "{t:?}"
        );
    }
    // The holder found the rot when a peer rejected the chunk, dropped it and served it no
    // more: each target rejected it at most once and kept none of it.
    let found = run
        .cluster
        .metric(0, "shoal_agent_corrupt_chunks_found_total")?;
    ensure!(found == 1.0, "the holder found {found} corrupt chunks");
    let mut rejected = 0.0;
    for h in 1..4 {
        let r = run.cluster.metric(h, "shoal_agent_chunks_rejected_total")?;
        let verified = run.cluster.metric(h, "shoal_agent_chunks_verified_total")?;
        ensure!(r <= 1.0, "host {h} was served the rotten chunk {r} times");
        ensure!(
            verified <= 23.0,
            "host {h} verified {verified} of 24 chunks"
        );
        rejected += r;
    }
    ensure!(
        rejected >= 1.0,
        "nobody was served the rotten chunk: nothing was tested"
    );
    Ok(())
}
