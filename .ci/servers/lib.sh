# Shared by the scripts of .ci/servers/ (sourced, not run: it is not executable, so .ci/test
# skips it). Each script is `NAME install DIR` or `NAME start DIR`; see .ci/test.

# A TCP port free on 127.0.0.1 now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until 127.0.0.1:$2 accepts connections, for at most $3 seconds; fails if process $1
# died or the time ran out (its log, $4, is shown then).
wait_for_port() {
    local pid=$1 port=$2 seconds=$3 log=$4
    for _ in $(seq $((seconds * 10))); do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "server exited before answering on port $port; its log:" >&2
            cat "$log" >&2
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "server did not answer on port $port within ${seconds}s; its log:" >&2
    cat "$log" >&2
    return 1
}

# Starts "$@" in the background with its output in $LOG, records its PID in $PIDFILE and
# waits for $PORT.
launch() {
    "$@" >"$LOG" 2>&1 &
    local pid=$!
    echo "$pid" >"$PIDFILE"
    wait_for_port "$pid" "$PORT" "${WAIT_SECONDS:-30}" "$LOG"
}
