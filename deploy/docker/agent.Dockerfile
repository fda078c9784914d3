# weft-agent plus the weft CNI plugin and the reference plugins it chains,
# which the DaemonSet's init container copies to the host. The agent runs as root: it programs the host's network.
#   docker build -f deploy/docker/agent.Dockerfile -t weft/weft-agent:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weft-agent \
 && cargo rustc --profile release-shim --locked -p weft-cni --bin weft -- -C target-feature=+crt-static

FROM debian:bookworm-slim
# nft for the masquerade table; conntrack is the fallback for flushing
# released addresses when ctnetlink cannot be used. The reference plugins
# the conflist chains (portmap, bandwidth), pinned: the init container
# installs them on nodes that lack them (docs/install.md).
ARG CNI_PLUGINS_VERSION=1.1.1+ds1-3+b5
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables conntrack \
      containernetworking-plugins=${CNI_PLUGINS_VERSION} \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/weft-agent /usr/local/bin/weft-agent
COPY --from=build /src/target/release-shim/weft /usr/local/bin/weft
ENTRYPOINT ["/usr/local/bin/weft-agent"]
