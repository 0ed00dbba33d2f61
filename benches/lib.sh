# Shared by the scripts in benches/ (sourced, not run). The caller sets `bench_name`
# first; this defines die, repo_root, RESULTS_DIR, start, wait_ready, apt_install,
# free_ports, write_upstream_conf, ingress_yaml, backend_yaml and gateway_yaml, and stops
# every process started with `start` when the script exits (after calling
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

# free_ports N: prints N distinct free loopback ports (bound to port 0 together, then
# released).
free_ports() {
    python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$1"
}

# write_upstream_conf PORT [HTTP_LINES]: the upstream nginx's config, written to
# $RESULTS_DIR/nginx-upstream.conf: one worker on 127.0.0.1:PORT answering
# `return 200 "ok\n"`, and /1mib from $RESULTS_DIR/1mib.bin (written here, 1 MiB of
# random bytes). HTTP_LINES go into the http block.
write_upstream_conf() {
    local port=$1 extra=${2:-}
    head -c 1048576 /dev/urandom >"$RESULTS_DIR/1mib.bin"
    chmod 644 "$RESULTS_DIR/1mib.bin"
    cat >"$RESULTS_DIR/nginx-upstream.conf" <<CONF
# The upstream: a static 200 from one nginx worker.
daemon off;
master_process on;
worker_processes 1;
pid $RESULTS_DIR/nginx-upstream.pid;
error_log $RESULTS_DIR/nginx-upstream-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $RESULTS_DIR/ut-body;
    proxy_temp_path $RESULTS_DIR/ut-proxy;
    fastcgi_temp_path $RESULTS_DIR/ut-fastcgi;
    uwsgi_temp_path $RESULTS_DIR/ut-uwsgi;
    scgi_temp_path $RESULTS_DIR/ut-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    $extra
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        location / { default_type text/plain; return 200 "ok\n"; }
        location = /1mib { default_type application/octet-stream; alias $RESULTS_DIR/1mib.bin; }
    }
}
CONF
}

# backend_yaml NAME PORT: a Service NAME (port 80 → PORT) and its EndpointSlice with
# one ready endpoint, 127.0.0.1:PORT, in namespace default (YAML documents on stdout,
# each after a `---`).
backend_yaml() {
    cat <<YAML
---
apiVersion: v1
kind: Service
metadata:
  name: $1
  namespace: default
spec:
  ports:
    - port: 80
      targetPort: $2
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $1-1
  namespace: default
  labels:
    kubernetes.io/service-name: $1
addressType: IPv4
ports:
  - port: $2
endpoints:
  - addresses: ["127.0.0.1"]
    conditions: {ready: true}
YAML
}

# gateway_yaml SERVICE: a GatewayClass and Gateway of ours (one HTTP listener on port 80)
# and an HTTPRoute for gw.bench.local whose one rule matches the header `X-Canary:
# always` on every path and sets, adds and removes request headers before forwarding to
# SERVICE port 80 (YAML documents on stdout, each after a `---`).
gateway_yaml() {
    cat <<YAML
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: portcullis
spec:
  controllerName: portcullis.io/gateway-controller
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: bench
  namespace: default
spec:
  gatewayClassName: portcullis
  listeners:
    - name: http
      protocol: HTTP
      port: 80
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: bench-gw
  namespace: default
spec:
  parentRefs:
    - name: bench
  hostnames: [gw.bench.local]
  rules:
    - matches:
        - path: {type: PathPrefix, value: /}
          headers:
            - {name: X-Canary, value: always}
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set:
              - {name: X-Route, value: bench-gw}
            add:
              - {name: X-Gateway, value: bench}
            remove: [X-Debug]
      backendRefs:
        - name: $1
          port: 80
YAML
}

# apt_install PKG...: installs the given Debian packages with apt-get; nothing when
# none are given.
apt_install() {
    (($#)) || return 0
    echo "Installing $* (apt-get)…" >&2
    apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
        "$@" >/dev/null
}

# ingress_yaml NAME PATH SERVICE [TLS_SECRET]: an Ingress NAME in namespace default
# routing host bench.local, PATH (Prefix) and below, to SERVICE port 80; with
# TLS_SECRET, a tls section for bench.local naming that Secret (a YAML document on
# stdout, after a `---`).
ingress_yaml() {
    echo "---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: $1
  namespace: default
spec:"
    if [[ -n ${4:-} ]]; then
        echo "  tls:
    - hosts: [bench.local]
      secretName: $4"
    fi
    echo "  rules:
    - host: bench.local
      http:
        paths:
          - path: $2
            pathType: Prefix
            backend:
              service:
                name: $3
                port:
                  number: 80"
}
