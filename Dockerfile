# syntax=docker/dockerfile:1
# One image for every role: `shoal coordinator`, `shoal agent`, `shoal containerd-config`
# and the client commands. The Helm chart (helm/shoal) runs it.
#
# The image is scratch plus what the binary needs: `shoal` (debug info stripped), the shared
# libraries it loads (glibc, libgcc_s, libm), the CA roots for HTTPS origins, and the
# non-root user 65532. No shell, no package manager. The same file set as
# `scripts/build-image.py`, which builds it without Docker, reproducibly, and is what CI
# checks (cli/tests/image.rs).
#
#   docker build -t registry.example.com/shoal/shoal:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 \
#       -t registry.example.com/shoal/shoal:0.1.0 --push .
#
# Reproducible builds: pin the two base images by digest (FROM rust:1.95-bookworm@sha256:…)
# and build with SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) and BuildKit's
# `--output type=image,rewrite-timestamp=true`.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# No protoc needed: protox compiles the .proto files. Paths in the binary are made
# independent of where it was built. The cache mounts keep the registry and compiled
# dependencies between builds (BuildKit); the binary is copied out of them.
ENV RUSTFLAGS="--remap-path-prefix=/src=/shoal --remap-path-prefix=/usr/local/cargo=/cargo"
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p shoal \
    && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/tmp /rootfs/var/lib/shoal \
    && cp target/release/shoal /rootfs/usr/local/bin/shoal \
    && strip --strip-debug /rootfs/usr/local/bin/shoal \
    && for lib in $(ldd /rootfs/usr/local/bin/shoal | grep -o '/[^ ]*'); do \
         mkdir -p "/rootfs$(dirname "$lib")" && cp -L "$lib" "/rootfs$lib"; \
       done \
    && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
    && printf 'root:x:0:0:root:/root:/sbin/nologin\nshoal:x:65532:65532:shoal:/nonexistent:/sbin/nologin\n' > /rootfs/etc/passwd \
    && printf 'root:x:0:\nshoal:x:65532:\n' > /rootfs/etc/group \
    && chmod 1777 /rootfs/tmp && chown 65532:65532 /rootfs/var/lib/shoal

FROM scratch
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# Non-root by default. The chart runs the agent as this user too; only its init step
# (`shoal init-dir`: ownership of the hostPath cache) and containerd's hosts.toml sidecar run
# as root.
USER 65532:65532
# gRPC API, QUIC (UDP), OCI mirror, agent health, coordinator and agent metrics.
EXPOSE 7400 7401/udp 7403 7404 9400 9401
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["--help"]
