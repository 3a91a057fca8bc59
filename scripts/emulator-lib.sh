# Shared by the emulator scripts (source it): port checks and waiting for readiness.

# port_open PORT: something listens on 127.0.0.1:PORT.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# require_free_port PORT HINT: exits with a message naming HINT when PORT is taken.
require_free_port() {
    if port_open "$1"; then
        echo "port $1 is taken; set $2" >&2
        exit 1
    fi
}

# wait_ready NAME PID SECONDS LOG CHECK...: runs CHECK every 0.25 s until it succeeds.
# When the process exits or SECONDS pass first, prints the end of LOG, stops the
# process group and returns 1.
wait_ready() {
    local name="$1" pid="$2" seconds="$3" log="$4"
    shift 4
    local _
    for _ in $(seq 1 $((seconds * 4))); do
        if "$@"; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$name exited; its log ($log):" >&2
            tail -n 30 "$log" >&2
            return 1
        fi
        sleep 0.25
    done
    echo "$name was not ready within $seconds s; its log ($log):" >&2
    tail -n 30 "$log" >&2
    kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
    return 1
}

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
