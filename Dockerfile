# syntax=docker/dockerfile:1
# Portcullis container image. Untested on the project's machines (no container engine
# there); linted in CI with hadolint (.ci/validate-manifests).
#
#   docker build -t ghcr.io/portcullis/portcullis:0.1.0 .

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# The commit for portcullis_build_info{git_sha}; .git is not in the build context.
ARG PORTCULLIS_GIT_SHA=unknown
ENV PORTCULLIS_GIT_SHA=${PORTCULLIS_GIT_SHA}
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# Declared bench targets must exist for cargo to read the manifest.
COPY benches ./benches
RUN cargo build --release --locked --bin portcullis \
 && cp target/release/portcullis /portcullis

# glibc and libgcc only, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /portcullis /usr/local/bin/portcullis
USER 65532:65532
EXPOSE 8080 8443 10254
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run"]
