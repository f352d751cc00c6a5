//! The Helm chart and the binaries read one configuration schema. Renders `helm/shoal` with
//! Helm's own templating (`scripts/helm-render.py`: the chart's defaults,
//! `ci/all-on-values.yaml` with every toggle on, and `ci/overrides-values.yaml` with other
//! names, another namespace and the defaults that are on turned off), then reads the rendered
//! ConfigMaps into the real `AgentConfig` and `CoordinatorConfig` (unknown keys are errors)
//! and validates them, the way `shoal agent|coordinator --config` would with the Secret's
//! token in `SHOAL_JOIN_TOKEN`. Also checks that the pods wire ports, probes, the token and
//! labels to what the configuration says, and (`values`) that every value people override
//! reaches the objects, on and off.
//!
//! Needs python3 with `helm-python-sdk` and `kubernetes-validate` (scripts/test-all.sh
//! installs them); without them these tests fail and say how to install.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde_json::Value;
use shoal_agent::AgentConfig;
use shoal_coordinator::CoordinatorConfig;

#[path = "helm_chart/monitoring.rs"]
mod monitoring;
#[path = "helm_chart/values.rs"]
mod values;

/// `renders[0]` and `renders[1]` keep the chart's names, namespace and token Secret.
const RENDERS: [&str; 3] = ["default", "all-on", "overrides"];
/// The renders the configuration tests read (the same object names).
const SAME_NAMES: usize = 2;
const INSTALL: &str = "apt-get install -y python3 python3-pip && \
     pip install --break-system-packages helm-python-sdk==0.2.2 kubernetes-validate==1.37.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every render's objects, from one run of the render script (which also lints and
/// validates them against the Kubernetes schemas: its failure fails the test).
struct Rendered {
    _dir: tempfile::TempDir,
    renders: Vec<(&'static str, Vec<Value>)>,
    /// NOTES.txt of each render, in the order of `renders`.
    notes: Vec<String>,
}

impl Rendered {
    fn objects(&self, name: &str) -> &[Value] {
        let i = RENDERS.iter().position(|r| *r == name).expect("a render");
        &self.renders[i].1
    }

    fn notes(&self, name: &str) -> &str {
        &self.notes[RENDERS.iter().position(|r| *r == name).expect("a render")]
    }
}

fn render() -> Result<Rendered> {
    let dir = tempfile::tempdir()?;
    let script = repo().join("scripts/helm-render.py");
    let out = match Command::new("python3")
        .arg(&script)
        .arg("--out")
        .arg(dir.path())
        .output()
    {
        Ok(out) => out,
        Err(e) => bail!("cannot run python3 ({e}); install it and the chart tools: {INSTALL}"),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim_end();
    match out.status.code() {
        Some(0) => {}
        Some(2) => bail!(
            "{} cannot run: {stderr}; install: {INSTALL}",
            script.display()
        ),
        _ => bail!("{} failed: {stderr}", script.display()),
    }
    let mut renders = Vec::new();
    let mut notes = Vec::new();
    for name in RENDERS {
        let read = |file: &str| {
            let path = dir.path().join(name).join(file);
            std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
        };
        renders.push((name, serde_json::from_str(&read("manifests.json")?)?));
        notes.push(read("NOTES.txt")?);
    }
    Ok(Rendered {
        _dir: dir,
        renders,
        notes,
    })
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{what} is not a string: {v}"))
}

fn join_token(objects: &[Value]) -> Result<String> {
    let secret = object(objects, "Secret", "shoal-join-token")?;
    let encoded = str_of(&secret["data"]["join-token"], "Secret data join-token")?;
    let token = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded)?)?;
    ensure!(!token.is_empty(), "the Secret holds an empty join token");
    Ok(token)
}

fn container<'a>(workload: &'a Value, name: &str) -> Result<&'a Value> {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no container {name}"))
}

