# meshid container images (see docs/image.md).
#
#   docker build -t ghcr.io/meshid/meshid:0.1.0 .                     # full binary (the chart's image)
#   docker build --target agent -t ghcr.io/meshid/meshid:0.1.0-agent .  # agent only, for sidecars
#
# Both run as the distroless `nonroot` user (65532:65532) with the binary as entrypoint. The
# binary links glibc (and libgcc_s), so the runtime base is distroless/cc, on the same Debian
# release as the builder. tests/image/check.sh builds an equivalent image without a daemon.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/meshid /meshid

FROM rust:1.95-bookworm AS build-agent
WORKDIR /src
COPY . .
RUN cargo build --profile agent --no-default-features --locked && cp target/agent/meshid /meshid

# The agent-only binary: `meshid agent` and nothing else.
FROM gcr.io/distroless/cc-debian12:nonroot AS agent
COPY --from=build-agent /meshid /usr/local/bin/meshid
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshid"]
CMD ["agent"]

# The full binary (server, agent, quickstart); the default target.
FROM gcr.io/distroless/cc-debian12:nonroot AS meshid
COPY --from=build /meshid /usr/local/bin/meshid
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/meshid"]
