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
# Shared parts (nginx, packages, config, helpers) are in benches/lib.sh.
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
LOG_TAG=stage-bench

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=benches/lib.sh
source "$SCRIPT_DIR/lib.sh"
install_traps

# ---------------------------------------------------------------- timed runs

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
    verify_published "$published"
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

    echo "# blobstage stage benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo
    host_line
    echo "setup: blob ${SIZE_MIB} MiB ($SIZE_BYTES bytes), $RUNS runs per tool, nginx on 127.0.0.1 (loopback), source in page cache, work dir on $(work_fstype), repo commit $(repo_commit)"
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
    check_common_args
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

    save_report stage print_report "${tools[@]}"
}

main "$@"
