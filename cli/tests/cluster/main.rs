//! End-to-end tests with real processes: the built `shoal` binary as coordinator, agents and
//! client, on loopback. Each test starts its own cluster in temporary directories.

mod admin;
mod harness;
mod limits;
mod poison;
mod prometheus;
mod trust;

use std::time::Duration;

use anyhow::Result;
use harness::{Cluster, random_file, read};
use shoal_proto::pb::v1::{self as pb, FailureReason, JobState, TargetState};

const MIB: usize = 1 << 20;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A YAML document as JSON, through PyYAML (installed with the helm tools by
/// scripts/test-all.sh).
fn yaml_to_json(text: &str) -> Result<serde_json::Value> {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "python3 with PyYAML (`pip install pyyaml`, which scripts/test-all.sh installs) could not read it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A 64 MiB blob pushed on one of six agents reaches all of them, bit-identical, mostly
/// from peers; the job's status through the CLI says done. Every agent has the same capped
/// link each way (as hosts in a datacenter do), so the seeder's upload is what peers relieve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_blob_reaches_every_agent_mostly_from_peers() -> Result<()> {
    let links = [
        ("SHOAL_UPLOAD_LIMIT_BYTES_PER_SEC", "40000000"),
        ("SHOAL_DOWNLOAD_LIMIT_BYTES_PER_SEC", "40000000"),
    ];
    let cluster = Cluster::start(6, &links, 3000).await?;
    let file = random_file(cluster.dir.path(), "blob", 64 * MIB, 1)?;
    let digest = cluster.push(0, &file)?;
    assert!(digest.starts_with("sha256:"), "{digest}");

    let out = cluster.cli(&["distribute", &digest, "--to", "all", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_string();
    let job = cluster.wait_job(&job_id, Duration::from_secs(120)).await?;
    assert_eq!(job.state(), JobState::Done, "{job:?}");

    let out = cluster.cli(&["status", &job_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains(&format!("job {job_id}: done")),
        "{}",
        stdout(&out)
    );
    // The same, and the listings, as JSON for scripts.
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let out = cluster.cli(args);
        anyhow::ensure!(out.status.success(), "{args:?}: {}", stderr(&out));
        Ok(serde_json::from_str(&stdout(&out))?)
    };
    let status = json(&["status", &job_id, "-o", "json"])?;
    assert_eq!(status["state"], "done", "{status}");
    assert_eq!(status["counts"]["done"], 6, "{status}");
    // When each target ended: the five that fetched it, not the pusher, which held it.
    let ended: Vec<Option<f64>> = (status["targets"].as_array().into_iter().flatten())
        .map(|t| t["ended_after_secs"].as_f64())
        .collect();
    assert_eq!(ended.iter().flatten().count(), 5, "{status}");
    assert!(ended.iter().flatten().all(|s| *s > 0.0), "{status}");
    // And for people, against each target's own bound (its capacity is configured).
    assert!(
        stdout(&out).contains("5 target agents ended after: p50 ")
            && stdout(&out).contains("x its bound), p99 "),
        "{}",
        stdout(&out)
    );
    let agents = json(&["agents", "-o", "json"])?;
    let agents = agents.as_array().cloned().unwrap_or_default();
    assert_eq!(agents.len(), 6, "{agents:?}");
    assert!(
        agents
            .iter()
            .all(|a| a["blobs_held"] == 1 && a["state"] == "ready"),
        "{agents:?}"
    );
    let blobs = json(&["blobs", "-o", "json"])?;
    assert_eq!(blobs[0]["digest"], digest.as_str(), "{blobs}");
    assert_eq!(blobs[0]["complete_holders"], 6, "{blobs}");
    let jobs = json(&["jobs", "-o", "json"])?;
    assert_eq!(jobs[0]["job_id"], job_id.as_str(), "{jobs}");
    assert_eq!(jobs[0]["state"], "done", "{jobs}");
    let running = json(&["jobs", "--state", "running", "-o", "json"])?;
    assert_eq!(running, serde_json::json!([]), "{running}");
    let out = cluster.cli(&["jobs"]);
    assert!(stdout(&out).contains(&job_id), "{}", stdout(&out));
    // -o yaml says the same as -o json, read back by a real YAML parser (PyYAML).
    for args in [
        vec!["status", job_id.as_str()],
        vec!["agents"],
        vec!["blobs"],
        vec!["jobs"],
    ] {
        let as_json = json(&[&args[..], &["-o", "json"]].concat())?;
        let out = cluster.cli(&[&args[..], &["-o", "yaml"]].concat());
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let as_yaml = yaml_to_json(&stdout(&out))?;
        assert_eq!(as_yaml, as_json, "{args:?} -o yaml:\n{}", stdout(&out));
    }

    let original = std::fs::read(&file)?;
    for i in 0..6 {
        let copy = cluster.dir.path().join(format!("copy-{i}"));
        cluster.pull(i, &digest, &copy)?;
        assert!(
            std::fs::read(&copy)? == original,
            "agent {i}'s copy differs"
        );
    }

    // Peers carry most bytes: the seeder serves well under one copy per target.
    let seeder_out = cluster.agents[0].metric("shoal_agent_served_bytes_total")?;
    let blob = (64 * MIB) as f64;
    assert!(
        seeder_out > 0.0,
        "the seeder served nothing: metrics missing?"
    );
    assert!(
        seeder_out < 3.0 * blob,
        "seeder uploaded {:.2} copies for 5 targets",
        seeder_out / blob
    );
    let peers_out: f64 = (1..6)
        .map(|i| {
            cluster.agents[i]
                .metric("shoal_agent_served_bytes_total")
                .unwrap_or(0.0)
        })
        .sum();
    assert!(
        peers_out > seeder_out,
        "peers served {peers_out}, the seeder {seeder_out}"
    );
    Ok(())
}

/// An agent killed with SIGKILL mid-transfer: every other target completes, and the job says
/// exactly what happened to that agent (its targets fail AGENT_LOST; see jobs.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_fails_only_its_own_target() -> Result<()> {
    // 16 MB/s per agent: a 48 MiB blob takes ~3 s, time to kill one mid-way.
    let limits = [("SHOAL_DOWNLOAD_LIMIT_BYTES_PER_SEC", "16000000")];
    let mut cluster = Cluster::start(4, &limits, 2000).await?;
    let file = random_file(cluster.dir.path(), "blob", 48 * MIB, 2)?;
    let digest = cluster.push(0, &file)?;
    let out = cluster.cli(&["distribute", &digest, "--to", "all", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_string();

    tokio::time::sleep(Duration::from_millis(1200)).await;
    cluster.agents[3].proc.kill();
    let job = cluster.wait_job(&job_id, Duration::from_secs(120)).await?;
    assert_eq!(job.state(), JobState::Failed);
    let targets = job.progress.expect("progress").targets;
    let mut lost = 0;
    for t in &targets {
        if t.state() == TargetState::Failed {
            lost += 1;
            assert_eq!(t.reason(), FailureReason::AgentLost, "{t:?}");
            assert!(t.message.contains("lease"), "{}", t.message);
        } else {
            assert_eq!(t.state(), TargetState::Done, "{t:?}");
        }
    }
    assert_eq!(lost, 1, "{targets:?}");
    let out = cluster.cli(&["status", &job_id]);
    assert!(
        // The failed target says why, and when it ended.
        stdout(&out).contains("failed (")
            && stdout(&out).contains("lease")
            && stdout(&out).contains(") after "),
        "{}",
        stdout(&out)
    );
    Ok(())
}

/// The coordinator killed with SIGKILL mid-job and restarted on the same state: the job
/// completes and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_finishes_the_job() -> Result<()> {
    let limits = [("SHOAL_DOWNLOAD_LIMIT_BYTES_PER_SEC", "16000000")];
    let mut cluster = Cluster::start(3, &limits, 3000).await?;
    // Two blobs: orders of the new incarnation must not be mistaken for the old ones.
    let a = cluster.push(0, &random_file(cluster.dir.path(), "a", 32 * MIB, 3)?)?;
    let b = cluster.push(0, &random_file(cluster.dir.path(), "b", 32 * MIB, 5)?)?;
    let out = cluster.cli(&["distribute", &a, &b, "--to", "all", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_string();

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = cluster.job(&job_id).await?;
    assert_eq!(
        before.state(),
        JobState::Running,
        "killed too late to test anything"
    );
    cluster.restart_coordinator()?;
    let job = cluster.wait_job(&job_id, Duration::from_secs(120)).await?;
    assert_eq!(
        job.state(),
        JobState::Done,
        "{job:?}\n{}",
        read(&cluster.coordinator.log)
    );
    let out = cluster.cli(&["blobs"]);
    for digest in [&a, &b] {
        assert!(
            stdout(&out).contains(digest.as_str()),
            "catalog lost {digest}: {}",
            stdout(&out)
        );
    }
    Ok(())
}

/// The job after a coordinator restart, once the new one answers; an error if it does not
/// know the job.
async fn job_after_restart(cluster: &Cluster, job_id: &str) -> Result<pb::Job> {
    let started = std::time::Instant::now();
    loop {
        if let Ok(mut client) = cluster.client().await {
            let req = pb::GetJobRequest {
                job_id: job_id.into(),
                include_targets: false,
            };
            match client.get_job(req).await {
                Ok(r) => return r.into_inner().job.ok_or_else(|| anyhow::anyhow!("no job")),
                Err(e) if e.code() != tonic::Code::Unavailable => {
                    anyhow::bail!(
                        "{job_id} after the restart: {e}\n{}",
                        read(&cluster.coordinator.log)
                    )
                }
                Err(_) => {}
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "the coordinator did not come back: {}",
            read(&cluster.coordinator.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the coordinator (again) knows a complete holder of `blob`.
async fn until_held(cluster: &Cluster, blob: &str) -> Result<()> {
    let started = std::time::Instant::now();
    loop {
        if let Ok(mut client) = cluster.client().await {
            let req = pb::GetBlobRequest {
                digest: blob.into(),
                include_manifest: false,
            };
            if let Ok(r) = client.get_blob(req).await {
                if r.into_inner().holders.iter().any(|h| h.complete) {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "no complete holder of {blob} came back: {}",
            read(&cluster.coordinator.log)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the coordinator answered is on its disk, though its writes run on a thread of their
/// own and never hold up its state: a Distribute, then a CancelJob, each answered and the
/// coordinator killed at once (SIGKILL, no shutdown); the restarted one knows the job, in
/// the state it answered. (The target's link is slow, so the job is still running when it
/// is cancelled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_coordinator_answered_survives_a_kill_right_after() -> Result<()> {
    let slow = [("SHOAL_DOWNLOAD_LIMIT_BYTES_PER_SEC", "100000")];
    let mut cluster = Cluster::start(2, &slow, 3000).await?;
    let blob = cluster.push(0, &random_file(cluster.dir.path(), "a", 16 * MIB, 11)?)?;
    let target = harness_agent_id(&cluster, 1).await?;
    for round in 0..3 {
        cluster.wait_for_agents(2).await?;
        until_held(&cluster, &blob).await?;
        let req = pb::DistributeRequest {
            blobs: vec![blob.clone()],
            targets: Some(pb::TargetSelector {
                selector: Some(pb::target_selector::Selector::Agents(pb::AgentIdList {
                    agent_ids: vec![target.clone()],
                })),
            }),
            description: format!("round {round}"),
            ..Default::default()
        };
        let mut client = cluster.client().await?;
        let job_id = client.distribute(req).await?.into_inner().job_id;
        cluster.restart_coordinator()?;
        let job = job_after_restart(&cluster, &job_id).await?;
        assert_eq!(job.description, format!("round {round}"));

        let mut client = cluster.client().await?;
        let cancel = pb::CancelJobRequest {
            job_id: job_id.clone(),
            reason: "test".into(),
        };
        let answered = client.cancel_job(cancel).await?.into_inner().state();
        assert_eq!(answered, JobState::Cancelled, "round {round}");
        cluster.restart_coordinator()?;
        let job = job_after_restart(&cluster, &job_id).await?;
        assert_eq!(job.state(), JobState::Cancelled, "round {round}: {job:?}");
    }
    Ok(())
}

/// The id agent `i` joined with (each has the label host=h{i}).
async fn harness_agent_id(cluster: &Cluster, i: usize) -> Result<String> {
    let mut client = cluster.client().await?;
    let agents = (client.list_agents(pb::ListAgentsRequest::default()).await?).into_inner();
    let host = format!("h{i}");
    (agents.agents.into_iter())
        .find(|a| a.labels.get("host") == Some(&host))
        .map(|a| a.agent_id)
        .ok_or_else(|| anyhow::anyhow!("agent {i} is not listed"))
}

/// An agent killed and restarted within its lease, mid-transfer: it rejoins with its id and
/// store, gets its order again, and the job completes with every target done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_within_its_lease_finishes_its_target() -> Result<()> {
    let limits = [("SHOAL_DOWNLOAD_LIMIT_BYTES_PER_SEC", "16000000")];
    let mut cluster = Cluster::start(3, &limits, 5000).await?;
    let file = random_file(cluster.dir.path(), "blob", 48 * MIB, 6)?;
    let digest = cluster.push(0, &file)?;
    let out = cluster.cli(&["distribute", &digest, "--to", "all", "--detach"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job_id = stdout(&out).trim().to_string();

    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(cluster.job(&job_id).await?.state(), JobState::Running);
    cluster.restart_agent(2, &limits)?;
    let job = cluster.wait_job(&job_id, Duration::from_secs(120)).await?;
    assert_eq!(
        job.state(),
        JobState::Done,
        "{job:?}\n{}",
        read(&cluster.agents[2].proc.log)
    );
    let copy = cluster.dir.path().join("copy");
    cluster.pull(2, &digest, &copy)?;
    assert!(
        std::fs::read(&copy)? == std::fs::read(&file)?,
        "restarted agent's copy differs"
    );
    Ok(())
}

/// Bad input through the CLI and gRPC: a clear one-line error and the right code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_right_codes() -> Result<()> {
    let cluster = Cluster::start(1, &[], 3000).await?;
    let unknown = format!("sha256:{}", "ab".repeat(32));

    // CLI: malformed digest is a usage error (2), the rest are failures (1).
    let out = cluster.cli(&["distribute", "sha256:xyz", "--to", "all"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid character"),
        "{}",
        stderr(&out)
    );
    let out = cluster.cli(&["distribute", &unknown, "--to", "all", "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not found") && stderr(&out).contains(&unknown),
        "{}",
        stderr(&out)
    );
    let out = cluster.cli(&["status", "job-nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not found: job \"job-nope\""),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).trim().lines().count(), 1, "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"));

    // gRPC codes.
    let file = random_file(cluster.dir.path(), "blob", MIB, 4)?;
    let digest = cluster.push(0, &file)?;
    let mut c = cluster.client().await?;
    let all = || {
        Some(pb::TargetSelector {
            selector: Some(pb::target_selector::Selector::All(pb::AllAgents {})),
        })
    };
    let code = |r: Result<tonic::Response<pb::DistributeResponse>, tonic::Status>| {
        r.err().map(|s| s.code())
    };
    let r = c
        .distribute(pb::DistributeRequest {
            blobs: vec![unknown.clone()],
            targets: all(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Some(tonic::Code::NotFound));
    let r = c
        .distribute(pb::DistributeRequest {
            blobs: vec!["sha256:12".into()],
            targets: all(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Some(tonic::Code::InvalidArgument));
    let nowhere = pb::TargetSelector {
        selector: Some(pb::target_selector::Selector::Labels(pb::LabelSelector {
            match_labels: [("zone".to_string(), "nowhere".to_string())].into(),
        })),
    };
    let r = c
        .distribute(pb::DistributeRequest {
            blobs: vec![digest.clone()],
            targets: Some(nowhere),
            ..Default::default()
        })
        .await;
    let status = r.expect_err("empty target set");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("matches no live agent"),
        "{}",
        status.message()
    );
    let r = c
        .get_job(pb::GetJobRequest {
            job_id: "job-nope".into(),
            include_targets: false,
        })
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(tonic::Code::NotFound));
    let out = cluster.cli(&["distribute", &digest, "--to", "zone=nowhere", "--detach"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("matches no live agent"),
        "{}",
        stderr(&out)
    );
    // A request past max_api_request_bytes (16 MiB) is refused unread; the next one works.
    let r = c
        .distribute(pb::DistributeRequest {
            blobs: vec![digest.clone()],
            targets: all(),
            description: "x".repeat(17 << 20),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Some(tonic::Code::OutOfRange));
    let r = c
        .distribute(pb::DistributeRequest {
            blobs: vec![digest.clone()],
            targets: all(),
            ..Default::default()
        })
        .await;
    assert!(r.is_ok(), "{r:?}");
    Ok(())
}

/// `shoal push -` reads the blob from standard input (images without a shell or tar have no
/// `kubectl cp`): the digest is the input's, and the blob can be pulled back bit-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_from_standard_input() -> Result<()> {
    use sha2::Digest as _;
    use std::io::Write;
    let cluster = Cluster::start(1, &[], 5000).await?;
    let file = random_file(cluster.dir.path(), "blob", 3 * MIB + 17, 21)?;
    let data = std::fs::read(&file)?;
    let mut child = harness::shoal()
        .args(["push", "-", "--socket"])
        .arg(cluster.agents[0].socket())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(&data)?;
    let out = child.wait_with_output()?;
    assert!(out.status.success(), "{}", stderr(&out));
    let digest = stdout(&out).trim().to_string();
    assert_eq!(
        digest,
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
    );
    let back = cluster.dir.path().join("back");
    cluster.pull(0, &digest, &back)?;
    assert_eq!(std::fs::read(&back)?, data);
    Ok(())
}

/// The coordinator process runs without transparent huge pages (`serve.rs`
/// `without_huge_pages`): with them, each first touch of a 2 MiB page zeroed it whole, and a
/// 20,000-target Distribute's answer took 49-59 ms instead of 30-34 (docs/BENCHMARKS.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_runs_without_transparent_huge_pages() -> Result<()> {
    let cluster = Cluster::start(0, &[], 2000).await?;
    let pid = cluster.coordinator.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let thp = status.lines().find(|l| l.starts_with("THP_enabled:"));
    anyhow::ensure!(
        thp.is_some_and(|l| l.split_whitespace().nth(1) == Some("0")),
        "the coordinator's /proc/{pid}/status says {thp:?}, not THP_enabled: 0"
    );
    Ok(())
}