/// The container reads the token from the chart's Secret as SHOAL_JOIN_TOKEN.
fn assert_token_from_secret(c: &Value) -> Result<()> {
    let env = c["env"].as_array().context("env")?;
    let token = env
        .iter()
        .find(|e| e["name"] == "SHOAL_JOIN_TOKEN")
        .context("SHOAL_JOIN_TOKEN is not set")?;
    let key = &token["valueFrom"]["secretKeyRef"];
    ensure!(
        key["name"] == "shoal-join-token" && key["key"] == "join-token",
        "SHOAL_JOIN_TOKEN does not come from the chart's Secret: {token}"
    );
    Ok(())
}

fn container_port(c: &Value, name: &str) -> Result<u16> {
    c["ports"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("no container port {name}"))
}

fn probe_port(c: &Value, probe: &str) -> Result<u16> {
    c[probe]["grpc"]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("{probe} has no grpc port"))
}

fn checksum(workload: &Value) -> Result<&str> {
    str_of(
        &workload["spec"]["template"]["metadata"]["annotations"]["checksum/config"],
        "checksum/config annotation",
    )
}

/// Kubernetes leaves `$(VAR)` literal when VAR is not in the container's env: every reference
/// in the args must be defined.
fn assert_arg_vars_defined(c: &Value) -> Result<()> {
    let defined: BTreeSet<&str> = c["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for arg in c["args"].as_array().context("args")? {
        let mut rest = str_of(arg, "arg")?;
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').context("unclosed $(")? + start;
            let var = &rest[start + 2..end];
            ensure!(defined.contains(var), "arg {arg} uses undefined {var}");
            rest = &rest[end..];
        }
    }
    Ok(())
}

fn bytes_of_quantity(q: &str) -> Result<u64> {
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit: u64 = match &q[digits.len()..] {
        "" => 1,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        other => bail!("unit {other} not handled by this test"),
    };
    Ok(digits.parse::<u64>()? * unit)
}

