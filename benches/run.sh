#!/usr/bin/env bash
# benches/run.sh — the whole blobstage benchmark suite in one run (issue 9).
#
# Installs its peers (Debian: nginx, curl, openssl, aria2, rclone, time; PyPI in a virtualenv:
# hf_transfer, matplotlib), builds blobstage in release, starts one private nginx on 127.0.0.1
# and measures, alternating the tools, several runs each:
#   part 1  unthrottled origin, SIZE_MIB: wall time to a VERIFIED file, CPU, peak RSS, for
#           blobstage, curl|tee|openssl, aria2c, rclone, hf_transfer, and the bound
#           max(curl -o, openssl dgst -sha256) as stage.sh computes it
#   part 2  origin capped per connection (nginx limit_rate CAP_MIBPS): throughput against the
#           number of connections, for blobstage, aria2c, rclone
#   part 3  blobstage alone at SCALE_SIZES_MIB: wall time and peak RSS against blob size
#   part 4  SMALL_COUNT blobs of SMALL_KIB through the daemon (blobstage serve), SMALL_CLIENTS
#           concurrent clients on its Unix socket: pulls per second, end to end
#   part 5  benches/resume.sh (kill -9 at 50 %), its headline numbers
# and writes bench-results/<YYYY-MM-DD-HHMMSS>/: summary.md (tables, machine, load), PNG plots,
# the raw measurements (raw.tsv ...) and resume.md. See benches/README.md.
#
# Environment (defaults in brackets; QUICK=1 changes the defaults to a small smoke run):
#   PARTS="1 2 3 4 5"   parts to run          RUNS=3            runs per tool (parts 1, 2)
#   SIZE_MIB=2048       part 1 blob           PEERS="pipe aria2c rclone hf_transfer"
#   PEER_STREAMS=16     connections of the peers in part 1
#   CAP_MIBPS=16        part 2 per-connection cap (MiB/s)   CAP_SIZE_MIB=512   part 2 blob
#   CAP_CONNS="1 2 4 8 16 32"    CAP_TOOLS="blobstage aria2c rclone"   CAP_RUNS=$RUNS
#   CAP_AUTO=1          also blobstage with its default connections, grown as they pay off,
#                       on a blob of CAP_AUTO_SIZE_MIB=2048 (growing takes seconds)
#   SCALE_SIZES_MIB="256 1024 2048 4096 8192"   SCALE_RUNS=2
#   SMALL_COUNT=1000  SMALL_KIB=1024  SMALL_CLIENTS=16  SMALL_RUNS=3  SMALL_MAX_TRANSFERS=16
#   RESUME_SIZE_MIB=2048  RESUME_RUNS=3
#   KEEP_WORKDIR=0  BENCH_PORT=18080  TMPDIR=/tmp  VENV=<repo>/target/bench-venv
#   PAGE_REPORTING=keep   "off" (root only): stop a VM guest from reporting free pages to its
#           host while the suite runs (restored at exit), and touch the guest's free memory once
#           before part 1; see "Free page reporting" in benches/README.md. The machine table
#           says what was reported either way.

set -euo pipefail
export LC_ALL=C

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    d_runs=1 d_size=256 d_cap_size=64 d_cap_auto_size=128 d_scale="64 128 256" d_scale_runs=1
    d_small=100 d_small_runs=1 d_resume_size=512 d_resume_runs=1
else
    d_runs=3 d_size=2048 d_cap_size=512 d_cap_auto_size=2048 d_scale="256 1024 2048 4096 8192" d_scale_runs=2
    d_small=1000 d_small_runs=3 d_resume_size=2048 d_resume_runs=3
