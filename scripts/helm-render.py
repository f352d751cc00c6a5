#!/usr/bin/env python3
"""Lints and renders helm/shoal with Helm's own Go SDK (helm-python-sdk, offline) and
validates every rendered object against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict: unknown fields are errors). Two renders: the chart's defaults, and
helm/shoal/ci/all-on-values.yaml, which turns every toggle on.

With --out DIR, writes DIR/<render>/manifests.yaml (as Helm prints them) and
DIR/<render>/manifests.json (a list of objects) for tests/tests/helm_chart.rs.

The ServiceMonitor is a Prometheus Operator CRD: Kubernetes has no schema for it, so it is
checked here against the fields this chart uses (SERVICE_MONITOR_SCHEMA), strictly. Any
other kind without a schema is an error.

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
ALL_ON = CHART / "ci" / "all-on-values.yaml"
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
CRD_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}


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
    for path in sorted(manifests):
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        body = manifests[path]
        text.append(f"# Source: {path}\n{body}")
        for doc in yaml.safe_load_all(body):
            if doc:
                docs.append((path, doc))
    return docs, "---\n".join(text)


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
        docs, text = render(values)
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
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the renders under this directory")
    args = parser.parse_args()
    all_on = yaml.safe_load(ALL_ON.read_text())
    ok = check("default", None, args.out)
    ok = check("all-on", all_on, args.out) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
