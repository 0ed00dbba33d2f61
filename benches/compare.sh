#!/usr/bin/env bash
# Portcullis vs nginx and HAProxy, side by side, on loopback.
#
# Runs wrk against (1) the upstream directly, (2) nginx as a reverse proxy, (3) HAProxy
# as a reverse proxy and (4) Portcullis, in interleaved rounds whose order rotates, all
# in front of the same upstream; prints min/median/max RPS, median p50/p99 latency,
# ratios to nginx taken within each round (min/median/max), CPU time per request of each
# process under test (/proc/PID/stat) and the peak RSS of each proxy, then the
# generated configs. Not a test and not run in CI: the numbers
# are only as quiet as the machine. See benches/README.md.
#
# Environment overrides (defaults in brackets):
#   ROUNDS [5]  DURATION [10s]  WARMUP [3s]  CONNECTIONS [64]  THREADS [2]
#   SCENARIOS ["keepalive close"]  keepalive: HTTP/1.1 keep-alive; close: a new
#             downstream connection per request (wrk -H 'Connection: close');
#             1mib: HTTP/1.1 keep-alive, 1 MiB responses (a static file upstream;
#             wrk -c MIB_CONNECTIONS), throughput in MiB/s;
#             tls-keepalive: HTTPS keep-alive (wrk, https://bench.local:PORT/);
#             tls-handshake: HTTPS, a new connection per request (see TLS_RESUME);
#             tls-full: full TLS handshakes (never resumed: benches/tls_full_client.py,
#             TLS_FULL_PROCS processes, SNI bench.local, one GET each); the client is
#             Python and may be the bottleneck, so read its CPU µs per handshake;
#             h2: HTTP/2 over TLS (h2load -c H2_CLIENTS -m H2_STREAMS);
#             accesslog: Portcullis --access-log json vs off, plain keep-alive (only
#             when `portcullis run --help` lists --access-log; skipped otherwise);
#             gateway: what the route model costs: the same Portcullis serving a plain
#             Ingress route (target portcullis, Host bench.local) and an HTTPRoute rule
#             with a header match and a RequestHeaderModifier (target portcullis-gw,
#             Host gw.bench.local), every request (nginx's too) carrying the matched
#             header, HTTP/1.1 keep-alive, once per GATEWAY_CONNECTIONS (scenarios
#             gateway-c16, gateway-c256); prints the portcullis-gw/portcullis ratios
#   GATEWAY_CONNECTIONS ["16 256"]  wrk -c for each gateway scenario
#   TLS_RESUME [1]  tls-handshake: 1 lets nginx resume sessions like Portcullis (rustls'
#             defaults) does and wrk asks it to; 0 turns resumption off in nginx only
#   H2_CLIENTS [16]  H2_STREAMS [4]  h2load -c and -m (64 streams in flight)
#   MIB_CONNECTIONS [16]  wrk -c for the 1mib scenario
#   PEERS ["nginx haproxy"]  the peers measured beside Portcullis; nginx is the one the
#             ratios are taken against and cannot be left out; haproxy is installed with
#             apt-get when missing (nbthread = Portcullis' workers, http-reuse always)
#   The TLS scenarios need bench.local to resolve to 127.0.0.1 (wrk sends the URL's
#   host as SNI, never the Host header): the script adds an /etc/hosts line when the
#   name does not resolve and removes that line on exit.
#   UPSTREAM [nginx]  nginx: a separate one-worker nginx answering `return 200 "ok\n"`;
#             echo: `portcullis echo` (JSON, heavier)
#   PIN [1]   1: wrk and the upstream on WRK_CPUS, the proxy under test on PROXY_CPUS
#             (taskset); 0: no pinning
#   WRK_CPUS [0]  PROXY_CPUS [1..nproc-1]
#   LOAD_BALANCE [p2c]  Portcullis --load-balance
#   RESULTS_DIR [a new temp dir]  results, generated configs and logs are kept here
#   NO_BUILD [0]  1: use the existing release binary (PORTCULLIS_BIN or target/release)
#   PGO [0]   1: measure the profile-guided build, target/pgo/portcullis, built first
#             with benches/pgo.sh (about 15 minutes) unless NO_BUILD=1; PORTCULLIS_BIN,
#             when set, is measured instead
#   BASELINE_BIN []  another Portcullis binary (say, main's, before a change), measured
#             as the target `portcullis-base` in the same interleaved rounds; the report
#             adds its ratio to Portcullis (plain HTTP scenarios only)
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
SCENARIOS=${SCENARIOS:-keepalive close}
TLS_RESUME=${TLS_RESUME:-1}
H2_CLIENTS=${H2_CLIENTS:-16}
TLS_FULL_PROCS=${TLS_FULL_PROCS:-2}
H2_STREAMS=${H2_STREAMS:-4}
MIB_CONNECTIONS=${MIB_CONNECTIONS:-16}
GATEWAY_CONNECTIONS=${GATEWAY_CONNECTIONS:-16 256}
PEERS=${PEERS:-nginx haproxy}
UPSTREAM=${UPSTREAM:-nginx}
PIN=${PIN:-1}
LOAD_BALANCE=${LOAD_BALANCE:-p2c}
NO_BUILD=${NO_BUILD:-0}
PGO=${PGO:-0}

