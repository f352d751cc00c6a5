//! How listings print: a table for people (the default), or JSON or YAML for scripts
//! (`-o json`, `-o yaml`), one document per command with every page fetched.

use anyhow::Result;
use shoal_proto::pb::v1 as pb;

use crate::client::{Client, explain, state_name, target_name};

/// `-o`: the output format of a listing.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Every item of a paged listing: `fetch` gets a page token (empty first) and returns a
/// page and the next token (empty after the last page).
async fn all_pages<T>(
    mut fetch: impl AsyncFnMut(String) -> Result<(Vec<T>, String)>,
) -> Result<Vec<T>> {
    let (mut out, mut token) = (Vec::new(), String::new());
    loop {
        let (items, next) = fetch(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

/// Pages of this size: a thousand agents, blobs or jobs per request.
const PAGE: u32 = 1000;

async fn all_agents(client: &mut Client) -> Result<Vec<pb::AgentInfo>> {
    all_pages(async |page_token| {
        let request = pb::ListAgentsRequest {
            page_size: PAGE,
            page_token,
            ..Default::default()
        };
        let page = client.list_agents(request).await.map_err(explain)?;
        let page = page.into_inner();
        Ok((page.agents, page.next_page_token))
    })
    .await
}

async fn all_blobs(client: &mut Client) -> Result<Vec<pb::BlobInfo>> {
    all_pages(async |page_token| {
        let request = pb::ListBlobsRequest {
            page_size: PAGE,
            page_token,
        };
        let page = client.list_blobs(request).await.map_err(explain)?;
        let page = page.into_inner();
        Ok((page.blobs, page.next_page_token))
    })
    .await
}

/// Every job (in `state`, if given), most recent first.
async fn all_jobs(client: &mut Client, state: pb::JobState) -> Result<Vec<pb::Job>> {
    all_pages(async |page_token| {
        let request = pb::ListJobsRequest {
            state: state as i32,
            page_size: PAGE,
            page_token,
        };
        let page = client.list_jobs(request).await.map_err(explain)?;
        let page = page.into_inner();
        Ok((page.jobs, page.next_page_token))
    })
    .await
}

/// `shoal jobs`: every job the coordinator keeps, most recent first.
pub async fn jobs(client: &mut Client, state: pb::JobState, output: Output) -> Result<()> {
    let jobs = all_jobs(client, state).await?;
    if output != Output::Table {
        let rows: Vec<_> = jobs.iter().map(job_json).collect();
        return print_document(&serde_json::Value::Array(rows), output);
    }
    println!(
        "{:<17} {:<10} {:>6} {:>8} {:>7}  description",
        "JOB", "STATE", "BLOBS", "TARGETS", "DONE %"
    );
    for job in &jobs {
        let p = job.progress.clone().unwrap_or_default();
        let c = p.counts.unwrap_or_default();
        let done = if p.bytes_total > 0 {
            100.0 * p.bytes_done as f64 / p.bytes_total as f64
        } else {
            0.0
        };
        println!(
            "{:<17} {:<10} {:>6} {:>8} {:>7.1}  {}",
            job.job_id,
            state_name(job.state()),
            job.blobs.len(),
            c.total,
            done,
            job.description
        );
    }
    Ok(())
}

fn sorted_labels(a: &pb::AgentInfo) -> Vec<String> {
    let mut labels: Vec<_> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    labels
}

/// Its state, and `quarantined` if the coordinator no longer takes its word for content.
fn agent_state(a: &pb::AgentInfo) -> String {
    let state = agent_state_name(a.state());
    if a.quarantined.is_empty() {
        state
    } else {
        format!("{state},quarantined")
    }
}

/// `ready`, `draining`, `disconnected`, `gone`.
pub fn agent_state_name(state: pb::AgentState) -> String {
    format!("{state:?}").to_lowercase()
}

pub async fn agents(client: &mut Client, output: Output) -> Result<()> {
    let agents = all_agents(client).await?;
    if output != Output::Table {
        let rows: Vec<_> = (agents.iter())
            .map(|a| {
                serde_json::json!({
                    "agent_id": a.agent_id,
                    "state": agent_state_name(a.state()),
                    "quic_addresses": a.quic_addresses,
                    "blobs_held": a.blobs_held,
                    "blobs_partial": a.blobs_partial,
                    "labels": a.labels,
                    "quarantined": a.quarantined,
                    "upload_capacity_bytes_per_sec": a.upload_capacity_bytes_per_sec,
                    "download_capacity_bytes_per_sec": a.download_capacity_bytes_per_sec,
                    "declared_upload_capacity_bytes_per_sec": a.declared_upload_capacity_bytes_per_sec,
                    "declared_download_capacity_bytes_per_sec": a.declared_download_capacity_bytes_per_sec,
                })
            })
            .collect();
        return print_document(&serde_json::Value::Array(rows), output);
    }
    println!(
        "{:<20} {:<12} {:<22} {:>6} {:>8} {:>15}  labels",
        "AGENT", "STATE", "QUIC", "BLOBS", "PARTIAL", "UP/DOWN Mbit/s"
    );
    let mbit = |bytes_per_sec: u64| bytes_per_sec as f64 * 8.0 / 1e6;
    for a in &agents {
        println!(
            "{:<20} {:<12} {:<22} {:>6} {:>8} {:>15}  {}",
            a.agent_id,
            agent_state(a),
            a.quic_addresses.first().cloned().unwrap_or_default(),
            a.blobs_held,
            a.blobs_partial,
            format!(
                "{:.0}/{:.0}",
                mbit(a.upload_capacity_bytes_per_sec),
                mbit(a.download_capacity_bytes_per_sec)
            ),
            sorted_labels(a).join(",")
        );
    }
    Ok(())
}

pub async fn blobs(client: &mut Client, output: Output) -> Result<()> {
    let blobs = all_blobs(client).await?;
    if output != Output::Table {
        let rows: Vec<_> = (blobs.iter())
            .map(|b| {
                serde_json::json!({
                    "digest": b.digest,
                    "size": b.size,
                    "complete_holders": b.complete_holders,
                    "partial_holders": b.partial_holders,
                })
            })
            .collect();
        return print_document(&serde_json::Value::Array(rows), output);
    }
    println!(
        "{:<71} {:>12} {:>8} {:>8}",
        "DIGEST", "SIZE", "HOLDERS", "PARTIAL"
    );
    for b in &blobs {
        println!(
            "{:<71} {:>12} {:>8} {:>8}",
            b.digest, b.size, b.complete_holders, b.partial_holders
        );
    }
    Ok(())
}

/// A job as `shoal status -o json` prints it.
pub fn job_json(job: &pb::Job) -> serde_json::Value {
    let p = job.progress.clone().unwrap_or_default();
    let c = p.counts.unwrap_or_default();
    let targets: Vec<_> = (p.targets.iter())
        .map(|t| {
            serde_json::json!({
                "agent_id": t.agent_id,
                "blob": t.blob,
                "state": target_name(t.state()),
                "message": t.message,
                "bytes_done": t.bytes_done,
                "bytes_total": t.bytes_total,
                // Seconds from the job's creation to the target's end; null while open or
                // if its agent held the blob already.
                "ended_after_secs": crate::timing::target_secs(job, t),
            })
        })
        .collect();
    serde_json::json!({
        "job_id": job.job_id,
        "state": state_name(job.state()),
        "blobs": job.blobs,
        "description": job.description,
        "counts": {
            "total": c.total,
            "done": c.done,
            "running": c.running,
            "pending": c.pending,
            "failed": c.failed,
            "cancelled": c.cancelled,
        },
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "targets": targets,
    })
}

/// Prints `value` in `output` (JSON or YAML; tables are each command's own).
pub fn print_document(value: &serde_json::Value, output: Output) -> Result<()> {
    match output {
        Output::Yaml => print!("{}", yaml(value)),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

/// `value` as a YAML document: block style, every string double-quoted (JSON's escapes are
/// a subset of YAML's, so a JSON string is a YAML one), keys plain.
pub fn yaml(value: &serde_json::Value) -> String {
    let mut out = String::new();
    match value {
        serde_json::Value::Array(items) if items.is_empty() => out.push_str("[]\n"),
        serde_json::Value::Object(map) if map.is_empty() => out.push_str("{}\n"),
        serde_json::Value::Array(_) | serde_json::Value::Object(_) => {
            yaml_block(value, 0, &mut out)
        }
        scalar => {
            out.push_str(&yaml_scalar(scalar));
            out.push('\n');
        }
    }
    out
}

fn yaml_scalar(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Array(a) if a.is_empty() => "[]".into(),
        serde_json::Value::Object(o) if o.is_empty() => "{}".into(),
        // Strings come out JSON-quoted; numbers, booleans and null as JSON writes them.
        other => other.to_string(),
    }
}

fn is_block(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        _ => false,
    }
}

fn yaml_key(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'));
    if plain {
        key.to_string()
    } else {
        serde_json::Value::String(key.to_string()).to_string()
    }
}

fn yaml_block(value: &serde_json::Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                if is_block(v) {
                    out.push_str(&format!("{pad}{}:\n", yaml_key(k)));
                    yaml_block(v, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{}: {}\n", yaml_key(k), yaml_scalar(v)));
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                if is_block(item) {
                    // The item's block at indent + 2, its first line's indent turned into "- ".
                    let mut inner = String::new();
                    yaml_block(item, indent + 2, &mut inner);
                    out.push_str(&pad);
                    out.push_str("- ");
                    out.push_str(&inner[indent + 2..]);
                } else {
                    out.push_str(&format!("{pad}- {}\n", yaml_scalar(item)));
                }
            }
        }
        scalar => out.push_str(&format!("{pad}{}\n", yaml_scalar(scalar))),
    }
}

/// A client command whose output goes to a reader that stops early (`shoal agents | head`,
/// `shoal completions bash | head`) ends as Unix tools do, quietly with status 141 (128 +
/// SIGPIPE), not with a panic and a backtrace: Rust ignores SIGPIPE, so a write to the
/// closed pipe fails, and `println!` and clap's completion writer panic on that failure.
/// Only those two panics are taken for it; any other runs the usual hook. Not for the
/// servers, which print nothing to stdout.
pub fn quiet_when_stdout_closes() {
    let usual = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = (payload.downcast_ref::<String>().map(String::as_str))
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        let writing = message.starts_with("failed printing to stdout")
            || message.starts_with("failed to write completion file");
        if writing && (message.contains("Broken pipe") || message.contains("BrokenPipe")) {
            std::process::exit(141);
        }
        usual(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_of_nested_documents() {
        let doc = serde_json::json!([
            {"agent_id": "a-1", "labels": {"zone": "z1", "odd key": "x"}, "addrs": ["1.2.3.4:1"], "n": 3},
            {"agent_id": "quote\"d", "labels": {}, "addrs": [], "nested": [[1, 2], {"k": null}]},
        ]);
        let want = r#"- addrs:
    - "1.2.3.4:1"
  agent_id: "a-1"
  labels:
    "odd key": "x"
    zone: "z1"
  n: 3
- addrs: []
  agent_id: "quote\"d"
  labels: {}
  nested:
    - - 1
      - 2
    - k: null
"#;
        assert_eq!(yaml(&doc), want);
        assert_eq!(yaml(&serde_json::json!([])), "[]\n");
    }
}
