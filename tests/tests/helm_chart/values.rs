//! The values people override reach the objects: each is on in `all-on` or `overrides`, and
//! off (or its default) in another render, and both are checked.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::{Rendered, container, object, render, str_of};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The two workloads, by render: (kind, name, main container, component).
fn workloads(render: &str) -> [(&'static str, String, &'static str, &'static str); 2] {
    let prefix = if render == "overrides" {
        "edge-cache"
    } else {
        "shoal"
    };
    [
        ("DaemonSet", format!("{prefix}-agent"), "agent", "agent"),
        (
            "StatefulSet",
            format!("{prefix}-coordinator"),
            "coordinator",
            "coordinator",
        ),
    ]
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

/// The `name`s of a list (containers, volumes, env); empty when the list is absent.
fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().filter_map(|x| x["name"].as_str()).collect())
        .unwrap_or_default()
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn app_version() -> Result<String> {
    let chart = std::fs::read_to_string(super::repo().join("helm/shoal/Chart.yaml"))?;
    let line = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .context("Chart.yaml has no appVersion")?;
    Ok(line.trim().trim_matches('"').to_owned())
}

#[test]
fn images_follow_registry_tag_and_digest() -> Result<()> {
    let rendered = render()?;
    let expected = [
        ("default", format!("shoal:{}", app_version()?)),
        // global.imageRegistry replaces image.registry; the digest replaces the tag.
        ("all-on", format!("mirror.example.com/shoal/shoal@{DIGEST}")),
        (
            "overrides",
            "registry.example.com/shoal/shoal:0.1.0-ci".into(),
        ),
    ];
    for (render, image) in expected {
        let mut seen = 0;
        for (kind, name, _, _) in workloads(render) {
            let spec = pod_spec(object(rendered.objects(render), kind, &name)?);
            for c in [&spec["initContainers"], &spec["containers"]]
                .into_iter()
                .filter_map(Value::as_array)
                .flatten()
            {
                let cname = str_of(&c["name"], "container name")?;
                if cname.starts_with("wait-") || cname.starts_with("sidecar-") {
                    assert_eq!(
                        c["image"], "busybox:1.37",
                        "{render}: {cname} is the user's"
                    );
                    continue;
                }
                assert_eq!(c["image"], image.as_str(), "{render}: {name} {cname}");
                seen += 1;
            }
        }
        // agent, coordinator; all-on adds cache-owner's and containerd-hosts' images.
        let want = match render {
            "all-on" => 4,
            "default" => 3,
            _ => 2,
        };
        assert_eq!(seen, want, "{render}: containers of the chart's image");
    }
    Ok(())
}

#[test]
fn names_and_namespace_overrides_reach_every_object() -> Result<()> {
    let rendered = render()?;
    for (render, namespace, prefix, app) in [
        ("default", "shoal-system", "shoal", "shoal"),
        ("all-on", "shoal-system", "shoal", "shoal"),
        ("overrides", "shoal-override", "edge-cache", "cache"),
    ] {
        let objects = rendered.objects(render);
        ensure!(objects.len() >= 7, "{render}: {} objects", objects.len());
        for o in objects {
            let kind = str_of(&o["kind"], "kind")?;
            let name = str_of(&o["metadata"]["name"], "name")?;
            if kind == "PriorityClass" {
                ensure!(
                    o["metadata"]["namespace"].is_null(),
                    "{render}: a cluster-scoped {kind} with a namespace"
                );
            } else {
                assert_eq!(
                    o["metadata"]["namespace"], namespace,
                    "{render}: {kind}/{name} is not in the release's namespace"
                );
            }
            ensure!(
                name.starts_with(prefix),
                "{render}: {kind}/{name} is not named after {prefix}"
            );
            assert_eq!(
                o["metadata"]["labels"]["app.kubernetes.io/name"], app,
                "{render}: {kind}/{name}"
            );
        }
    }
    // The agents dial the coordinator's Service in the overridden namespace, by its new name.
    let overrides = rendered.objects("overrides");
    let map = object(overrides, "ConfigMap", "edge-cache-agent")?;
    let toml_text = str_of(&map["data"]["agent.toml"], "agent.toml")?;
    let config: toml::Table = toml::from_str(toml_text)?;
    assert_eq!(
        config["coordinator"].as_str(),
        Some("https://edge-cache-coordinator.shoal-override.svc:7400")
    );
    let monitor = object(overrides, "ServiceMonitor", "edge-cache")?;
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!(["shoal-override"])
    );
    let kinds: BTreeSet<&str> = overrides
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    for kind in [
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Service",
        "ConfigMap",
    ] {
        ensure!(
            kinds.contains(kind),
            "overrides renders no {kind}: {kinds:?}"
        );
    }
    // The Secret and the ServiceAccount are off there: no template may name the release's
    // namespace but through shoal.namespace.
    for entry in std::fs::read_dir(super::repo().join("helm/shoal/templates"))? {
        let path = entry?.path();
        let text = std::fs::read_to_string(&path)?;
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default();
        let uses = text.matches(".Release.Namespace").count();
        let allowed = usize::from(file == "_helpers.tpl");
        assert_eq!(uses, allowed, "{file} names .Release.Namespace");
    }
    Ok(())
}

