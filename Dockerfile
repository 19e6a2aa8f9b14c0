# feature-host: the host binary, the example plugins and specs, on a small non-root image.
#   docker build -t feature-host .
#   docker run --rm -p 8080:8080 feature-host run --events specs/examples/events.jsonl
# In Kubernetes (deploy/k8s), specs and plugins come from volumes instead of the image.

FROM rust:1.95-bookworm AS build
WORKDIR /src
RUN rustup target add wasm32-wasip2
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-plugins \
    && cargo build --release --locked -p feature-host \
    && install -D target/release/feature-host /out/feature-host \
    && mkdir -p /out/plugins \
    && for p in plugins/*/; do cp "plugins/dist/$(basename "$p" | tr - _).wasm" /out/plugins/ 2>/dev/null || true; done

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /data feature-host \
    && mkdir -p /data && chown 10001:10001 /data
COPY --from=build /out/feature-host /usr/local/bin/feature-host
COPY --from=build /out/plugins /opt/feature-host/plugins
COPY specs /opt/feature-host/specs
ENV FH_SPEC_DIR=/opt/feature-host/specs \
    FH_PLUGIN_DIR=/opt/feature-host/plugins \
    FH_DATA_DIR=/data \
    FH_ADMIN_ADDR=0.0.0.0:8080 \
    FH_LOG_FORMAT=json
USER 10001:10001
WORKDIR /opt/feature-host
EXPOSE 8080
ENTRYPOINT ["feature-host"]
CMD ["run"]
