#!/usr/bin/env bash
# Memory of Portcullis beside nginx, on loopback: idle RSS, RSS per idle keep-alive
# downstream connection, and RSS with many Ingresses, Services and EndpointSlices.
#
# 1. idle: Portcullis (one Ingress) and nginx (same proxy config as compare.sh, its
#    RSS summed over master and workers) after startup and one request.
# 2. connections: CONNS downstream connections are opened to each proxy, each sends one
#    keep-alive request and reads its answer, then all stay open and idle; RSS is read
#    before and after, and the difference divided by CONNS is the cost of one idle
#    connection (upstream connections are pooled in both proxies, a few at most).
# 3. objects: Portcullis alone with OBJECTS Ingresses + Services + EndpointSlices (one
#    host, one path, one endpoint each; manifests files) once the snapshot is served.
#
# Environment overrides (defaults in brackets):
#   CONNS [10000]  OBJECTS [10000]  WORKERS [1]  proxies' worker threads / processes
#   RESULTS_DIR [a new temp dir]
#   NO_BUILD [0]  1: use the existing release binary (PORTCULLIS_BIN or target/release)
set -euo pipefail

CONNS=${CONNS:-10000}
OBJECTS=${OBJECTS:-10000}
WORKERS=${WORKERS:-1}
NO_BUILD=${NO_BUILD:-0}

bench_name=memory
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_apt=()
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

# Every connection is a descriptor in the client and in the proxy.
want_fds=$((CONNS + 1024))
ulimit -n "$want_fds" 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
(($(ulimit -n) >= want_fds)) || die "ulimit -n is $(ulimit -n); $want_fds needed for CONNS=$CONNS"

read -r p_up p_nginx p_pc p_admin p_dash p_pc2 p_admin2 p_dash2 p_tls p_tls2 < <(free_ports 10)
[[ -n ${p_tls2:-} ]] || die "could not pick free ports (python3)"

write_upstream_conf "$p_up"

cat >"$RESULTS_DIR/nginx-proxy.conf" <<EOF
daemon off;
master_process on;
worker_processes $WORKERS;
worker_rlimit_nofile $want_fds;
pid $RESULTS_DIR/nginx-proxy.pid;
error_log $RESULTS_DIR/nginx-proxy-error.log warn;
events { worker_connections $want_fds; }
http {
    access_log off;
    client_body_temp_path $RESULTS_DIR/np-body;
    proxy_temp_path $RESULTS_DIR/np-proxy;
    fastcgi_temp_path $RESULTS_DIR/np-fastcgi;
    uwsgi_temp_path $RESULTS_DIR/np-uwsgi;
    scgi_temp_path $RESULTS_DIR/np-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
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

mkdir -p "$RESULTS_DIR/manifests" "$RESULTS_DIR/many"
cat >"$RESULTS_DIR/manifests/bench.yaml" <<EOF
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bench, namespace: default}
spec:
  rules:
    - host: bench.local
      http:
        paths:
          - path: /
            pathType: Prefix
            backend: {service: {name: upstream, port: {number: 80}}}
