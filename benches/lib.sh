# shellcheck shell=bash
# benches/lib.sh — shared parts of the blobstage benchmarks (stage.sh, resume.sh).
#
# Sourced, never run. The sourcing script sets `set -euo pipefail`, LOG_TAG (the log prefix)
# and the variables below that it reads (SIZE_MIB, RUNS, KEEP_WORKDIR, BENCH_PORT,
# ARTIFACT_ID), then calls the functions it needs. It may redefine the hooks
# nginx_access_conf / nginx_server_extra to change the nginx config.
#
# Provides: logging and small helpers (median, min_of, max_of), package installation
# (ensure_deps), the cargo build, the work dir and random blob, a private nginx on 127.0.0.1
# (start_nginx / stop_nginx), the blobstage config and one-artifact registry, /usr/bin/time
# measurement (timed), the report's host line, and cleanup on exit (install_traps).

# Globals filled in as we go. Several are only read by the sourcing scripts.
# shellcheck disable=SC2034
{
    REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    BLOBSTAGE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/blobstage"
    WORK=""
    NGINX_BIN=""
    NGINX_PID=""
    PORT=""
    SIZE_BYTES=0
    EXPECTED_HEX=""
    POLICY_RC_CREATED=0
    APT_UPDATED=0
    # A background process (e.g. a blobstage run about to be killed) to kill on exit.
    BG_PID=""
    # The transfer settings written into the blobstage config.
    CHUNK_MIB=16
    CONNECTIONS_PER_BLOB=8
    MAX_CONNECTIONS=32
}

# ---------------------------------------------------------------- helpers

log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

is_pos_int() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }
is_true() { [[ $1 == 1 || $1 == true || $1 == yes ]]; }

