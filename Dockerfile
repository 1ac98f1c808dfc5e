# Multi-stage build: compile in the Rust image, run as a non-root user in a slim image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p starcite-server --locked

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/starcite starcite \
 && mkdir -p /var/lib/starcite \
 && chown starcite:starcite /var/lib/starcite
COPY --from=build /src/target/release/starcite /usr/local/bin/starcite
USER starcite
ENV STARCITE_BIND=0.0.0.0 \
    PORT=4000 \
    STARCITE_RAFT_DATA_DIR=/var/lib/starcite \
    STARCITE_LOG_FORMAT=json
EXPOSE 4000
VOLUME ["/var/lib/starcite"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/starcite"]
CMD ["serve"]
