//! The local API on a real Unix socket, over a real store, with no coordinator: push (and
//! the statuses of bad requests), status, and pull of a blob already held (and how its output
//! file is written).

use std::path::Path;

use anyhow::{Context, Result};
use shoal_agent::transport::tls::ClusterCa;
use shoal_agent::{Agent, AgentConfig, local_api};
use shoal_proto::Digest;
use shoal_proto::pb::v1 as pb;
use shoal_proto::pb::v1::PullState;
use tonic::Code;

const CHUNK: u32 = 64 << 10;

async fn detached_agent(dir: &Path) -> Result<Agent> {
    let config = AgentConfig {
        // Nothing listens here: the detached agent never dials it except for Pull.
        coordinator: "http://127.0.0.1:9".into(),
        data_dir: dir.join("agent"),
        quic_listen: "127.0.0.1:0".parse()?,
        chunk_size: CHUNK,
        quota_bytes: 1 << 30,
        ..AgentConfig::default()
    };
    let ca = ClusterCa::generate()?;
    Ok(Agent::start_detached(config, "agent-1", &ca.issue("agent-1")?).await?)
}

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 1000) as u8).collect()
}

async fn push(
    client: &mut pb::agent_local_client::AgentLocalClient<tonic::transport::Channel>,
    path: &str,
    expected: &str,
) -> Result<Vec<pb::PushProgress>, tonic::Status> {
    let mut stream = client
        .push(pb::PushRequest {
            path: path.into(),
            pin: true,
            expected_digest: expected.into(),
        })
        .await?
        .into_inner();
    let mut all = Vec::new();
    while let Some(p) = stream.message().await? {
        all.push(p);
    }
    Ok(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_stores_a_file_verified_and_pull_copies_it_out() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = detached_agent(dir.path()).await?;
    let mut client = local_api::connect(agent.local_socket()).await?;

    let content = data(1_000_000 + 123);
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &content)?;
    let want = Digest::of(&content);

    let progress = push(&mut client, file.to_str().context("utf8")?, "").await?;
    let result = progress
        .last()
        .and_then(|p| p.result.clone())
        .context("last message carries the result")?;
    assert_eq!(result.digest, want.to_string());
    assert_eq!(result.size, content.len() as u64);
    assert_eq!(result.chunk_size, CHUNK);
    assert_eq!(result.chunk_count, 16);
    assert!(!result.already_present);
    assert!(!result.registered, "no coordinator session");
    assert!(
        progress[..progress.len() - 1]
            .iter()
            .all(|p| p.result.is_none())
    );

    let store = agent.store();
    assert!(store.is_complete(&want));
    store.verify_blob(&want)?;
    assert!(store.blobs().iter().any(|b| b.digest == want && b.pinned));

    // Again: nothing to copy.
    let again = push(
        &mut client,
        file.to_str().context("utf8")?,
        &want.to_string(),
    )
    .await?;
    assert!(
        again
            .last()
            .and_then(|p| p.result.as_ref())
            .is_some_and(|r| r.already_present)
    );

    let status = client
        .status(pb::StatusRequest {
            include_blobs: true,
        })
        .await?
        .into_inner();
    assert_eq!(status.agent_id, "agent-1");
    assert!(!status.connected);
    assert_eq!(status.blobs_complete, 1);
    assert_eq!(status.blobs[0].digest, want.to_string());
    assert_eq!(status.quic_addresses, vec![agent.quic_addr().to_string()]);

    // Pull of a blob held completely needs no coordinator.
    let out = dir.path().join("out.bin");
    let last = pull_out(&mut client, &want, &out, false).await?;
    assert_eq!(last.digest, want.to_string());
    assert_eq!(std::fs::read(&out)?, content);

    agent.shutdown().await;
    assert!(
        !dir.path().join("agent/agent.sock").exists(),
        "socket removed"
    );
    Ok(())
}

