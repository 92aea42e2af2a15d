# Multi-stage build: compile in the Rust image, run in a small Debian image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin warren

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/warren warren \
    && mkdir -p /var/lib/warren && chown warren /var/lib/warren
COPY --from=build /src/target/release/warren /usr/local/bin/warren
USER warren
ENV WARREN_DATA_DIR=/var/lib/warren \
    WARREN_DEFAULT_USER_LOOPBACK_ONLY=false
VOLUME ["/var/lib/warren"]
EXPOSE 5672 15672 15692
HEALTHCHECK --interval=10s --timeout=3s CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/5672' || exit 1
ENTRYPOINT ["/usr/local/bin/warren"]
