#!/usr/bin/env python3
"""Lints and renders helm/shoal with Helm's own Go SDK (helm-python-sdk, offline) and
validates every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors). One render of the chart's defaults, and one of each
helm/shoal/ci/NAME-values.yaml (render NAME): all-on turns every toggle on, overrides renames
and turns the defaults that are on off.

Then values the chart must refuse (REJECTED: the schema is strict, and some combinations
fail in the templates) must fail to render, with the expected message.

With --out DIR, writes DIR/<render>/manifests.yaml (as Helm prints them),
DIR/<render>/manifests.json (a list of objects) and DIR/<render>/NOTES.txt for
tests/tests/helm_chart.rs.

The ServiceMonitor and PrometheusRule are Prometheus Operator CRDs: Kubernetes has no schema
for them, so they are checked here against the fields this chart uses
(SERVICE_MONITOR_SCHEMA, PROMETHEUS_RULE_SCHEMA), strictly. Any other kind without a schema
is an error.

Exit codes: 0 all good, 1 a lint, render or validation error, 2 missing tools.

    pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
    python3 scripts/helm-render.py [--out DIR]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "shoal"
CI_VALUES = CHART / "ci"
RELEASE = "shoal"
NAMESPACE = "shoal-system"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest schemas
# kubernetes-validate ships.
KUBE_VERSIONS = ["1.27.0", "1.37.0"]
INSTALL = "pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"

try:
    import helm_python
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as e:
    print(f"helm-render: {e.name} is missing; install with: {INSTALL}", file=sys.stderr)
    sys.exit(2)

_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name", "namespace"],
            "additionalProperties": False,
            "properties": {"name": _STR, "namespace": _STR, "labels": _STR_MAP},
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchNames": {"type": "array", "items": _STR}},
                },
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["matchLabels"],
                    "properties": {"matchLabels": _STR_MAP},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": _STR,
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}
_RULE = {
    "type": "object",
    "required": ["expr"],
    "additionalProperties": False,
    "properties": {
        "alert": _STR,
        "record": _STR,
        "expr": {"type": "string", "minLength": 1},
        "for": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h|d)$"},
        "labels": _STR_MAP,
        "annotations": _STR_MAP,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["groups"],
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "additionalProperties": False,
                        "properties": {
                            "name": _STR,
                            "interval": _STR,
                            "rules": {"type": "array", "minItems": 1, "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE_SCHEMA,
}

# Values the chart must refuse, and a part of the message that says why.
REJECTED = [
    ({"joinToken": {"value": "x" * 24, "existingSecret": "s"}}, "set one"),
    ({"joinToken": {"value": "too-short"}}, "/joinToken/value"),
    ({"commonLabels": {"app.kubernetes.io/name": "x"}}, "app.kubernetes.io/name"),
    ({"agent": {"podLabels": {"app.kubernetes.io/component": "x"}}}, "app.kubernetes.io/component"),
    ({"agent": {"podSecurityContext": {"runAsUSer": 1}}}, "'runAsUSer'"),
    ({"coordinator": {"containerSecurityContext": {"readOnly": True}}}, "'readOnly'"),
    ({"coordinator": {"livenessProbe": {"periodSecond": 1}}}, "'periodSecond'"),
    ({"agent": {"extraEnv": [{"value": "no name"}]}}, "/agent/extraEnv"),
    ({"agent": {"extraVolumeMounts": [{"name": "v", "mountPath": "/m", "ro": True}]}}, "'ro'"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"namespaceOverride": "Not_A_Namespace"}, "/namespaceOverride"),
    ({"serviceAccount": {"create": True, "automount": False}}, "'automount'"),
    ({"coordinator": {"config": {"lease_ms": "ten seconds"}}}, "/coordinator/config/lease_ms"),
    ({"agent": {"config": {"upload_limit_bytes_per_sec": "200Mb"}}}, "upload_limit_bytes_per_sec"),
]


def lint(values, label):
    report = helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [
        f"{m.get('path', '')}: {m.get('error', '')}"
        for m in report.get("messages", [])
        if m.get("severity", 0) >= 2
    ] + list(report.get("errors") or [])
    for p in problems:
        print(f"helm lint ({label}): {p}", file=sys.stderr)
    return not problems


def render(values):
    chart = helm_python.Chart.load(str(CHART))
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    text = []
    notes = ""
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            notes = manifests[path]
        if not path.endswith((".yaml", ".yml")):
            continue
        body = manifests[path]
        text.append(f"# Source: {path}\n{body}")
        for doc in yaml.safe_load_all(body):
            if doc:
                docs.append((path, doc))
    return docs, "---\n".join(text), notes


def validate(path, doc):
    """Error messages for one object; empty when valid."""
    api, kind = doc.get("apiVersion"), doc.get("kind")
    where = f"{path} {kind}/{doc.get('metadata', {}).get('name')}"
    crd = CRD_SCHEMAS.get((api, kind))
    if crd is not None:
        errors = sorted(jsonschema.Draft7Validator(crd).iter_errors(doc), key=str)
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{where} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{where} (Kubernetes {version}): no schema for {api} {kind}")
    return errors


def check(label, values, out):
    ok = lint(values, label)
    try:
        docs, text, notes = render(values)
    except helm_python.HelmError as e:
        print(f"helm render ({label}): {e}", file=sys.stderr)
        return False
    kinds = {}
    for path, doc in docs:
        for error in validate(path, doc):
            print(f"invalid ({label}): {error}", file=sys.stderr)
            ok = False
        kinds[doc.get("kind")] = kinds.get(doc.get("kind"), 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    print(f"helm-render: {label}: {len(docs)} objects ({summary}) {'valid' if ok else 'INVALID'}")
    if out is not None:
        target = out / label
        target.mkdir(parents=True, exist_ok=True)
        (target / "manifests.yaml").write_text(text)
        (target / "manifests.json").write_text(json.dumps([d for _, d in docs], indent=1))
        (target / "NOTES.txt").write_text(notes)
    return ok


def check_rejected():
    chart = helm_python.Chart.load(str(CHART))
    ok = True
    for values, why in REJECTED:
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
            message = None
        except helm_python.HelmError as e:
            message = str(e)
        if message is None or why not in message:
            print(f"helm render accepts {values} (want an error about {why!r}): {message}", file=sys.stderr)
            ok = False
    print(f"helm-render: {len(REJECTED)} wrong values {'rejected' if ok else 'NOT ALL rejected'}")
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the renders under this directory")
    args = parser.parse_args()
    ok = check("default", None, args.out)
    for path in sorted(CI_VALUES.glob("*-values.yaml")):
        label = path.name.removesuffix("-values.yaml")
        ok = check(label, yaml.safe_load(path.read_text()), args.out) and ok
    ok = check_rejected() and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
