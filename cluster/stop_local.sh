#!/usr/bin/env bash
# Stop what cluster/start_local.sh started, and nothing else:
#
#   cluster/stop_local.sh                # Ray (head, added nodes, their workers and jobs) and MLflow
#   cluster/stop_local.sh --mlflow-only
#
# It does not call `ray stop`: that stops every Ray process on the machine,
# other clusters and `gptdist train --local` runs included. Each service was
# started as its own process group; the group and its descendants are
# stopped (SIGTERM, then SIGKILL after GPTDIST_STOP_GRACE seconds, default
# 15), as cluster/local_processes.py explains. The MLflow store, the logs
# and the auth token stay in the state folder for the next start.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

GRACE=${GPTDIST_STOP_GRACE:-15}
what=all
[[ ${1:-} == --mlflow-only ]] && what=mlflow

stop_group_file() { # FILE LABEL
    local file=$1 label=$2 record="${1%.*}.pids" pgid args=()
    [[ -f $file ]] || return 0
    pgid="$(cat "$file")"
    [[ -f $record ]] && args=(--recorded "$record")
    if group_running "$file"; then
        echo "stopping $label (process group $pgid)"
        "$PY" "$HERE/local_processes.py" stop "$pgid" --grace "$GRACE" "${args[@]}"
    fi
    rm -f "$file" "$record"
}

if [[ $what == all ]]; then
    # Worker nodes (cluster/add_local_node.sh) before the head they report to.
    for node in "$STATE_DIR"/node-*.pgid; do
        [[ -e $node ]] && stop_group_file "$node" "Ray node $(basename "$node" .pgid)"
    done
    stop_group_file "$STATE_DIR/ray.pgid" "the Ray head"
    rm -f "$STATE_DIR/env"
fi
stop_group_file "$STATE_DIR/mlflow.pid" "the MLflow server"
rm -f "$STATE_DIR/mlflow.url"
echo "stopped the gptdist cluster of $STATE_DIR"
