#!/usr/bin/env python3
"""Builds Shoal's container image without Docker, reproducibly: the same binary gives the
same image digest, byte for byte, on any machine.

The image is scratch plus what the binary needs and nothing else: `shoal` (debug info
stripped), the shared libraries `ldd` names (glibc, libgcc_s, libm: what distroless/cc
holds), the CA bundle for HTTPS origins, /etc/passwd and /etc/group with the non-root user
65532 `shoal`, and an empty /tmp. No shell, no package manager. The entrypoint is
`/usr/local/bin/shoal`, the user 65532:65532, as in the Dockerfile.

Reproducible: every file is written in sorted order with owner root (the data directory
65532), fixed modes and the time SOURCE_DATE_EPOCH (default: the last commit's time);
gzip carries no name or time; the config's `created` is that time too.

Output: an OCI image layout (`--out DIR`) and, with `--archive FILE`, the same as one tar
that `ctr images import`, `skopeo copy oci-archive:FILE docker://…` and `podman load`
read. Prints the manifest digest.

    cargo build --release --locked -p shoal
    python3 scripts/build-image.py --out target/image --archive target/shoal-image.tar
    skopeo copy oci:target/image:0.1.0 docker://registry.example.com/shoal/shoal:0.1.0

For another architecture, run it on such a machine with `--arch arm64` (ldd must run the
binary's own loader), or use the Dockerfile with `docker buildx build --platform
linux/amd64,linux/arm64`; see docs/OPERATIONS.md.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
UID = GID = 65532
PORTS = ["7400/tcp", "7401/udp", "7403/tcp", "7404/tcp", "9400/tcp", "9401/tcp"]


def fail(message):
    print(f"build-image: {message}", file=sys.stderr)
    sys.exit(1)


def source_date_epoch():
    if "SOURCE_DATE_EPOCH" in os.environ:
        return int(os.environ["SOURCE_DATE_EPOCH"])
    out = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"], capture_output=True, text=True
    )
    if out.returncode != 0 or not out.stdout.strip():
        fail("no SOURCE_DATE_EPOCH and no git history to take the time from")
    return int(out.stdout.strip())


def version():
    text = (ROOT / "cli" / "Cargo.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    if m:
        return m.group(1)
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.M)
    return m.group(1) if m else "0.0.0"


def libraries(binary):
    """The shared objects the binary loads, as (path in the image, file on this machine)."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in out.stdout + out.stderr:
            return []
        fail(f"ldd {binary}: {out.stderr.strip()}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            path = line.split("=>", 1)[1].strip().split(" ", 1)[0]
        else:
            path = line.split(" ", 1)[0]
        if not path.startswith("/"):
            continue  # linux-vdso: the kernel's
        host = Path(path)
        if not host.exists():
            fail(f"{path}, which the binary loads, is missing")
        libs.append((path, host.resolve()))
    return sorted(set(libs))


def stripped(binary, workdir):
    """A copy of the binary without debug info (`strip --strip-debug`: deterministic)."""
    out = workdir / "shoal"
    shutil.copyfile(binary, out)
    strip = shutil.which("strip")
    if strip is None:
        fail("strip (binutils) is missing: apt-get install binutils")
    subprocess.run([strip, "--strip-debug", str(out)], check=True)
    return out


class Layer:
    """A tar written in a fixed order with fixed metadata."""

    def __init__(self, mtime):
        self.mtime = mtime
        self.entries = {}

    def dir(self, path, mode=0o755, owner=0):
        self.entries[path] = ("dir", None, mode, owner)

    def file(self, path, data, mode=0o644, owner=0):
        parts = path.split("/")
        for i in range(1, len(parts)):
            self.entries.setdefault("/".join(parts[:i]), ("dir", None, 0o755, 0))
        self.entries[path] = ("file", data, mode, owner)

    def tar(self):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
            for path in sorted(self.entries):
                kind, data, mode, owner = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mtime = self.mtime
                info.mode = mode
                info.uid = info.gid = owner
                info.uname = info.gname = ""
                if kind == "dir":
                    info.type = tarfile.DIRTYPE
                    t.addfile(info)
                else:
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
        return buf.getvalue()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def build(args):
    binary = Path(args.binary)
    if not binary.is_file():
        fail(f"no binary at {binary}: cargo build --release --locked -p shoal")
    if not Path(CA_BUNDLE).is_file():
        fail(f"no CA bundle at {CA_BUNDLE}: apt-get install ca-certificates")
    mtime = source_date_epoch()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    blobs = out / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    work = out / ".work"
    work.mkdir()

    layer = Layer(mtime)
    layer.file("usr/local/bin/shoal", stripped(binary, work).read_bytes(), 0o755)
    for path, host in libraries(binary):
        layer.file(path.lstrip("/"), host.read_bytes(), 0o755)
    layer.file("etc/ssl/certs/ca-certificates.crt", Path(CA_BUNDLE).read_bytes())
    layer.file(
        "etc/passwd",
        f"root:x:0:0:root:/root:/sbin/nologin\nshoal:x:{UID}:{GID}:shoal:/nonexistent:/sbin/nologin\n".encode(),
    )
    layer.file("etc/group", f"root:x:0:\nshoal:x:{GID}:\n".encode())
    layer.dir("tmp", 0o1777)
    layer.dir("var/lib/shoal", 0o755, UID)
    tar = layer.tar()
    shutil.rmtree(work)
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=args.level, mtime=0, filename="") as z:
        z.write(tar)
    gz = gz.getvalue()

    def put(data):
        digest = sha256(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layer_digest = put(gz)
    created = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    config = {
        "architecture": args.arch,
        "os": "linux",
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "config": {
            "User": f"{UID}:{GID}",
            "Entrypoint": ["/usr/local/bin/shoal"],
            "Cmd": ["--help"],
            "Env": ["PATH=/usr/local/bin", f"SSL_CERT_FILE={CA_BUNDLE}"],
            "ExposedPorts": {p: {} for p in PORTS},
            "Labels": {
                "org.opencontainers.image.title": "shoal",
                "org.opencontainers.image.version": args.tag,
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar)]},
        "history": [{"created": created.strftime("%Y-%m-%dT%H:%M:%SZ"), "created_by": "scripts/build-image.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest = put(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": layer_digest,
                "size": len(gz),
            }
        ],
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest = put(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": args.arch, "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": args.tag},
            }
        ],
    }
    (out / "index.json").write_bytes(json.dumps(index, sort_keys=True, separators=(",", ":")).encode())
    (out / "oci-layout").write_bytes(b'{"imageLayoutVersion":"1.0.0"}')
    if args.archive:
        archive = Layer(mtime)
        for f in sorted(p for p in out.rglob("*") if p.is_file()):
            archive.file(str(f.relative_to(out)), f.read_bytes())
        Path(args.archive).write_bytes(archive.tar())
    print(manifest_digest)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--binary", default=str(ROOT / "target" / "release" / "shoal"))
    p.add_argument("--out", default=str(ROOT / "target" / "image"), help="OCI layout directory")
    p.add_argument("--archive", help="also write the layout as one tar (ctr images import)")
    p.add_argument("--tag", default=version(), help="the image's ref name in the layout")
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    p.add_argument("--arch", default=machine, help="OCI architecture (default: this machine's)")
    p.add_argument("--level", type=int, default=9, help="gzip level (1 is faster)")
    build(p.parse_args())


if __name__ == "__main__":
    main()