#[test]
fn common_labels_pod_labels_and_annotations() -> Result<()> {
    let rendered = render()?;
    let common = [
        ("example.com/owner", "platform"),
        ("app.kubernetes.io/part-of", "ml-platform"),
    ];
    for o in rendered.objects("all-on") {
        let l = labels(&o["metadata"]["labels"]);
        for (k, v) in common {
            assert_eq!(
                l.get(k).map(String::as_str),
                Some(v),
                "all-on: {} {} lacks commonLabels",
                o["kind"],
                o["metadata"]["name"]
            );
        }
    }
    for render in ["default", "all-on"] {
        for (kind, name, _, component) in workloads(render) {
            let workload = object(rendered.objects(render), kind, &name)?;
            let template = &workload["spec"]["template"]["metadata"];
            let pod = labels(&template["labels"]);
            let own = format!("example.com/{component}");
            let on = render == "all-on";
            assert_eq!(pod.contains_key(&own), on, "{render}: {name} podLabels");
            for (k, _) in common {
                assert_eq!(pod.contains_key(k), on, "{render}: {name} commonLabels");
            }
            // Only the workload's own pods get its podLabels.
            let other = if component == "agent" {
                "example.com/coordinator"
            } else {
                "example.com/agent"
            };
            ensure!(!pod.contains_key(other), "{render}: {name} has {other}");
            // Selectors never change with labels: they are immutable after install.
            let selector = labels(&workload["spec"]["selector"]["matchLabels"]);
            assert_eq!(selector.len(), 3, "{render}: {name} selector {selector:?}");
            for (k, v) in &selector {
                assert_eq!(pod.get(k), Some(v), "{render}: {name} pods miss {k}");
            }
            let annotated = template["annotations"]["example.com/team"] == "infra";
            assert_eq!(annotated, on, "{render}: {name} podAnnotations");
        }
    }
    Ok(())
}

#[test]
fn service_account_is_created_and_used() -> Result<()> {
    let rendered = render()?;
    for (render, account, created, automount) in [
        ("default", "shoal", true, false),
        ("all-on", "shoal-ci", true, true),
        ("overrides", "preexisting", false, false),
    ] {
        let objects = rendered.objects(render);
        let accounts: Vec<_> = objects
            .iter()
            .filter(|o| o["kind"] == "ServiceAccount")
            .collect();
        if created {
            ensure!(
                accounts.len() == 1,
                "{render}: {} ServiceAccounts",
                accounts.len()
            );
            let sa = accounts[0];
            assert_eq!(sa["metadata"]["name"], account, "{render}");
            assert_eq!(sa["automountServiceAccountToken"], automount, "{render}");
            let annotated = sa["metadata"]["annotations"]["iam.example.com/role"] == "shoal";
            assert_eq!(annotated, render == "all-on", "{render}: annotations");
        } else {
            ensure!(
                accounts.is_empty(),
                "{render}: serviceAccount.create=false creates one"
            );
        }
        for (kind, name, _, _) in workloads(render) {
            let spec = pod_spec(object(objects, kind, &name)?);
            assert_eq!(spec["serviceAccountName"], account, "{render}: {name}");
            assert_eq!(
                spec["automountServiceAccountToken"], automount,
                "{render}: {name}"
            );
        }
    }
    Ok(())
}

