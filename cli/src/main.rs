//! `shoal`: one binary for the coordinator, the agent and the client commands.
//!
//! Exit codes: 0 success, 1 failure, 2 usage or configuration error. Every error is one line.

/// mimalloc instead of glibc's malloc: the coordinator's planner allocates and frees small
/// B-tree nodes by the hundred thousand in a burst, and glibc handed freed pages back and
/// faulted fresh ones in (`docs/BENCHMARKS.md`, "The control plane under many agents").
/// Tuned by [`tune_allocator`].
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc commits its arenas eagerly by default (on Linux, which overcommits): a
/// coordinator planning 20,000 orders of a 1 GiB blob then peaked at 2.4 GiB resident,
/// against 1.2 GiB with glibc's malloc and the goal of 2 GiB. Committed on demand
/// it peaked at 1.7 GiB, and kept the speed. Arenas reserved before `main` (the first) are
/// as they were. (The option's number is from `mimalloc.h`, the same in its v2 and v3.)
fn tune_allocator() {
    const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
    // SAFETY: `mi_option_set` only stores a value in mimalloc's option table, which any
    // thread may do at any time; the options are read when memory is next reserved or freed.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0);
    }
}

mod admin;
mod client;
mod containerd;
mod demo;
mod local;
mod output;
mod process_metrics;
mod registries;
mod serve;
mod settings;
mod timing;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal_proto::Digest;