bench_name=compare
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

hosts_tag="# portcullis-compare $$"
hosts_added=0
bench_cleanup_hook() {
    if ((hosts_added)); then
        # Rewrite in place (no rename: /etc/hosts may be a bind mount).
        grep -vF "$hosts_tag" /etc/hosts >"$RESULTS_DIR/hosts.new" || true
        cat "$RESULTS_DIR/hosts.new" >/etc/hosts || echo "compare.sh: remove '$hosts_tag' from /etc/hosts" >&2
    fi
}

# ---------------------------------------------------------------- tools
need_apt=()
command -v wrk >/dev/null || need_apt+=(wrk)
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
want_tls=0 want_h2=0 want_accesslog=0 want_gateway=0
# `gateway` is one scenario per connection count.
expanded=""
for scenario in $SCENARIOS; do
    if [[ $scenario == gateway ]]; then
        for c in $GATEWAY_CONNECTIONS; do expanded+=" gateway-c$c"; done
    else
        expanded+=" $scenario"
    fi
done
SCENARIOS=${expanded# }
for scenario in $SCENARIOS; do
    case $scenario in
    keepalive | close | 1mib) ;;
    gateway-c[1-9]*) want_gateway=1 ;;
    tls-keepalive | tls-handshake | tls-full) want_tls=1 ;;
    h2) want_tls=1 want_h2=1 ;;
    accesslog) want_accesslog=1 ;;
    *) die "unknown scenario $scenario" ;;
    esac
done
((want_h2)) && ! command -v h2load >/dev/null && need_apt+=(nghttp2-client)
want_haproxy=0
for peer in $PEERS; do
    case $peer in
    nginx) ;;
    haproxy) want_haproxy=1 ;;
    *) die "unknown peer $peer (PEERS takes nginx and haproxy)" ;;
    esac
done
[[ $UPSTREAM == echo && " $SCENARIOS " == *" 1mib "* ]] && die "the 1mib scenario needs UPSTREAM=nginx (it serves the file)"
[[ " $PEERS " == *" nginx "* ]] || die "PEERS must include nginx: the ratios are taken against it"
((want_haproxy)) && ! command -v haproxy >/dev/null && ! [[ -x /usr/sbin/haproxy ]] && need_apt+=(haproxy)
apt_install "${need_apt[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
# The Debian package may have started a system nginx on port 80; it does not matter
# here (this script only uses its own instances on free loopback ports).

if [[ -n ${PORTCULLIS_BIN:-} ]]; then
    PORTCULLIS=$PORTCULLIS_BIN
else
    target_dir=${CARGO_TARGET_DIR:-$repo_root/target}
    if [[ $PGO == 1 ]]; then
        PORTCULLIS=$target_dir/pgo/portcullis
        if [[ $NO_BUILD != 1 ]]; then
            echo "Building Portcullis with PGO (benches/pgo.sh)…" >&2
            env -u RESULTS_DIR bash "$repo_root/benches/pgo.sh" >&2
        fi
    else
        PORTCULLIS=$target_dir/release/portcullis
        if [[ $NO_BUILD != 1 ]]; then
            echo "Building Portcullis (cargo build --release)…" >&2
            (cd "$repo_root" && env -u OUT_DIR cargo build --release --quiet)
        fi
    fi
fi
[[ -x $PORTCULLIS ]] || die "no Portcullis binary at $PORTCULLIS"
run_help=$("$PORTCULLIS" run --help)
has_https=0 has_access_log=0
[[ $run_help == *--https-addr* ]] && has_https=1
[[ $run_help == *--access-log* ]] && has_access_log=1
((want_tls && !has_https)) && die "this build has no --https-addr: the TLS scenarios need it"
if ((want_accesslog && !has_access_log)); then
    echo "accesslog: skipped: this build has no --access-log" >&2
    want_accesslog=0
    SCENARIOS=$(tr ' ' '\n' <<<"$SCENARIOS" | grep -vx accesslog | tr '\n' ' ' || true)
fi

# ---------------------------------------------------------------- CPUs
ncpu=$(nproc)
if [[ $PIN == 1 && $ncpu -ge 2 ]]; then
    WRK_CPUS=${WRK_CPUS:-0}
    if ((ncpu == 2)); then
        PROXY_CPUS=${PROXY_CPUS:-1}
    else
        PROXY_CPUS=${PROXY_CPUS:-1-$((ncpu - 1))}
    fi
    wrk_pin=(taskset -c "$WRK_CPUS")
    proxy_pin=(taskset -c "$PROXY_CPUS")
    # The upstream shares the load generator's CPUs, so the proxy under test has its
    # own, and the direct run measures what wrk and the upstream manage together.
    upstream_pin=(taskset -c "$WRK_CPUS")
    # Worker count = CPUs the proxy may run on (what tokio would pick itself).
    workers=$(taskset -c "$PROXY_CPUS" nproc)
else
    PIN=0
    wrk_pin=()
    proxy_pin=()
    upstream_pin=()
    workers=$ncpu