#[test]
fn rendered_agent_configuration_is_what_the_agent_reads() -> Result<()> {
    let rendered = render()?;
    for (name, objects) in &rendered.renders[..SAME_NAMES] {
        let map = object(objects, "ConfigMap", "shoal-agent")?;
        let toml_text = str_of(&map["data"]["agent.toml"], "agent.toml")?;
        let mut config: AgentConfig = toml::from_str(toml_text)
            .with_context(|| format!("{name}: agent.toml is not an AgentConfig:\n{toml_text}"))?;
        config.join_token = join_token(objects)?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{name}: agent.toml: {e}"))?;

        let daemonset = object(objects, "DaemonSet", "shoal-agent")?;
        let agent = container(daemonset, "agent")?;
        assert_token_from_secret(agent)?;
        assert_arg_vars_defined(agent)?;
        let args: Vec<&str> = agent["args"]
            .as_array()
            .context("args")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        ensure!(
            args.windows(2)
                .any(|w| w == ["--config", "/etc/shoal/agent.toml"]),
            "{name}: the agent does not read the ConfigMap: {args:?}"
        );
        ensure!(
            args.windows(2)
                .any(|w| w == ["--label", "host=$(SHOAL_NODE_NAME)"]),
            "{name}: no host label: {args:?}"
        );
        ensure!(
            args.windows(2)
                .any(|w| w == ["--label", "zone=$(SHOAL_POD_LABEL_ZONE)"]),
            "{name}: no zone label: {args:?}"
        );

        // Ports the pod declares and probes are the ones the agent binds.
        let health = config.health_listen.context("health_listen is not set")?;
        ensure!(
            health.ip().is_unspecified(),
            "{name}: probes dial the pod IP"
        );
        assert_eq!(container_port(agent, "health")?, health.port(), "{name}");
        assert_eq!(probe_port(agent, "livenessProbe")?, health.port(), "{name}");
        assert_eq!(
            probe_port(agent, "readinessProbe")?,
            health.port(),
            "{name}"
        );
        assert_eq!(
            agent["readinessProbe"]["grpc"]["service"],
            shoal_agent::health::READINESS_SERVICE,
            "{name}: readiness must ask for the agent's readiness service"
        );
        assert_eq!(
            container_port(agent, "quic")?,
            config.quic_listen.port(),
            "{name}"
        );
        let metrics = config.metrics_listen.context("metrics_listen is not set")?;
        assert_eq!(container_port(agent, "metrics")?, metrics.port(), "{name}");
        assert_eq!(
            config.local_socket_path(),
            Path::new("/var/lib/shoal/agent/agent.sock"),
            "{name}: shoal push/pull in the pod look for the socket there"
        );
        ensure!(
            config
                .coordinator
                .starts_with("https://shoal-coordinator.shoal-system.svc:"),
            "{name}: {}",
            config.coordinator
        );

        // The quota is the documented share of the cache size limit.
        let (limit, percent) = match *name {
            "default" => ("100Gi", 90),
            _ => ("500Gi", 85),
        };
        assert_eq!(
            config.quota_bytes,
            bytes_of_quantity(limit)? * percent / 100,
            "{name}"
        );
        ensure!(!checksum(daemonset)?.is_empty(), "{name}: no checksum");
    }

    let (_, all_on) = &rendered.renders[1];
    let map = object(all_on, "ConfigMap", "shoal-agent")?;
    let config: AgentConfig = toml::from_str(str_of(&map["data"]["agent.toml"], "agent.toml")?)?;
    assert_eq!(config.upload_limit_bytes_per_sec, 2_500_000_000);
    assert_eq!(config.labels.get("rack").map(String::as_str), Some("r17"));
    // containerd.default sends every registry through the mirror: it serves any.
    assert_eq!(config.mirror.registries, ["*"]);
    let daemonset = object(all_on, "DaemonSet", "shoal-agent")?;
    // A sidecar, not an init container: it takes the mirror out of the node's hosts files
    // when the pod stops (uninstall included).
    let hosts = container(daemonset, "containerd-hosts")?;
    ensure!(
        hosts["args"][0] == "containerd-config"
            && hosts["args"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "--hold")),
        "all-on: no containerd-config --hold sidecar: {hosts}"
    );
    // registryAuthSecret: the Secret is mounted where origin.auth_file points, in the
    // agents and the coordinator; the defaults mount nothing.
    let (_, defaults) = &rendered.renders[0];
    assert_registry_auth(all_on, "DaemonSet", "shoal-agent", "agent", true)?;
    assert_registry_auth(defaults, "DaemonSet", "shoal-agent", "agent", false)?;
    assert_eq!(
        config.origin.auth_file.as_deref(),
        Some(Path::new(REGISTRY_AUTH_FILE))
    );
    Ok(())
}

const REGISTRY_AUTH_FILE: &str = "/var/run/secrets/shoal/registry-auth/.dockerconfigjson";

/// Whether `workload`'s pod mounts the registryAuthSecret (registry-credentials in the
/// all-on values) at the directory of [`REGISTRY_AUTH_FILE`].
fn assert_registry_auth(
    objects: &[Value],
    kind: &str,
    name: &str,
    container_name: &str,
    mounted: bool,
) -> Result<()> {
    let workload = object(objects, kind, name)?;
    let volumes = workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?;
    let volume = volumes.iter().find(|v| v["name"] == "registry-auth");
    let c = container(workload, container_name)?;
    let mounts = c["volumeMounts"].as_array().context("volumeMounts")?;
    let mount = mounts.iter().find(|m| m["name"] == "registry-auth");
    if !mounted {
        ensure!(
            volume.is_none() && mount.is_none(),
            "{name}: mounts registry auth unasked"
        );
        return Ok(());
    }
    let volume = volume.with_context(|| format!("{name}: no registry-auth volume"))?;
    assert_eq!(
        volume["secret"]["secretName"], "registry-credentials",
        "{name}"
    );
    let mount = mount.with_context(|| format!("{name}: registry-auth not mounted"))?;
    let dir = Path::new(REGISTRY_AUTH_FILE).parent().context("dir")?;
    assert_eq!(
        mount["mountPath"].as_str().map(Path::new),
        Some(dir),
        "{name}"
    );
    Ok(())
}

