# weft-server: build with the workspace, run on a small non-root image.
#   docker build -f deploy/docker/server.Dockerfile -t weft/weft-server:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weft-server

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/weft-server /usr/local/bin/weft-server
USER 65532:65532
EXPOSE 7400 7401
ENTRYPOINT ["/usr/local/bin/weft-server"]
CMD ["serve"]
