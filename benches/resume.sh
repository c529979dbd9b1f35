#!/usr/bin/env bash
# benches/resume.sh — kill-and-resume benchmark for blobstage.
#
# Serves a random SIZE_MIB MiB file from a local nginx on 127.0.0.1 (with an access log of
# the body bytes sent per request) and, RUNS times, with the order rotated per run:
#   uninterrupted  `blobstage fetch --json --config <cfg> bench/blob@1` from an empty state dir
#   interrupted    the same from an empty state dir, `kill -9`ed once its resume journal
#                  records KILL_AT_PERCENT % of the blob written; then the same command again
#                  on the same state dir (the resumed run), which must finish the job
# and reports the bytes fetched twice (nginx's bytes sent during the killed run plus the
# resumed run's bytes_transferred, minus the size), the bytes the resumed run kept and read
# back, and the time to finish against the uninterrupted run. Prints a Markdown table and
# writes it to bench-results/resume-<date>-<time>.md.
#
# Environment:
#   SIZE_MIB=2048        size of the test blob in MiB
#   RUNS=3               runs (each: one uninterrupted, one killed + resumed)
#   KILL_AT_PERCENT=50   kill once the journal records this share of the blob written (1-99)
#   KILL_DELAY_MS=0      wait this long after that before killing (0: kill at once, i.e.
#                        right after a checkpoint; see README)
#   KEEP_WORKDIR=1       keep the work dir (logs, config, access log) instead of deleting it
#   BENCH_PORT=18080     first port tried for nginx (the next 19 are tried too)
# Shared parts (nginx, packages, config, helpers) are in benches/lib.sh.
# See benches/README.md for how to read the output.

set -euo pipefail
export LC_ALL=C

SIZE_MIB=${SIZE_MIB:-2048}
RUNS=${RUNS:-3}
KILL_AT_PERCENT=${KILL_AT_PERCENT:-50}
KILL_DELAY_MS=${KILL_DELAY_MS:-0}
KEEP_WORKDIR=${KEEP_WORKDIR:-0}
BENCH_PORT=${BENCH_PORT:-18080}

ARTIFACT_ID="bench/blob@1"
LOG_TAG=resume-bench
# How often the journal is polled during the run to be killed.
POLL_SECONDS=0.02

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"
install_traps

ACCESS_LOG=""
STATUS_PATH=/bench-status
# The engine's promise: a kill costs less than connections_per_blob x chunk_size re-fetched.
BOUND_BYTES=$((CONNECTIONS_PER_BLOB * CHUNK_MIB * 1024 * 1024))

# ---------------------------------------------------------------- nginx hooks

# An access log line per request: time, connection, method, status, body bytes sent, Range
# header, URI. An aborted request (client killed) is logged with the bytes sent until then.
nginx_access_conf() {
    printf '%s\n' "log_format bench '\$msec \$connection \$request_method \$status \$body_bytes_sent \"\$http_range\" \$uri';"
    printf '    access_log %s bench;' "$ACCESS_LOG"
}

# stub_status, to see when nginx has finished (and logged) every request of a run.
nginx_server_extra() {
    printf '\n        location = %s { stub_status; access_log off; }' "$STATUS_PATH"
}

# ---------------------------------------------------------------- helpers

