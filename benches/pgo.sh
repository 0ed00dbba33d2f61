#!/usr/bin/env bash
# Builds the release binary with profile-guided optimisation (PGO).
#
#   bash benches/pgo.sh            # -> target/pgo/portcullis
#
# Three steps, about 15 minutes on two cores:
#   1. an instrumented release build (RUSTFLAGS=-Cprofile-generate, target/pgo-gen);
#   2. a training run of that binary on loopback (about a minute, bounded): HTTP/1.1
#      keep-alive and a new connection per request, HTTP/2 cleartext, HTTPS with
#      HTTP/1.1 and HTTP/2, TLS handshakes, 1 MiB responses, request bodies, 404s, the
#      JSON and text access logs, manifest reloads, and the admin and dashboard
#      endpoints, in front of a one-worker nginx upstream; then Kubernetes mode against
#      the test API server (tests/pgo_training.rs: 1,000 Ingresses, Services and
#      EndpointSlices, 1,000 changes);
#   3. the release build again with the merged profile (-Cprofile-use, target/pgo),
#      copied to target/pgo/portcullis.
# The source and Cargo.toml's release profile (fat LTO) are the same as for
# `cargo build --release`; only the compiler's knowledge of which branches and calls
# are hot differs. BENCHMARKS.md ("Profile-guided optimisation") has what it changes.
#
# Environment overrides (defaults in brackets):
#   TRAIN_SECONDS [8]  the length of the main keep-alive phase; the other phases are
#                      a few seconds each
#   RESULTS_DIR [a new temp dir]  profiles, logs and the training manifests
#   LLVM_PROFDATA []   an llvm-profdata to use; else rustup's llvm-tools when installed,
#                      else the newest /usr/lib/llvm-N (N >= 19; apt-get installs llvm-19)
#
# Needs: cargo, curl, wrk, h2load (nghttp2-client) and nginx; missing Debian packages
# are installed with apt-get. All traffic stays on 127.0.0.1.
set -euo pipefail

TRAIN_SECONDS=${TRAIN_SECONDS:-8}

bench_name=pgo
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# ---------------------------------------------------------------- tools
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)

host=$(rustc -vV | sed -n 's/^host: //p')
llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[[ -n $host && -n $llvm_major ]] || die "cannot read the host triple and LLVM version from rustc -vV"

