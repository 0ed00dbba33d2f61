#!/usr/bin/env bash
# Instructions per proxied request, Portcullis vs nginx, under valgrind's callgrind.
#
# Each proxy runs under `valgrind --tool=callgrind` (Portcullis with one tokio worker,
# nginx with one worker and no master) in front of the same upstream (a one-worker nginx
# answering `return 200 "ok\n"`, not under valgrind), and h2load sends it HTTP/1.1
# keep-alive requests with small responses (`--h1 -c CLIENTS`). After WARMUP requests
# the counters are zeroed (`callgrind_control -z`), then two measured batches of
# REQUESTS and 2×REQUESTS requests are each followed by a dump (`callgrind_control -d`,
# zeroing in between); the figure printed is
#
#     (Ir(batch 2) − Ir(batch 1)) / REQUESTS
#
# so startup, warm-up and the fixed cost of a dump cancel out. User-space instructions
# only: the kernel's share (syscalls, TCP on loopback) is not in the figure; the script
# also prints syscalls per request (`strace -c -f` over a separate batch) when strace is
# installed. Unlike RPS this figure barely moves with other load on the machine.
#
# Environment overrides (defaults in brackets):
#   REQUESTS [5000]  WARMUP [1000]  CLIENTS [16]  TARGETS ["portcullis nginx"]
#   ACCESS_LOG [off]  Portcullis --access-log (off|json|text; json/text go to /dev/null)
#   RESULTS_DIR [a new temp dir]  callgrind outputs, configs and logs are kept here
#   NO_BUILD [0]  1: use the existing release binary (PORTCULLIS_BIN or target/release)
#   SYSCALLS [1]  0: skip the strace pass
# Annotate a dump: callgrind_annotate RESULTS_DIR/callgrind.portcullis.out.2
set -euo pipefail

REQUESTS=${REQUESTS:-5000}
WARMUP=${WARMUP:-1000}
CLIENTS=${CLIENTS:-16}
TARGETS=${TARGETS:-portcullis nginx}
ACCESS_LOG=${ACCESS_LOG:-off}
NO_BUILD=${NO_BUILD:-0}
SYSCALLS=${SYSCALLS:-1}

bench_name=callgrind
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_apt=()
command -v valgrind >/dev/null || need_apt+=(valgrind)
command -v h2load >/dev/null || need_apt+=(nghttp2-client)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
apt_install "${need_apt[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [[ -n ${PORTCULLIS_BIN:-} ]]; then
    PORTCULLIS=$PORTCULLIS_BIN
else
    target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
    PORTCULLIS=$target_dir/release/portcullis
    if [[ $NO_BUILD != 1 ]]; then
        echo "Building Portcullis (cargo build --release)…" >&2
        (cd "$repo_root" && env -u OUT_DIR cargo build --release --quiet)
    fi
fi
[[ -x $PORTCULLIS ]] || die "no Portcullis binary at $PORTCULLIS"

read -r p_up p_nginx p_pc p_admin p_dash p_tls < <(free_ports 6)
[[ -n ${p_tls:-} ]] || die "could not pick free ports (python3)"

write_upstream_conf "$p_up"

# The same proxy settings as benches/compare.sh, one process (no master) so that
# callgrind sees the worker.
cat >"$RESULTS_DIR/nginx-proxy.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $RESULTS_DIR/nginx-proxy.pid;
error_log $RESULTS_DIR/nginx-proxy-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $RESULTS_DIR/np-body;
    proxy_temp_path $RESULTS_DIR/np-proxy;
    fastcgi_temp_path $RESULTS_DIR/np-fastcgi;
    uwsgi_temp_path $RESULTS_DIR/np-uwsgi;
    scgi_temp_path $RESULTS_DIR/np-scgi;
    keepalive_requests 1000000;
    upstream bench_upstream {
        server 127.0.0.1:$p_up;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$p_nginx backlog=4096;
        server_name bench.local;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Request-ID \$request_id;
            proxy_set_header X-Real-IP \$remote_addr;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Forwarded-Port \$server_port;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }
}
EOF

mkdir -p "$RESULTS_DIR/manifests"
{
    ingress_yaml bench / upstream
    backend_yaml upstream "$p_up"
} >"$RESULTS_DIR/manifests/bench.yaml"



# load PORT N: N keep-alive HTTP/1.1 requests from CLIENTS connections; fails on any
# non-2xx answer.
load() {
    local port=$1 n=$2 out
    out=$RESULTS_DIR/h2load-$port-$n-$RANDOM.txt
    h2load --h1 -t1 -c"$CLIENTS" -n"$n" --connect-to="127.0.0.1:$port" \
        "http://bench.local:$port/" >"$out" 2>&1 || die "h2load failed (see $out)"
    grep -q "^status codes: $n 2xx" "$out" || die "not every request answered 2xx (see $out)"
}

# The total Ir of a callgrind dump file.
total_ir() {
    awk '/^(summary|totals):/ {print $2; exit}' "$1"
}

start "$RESULTS_DIR/nginx-upstream.out" "$NGINX" -p "$RESULTS_DIR" \
    -e "$RESULTS_DIR/nginx-upstream-error.log" -c "$RESULTS_DIR/nginx-upstream.conf"
wait_ready upstream "$started" "http://127.0.0.1:$p_up/" 120