#[test]
fn rendered_coordinator_configuration_is_what_the_coordinator_reads() -> Result<()> {
    let rendered = render()?;
    let mut checksums = BTreeSet::new();
    for (name, objects) in &rendered.renders[..SAME_NAMES] {
        let map = object(objects, "ConfigMap", "shoal-coordinator")?;
        let toml_text = str_of(&map["data"]["coordinator.toml"], "coordinator.toml")?;
        let mut config: CoordinatorConfig = toml::from_str(toml_text).with_context(|| {
            format!("{name}: coordinator.toml is not a CoordinatorConfig:\n{toml_text}")
        })?;
        config.join_token = join_token(objects)?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{name}: coordinator.toml: {e}"))?;

        let statefulset = object(objects, "StatefulSet", "shoal-coordinator")?;
        let coordinator = container(statefulset, "coordinator")?;
        assert_token_from_secret(coordinator)?;
        let all_on = *name == "all-on";
        assert_registry_auth(
            objects,
            "StatefulSet",
            "shoal-coordinator",
            "coordinator",
            all_on,
        )?;
        assert_eq!(
            config.origin.auth_file.is_some(),
            all_on,
            "{name}: origin.auth_file"
        );
        assert_eq!(
            container_port(coordinator, "grpc")?,
            config.listen.port(),
            "{name}"
        );
        // kubelet's gRPC probes cannot speak TLS: they ask the plaintext health endpoint.
        let health = config.health_listen.context("no health_listen")?;
        assert_eq!(
            probe_port(coordinator, "readinessProbe")?,
            health.port(),
            "{name}"
        );
        assert_eq!(
            container_port(coordinator, "health")?,
            health.port(),
            "{name}"
        );
        let mounts = coordinator["volumeMounts"].as_array().context("mounts")?;
        ensure!(
            mounts.iter().any(|m| m["name"] == "state"
                && m["mountPath"].as_str().map(Path::new) == Some(config.state_dir.as_path())),
            "{name}: state_dir {} is not the state volume",
            config.state_dir.display()
        );
        ensure!(
            statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state",
            "{name}: no PersistentVolumeClaim for the state"
        );
        let service = object(objects, "Service", "shoal-coordinator")?;
        ensure!(
            service["spec"]["ports"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["port"] == config.listen.port())),
            "{name}: the Service does not expose the API port"
        );
        assert_api_tokens(statefulset, coordinator, &config, all_on)
            .with_context(|| format!("{name}: api tokens"))?;
        checksums.insert(checksum(statefulset)?.to_string());
        if *name == "all-on" {
            assert_eq!(config.lease_ms, 20_000);
            assert_eq!(config.max_uploads, 12);
        }
    }
    assert_eq!(
        checksums.len(),
        2,
        "different configurations must give different checksums (pods roll)"
    );
    Ok(())
}