fi
PARTS=${PARTS:-1 2 3 4 5}
RUNS=${RUNS:-$d_runs}
SIZE_MIB=${SIZE_MIB:-$d_size}
PEERS=${PEERS:-pipe aria2c rclone hf_transfer}
PEER_STREAMS=${PEER_STREAMS:-16}
CAP_MIBPS=${CAP_MIBPS:-16}
CAP_SIZE_MIB=${CAP_SIZE_MIB:-$d_cap_size}
CAP_CONNS=${CAP_CONNS:-1 2 4 8 16 32}
CAP_TOOLS=${CAP_TOOLS:-blobstage aria2c rclone}
CAP_RUNS=${CAP_RUNS:-$RUNS}
CAP_AUTO=${CAP_AUTO:-1}
CAP_AUTO_SIZE_MIB=${CAP_AUTO_SIZE_MIB:-$d_cap_auto_size}
SCALE_SIZES_MIB=${SCALE_SIZES_MIB:-$d_scale}
SCALE_RUNS=${SCALE_RUNS:-$d_scale_runs}
SMALL_COUNT=${SMALL_COUNT:-$d_small}
SMALL_KIB=${SMALL_KIB:-1024}
SMALL_CLIENTS=${SMALL_CLIENTS:-16}
SMALL_RUNS=${SMALL_RUNS:-$d_small_runs}
SMALL_MAX_TRANSFERS=${SMALL_MAX_TRANSFERS:-16}
RESUME_SIZE_MIB=${RESUME_SIZE_MIB:-$d_resume_size}
RESUME_RUNS=${RESUME_RUNS:-$d_resume_runs}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
BENCH_PORT=${BENCH_PORT:-18080}
PAGE_REPORTING=${PAGE_REPORTING:-keep}
# The free page reporting of a virtio-balloon guest (absent elsewhere).
REPORTING_DIR=/sys/module/page_reporting/parameters
REPORTING_ORDER_WAS=""

ARTIFACT_ID="bench/blob@1"
LOG_TAG="run-bench"
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"
VENV=${VENV:-$REPO_ROOT/target/bench-venv}
PY="$VENV/bin/python"
OUT=""
FAILED=0
DAEMON_PID=""

# Also stop a daemon of part 4, then the rest (nginx, work dir) as lib.sh does.
run_cleanup() {
    local rc=$?
    set +e
    if [[ -n $DAEMON_PID ]] && proc_alive "$DAEMON_PID"; then
        kill -KILL "$DAEMON_PID" 2>/dev/null
        wait "$DAEMON_PID" 2>/dev/null
    fi
    if [[ -n $REPORTING_ORDER_WAS ]]; then
        echo "$REPORTING_ORDER_WAS" >"$REPORTING_DIR/page_reporting_order"
    fi
    (exit "$rc")
    cleanup
}
trap run_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

has_part() { [[ " $PARTS " == *" $1 "* ]]; }

# ---------------------------------------------------------------- set-up

# A VM guest with free page reporting gives every free 2 MiB block back to its host within
# seconds; the next write that gets such a page faults in the host. Every run here frees the
# file it wrote, so the next tool pays for it: measured on the benchmark's VM, 2 GiB written
# into fresh pages cost 15-30 s of system time when the host was busy, against 0.6 s into pages
# just freed. PAGE_REPORTING=off raises the reporting order above the largest page order, so
# nothing is reported until the suite ends, and then writes once to 90 % of the available
# memory: a guest booted minutes ago has never used most of its memory, and the host backs each
# page on first touch (measured here: 20 GiB in 57 s the first time, 11 s on every later pass;
# without it, the first 8 GiB run of part 3 took 24 s and the second 7.5 s).
page_reporting() {
    [[ -r $REPORTING_DIR/page_reporting_order ]] || return 0
    meta page_reporting_order "$(cat "$REPORTING_DIR/page_reporting_order")"
    [[ -r $REPORTING_DIR/reported_kib ]] && meta reported_kib_start "$(cat "$REPORTING_DIR/reported_kib")"
    case $PAGE_REPORTING in
        keep) ;;
        off)
            [[ -w $REPORTING_DIR/page_reporting_order ]] || die "PAGE_REPORTING=off needs root"
            REPORTING_ORDER_WAS=$(cat "$REPORTING_DIR/page_reporting_order")
            echo 11 >"$REPORTING_DIR/page_reporting_order"
            log "free page reporting off for the suite (order $REPORTING_ORDER_WAS -> 11)"
            touch_memory
            ;;
        *) die "PAGE_REPORTING is keep or off, not $PAGE_REPORTING" ;;
    esac
}

