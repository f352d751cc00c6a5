//! What the chart adds for operations beyond the workloads: the Grafana dashboard and the
//! alert rules, shipped as the very files CI checks (promtool, a real Prometheus:
//! cli/tests/cluster/prometheus.rs), and the agent's preStop drain.

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use super::{container, object, render};

fn file(path: &str) -> Result<String> {
    let path = super::repo().join(path);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// `alert:` names in the rule file, in order.
fn alerts_in_rule_file() -> Result<Vec<String>> {
    Ok(file("helm/shoal/files/prometheus-rules.yaml")?
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|a| a.trim().to_owned())
        .collect())
}

#[test]
fn the_dashboard_and_the_alert_rules_are_the_files_ci_checks() -> Result<()> {
    let rendered = render()?;
    let dashboard: Value = serde_json::from_str(&file("helm/shoal/files/dashboard.json")?)?;
    let alerts = alerts_in_rule_file()?;
    ensure!(alerts.len() >= 7, "{alerts:?}");
    let none = rendered.objects("default");
    ensure!(
        !none
            .iter()
            .any(|o| o["kind"] == "PrometheusRule" || o["metadata"]["name"] == "shoal-dashboard"),
        "off by default"
    );
    for (render, prefix) in [("all-on", "shoal"), ("overrides", "edge-cache")] {
        let objects = rendered.objects(render);
        let cm = object(objects, "ConfigMap", &format!("{prefix}-dashboard"))?;
        assert_eq!(
            cm["metadata"]["labels"]["grafana_dashboard"], "1",
            "{render}"
        );
        let shipped: Value = serde_json::from_str(
            cm["data"]["shoal.json"]
                .as_str()
                .context("dashboard ConfigMap without shoal.json")?,
        )?;
        assert_eq!(shipped, dashboard, "{render}: the dashboard as shipped");

        let rule = object(objects, "PrometheusRule", prefix)?;
        let rules: Vec<&Value> = (rule["spec"]["groups"].as_array().into_iter().flatten())
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let names: Vec<String> = (rules.iter())
            .filter_map(|r| r["alert"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(names, alerts, "{render}: the alerts as shipped");
        // Prometheus' own templates reach it untouched (Helm does not expand them).
        let stuck = (rules.iter())
            .find(|r| r["alert"] == "ShoalJobStuck")
            .context("ShoalJobStuck")?;
        let summary = stuck["annotations"]["summary"].as_str().unwrap_or_default();
        ensure!(summary.contains("{{ $labels.job_id }}"), "{summary}");
        ensure!(
            (rules.iter()).all(|r| r["expr"].as_str().is_some_and(|e| e.contains("shoal_"))),
            "{render}: every rule reads Shoal's series"
        );
    }
    let all_on = rendered.objects("all-on");
    let cm = object(all_on, "ConfigMap", "shoal-dashboard")?;
    assert_eq!(cm["metadata"]["annotations"]["grafana_folder"], "Shoal");
    let rule = object(all_on, "PrometheusRule", "shoal")?;
    assert_eq!(rule["metadata"]["labels"]["release"], "prometheus");
    Ok(())
}

#[test]
fn the_agent_drains_before_it_stops() -> Result<()> {
    let rendered = render()?;
    let agent = object(rendered.objects("default"), "DaemonSet", "shoal-agent")?;
    let spec = &agent["spec"]["template"]["spec"];
    let c = container(agent, "agent")?;
    let command = &c["lifecycle"]["preStop"]["exec"]["command"];
    assert_eq!(
        *command,
        serde_json::json!([
            "/usr/local/bin/shoal",
            "drain",
            "--timeout",
            "10s",
            "--socket",
            "/var/lib/shoal/agent/agent.sock"
        ])
    );
    // The socket the hook dials is the one the agent serves.
    let config = object(rendered.objects("default"), "ConfigMap", "shoal-agent")?;
    let toml = config["data"]["agent.toml"].as_str().unwrap_or_default();
    ensure!(
        toml.contains(r#"local_socket = "/var/lib/shoal/agent/agent.sock""#),
        "{toml}"
    );
    // The drain's timeout plus the agent's own graceful stop.
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    let off = object(
        rendered.objects("overrides"),
        "DaemonSet",
        "edge-cache-agent",
    )?;
    ensure!(container(off, "agent")?["lifecycle"].is_null(), "drain off");
    Ok(())
}