/// The token's Secret and key each pod reads.
fn token_ref(objects: &[Value], render: &str) -> Result<Vec<(String, String)>> {
    let mut refs = Vec::new();
    for (kind, name, main, _) in workloads(render) {
        let c = container(object(objects, kind, &name)?, main)?;
        let env = c["env"].as_array().context("env")?;
        let token = env
            .iter()
            .find(|e| e["name"] == "SHOAL_JOIN_TOKEN")
            .context("no SHOAL_JOIN_TOKEN")?;
        let key = &token["valueFrom"]["secretKeyRef"];
        refs.push((
            str_of(&key["name"], "secret name")?.to_owned(),
            str_of(&key["key"], "secret key")?.to_owned(),
        ));
    }
    Ok(refs)
}

fn secrets(objects: &[Value]) -> Vec<&Value> {
    objects.iter().filter(|o| o["kind"] == "Secret").collect()
}

#[test]
fn join_token_is_stable_without_lookup_when_given() -> Result<()> {
    let (first, second) = (render()?, render()?);
    let chart_secret = ("shoal-join-token".to_owned(), "join-token".to_owned());
    for render in ["default", "all-on"] {
        assert_eq!(
            token_ref(first.objects(render), render)?,
            [chart_secret.clone(), chart_secret.clone()]
        );
    }
    // joinToken.value: the same values render the same Secret, render after render.
    let all_on = |r: &Rendered| super::join_token(r.objects("all-on"));
    assert_eq!(all_on(&first)?, "ci-join-token-not-secret");
    assert_eq!(all_on(&second)?, "ci-join-token-not-secret");
    ensure!(
        !first.notes("all-on").contains("WARNING"),
        "all-on: a warning with joinToken.value:\n{}",
        first.notes("all-on")
    );
    // Neither value nor existingSecret, and no cluster to read the Secret back from (as
    // under Argo CD): a new token every render, and NOTES.txt says so.
    let generated = super::join_token(first.objects("default"))?;
    assert_eq!(generated.len(), 48);
    assert_ne!(generated, super::join_token(second.objects("default"))?);
    let notes = first.notes("default");
    ensure!(
        notes.contains("WARNING: this render generated a new random join token")
            && notes.contains("joinToken.existingSecret")
            && notes.contains("Argo CD"),
        "default: NOTES.txt does not warn about the generated token:\n{notes}"
    );
    // existingSecret: the chart creates no Secret, and both pods read the given one.
    let overrides = first.objects("overrides");
    ensure!(
        secrets(overrides).is_empty(),
        "overrides: a Secret beside joinToken.existingSecret"
    );
    let given = ("shoal-token-from-vault".to_owned(), "token".to_owned());
    assert_eq!(token_ref(overrides, "overrides")?, [given.clone(), given]);
    ensure!(!first.notes("overrides").contains("WARNING"));
    Ok(())
}

#[test]
fn priority_classes() -> Result<()> {
    let rendered = render()?;
    for (render, agent, coordinator) in [
        ("default", Some("system-node-critical"), None),
        ("all-on", Some("shoal-agent"), Some("high")),
        ("overrides", None, None),
    ] {
        let objects = rendered.objects(render);
        for ((kind, name, _, _), want) in workloads(render).into_iter().zip([agent, coordinator]) {
            let got = pod_spec(object(objects, kind, &name)?)["priorityClassName"].as_str();
            assert_eq!(got, want, "{render}: {name}");
        }
        let created = objects.iter().any(|o| o["kind"] == "PriorityClass");
        assert_eq!(created, render == "all-on", "{render}: PriorityClass");
    }
    Ok(())
}

