//! `shoal coordinator` and `shoal agent`: load configuration, install metrics, run until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use shoal_coordinator::CoordinatorConfig;

/// A configuration problem: exit code 2.
#[derive(Debug)]
pub struct ConfigProblem(pub String);

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigProblem {}

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the file and SHOAL_LISTEN).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// State directory (overrides the file and SHOAL_STATE_DIR).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Join token (overrides the file and SHOAL_JOIN_TOKEN).
    #[arg(long)]
    join_token: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Coordinator URL (overrides the file and SHOAL_COORDINATOR).
    #[arg(long)]
    coordinator: Option<String>,
    /// Data directory (overrides the file and SHOAL_DATA_DIR).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// QUIC listen address (overrides the file and SHOAL_QUIC_LISTEN).
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
    /// Join token (overrides the file and SHOAL_JOIN_TOKEN).
    #[arg(long)]
    join_token: Option<String>,
    /// Labels, key=value (repeatable), e.g. --label zone=a --label rack=r1. A label with an
    /// empty value (`--label zone=`) is not announced, so a Kubernetes `$(VAR)` that expands
    /// to nothing leaves the label unset instead of grouping every such host together.
    #[arg(long = "label")]
    labels: Vec<String>,
}

fn problem(e: impl std::fmt::Display) -> anyhow::Error {
    ConfigProblem(e.to_string()).into()
}

fn install_metrics(addr: Option<SocketAddr>, role: &'static str) -> Result<()> {
    if let Some(addr) = addr {
        let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets(crate::process_metrics::LATENCY_BUCKETS)
            .context("histogram buckets")?;
        if role == "coordinator" {
            builder = builder
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        shoal_coordinator::metrics::REQUEST_WAIT_SECONDS.into(),
                    ),
                    shoal_coordinator::metrics::REQUEST_WAIT_BUCKETS,
                )
                .context("histogram buckets")?
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        shoal_coordinator::metrics::API_CALL_SECONDS.into(),
                    ),
                    shoal_coordinator::metrics::REQUEST_WAIT_BUCKETS,
                )
                .context("histogram buckets")?;
            // Per-job gauges stop being set when their job ends; without a timeout they would
            // stay in every scrape for the life of the process.
            builder = builder.idle_timeout(
                metrics_util::MetricKindMask::GAUGE,
                Some(shoal_coordinator::metrics::JOB_SERIES_LINGER),
            );
        }
        builder
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
        if role == "coordinator" {
            shoal_coordinator::metrics::describe();
        } else {
            shoal_agent::metrics::describe();
        }
        crate::process_metrics::start(role);
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Runs the coordinator until SIGINT or SIGTERM. If its state task or its database writer
/// dies first, `run` returns why: the process exits 1 (after storing what was queued), so
/// that Kubernetes restarts it rather than leave a coordinator that answers nothing.
pub async fn coordinator(args: CoordinatorArgs) -> Result<()> {
    without_huge_pages();
    let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
    let config: CoordinatorConfig = crate::settings::load(
        args.config.as_deref(),
        &[
            ("listen", args.listen.map(|a| a.to_string())),
            ("state_dir", path(args.state_dir)),
            ("join_token", args.join_token),
        ],
    )
    .map_err(problem)?;
    config.validate().map_err(problem)?;
    install_metrics(config.metrics_listen, "coordinator")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    eprintln!("coordinator listening on {}", listener.local_addr()?);
    shoal_coordinator::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`).
/// mimalloc asks for them on its arenas, and the kernel then zeroes a whole 2 MiB page at
/// the first touch of any byte of it: a 20,000-target Distribute, whose turn on the state
/// thread grows the job's maps and the planner's into fresh memory, was answered in 49-59 ms
/// with them and 30-34 ms without, at 0.72 GiB resident instead of 0.5
/// (docs/BENCHMARKS.md, stop 41). Where the kernel refuses, the coordinator runs as before.
fn without_huge_pages() {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "could not turn transparent huge pages off; the coordinator runs with them");
    }
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    let path = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
    let mut overrides = vec![
        ("coordinator", args.coordinator),
        ("data_dir", path(args.data_dir)),
        ("quic_listen", args.quic_listen.map(|a| a.to_string())),
        ("join_token", args.join_token),
    ];
    let label_keys = label_overrides(&args.labels).map_err(problem)?;
    for (k, v) in &label_keys {
        overrides.push((k.as_str(), Some(v.clone())));
    }
    let config: shoal_agent::AgentConfig =
        crate::settings::load(args.config.as_deref(), &overrides).map_err(problem)?;
    config.validate().map_err(problem)?;
    install_metrics(config.metrics_listen, "agent")?;
    shoal_agent::run(config, shutdown_signal()).await?;
    Ok(())
}

/// `--label key=value` flags as configuration overrides (`labels.key`). Empty values are
/// dropped (see `AgentArgs::labels`).
fn label_overrides(labels: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut overrides = Vec::new();
    for label in labels {
        let Some((k, v)) = label.split_once('=') else {
            return Err(format!("--label {label:?}: expected key=value"));
        };
        if !v.is_empty() {
            overrides.push((format!("labels.{k}"), v.to_string()));
        }
    }
    Ok(overrides)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_label_values_are_not_announced() {
        let flags = ["host=node-7", "zone=", "rack=r1"].map(String::from);
        assert_eq!(
            label_overrides(&flags),
            Ok(vec![
                ("labels.host".to_string(), "node-7".to_string()),
                ("labels.rack".to_string(), "r1".to_string()),
            ])
        );
        let err = label_overrides(&["zone".to_string()]).unwrap_err();
        assert!(err.starts_with("--label \"zone\""), "{err}");
    }
}