---
apiVersion: v1
kind: Service
metadata: {name: upstream, namespace: default}
spec:
  ports: [{port: 80, targetPort: $p_up}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: upstream-1
  namespace: default
  labels: {kubernetes.io/service-name: upstream}
addressType: IPv4
ports: [{port: $p_up}]
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {ready: true}
EOF
cp "$RESULTS_DIR/manifests/bench.yaml" "$RESULTS_DIR/many/"
# OBJECTS Ingresses, Services and EndpointSlices, at most 900 documents a file (the
# manifests loader takes up to 1024 per file); distinct hosts, and distinct endpoint
# addresses inside 127.0.0.0/8 (loopback only: nothing listens there, so a request to
# one is refused, never sent off the machine).
python3 - "$RESULTS_DIR/many" "$OBJECTS" <<'PY'
import sys
out, n = sys.argv[1], int(sys.argv[2])
files = max(1, -(-n * 3 // 900))
for f in range(files):
    with open(f"{out}/objects-{f}.yaml", "w") as fh:
        for i in range(f, n, files):
            ip = f"127.{1 + ((i >> 16) & 127)}.{(i >> 8) & 255}.{i & 255}"
            fh.write(f"""---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: app-{i}, namespace: ns-{i % 100}, creationTimestamp: "2025-01-01T00:00:00Z"}}
spec:
  rules:
    - host: app-{i}.example.com
      http:
        paths:
          - path: /api
            pathType: Prefix
            backend: {{service: {{name: svc-{i}, port: {{number: 80}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc-{i}, namespace: ns-{i % 100}}}
spec:
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: svc-{i}-1
  namespace: ns-{i % 100}
  labels: {{kubernetes.io/service-name: svc-{i}}}
addressType: IPv4
ports: [{{port: 8080}}]
endpoints:
  - addresses: ["{ip}"]
    conditions: {{ready: true}}
""")
PY



# RSS in KiB of PID and its child processes.
rss_kib() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Opens CONNS connections to PORT, one keep-alive request each, and holds them open
# until stdin closes; prints "ready" once all are idle.
hold_connections() {
    python3 -u - "$1" "$CONNS" <<'PY'
import asyncio, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
REQ = b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n"
async def one(sem):
    async with sem:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(REQ)
        await w.drain()
        head = await r.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:40]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await r.readexactly(length)
        return w
async def main():
    sem = asyncio.Semaphore(200)
    writers = await asyncio.wait_for(asyncio.gather(*(one(sem) for _ in range(n))), 300)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.close()
asyncio.run(main())
PY
}

# measure NAME PID PORT -> "idle_kib with_conns_kib per_conn_bytes"
measure() {
    local name=$1 pid=$2 port=$3 idle after fifo holder
    sleep 1
    idle=$(rss_kib "$pid")
    fifo=$RESULTS_DIR/hold-$name.fifo
    mkfifo "$fifo"
    hold_connections "$port" <"$fifo" >"$RESULTS_DIR/hold-$name.out" 2>&1 &
    holder=$!
    exec {keep}>"$fifo"
    local i
    for ((i = 0; i < 3000; i++)); do
        grep -q ready "$RESULTS_DIR/hold-$name.out" 2>/dev/null && break
        kill -0 "$holder" 2>/dev/null || die "$name: holding connections failed (see $RESULTS_DIR/hold-$name.out)"
        sleep 0.1
    done
    grep -q ready "$RESULTS_DIR/hold-$name.out" || die "$name: connections not ready in time"
    sleep 2
    after=$(rss_kib "$pid")
    exec {keep}>&-
    wait "$holder" 2>/dev/null || true
    echo "$idle $after $(((after - idle) * 1024 / CONNS))"
}

start "$RESULTS_DIR/nginx-upstream.out" "$NGINX" -p "$RESULTS_DIR" \
    -e "$RESULTS_DIR/nginx-upstream-error.log" -c "$RESULTS_DIR/nginx-upstream.conf"
wait_ready upstream "$started" "http://127.0.0.1:$p_up/" 60

start "$RESULTS_DIR/nginx-proxy.out" "$NGINX" -p "$RESULTS_DIR" \
    -e "$RESULTS_DIR/nginx-proxy-error.log" -c "$RESULTS_DIR/nginx-proxy.conf"
nginx_pid=$started
wait_ready nginx "$nginx_pid" "http://127.0.0.1:$p_nginx/" 60
read -r ng_idle ng_conns ng_per < <(measure nginx "$nginx_pid" "$p_nginx")

start "$RESULTS_DIR/portcullis.log" env RUST_LOG=warn TOKIO_WORKER_THREADS="$WORKERS" \
    "$PORTCULLIS" run --manifests "$RESULTS_DIR/manifests" \
    --http-addr "127.0.0.1:$p_pc" --admin-addr "127.0.0.1:$p_admin" \
    --dashboard-addr "127.0.0.1:$p_dash" --https-addr "127.0.0.1:$p_tls" --access-log off \
    --shutdown-delay 0s --shutdown-grace 2s
pc_pid=$started
wait_ready portcullis "$pc_pid" "http://127.0.0.1:$p_pc/" 60
read -r pc_idle pc_conns pc_per < <(measure portcullis "$pc_pid" "$p_pc")

start "$RESULTS_DIR/portcullis-many.log" env RUST_LOG=warn TOKIO_WORKER_THREADS="$WORKERS" \
    "$PORTCULLIS" run --manifests "$RESULTS_DIR/many" \
    --http-addr "127.0.0.1:$p_pc2" --admin-addr "127.0.0.1:$p_admin2" \
    --dashboard-addr "127.0.0.1:$p_dash2" --https-addr "127.0.0.1:$p_tls2" --access-log off \
    --shutdown-delay 0s --shutdown-grace 2s
many_pid=$started
wait_ready portcullis-many "$many_pid" "http://127.0.0.1:$p_pc2/" 60
code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: app-$((OBJECTS - 1)).example.com" \
    "http://127.0.0.1:$p_pc2/api" || true)
# The last object's endpoint is a loopback address nobody serves: 502 means it was routed.
[[ $code == 502 ]] || die "portcullis-many: app-$((OBJECTS - 1)) not routed (answered '$code')"
sleep 2
many_rss=$(rss_kib "$many_pid")
many_hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$many_pid/status")

mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }
{
    echo "Memory — $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n); $WORKERS worker(s) each"
    echo
    echo "| measure | Portcullis | nginx (master + workers) | Portcullis / nginx |"
    echo "|---|---:|---:|---:|"
    echo "| idle RSS (after one request) | $(mib "$pc_idle") | $(mib "$ng_idle") | $(awk -v a="$pc_idle" -v b="$ng_idle" 'BEGIN { printf "%.2f", a / b }') |"
    echo "| RSS with $CONNS idle keep-alive connections | $(mib "$pc_conns") | $(mib "$ng_conns") | $(awk -v a="$pc_conns" -v b="$ng_conns" 'BEGIN { printf "%.2f", a / b }') |"
    echo "| per idle connection | $pc_per B | $ng_per B | $(awk -v a="$pc_per" -v b="$ng_per" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }') |"
    echo "| $OBJECTS Ingresses + Services + EndpointSlices loaded (RSS / peak) | $(mib "$many_rss") / $(mib "$many_hwm") | — | — |"
    echo
    echo "Results and logs: $RESULTS_DIR"
} | tee "$RESULTS_DIR/report.txt"