# touch_memory: writes to 90 % of MemAvailable once, in anonymous memory freed at exit.
touch_memory() {
    local mib t=$SECONDS
    mib=$(awk '/^MemAvailable/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    log "touching ${mib} MiB of free memory once, so that no run pays the host's first touch"
    "$PY" - "$mib" <<'PYEOF' || die "touching memory failed"
import mmap, sys
size, step = int(sys.argv[1]) << 20, 64 << 20
block = b"\x01" * step
m = mmap.mmap(-1, size)
for off in range(0, size - step + 1, step):
    m[off:off + step] = block
m.close()
PYEOF
    meta touched_mib "$mib"
    meta touch_s "$((SECONDS - t))"
}

ensure_peers() {
    ensure_deps # nginx, curl, openssl, time, procps, coreutils (lib.sh)
    local pkgs=()
    command -v aria2c >/dev/null || pkgs+=(aria2)
    command -v rclone >/dev/null || pkgs+=(rclone)
    command -v python3 >/dev/null || pkgs+=(python3 python3-venv)
    if ((${#pkgs[@]})); then
        [[ $EUID -eq 0 ]] || die "missing packages: ${pkgs[*]}; install them or run as root"
        apt_update_once
        apt_install "${pkgs[@]}"
    fi
    if ! "$PY" -c 'import hf_transfer, matplotlib' 2>/dev/null; then
        log "making the virtualenv $VENV (hf_transfer, matplotlib from PyPI)"
        python3 -m venv "$VENV" >&2 || {
            apt_update_once
            apt_install python3-venv
            python3 -m venv "$VENV" >&2
        }
        "$VENV/bin/pip" install -q hf_transfer matplotlib >&2 || die "pip install hf_transfer matplotlib failed"
    fi
}

check_disk() {
    local max=$SIZE_MIB s need_kib avail_kib
    for s in $SCALE_SIZES_MIB $((CAP_SIZE_MIB + CAP_AUTO_SIZE_MIB)) $RESUME_SIZE_MIB; do ((s > max)) && max=$s; done
    # The served blob, one downloaded copy, the small blobs, a margin.
    need_kib=$(((2 * max + 2 * SMALL_COUNT * SMALL_KIB / 1024 + 1024) * 1024))
    avail_kib=$(df -Pk "$WORK" | awk 'NR == 2 { print $4 }')
    log "disk: $((avail_kib / 1024)) MiB free in $WORK, need about $((need_kib / 1024)) MiB"
    ((avail_kib >= need_kib)) || die "not enough disk space: need $((need_kib / 1024)) MiB, have $((avail_kib / 1024)) MiB"
}

# gen_blob PATH MIB: writes MIB MiB of pseudo-random bytes (AES-CTR keystream: fast and
# incompressible), syncs, prints the sha256.
gen_blob() {
    local path=$1 mib=$2
    openssl enc -aes-128-ctr -pass "pass:blobstage-$mib-$RANDOM" -nosalt -pbkdf2 </dev/zero 2>/dev/null |
        head -c $((mib * 1024 * 1024)) >"$path" || true
    [[ $(stat -c %s "$path") == $((mib * 1024 * 1024)) ]] || die "could not write $mib MiB to $path"
    chmod 644 "$path"
    sync
    sha256sum "$path" | awk '{ print $1 }'
}

# nginx: one location without a limit (/...) and one capped per connection (/capped/...).
nginx_server_extra() {
    printf '\n        location /capped/ { alias %s/www/; limit_rate %sm; }' "$WORK" "$CAP_MIBPS"
}

# write_cfg FILE CONNECTIONS URI SIZE HEX [EXTRA_TRANSFER_LINES]: a blobstage config with a
# one-artifact registry beside it (FILE.registry.json).
write_cfg() {
    local file=$1 conns=$2 uri=$3 size=$4 hex=$5 extra=${6:-}
    local maxc=$((conns > 32 ? conns : 32))
    cat >"$file" <<EOF
state_dir = "$WORK/state"
node_id = "bench"

[control_plane]
registry = "$file.registry.json"
events_log = "$WORK/events.jsonl"

[transfer]
chunk_size = "${CHUNK_MIB}MiB"
connections_per_blob = $conns
max_connections = $maxc
$extra
[[policy.allow]]
source_type = "https"
host = "127.0.0.1"
insecure_http = true
EOF
    cat >"$file.registry.json" <<EOF
{"artifacts": [$(registry_entry "$ARTIFACT_ID" "$uri" "$size" "$hex")]}
EOF
}

registry_entry() {
    printf '{"id": "%s", "project": "bench", "artifact_kind": "blob", "source": {"source_type": "https", "uri": "%s", "source_ref": null, "size_bytes": %s, "content_encoding": null}, "digest": "sha256:%s", "lifecycle_state": "active", "trust_state": "verified", "channel": "prod", "source_policy": {"decision": "allow", "policy_id": "bench@1"}}' "$1" "$2" "$3" "$4"
}

# ---------------------------------------------------------------- measuring

# measure PART TOOL PARAM RUN CMD...: runs CMD under /usr/bin/time (stdout and stderr to
# $WORK/last.out / last.err) and appends "part tool param run wall user sys maxrss_kib status"
# to raw.tsv. A failing command is recorded (status != 0) and reported, not fatal.
measure() {
    local part=$1 tool=$2 param=$3 run=$4 rc=0 line
    shift 4
    /usr/bin/time -f '%e %U %S %M' -o "$WORK/time.last" "$@" >"$WORK/last.out" 2>"$WORK/last.err" || rc=$?
    line=$(tail -n 1 "$WORK/time.last")
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$part" "$tool" "$param" "$run" "${line// /$'\t'}" "$rc" >>"$OUT/raw.tsv"
    if ((rc != 0)); then
        FAILED=1
        log "FAILED: part $part $tool $param run $run (exit $rc): $(tail -n 5 "$WORK/last.err" | tr '\n' ' ')"
    fi
    log "part $part run $run $tool ${param}: $line (wall user sys rss_kib)"
    return 0
}

url_of() { printf 'http://127.0.0.1:%s/%s' "$PORT" "$1"; }

# tool_cmd TOOL STREAMS URLPATH HEX: sets CMD to the command that gets a verified copy of the
# blob into $WORK/dl/file (curl: an unverified copy; openssl: only the hash of the served file).
# shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
PIPE_SH='set -o pipefail; h=$(curl -s --fail --noproxy "*" "$1" | tee "$2" | openssl dgst -sha256 -r | cut -d" " -f1); [ "$h" = "$3" ]'
# shellcheck disable=SC2016
RCLONE_SH='rclone copyto --config /dev/null -q --http-url "$5" ":http:$1" "$2" --multi-thread-streams "$3" --multi-thread-cutoff 1M && echo "$4  $2" | sha256sum -c --quiet -'
# shellcheck disable=SC2016
HF_SH='"$5" -c "import sys, hf_transfer; hf_transfer.download(sys.argv[1], sys.argv[2], max_files=int(sys.argv[3]), chunk_size=16 << 20)" "$1" "$2" "$3" && echo "$4  $2" | sha256sum -c --quiet -'
CMD=()
tool_cmd() {
    local tool=$1 n=$2 path=$3 hex=$4 url out="$WORK/dl/file"
    url=$(url_of "$path")
    case $tool in
        curl) CMD=(curl -s --fail --noproxy '*' -o "$out" "$url") ;;
        # The same, made durable as blobstage makes a blob (coreutils `sync FILE` is fsync).
        curl_sync) CMD=(bash -c 'curl -s --fail --noproxy "*" -o "$1" "$2" && sync "$1"' _ "$out" "$url") ;;
        openssl) CMD=(openssl dgst -sha256 "$WORK/www/${path#capped/}") ;;
        # One pipe: download, keep a copy, hash; the hash is compared in the same command.
        pipe) CMD=(bash -c "$PIPE_SH" _ "$url" "$out" "$hex") ;;
        aria2c)
            CMD=(aria2c -q -x "$n" -s "$n" -k 1M --file-allocation=falloc --allow-overwrite=true
                --auto-file-renaming=false --checksum=sha-256="$hex" -d "$WORK/dl" -o file "$url")
            ;;
        rclone) CMD=(bash -c "$RCLONE_SH" _ "$path" "$out" "$n" "$hex" "http://127.0.0.1:$PORT") ;;
        hf_transfer) CMD=(bash -c "$HF_SH" _ "$url" "$out" "$n" "$hex" "$PY") ;;
        *) die "unknown tool $tool" ;;
    esac
}

