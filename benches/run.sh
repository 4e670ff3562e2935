#!/usr/bin/env bash
# benches/run.sh — quadrige-proxy side by side with nginx and Apache (issue 5).
#
#   benches/run.sh            installs what is missing, builds, measures, writes benches/RESULTS.md
#
# One fast upstream (nginx: a tiny JSON answer, a 1 GiB file, an upload sink) and in front
# of it nginx, Apache (mpm_event + mod_proxy_http) and quadrige-proxy, all on loopback;
# each of them also has a TLS listener (a self-signed ECDSA P-256 certificate made per run).
# Every load is bounded in count and time, and the measurement phase is stopped after
# MAX_SECONDS whatever happens. Every process this script starts is stopped on exit.
# See benches/README.md for what each figure means and the fairness notes.
#
# Knobs (environment variables): DURATION (s per wrk run, 5), ROUNDS (3), CONNS (64),
# SLOW_CLIENTS (256), SLOW_SECS (20), SLOW_RATE (1M), IDLE_CONNS (10000),
# TRANSFER_MAX_SECS (30), CLIENT_CPU (0), SERVER_CPU (1), QP_WORKERS (1),
# APACHE_THREADS (320), PORT_BASE (18080: uses PORT_BASE..PORT_BASE+7), MAX_SECONDS (600),
# TLS_REQUESTS (300 sequential new TLS connections per target and round, for the time to
# first byte), TLS_MAX_SECS (30, bounds those), TLS_CONCURRENCY (4 client processes for the
# new-TLS-connection rate; 0 skips it), TLS_RATE_SECS (3, per rate run),
# BENCH_CACHE_DIR (/var/tmp/quadrige-bench, holds the 1 GiB file), RESULTS (file written),
# NO_INSTALL=1, NO_BUILD=1, QP_BIN (a quadrige-proxy binary to use instead of building
# this tree; QP_DESC then says what it is, e.g. a commit), KEEP_WORK=1 (keep the run's configs and logs),
# ONLY="get post close tls transfer slow idle" (a subset of the phases; the report then
# only has those rows filled).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$BENCH_DIR")

DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
SLOW_CLIENTS=${SLOW_CLIENTS:-256}
SLOW_SECS=${SLOW_SECS:-20}
SLOW_RATE=${SLOW_RATE:-1M}
IDLE_CONNS=${IDLE_CONNS:-10000}
TRANSFER_MAX_SECS=${TRANSFER_MAX_SECS:-30}
CLIENT_CPU=${CLIENT_CPU:-0}
SERVER_CPU=${SERVER_CPU:-1}
QP_WORKERS=${QP_WORKERS:-1}
APACHE_THREADS=${APACHE_THREADS:-320}
PORT_BASE=${PORT_BASE:-18080}
MAX_SECONDS=${MAX_SECONDS:-600}
TLS_REQUESTS=${TLS_REQUESTS:-300}
TLS_MAX_SECS=${TLS_MAX_SECS:-30}
TLS_CONCURRENCY=${TLS_CONCURRENCY:-4}
TLS_RATE_SECS=${TLS_RATE_SECS:-3}
CACHE_DIR=${BENCH_CACHE_DIR:-/var/tmp/quadrige-bench}
RESULTS=${RESULTS:-$BENCH_DIR/RESULTS.md}
ONLY=${ONLY:-get post close tls transfer slow idle}
PYTHON=${PYTHON:-$(command -v python3 || true)}

TARGETS=(upstream nginx apache quadrige)
PROXIES=(nginx apache quadrige)
declare -A PORT=([upstream]=$PORT_BASE [nginx]=$((PORT_BASE + 1)) [apache]=$((PORT_BASE + 2)) [quadrige]=$((PORT_BASE + 3)))
# The TLS listeners, in the same order (the proxies' go to the same upstream /small; the
# upstream's serves /small itself): PORT_BASE+4..+7.
declare -A TLS_PORT=([upstream]=$((PORT_BASE + 4)) [nginx]=$((PORT_BASE + 5)) [apache]=$((PORT_BASE + 6)) [quadrige]=$((PORT_BASE + 7)))
declare -A PID=()
CLIENT_PIDS=()
WATCHDOG=""
WORK=""
UPLOADS=""
BIG_SIZE=$((1 << 30))

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
has_phase() { [[ " $ONLY " == *" $1 "* ]]; }
for phase in $ONLY; do
    case $phase in get | post | close | tls | transfer | slow | idle) ;; *) die "unknown phase '$phase' in ONLY (get post close tls transfer slow idle)" ;; esac
done

