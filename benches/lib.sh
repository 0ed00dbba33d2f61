# Shared by the scripts in benches/ (sourced, not run). The caller sets `bench_name`
# first; this defines die, repo_root, RESULTS_DIR, start and wait_ready, and stops every
# process started with `start` when the script exits (after calling
# `bench_cleanup_hook` when the script defines one).

die() {
    echo "$bench_name.sh: error: $*" >&2
    exit 1
}

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS_DIR=${RESULTS_DIR:-$(mktemp -d "/tmp/portcullis-$bench_name.XXXXXX")}
mkdir -p "$RESULTS_DIR"
# nginx workers run as nobody when started as root; let them traverse the prefix.
chmod 755 "$RESULTS_DIR"

pids=()
cleanup() {
    local pid
    if declare -F bench_cleanup_hook >/dev/null; then
        bench_cleanup_hook
    fi
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start LOG CMD...: runs CMD in the background, output to LOG; its pid lands in $started.
start() {
    local log=$1
    shift
    "$@" >"$log" 2>&1 &
    started=$!
    pids+=("$started")
}

# wait_ready NAME PID URL [SECONDS]: waits until URL answers 200 (with Host: bench.local)
# while PID lives; SECONDS (default 10) bounds the wait.
wait_ready() {
    local name=$1 pid=$2 url=$3 seconds=${4:-10} i
    for ((i = 0; i < seconds * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name exited during startup (logs in $RESULTS_DIR)"
        if [[ $(curl -s -m 5 -o /dev/null -w '%{http_code}' -H 'Host: bench.local' "$url" || true) == 200 ]]; then
            return 0
        fi
        sleep 0.1
    done
    die "$name did not answer 200 at $url within $seconds s (logs in $RESULTS_DIR)"
}