fn probe_summary(c: &Value, probe: &str) -> Value {
    let p = &c[probe];
    if p.is_null() {
        return Value::Null;
    }
    json!([
        p["periodSeconds"],
        p["failureThreshold"],
        p["grpc"]["port"],
        p["grpc"]["service"]
    ])
}

#[test]
fn security_contexts_and_probes_come_from_values() -> Result<()> {
    let rendered = render()?;
    let pod_default = json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
        "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}});
    let container_default = json!({"allowPrivilegeEscalation": false,
        "readOnlyRootFilesystem": true, "runAsNonRoot": true, "runAsUser": 65532,
        "runAsGroup": 65532, "capabilities": {"drop": ["ALL"]}});
    for render in ["default", "all-on", "overrides"] {
        for (kind, name, main, _) in workloads(render) {
            let workload = object(rendered.objects(render), kind, &name)?;
            let (pod, c) = (
                &pod_spec(workload)["securityContext"],
                container(workload, main)?,
            );
            let sc = &c["securityContext"];
            match render {
                "default" => {
                    assert_eq!(pod, &pod_default, "{name}");
                    assert_eq!(sc, &container_default, "{name}");
                }
                "all-on" => {
                    assert_eq!(pod["runAsUser"], 10001, "{name}");
                    assert_eq!(pod["supplementalGroups"], json!([10003]), "{name}");
                    assert_eq!(sc["runAsGroup"], 10002, "{name}");
                }
                _ => {
                    // OpenShift-like: a null drops the default, the rest stays.
                    for key in ["runAsUser", "runAsGroup", "fsGroup"] {
                        ensure!(
                            pod.get(key).is_none() && sc.get(key).is_none(),
                            "{name}: {key}"
                        );
                    }
                    assert_eq!(pod["runAsNonRoot"], true, "{name}");
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
                }
            }
        }
    }

    // The chown init container follows the agent's user, and can be turned off.
    let owner = |render: &str| -> Result<Option<Value>> {
        let ds = object(
            rendered.objects(render),
            "DaemonSet",
            &workloads(render)[0].1,
        )?;
        let init = pod_spec(ds)["initContainers"].as_array().cloned();
        Ok(init
            .unwrap_or_default()
            .into_iter()
            .find(|c| c["name"] == "cache-owner")
            .map(|c| {
                // The image has no chown: the binary's own `init-dir` does it.
                assert_eq!(c["command"][0], "/usr/local/bin/shoal", "{render}");
                assert_eq!(c["command"][1], "init-dir", "{render}");
                assert_eq!(c["command"][3], "--owner", "{render}");
                c["command"][4].clone()
            }))
    };
    assert_eq!(owner("default")?, Some(json!("65532:65532")));
    assert_eq!(owner("all-on")?, Some(json!("10001:10002")));
    assert_eq!(owner("overrides")?, None);

    // Probes: today's timings by default, the values' in all-on, off or replaced in overrides.
    let agent = |render: &str| -> Result<Value> {
        let ds = object(
            rendered.objects(render),
            "DaemonSet",
            &workloads(render)[0].1,
        )?;
        container(ds, "agent").cloned()
    };
    let coordinator = |render: &str| -> Result<Value> {
        let sts = object(
            rendered.objects(render),
            "StatefulSet",
            &workloads(render)[1].1,
        )?;
        container(sts, "coordinator").cloned()
    };
    let (ready, api) = ("shoal.agent.ready", "shoal.v1.Coordinator");
    for (c, port, service) in [
        (agent("default")?, 7404, ready),
        (coordinator("default")?, 7401, api),
    ] {
        assert_eq!(
            probe_summary(&c, "startupProbe"),
            json!([2, 150, port, null])
        );
        assert_eq!(
            probe_summary(&c, "livenessProbe"),
            json!([10, 3, port, null])
        );
        assert_eq!(
            probe_summary(&c, "readinessProbe"),
            json!([5, 2, port, service])
        );
    }
    for (c, port, service) in [
        (agent("all-on")?, 7404, ready),
        (coordinator("all-on")?, 7401, api),
    ] {
        assert_eq!(
            probe_summary(&c, "startupProbe"),
            json!([3, 200, port, null])
        );
        assert_eq!(
            probe_summary(&c, "livenessProbe"),
            json!([20, 5, port, null])
        );
        assert_eq!(
            probe_summary(&c, "readinessProbe"),
            json!([7, 4, port, service])
        );
    }
    let c = agent("overrides")?;
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        ensure!(c[probe].is_null(), "overrides: agent {probe} is on");
    }
    let c = coordinator("overrides")?;
    ensure!(c["startupProbe"].is_null(), "overrides: startupProbe is on");
    assert_eq!(
        c["livenessProbe"],
        json!({"tcpSocket": {"port": "grpc"}, "periodSeconds": 10, "timeoutSeconds": 2,
            "failureThreshold": 3})
    );
    assert_eq!(
        probe_summary(&c, "readinessProbe"),
        json!([5, 2, 7401, api])
    );
    Ok(())
}