# --- cleanup: every process we started, by its id (servers by their own process group) ---
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $WATCHDOG ]]; then kill "$WATCHDOG" 2>/dev/null; wait "$WATCHDOG" 2>/dev/null; fi
    for pid in "${CLIENT_PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for t in "${!PID[@]}"; do stop_server "$t"; done
    for pid in "${CLIENT_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    [[ -n $UPLOADS && -d $UPLOADS ]] && rm -rf "$UPLOADS"
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${KEEP_WORK:-0} == 1 || $rc != 0 ]]; then log "configs and logs kept in $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# --- 1. tools -----------------------------------------------------------------------------
find_apache() {
    APACHE_BIN=$(command -v apache2 || command -v httpd || { [[ -x /usr/sbin/apache2 ]] && echo /usr/sbin/apache2; } || true)
    APACHE_MODULES=""
    for d in /usr/lib/apache2/modules /usr/lib64/httpd/modules /usr/lib/httpd/modules /usr/libexec/apache2; do
        if [[ -f $d/mod_mpm_event.so && -f $d/mod_proxy_http.so ]]; then APACHE_MODULES=$d; break; fi
    done
}
install_tools() {
    local missing=()
    command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
    find_apache
    [[ -n $APACHE_BIN && -n $APACHE_MODULES ]] || missing+=(apache2)
    command -v wrk >/dev/null || missing+=(wrk)
    command -v curl >/dev/null || missing+=(curl)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v taskset >/dev/null || missing+=(util-linux)
    [[ -n $PYTHON ]] || missing+=(python3)
    ((${#missing[@]})) || return 0
    [[ ${NO_INSTALL:-0} != 1 ]] || die "missing: ${missing[*]} (NO_INSTALL=1)"
    [[ $EUID == 0 ]] || die "missing: ${missing[*]}; run as root, or install them with apt-get"
    log "installing ${missing[*]} (apt-get update once, then apt-get install -y)"
    # Do not let the packages start their system services on port 80 while we install.
    local policy_added=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
    fi
    local ok=1
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 || ok=0
    ((policy_added)) && rm -f /usr/sbin/policy-rc.d
    ((ok)) || die "apt-get install ${missing[*]} failed"
    PYTHON=${PYTHON:-$(command -v python3)}
    find_apache
}
install_tools
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
"$NGINX_BIN" -V 2>&1 | grep -q http_dav_module || die "this nginx has no http_dav_module (the upload sink needs it): install the 'nginx' package"
[[ -n $APACHE_BIN && -n $APACHE_MODULES ]] || die "Apache or its mod_mpm_event/mod_proxy_http not found"
"$NGINX_BIN" -V 2>&1 | grep -q http_ssl_module || die "this nginx has no http_ssl_module (the TLS listener needs it)"
[[ -f $APACHE_MODULES/mod_ssl.so && -f $APACHE_MODULES/mod_socache_shmcb.so ]] || die "Apache's mod_ssl or mod_socache_shmcb not found in $APACHE_MODULES"
"$PYTHON" -c 'import ssl; assert ssl.HAS_TLSv1_3' 2>/dev/null || die "$PYTHON has no ssl module with TLS 1.3"
# nginx offers HTTP/2 in ALPN on its TLS listeners as quadrige-proxy does (Apache does
# not: see its config): `listen ... http2` before 1.25.1, `http2 on;` from then on. The
# client asks for http/1.1 only, so this changes what is offered, not what is used.
NGINX_VERSION=$("$NGINX_BIN" -v 2>&1 | sed -n 's#.*nginx/\([0-9.]*\).*#\1#p')
NGINX_LISTEN_HTTP2="" NGINX_HTTP2_ON=""
if "$NGINX_BIN" -V 2>&1 | grep -q http_v2_module; then
    if [[ $(printf '%s\n' "${NGINX_VERSION:-0}" 1.25.1 | sort -V | head -1) == 1.25.1 ]]; then
        NGINX_HTTP2_ON="http2 on;"
    else
        NGINX_LISTEN_HTTP2=" http2"
    fi
fi

NPROC=$(nproc)
if ((NPROC < 2)); then
    log "warning: one core only: clients and servers share CPU 0"
    CLIENT_CPU=0 SERVER_CPU=0
fi
CLK_TCK=$(getconf CLK_TCK)

# Descriptors: 10,000 idle client connections need as many on each side.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE == unlimited ]] && NOFILE=1048576
((NOFILE > 200000)) && NOFILE=200000
if ((IDLE_CONNS + 500 > NOFILE)); then
    log "warning: open-file limit $NOFILE: IDLE_CONNS lowered from $IDLE_CONNS to $((NOFILE - 500))"
    IDLE_CONNS=$((NOFILE - 500))
fi

for port in "${PORT[@]}" "${TLS_PORT[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port on 127.0.0.1 is already in use (set PORT_BASE)"
    fi
done

# --- 2. build -------------------------------------------------------------------------------
if [[ -n ${QP_BIN:-} ]]; then
    QP_DESC=${QP_DESC:-prebuilt $QP_BIN}
else
    if [[ ${NO_BUILD:-0} != 1 ]]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release) >&2
    fi
    QP_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/quadrige-proxy
    QP_DESC=${QP_DESC:-$(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo 'no git')}
fi
[[ -x $QP_BIN ]] || die "$QP_BIN not built"

# From here on, everything is bounded by the watchdog.
(
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$MAX_SECONDS" & sleeper=$!
    wait "$sleeper" && { echo "benches/run.sh: over MAX_SECONDS=${MAX_SECONDS}s, stopping" >&2; kill -TERM $$; }
) &
WATCHDOG=$!
STARTED=$SECONDS

# --- 3. files and configs -------------------------------------------------------------------
WORK=$(mktemp -d /tmp/quadrige-bench.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/apache"
if [[ -d /dev/shm && -w /dev/shm ]]; then UPLOADS=$(mktemp -d /dev/shm/quadrige-bench.XXXXXX); else UPLOADS=$WORK/uploads; mkdir -p "$UPLOADS"; fi
mkdir -p "$UPLOADS/tmp"
chmod 1777 "$UPLOADS" "$UPLOADS/tmp"   # nginx's workers run as an unprivileged user

mkdir -p "$CACHE_DIR"
BIG=$CACHE_DIR/big-1GiB.bin
if [[ ! -f $BIG || $(stat -c %s "$BIG") != "$BIG_SIZE" ]]; then
    log "creating $BIG (1 GiB, once)"
    rm -f "$BIG"
    fallocate -l "$BIG_SIZE" "$BIG" 2>/dev/null || head -c "$BIG_SIZE" /dev/zero > "$BIG"
fi
chmod a+rx "$CACHE_DIR"; chmod a+r "$BIG"
cat "$BIG" > /dev/null   # into the page cache: disks are not what we measure

# The TLS listeners' certificate: self-signed, for 127.0.0.1 and localhost (and the
# servers' name, bench.localhost, which Apache checks), ECDSA P-256 (the same key type,
# hence the same signature cost, for every server), a leaf, not a CA; made once per run.
mkdir -p "$WORK/tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -sha256 -subj /CN=127.0.0.1 \
    -addext 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:bench.localhost' \
    -addext 'basicConstraints=critical,CA:FALSE' -addext 'keyUsage=critical,digitalSignature' \
    -addext 'extendedKeyUsage=serverAuth' \
    -keyout "$WORK/tls/key.pem" -out "$WORK/tls/cert.pem" 2> "$WORK/tls/openssl.log" \
    || { cat "$WORK/tls/openssl.log" >&2; die "openssl could not make the test certificate"; }
chmod 755 "$WORK/tls"; chmod 644 "$WORK/tls/cert.pem"; chmod 600 "$WORK/tls/key.pem"
CERT=$WORK/tls/cert.pem

if [[ $EUID == 0 ]]; then
    APACHE_USER=$(id -un www-data 2>/dev/null || echo nobody)
    APACHE_GROUP=$(id -gn "$APACHE_USER" 2>/dev/null || echo nogroup)
fi
render() {
    sed -e "s#@WORK@#$WORK#g" -e "s#@UPLOADS@#$UPLOADS#g" -e "s#@BIGFILE@#$BIG#g" \
        -e "s#@UPSTREAM_PORT@#${PORT[upstream]}#g" -e "s#@NGINX_PORT@#${PORT[nginx]}#g" \
        -e "s#@APACHE_PORT@#${PORT[apache]}#g" -e "s#@QP_PORT@#${PORT[quadrige]}#g" -e "s#@QP_WORKERS@#$QP_WORKERS#g" \
        -e "s#@NOFILE@#$NOFILE#g" -e "s#@WORKER_CONNECTIONS@#$((NOFILE - 100))#g" \
        -e "s#@APACHE_MODULES@#$APACHE_MODULES#g" -e "s#@APACHE_THREADS@#$APACHE_THREADS#g" \
        -e "s#@APACHE_USER@#${APACHE_USER:-}#g" -e "s#@APACHE_GROUP@#${APACHE_GROUP:-}#g" \
        -e "s#@UPSTREAM_TLS_PORT@#${TLS_PORT[upstream]}#g" -e "s#@NGINX_TLS_PORT@#${TLS_PORT[nginx]}#g" \
        -e "s#@APACHE_TLS_PORT@#${TLS_PORT[apache]}#g" -e "s#@QP_TLS_PORT@#${TLS_PORT[quadrige]}#g" \
        -e "s#@NGINX_LISTEN_HTTP2@#$NGINX_LISTEN_HTTP2#g" -e "s#@NGINX_HTTP2_ON@#$NGINX_HTTP2_ON#g" \
        "$BENCH_DIR/conf/$1" > "$WORK/$2"
    if [[ $2 == apache.conf && $EUID != 0 ]]; then sed -i -e '/^User /d' -e '/^Group /d' "$WORK/$2"; fi
}
render upstream-nginx.conf.in upstream.conf
render nginx-proxy.conf.in nginx.conf
render apache-proxy.conf.in apache.conf
render quadrige-proxy.toml.in quadrige.toml
mkdir -p "$WORK"/{upstream,nginx-proxy}-temp

# --- 4. servers -------------------------------------------------------------------------------
# Each server runs in a session (and process group) of its own, pinned to SERVER_CPU.
start_server() {
    local t=$1 cmd
    case $t in
        upstream) cmd=("$NGINX_BIN" -p "$WORK" -e "$WORK/upstream-error.log" -c "$WORK/upstream.conf") ;;
        nginx) cmd=("$NGINX_BIN" -p "$WORK" -e "$WORK/nginx-proxy-error.log" -c "$WORK/nginx.conf") ;;
        apache) cmd=("$APACHE_BIN" -f "$WORK/apache.conf" -DFOREGROUND) ;;
        quadrige) cmd=(env -u RUST_LOG "$QP_BIN" --config "$WORK/quadrige.toml") ;;
    esac
    setsid taskset -c "$SERVER_CPU" "${cmd[@]}" >> "$WORK/$t.out" 2>&1 < /dev/null &
    PID[$t]=$!
    local i url=http://127.0.0.1:${PORT[$t]}/small tls=""
    [[ -n ${TLS_PORT[$t]:-} ]] && tls=https://127.0.0.1:${TLS_PORT[$t]}/small
    for ((i = 0; i < 100; i++)); do
        kill -0 "${PID[$t]}" 2>/dev/null || { tail -5 "$WORK/$t.out" >&2; die "$t exited at start"; }
        if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]]; then
            [[ -z $tls ]] && return 0
            [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 --cacert "$CERT" "$tls" || true) == 200 ]] && return 0
        fi
        sleep 0.1
    done
    die "$t did not answer on port ${PORT[$t]}${tls:+ and TLS port ${TLS_PORT[$t]}} within 10 s"
}
stop_server() {
    local t=$1 pid=${PID[$1]:-} i
    [[ -n $pid ]] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PID[$t]"
    return 0
}
restart_server() { stop_server "$1"; sleep 0.5; start_server "$1"; }

