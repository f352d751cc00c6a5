//! The dashboard and the alert rules the chart ships, checked against a real Prometheus
//! (Debian's `prometheus` package) scraping a real cluster: every panel's query must return
//! data, every alert rule must load and evaluate without error, and every series an alert
//! reads must exist. `promtool` checks the rule file and runs its unit tests
//! (tests/prometheus/rules-test.yaml), which show each alert firing on its condition.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::harness::{Cluster, random_file, read};

const MIB: u64 = 1 << 20;
/// Each agent's download and upload limit: the bound the coordinator computes is size ÷ this,
/// and an uplink that is kept busy learns its rate (loopback alone drains too fast).
const LINK_LIMIT: u64 = 8 * MIB;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A tool from Debian's `prometheus` package; missing means failing, with how to install it.
fn tool(name: &str) -> Result<PathBuf> {
    let path = PathBuf::from("/usr/bin").join(name);
    if !path.exists() {
        bail!(
            "{name} is not installed: `apt-get install prometheus` (scripts/test-all.sh installs it)"
        );
    }
    Ok(path)
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() -> Result<()> {
    let promtool = tool("promtool")?;
    for args in [
        vec!["check", "rules", "helm/shoal/files/prometheus-rules.yaml"],
        vec!["test", "rules", "tests/prometheus/rules-test.yaml"],
    ] {
        let out = Command::new(&promtool)
            .args(&args)
            .current_dir(repo_file(""))
            .output()?;
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A Prometheus server, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(dir: &Path, coordinator: SocketAddr, agents: &[SocketAddr]) -> Result<Self> {
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let targets = |addrs: &[SocketAddr]| {
            let quoted: Vec<String> = addrs.iter().map(|a| format!("'{a}'")).collect();
            quoted.join(", ")
        };
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             rule_files: ['{rules}']\n\
             scrape_configs:\n\
             - job_name: shoal-coordinator\n  static_configs: [{{targets: [{c}]}}]\n\
             - job_name: shoal-agent\n  static_configs: [{{targets: [{a}]}}]\n",
            rules = repo_file("helm/shoal/files/prometheus-rules.yaml").display(),
            c = targets(&[coordinator]),
            a = targets(agents),
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("prometheus.log");
        let child = Command::new(tool("prometheus")?)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting prometheus")?;
        Ok(Self {
            child,
            url: format!("http://{listen}"),
            log,
        })
    }

    async fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<serde_json::Value> {
        let body = reqwest::Client::new()
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await?
            .text()
            .await?;
        serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))
    }

    /// The result of an instant query, or the error Prometheus gives.
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>> {
        let v = self.get("/api/v1/query", &[("query", expr)]).await?;
        if v["status"] != "success" {
            bail!("{}: {}", v["errorType"], v["error"]);
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    async fn wait_until_up(&self, targets: usize) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(v) = self.query("up == 1").await {
                if v.len() == targets {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "prometheus never saw its targets up; log:\n{}",
                    read(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// A blob GET through an agent's OCI mirror, read to the end: it records the mirror's
/// series (bytes by source, time to first byte).
fn mirror_get(mirror: SocketAddr, digest: &str) -> Result<usize> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(mirror)?;
    write!(
        s,
        "GET /v2/library/metrics/blobs/{digest} HTTP/1.0\r\nHost: {mirror}\r\n\r\n"
    )?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let head = String::from_utf8_lossy(&response[..response.len().min(12)]).into_owned();
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("mirror answered {head:?}");
    }
    Ok(response.len())
}

/// Series names (`shoal_*`, `process_*`) that an expression reads.
fn series_names(expr: &str) -> Vec<String> {
    let mut names: Vec<String> = expr
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("shoal_") || t.starts_with("process_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Grafana's interval variables, as a dashboard query would see them with a 1 s scrape.
fn grafana_to_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "5m")
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_panel_and_alert_reads_series_a_real_cluster_exports() -> Result<()> {
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(repo_file(
        "helm/shoal/files/dashboard.json",
    ))?)?;
    let limit = LINK_LIMIT.to_string();
    let cluster = Cluster::start(
        3,
        &[
            ("SHOAL_DOWNLOAD_LIMIT_BYTES_PER_SEC", limit.as_str()),
            ("SHOAL_UPLOAD_LIMIT_BYTES_PER_SEC", limit.as_str()),
        ],
        5000,
    )
    .await?;
    let agents: Vec<SocketAddr> = cluster.agents.iter().map(|a| a.metrics).collect();
    let prometheus = Prometheus::start(cluster.dir.path(), cluster.metrics, &agents)?;
    prometheus.wait_until_up(1 + agents.len()).await?;

    // A rollout for the panels to show: one blob from agent 0 to all, then a pull of it
    // through another agent's mirror.
    let size = 16 * MIB;
    let file = random_file(cluster.dir.path(), "blob", size as usize, 7)?;
    let digest = cluster.push(0, &file)?;
    let out = cluster.cli(&["distribute", &digest, "--to", "all", "--detach"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job_id = String::from_utf8(out.stdout)?.trim().to_string();
    // Sampled while the job runs: its bound is its slowest target's bytes over that target's
    // download capacity (every agent wants the whole blob here).
    let started = Instant::now();
    let bound = loop {
        let v = prometheus
            .query(&format!(
                "shoal_coordinator_job_bound_seconds{{job_id=\"{job_id}\"}}"
            ))
            .await?;
        if let Some(value) = v.first().and_then(|s| s["value"][1].as_str()) {
            break value.parse::<f64>()?;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("the job's bound never reached Prometheus");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let expected = size as f64 / LINK_LIMIT as f64;
    assert!(
        (bound - expected).abs() < 1e-6,
        "bound {bound} s, expected {expected} s"
    );
    let job = cluster.wait_job(&job_id, Duration::from_secs(120)).await?;
    assert_eq!(job.state(), shoal_proto::pb::v1::JobState::Done, "{job:?}");
    let got = mirror_get(cluster.agents[1].mirror, &digest)?;
    assert!(got > size as usize, "mirror sent {got} bytes");
    // Rates need two samples after the rollout, rules one evaluation.
    tokio::time::sleep(Duration::from_secs(4)).await;

    let mut failures = Vec::new();
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut queries = 0;
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            failures.push(format!("panel {title:?} has no query"));
        }
        for target in targets {
            let expr = grafana_to_promql(target["expr"].as_str().unwrap_or_default());
            queries += 1;
            match prometheus.query(&expr).await {
                Ok(v) if v.is_empty() => {
                    failures.push(format!("panel {title:?}: `{expr}` returned nothing"))
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("panel {title:?}: `{expr}` failed: {e}")),
            }
        }
    }
    assert!(queries >= 15, "only {queries} panel queries");

    let rules = prometheus.get("/api/v1/rules", &[]).await?;
    let mut alerts = 0;
    for group in rules["data"]["groups"].as_array().context("rule groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            let name = rule["name"].as_str().unwrap_or("?");
            let expr = rule["query"].as_str().unwrap_or_default();
            alerts += 1;
            if rule["health"] != "ok" {
                failures.push(format!(
                    "alert {name}: health {} ({})",
                    rule["health"], rule["lastError"]
                ));
            }
            if let Err(e) = prometheus.query(expr).await {
                failures.push(format!("alert {name}: `{expr}` failed: {e}"));
            }
            for series in series_names(expr) {
                let found = prometheus
                    .query(&format!("count({{__name__=\"{series}\"}})"))
                    .await?;
                if found.is_empty() {
                    failures.push(format!(
                        "alert {name} reads {series}, which no target exports"
                    ));
                }
            }
        }
    }
    assert!(alerts >= 7, "only {alerts} alert rules loaded");
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
