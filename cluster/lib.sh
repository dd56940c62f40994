# Shared by the cluster/*.sh scripts (sourced, not run).
#
# GPTDIST_CLUSTER_DIR  state folder of a local cluster (default: runs/cluster):
#   env            `source` it to talk to the cluster (RAY_ADDRESS, MLFLOW_TRACKING_URI, auth)
#   auth_token     the Ray cluster's token (mode 600)
#   ray.pgid       process group of the Ray head's processes
#   mlflow.pid     the MLflow server (also its process group)
#   node-<n>.pgid  process group of a node added by add_local_node.sh
#   *.pids         each group's processes right after start ("PID START NAME"),
#                  which tells a live group from a reused PID
#   logs/          ray-start.log, mlflow.log
# The MLflow store is beside it (runs/mlflow.db, runs/mlartifacts/ by default),
# the one `gptdist train --local` writes.
# GPTDIST_PYTHON       the Python environment holding ray and mlflow (default: .venv/bin/python)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/.." && pwd)"

# Absolute, without creating it: only the start scripts do that.
STATE_DIR="$(realpath -m "${GPTDIST_CLUSTER_DIR:-$REPO_ROOT/runs/cluster}")"

if [[ -n ${GPTDIST_PYTHON:-} ]]; then
    PY=$GPTDIST_PYTHON
elif [[ -x $REPO_ROOT/.venv/bin/python ]]; then
    PY=$REPO_ROOT/.venv/bin/python
else
    PY=python3
fi
PY="$(command -v "$PY")" || { echo "error: no Python at ${GPTDIST_PYTHON:-python3}" >&2; exit 1; }
# ray and mlflow are the console scripts installed beside that Python.
BIN_DIR="$(dirname "$PY")"

die() {
    echo "error: $*" >&2
    exit 1
}

# group_running PGID_FILE: true while the process group recorded in the
# file (by a start script, with its members in the matching .pids file)
# still runs; see cluster/local_processes.py.
group_running() {
    local file=$1 record="${1%.*}.pids" pgid
    [[ -f $file ]] || return 1
    pgid="$(cat "$file")"
    [[ $pgid =~ ^[0-9]+$ ]] || return 1
    if [[ -f $record ]]; then
        "$PY" "$HERE/local_processes.py" running "$pgid" --recorded "$record"
    else
        "$PY" "$HERE/local_processes.py" running "$pgid"
    fi
}

# record_group PGID_FILE: save the group's current members beside it.
record_group() {
    "$PY" "$HERE/local_processes.py" members "$(cat "$1")" >"${1%.*}.pids"
}

# True when nothing accepts connections on host $1 port $2.
port_free() {
    "$PY" - "$1" "$2" <<'EOF'
import socket, sys
host = "127.0.0.1" if sys.argv[1] in ("0.0.0.0", "") else sys.argv[1]
with socket.socket() as s:
    s.settimeout(1)
    sys.exit(1 if s.connect_ex((host, int(sys.argv[2]))) == 0 else 0)
EOF
}

# A port nothing listens on now, from the kernel's ephemeral range.
free_port() {
    "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The host to connect to for a server bound to $1.
url_host() {
    if [[ $1 == 0.0.0.0 ]]; then echo 127.0.0.1; else echo "$1"; fi
}

# wait_for_url URL TIMEOUT_S [BEARER_TOKEN] [PID]: poll until URL answers
# 2xx; give up early when PID (the server being waited for) has exited.
wait_for_url() {
    local url=$1 timeout=$2 token=${3:-} pid=${4:-} header=()
    [[ -n $token ]] && header=(-H "Authorization: Bearer $token")
    local deadline=$((SECONDS + timeout))
    while ((SECONDS < deadline)); do
        if curl -sf -o /dev/null --max-time 5 "${header[@]}" "$url"; then
            return 0
        fi
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.5
    done
    return 1
}