log "starting the upstream and the three proxies (ports ${PORT[upstream]}..${PORT[quadrige]}, TLS ${TLS_PORT[upstream]}..${TLS_PORT[quadrige]}, CPU $SERVER_CPU)"
for t in "${TARGETS[@]}"; do start_server "$t"; done
QP_THREADS_SEEN=$("$PYTHON" "$BENCH_DIR/tools/procstat.py" threads "${PID[quadrige]}")

RAW=$WORK/raw.jsonl
: > "$RAW"
procstat() { "$PYTHON" "$BENCH_DIR/tools/procstat.py" "$@"; }
# (In the foreground only: a background job must be `taskset ... &` itself, so that $! is
# the client's own pid, which cleanup can stop.)
on_client() { taskset -c "$CLIENT_CPU" "$@"; }
calc() { awk "BEGIN { printf \"%.6g\", $1 }"; }
# Busy and total clock ticks of one CPU, from /proc/stat: how loaded a core was during a run,
# by anything (other work on the machine included).
# $1 is a taskset list ("1", "0,1", "0-1"); the ticks of its CPUs are added up.
core_ticks() {
    local part i cpus=" "
    IFS=, read -ra parts <<< "$1"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then
            for ((i = ${part%-*}; i <= ${part#*-}; i++)); do cpus+="cpu$i "; done
        else
            cpus+="cpu$part "
        fi
    done
    awk -v cpus="$cpus" 'index(cpus, " " $1 " ") { b += $2 + $3 + $4 + $7 + $8 + $9; t += $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }
        END { print b + 0, t + 0 }' /proc/stat
}
# The upstream's "accepts requests" counters (its stub_status); reading them costs one
# connection and one request, which the callers subtract.
upstream_counters() {
    curl -s --max-time 2 "http://127.0.0.1:${PORT[upstream]}/nginx_status" | awk 'NR == 3 { print $1, $3 }'
}

# --- 5. measurements ----------------------------------------------------------------------------
# wrk on one target: small GET, small POST, or GET with a new connection each time.
run_wrk() {
    local test=$1 t=$2 round=$3 method=GET extra=() out rc=0
    case $test in post) method=POST ;; close) extra=(-H 'Connection: close') ;; esac
    local c0 k0 u0 t0 c1 k1 u1 t1 a0 r0 a1 r1 sb0 st0 sb1 st1 cb0 ct0 cb1 ct1
    read -r a0 r0 <<< "$(upstream_counters)"
    k0=$(procstat cpu-kernel "${PID[$t]}")
    c0=$(procstat cpu "${PID[$t]}"); u0=$(procstat cpu "${PID[upstream]}"); t0=$(date +%s.%N)
    read -r sb0 st0 <<< "$(core_ticks "$SERVER_CPU")"; read -r cb0 ct0 <<< "$(core_ticks "$CLIENT_CPU")"
    out=$(WRK_METHOD=$method on_client timeout $((DURATION + 20)) wrk -t1 -c"$CONNS" -d"${DURATION}s" \
        --timeout 5s -s "$BENCH_DIR/tools/wrk-report.lua" "${extra[@]}" \
        "http://127.0.0.1:${PORT[$t]}/small" 2>&1) || rc=$?
    read -r sb1 st1 <<< "$(core_ticks "$SERVER_CPU")"; read -r cb1 ct1 <<< "$(core_ticks "$CLIENT_CPU")"
    t1=$(date +%s.%N); c1=$(procstat cpu "${PID[$t]}"); u1=$(procstat cpu "${PID[upstream]}")
    k1=$(procstat cpu-kernel "${PID[$t]}")
    read -r a1 r1 <<< "$(upstream_counters)"
    local server_busy client_busy
    server_busy=$(calc "($sb1 - $sb0) / ($st1 - $st0 + 0.001) * 100")
    client_busy=$(calc "($cb1 - $cb0) / ($ct1 - $ct0 + 0.001) * 100")
    local up_conns=$((a1 - a0 - 1)) up_reqs=$((r1 - r0 - 1))
    local line
    line=$(grep '^WRKRESULT' <<< "$out" || true)
    if [[ -z $line ]]; then
        log "  $test $t: wrk failed (exit $rc): $(tail -2 <<< "$out" | tr '\n' ' ')"
        printf '{"test":"%s","target":"%s","round":%d,"ok":false,"errors":1,"error_detail":"wrk exit %d","rps":null,"p50_us":null,"p99_us":null}\n' \
            "$test" "$t" "$round" "$rc" >> "$RAW"
        return 0
    fi
    local -A w=()
    local kv
    for kv in ${line#WRKRESULT }; do w[${kv%%=*}]=${kv#*=}; done
    local errors=$((w[err_connect] + w[err_read] + w[err_write] + w[err_status] + w[err_timeout]))
    local detail=""
    ((errors)) && detail="connect ${w[err_connect]}, read ${w[err_read]}, write ${w[err_write]}, non-2xx/3xx ${w[err_status]}, timeout ${w[err_timeout]}"
    local rps cpu ucpu elapsed cpu_us kernel_us
    rps=$(calc "${w[requests]} / (${w[duration_us]} / 1e6)")
    elapsed=$(calc "$t1 - $t0")
    cpu=$(calc "($c1 - $c0) / $CLK_TCK / $elapsed * 100")
    ucpu=$(calc "($u1 - $u0) / $CLK_TCK / $elapsed * 100")
    cpu_us=$(calc "($c1 - $c0) / $CLK_TCK / (${w[requests]} + 1) * 1e6")
    kernel_us=$(calc "($k1 - $k0) / $CLK_TCK / (${w[requests]} + 1) * 1e6")
    # A read error on a `Connection: close` run is the server closing as told: not a failure.
    local ok=true
    if [[ $test == close ]]; then
        errors=$((errors - w[err_read])); detail=""
        ((errors)) && detail="connect ${w[err_connect]}, write ${w[err_write]}, non-2xx/3xx ${w[err_status]}, timeout ${w[err_timeout]}"
    fi
    ((errors * 100 > w[requests])) && ok=false   # over 1 % errors: not a valid figure
    printf '{"test":"%s","target":"%s","round":%d,"ok":%s,"requests":%d,"secs":%s,"rps":%s,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"errors":%d,"error_detail":"%s","cpu_pct":%s,"upstream_cpu_pct":%s,"cpu_us_per_req":%s,"kernel_us_per_req":%s,"upstream_conns":%d,"upstream_reqs":%d,"server_core_busy_pct":%s,"client_core_busy_pct":%s}\n' \
        "$test" "$t" "$round" "$ok" "${w[requests]}" "$(calc "${w[duration_us]} / 1e6")" "$rps" \
        "${w[p50_us]}" "${w[p90_us]}" "${w[p99_us]}" "${w[max_us]}" "$errors" "$detail" "$cpu" "$ucpu" "$cpu_us" "$kernel_us" \
        "$up_conns" "$up_reqs" "$server_busy" "$client_busy" >> "$RAW"
    log "  $test $t: $(printf '%.0f' "$rps") req/s, p50 $((w[p50_us]))µs p99 $((w[p99_us]))µs, errors $errors, CPU ${cpu%.*}% (upstream ${ucpu%.*}%), $(printf '%.1f' "$cpu_us") µs/request ($(printf '%.1f' "$kernel_us") in the kernel); upstream saw $up_conns connections, $up_reqs requests; cores busy: server ${server_busy%.*}%, client ${client_busy%.*}%"
}

# One 1 GiB download or upload through one target.
run_transfer() {
    local test=$1 t=$2 round=$3 out rc=0 args=()
    if [[ $test == download ]]; then
        args=(-o /dev/null -w '%{http_code} %{size_download} %{time_total}' "http://127.0.0.1:${PORT[$t]}/big")
    else
        args=(-o /dev/null -H 'Expect:' -T "$BIG" -w '%{http_code} %{size_upload} %{time_total}' "http://127.0.0.1:${PORT[$t]}/upload")
    fi
    local c0 u0 c1 u1
    c0=$(procstat cpu "${PID[$t]}"); u0=$(procstat cpu "${PID[upstream]}")
    out=$(on_client timeout $((TRANSFER_MAX_SECS + 10)) curl -s --max-time "$TRANSFER_MAX_SECS" "${args[@]}") || rc=$?
    c1=$(procstat cpu "${PID[$t]}"); u1=$(procstat cpu "${PID[upstream]}")
    local code bytes secs
    read -r code bytes secs <<< "${out:-000 0 1}"
    local ok=true errors=0 detail=""
    if [[ $bytes != "$BIG_SIZE" || $rc != 0 || ! ($code == 200 || $code == 201 || $code == 204) ]]; then
        ok=false errors=1 detail="HTTP $code, $bytes bytes, curl exit $rc"
    fi
    local gbps cpu ucpu cpu_s
    gbps=$(calc "$bytes / $secs / 1e9")
    cpu_s=$(calc "($c1 - $c0) / $CLK_TCK")
    cpu=$(calc "($c1 - $c0) / $CLK_TCK / $secs * 100")
    ucpu=$(calc "($u1 - $u0) / $CLK_TCK / $secs * 100")
    printf '{"test":"%s","target":"%s","round":%d,"ok":%s,"gbps":%s,"bytes":%s,"secs":%s,"http":"%s","curl_rc":%d,"errors":%d,"error_detail":"%s","cpu_pct":%s,"upstream_cpu_pct":%s,"cpu_s":%s}\n' \
        "$test" "$t" "$round" "$ok" "$gbps" "$bytes" "$secs" "$code" "$rc" "$errors" "$detail" "$cpu" "$ucpu" "$cpu_s" >> "$RAW"
    log "  $test $t: $(printf '%.2f' "$gbps") GB/s (HTTP $code, $bytes bytes, ${secs}s, curl exit $rc), CPU ${cpu_s}s (${cpu%.*}%, upstream ${ucpu%.*}%)"
}

# SLOW_CLIENTS downloads of the 1 GiB file at SLOW_RATE each, for SLOW_SECS, on a fresh proxy.
run_slow() {
    local t=$1 i
    restart_server "$t"
    sleep 1
    local base base_pss mem
    mem=$(procstat mem "${PID[$t]}")
    base=$(sed -n 's/.*rss_kib=\([0-9]*\).*/\1/p' <<< "$mem"); base_pss=$(sed -n 's/.*pss_kib=\([0-9]*\).*/\1/p' <<< "$mem")
    local stop=$WORK/slow-$t.stop results=$WORK/slow-$t.curl
    rm -f "$stop"; : > "$results"
    STOP_FILE=$stop taskset -c "$CLIENT_CPU" "$PYTHON" "$BENCH_DIR/tools/procstat.py" sample "${PID[$t]}" $((SLOW_SECS + 15)) 0.2 > "$WORK/slow-$t.sample" &
    local sampler=$!
    CLIENT_PIDS+=("$sampler")
    local pids=()
    for ((i = 0; i < SLOW_CLIENTS; i++)); do
        taskset -c "$CLIENT_CPU" curl -s -o /dev/null --limit-rate "$SLOW_RATE" --max-time "$SLOW_SECS" \
            -w '%{http_code} %{size_download} %{exitcode}\n' "http://127.0.0.1:${PORT[$t]}/big" >> "$results" 2>/dev/null &
        pids+=($!)
    done
    CLIENT_PIDS+=("${pids[@]}")
    for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
    touch "$stop"
    wait "$sampler" 2>/dev/null || true
    CLIENT_PIDS=()
    local sample peak hwm peak_pss
    sample=$(cat "$WORK/slow-$t.sample")
    peak=$(sed -n 's/.*peak_kib=\([0-9]*\).*/\1/p' <<< "$sample")
    peak_pss=$(sed -n 's/.*peak_pss_kib=\([0-9]*\).*/\1/p' <<< "$sample")
    hwm=$(sed -n 's/.*hwm_kib=\([0-9]*\).*/\1/p' <<< "$sample")
    # curl exit 28 is its --max-time: the stream was still flowing when we stopped it.
    local flowing bytes bad
    flowing=$(awk '$1 == 200 && $3 == 28' "$results" | wc -l)
    bytes=$(awk '{ s += $2 } END { printf "%.0f", s }' "$results")
    bad=$(awk '!($1 == 200 && $3 == 28) { printf "%s%s/%s/exit %s", sep, $1, $2, $3; sep = "; " }' "$results" | cut -c1-300)
    local errors=$((SLOW_CLIENTS - flowing)) mbps ok=true
    mbps=$(calc "$bytes / $SLOW_CLIENTS / $SLOW_SECS / 1e6")
    ((errors)) && ok=false
    printf '{"test":"slow","target":"%s","round":1,"ok":%s,"base_kib":%d,"base_pss_kib":%d,"peak_kib":%d,"peak_pss_kib":%d,"hwm_kib":%d,"clients":%d,"clients_ok":%d,"bytes":%s,"mbps_per_client":%s,"errors":%d,"error_detail":"%s"}\n' \
        "$t" "$ok" "$base" "$base_pss" "${peak:-0}" "${peak_pss:-0}" "${hwm:-0}" "$SLOW_CLIENTS" "$flowing" "$bytes" "$mbps" "$errors" "${bad:+HTTP/bytes/curl exit: $bad}" >> "$RAW"
    log "  slow $t: peak RSS $((${peak:-0} / 1024)) MiB (start $((base / 1024)) MiB), $flowing/$SLOW_CLIENTS streams flowing, $(printf '%.2f' "$mbps") MB/s each"
}

# IDLE_CONNS keep-alive connections, one request each, then idle: RSS before and after.
run_idle() {
    local t=$1 i
    restart_server "$t"
    for i in 1 2 3 4 5; do curl -s -o /dev/null --max-time 2 "http://127.0.0.1:${PORT[$t]}/small" || true; done
    sleep 1
    local base base_pss mem a0 r0 a1 r1
    mem=$(procstat mem "${PID[$t]}")
    base=$(sed -n 's/.*rss_kib=\([0-9]*\).*/\1/p' <<< "$mem"); base_pss=$(sed -n 's/.*pss_kib=\([0-9]*\).*/\1/p' <<< "$mem")
    read -r a0 r0 <<< "$(upstream_counters)"
    local out=$WORK/idle-$t.out
    : > "$out"
    taskset -c "$CLIENT_CPU" timeout 120 "$PYTHON" "$BENCH_DIR/tools/idle_conns.py" 127.0.0.1 "${PORT[$t]}" /small "$IDLE_CONNS" \
        --hold 6 --concurrency 200 --timeout 5 --deadline 45 > "$out" 2>&1 &
    local client=$!
    CLIENT_PIDS+=("$client")
    for ((i = 0; i < 600; i++)); do grep -q '^READY' "$out" && break; kill -0 "$client" 2>/dev/null || break; sleep 0.1; done
    sleep 1
    local sample after after_pss
    sample=$(procstat sample "${PID[$t]}" 3 0.25)
    after=$(sed -n 's/.*peak_kib=\([0-9]*\).*/\1/p' <<< "$sample")
    after_pss=$(sed -n 's/.*peak_pss_kib=\([0-9]*\).*/\1/p' <<< "$sample")
    wait "$client" 2>/dev/null || true
    CLIENT_PIDS=()
    read -r a1 r1 <<< "$(upstream_counters)"
    local opened failed secs held
    opened=$(sed -n 's/^READY opened=\([0-9]*\).*/\1/p' "$out"); opened=${opened:-0}
    failed=$(sed -n 's/^READY.*failed=\([0-9]*\).*/\1/p' "$out"); failed=${failed:-$IDLE_CONNS}
    secs=$(sed -n 's/^READY.*secs=\([0-9.]*\).*/\1/p' "$out"); secs=${secs:-0}
    held=$(sed -n 's/^DONE held=\([0-9]*\).*/\1/p' "$out"); held=${held:-0}
    local detail errors=$((IDLE_CONNS - held)) ok=true
    detail=$(grep '^ERROR' "$out" | head -3 | sed -e 's/^ERROR //' -e 's/["\\]/ /g' | tr '\n' ';' || true)
    ((opened < IDLE_CONNS)) && ok=false
    printf '{"test":"idle","target":"%s","round":1,"ok":%s,"base_kib":%d,"after_kib":%d,"base_pss_kib":%d,"after_pss_kib":%d,"opened":%d,"failed":%d,"held":%d,"open_secs":%s,"errors":%d,"error_detail":"%s","upstream_conns":%d,"upstream_reqs":%d}\n' \
        "$t" "$ok" "$base" "${after:-0}" "$base_pss" "${after_pss:-0}" "$opened" "$failed" "$held" "$secs" "$errors" "$detail" \
        $((a1 - a0 - 1)) $((r1 - r0 - 1)) >> "$RAW"
    log "  idle $t: RSS $((base / 1024)) -> $((${after:-0} / 1024)) MiB, opened $opened/$IDLE_CONNS in ${secs}s, held $held"
}

# New TLS connections to one target's TLS listener (a proxy forwards /small to the upstream;
# the upstream alone answers it itself): TLS_REQUESTS sequential ones, each a new TCP
# connection and a full TLS 1.3 handshake (time to first byte from the connect, handshake
# included), then TLS_CONCURRENCY client processes doing the same for TLS_RATE_SECS (new
# TLS connections per second, and the server's CPU per connection).
run_tls() {
    local t=$1 round=$2 out rc=0 a0 r0 a1 r1
    read -r a0 r0 <<< "$(upstream_counters)"
    out=$(on_client timeout $((TLS_MAX_SECS + 20)) "$PYTHON" "$BENCH_DIR/tools/tls_ttfb.py" ttfb 127.0.0.1 "${TLS_PORT[$t]}" /small \
        --ca "$CERT" --count "$TLS_REQUESTS" --warmup 10 --deadline "$TLS_MAX_SECS" 2>&1) || rc=$?
    read -r a1 r1 <<< "$(upstream_counters)"
    local line
    line=$(grep '^TLSRESULT' <<< "$out" || true)
    if [[ -z $line ]]; then
        log "  tls $t: the client failed (exit $rc): $(tail -2 <<< "$out" | tr '\n' ' ' | cut -c1-300)"
        printf '{"test":"tls","target":"%s","round":%d,"ok":false,"errors":1,"error_detail":"client exit %d"}\n' "$t" "$round" "$rc" >> "$RAW"
    else
        local -A w=()
        local kv
        for kv in ${line#TLSRESULT }; do w[${kv%%=*}]=${kv#*=}; done
        local detail ok=true
        detail=$(grep '^ERROR' <<< "$out" | head -3 | sed -e 's/^ERROR //' -e 's/["\\]/ /g' | tr '\n' ';' | cut -c1-300 || true)
        # Over 1 % errors, or anything but a full TLS 1.3 handshake with http/1.1: not a valid figure.
        ((w[errors] * 100 > w[count])) && ok=false
        if [[ ${w[version]} != TLSv1.3 || ${w[alpn]} != http/1.1 || ${w[resumed]} != 0 ]]; then
            ok=false
            detail+="${detail:+; }negotiated ${w[version]} ${w[alpn]}, ${w[resumed]} resumed"
        fi
        printf '{"test":"tls","target":"%s","round":%d,"ok":%s,"count":%d,"requests":%d,"errors":%d,"error_detail":"%s","secs":%s,"ttfb_p50_us":%d,"ttfb_p90_us":%d,"ttfb_p99_us":%d,"ttfb_max_us":%d,"hs_p50_us":%d,"hs_p99_us":%d,"version":"%s","cipher":"%s","alpn":"%s","resumed":%d,"upstream_conns":%d,"upstream_reqs":%d}\n' \
            "$t" "$round" "$ok" "${w[count]}" "${w[ok]}" "${w[errors]}" "$detail" "${w[secs]}" \
            "${w[ttfb_p50_us]}" "${w[ttfb_p90_us]}" "${w[ttfb_p99_us]}" "${w[ttfb_max_us]}" "${w[hs_p50_us]}" "${w[hs_p99_us]}" \
            "${w[version]}" "${w[cipher]}" "${w[alpn]}" "${w[resumed]}" $((a1 - a0 - 1)) $((r1 - r0 - 1)) >> "$RAW"
        log "  tls $t: time to first byte p50 $(calc "${w[ttfb_p50_us]} / 1000") ms, p99 $(calc "${w[ttfb_p99_us]} / 1000") ms (handshake p50 $(calc "${w[hs_p50_us]} / 1000") ms), ${w[ok]}/${w[count]} ok, ${w[version]} ${w[cipher]} ${w[alpn]}, ${w[resumed]} resumed; upstream saw $((a1 - a0 - 1)) connections, $((r1 - r0 - 1)) requests"
    fi
    ((TLS_CONCURRENCY > 0)) || return 0
    local c0 u0 t0 c1 u1 t1 sb0 st0 sb1 st1 cb0 ct0 cb1 ct1
    rc=0
    c0=$(procstat cpu "${PID[$t]}"); u0=$(procstat cpu "${PID[upstream]}"); t0=$(date +%s.%N)
    read -r sb0 st0 <<< "$(core_ticks "$SERVER_CPU")"; read -r cb0 ct0 <<< "$(core_ticks "$CLIENT_CPU")"
    out=$(on_client timeout $((TLS_RATE_SECS + 20)) "$PYTHON" "$BENCH_DIR/tools/tls_ttfb.py" rate 127.0.0.1 "${TLS_PORT[$t]}" /small \
        --ca "$CERT" --secs "$TLS_RATE_SECS" --concurrency "$TLS_CONCURRENCY" 2>&1) || rc=$?
    read -r sb1 st1 <<< "$(core_ticks "$SERVER_CPU")"; read -r cb1 ct1 <<< "$(core_ticks "$CLIENT_CPU")"
    t1=$(date +%s.%N); c1=$(procstat cpu "${PID[$t]}"); u1=$(procstat cpu "${PID[upstream]}")
    line=$(grep '^TLSRATE' <<< "$out" || true)
    if [[ -z $line ]]; then
        log "  tls_rate $t: the client failed (exit $rc): $(tail -2 <<< "$out" | tr '\n' ' ' | cut -c1-300)"
        printf '{"test":"tls_rate","target":"%s","round":%d,"ok":false,"errors":1,"error_detail":"client exit %d"}\n' "$t" "$round" "$rc" >> "$RAW"
        return 0
    fi
    local -A g=()
    for kv in ${line#TLSRATE }; do g[${kv%%=*}]=${kv#*=}; done
    local elapsed cpu ucpu cpu_us server_busy client_busy ok=true
    elapsed=$(calc "$t1 - $t0")
    cpu=$(calc "($c1 - $c0) / $CLK_TCK / $elapsed * 100")
    ucpu=$(calc "($u1 - $u0) / $CLK_TCK / $elapsed * 100")
    cpu_us=$(calc "($c1 - $c0) / $CLK_TCK / (${g[conns]} + 1) * 1e6")
    server_busy=$(calc "($sb1 - $sb0) / ($st1 - $st0 + 0.001) * 100")
    client_busy=$(calc "($cb1 - $cb0) / ($ct1 - $ct0 + 0.001) * 100")
    ((g[errors] * 100 > g[conns])) && ok=false
    printf '{"test":"tls_rate","target":"%s","round":%d,"ok":%s,"conns":%d,"secs":%s,"rate":%s,"errors":%d,"error_detail":"%s","cpu_pct":%s,"upstream_cpu_pct":%s,"cpu_us_per_conn":%s,"server_core_busy_pct":%s,"client_core_busy_pct":%s}\n' \
        "$t" "$round" "$ok" "${g[conns]}" "${g[secs]}" "${g[rate]}" "${g[errors]}" "$( ((g[errors])) && echo "${g[errors]} failed connections")" \
        "$cpu" "$ucpu" "$cpu_us" "$server_busy" "$client_busy" >> "$RAW"
    log "  tls_rate $t: $(printf '%.0f' "${g[rate]}") new TLS connections/s ($TLS_CONCURRENCY clients), errors ${g[errors]}, CPU ${cpu%.*}% (upstream ${ucpu%.*}%), $(printf '%.1f' "$cpu_us") µs/connection; cores busy: server ${server_busy%.*}%, client ${client_busy%.*}%"
}

# What each TLS listener negotiates with a default OpenSSL client asking for TLS 1.3
# (protocol, cipher, key exchange group, signature): once per run, for the report.
tls_probe() {
    local t=$1 out
    out=$(timeout 10 openssl s_client -connect "127.0.0.1:${TLS_PORT[$t]}" -tls1_3 -CAfile "$CERT" -alpn http/1.1 \
        -verify_return_error < /dev/null 2>&1 || true)
    local proto group sig
    proto=$(sed -n 's/^New, \(TLSv[0-9.]*\), Cipher is \(.*\)$/\1 \2/p' <<< "$out" | head -1)
    group=$(sed -n 's/^\(Server\|Peer\) Temp Key: \([^,]*\).*/\2/p' <<< "$out" | head -1)
    sig=$(sed -n 's/^Peer signature type: //p' <<< "$out" | head -1)
    echo "${proto:-?}, ${group:-?}, ${sig:-?}"
}

# A measurement starts only if it can end within MAX_SECONDS (the watchdog's hard stop);
# one that cannot is skipped and listed in the report.
SKIPPED=$WORK/skipped.txt
: > "$SKIPPED"
fits() {
    local need=$1; shift
    if ((SECONDS - STARTED + need + 20 > MAX_SECONDS)); then
        log "  skipped (time budget): $*"
        echo "$*" >> "$SKIPPED"
        return 1
    fi
}

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "warm-up"
for t in "${TARGETS[@]}"; do
    on_client timeout 20 wrk -t1 -c8 -d1s "http://127.0.0.1:${PORT[$t]}/small" > /dev/null 2>&1 || true
done

declare -A TLS_NEGOTIATED=()
if has_phase tls; then
    for t in "${TARGETS[@]}"; do TLS_NEGOTIATED[$t]=$(tls_probe "$t"); log "TLS to $t: ${TLS_NEGOTIATED[$t]}"; done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    for test in get post close tls; do
        has_phase "$test" || continue
        log "round $r/$ROUNDS: $test"
        for t in "${TARGETS[@]}"; do
            if [[ $test == tls ]]; then
                fits $((TLS_RATE_SECS + 8)) "tls $t round $r" && run_tls "$t" "$r"
            else
                fits $((DURATION + 5)) "$test $t round $r" && run_wrk "$test" "$t" "$r"
            fi
        done
    done
done
if has_phase transfer; then
    for ((r = 1; r <= ROUNDS; r++)); do
        for test in download upload; do
            log "round $r/$ROUNDS: 1 GiB $test"
            for t in "${TARGETS[@]}"; do fits 15 "$test $t round $r" && run_transfer "$test" "$t" "$r"; done
        done
    done
fi
if has_phase slow; then
    log "$SLOW_CLIENTS slow readers at $SLOW_RATE/s for ${SLOW_SECS}s, each proxy fresh"
    for t in "${PROXIES[@]}"; do fits $((SLOW_SECS + 15)) "slow readers $t" && run_slow "$t"; done
fi
if has_phase idle; then
    log "$IDLE_CONNS idle keep-alive connections, each proxy fresh"
    for t in "${PROXIES[@]}"; do fits 40 "idle connections $t" && run_idle "$t"; done
fi
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
log "measurements took $((SECONDS - STARTED)) s"

# --- 6. report ----------------------------------------------------------------------------------
LOGS=$WORK/logs.txt
: > "$LOGS"
if [[ -s $SKIPPED ]]; then
    { echo "skipped to stay within MAX_SECONDS=$MAX_SECONDS:"; cat "$SKIPPED"; } >> "$LOGS"
fi
# Apache's start-up notices are not problems; nor is AH01882, Debian's mod_ssl saying it
# was built against a newer OpenSSL patch release than the one installed.
NOTICES=(-e 'AH00489' -e 'AH00094' -e 'AH00558' -e 'resuming normal operations' -e 'caught SIGTERM' -e 'AH00492' -e 'AH01882')
for f in upstream-error.log nginx-proxy-error.log apache-proxy-error.log upstream.out nginx.out apache.out quadrige.out; do
    [[ -s $WORK/$f ]] || continue
    lines=$(grep -cv "${NOTICES[@]}" "$WORK/$f" || true)
    ((lines)) || continue
    { echo "$f: $lines lines"; grep -v "${NOTICES[@]}" "$WORK/$f" | tail -4 | cut -c1-300; } >> "$LOGS"
done

json_str() { "$PYTHON" -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
QP_VERSION="$("$QP_BIN" --version 2>/dev/null | head -1) ($QP_DESC)"
# shellcheck source=/dev/null
cat > "$WORK/meta.json" <<EOF
{
  "date": $(json_str "$(date -u '+%Y-%m-%d %H:%M UTC')"),
  "cpu_model": $(json_str "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"),
  "nproc": $NPROC,
  "mem": $(json_str "$(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)"),
  "os": $(json_str "$(. /etc/os-release 2>/dev/null && echo "${PRETTY_NAME:-Linux}")"),
  "kernel": $(json_str "$(uname -r)"),
  "load_start": $(json_str "$LOAD_START"),
  "load_end": $(json_str "$LOAD_END"),
  "qp_version": $(json_str "$QP_VERSION"),
  "nginx_version": $(json_str "$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')"),
  "apache_version": $(json_str "$("$APACHE_BIN" -v 2>&1 | head -1 | sed 's/^Server version: //')"),
  "wrk_version": $(json_str "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"),
  "curl_version": $(json_str "$(curl --version | head -1 | cut -d' ' -f1-2)"),
  "client_cpu": $(json_str "$CLIENT_CPU"),
  "server_cpu": $(json_str "$SERVER_CPU"),
  "apache_threads": $APACHE_THREADS,
  "qp_workers": $QP_WORKERS,
  "qp_threads_seen": $QP_THREADS_SEEN,
  "rounds": $ROUNDS,
  "conns": $CONNS,
  "duration": $DURATION,
  "slow_clients": $SLOW_CLIENTS,
  "slow_rate": $(json_str "$SLOW_RATE"),
  "idle_conns": $IDLE_CONNS,
  "tls_requests": $TLS_REQUESTS,
  "tls_concurrency": $TLS_CONCURRENCY,
  "tls_rate_secs": $TLS_RATE_SECS,
  "tls_cert": $(json_str "$(openssl x509 -in "$CERT" -noout -text 2>/dev/null | sed -n 's/^ *Public Key Algorithm: //p; s/^ *ASN1 OID: //p' | paste -sd' ' -)"),
  "openssl_version": $(json_str "$(openssl version | cut -d' ' -f1-2)"),
  "python_ssl": $(json_str "$("$PYTHON" -c 'import ssl, sys; print("Python", sys.version.split()[0], "with", ssl.OPENSSL_VERSION)')"),
  "tls_negotiated": {"upstream": $(json_str "${TLS_NEGOTIATED[upstream]:-}"), "nginx": $(json_str "${TLS_NEGOTIATED[nginx]:-}"), "apache": $(json_str "${TLS_NEGOTIATED[apache]:-}"), "quadrige": $(json_str "${TLS_NEGOTIATED[quadrige]:-}")}
}
EOF
"$PYTHON" "$BENCH_DIR/tools/report.py" "$RAW" "$WORK/meta.json" "$LOGS" > "$WORK/RESULTS.md"
{
    cat "$WORK/RESULTS.md"
    echo "Produced by \`benches/run.sh\` in $((SECONDS - STARTED)) s of measurement."
    echo "Raw measurements (JSON lines):"
    echo
    echo '```'
    cat "$RAW"
    echo '```'
} > "$RESULTS"
cat "$WORK/RESULTS.md"
log "written to $RESULTS"
