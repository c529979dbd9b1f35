#!/usr/bin/env bash
# benches/stage.sh — staging benchmark for blobstage.
#
# Serves a random SIZE_MIB MiB file from a local nginx on 127.0.0.1 and times,
# RUNS times each with the order rotated per run:
#   blobstage  `blobstage fetch --config <cfg> bench/blob@1` (download + sha256 + publish)
#   curl       `curl -s -o <file> http://127.0.0.1:PORT/blob.bin` (download-to-disk bound)
#   openssl    `openssl dgst -sha256 <file>`                      (hashing bound)
# then prints a Markdown table and writes it to bench-results/stage-<date>.md.
#
# Environment:
#   SIZE_MIB=2048       size of the test blob in MiB
#   RUNS=3              timed runs per tool
#   SKIP_BLOBSTAGE=1    do not build or run blobstage (tests the harness only)
#   KEEP_WORKDIR=1      keep the work dir (logs, config) instead of deleting it
#   BENCH_PORT=18080    first port tried for nginx (the next 19 are tried too)
# See benches/README.md for how to read the output.

set -euo pipefail
export LC_ALL=C

SIZE_MIB=${SIZE_MIB:-2048}
RUNS=${RUNS:-3}
SKIP_BLOBSTAGE=${SKIP_BLOBSTAGE:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
BENCH_PORT=${BENCH_PORT:-18080}

# Targets (see README): blobstage wall <= RATIO_TARGET x bound, peak RSS < RSS_TARGET_MIB.
RATIO_TARGET=1.15
RSS_TARGET_MIB=64

ARTIFACT_ID="bench/blob@1"
TOOLS_ALL=(blobstage curl openssl)

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
BLOBSTAGE_BIN="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/blobstage"

# Globals filled in as we go.
WORK=""
NGINX_BIN=""
NGINX_PID=""
PORT=""
SIZE_BYTES=0
EXPECTED_HEX=""
POLICY_RC_CREATED=0
APT_UPDATED=0

# ---------------------------------------------------------------- helpers

log() { printf '[stage-bench] %s\n' "$*" >&2; }
die() { printf '[stage-bench] ERROR: %s\n' "$*" >&2; exit 1; }

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

cleanup() {
    local rc=$?
    set +e
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
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- setup

check_args() {
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
        printf '#!/bin/sh\n# temporary, from benches/stage.sh\nexit 101\n' >/usr/sbin/policy-rc.d
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
    access_log off;
    gzip off;
    keepalive_timeout 65;
    client_body_temp_path $WORK/nginx-tmp/client_body;

    server {
        listen 127.0.0.1:$port;
        root $WORK/www;
        location / { }
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
chunk_size = "16MiB"
connections_per_blob = 8
max_connections = 32

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

run_blobstage() {
    local run=$1 out="$WORK/blobstage.stdout" err="$WORK/blobstage.stderr"
    reset_state
    if ! timed blobstage "$run" \
        "$BLOBSTAGE_BIN" fetch --config "$WORK/blobstage.toml" "$ARTIFACT_ID" >"$out" 2>"$err"; then
        log "blobstage fetch failed (run $run); last lines of its stderr:"
        tail -n 20 "$err" >&2 || true
        die "blobstage fetch failed"
    fi
    ((run == 1)) || return 0
    # Check the result once, outside the timed section.
    local published
    published=$(awk 'NF { last = $0 } END { print last }' "$out")
    [[ -n $published ]] || die "blobstage printed no published path on stdout"
    [[ -f $published ]] || die "blobstage's published path is not a file: $published"
    local got
    got=$(sha256sum "$published" | awk '{ print $1 }')
    [[ $got == "$EXPECTED_HEX" ]] ||
        die "DIGEST MISMATCH: $published has sha256 $got, expected $EXPECTED_HEX"
    log "run 1: blobstage published $published, sha256 verified"
}

run_curl() {
    local run=$1 out="$WORK/curl.out"
    rm -f "$out"
    timed curl "$run" curl -s --fail --noproxy '*' -o "$out" "http://127.0.0.1:$PORT/blob.bin" \
        >/dev/null 2>"$WORK/curl.stderr" || die "curl failed: $(cat "$WORK/curl.stderr")"
    local got
    got=$(stat -c %s "$out")
    ((got == SIZE_BYTES)) || die "curl downloaded $got bytes, expected $SIZE_BYTES"
    rm -f "$out"
}

run_openssl() {
    local run=$1 out="$WORK/openssl.out"
    timed openssl "$run" openssl dgst -sha256 "$WORK/www/blob.bin" >"$out" 2>&1 ||
        die "openssl dgst failed: $(cat "$out")"
    if ((run == 1)); then
        local got
        got=$(awk '{ print $NF }' "$out")
        [[ $got == "$EXPECTED_HEX" ]] || die "openssl digest $got differs from sha256sum's $EXPECTED_HEX"
    fi
}

run_all() {
    local tools=("$@") n=$# run k tool
    : >"$WORK/results/all.txt"
    for ((run = 1; run <= RUNS; run++)); do
        local order=()
        for ((k = 0; k < n; k++)); do
            order+=("${tools[$(((run - 1 + k) % n))]}")
        done
        log "run $run/$RUNS: ${order[*]}"
        for tool in "${order[@]}"; do
            "run_$tool" "$run"
            # Write back what the tool wrote (its output is deleted anyway) so
            # the next measurement starts without dirty pages. Not a cache drop.
            sync
        done
    done
}

# ---------------------------------------------------------------- report

# column TOOL FIELD: prints the field (3=wall 4=user 5=sys 6=rss, 0=user+sys) per run.
column() {
    local tool=$1 field=$2
    awk -v t="$tool" -v f="$field" '$2 == t { if (f == 0) printf "%.2f\n", $4 + $5; else print $f }' \
        "$WORK/results/all.txt"
}

tool_label() {
    case $1 in
        blobstage) echo "blobstage fetch" ;;
        curl) echo "curl (download to disk)" ;;
        openssl) echo "openssl dgst -sha256 (hash only)" ;;
    esac
}

# Fills STAT_* for a tool.
compute_stats() {
    local tool=$1
    STAT_WALL=$(column "$tool" 3 | median)
    STAT_MIN=$(column "$tool" 3 | min_of)
    STAT_MAX=$(column "$tool" 3 | max_of)
    STAT_CPU=$(column "$tool" 0 | median | awk '{ printf "%.2f", $1 }')
    STAT_RSS_MIB=$(column "$tool" 6 | median | awk '{ printf "%.1f", $1 / 1024 }')
    STAT_RSS_MAX_MIB=$(column "$tool" 6 | max_of | awk '{ printf "%.1f", $1 / 1024 }')
    STAT_MBS=$(awk -v b="$SIZE_BYTES" -v w="$STAT_WALL" \
        'BEGIN { if (w > 0) printf "%.0f", b / w / 1e6; else print "n/a" }')
}

print_report() {
    local tools=("$@") tool
    local cpu_model sha_ni fstype commit
    cpu_model=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    [[ -n $cpu_model ]] || cpu_model=unknown
    if grep -qw sha_ni /proc/cpuinfo; then sha_ni=yes; else sha_ni=no; fi
    fstype=$(df --output=fstype "$WORK" 2>/dev/null | tail -n 1)
    [[ -n $fstype ]] || fstype=$(stat -f -c %T "$WORK")
    commit=$(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo none)

    echo "# blobstage stage benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    echo "host: nproc=$(nproc), cpu=\"$cpu_model\", sha_ni=$sha_ni, kernel $(uname -r)"
    echo "setup: blob ${SIZE_MIB} MiB ($SIZE_BYTES bytes), $RUNS runs per tool, nginx on 127.0.0.1 (loopback), source in page cache, work dir on $fstype, repo commit $commit"
    echo
    echo "| tool | runs | wall median (s) | wall min–max (s) | MB/s | CPU user+sys median (s) | peak RSS median (MiB) |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    local bs_wall="" bs_rss_max="" curl_wall="" openssl_wall=""
    for tool in "${tools[@]}"; do
        compute_stats "$tool"
        printf '| %s | %d | %s | %s–%s | %s | %s | %s |\n' \
            "$(tool_label "$tool")" "$RUNS" "$STAT_WALL" "$STAT_MIN" "$STAT_MAX" \
            "$STAT_MBS" "$STAT_CPU" "$STAT_RSS_MIB"
        case $tool in
            blobstage) bs_wall=$STAT_WALL bs_rss_max=$STAT_RSS_MAX_MIB ;;
            curl) curl_wall=$STAT_WALL ;;
            openssl) openssl_wall=$STAT_WALL ;;
        esac
    done
    is_true "$SKIP_BLOBSTAGE" && echo "| blobstage fetch | 0 | skipped (SKIP_BLOBSTAGE=1) | | | | |"
    echo

    local bound
    bound=$(awk -v a="$curl_wall" -v b="$openssl_wall" 'BEGIN { printf "%.2f", (a > b ? a : b) }')
    if [[ -n $bs_wall ]]; then
        local ratio ratio_verdict rss_verdict
        ratio=$(awk -v w="$bs_wall" -v b="$bound" 'BEGIN { if (b > 0) printf "%.2f", w / b; else print "n/a" }')
        ratio_verdict=$(awk -v r="$ratio" -v t="$RATIO_TARGET" 'BEGIN { print (r != "n/a" && r + 0 <= t + 0) ? "PASS" : "MISS" }')
        rss_verdict=$(awk -v m="$bs_rss_max" -v t="$RSS_TARGET_MIB" 'BEGIN { print (m + 0 < t + 0) ? "PASS" : "MISS" }')
        echo "bound = max(curl, openssl) = $bound s; blobstage / bound = $ratio"
        echo
        echo "target: blobstage / bound <= $RATIO_TARGET: $ratio_verdict ($ratio); peak RSS < $RSS_TARGET_MIB MiB: $rss_verdict (max over runs $bs_rss_max MiB)"
    else
        echo "bound = max(curl, openssl) = $bound s; blobstage / bound = n/a (blobstage skipped)"
        echo
        echo "target: blobstage / bound <= $RATIO_TARGET: n/a; peak RSS < $RSS_TARGET_MIB MiB: n/a (blobstage skipped)"
    fi
    echo
    echo "<details><summary>raw runs</summary>"
    echo
    echo "| run | tool | wall (s) | user (s) | sys (s) | max RSS (KiB) |"
    echo "|---:|---|---:|---:|---:|---:|"
    awk '{ printf "| %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6 }' "$WORK/results/all.txt"
    echo
    echo "</details>"
}

# ---------------------------------------------------------------- main

main() {
    check_args
    ensure_deps
    [[ $EUID -eq 0 ]] || log "note: not root; nginx workers must be able to read the work dir"

    local tools=()
    if is_true "$SKIP_BLOBSTAGE"; then
        log "SKIP_BLOBSTAGE set: not building or running blobstage"
        tools=(curl openssl)
    else
        build_blobstage
        tools=("${TOOLS_ALL[@]}")
    fi

    make_workdir
    make_blob
    start_nginx
    write_blobstage_config

    run_all "${tools[@]}"

    local results_dir="$REPO_ROOT/bench-results" report
    mkdir -p "$results_dir"
    report="$results_dir/stage-$(date '+%Y-%m-%d-%H%M%S').md"
    print_report "${tools[@]}" >"$WORK/report.md"
    cp "$WORK/report.md" "$report"
    cat "$WORK/report.md"
    log "results written to $report"
}

main "$@"