check_args() {
    check_common_args
    if ! is_pos_int "$KILL_AT_PERCENT" || ((KILL_AT_PERCENT > 99)); then
        die "KILL_AT_PERCENT must be an integer from 1 to 99 (got '$KILL_AT_PERCENT')"
    fi
    [[ $KILL_DELAY_MS =~ ^[0-9]+$ ]] ||
        die "KILL_DELAY_MS must be a non-negative integer (got '$KILL_DELAY_MS')"
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

# elapsed T0 T1: seconds between two $EPOCHREALTIME values, 2 decimals.
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# Like proc_alive, without forking (it runs in the 20 ms poll loop).
pid_running() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# journal_written FILE: sets JOURNAL_SUM to the sum of the journal's "written" array (the
# bytes durably written per range) and JOURNAL_HASHED to its "hashed" (the hashed prefix), 0
# while there is no journal. No forks.
JOURNAL_SUM=0
JOURNAL_HASHED=0
journal_written() {
    local file=$1 body="" list n
    JOURNAL_SUM=0 JOURNAL_HASHED=0
    # The journal is replaced by rename, so this reads a whole old one or a whole new one.
    # Line 1 is its checksum (skipped), line 2 the JSON object.
    { IFS= read -r _ && { IFS= read -r body || [[ -n $body ]]; }; } 2>/dev/null <"$file" || return 0
    if [[ $body =~ \"hashed\":([0-9]+) ]]; then
        JOURNAL_HASHED=${BASH_REMATCH[1]}
    fi
    [[ $body =~ \"written\":\[([0-9,]*)\] ]] || return 0
    list=${BASH_REMATCH[1]}
    local IFS=,
    for n in $list; do
        JOURNAL_SUM=$((JOURNAL_SUM + n))
    done
}

# json_num FIELD FILE: prints the number FIELD of the one-line JSON object in FILE.
json_num() {
    local line
    line=$(<"$2")
    [[ $line =~ \"$1\":([0-9.eE+-]+) ]] || die "no numeric \"$1\" in $2: $line"
    printf '%s\n' "${BASH_REMATCH[1]}"
}

json_str() {
    local line
    line=$(<"$2")
    [[ $line =~ \"$1\":\"([^\"]*)\" ]] || die "no string \"$1\" in $2: $line"
    printf '%s\n' "${BASH_REMATCH[1]}"
}

log_offset() { stat -c %s "$ACCESS_LOG"; }

# Waits until nginx has no connection but the status request itself, so that every request
# of the last run is finished and in the access log. Returns 1 after 10 s.
wait_nginx_idle() {
    local i status
    for ((i = 0; i < 200; i++)); do
        status=$(curl -s --noproxy '*' --max-time 1 "http://127.0.0.1:$PORT$STATUS_PATH" || true)
        [[ $status =~ Active\ connections:\ *1[^0-9] ]] && return 0
        sleep 0.05
    done
    return 1
}

# sent_since OFFSET: prints "requests bytes" for /blob.bin requests logged after OFFSET.
# (Byte counts are printed with %.0f throughout: mawk's %d stops at 2^31 - 1.)
sent_since() {
    wait_nginx_idle || log "warning: nginx still has open connections after 10 s; its byte count may be short"
    tail -c +"$(($1 + 1))" "$ACCESS_LOG" |
        awk '$7 == "/blob.bin" { n++; s += $5 } END { printf "%.0f %.0f\n", n, s }'
}

fail_fetch() {
    local what=$1 err=$2
    log "$what failed; last lines of its stderr:"
    tail -n 20 "$err" >&2 || true
    die "$what failed"
}

# ---------------------------------------------------------------- runs

# Per run, results/run-<n>.txt gets "key value" lines; report() reads them.
record() { printf '%s %s\n' "$2" "$3" >>"$WORK/results/run-$1.txt"; }

run_uninterrupted() {
    local run=$1 out="$WORK/uninterrupted.json" err="$WORK/uninterrupted.stderr" off
    reset_state
    off=$(log_offset)
    timed uninterrupted "$run" \
        "$BLOBSTAGE_BIN" fetch --json --config "$WORK/blobstage.toml" "$ARTIFACT_ID" \
        >"$out" 2>"$err" || fail_fetch "uninterrupted blobstage fetch (run $run)" "$err"
    local wall sent
    wall=$(awk '$1 == r && $2 == "uninterrupted" { w = $3 } END { print w }' r="$run" "$WORK/results/all.txt")
    sent=$(sent_since "$off")
    record "$run" uninterrupted_wall "$wall"
    record "$run" uninterrupted_transferred "$(json_num bytes_transferred "$out")"
    record "$run" uninterrupted_read_back "$(json_num bytes_read_back "$out")"
    record "$run" uninterrupted_requests "${sent% *}"
    record "$run" uninterrupted_sent "${sent#* }"
    if ((run == 1)); then
        local published
        published=$(json_str path "$out")
        verify_published "$published"
        log "run 1: uninterrupted run published $published, sha256 verified"
    fi
}

run_interrupted() {
    local run=$1 out="$WORK/killed.json" err="$WORK/killed.stderr"
    local journal="$WORK/state/ingest/sha256-$EXPECTED_HEX.journal"
    local need=$((SIZE_BYTES * KILL_AT_PERCENT / 100)) off t0 t_kill rc=0 seen=0
    reset_state
    off=$(log_offset)

    t0=$EPOCHREALTIME
    "$BLOBSTAGE_BIN" fetch --json --config "$WORK/blobstage.toml" "$ARTIFACT_ID" >"$out" 2>"$err" &
    BG_PID=$!
    while pid_running "$BG_PID"; do
        journal_written "$journal"
        if ((JOURNAL_SUM >= need)); then
            seen=$JOURNAL_SUM
            break
        fi
        sleep "$POLL_SECONDS"
    done
    if ((seen)); then
        ((KILL_DELAY_MS == 0)) || sleep "$(awk -v m="$KILL_DELAY_MS" 'BEGIN { printf "%.3f", m / 1000 }')"
        kill -KILL "$BG_PID" 2>/dev/null || true
        t_kill=$EPOCHREALTIME
    fi
    # (stderr: no "Killed" job notice from bash)
    wait "$BG_PID" 2>/dev/null || rc=$?
    BG_PID=""
    local too_fast="This machine is too fast for a ${SIZE_MIB} MiB blob at a ${POLL_SECONDS} s poll: raise SIZE_MIB or lower KILL_AT_PERCENT."
    if ((rc != 137 || !seen)); then
        if ((rc == 0)); then
            die "blobstage finished the whole transfer before its journal showed ${KILL_AT_PERCENT}% written (run $run, journal last showed $JOURNAL_SUM of $SIZE_BYTES bytes). $too_fast"
        fi
        fail_fetch "blobstage fetch to be killed (run $run, exit $rc)" "$err"
    fi
    journal_written "$journal"
    if [[ -e $WORK/state/blobs/sha256/$EXPECTED_HEX ]] || ((JOURNAL_SUM >= SIZE_BYTES)); then
        die "the kill came too late (run $run): the killed blobstage had already written the whole blob (journal: $JOURNAL_SUM of $SIZE_BYTES bytes) or published it, so there is nothing to resume. $too_fast"
    fi
    local at_kill=$JOURNAL_SUM hashed_at_kill=$JOURNAL_HASHED sent
    sent=$(sent_since "$off")
    log "run $run: killed after $(elapsed "$t0" "$t_kill") s; journal showed $seen bytes, then $at_kill ($(awk -v a="$at_kill" -v s="$SIZE_BYTES" 'BEGIN { printf "%.1f", 100 * a / s }')%); nginx sent ${sent#* } bytes in ${sent% *} requests"
    record "$run" killed_wall "$(elapsed "$t0" "$t_kill")"
    record "$run" journal_seen "$seen"
    record "$run" journal_at_kill "$at_kill"
    record "$run" journal_hashed_at_kill "$hashed_at_kill"
    record "$run" killed_requests "${sent% *}"
    record "$run" killed_sent "${sent#* }"

    # The restart: same state dir, no sync, no pause.
    out="$WORK/resumed.json" err="$WORK/resumed.stderr"
    off=$(log_offset)
    timed resumed "$run" \
        "$BLOBSTAGE_BIN" fetch --json --config "$WORK/blobstage.toml" "$ARTIFACT_ID" \
        >"$out" 2>"$err" || fail_fetch "resumed blobstage fetch (run $run)" "$err"
    local wall
    wall=$(awk '$1 == r && $2 == "resumed" { w = $3 } END { print w }' r="$run" "$WORK/results/all.txt")
    sent=$(sent_since "$off")
    record "$run" resumed_wall "$wall"
    record "$run" resumed_transferred "$(json_num bytes_transferred "$out")"
    record "$run" resumed_kept "$(json_num bytes_resumed "$out")"
    record "$run" resumed_read_back "$(json_num bytes_read_back "$out")"
    record "$run" resumed_requests "${sent% *}"
    record "$run" resumed_sent "${sent#* }"
    [[ $(json_str outcome "$out") == staged ]] ||
        die "the resumed run did not transfer (outcome $(json_str outcome "$out")): the killed run had finished"
    if [[ $(json_num bytes_resumed "$out") == 0 ]]; then
        log "warning: run $run: the resumed run kept nothing from the killed run (bytes_resumed 0)"
    fi
    if ((run == 1)); then
        local published
        published=$(json_str path "$out")
        verify_published "$published"
        log "run 1: resumed run published $published, sha256 verified"
    fi
}

run_all() {
    local run
    : >"$WORK/results/all.txt"
    for ((run = 1; run <= RUNS; run++)); do
        : >"$WORK/results/run-$run.txt"
        if ((run % 2)); then
            log "run $run/$RUNS: uninterrupted, then killed + resumed"
            run_uninterrupted "$run"
            sync
            run_interrupted "$run"
            sync
        else
            log "run $run/$RUNS: killed + resumed, then uninterrupted"
            run_interrupted "$run"
            sync
            run_uninterrupted "$run"
            sync
        fi
    done
}

# ---------------------------------------------------------------- report

# get RUN KEY: a recorded value.
get() { awk -v k="$2" '$1 == k { v = $2 } END { print v }' "$WORK/results/run-$1.txt"; }

# Derived values of a run, one per line: the table's columns.
# uninterrupted killed resumed ratio refetched kept read_back uninterrupted_read_back
# (seconds, then bytes)
derive() {
    local run=$1
    awk -v u="$(get "$run" uninterrupted_wall)" -v k="$(get "$run" killed_wall)" \
        -v r="$(get "$run" resumed_wall)" -v sk="$(get "$run" killed_sent)" \
        -v tr="$(get "$run" resumed_transferred)" -v size="$SIZE_BYTES" \
        -v kept="$(get "$run" resumed_kept)" -v rb="$(get "$run" resumed_read_back)" \
        -v urb="$(get "$run" uninterrupted_read_back)" \
        'BEGIN { printf "%s %s %s %.3f %.0f %.0f %.0f %.0f\n", u, k, r, (u > 0 ? (k + r) / u : 0), sk + tr - size, kept, rb, urb }'
}

# table_rows [LABEL]: formats derived lines (stdin) as rows of the main table, labelled LABEL
# or else the line number.
table_rows() {
    awk -v l="${1:-}" '{
        printf "| %s | %.2f | %.2f | %.2f | %.2f | %.1f | %.1f | %.1f | %.1f |\n", (l == "" ? NR : l),
            $1, $2, $3, $4, $5 / 1048576, $6 / 1048576, $7 / 1048576, $8 / 1048576
    }'
}

print_report() {
    local run
    for ((run = 1; run <= RUNS; run++)); do
        derive "$run"
    done >"$WORK/results/derived.txt"
    col() { awk -v f="$1" '{ print $f }' "$WORK/results/derived.txt"; }

    echo "# blobstage resume benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    host_line
    echo "setup: blob ${SIZE_MIB} MiB ($SIZE_BYTES bytes), $RUNS runs, kill -9 once the journal shows ${KILL_AT_PERCENT}% written (+${KILL_DELAY_MS} ms), chunk_size ${CHUNK_MIB} MiB, connections_per_blob $CONNECTIONS_PER_BLOB, nginx on 127.0.0.1 (loopback), source in page cache, work dir on $(work_fstype), repo commit $(repo_commit)"
    echo
    echo "| run | uninterrupted (s) | killed run, until kill (s) | resumed run (s) | (killed + resumed) / uninterrupted | re-fetched (MiB) | resumed (MiB) | read back, resumed run (MiB) | read back, uninterrupted run (MiB) |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    table_rows <"$WORK/results/derived.txt"
    local f
    for f in 1 2 3 4 5 6 7 8; do
        col "$f" | median
    done | paste -sd ' ' | table_rows '**median**'
    echo

    local worst verdict
    worst=$(col 5 | max_of)
    if ((worst <= BOUND_BYTES)); then verdict=PASS; else verdict=MISS; fi
    echo "bound: re-fetched <= connections_per_blob × chunk_size = $CONNECTIONS_PER_BLOB × $CHUNK_MIB MiB = $(mib "$BOUND_BYTES") MiB: $verdict (max over runs $(mib "$worst") MiB)"
    echo
    echo "re-fetched = nginx body bytes sent during the killed run + resumed run's bytes_transferred − size" \
        "(the bytes fetched twice); resumed = the resumed run's bytes_resumed; read back = bytes_read_back" \
        "of the resumed and of the uninterrupted run. Every run reads back the ranges that land beyond the" \
        "hash window, so only the difference between the two read-back columns is due to the kill" \
        "(about written − hashed in the journal at the kill, in the raw runs)."
    local zero
    zero=$(col 6 | awk '$1 == 0' | wc -l)
    if ((zero > 0)); then
        echo
        echo "WARNING: in $zero run(s) the resumed run kept nothing (bytes_resumed 0): it started over."
    fi
    echo
    echo "<details><summary>raw runs</summary>"
    echo
    echo "| run | journal at kill: written (%) / hashed | killed run: nginx requests / bytes sent | resumed run: bytes_transferred / nginx bytes sent (requests) | bytes_resumed | bytes_read_back | re-fetched (bytes) | uninterrupted: bytes_transferred / nginx bytes sent (requests) |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
    for ((run = 1; run <= RUNS; run++)); do
        local at
        at=$(get "$run" journal_at_kill)
        printf '| %d | %s (%s%%) / %s | %s / %s | %s / %s (%s) | %s | %s | %s | %s / %s (%s) |\n' \
            "$run" "$at" "$(awk -v a="$at" -v s="$SIZE_BYTES" 'BEGIN { printf "%.1f", 100 * a / s }')" \
            "$(get "$run" journal_hashed_at_kill)" \
            "$(get "$run" killed_requests)" "$(get "$run" killed_sent)" \
            "$(get "$run" resumed_transferred)" "$(get "$run" resumed_sent)" "$(get "$run" resumed_requests)" \
            "$(get "$run" resumed_kept)" "$(get "$run" resumed_read_back)" \
            "$(sed -n "${run}p" "$WORK/results/derived.txt" | awk '{ print $5 }')" \
            "$(get "$run" uninterrupted_transferred)" "$(get "$run" uninterrupted_sent)" "$(get "$run" uninterrupted_requests)"
    done
    echo
    echo "| run | run kind | wall (s) | user (s) | sys (s) | max RSS (KiB) |"
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
    build_blobstage

    make_workdir
    ACCESS_LOG="$WORK/nginx-access.log"
    make_blob
    start_nginx
    write_blobstage_config

    run_all
    save_report resume print_report
}

main "$@"