# run_tool PART TOOL PARAM RUN STREAMS URLPATH HEX CFG
run_tool() {
    local part=$1 tool=$2 param=$3 run=$4 n=$5 path=$6 hex=$7 cfg=$8
    rm -rf "$WORK/dl"
    mkdir -p "$WORK/dl"
    if [[ $tool == blobstage ]]; then
        reset_state
        measure "$part" blobstage "$param" "$run" env BLOBSTAGE_LOG=warn,blobstage::stage=info "$BLOBSTAGE_BIN" fetch --json --config "$cfg" "$ARTIFACT_ID"
        # The per-phase timings of its "staged" log line, and the check of the published
        # file on the first run (outside the timing).
        local f phases=""
        for f in transfer_ms hash_tail_ms publish_ms read_back connections; do
            phases+=$'\t'$(grep -o "$f=[0-9]*" "$WORK/last.err" | tail -n 1 | cut -d= -f2)
        done
        printf '%s\t%s\t%s%s\n' "$part" "$param" "$run" "$phases" >>"$OUT/phases.tsv"
        if ((run == 1)) && [[ -s $WORK/last.out ]]; then
            local published got
            published=$(grep -o '"path":"[^"]*"' "$WORK/last.out" | cut -d'"' -f4)
            got=$(sha256sum "$published" | awk '{ print $1 }')
            [[ $got == "$hex" ]] || { FAILED=1; log "DIGEST MISMATCH in $published"; }
        fi
        reset_state
    else
        tool_cmd "$tool" "$n" "$path" "$hex"
        measure "$part" "$tool" "$param" "$run" "${CMD[@]}"
        if [[ $tool == curl && -e $WORK/dl/file ]]; then
            [[ $(stat -c %s "$WORK/dl/file") == $((SIZE_MIB * 1024 * 1024)) ]] || log "warning: curl got a short file"
        fi
    fi
    rm -rf "$WORK/dl"
    # Write back what the tool wrote (deleted anyway) so the next one starts clean. Untimed.
    sync
}

