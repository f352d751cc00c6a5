# syntax=docker/dockerfile:1
# One image for every role: `shoal coordinator`, `shoal agent`, `shoal containerd-config`
# and the client commands. The Helm chart (helm/shoal) runs it.
#
#   docker build -t registry.example.com/shoal/shoal:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# No protoc needed: protox compiles the .proto files. The cache mounts keep the registry and
# compiled dependencies between builds (BuildKit); the binary is copied out of them.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p shoal \
    && cp target/release/shoal /usr/local/bin/shoal

FROM debian:bookworm-slim
# CA roots for HTTPS origins (registries, model URLs); tar comes with the base image and
# lets `kubectl cp` copy files into a pod to `shoal push`.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 65532 shoal \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin shoal
COPY --from=build /usr/local/bin/shoal /usr/local/bin/shoal
# Non-root by default. The chart runs the agent as this user too; only its one-line
# init steps (chown of the hostPath cache, containerd hosts.toml) run as root.
USER 65532:65532
# gRPC API, QUIC (UDP), OCI mirror, agent health, coordinator and agent metrics.
EXPOSE 7400 7401/udp 7403 7404 9400 9401
ENTRYPOINT ["/usr/local/bin/shoal"]
CMD ["--help"]