use crate::client::CoordinatorAddr;

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Datacenter blob distribution over QUIC"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Log level on stderr: error, warn, info, debug, trace; wins over SHOAL_LOG (which
    /// also takes per-module filters, e.g. `info,shoal_agent::download=debug`).
    #[arg(long, global = true, value_enum)]
    log_level: Option<LogLevel>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Text,
    Json,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum JobStateArg {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl From<JobStateArg> for shoal_proto::pb::v1::JobState {
    fn from(s: JobStateArg) -> Self {
        use shoal_proto::pb::v1::JobState as S;
        match s {
            JobStateArg::Pending => S::Pending,
            JobStateArg::Running => S::Running,
            JobStateArg::Done => S::Done,
            JobStateArg::Failed => S::Failed,
            JobStateArg::Cancelled => S::Cancelled,
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn directive(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
struct AgentSocket {
    /// The local agent's API socket.
    #[arg(
        long,
        env = "SHOAL_AGENT_SOCKET",
        default_value = "/var/lib/shoal/agent/agent.sock"
    )]
    socket: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the coordinator.
    Coordinator(serve::CoordinatorArgs),
    /// Run an agent.
    Agent(serve::AgentArgs),
    /// Ingest a local file on the local agent and register it with the coordinator.
    Push {
        /// The file, or `-` for standard input.
        file: PathBuf,
        /// Never evict it (until `shoal blobs unpin`).
        #[arg(long)]
        pin: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Fetch a blob through the local agent into a file: by digest, or from an HTTP(S) URL
    /// (a model file). The cluster fetches the URL once and shares it; with `--digest`, or
    /// an origin that announces the SHA-256 (`Repr-Digest`, Hugging Face's `X-Linked-Etag`),
    /// while it arrives.
    Pull {
        /// `sha256:<hex>`, or an http:// or https:// URL.
        source: String,
        /// The digest the URL's content must have.
        #[arg(long)]
        digest: Option<Digest>,
        #[arg(short, long)]
        output: PathBuf,
        /// Never evict the agent's copy (until `shoal blobs unpin`).
        #[arg(long)]
        pin: bool,
        /// Write the output as its own writable copy. Without it, the output shares the
        /// agent's copy on disk where it can: a reflink (XFS, btrfs), else a read-only hard
        /// link on the same filesystem, else a copy.
        #[arg(long)]
        copy: bool,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Distribute an image's config and layers to agents ahead of a deploy, and follow it.
    Preheat {
        /// Image reference, e.g. registry.example.com/team/app:v1 or ghcr.io/org/app@sha256:…
        image: String,
        /// Targets, required (the whole cluster is spelled out): all | key=value[,key=value]
        /// | agents:id[,id].
        #[arg(long, value_parser = client::selector)]
        to: shoal_proto::pb::v1::TargetSelector,
        /// Platform of an image index, e.g. linux/arm64 (repeatable); default: the
        /// coordinator's `preheat_platforms`.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Fail targets not done within this many seconds.
        #[arg(long)]
        deadline_secs: Option<u64>,
        /// Print the job id and return at once instead of watching.
        #[arg(long)]
        detach: bool,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// Distribute blobs to agents and follow the job.
    Distribute {
        #[arg(required = true)]
        digests: Vec<Digest>,
        /// Targets, required (the whole cluster is spelled out): all | key=value[,key=value]
        /// | agents:id[,id].
        #[arg(long, value_parser = client::selector)]
        to: shoal_proto::pb::v1::TargetSelector,
        /// Fail targets not done within this many seconds.
        #[arg(long)]
        deadline_secs: Option<u64>,
        /// Print the job id and return at once instead of watching.
        #[arg(long)]
        detach: bool,
        /// HTTP(S) URL to seed the (single) blob from if no agent holds it.
        #[arg(long)]
        from_url: Option<String>,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// Show a job's state and its targets.
    Status {
        job: String,
        /// Output: a summary for people, or the job as JSON or YAML.
        #[arg(short, long, value_enum, default_value = "table")]
        output: output::Output,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// Cancel a job: its pending and running transfers stop (blobs already complete stay).
    Cancel {
        job: String,
        /// Why, shown on its targets.
        #[arg(long, default_value = "cancelled with shoal cancel")]
        reason: String,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// Follow a job with progress bars until it ends.
    Watch {
        job: String,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// List agents; or drain or remove one.
    Agents {
        #[command(subcommand)]
        action: Option<admin::AgentsAction>,
        /// Output: a table, or a JSON or YAML list.
        #[arg(short, long, value_enum, default_value = "table")]
        output: output::Output,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// List blobs in the catalog; or remove or unpin one.
    Blobs {
        #[command(subcommand)]
        action: Option<admin::BlobsAction>,
        /// Output: a table, or a JSON or YAML list.
        #[arg(short, long, value_enum, default_value = "table")]
        output: output::Output,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// List jobs, most recent first.
    Jobs {
        /// Only jobs in this state.
        #[arg(long, value_enum)]
        state: Option<JobStateArg>,
        /// Output: a table, or a JSON or YAML list.
        #[arg(short, long, value_enum, default_value = "table")]
        output: output::Output,
        #[command(flatten)]
        coordinator: CoordinatorAddr,
    },
    /// Drain the local agent before it stops (a pod's preStop): the coordinator stops
    /// naming it as a source, and the command waits for the chunks it serves to finish.
    Drain {
        /// Longest to wait for served chunks, e.g. 30s.
        #[arg(long, default_value = "30s", value_parser = duration_arg)]
        timeout: Duration,
        #[command(flatten)]
        agent: AgentSocket,
    },
    /// Give a data directory to the agent's user (the chart's init container, as root with
    /// only CAP_CHOWN): hostPath directories are created root-owned. Not recursive.
    InitDir {
        path: PathBuf,
        /// UID:GID to own it.
        #[arg(long, value_parser = owner_arg)]
        owner: (u32, u32),
    },
    /// Print the cluster CA certificate (PEM) that API clients verify the coordinator with
    /// (`--ca-file`), from the coordinator's state directory; e.g. `kubectl exec
    /// statefulset/shoal-coordinator -- shoal ca-cert > ca.pem`. Never the key.
    CaCert {
        #[arg(
            long,
            env = "SHOAL_STATE_DIR",
            default_value = "/var/lib/shoal/coordinator"
        )]
        state_dir: PathBuf,
    },
    /// Print a shell completion script, e.g. `shoal completions bash > /etc/bash_completion.d/shoal`.
    Completions { shell: clap_complete::Shell },
    /// A coordinator and agents on loopback distributing a generated blob, with a summary.
    Demo(demo::DemoArgs),
    /// Write containerd hosts.toml files that pull through the local agent's mirror.
    ContainerdConfig(containerd::ContainerdArgs),
    /// Write a registries.conf drop-in so CRI-O, Podman and Skopeo pull through the mirror.
    RegistriesConf(registries::RegistriesArgs),
}

fn main() {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => usage_error(e),
    };
    if !matches!(cli.command, Command::Coordinator(_) | Command::Agent(_)) {
        output::quiet_when_stdout_closes();
    }
    let filter = match cli.log_level {
        Some(level) => tracing_subscriber::EnvFilter::new(level.directive()),
        None => tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
    };
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => subscriber.init(),
        LogFormat::Json => subscriber.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => fail(1, &format!("starting the async runtime: {e}")),
    };
    let result = runtime.block_on(dispatch(cli.command));
    match result {
        Ok(()) => {}
        Err(e) => match e.downcast_ref::<serve::ConfigProblem>() {
            Some(problem) => fail(2, &problem.0),
            None => fail(1, &format!("{e:#}")),
        },
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Coordinator(args) => serve::coordinator(args).await,
        Command::Agent(args) => serve::agent(args).await,
        Command::Push { file, pin, agent } => local::push(&agent.socket, &file, pin).await,
        Command::Pull {
            source,
            digest,
            output,
            pin,
            copy,
            agent,
        } => {
            let source = if source.starts_with("http://") || source.starts_with("https://") {
                local::PullSource::Url {
                    url: source,
                    digest,
                }
            } else {
                let d: Digest = source.parse().map_err(|e| {
                    serve::ConfigProblem(format!(
                        "{source:?} is neither a digest ({e}) nor an http(s) URL"
                    ))
                })?;
                local::PullSource::Digest(d)
            };
            local::pull(&agent.socket, source, &output, pin, copy).await
        }
        Command::Preheat {
            image,
            to,
            platforms,
            deadline_secs,
            detach,
            coordinator,
        } => {
            let mut c = client::connect(&coordinator).await?;
            let deadline = deadline_secs.map(Duration::from_secs);
            let job = client::preheat(&mut c, &image, to, platforms, deadline).await?;
            println!("{job}");
            if detach {
                return Ok(());
            }
            let watched = client::watch(&mut c, &job).await?;
            client::require_done(&watched.job)
        }
        Command::Distribute {
            digests,
            to,
            deadline_secs,
            detach,
            from_url,
            coordinator,
        } => {
            let mut c = client::connect(&coordinator).await?;
            let deadline = deadline_secs.map(Duration::from_secs);
            let job =
                client::distribute(&mut c, &digests, to, deadline, from_url.as_deref()).await?;
            println!("{job}");
            if detach {
                return Ok(());
            }
            let watched = client::watch(&mut c, &job).await?;
            client::require_done(&watched.job)
        }
        Command::Status {
            job,
            output,
            coordinator,
        } => {
            let mut c = client::connect(&coordinator).await?;
            let job = client::status(&mut c, &job).await?;
            match output {
                output::Output::Table => {
                    let capacity = client::capacities(&mut c).await;
                    client::print_job(&job, &capacity);
                    Ok(())
                }
                other => output::print_document(&output::job_json(&job), other),
            }
        }
        Command::Cancel {
            job,
            reason,
            coordinator,
        } => {
            let mut c = client::connect(&coordinator).await?;
            let r = c
                .cancel_job(shoal_proto::pb::v1::CancelJobRequest {
                    job_id: job.clone(),
                    reason,
                })
                .await
                .map_err(client::explain)?
                .into_inner();
            println!("{job} {}", client::state_name(r.state()));
            Ok(())
        }
        Command::Watch { job, coordinator } => {
            let mut c = client::connect(&coordinator).await?;
            let watched = client::watch(&mut c, &job).await?;
            client::require_done(&watched.job)
        }
        Command::Agents {
            action: Some(action),
            coordinator,
            ..
        } => admin::agents(&mut client::connect(&coordinator).await?, action).await,
        Command::Blobs {
            action: Some(action),
            coordinator,
            ..
        } => admin::blobs(&mut client::connect(&coordinator).await?, action).await,
        Command::Drain { timeout, agent } => admin::drain_local(&agent.socket, timeout).await,
        Command::Agents {
            action: None,
            output,
            coordinator,
        } => output::agents(&mut client::connect(&coordinator).await?, output).await,
        Command::Blobs {
            action: None,
            output,
            coordinator,
        } => output::blobs(&mut client::connect(&coordinator).await?, output).await,
        Command::Jobs {
            state,
            output,
            coordinator,
        } => {
            let state = state.map_or(shoal_proto::pb::v1::JobState::Unspecified, Into::into);
            output::jobs(&mut client::connect(&coordinator).await?, state, output).await
        }
        Command::InitDir { path, owner } => {
            std::os::unix::fs::chown(&path, Some(owner.0), Some(owner.1)).map_err(|e| {
                anyhow::anyhow!("chown {}:{} {}: {e}", owner.0, owner.1, path.display())
            })
        }
        Command::CaCert { state_dir } => {
            let path = state_dir.join("ca.pem");
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (is this the coordinator's state_dir?)",
                    path.display()
                )
            })?;
            if shoal_pki::grpc::certificates_from_pem(&pem).is_empty() {
                anyhow::bail!("{}: no PEM certificate in it", path.display());
            }
            print!("{pem}");
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut std::io::stdout());
            Ok(())
        }
        Command::Demo(args) => demo::run(args).await,
        Command::ContainerdConfig(args) => containerd::run(args).await,
        Command::RegistriesConf(args) => registries::run(args),
    }
}

/// `--help` and `--version` print in full and succeed; any other usage error is one line
/// (clap's first line, which names the problem) and exit code 2.
fn usage_error(e: clap::Error) -> ! {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        std::process::exit(0);
    }
    if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        fail(2, "a subcommand is required; see `shoal --help`");
    }
    if e.kind() == ErrorKind::MissingRequiredArgument
        && let Some(clap::error::ContextValue::Strings(missing)) =
            e.get(clap::error::ContextKind::InvalidArg)
    {
        fail(
            2,
            &format!("missing {} (see `shoal --help`)", missing.join(", ")),
        );
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("invalid usage");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    fail(2, &format!("{first} (see `shoal --help`)"));
}

/// `UID:GID`, numeric (the image has no user database to resolve names with).
fn owner_arg(s: &str) -> Result<(u32, u32), String> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not UID:GID"))?;
    let id = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{v:?} is not a numeric id"))
    };
    Ok((id(u)?, id(g)?))
}

/// A duration with units, as the configuration takes them (`30s`, `2m`, `500ms`).
fn duration_arg(s: &str) -> Result<Duration, String> {
    shoal_proto::units::Quantity::Milliseconds
        .parse(s)
        .map(Duration::from_millis)
}

fn fail(code: i32, message: &str) -> ! {
    eprintln!("shoal: {}", message.replace('\n', " "));
    std::process::exit(code);
}