# median: reads one number per line on stdin, prints the median
# (mean of the two middle values for an even count), "nan" if empty.
median() {
    sort -g | awk '{ v[NR] = $1 }
        END {
            if (NR == 0) { print "nan"; exit }
            if (NR % 2) printf "%.3f\n", v[(NR + 1) / 2];
            else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}
min_of() { sort -g | head -n1; }
max_of() { sort -g | tail -n1; }

# True while the process exists and is not a zombie.
proc_alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [[ -n $state && $state != Z* ]]
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- cleanup

stop_nginx() {
    [[ -n $NGINX_PID ]] || return 0
    local pid=$NGINX_PID workers i
    NGINX_PID=""
    workers=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
    if proc_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            proc_alive "$pid" || break
            sleep 0.1
        done
        if proc_alive "$pid"; then
            log "nginx (pid $pid) did not stop on TERM; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    # Workers exit with the master; kill any leftover ones by their recorded PIDs.
    local w
    for w in $workers; do
        if [[ $(ps -o comm= -p "$w" 2>/dev/null) == nginx ]]; then
            kill -KILL "$w" 2>/dev/null || true
        fi
    done
}

# Kills the background process recorded in BG_PID, if it is still running.
stop_background() {
    [[ -n $BG_PID ]] || return 0
    local pid=$BG_PID
    BG_PID=""
    if proc_alive "$pid"; then
        log "killing background process $pid"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    set +e
    stop_background
    stop_nginx
    if ((POLICY_RC_CREATED)); then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if is_true "$KEEP_WORKDIR"; then
            log "work dir kept: $WORK"
        else
            chmod -R u+w "$WORK" 2>/dev/null
            rm -rf "$WORK"
        fi
    fi
    exit "$rc"
}

install_traps() {
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# ---------------------------------------------------------------- setup

# Checks SIZE_MIB, RUNS and BENCH_PORT; sets SIZE_BYTES.
check_common_args() {
    is_pos_int "$SIZE_MIB" || die "SIZE_MIB must be a positive integer (got '$SIZE_MIB')"
    is_pos_int "$RUNS" || die "RUNS must be a positive integer (got '$RUNS')"
    if ! is_pos_int "$BENCH_PORT" || ((BENCH_PORT > 65515)); then
        die "BENCH_PORT must be a port number <= 65515 (got '$BENCH_PORT')"
    fi
    SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
}

find_nginx() {
    NGINX_BIN=$(command -v nginx 2>/dev/null || true)
    if [[ -z $NGINX_BIN && -x /usr/sbin/nginx ]]; then
        NGINX_BIN=/usr/sbin/nginx
    fi
    [[ -n $NGINX_BIN ]]
}

apt_update_once() {
    ((APT_UPDATED)) && return 0
    log "apt-get update"
    apt-get update -qq >&2
    APT_UPDATED=1
}

apt_install() {
    log "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# Installs what is missing from Debian packages. Service start-up by the
# package scripts is blocked (policy-rc.d) so no system nginx is left running.
ensure_deps() {
    local pkgs=() want_nginx=0
    find_nginx || want_nginx=1
    command -v curl >/dev/null || pkgs+=(curl)
    command -v openssl >/dev/null || pkgs+=(openssl)
    [[ -x /usr/bin/time ]] || pkgs+=(time)
    command -v ps >/dev/null || pkgs+=(procps)
    command -v sha256sum >/dev/null || pkgs+=(coreutils)
    if ((${#pkgs[@]} == 0 && want_nginx == 0)); then
        return 0
    fi

    local missing="${pkgs[*]}"
    ((want_nginx)) && missing+=" nginx"
    [[ $EUID -eq 0 ]] || die "missing packages:$missing; install them or run this script as root"
    command -v apt-get >/dev/null || die "missing packages:$missing and no apt-get to install them"

    apt_update_once
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, from benches/lib.sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=1
    fi
    if ((${#pkgs[@]})); then
        apt_install "${pkgs[@]}"
    fi
    if ((want_nginx)); then
        apt_install nginx-light || apt_install nginx
    fi
    if ((POLICY_RC_CREATED)); then
        rm -f /usr/sbin/policy-rc.d
        POLICY_RC_CREATED=0
    fi
    find_nginx || die "nginx still not found after installing it"
}

build_blobstage() {
    command -v cargo >/dev/null || die "cargo not found; install a Rust toolchain (rustup) first"
    log "building: cargo build --release -p blobstage"
    (cd "$REPO_ROOT" && cargo build --release -p blobstage) >&2 || die "cargo build failed"
    [[ -x $BLOBSTAGE_BIN ]] || die "no binary at $BLOBSTAGE_BIN after the build"
}

make_workdir() {
    local base=${TMPDIR:-/tmp}
    WORK=$(mktemp -d "$base/blobstage-bench.XXXX")
    [[ $WORK != *[\"\\]* ]] || die "work dir path contains a quote or backslash: $WORK"
    mkdir -p "$WORK/www" "$WORK/results" "$WORK/nginx-tmp"
    log "work dir: $WORK"

    # Room for the served blob plus one downloaded copy, with a margin.
    local need_kib=$(((2 * SIZE_MIB + 256) * 1024)) avail_kib
    avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
    ((avail_kib >= need_kib)) ||
        die "not enough space in $base: need $((need_kib / 1024)) MiB, have $((avail_kib / 1024)) MiB"
}

make_blob() {
    local blob="$WORK/www/blob.bin"
    log "writing ${SIZE_MIB} MiB of random data to $blob"
    head -c "$SIZE_BYTES" /dev/urandom >"$blob"
    chmod 644 "$blob"
    EXPECTED_HEX=$(sha256sum "$blob" | awk '{ print $1 }')
    log "sha256: $EXPECTED_HEX"
    # Flush the dirty pages now so write-back does not overlap the first run.
    # The file stays in the page cache; nothing is dropped from it.
    sync
}

# ---------------------------------------------------------------- nginx

# Hook: the access-log directives of the http block (indented 4 after the first line).
nginx_access_conf() { printf 'access_log off;'; }
# Hook: more server-block directives, each line starting with a newline and 8 spaces.
nginx_server_extra() { :; }

write_nginx_conf() {
    local port=$1 user_line=""
    # As root the workers would otherwise run as "nobody", which cannot enter a
    # mode-0700 work dir.
    [[ $EUID -eq 0 ]] && user_line="user root;"
    cat >"$WORK/nginx.conf" <<EOF
daemon off;
$user_line
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;

events {
    worker_connections 1024;
}

http {
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    $(nginx_access_conf)
    gzip off;
    keepalive_timeout 65;
    client_body_temp_path $WORK/nginx-tmp/client_body;

    server {
        listen 127.0.0.1:$port;
        root $WORK/www;
        location / { }$(nginx_server_extra)
    }
}
EOF
}

# Waits until our nginx serves our token file; fails if it died meanwhile.
wait_nginx_ready() {
    local port=$1 token=$2 i got
    for ((i = 0; i < 100; i++)); do
        proc_alive "$NGINX_PID" || return 1
        got=$(curl -s --noproxy '*' --max-time 1 "http://127.0.0.1:$port/ready.txt" 2>/dev/null || true)
        [[ $got == "$token" ]] && return 0
        sleep 0.1
    done
    return 1
}

# blobstage downloads with parallel Range requests: make sure they work.
check_range_support() {
    local code
    code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' -r 0-1023 \
        "http://127.0.0.1:$PORT/blob.bin" || true)
    [[ $code == 206 ]] || die "nginx answered a Range request with HTTP $code, expected 206"
}

start_nginx() {
    local token port tested=0
    token="ready-$$-$RANDOM$RANDOM"
    printf '%s' "$token" >"$WORK/www/ready.txt"
    chmod 644 "$WORK/www/ready.txt"

    for ((port = BENCH_PORT; port < BENCH_PORT + 20; port++)); do
        if port_in_use "$port"; then
            log "port $port is in use, trying the next one"
            continue
        fi
        write_nginx_conf "$port"
        if ((!tested)); then
            "$NGINX_BIN" -t -p "$WORK/" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" \
                >"$WORK/nginx-test.log" 2>&1 ||
                die "nginx rejected the config: $(cat "$WORK/nginx-test.log")"
            tested=1
        fi
        "$NGINX_BIN" -p "$WORK/" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" \
            >"$WORK/nginx.stdout" 2>&1 </dev/null &
        NGINX_PID=$!
        if wait_nginx_ready "$port" "$token"; then
            PORT=$port
            log "nginx (pid $NGINX_PID) serving $WORK/www on 127.0.0.1:$PORT"
            check_range_support
            return 0
        fi
        log "nginx did not come up on port $port: $(tail -n 3 "$WORK/nginx-error.log" 2>/dev/null)"
        stop_nginx
    done
    die "could not start nginx on ports $BENCH_PORT..$((BENCH_PORT + 19))"
}

# ---------------------------------------------------------------- blobstage config

write_blobstage_config() {
    cat >"$WORK/blobstage.toml" <<EOF
state_dir = "$WORK/state"
node_id = "bench"

[control_plane]
registry = "$WORK/registry.json"
events_log = "$WORK/events.jsonl"

[transfer]
chunk_size = "${CHUNK_MIB}MiB"
connections_per_blob = $CONNECTIONS_PER_BLOB
max_connections = $MAX_CONNECTIONS

[[policy.allow]]
source_type = "https"
host = "127.0.0.1"
insecure_http = true
EOF
    cat >"$WORK/registry.json" <<EOF
{"artifacts": [{"id": "$ARTIFACT_ID", "project": "bench", "artifact_kind": "blob",
  "source": {"source_type": "https", "uri": "http://127.0.0.1:$PORT/blob.bin", "source_ref": null, "size_bytes": $SIZE_BYTES, "content_encoding": null},
  "digest": "sha256:$EXPECTED_HEX", "lifecycle_state": "active", "trust_state": "verified", "channel": "prod",
  "source_policy": {"decision": "allow", "policy_id": "bench@1"}}]}
EOF
}

# ---------------------------------------------------------------- timed runs

# timed TOOL RUN CMD... : runs CMD under /usr/bin/time, appends
# "run tool wall user sys maxrss_kib" to results/all.txt. Returns CMD's status.
# The caller redirects CMD's stdout/stderr.
timed() {
    local tool=$1 run=$2 rc=0
    shift 2
    local tfile="$WORK/results/time.last"
    /usr/bin/time -f '%e %U %S %M' -o "$tfile" "$@" || rc=$?
    # On a non-zero exit, time writes "Command exited with ..." before the line.
    local line
    line=$(tail -n 1 "$tfile")
    printf '%s %s %s\n' "$run" "$tool" "$line" >>"$WORK/results/all.txt"
    return "$rc"
}

reset_state() {
    if [[ -e $WORK/state ]]; then
        chmod -R u+w "$WORK/state"
        rm -rf "$WORK/state"
    fi
}

# verify_published PATH: dies unless PATH is a file with the blob's sha256.
verify_published() {
    local published=$1 got
    [[ -f $published ]] || die "blobstage's published path is not a file: $published"
    got=$(sha256sum "$published" | awk '{ print $1 }')
    [[ $got == "$EXPECTED_HEX" ]] ||
        die "DIGEST MISMATCH: $published has sha256 $got, expected $EXPECTED_HEX"
}

# ---------------------------------------------------------------- report

# The report's "host:" line.
host_line() {
    local cpu_model sha_ni
    cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    [[ -n $cpu_model ]] || cpu_model=unknown
    if grep -qw sha_ni /proc/cpuinfo; then sha_ni=yes; else sha_ni=no; fi
    echo "host: nproc=$(nproc), cpu=\"$cpu_model\", sha_ni=$sha_ni, kernel $(uname -r)"
}

# The file system type of the work dir.
work_fstype() {
    local fstype
    fstype=$(df --output=fstype "$WORK" 2>/dev/null | tail -n 1)
    [[ -n $fstype ]] || fstype=$(stat -f -c %T "$WORK")
    echo "$fstype"
}

repo_commit() { git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo none; }

# save_report NAME CMD...: runs CMD (which prints the report) into the work dir, copies it to
# bench-results/NAME-<date>-<time>.md in the repo and prints it.
save_report() {
    local name=$1 results_dir="$REPO_ROOT/bench-results" report
    shift
    mkdir -p "$results_dir"
    report="$results_dir/$name-$(date '+%Y-%m-%d-%H%M%S').md"
    "$@" >"$WORK/report.md"
    cp "$WORK/report.md" "$report"
    cat "$WORK/report.md"
    log "results written to $report"
}