fi

# ---------------------------------------------------------------- ports
# Bind port 0 for every listener at once (so they differ), print, release.
read -r p_up p_nginx p_pc p_admin p_dash p_nginx_tls p_pc_tls p_pcj p_pcj_admin p_pcj_dash p_pcj_tls p_ha p_ha_tls p_pcb p_pcb_admin p_pcb_dash p_pcb_tls < <(free_ports 17)
[[ -n ${p_pcb_tls:-} ]] || die "could not pick free ports (python3)"

# ---------------------------------------------------------------- TLS
# One certificate for both proxies: a leaf for bench.local from `portcullis certs`
# (ECDSA P-256, chained to a development CA), served by nginx from the PEM files and by
# Portcullis from the generated kubernetes.io/tls Secret (default/bench-local-tls).
nginx_tls_server=""
tls_secret=""
haproxy_tls_bind=""
haproxy_tls_global=""
mkdir -p "$RESULTS_DIR/manifests"
if ((want_tls)); then
    "$PORTCULLIS" certs --hosts bench.local --out "$RESULTS_DIR/certs" >"$RESULTS_DIR/certs.out" 2>&1 ||
        die "portcullis certs failed (see $RESULTS_DIR/certs.out)"
    cp "$RESULTS_DIR/certs/bench.local-secret.yaml" "$RESULTS_DIR/manifests/"
    chmod 644 "$RESULTS_DIR/certs/bench.local-key.pem" # nginx reads it as root anyway
    # HAProxy takes the chain and the key in one file.
    cat "$RESULTS_DIR/certs/bench.local.pem" "$RESULTS_DIR/certs/bench.local-key.pem" \
        >"$RESULTS_DIR/certs/bench.local-haproxy.pem"
    tls_secret=bench-local-tls
    if [[ $TLS_RESUME == 1 ]]; then
        # nginx's defaults are tickets on, no server-side cache; a shared cache as well
        # makes it resume TLS 1.2 session ids too, as rustls' server does by default.
        tls_resume_conf="ssl_session_cache shared:bench:10m; ssl_session_tickets on;"
        # HAProxy's defaults: tickets on and a 20000-entry session cache.
        haproxy_tls_resume=""
    else
        tls_resume_conf="ssl_session_cache off; ssl_session_tickets off;"
        haproxy_tls_resume="no-tls-tickets"
        haproxy_tls_global="tune.ssl.cachesize 0"
    fi
    haproxy_tls_bind="bind 127.0.0.1:$p_ha_tls ssl crt $RESULTS_DIR/certs/bench.local-haproxy.pem alpn h2,http/1.1 ssl-min-ver TLSv1.2 $haproxy_tls_resume"
    # Same location as the plain server; on its own port, HTTP/1.1 and h2 by ALPN.
    nginx_tls_server="
    server {
        listen 127.0.0.1:$p_nginx_tls ssl http2 backlog=4096;
        server_name bench.local;
        ssl_certificate $RESULTS_DIR/certs/bench.local.pem;
        ssl_certificate_key $RESULTS_DIR/certs/bench.local-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        $tls_resume_conf
        http2_max_concurrent_streams 128;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$host;
            proxy_set_header X-Request-ID \$request_id;
            proxy_set_header X-Real-IP \$remote_addr;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Forwarded-Port \$server_port;
            proxy_set_header X-Forwarded-Proto \$scheme;
        }
    }"
    # wrk sends the URL's host as SNI (checked: with https://127.0.0.1:PORT/ and
    # -H 'Host: bench.local' nginx sees SNI 127.0.0.1, and Portcullis would answer 421),
    # so bench.local must resolve. h2load gets --connect-to instead.
    if ! getent hosts bench.local >/dev/null; then
        echo "Adding '127.0.0.1 bench.local' to /etc/hosts (removed on exit)" >&2
        hosts_added=1
        echo "127.0.0.1 bench.local $hosts_tag" >>/etc/hosts || die "cannot write /etc/hosts"
    fi
    [[ $(getent hosts bench.local | awk '{print $1; exit}') == 127.0.0.1 ]] ||
        die "bench.local resolves to $(getent hosts bench.local), not 127.0.0.1"
fi

# ---------------------------------------------------------------- configs
write_upstream_conf "$p_up"

cat >"$RESULTS_DIR/nginx-proxy.conf" <<EOF
# nginx as the reverse proxy under test; as many workers as Portcullis has tokio
# worker threads. The X-Forwarded-* and X-Request-ID headers are what ingress-nginx
# sends, and Portcullis adds the same.
daemon off;
master_process on;
worker_processes $workers;
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
    keepalive_timeout 75s;
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
    }$nginx_tls_server
}
EOF

# HAProxy as the second peer: as many threads as Portcullis has workers, upstream
# connections reused across downstream connections (http-reuse always), the same
# request headers (X-Request-ID from uuid(), X-Forwarded-*, X-Real-IP), no logging.
cat >"$RESULTS_DIR/haproxy.cfg" <<EOF
global
    nbthread $workers
    maxconn 4096
    pidfile $RESULTS_DIR/haproxy.pid
    $haproxy_tls_global
defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s
    timeout http-request 10s
frontend bench
    bind 127.0.0.1:$p_ha backlog 4096
    $haproxy_tls_bind
    maxconn 4096
    unique-id-format %[uuid()]
    unique-id-header X-Request-ID
    option forwardfor
    http-request set-header X-Real-IP %[src]
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Forwarded-Port %[dst_port]
    http-request set-header X-Forwarded-Proto https if { ssl_fc }
    http-request set-header X-Forwarded-Proto http unless { ssl_fc }
    default_backend upstream
backend upstream
    http-reuse always
    server up 127.0.0.1:$p_up maxconn 1000
EOF

{
    ingress_yaml bench / upstream "$tls_secret"
    backend_yaml upstream "$p_up"
    ((want_gateway)) && gateway_yaml upstream
} >"$RESULTS_DIR/manifests/bench.yaml"

# ---------------------------------------------------------------- start
case $UPSTREAM in
nginx)
    start "$RESULTS_DIR/nginx-upstream.out" "${upstream_pin[@]}" "$NGINX" -p "$RESULTS_DIR" \
        -e "$RESULTS_DIR/nginx-upstream-error.log" -c "$RESULTS_DIR/nginx-upstream.conf"
    upstream_desc="nginx return 200 (1 worker)"
    ;;
echo)
    start "$RESULTS_DIR/echo.out" "${upstream_pin[@]}" env TOKIO_WORKER_THREADS=1 \
        "$PORTCULLIS" echo --listen "127.0.0.1:$p_up" --name bench
    upstream_desc="portcullis echo (1 worker)"
    ;;
*) die "UPSTREAM must be nginx or echo, not $UPSTREAM" ;;
esac
upstream_pid=$started
wait_ready upstream "$upstream_pid" "http://127.0.0.1:$p_up/"

start "$RESULTS_DIR/nginx-proxy.out" "${proxy_pin[@]}" "$NGINX" -p "$RESULTS_DIR" \
    -e "$RESULTS_DIR/nginx-proxy-error.log" -c "$RESULTS_DIR/nginx-proxy.conf"
nginx_pid=$started
wait_ready nginx "$nginx_pid" "http://127.0.0.1:$p_nginx/"
haproxy_pid=""
if ((want_haproxy)); then
    "$HAPROXY" -c -q -f "$RESULTS_DIR/haproxy.cfg" >"$RESULTS_DIR/haproxy-check.out" 2>&1 ||
        die "haproxy rejects its config (see $RESULTS_DIR/haproxy-check.out)"
    start "$RESULTS_DIR/haproxy.out" "${proxy_pin[@]}" "$HAPROXY" -db -f "$RESULTS_DIR/haproxy.cfg"
    haproxy_pid=$started
    wait_ready haproxy "$haproxy_pid" "http://127.0.0.1:$p_ha/"
fi

# Every listener on a port of its own (the default HTTPS port may be taken).
pc_https=() pcj_https=() pc_alog=()
if ((has_https)); then
    pc_https=(--https-addr "127.0.0.1:$p_pc_tls")
    pcj_https=(--https-addr "127.0.0.1:$p_pcj_tls")
fi
((has_access_log)) && pc_alog=(--access-log off)
start "$RESULTS_DIR/portcullis.log" "${proxy_pin[@]}" env RUST_LOG=warn TOKIO_WORKER_THREADS="$workers" \
    "$PORTCULLIS" run --manifests "$RESULTS_DIR/manifests" \
    --http-addr "127.0.0.1:$p_pc" --admin-addr "127.0.0.1:$p_admin" \
    --dashboard-addr "127.0.0.1:$p_dash" --load-balance "$LOAD_BALANCE" \
    --shutdown-delay 0s --shutdown-grace 2s "${pc_https[@]}" "${pc_alog[@]}"
pc_pid=$started
wait_ready portcullis "$pc_pid" "http://127.0.0.1:$p_pc/"
if ((want_gateway)); then
    # The HTTPRoute answers with the header and only with it (its match is in force).
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: gw.bench.local' \
        -H 'X-Canary: always' "http://127.0.0.1:$p_pc/" || true)
    [[ $code == 200 ]] || die "portcullis-gw: the HTTPRoute answered '$code' (logs in $RESULTS_DIR)"
    code=$(curl -s -o /dev/null -w '%{http_code}' -H 'Host: gw.bench.local' \
        "http://127.0.0.1:$p_pc/" || true)
    [[ $code == 404 ]] || die "portcullis-gw: without X-Canary the HTTPRoute answered '$code', not 404"
fi