# The environment goes before valgrind: valgrind does not follow an exec (of `env`).
export RUST_LOG=warn TOKIO_WORKER_THREADS=1
pc_cmd=("$PORTCULLIS" run
    --manifests "$RESULTS_DIR/manifests" --http-addr "127.0.0.1:$p_pc"
    --admin-addr "127.0.0.1:$p_admin" --dashboard-addr "127.0.0.1:$p_dash"
    --https-addr "127.0.0.1:$p_tls"
    --shutdown-delay 0s --shutdown-grace 2s --access-log "$ACCESS_LOG")
ng_cmd=("$NGINX" -p "$RESULTS_DIR" -e "$RESULTS_DIR/nginx-proxy-error.log"
    -c "$RESULTS_DIR/nginx-proxy.conf")

declare -A ir_per_req sys_per_req
for target in $TARGETS; do
    case $target in
    portcullis) cmd=("${pc_cmd[@]}") port=$p_pc ;;
    nginx) cmd=("${ng_cmd[@]}") port=$p_nginx ;;
    *) die "unknown target $target" ;;
    esac
    prefix=$RESULTS_DIR/callgrind.$target.out
    echo "$target: starting under callgrind…" >&2
    # The access log, when on, goes to /dev/null; valgrind's own messages to the log.
    valgrind --tool=callgrind --callgrind-out-file="$prefix" --dump-instr=no --compress-strings=no \
        --log-file="$RESULTS_DIR/valgrind.$target.log" "${cmd[@]}" \
        >/dev/null 2>"$RESULTS_DIR/$target.stderr" &
    vg_pid=$!
    pids+=("$vg_pid")
    wait_ready "$target" "$vg_pid" "http://127.0.0.1:$port/" 120
    load "$port" "$WARMUP"
    control() {
        callgrind_control "$@" "$vg_pid" >>"$RESULTS_DIR/callgrind_control.$target.log" 2>&1 ||
            die "callgrind_control $* failed (see $RESULTS_DIR/callgrind_control.$target.log)"
    }
    control -z
    load "$port" "$REQUESTS"
    control -d batch1
    control -z
    load "$port" $((2 * REQUESTS))
    control -d batch2
    kill -TERM "$vg_pid" 2>/dev/null || true
    wait "$vg_pid" 2>/dev/null || true
    mapfile -t dumps < <(ls -1v "$prefix".* 2>/dev/null | grep -E '\.[0-9]+$' || true)
    ((${#dumps[@]} >= 2)) || die "$target: expected two callgrind dumps, found ${#dumps[@]} (see $RESULTS_DIR)"
    ir1=$(total_ir "${dumps[0]}")
    ir2=$(total_ir "${dumps[1]}")
    ir_per_req[$target]=$(awk -v a="$ir1" -v b="$ir2" -v n="$REQUESTS" 'BEGIN { printf "%.0f", (b - a) / n }')
    echo "$target: Ir batch 1 ($REQUESTS req) = $ir1, batch 2 ($((2 * REQUESTS)) req) = $ir2" >&2

    if [[ $SYSCALLS == 1 ]] && command -v strace >/dev/null; then
        # Syscalls per request, outside valgrind: a batch under strace -c -f.
        start "$RESULTS_DIR/$target.plain.out" "${cmd[@]}"
        plain_pid=$started
        wait_ready "$target" "$plain_pid" "http://127.0.0.1:$port/" 120
        load "$port" "$WARMUP"
        strace -c -f -p "$plain_pid" -o "$RESULTS_DIR/strace.$target.txt" &
        st_pid=$!
        sleep 1
        load "$port" "$REQUESTS"
        kill -INT "$st_pid" 2>/dev/null || true
        wait "$st_pid" 2>/dev/null || true
        kill -TERM "$plain_pid" 2>/dev/null || true
        wait "$plain_pid" 2>/dev/null || true
        calls=$(awk '$NF == "total" {print $4 + 0}' "$RESULTS_DIR/strace.$target.txt")
        sys_per_req[$target]=$(awk -v c="${calls:-0}" -v n="$REQUESTS" 'BEGIN { printf "%.1f", c / n }')
    else
        sys_per_req[$target]=-
    fi
done

{
    echo "Instructions per proxied request — $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n)"
    echo "h2load --h1 -c$CLIENTS, keep-alive, 3-byte responses; (Ir(2×$REQUESTS) − Ir($REQUESTS)) / $REQUESTS after $WARMUP warm-up requests"
    echo "Portcullis: TOKIO_WORKER_THREADS=1, --access-log $ACCESS_LOG; nginx: 1 worker, no master, access_log off"
    echo
    echo "| target | instructions / request | syscalls / request |"
    echo "|---|---:|---:|"
    for target in $TARGETS; do
        echo "| $target | ${ir_per_req[$target]} | ${sys_per_req[$target]} |"
    done
    if [[ -n ${ir_per_req[portcullis]:-} && -n ${ir_per_req[nginx]:-} ]]; then
        awk -v p="${ir_per_req[portcullis]}" -v n="${ir_per_req[nginx]}" \
            'BEGIN { if (n > 0) printf "\nPortcullis / nginx instructions: %.2f\n", p / n }'
    fi
    echo
    echo "Results and callgrind dumps: $RESULTS_DIR"
} | tee "$RESULTS_DIR/report.txt"