# warm_up CFG HEX TOOLS...: one unrecorded run of each tool (part 1's blob).
warm_up() {
    local cfg=$1 hex=$2 tool raw=$OUT/raw.tsv phases=$OUT/phases.tsv
    shift 2
    cp "$raw" "$WORK/raw.keep" 2>/dev/null || : >"$WORK/raw.keep"
    cp "$phases" "$WORK/phases.keep" 2>/dev/null || : >"$WORK/phases.keep"
    for tool in "$@"; do
        run_tool 1 "$tool" - 0 "$PEER_STREAMS" blob.bin "$hex" "$cfg"
    done
    mv "$WORK/raw.keep" "$raw"
    mv "$WORK/phases.keep" "$phases"
    log "warm-up runs done (not recorded)"
}

# rotated N TOOLS...: the tools rotated by N (run 1: as given, run 2: from the second, ...)
rotated() {
    local r=$1 k n
    shift
    n=$#
    local tools=("$@")
    for ((k = 0; k < n; k++)); do printf '%s ' "${tools[$(((r - 1 + k) % n))]}"; done
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
meta() { printf '%s\t%s\n' "$1" "$2" >>"$OUT/meta.tsv"; }

# ---------------------------------------------------------------- parts

part1() {
    log "part 1: unthrottled, ${SIZE_MIB} MiB"
    meta load_part1 "$(loadavg)"
    local hex run tool
    hex=$(gen_blob "$WORK/www/blob.bin" "$SIZE_MIB")
    write_cfg "$WORK/p1.toml" "$CONNECTIONS_PER_BLOB" "$(url_of blob.bin)" "$((SIZE_MIB << 20))" "$hex"
    local tools=(blobstage curl curl_sync openssl)
    for tool in $PEERS; do tools+=("$tool"); done
    # Untimed: the first run to touch this much new page cache pays for it (on the benchmark's
    # VM, 6 s of system time for 2 GiB), so each tool runs once before the measured runs.
    warm_up "$WORK/p1.toml" "$hex" "${tools[@]}"
    for ((run = 1; run <= RUNS; run++)); do
        for tool in $(rotated "$run" "${tools[@]}"); do
            run_tool 1 "$tool" - "$run" "$PEER_STREAMS" blob.bin "$hex" "$WORK/p1.toml"
        done
    done
    rm -f "$WORK/www/blob.bin"
}

part2() {
    log "part 2: capped at ${CAP_MIBPS} MiB/s per connection, ${CAP_SIZE_MIB} MiB"
    meta load_part2 "$(loadavg)"
    local hex run n tool
    hex=$(gen_blob "$WORK/www/cap.bin" "$CAP_SIZE_MIB")
    local auto_hex=""
    if [[ $CAP_AUTO == 1 ]]; then
        auto_hex=$(gen_blob "$WORK/www/cap-auto.bin" "$CAP_AUTO_SIZE_MIB")
    fi
    local tools=()
    for tool in $CAP_TOOLS; do tools+=("$tool"); done
    for ((run = 1; run <= CAP_RUNS; run++)); do
        for n in $CAP_CONNS; do
            # N connections throughout: adding connections is measured on its own below.
            write_cfg "$WORK/p2.toml" "$n" "$(url_of capped/cap.bin)" "$((CAP_SIZE_MIB << 20))" "$hex" \
                "max_connections_per_blob = $n"
            for tool in $(rotated "$run" "${tools[@]}"); do
                if [[ $tool == aria2c ]] && ((n > 16)); then
                    continue # aria2c refuses -x above 16
                fi
                run_tool 2 "$tool" "$n" "$run" "$n" capped/cap.bin "$hex" "$WORK/p2.toml"
            done
        done
        if [[ $CAP_AUTO == 1 ]]; then
            # The defaults: CONNECTIONS_PER_BLOB to start with, grown while that pays, on a
            # blob large enough for the growth to show.
            write_cfg "$WORK/p2.toml" "$CONNECTIONS_PER_BLOB" "$(url_of capped/cap-auto.bin)" "$((CAP_AUTO_SIZE_MIB << 20))" "$auto_hex"
            run_tool 2 blobstage auto "$run" "$CONNECTIONS_PER_BLOB" capped/cap-auto.bin "$auto_hex" "$WORK/p2.toml"
        fi
    done
    rm -f "$WORK/www/cap.bin" "$WORK/www/cap-auto.bin"
}

part3() {
    log "part 3: blobstage against blob size: $SCALE_SIZES_MIB MiB"
    meta load_part3 "$(loadavg)"
    local size hex run
    for size in $SCALE_SIZES_MIB; do
        hex=$(gen_blob "$WORK/www/scale.bin" "$size")
        write_cfg "$WORK/p3.toml" "$CONNECTIONS_PER_BLOB" "$(url_of scale.bin)" "$((size << 20))" "$hex"
        for ((run = 1; run <= SCALE_RUNS; run++)); do
            run_tool 3 blobstage "$size" "$run" 0 scale.bin "$hex" "$WORK/p3.toml"
        done
        rm -f "$WORK/www/scale.bin"
        reset_state
    done
}

part4() {
    log "part 4: $SMALL_COUNT blobs of $SMALL_KIB KiB through the daemon, $SMALL_CLIENTS clients"
    meta load_part4 "$(loadavg)"
    local dir="$WORK/www/small" i run
    mkdir -p "$dir"
    openssl enc -aes-128-ctr -pass "pass:small-$RANDOM" -nosalt -pbkdf2 </dev/zero 2>/dev/null |
        head -c $((SMALL_COUNT * SMALL_KIB * 1024)) |
        (cd "$dir" && split -b $((SMALL_KIB * 1024)) -a 6 -d - s) || true
    chmod 644 "$dir"/s*
    i=$(find "$dir" -type f -name 's*' | wc -l)
    ((i == SMALL_COUNT)) || die "wrote $i small blobs, wanted $SMALL_COUNT"
    sync
    (cd "$dir" && sha256sum s*) >"$WORK/small.sums"
    {
        printf '{"artifacts": ['
        awk -v base="$(url_of small/)" -v size=$((SMALL_KIB * 1024)) 'NR > 1 { printf ",\n" }
            { printf "{\"id\": \"bench/%s@1\", \"project\": \"bench\", \"artifact_kind\": \"blob\", \"source\": {\"source_type\": \"https\", \"uri\": \"%s%s\", \"source_ref\": null, \"size_bytes\": %d, \"content_encoding\": null}, \"digest\": \"sha256:%s\", \"lifecycle_state\": \"active\", \"trust_state\": \"verified\", \"channel\": \"prod\", \"source_policy\": {\"decision\": \"allow\", \"policy_id\": \"bench@1\"}}", $2, base, $2, size, $1 }' \
            "$WORK/small.sums"
        printf ']}\n'
    } >"$WORK/small.registry.json"
    awk '{ printf "bench/%s@1\n", $2 }' "$WORK/small.sums" >"$WORK/small.ids"
    cat >"$WORK/daemon.toml" <<EOF
state_dir = "$WORK/dstate"
node_id = "bench"

[control_plane]
registry = "$WORK/small.registry.json"
events_log = "$WORK/devents.jsonl"

[api]
socket = "$WORK/agent.sock"
metrics_listen = "127.0.0.1:0"

[transfer]
chunk_size = "${CHUNK_MIB}MiB"
connections_per_blob = $CONNECTIONS_PER_BLOB
max_connections = $MAX_CONNECTIONS
max_transfers = $SMALL_MAX_TRANSFERS

[[policy.allow]]
source_type = "https"
host = "127.0.0.1"
insecure_http = true
EOF
    # The configuration loader refuses unknown BLOBSTAGE_* variables: the daemon gets none.
    local unset_vars=() v
    for v in $(compgen -e); do
        if [[ $v == BLOBSTAGE_* ]]; then unset_vars+=(-u "$v"); fi
    done
    for ((run = 1; run <= SMALL_RUNS; run++)); do
        rm -rf "$WORK/dstate" "$WORK/devents.jsonl" "$WORK/agent.sock"
        sync
        env "${unset_vars[@]}" "$BLOBSTAGE_BIN" serve --config "$WORK/daemon.toml" >"$WORK/daemon.log" 2>&1 </dev/null &
        DAEMON_PID=$!
        for ((i = 0; i < 200; i++)); do
            [[ -S $WORK/agent.sock ]] && break
            proc_alive "$DAEMON_PID" || die "the daemon exited: $(tail -n 5 "$WORK/daemon.log")"
            sleep 0.05
        done
        [[ -S $WORK/agent.sock ]] || die "the daemon made no socket in 10 s"
        local rc=0 json stat hwm
        json=$("$PY" "$SCRIPT_DIR/pull_many.py" "$WORK/agent.sock" "$WORK/small.ids" "$SMALL_CLIENTS" 900) || rc=$?
        stat=$(awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$DAEMON_PID/stat") # utime stime (ticks)
        hwm=$(awk '/^VmHWM/ { print $2 }' "/proc/$DAEMON_PID/status")
        kill -TERM "$DAEMON_PID"
        for ((i = 0; i < 300; i++)); do proc_alive "$DAEMON_PID" || break; sleep 0.1; done
        proc_alive "$DAEMON_PID" && kill -KILL "$DAEMON_PID"
        wait "$DAEMON_PID" 2>/dev/null || true
        DAEMON_PID=""
        ((rc == 0)) || { FAILED=1; log "part 4 run $run: pull errors: $json"; }
        printf '%s\t%s\t%s\t%s\t%s\n' "$run" "$json" "${stat% *}" "${stat#* }" "$hwm" >>"$OUT/small.tsv"
        log "part 4 run $run: $json; daemon ticks user/sys $stat, peak RSS $hwm KiB"
        # Spot-check one published blob against its sha256 (untimed).
        local one
        one=$(find "$WORK/dstate/blobs" -type f -print -quit 2>/dev/null)
        [[ -z $one ]] || grep -q "^$(sha256sum "$one" | awk '{ print $1 }') " "$WORK/small.sums" ||
            { FAILED=1; log "part 4: $one matches no small blob's sha256"; }
    done
    meta clk_tck "$(getconf CLK_TCK)"
    rm -rf "$dir" "$WORK/dstate"
}

part5() {
    log "part 5: benches/resume.sh, ${RESUME_SIZE_MIB} MiB, $RESUME_RUNS runs"
    meta load_part5 "$(loadavg)"
    local before rc=0 report
    before=$(date +%s)
    SIZE_MIB=$RESUME_SIZE_MIB RUNS=$RESUME_RUNS BENCH_PORT=$((BENCH_PORT + 40)) KEEP_WORKDIR=0 \
        bash "$SCRIPT_DIR/resume.sh" >"$WORK/resume.out" 2>"$WORK/resume.err" || rc=$?
    # resume.sh writes bench-results/resume-<date>.md; move the one it wrote here.
    report=$(find "$REPO_ROOT/bench-results" -maxdepth 1 -name 'resume-*.md' -newermt "@$before" | sort | tail -n 1)
    if [[ -n $report ]]; then
        mv "$report" "$OUT/resume.md"
    else
        cp "$WORK/resume.out" "$OUT/resume.md"
    fi
    if ((rc != 0)); then
        FAILED=1
        log "resume.sh failed (exit $rc): $(tail -n 5 "$WORK/resume.err" | tr '\n' ' ')"
        { echo; echo "resume.sh FAILED (exit $rc):"; tail -n 5 "$WORK/resume.err"; } >>"$OUT/resume.md"
    fi
}

# ---------------------------------------------------------------- main

main() {
    local t0=$SECONDS
    SIZE_BYTES=$((SIZE_MIB * 1024 * 1024))
    ensure_peers
    build_blobstage
    make_workdir
    check_disk
    if [[ -n ${RESULTS_DIR:-} ]]; then
        # Add the parts of this invocation to an earlier one's results (e.g. a part that failed).
        OUT=$(cd "$RESULTS_DIR" && pwd) || die "RESULTS_DIR $RESULTS_DIR does not exist"
        touch "$OUT/raw.tsv" "$OUT/phases.tsv" "$OUT/small.tsv" "$OUT/meta.tsv"
    else
        OUT="$REPO_ROOT/bench-results/$(date -u '+%Y-%m-%d-%H%M%S')"
        mkdir -p "$OUT"
        : >"$OUT/raw.tsv"
        : >"$OUT/phases.tsv"
        : >"$OUT/small.tsv"
        : >"$OUT/meta.tsv"
    fi
    log "results: $OUT"

    meta started "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    meta host "$(host_line)"
    meta nproc "$(nproc)"
    meta mem "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    meta os "$(. /etc/os-release && echo "$PRETTY_NAME")"
    meta commit "$(repo_commit)"
    meta dirty "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
    meta fstype "$(work_fstype)"
    meta load_start "$(loadavg)"
    page_reporting
    meta versions "$(curl --version | head -n 1 | cut -d' ' -f1-2); $(openssl version); $(aria2c --version | head -n 1); $(rclone version | head -n 1); hf_transfer $("$PY" -c 'import importlib.metadata as m; print(m.version("hf_transfer"))'); $("$NGINX_BIN" -v 2>&1 | cut -d' ' -f3)"
    for v in QUICK PARTS RUNS SIZE_MIB PEERS PEER_STREAMS CAP_MIBPS CAP_SIZE_MIB CAP_CONNS CAP_TOOLS \
        CAP_RUNS CAP_AUTO CAP_AUTO_SIZE_MIB SCALE_SIZES_MIB SCALE_RUNS SMALL_COUNT SMALL_KIB SMALL_CLIENTS SMALL_RUNS \
        SMALL_MAX_TRANSFERS RESUME_SIZE_MIB RESUME_RUNS CHUNK_MIB CONNECTIONS_PER_BLOB MAX_CONNECTIONS \
        PAGE_REPORTING; do
        meta "var_$v" "${!v}"
    done

    # start_nginx checks a Range request on blob.bin: a placeholder until part 1 writes it.
    head -c 4096 /dev/zero >"$WORK/www/blob.bin"
    chmod 644 "$WORK/www/blob.bin"
    start_nginx
    local p
    for p in 1 2 3 4; do
        if has_part "$p"; then "part$p"; fi
    done
    # resume.sh starts its own nginx and work dir; ours is not needed any more.
    stop_nginx
    if has_part 5; then part5; fi

    meta load_end "$(loadavg)"
    [[ -r $REPORTING_DIR/reported_kib ]] && meta reported_kib_end "$(cat "$REPORTING_DIR/reported_kib")"
    meta duration_s "$((SECONDS - t0))"
    meta failed "$FAILED"
    "$PY" "$SCRIPT_DIR/report.py" "$OUT" || die "report.py failed"
    cat "$OUT/summary.md"
    log "results in $OUT ($((SECONDS - t0)) s)"
    ((FAILED == 0)) || die "some measurements failed; see the log above and summary.md"
}

main "$@"