# portcullis-gw is the same process as portcullis, asked for the HTTPRoute's host.
declare -A proc_of=([direct]=$upstream_pid [nginx]=$nginx_pid [portcullis]=$pc_pid [portcullis-gw]=$pc_pid [haproxy]=$haproxy_pid)
base_pid=""
if [[ -n ${BASELINE_BIN:-} ]]; then
    [[ -x $BASELINE_BIN ]] || die "no baseline binary at $BASELINE_BIN"
    start "$RESULTS_DIR/portcullis-base.log" "${proxy_pin[@]}" env RUST_LOG=warn TOKIO_WORKER_THREADS="$workers" \
        "$BASELINE_BIN" run --manifests "$RESULTS_DIR/manifests" \
        --http-addr "127.0.0.1:$p_pcb" --admin-addr "127.0.0.1:$p_pcb_admin" \
        --dashboard-addr "127.0.0.1:$p_pcb_dash" --load-balance "$LOAD_BALANCE" \
        --shutdown-delay 0s --shutdown-grace 2s --https-addr "127.0.0.1:$p_pcb_tls" "${pc_alog[@]}"
    base_pid=$started
    proc_of[portcullis-base]=$base_pid
    wait_ready portcullis-base "$base_pid" "http://127.0.0.1:$p_pcb/"
fi
if ((want_accesslog)); then
    # The same proxy with JSON access logs on stdout, which goes to /dev/null: the cost
    # measured is formatting and writing the line, not a disk or a terminal.
    "${proxy_pin[@]}" env RUST_LOG=warn TOKIO_WORKER_THREADS="$workers" \
        "$PORTCULLIS" run --manifests "$RESULTS_DIR/manifests" \
        --http-addr "127.0.0.1:$p_pcj" --admin-addr "127.0.0.1:$p_pcj_admin" \
        --dashboard-addr "127.0.0.1:$p_pcj_dash" --load-balance "$LOAD_BALANCE" \
        --shutdown-delay 0s --shutdown-grace 2s "${pcj_https[@]}" --access-log json \
        >/dev/null 2>"$RESULTS_DIR/portcullis-json.log" &
    pids+=("$!")
    proc_of[portcullis-json]=$!
    wait_ready portcullis-json "$!" "http://127.0.0.1:$p_pcj/"
fi
if ((want_tls)); then
    for t in nginx portcullis ${haproxy_pid:+haproxy}; do
        port=$p_nginx_tls
        [[ $t == portcullis ]] && port=$p_pc_tls
        [[ $t == haproxy ]] && port=$p_ha_tls
        code=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$RESULTS_DIR/certs/ca.pem" \
            "https://bench.local:$port/" || true)
        [[ $code == 200 ]] || die "$t over TLS: https://bench.local:$port/ answered '$code' (logs in $RESULTS_DIR)"
    done
fi

declare -A url=(
    [direct]="http://127.0.0.1:$p_up/"
    [nginx]="http://127.0.0.1:$p_nginx/"
    [portcullis]="http://127.0.0.1:$p_pc/"
    [portcullis-gw]="http://127.0.0.1:$p_pc/"
    [portcullis-json]="http://127.0.0.1:$p_pcj/"
    [portcullis-base]="http://127.0.0.1:$p_pcb/"
    [haproxy]="http://127.0.0.1:$p_ha/"
)
declare -A tls_port=([nginx]=$p_nginx_tls [portcullis]=$p_pc_tls [haproxy]=$p_ha_tls)

# ---------------------------------------------------------------- runs
# wrk's latency ("850.00us", "1.20ms", "2.00s") in milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) n /= 1000
        else if (v ~ /ms$/) n = n
        else if (v ~ /m$/) n *= 60000
        else if (v ~ /s$/) n *= 1000
        printf "%.3f", n
    }'
}

# "5s", "1m", "500ms" -> whole seconds (at least 1), for h2load -D.
to_seconds() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /ms$/) n /= 1000
        else if (v ~ /m$/) n *= 60
        else if (v ~ /h$/) n *= 3600
        n = int(n + 0.5); if (n < 1) n = 1
        print n
    }'
}

