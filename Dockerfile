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
# Declared bench targets must exist for cargo to read the manifest; benches/pgo.sh is
# the profile-guided build, and tests/pgo_training.rs (with its support files) its
# Kubernetes-mode training. The PGO path has run on the project's machines as
# `bash benches/pgo.sh`, not yet inside this container build.
COPY benches ./benches
COPY tests/pgo_training.rs ./tests/
COPY tests/support ./tests/support
# PGO=1 (the default): benches/pgo.sh builds an instrumented binary, trains it on
# loopback traffic in this build container (it installs wrk, nghttp2-client,
# nginx-light and llvm-19 with apt-get), and builds the release binary with the
# profile: about 15 minutes on 2 cores, for about 1.2x the keep-alive requests per
# CPU of the plain build (BENCHMARKS.md, "Profile-guided optimisation"). PGO=0:
# `cargo build --release` alone.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then \
      bash benches/pgo.sh && cp target/pgo/portcullis /portcullis; \
    else \
      cargo build --release --locked --bin portcullis && cp target/release/portcullis /portcullis; \
    fi

# glibc and libgcc only, no shell, runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /portcullis /usr/local/bin/portcullis
USER 65532:65532
EXPOSE 8080 8443 10254
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run"]
