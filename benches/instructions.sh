#!/usr/bin/env bash
# benches/instructions.sh — user-space instructions per proxied small GET, counted by
# callgrind, for quadrige-proxy and for nginx as the proxy, in front of the same upstream.
#
#   benches/instructions.sh        needs valgrind, nginx and wrk (apt-get install -y valgrind nginx wrk)
#
# Counts, not time: they barely move when other work shares the machine, so a change to
# the request path can be judged on a busy machine where requests/s cannot (run.sh's
# "CPU per request" moved by ±20 % between runs of the same binary there). They say
# nothing about the kernel's share of the work, which run.sh measures.
#
# Knobs (environment variables): QP_BIN (the binary to measure; default: this tree's
# release build, built if missing), MEASURE_SECS (6, wrk's run while counting),
# CONNS (64), PORT_BASE (18180; uses three ports from there). Loopback only; every
# process started is stopped on exit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")
MEASURE_SECS=${MEASURE_SECS:-6}
CONNS=${CONNS:-64}
PORT_BASE=${PORT_BASE:-18180}
UPSTREAM_PORT=$PORT_BASE NGINX_PORT=$((PORT_BASE + 1)) QP_PORT=$((PORT_BASE + 2))

die() { echo "benches/instructions.sh: $*" >&2; exit 1; }
for tool in valgrind callgrind_annotate callgrind_control wrk curl; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install -y valgrind wrk curl)"
done
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
[[ -x $NGINX_BIN ]] || die "nginx is missing (apt-get install -y nginx)"
if [[ -z ${QP_BIN:-} ]]; then
    QP_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/quadrige-proxy
    [[ -x $QP_BIN ]] || (cd "$ROOT" && cargo build --release) >&2
fi
[[ -x $QP_BIN ]] || die "$QP_BIN not built"

WORK=$(mktemp -d /tmp/quadrige-instructions.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    local rc=$?
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    if ((rc == 0)); then rm -rf "$WORK"; else echo "configs and logs kept in $WORK" >&2; fi
}
trap cleanup EXIT

# nginx with one process (no master), for the upstream and for nginx as the proxy.
nginx_conf() {
    local name=$1 server=$2 extra=${3:-}
    cat > "$WORK/$name.conf" <<EOF
worker_processes 1;
master_process off;
daemon off;
pid $WORK/$name.pid;
error_log $WORK/$name-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/$name-body;
    proxy_temp_path $WORK/$name-proxy;
    fastcgi_temp_path $WORK/$name-fastcgi;
    uwsgi_temp_path $WORK/$name-uwsgi;
    scgi_temp_path $WORK/$name-scgi;
    keepalive_requests 1000000;
    $extra
    server { $server }
}
EOF
}
nginx_conf upstream "listen 127.0.0.1:$UPSTREAM_PORT;
        location = /small { default_type application/json; return 200 '{\"status\":\"ok\",\"items\":[1,2,3]}\n'; }"
# As run.sh configures it: keep-alive to the upstream, streaming, the forwarded headers.
nginx_conf nginx-proxy "listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_buffering off;
            proxy_request_buffering off;
        }" "upstream bench_upstream { server 127.0.0.1:$UPSTREAM_PORT; keepalive 64; }"
cat > "$WORK/quadrige-proxy.toml" <<EOF
[server]
listen = ["127.0.0.1:$QP_PORT"]
workers = 1
[log]
access = "off"
level = "warn"
[upstreams.bench]
address = "127.0.0.1:$UPSTREAM_PORT"
max_idle_connections = 64
[defaults]
upstream = "bench"
EOF

wait_for() {
    local port=$1
    for _ in $(seq 1 150); do
        curl -s -o /dev/null -m 1 "http://127.0.0.1:$port/small" && return 0
        sleep 0.2
    done
    die "nothing answers on port $port"
}

"$NGINX_BIN" -c "$WORK/upstream.conf" & PIDS+=($!)
wait_for "$UPSTREAM_PORT"

# Starts `$@` under callgrind with counting off, warms it up, counts during one wrk run,
# and prints the instructions per request.
measure() {
    local name=$1 port=$2
    shift 2
    valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/$name.out" \
        "$@" > "$WORK/$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_for "$port"
    timeout 30 wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$port/small" >/dev/null
    callgrind_control -i on "$pid" >/dev/null 2>&1
    local requests
    requests=$(timeout $((MEASURE_SECS + 30)) wrk -t1 -c"$CONNS" -d"${MEASURE_SECS}s" \
        "http://127.0.0.1:$port/small" | awk '/requests in/ {print $1}')
    callgrind_control -i off "$pid" >/dev/null 2>&1
    # The dump goes to "$name.out.1"; "$name.out", written at exit, counts nothing.
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    local total
    total=$(callgrind_annotate "$WORK/$name.out.1" 2>/dev/null |
        awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
    [[ $requests =~ ^[0-9]+$ && $requests -gt 0 && $total =~ ^[0-9]+$ ]] ||
        die "no count for $name (requests '$requests', instructions '$total'; see $WORK/$name.log)"
    printf '| %s | %s | %s | %s |\n' "$name" "$requests" "$total" "$((total / requests))"
}

echo "| proxy | requests counted | instructions | instructions per request |"
echo "|---|---|---|---|"
measure quadrige-proxy "$QP_PORT" "$QP_BIN" --config "$WORK/quadrige-proxy.toml"
measure nginx "$NGINX_PORT" "$NGINX_BIN" -c "$WORK/nginx-proxy.conf"