# CPU time (user + system, in clock ticks) used so far by PID and its child
# processes (nginx workers); a process' threads are included in its own figure.
clk_tck=$(getconf CLK_TCK)
cpu_ticks() {
    local total=0 p
    for p in "$1" $(pgrep -P "$1" || true); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

results=$RESULTS_DIR/results.tsv
printf 'scenario\tround\ttarget\trps\tp50_ms\tp99_ms\tcpu_us_per_req\tnon2xx\tsocket_errors\n' >"$results"
failed=0

# run SCENARIO ROUND TARGET DURATION -> appends a row (ROUND 0 = warm-up, not kept).
run() {
    local scenario=$1 round=$2 target=$3 duration=$4 out extra=() target_url p99_ms=-
    target_url=${url[$target]}
    [[ $scenario == close || $scenario == tls-handshake ]] && extra=(-H 'Connection: close')
    [[ $scenario == tls-* ]] && target_url="https://bench.local:${tls_port[$target]}/"
    local conns=$CONNECTIONS host=bench.local
    if [[ $scenario == gateway-c* ]]; then
        conns=${scenario#gateway-c}
        extra=(-H 'X-Canary: always')
        [[ $target == portcullis-gw ]] && host=gw.bench.local
    fi
    if [[ $scenario == 1mib ]]; then
        target_url="${target_url}1mib"
        conns=$MIB_CONNECTIONS
    fi
    local tool=wrk
    [[ $scenario == h2 ]] && tool=h2load
    [[ $scenario == tls-full ]] && tool=tls-full
    out=$RESULTS_DIR/$tool-$scenario-$round-$target.txt
    local cpu_before cpu_after
    cpu_before=$(cpu_ticks "${proc_of[$target]}")
    if [[ $tool == wrk ]]; then
        "${wrk_pin[@]}" wrk -t"$THREADS" -c"$conns" -d"$duration" --latency \
            -H "Host: $host" "${extra[@]}" "$target_url" >"$out" 2>&1 ||
            die "wrk failed against $target (see $out)"
    elif [[ $tool == tls-full ]]; then
        "${wrk_pin[@]}" python3 "$repo_root/benches/tls_full_client.py" "${tls_port[$target]}" \
            "$(to_seconds "$duration")" "$TLS_FULL_PROCS" >"$out" 2>&1 ||
            die "tls_full_client.py failed against $target (see $out)"
    else
        # h2load connects where --connect-to says and sends the URL's host as SNI and
        # :authority; -D takes seconds.
        "${wrk_pin[@]}" h2load -t"$THREADS" -c"$H2_CLIENTS" -m"$H2_STREAMS" \
            -D"$(to_seconds "$duration")" --connect-to="127.0.0.1:${tls_port[$target]}" \
            "https://bench.local:${tls_port[$target]}/" >"$out" 2>&1 ||
            die "h2load failed against $target (see $out)"
    fi
    cpu_after=$(cpu_ticks "${proc_of[$target]}")
    local rps p50 p99 non2xx sockerr requests
    if [[ $tool == wrk ]]; then
        rps=$(awk '/^Requests\/sec:/ {print $2}' "$out")
        p50=$(awk '$1 == "50%" {print $2}' "$out")
        p99=$(awk '$1 == "99%" {print $2}' "$out")
        non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$out")
        sockerr=$(awk -F'[ ,]+' '/Socket errors:/ {print $5 + $7 + $9 + $11}' "$out")
        requests=$(awk '/ requests in / {print $1}' "$out")
    elif [[ $tool == tls-full ]]; then
        # Handshakes per second; no latency percentiles (p50 holds the mean time per
        # handshake and request of one client process).
        requests=$(awk '$1 == "handshakes" {print $2}' "$out")
        rps=$(awk '$1 == "handshakes" && $4 > 0 {printf "%.2f", $2 / $4}' "$out")
        p50=$(awk -v procs="$TLS_FULL_PROCS" '$1 == "handshakes" && $2 > 0 {printf "%.2fms", $4 * 1000 * procs / $2}' "$out")
        p99=-
        non2xx=$(awk '$1 == "handshakes" && $6 > 0 {print $6}' "$out")
        sockerr=$(awk '$1 == "handshakes" && $8 > 0 {print $8}' "$out")
    else
        # h2load prints no percentiles: p50 holds the mean request time, p99 "-".
        rps=$(awk '/^finished in/ {print $4}' "$out")
        p50=$(awk '/^time for request:/ {print $6}' "$out")
        p99=-
        non2xx=$(awk -F'[ ,]+' '/^status codes:/ {n = $5 + $7 + $9; if (n) print n}' "$out")
        sockerr=$(awk -F'[ ,]+' '/^requests:/ {n = $10 + $12 + $14; if (n) print n}' "$out")
        requests=$(awk -F'[ ,]+' '/^requests:/ {print $6}' "$out")
    fi
    [[ -n $rps && -n $p50 && -n $p99 ]] || die "cannot parse $tool output in $out"
    local cpu_us
    cpu_us=$(awk -v t=$((cpu_after - cpu_before)) -v hz="$clk_tck" -v n="$requests" \
        'BEGIN { printf "%.1f", (n > 0 ? t * 1e6 / hz / n : 0) }')
    if [[ -n $non2xx ]]; then
        echo "compare.sh: $target ($scenario, round $round): $non2xx non-2xx responses (see $out)" >&2
        failed=1
    fi
    if ((round > 0)); then
        [[ $p99 == - ]] || p99_ms=$(to_ms "$p99")
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scenario" "$round" "$target" "$rps" \
            "$(to_ms "$p50")" "$p99_ms" "$cpu_us" "${non2xx:-0}" \
            "${sockerr:-0}" >>"$results"
    fi
    printf '  %-10s %-10s round %s  %12s req/s  p50 %9s  p99 %9s  %6s CPU us/req%s\n' "$scenario" \
        "$target" "$round" "$rps" "$p50" "$p99" "$cpu_us" "${sockerr:+  socket errors $sockerr}" >&2
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
started_at=$(date +%s)
echo "Upstream: $upstream_desc on :$p_up; nginx on :$p_nginx; HAProxy on :${haproxy_pid:+$p_ha}; Portcullis on :$p_pc" >&2
echo "Load average before: $load_before" >&2
for scenario in $SCENARIOS; do
    case $scenario in
    keepalive | close | 1mib) targets=(direct nginx ${haproxy_pid:+haproxy} portcullis ${base_pid:+portcullis-base}) ;;
    # The upstream speaks plain HTTP only: no direct run over TLS.
    tls-keepalive | tls-handshake | tls-full | h2) targets=(nginx ${haproxy_pid:+haproxy} portcullis) ;;
    accesslog) targets=(nginx portcullis portcullis-json) ;;
    gateway-c*) targets=(nginx portcullis portcullis-gw) ;;
    esac
    for t in "${targets[@]}"; do
        run "$scenario" 0 "$t" "$WARMUP"
    done
    for ((r = 1; r <= ROUNDS; r++)); do
        for ((i = 0; i < ${#targets[@]}; i++)); do
            run "$scenario" "$r" "${targets[(i + r - 1) % ${#targets[@]}]}" "$DURATION"
        done
    done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(($(date +%s) - started_at))

# ---------------------------------------------------------------- peak RSS
hwm_kib() {
    awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0
}
nginx_rss=$(hwm_kib "$nginx_pid")
nginx_workers=0
for child in $(pgrep -P "$nginx_pid" || true); do
    nginx_rss=$((nginx_rss + $(hwm_kib "$child")))
    nginx_workers=$((nginx_workers + 1))
done
pc_rss=$(hwm_kib "$pc_pid")
pcb_rss=0
[[ -n $base_pid ]] && pcb_rss=$(hwm_kib "$base_pid")
pcj_rss=0
((want_accesslog)) && pcj_rss=$(hwm_kib "${proc_of[portcullis-json]}")
ha_rss=0
[[ -n $haproxy_pid ]] && ha_rss=$(hwm_kib "$haproxy_pid")

# ---------------------------------------------------------------- report
report=$RESULTS_DIR/report.txt
{
    echo "Portcullis vs ${PEERS// / and } — $(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -n), $ncpu CPUs"
    echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, $ROUNDS interleaved rounds (order rotates); min / median / max"
    [[ " $SCENARIOS " == *" 1mib "* ]] &&
        echo "1mib: wrk -c$MIB_CONNECTIONS, GET /1mib (1,048,576-byte static file from the upstream): RPS = MiB/s"
    [[ " $SCENARIOS " == *" h2 "* ]] &&
        echo "h2: h2load -t$THREADS -c$H2_CLIENTS -m$H2_STREAMS -D$(to_seconds "$DURATION") (p50 column = mean request time, no p99)"
    ((want_gateway)) &&
        echo "gateway-cN: wrk -cN, X-Canary: always on every request; portcullis-gw = the same Portcullis, Host gw.bench.local: an HTTPRoute rule matching the header, with a RequestHeaderModifier (set, add, remove)"
    ((want_tls)) && echo "TLS: ECDSA P-256 leaf from portcullis certs; TLS_RESUME=$TLS_RESUME ($tls_resume_conf in nginx)"
    echo "upstream: $upstream_desc; proxies: $workers worker(s) each (nginx worker_processes, HAProxy nbthread, TOKIO_WORKER_THREADS)"
    if [[ $PIN == 1 ]]; then
        echo "pinning: wrk and upstream on CPU $WRK_CPUS, proxy under test on CPU $PROXY_CPUS (taskset)"
    else
        echo "pinning: none"
    fi
    echo "load average: before $load_before, after $load_after; runs took ${elapsed}s"
    echo
    awk -F'\t' -v nginx_rss="$nginx_rss" -v pc_rss="$pc_rss" -v pcj_rss="$pcj_rss" -v ha_rss="$ha_rss" -v pcb_rss="$pcb_rss" -v nw="$nginx_workers" '
        function sorted(list, a,    n, i, j, t) {
            n = split(list, a, " ")
            for (i = 1; i <= n; i++) a[i] += 0
            for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            return n
        }
        function median(list,    n, a) {
            n = sorted(list, a)
            if (n == 0) return 0
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        # "median (min–max)" with FMT for each number.
        function spread(list, fmt,    n, a) {
            n = sorted(list, a)
            if (n == 0) return "—"
            return sprintf(fmt " (" fmt "–" fmt ")", median(list), a[1], a[n])
        }
        NR == 1 { next }
        {
            s = $1; r = $2; t = $3
            if (!(s in seen)) { seen[s] = 1; order[++ns] = s }
            rps[s, t] = rps[s, t] " " $4; p50[s, t] = p50[s, t] " " $5; p99[s, t] = p99[s, t] " " $6
            cpu[s, t] = cpu[s, t] " " $7
            R[s, r, t] = $4; P[s, r, t] = $6 + 0; C[s, r, t] = $7; rounds[s, r] = 1
        }
        END {
            printf "| scenario | target | RPS median (min–max) | p50 ms | p99 ms | CPU µs/req | RPS / nginx median (min–max) | p99 / nginx | CPU / nginx | peak RSS |\n"
            printf "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
            nt = split("direct nginx haproxy portcullis portcullis-gw portcullis-json portcullis-base", ts, " ")
            for (k = 1; k <= ns; k++) {
                s = order[k]
                for (i = 1; i <= nt; i++) { q = ts[i]; rr[q] = ""; pr[q] = ""; cr[q] = "" }
                jo = ""; bo = ""; bc = ""; go = ""; gc = ""
                for (key in rounds) {
                    split(key, kk, SUBSEP)
                    if (kk[1] != s) continue
                    r = kk[2]
                    for (i = 1; i <= nt; i++) {
                        q = ts[i]
                        if (q == "nginx" || q == "direct" || R[s, r, q] == "") continue
                        if (R[s, r, "nginx"] > 0) rr[q] = rr[q] " " R[s, r, q] / R[s, r, "nginx"]
                        if (P[s, r, "nginx"] > 0) pr[q] = pr[q] " " P[s, r, q] / P[s, r, "nginx"]
                        if (C[s, r, "nginx"] > 0) cr[q] = cr[q] " " C[s, r, q] / C[s, r, "nginx"]
                    }
                    if (R[s, r, "portcullis"] > 0 && R[s, r, "portcullis-json"] != "") jo = jo " " R[s, r, "portcullis-json"] / R[s, r, "portcullis"]
                    if (R[s, r, "portcullis-base"] > 0) bo = bo " " sprintf("%.2f", R[s, r, "portcullis"] / R[s, r, "portcullis-base"])
                    if (C[s, r, "portcullis-base"] > 0) bc = bc " " sprintf("%.2f", C[s, r, "portcullis"] / C[s, r, "portcullis-base"])
                    if (R[s, r, "portcullis"] > 0 && R[s, r, "portcullis-gw"] != "") go = go " " sprintf("%.3f", R[s, r, "portcullis-gw"] / R[s, r, "portcullis"])
                    if (C[s, r, "portcullis"] > 0 && C[s, r, "portcullis-gw"] != "") gc = gc " " sprintf("%.3f", C[s, r, "portcullis-gw"] / C[s, r, "portcullis"])
                }
                for (i = 1; i <= nt; i++) {
                    t = ts[i]
                    if (rps[s, t] == "") continue
                    ratio = "—"; pratio = "—"; cratio = "—"; mem = "—"
                    if (t == "nginx") { ratio = "1.00"; pratio = P[s, 1, t] > 0 ? "1.00" : "—"; cratio = "1.00"; mem = sprintf("%.1f MiB (%d workers + master)", nginx_rss / 1024, nw) }
                    if (t != "nginx" && t != "direct") {
                        ratio = spread(rr[t], "%.2f"); cratio = sprintf("%.2f", median(cr[t]))
                        pratio = P[s, 1, t] > 0 ? sprintf("%.2f", median(pr[t])) : "—"
                        m = t == "portcullis" || t == "portcullis-gw" ? pc_rss : t == "portcullis-json" ? pcj_rss : t == "portcullis-base" ? pcb_rss : ha_rss
                        mem = sprintf("%.1f MiB", m / 1024)
                    }
                    p99s = P[s, 1, t] > 0 ? sprintf("%.2f", median(p99[s, t])) : "—"
                    printf "| %s | %s | %s | %.2f | %s | %.1f | %s | %s | %s | %s |\n", s, t, spread(rps[s, t], "%.0f"), median(p50[s, t]), p99s, median(cpu[s, t]), ratio, pratio, cratio, mem
                }
                if (jo != "") jsonoff[s] = sprintf("%.3f (per round:%s)", median(jo), jo)
                if (go != "") vsgw[s] = sprintf("RPS %.3f (per round:%s), CPU per request %.3f (per round:%s)", median(go), go, median(gc), gc)
                if (bo != "") vsbase[s] = sprintf("RPS %.2f (per round:%s), CPU per request %.2f (per round:%s)", median(bo), bo, median(bc), bc)
            }
            print ""
            print "Ratios are medians (min–max) of the per-round ratios (each proxy and nginx measured in the same round)."
            print "CPU µs/req: user+system time of the process under test (direct: the upstream) per request,"
            print "from /proc/PID/stat around each run; less sensitive than RPS to other load on the machine."
            print "Peak RSS is VmHWM after all runs; for nginx the sum over master and workers."
            for (s in jsonoff) printf "%s: RPS --access-log json / off = %s (goal: >= 0.90)\n", s, jsonoff[s]
            for (s in vsbase) printf "%s: portcullis / portcullis-base: %s\n", s, vsbase[s]
            for (s in vsgw) printf "%s: portcullis-gw / portcullis (header match + RequestHeaderModifier / plain route): %s (goal: RPS >= 0.95)\n", s, vsgw[s]
        }' "$results"
} | tee "$report"

{
    echo
    echo "----- generated nginx proxy config ($RESULTS_DIR/nginx-proxy.conf)"
    cat "$RESULTS_DIR/nginx-proxy.conf"
    if [[ -n $haproxy_pid ]]; then
        echo "----- generated HAProxy config ($RESULTS_DIR/haproxy.cfg)"
        cat "$RESULTS_DIR/haproxy.cfg"
    fi
    echo "----- generated nginx upstream config ($RESULTS_DIR/nginx-upstream.conf)"
    cat "$RESULTS_DIR/nginx-upstream.conf"
    echo "----- generated Portcullis manifests ($RESULTS_DIR/manifests/bench.yaml)"
    cat "$RESULTS_DIR/manifests/bench.yaml"
    echo "-----"
    echo "Results, wrk outputs and logs: $RESULTS_DIR"
}

if ((failed)); then
    die "some runs had non-2xx responses"
fi
