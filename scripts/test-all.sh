#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the suite needs, then runs every
# check and test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mount >/dev/null || need_apt+=(mount)
# agent/tests/store_failing_disk.rs: a real failing fsync, ext4 on a loop device (losetup
# comes with mount).
{ command -v mkfs.ext4 && command -v filefrag; } >/dev/null || need_apt+=(e2fsprogs)
command -v ip >/dev/null || need_apt+=(iproute2)
# The Helm chart's checks (scripts/helm-render.py, tests/tests/helm_chart.rs) run Helm's Go
# SDK and the Kubernetes schemas from PyPI.
command -v python3 >/dev/null || need_apt+=(python3)
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# The OCI mirror's end-to-end tests (tests/tests/oci_tools.rs, with the fixtures in
# tests/src/{registry,oci_image,containerd}.rs) start a real registry, skopeo, containerd and ctr.
command -v /usr/bin/docker-registry >/dev/null || need_apt+=(docker-registry)
command -v skopeo >/dev/null || need_apt+=(skopeo)
{ command -v containerd && command -v ctr; } >/dev/null || need_apt+=(containerd)
# The chart's dashboard and alert rules are checked by promtool and a real Prometheus
# (cli/tests/cluster/prometheus.rs).
{ [ -x /usr/bin/prometheus ] && [ -x /usr/bin/promtool ]; } || need_apt+=(prometheus)
# scripts/build-image.py strips the binary (cli/tests/image.rs builds the image).
command -v strip >/dev/null || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "==> installing ${need_apt[*]} (apt-get)"
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "==> installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
# PyYAML also reads the CLI's `-o yaml` back in cli/tests/cluster.
helm_tools=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3)
if ! python3 - "${helm_tools[@]}" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
import helm_python, kubernetes_validate, yaml  # noqa: F401 (importable, not only installed)
sys.exit(any(version(n) != v for n, v in (a.split("==") for a in sys.argv[1:])))
PY
then
    echo "==> installing ${helm_tools[*]} (pip)"
    # Debian marks its Python as externally managed; CI machines are throwaway.
    python3 -m pip install --quiet --break-system-packages "${helm_tools[@]}"
fi

echo "==> helm chart: lint, render (defaults and every toggle on), kubernetes-validate --strict"
python3 scripts/helm-render.py
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> tests"
# Debug builds with optimised dependencies (see Cargo.toml). .config/nextest.toml kills any
# test that hangs past three minutes.
cargo nextest run --workspace --locked --no-fail-fast