# llvm-profdata reads the raw profiles of its own LLVM version and older ones; rustc's
# LLVM writes raw profile format version 10 since LLVM 19, so Debian's llvm-19 reads
# what rustc 1.95 (LLVM 22) writes, and rustc reads the indexed profile it merges.
find_profdata() {
    local sysroot candidate best="" best_v=0 v
    if [[ -n ${LLVM_PROFDATA:-} ]]; then
        echo "$LLVM_PROFDATA"
        return
    fi
    sysroot=$(rustc --print sysroot)
    candidate="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
    if [[ -x $candidate ]]; then
        echo "$candidate"
        return
    fi
    for candidate in /usr/lib/llvm-*/bin/llvm-profdata; do
        [[ -x $candidate ]] || continue
        v=${candidate#/usr/lib/llvm-}
        v=${v%%/*}
        if ((v >= 19 && v > best_v)); then
            best=$candidate
            best_v=$v
        fi
    done
    echo "$best"
}
profdata=$(find_profdata)
[[ -n $profdata ]] || need_apt+=(llvm-19)
apt_install "${need_apt[@]}"
[[ -n $profdata ]] || profdata=$(find_profdata)
[[ -x $profdata ]] || die "no llvm-profdata (set LLVM_PROFDATA, or install llvm-19)"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

target_root=${CARGO_TARGET_DIR:-$repo_root/target}
gen_dir=$target_root/pgo-gen
use_dir=$target_root/pgo
raw_dir=$RESULTS_DIR/raw
merged=$RESULTS_DIR/portcullis.profdata
rm -rf "$raw_dir"
mkdir -p "$raw_dir" "$use_dir"

# `--target` keeps RUSTFLAGS off build scripts and proc macros: only the binary and its
# dependencies are instrumented (and later optimised with the profile).
build() {
    local dir=$1 flags=$2
    (cd "$repo_root" && env -u OUT_DIR -u CARGO_ENCODED_RUSTFLAGS CARGO_TARGET_DIR="$dir" RUSTFLAGS="$flags" \
        cargo build --release --locked --quiet --bin portcullis --target "$host")
}

# ---------------------------------------------------------------- 1. instrumented build
# A fixed default profile directory keeps the instrumented build cached between runs;
# LLVM_PROFILE_FILE (below) sends every profile of this run to $raw_dir.
echo "pgo: 1/3 instrumented build ($gen_dir)…" >&2
build "$gen_dir" "-Cprofile-generate=$gen_dir/profiles"
instrumented=$gen_dir/$host/release/portcullis
[[ -x $instrumented ]] || die "no instrumented binary at $instrumented"

# ---------------------------------------------------------------- 2. training run
# Every process of the instrumented binary writes its profile into $raw_dir when it exits.
profile_env=(LLVM_PROFILE_FILE="$raw_dir/portcullis-%p-%m.profraw")
read -r p_up p_http p_https p_admin p_dash < <(free_ports 5)
[[ -n ${p_dash:-} ]] || die "could not pick free ports (python3)"

# 64 KiB bodies sent up, taken by nginx's `return 200`.
head -c 65536 /dev/urandom >"$RESULTS_DIR/64kib.bin"
write_upstream_conf "$p_up" "client_max_body_size 2m;"

manifests=$RESULTS_DIR/manifests
rm -rf "$manifests"
mkdir -p "$manifests"
env "${profile_env[@]}" "$instrumented" certs --hosts bench.local --out "$RESULTS_DIR/certs" >"$RESULTS_DIR/certs.out" 2>&1 ||
    die "portcullis certs failed (see $RESULTS_DIR/certs.out)"
cp "$RESULTS_DIR/certs/bench.local-secret.yaml" "$manifests/"
# Two Services with an EndpointSlice each (one endpoint), a TLS host, and a path split
# made by two Ingresses on the same host.
{
    ingress_yaml bench / upstream bench-local-tls
    ingress_yaml bench-api /api api
    backend_yaml upstream "$p_up"
    backend_yaml api "$p_up"
} >"$manifests/bench.yaml"

start "$RESULTS_DIR/nginx-upstream.out" "$NGINX" -p "$RESULTS_DIR" \
    -e "$RESULTS_DIR/nginx-upstream-error.log" -c "$RESULTS_DIR/nginx-upstream.conf"
upstream=$started
wait_ready upstream "$upstream" "http://127.0.0.1:$p_up/"

# train LOG ACCESS_LOG: runs the instrumented proxy; its pid lands in $trainee.
train() {
    start "$1" env RUST_LOG=info "${profile_env[@]}" "$instrumented" run --manifests "$manifests" \
        --http-addr "127.0.0.1:$p_http" --https-addr "127.0.0.1:$p_https" \
        --admin-addr "127.0.0.1:$p_admin" --dashboard-addr "127.0.0.1:$p_dash" \
        --access-log "$2" --shutdown-delay 0s --shutdown-grace 2s
    trainee=$started
    wait_ready portcullis "$trainee" "http://127.0.0.1:$p_http/"
}

# forget PID: the process has been waited for; the exit cleanup must not signal its
# number again (it may belong to another process by then).
forget() {
    local keep=() p
    for p in "${pids[@]}"; do
        [[ $p == "$1" ]] || keep+=("$p")
    done
    pids=("${keep[@]}")
}

# stop PID: SIGTERM and wait; the profile is written when the process exits normally.
stop() {
    kill -TERM "$1"
    wait "$1" || die "the instrumented proxy exited with an error (logs in $RESULTS_DIR)"
    forget "$1"
}

# expect_profiles N: at least N raw profiles written so far (a process that cannot write
# its profile only says so on stderr and still exits 0).
expect_profiles() {
    local raws=("$raw_dir"/*.profraw)
    [[ -e ${raws[0]} && ${#raws[@]} -ge $1 ]] ||
        die "expected $1 raw profiles in $raw_dir, found $(find "$raw_dir" -name '*.profraw' | wc -l)"
}

plain=http://127.0.0.1:$p_http
# h2load connects where --connect-to says and sends the URL's host (:authority, Host,
# and SNI over TLS).
h2c_url=http://bench.local:$p_http
tls_url=https://bench.local:$p_https
quiet() { timeout 120 "$@" >>"$RESULTS_DIR/load.out" 2>&1 || die "training load failed: $* (see $RESULTS_DIR/load.out)"; }
# wk ARGS...: wrk; fails when no request completed, a connect failed, or an answer was
# not 2xx or 3xx.
wk() {
    local out
    out=$(timeout 120 wrk "$@" 2>&1) || die "wrk $* failed: $out"
    echo "$out" >>"$RESULTS_DIR/load.out"
    grep -Eq '^ *[1-9][0-9]* requests in' <<<"$out" || die "wrk $* completed no request: $out"
    ! grep -Eq 'Non-2xx|Socket errors: connect [1-9]' <<<"$out" || die "wrk $* got errors: $out"
}
# h2 PORT ARGS...: h2load to 127.0.0.1:PORT; fails unless some answers were 2xx.
h2() {
    local port=$1 out
    shift
    out=$(timeout 120 h2load --connect-to="127.0.0.1:$port" "$@" 2>&1) || die "h2load $* failed: $out"
    echo "$out" >>"$RESULTS_DIR/load.out"
    grep -q 'status codes: [1-9][0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$out" ||
        die "h2load $* got no answers or not only 2xx: $out"
}

echo "pgo: 2/3 training run (about a minute)…" >&2
train "$RESULTS_DIR/train-off.log" off
wk -t2 -c64 -d"${TRAIN_SECONDS}s" -H 'Host: bench.local' "$plain/"
wk -t2 -c32 -d2s -H 'Host: bench.local' "$plain/api/users?page=2"
wk -t2 -c32 -d3s -H 'Host: bench.local' -H 'Connection: close' "$plain/"
wk -t2 -c16 -d2s -H 'Host: bench.local' "$plain/1mib"
quiet wrk -t1 -c8 -d1s -H 'Host: nowhere.example' "$plain/"
h2 "$p_http" -c16 -m4 -D3 "$h2c_url/"
h2 "$p_https" --h1 -c16 -D3 "$tls_url/"
h2 "$p_https" -c16 -m4 -D3 "$tls_url/"
for _ in 1 2 3 4 5 6 7 8 9 10; do
    h2 "$p_https" --h1 -c20 -n20 "$tls_url/"
done
h2 "$p_http" --h1 -c8 -n4000 -d "$RESULTS_DIR/64kib.bin" "$h2c_url/upload"
h2 "$p_https" -c4 -m4 -n2000 -d "$RESULTS_DIR/64kib.bin" "$tls_url/upload"
# Reloads: an Ingress file rewritten five times, each followed by a second of load.
for i in 1 2 3 4 5; do
    cat >"$manifests/extra.yaml" <<EOF
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: extra-$i
  namespace: default
spec:
  rules:
    - host: extra$i.bench.local
      http:
        paths:
          - path: /
            pathType: Exact
            backend:
              service:
                name: api
                port:
                  number: 80
EOF
    wk -t1 -c8 -d1s -H 'Host: bench.local' "$plain/"
done
generation=$(curl -sf -m 10 "http://127.0.0.1:$p_admin/metrics" |
    sed -n 's/^portcullis_snapshot_generation //p')
((${generation:-0} >= 3)) || die "the rewritten Ingress files were not reloaded (snapshot generation ${generation:-unknown})"
for path in /metrics /healthz /readyz; do
    quiet curl -sf -m 10 -o /dev/null "http://127.0.0.1:$p_admin$path"
done
for path in /debug/snapshot /api/v1/state /; do
    quiet curl -sf -m 10 -o /dev/null "http://127.0.0.1:$p_dash$path"
done
stop "$trainee"
expect_profiles 2 # certs, and the run above

# The access logs: JSON (in clusters) and text (the local default), written to files.
for format in json text; do
    train "$RESULTS_DIR/train-$format.log" "$format"
    wk -t2 -c64 -d2s -H 'Host: bench.local' "$plain/"
    h2 "$p_https" -c16 -m4 -D1 "$tls_url/"
    stop "$trainee"
done

# Kubernetes mode: tests/pgo_training.rs runs the instrumented binary against the test
# API server (the kube-rs list/watch path, JSON decoding, rebuilds, status writes). The
# test itself is a plain debug build.
echo "pgo: Kubernetes mode training (tests/pgo_training.rs)…" >&2
(cd "$repo_root" && env -u OUT_DIR -u RUSTFLAGS PORTCULLIS_PGO_BIN="$instrumented" \
    "${profile_env[@]}" timeout 900 cargo test --locked --quiet --test pgo_training -- --ignored) \
    >"$RESULTS_DIR/kube-training.out" 2>&1 ||
    die "the Kubernetes mode training failed (see $RESULTS_DIR/kube-training.out)"
expect_profiles 5
kill -TERM "$upstream"
wait "$upstream" || true
forget "$upstream"

shopt -s nullglob
raws=("$raw_dir"/*.profraw)
shopt -u nullglob
((${#raws[@]})) || die "the training run wrote no profile into $raw_dir"
"$profdata" merge -o "$merged" "${raws[@]}" ||
    die "$profdata cannot merge rustc's raw profiles (LLVM $llvm_major); set LLVM_PROFDATA"

# ---------------------------------------------------------------- 3. optimised build
# cargo tracks RUSTFLAGS, not the profile's content: the profile is named after its
# hash, so a new profile rebuilds every crate and the same one rebuilds nothing.
profile=$use_dir/portcullis-$(sha256sum "$merged" | cut -c1-16).profdata
if [[ ! -f $profile ]]; then
    rm -f "$use_dir"/portcullis-*.profdata
    cp "$merged" "$profile"
fi
echo "pgo: 3/3 release build with the profile ($use_dir)…" >&2
build "$use_dir" "-Cprofile-use=$profile"
cp "$use_dir/$host/release/portcullis" "$use_dir/portcullis"
echo "pgo: built $use_dir/portcullis (profile $profile from ${#raws[@]} raw profiles, merged by $profdata)"
