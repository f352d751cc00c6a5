//! `shoal push` and `shoal pull`: talk to the local agent over its Unix socket.

use std::path::Path;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use shoal_proto::Digest;
use shoal_proto::pb::v1::{self as pb, agent_local_client::AgentLocalClient};
use tonic::transport::Channel;

pub(crate) async fn connect(socket: &Path) -> Result<AgentLocalClient<Channel>> {
    if !socket.exists() {
        bail!(
            "no agent socket at {}: is `shoal agent` running here? (set --socket or SHOAL_AGENT_SOCKET)",
            socket.display()
        );
    }
    let path = socket.to_path_buf();
    // The URI is required by tonic but unused: the connector dials the Unix socket.
    let channel = tonic::transport::Endpoint::from_static("http://agent.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    Ok(AgentLocalClient::new(channel).max_decoding_message_size(64 << 20))
}

fn bar(total: u64) -> ProgressBar {
    let style = ProgressStyle::with_template("[{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    ProgressBar::new(total).with_style(style)
}

/// `shoal push FILE`, or `shoal push -` for standard input (images without a shell or tar:
/// `kubectl exec -i POD -- shoal push - < model.bin`).
pub async fn push(socket: &Path, file: &Path, pin: bool) -> Result<()> {
    let digest = if file == Path::new("-") {
        let spooled = spool_stdin().await?;
        push_file(socket, &spooled.1, pin, false).await?
    } else {
        push_file(socket, file, pin, true).await?
    };
    println!("{digest}");
    Ok(())
}

/// Standard input in a file the agent can open: a private directory (searchable, not
/// listable) under the temporary directory, removed with the returned handle.
async fn spool_stdin() -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("shoal-push-")
        .tempdir()
        .context("a temporary directory for standard input")?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))?;
    let path = dir.path().join("stdin");
    let target = path.clone();
    let copied = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut file = std::fs::File::create(&target)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        let n = std::io::copy(&mut std::io::stdin().lock(), &mut file)?;
        file.sync_all()?;
        Ok(n)
    })
    .await?
    .with_context(|| format!("copying standard input to {}", path.display()))?;
    eprintln!("{copied} bytes read from standard input");
    Ok((dir, path))
}

/// Pushes `file` through the agent at `socket` and returns the blob's digest.
/// With `pin`, eviction never takes it (until `shoal blobs unpin`).
pub async fn push_file(
    socket: &Path,
    file: &Path,
    pin: bool,
    show_progress: bool,
) -> Result<String> {
    let path =
        std::fs::canonicalize(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let mut client = connect(socket).await?;
    let mut stream = client
        .push(pb::PushRequest {
            path: path.display().to_string(),
            pin,
            ..Default::default()
        })
        .await
        .map_err(crate::client::explain)?
        .into_inner();
    let progress = if show_progress {
        bar(0)
    } else {
        ProgressBar::hidden()
    };
    while let Some(p) = stream.message().await.map_err(crate::client::explain)? {
        progress.set_length(p.bytes_total);
        progress.set_position(p.bytes_done);
        if let Some(result) = p.result {
            progress.finish_and_clear();
            if !result.registered {
                eprintln!(
                    "note: the agent is not connected to a coordinator; it registers the blob when it reconnects"
                );
            }
            return Ok(result.digest);
        }
    }
    bail!("the agent ended the push without a result")
}

/// What to pull: a digest, or an HTTP(S) URL (with the digest it must have, if known).
pub enum PullSource {
    Digest(Digest),
    Url { url: String, digest: Option<Digest> },
}

/// With `pin`, the agent's copy is never evicted (until `shoal blobs unpin`); with `copy`,
/// the output is its own writable file, never a hard link to the agent's.
pub async fn pull(
    socket: &Path,
    source: PullSource,
    output: &Path,
    pin: bool,
    copy: bool,
) -> Result<()> {
    let output = if output.is_absolute() {
        output.to_path_buf()
    } else {
        std::env::current_dir()?.join(output)
    };
    let mut client = connect(socket).await?;
    let mut stream = client
        .pull(match source {
            PullSource::Digest(d) => pb::PullRequest {
                digest: d.to_string(),
                output_path: output.display().to_string(),
                pin,
                copy,
                ..Default::default()
            },
            PullSource::Url { url, digest } => pb::PullRequest {
                digest: digest.map(|d| d.to_string()).unwrap_or_default(),
                url,
                output_path: output.display().to_string(),
                pin,
                copy,
                ..Default::default()
            },
        })
        .await
        .map_err(crate::client::explain)?
        .into_inner();
    let progress = bar(0);
    while let Some(p) = stream.message().await.map_err(crate::client::explain)? {
        progress.set_length(p.bytes_total);
        progress.set_position(p.bytes_done);
        if p.state() == pb::PullState::Done {
            progress.finish_and_clear();
            // "cloned": a reflink of the agent's copy; "linked": a read-only hard link to it
            // (both: no second copy on disk); "copied".
            let how = if p.output.is_empty() {
                "written"
            } else {
                &p.output
            };
            eprintln!("{} -> {} ({how})", p.digest, output.display());
            return Ok(());
        }
    }
    bail!("the agent ended the pull before it was done")
}