/// Pulls `blob` to `out` until done; the last progress message.
async fn pull_out(
    client: &mut pb::agent_local_client::AgentLocalClient<tonic::transport::Channel>,
    blob: &Digest,
    out: &Path,
    copy: bool,
) -> Result<pb::PullProgress> {
    let mut pull = client
        .pull(pb::PullRequest {
            digest: blob.to_string(),
            output_path: out.to_str().context("utf8")?.into(),
            copy,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut last = None;
    while let Some(p) = pull.message().await? {
        last = Some(p);
    }
    let last = last.context("pull progress")?;
    assert_eq!(last.state, PullState::Done as i32);
    Ok(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_links_the_stores_file_read_only_unless_a_copy_is_asked() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir()?;
    let agent = detached_agent(dir.path()).await?;
    let mut client = local_api::connect(agent.local_socket()).await?;
    let content = data(300_000);
    let file = dir.path().join("blob.bin");
    std::fs::write(&file, &content)?;
    let want = Digest::of(&content);
    push(&mut client, file.to_str().context("utf8")?, "").await?;
    let store_file = agent.store().data_path(&want).context("stored")?;
    let inode = |p: &Path| -> Result<(u64, u64)> {
        let m = std::fs::metadata(p)?;
        Ok((m.dev(), m.ino()))
    };
    let writable =
        |p: &Path| -> Result<bool> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o222 != 0) };
    let leftovers = || -> Result<Vec<String>> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir.path())? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                names.push(name);
            }
        }
        Ok(names)
    };

    // Same filesystem, no reflink on this one: the store's own file, read-only.
    let out = dir.path().join("out.bin");
    std::fs::write(&out, b"an older file in the way")?;
    assert_eq!(
        pull_out(&mut client, &want, &out, false).await?.output,
        "linked"
    );
    assert_eq!(inode(&out)?, inode(&store_file)?);
    assert!(!writable(&out)?, "a linked output is read-only");
    assert_eq!(std::fs::read(&out)?, content);
    // Again onto the same link: nothing changes, nothing left behind.
    assert_eq!(
        pull_out(&mut client, &want, &out, false).await?.output,
        "linked"
    );
    assert_eq!(inode(&out)?, inode(&store_file)?);
    assert_eq!(leftovers()?, Vec::<String>::new());

    // A copy when asked, replacing the link, writable, and the store's file untouched.
    assert_eq!(
        pull_out(&mut client, &want, &out, true).await?.output,
        "copied"
    );
    assert_ne!(inode(&out)?, inode(&store_file)?);
    assert!(writable(&out)?);
    std::fs::write(&out, b"changed")?;
    agent.store().verify_blob(&want)?;

    // Another filesystem: a copy.
    let shm = tempfile::tempdir_in("/dev/shm")?;
    anyhow::ensure!(
        inode(shm.path())?.0 != inode(dir.path())?.0,
        "this test needs /dev/shm on another filesystem than the temporary directory"
    );
    let far = shm.path().join("out.bin");
    assert_eq!(
        pull_out(&mut client, &want, &far, false).await?.output,
        "copied"
    );
    assert_eq!(std::fs::read(&far)?, content);

    // The link outlives the blob's removal from the store.
    let kept = dir.path().join("kept.bin");
    assert_eq!(
        pull_out(&mut client, &want, &kept, false).await?.output,
        "linked"
    );
    agent.store().remove(&want)?;
    assert!(!store_file.exists());
    assert_eq!(std::fs::read(&kept)?, content);
    assert_eq!(leftovers()?, Vec::<String>::new());
    agent.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pushes_get_a_clear_status() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = detached_agent(dir.path()).await?;
    let mut client = local_api::connect(agent.local_socket()).await?;
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"")?;
    let small = dir.path().join("small");
    std::fs::write(&small, b"hello")?;
    let path = |p: &Path| p.to_str().unwrap_or_default().to_string();

    let cases = [
        (
            path(&dir.path().join("missing")),
            "",
            Code::NotFound,
            "no such file",
        ),
        (
            path(dir.path()),
            "",
            Code::InvalidArgument,
            "is a directory",
        ),
        (path(&empty), "", Code::InvalidArgument, "is empty"),
        (
            "relative/file".to_string(),
            "",
            Code::InvalidArgument,
            "not an absolute path",
        ),
        (String::new(), "", Code::InvalidArgument, "path is required"),
        (
            path(&small),
            "sha256:nope",
            Code::InvalidArgument,
            "expected_digest",
        ),
        (
            path(&small),
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
            Code::DataLoss,
            "expected sha256:0000",
        ),
    ];
    for (p, expected, code, words) in cases {
        let err = push(&mut client, &p, expected)
            .await
            .expect_err(&format!("push {p:?} must fail"));
        assert_eq!(err.code(), code, "{p:?}: {}", err.message());
        assert!(err.message().contains(words), "{p:?}: {}", err.message());
        assert!(!err.message().contains('\n'), "one line: {}", err.message());
    }
    assert!(agent.store().blobs().is_empty(), "nothing stored");

    // Pull: malformed digest, and an unknown blob with no coordinator to ask.
    let bad = client
        .pull(pb::PullRequest {
            digest: "sha256:xyz".into(),
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(bad.code(), Code::InvalidArgument);
    let mut unknown = client
        .pull(pb::PullRequest {
            digest: Digest::of(b"unknown").to_string(),
            deadline_ms: 2_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    let err = loop {
        match unknown.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => anyhow::bail!("pull of an unknown blob succeeded"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{err:?}"
    );
    agent.shutdown().await;
    Ok(())
}
