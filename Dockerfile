# The plane's `tally` binary, every role: `docker build -t tally .`, then run `tally ingest`,
# `tally aggregator` or `tally reader` (k8s/ passes the role as the container's argument).
# Built without default features: no lab (local stack, loads, drills, benchmarks, test fixtures)
# and no AWS SDK; `scripts/check-deploy` fails if either reaches this build.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tally --no-default-features && strip target/release/tally

# Distroless: no shell or package manager at run time; runs as the image's non-root user, and the
# pods mount the root filesystem read-only (Tally writes nothing to disk in these roles).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/tally /usr/local/bin/tally
USER 65532:65532
EXPOSE 8080
# checkov:skip=CKV_DOCKER_2:No shell or curl in the image to run a check with; Kubernetes probes /healthz and /readyz.
ENTRYPOINT ["/usr/local/bin/tally"]
