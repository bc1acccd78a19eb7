# turnpike's container image (docs/DESIGN.md#container): the release binary on a distroless
# base, run as a non-root user, the spool and the default SQLite file on a volume.
#   docker build -t turnpike .
#   docker run -p 8080:8080 -v turnpike-data:/var/lib/turnpike \
#     -e OPENAI_API_KEY=sk-… -v ./turnpike.toml:/etc/turnpike/turnpike.toml:ro turnpike
# CI lints this file (hadolint) and builds the same binary with the same command.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked --bin turnpike \
 && mkdir -p /out/var/lib/turnpike

# glibc and libgcc only (the binary links nothing else: SQLite is built in, TLS is rustls).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/turnpike /usr/local/bin/turnpike
# Owned by the runtime user, so a fresh volume mounted there is writable by it.
COPY --from=build --chown=65532:65532 /out/var/lib/turnpike /var/lib/turnpike
COPY config/turnpike.toml /etc/turnpike/turnpike.toml
ENV TURNPIKE_CONFIG=/etc/turnpike/turnpike.toml \
    TURNPIKE_SERVER__BIND=0.0.0.0:8080 \
    TURNPIKE_DATABASE__URL=sqlite:///var/lib/turnpike/turnpike.db \
    TURNPIKE_ACCOUNTING__SPOOL_DIR=/var/lib/turnpike/spool \
    TURNPIKE_LOG__FORMAT=json
# The spool must outlive the container: it holds every finished turn until the database has it.
VOLUME ["/var/lib/turnpike"]
EXPOSE 8080 8081
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/turnpike", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/turnpike"]
CMD ["serve"]