#[test]
fn extra_env_volumes_and_containers_are_added() -> Result<()> {
    let rendered = render()?;
    for render in ["default", "all-on"] {
        let on = render == "all-on";
        for (kind, name, main, component) in workloads(render) {
            let workload = object(rendered.objects(render), kind, &name)?;
            let spec = pod_spec(workload);
            let c = container(workload, main)?;
            let env = names(&c["env"]);
            let upper = component.to_uppercase();
            let extra_env = [format!("EXTRA_{upper}"), format!("EXTRA_{upper}_FROM")];
            ensure!(
                env.contains(&"SHOAL_JOIN_TOKEN"),
                "{render}: {name} env {env:?}"
            );
            for e in &extra_env {
                assert_eq!(
                    env.contains(&e.as_str()),
                    on,
                    "{render}: {name} env {env:?}"
                );
            }
            let volume = format!("extra-{component}");
            let volumes = names(&spec["volumes"]);
            ensure!(volumes.contains(&"config"), "{render}: {name} {volumes:?}");
            assert_eq!(volumes.contains(&volume.as_str()), on, "{render}: {name}");
            let mount = c["volumeMounts"]
                .as_array()
                .context("volumeMounts")?
                .iter()
                .find(|m| m["name"] == volume.as_str());
            assert_eq!(
                mount.map(|m| &m["mountPath"]),
                on.then(|| json!(format!("/etc/extra-{component}")))
                    .as_ref(),
                "{render}: {name} extraVolumeMounts"
            );
            let init = names(&spec["initContainers"]);
            let chart_init: &[&str] = if component == "agent" {
                &["cache-owner"]
            } else {
                &[]
            };
            let wait = format!("wait-{component}");
            let mut want_init = chart_init.to_vec();
            if on {
                want_init.push(&wait);
            }
            assert_eq!(init, want_init, "{render}: {name} initContainers");
            let containers = names(&spec["containers"]);
            ensure!(
                containers.first() == Some(&main),
                "{render}: {containers:?}"
            );
            let sidecar = format!("sidecar-{component}");
            assert_eq!(
                containers.contains(&sidecar.as_str()),
                on,
                "{render}: {name}"
            );
        }
    }
    // The chart's helper containers take their resources from values too.
    let resources = |render: &str, field: &str, c: &str| -> Result<Value> {
        let ds = object(rendered.objects(render), "DaemonSet", "shoal-agent")?;
        let list = pod_spec(ds)[field].as_array().context("containers")?;
        let c = list.iter().find(|x| x["name"] == c).context("container")?;
        Ok(c["resources"]["limits"]["memory"].clone())
    };
    assert_eq!(
        resources("default", "initContainers", "cache-owner")?,
        "64Mi"
    );
    assert_eq!(
        resources("all-on", "initContainers", "cache-owner")?,
        "96Mi"
    );
    assert_eq!(
        resources("all-on", "containers", "containerd-hosts")?,
        "80Mi"
    );
    Ok(())
}