/// Each `coordinator.apiTokens` entry reaches the coordinator as an `api_tokens` entry whose
/// `token_file` is the Secret key mounted read-only; the coordinator is secure (TLS) either
/// way.
fn assert_api_tokens(
    statefulset: &Value,
    coordinator: &Value,
    config: &CoordinatorConfig,
    all_on: bool,
) -> Result<()> {
    ensure!(
        !config.insecure,
        "the chart's coordinator must not be insecure"
    );
    if !all_on {
        ensure!(config.api_tokens.is_empty(), "no tokens unless configured");
        return Ok(());
    }
    let names: Vec<(&str, shoal_coordinator::Role)> = (config.api_tokens.iter())
        .map(|t| (t.name.as_str(), t.role))
        .collect();
    assert_eq!(
        names,
        [
            ("ci", shoal_coordinator::Role::Deployer),
            ("ops", shoal_coordinator::Role::Admin)
        ]
    );
    let volumes = statefulset["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .context("volumes")?;
    let mounts = coordinator["volumeMounts"].as_array().context("mounts")?;
    for (token, secret, key) in [
        ("ci", "shoal-ci-token", "token"),
        ("ops", "shoal-ops", "admin-token"),
    ] {
        let entry = (config.api_tokens.iter())
            .find(|t| t.name == token)
            .context("entry")?;
        let volume = volumes
            .iter()
            .find(|v| v["secret"]["secretName"] == secret)
            .with_context(|| format!("no volume of Secret {secret}"))?;
        ensure!(volume["secret"]["items"][0]["key"] == key, "{token}: key");
        let mount = mounts
            .iter()
            .find(|m| m["name"] == volume["name"])
            .with_context(|| format!("{token}: not mounted"))?;
        ensure!(mount["readOnly"] == true, "{token}: mounted writable");
        let dir = Path::new(str_of(&mount["mountPath"], "mountPath")?);
        assert_eq!(entry.token_file, dir.join(key), "{token}: token_file");
    }
    Ok(())
}

/// Every configuration key is either set by the chart or allowed (and typed) in
/// values.schema.json: a new key in AgentConfig or CoordinatorConfig fails here until the
/// chart knows it.
#[test]
fn chart_knows_every_configuration_key() -> Result<()> {
    let rendered = render()?;
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("helm/shoal/values.schema.json"),
    )?)?;
    let (_, all_on) = &rendered.renders[1];
    for (component, map_name, file, fields) in [
        (
            "agent",
            "shoal-agent",
            "agent.toml",
            serde_json::to_value(AgentConfig::default())?,
        ),
        (
            "coordinator",
            "shoal-coordinator",
            "coordinator.toml",
            serde_json::to_value(CoordinatorConfig::default())?,
        ),
    ] {
        let fields: BTreeSet<String> = fields
            .as_object()
            .context("fields")?
            .keys()
            .cloned()
            .collect();
        let in_schema: BTreeSet<String> =
            schema["properties"][component]["properties"]["config"]["properties"]
                .as_object()
                .context("schema config properties")?
                .keys()
                .cloned()
                .collect();
        let map = object(all_on, "ConfigMap", map_name)?;
        let table: toml::Table = toml::from_str(str_of(&map["data"][file], file)?)?;
        let mut known: BTreeSet<String> = table.keys().cloned().collect();
        known.extend(in_schema.iter().cloned());
        known.insert("join_token".into()); // from the Secret
        let missing: Vec<_> = fields.difference(&known).collect();
        ensure!(
            missing.is_empty(),
            "{component} keys the chart neither sets nor allows in values.schema.json \
             ({component}.config): {missing:?}"
        );
        let unknown: Vec<_> = in_schema.difference(&fields).collect();
        ensure!(
            unknown.is_empty(),
            "values.schema.json allows {component}.config keys the binary rejects: {unknown:?}"
        );
        // The `[origin]` table is closed in the schema too: each of its keys must be typed.
        let origin_keys: BTreeSet<String> =
            (serde_json::to_value(shoal_origin::OriginConfig::default())?)
                .as_object()
                .context("origin fields")?
                .keys()
                .cloned()
                .collect();
        let origin_schema: BTreeSet<String> = schema["properties"][component]["properties"]
            ["config"]["properties"]["origin"]["properties"]
            .as_object()
            .with_context(|| format!("{component}.config.origin in the schema"))?
            .keys()
            .cloned()
            .collect();
        ensure!(
            origin_keys == origin_schema,
            "{component}.config.origin: the binary has {origin_keys:?}, values.schema.json \
             allows {origin_schema:?}"
        );
    }
    Ok(())
}
