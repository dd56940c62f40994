#!/usr/bin/env bash
# Add a worker node to the local cluster of cluster/start_local.sh: a second
# raylet on this machine, so multi-node behaviour (SPREAD placement, DDP
# across nodes, storage that every node must see) can be tried on one box.
#
#   cluster/start_local.sh
#   cluster/add_local_node.sh                     # node 1
#   GPTDIST_NODE_NUM_CPUS=2 cluster/add_local_node.sh   # node 2
#   cluster/stop_local.sh                         # stops the nodes too
#
# Environment (all optional):
#   GPTDIST_CLUSTER_DIR      the state folder of the running head (default: runs/cluster)
#   GPTDIST_NODE_NUM_CPUS    logical CPUs of the node (default: 1)
#   GPTDIST_NODE_RESOURCES   custom resources, JSON (e.g. '{"node2": 1}')
# Node n records its process group in node-<n>.pgid and uses worker ports
# 20000+1000n to 20999+1000n, clear of the head's (10002-19999).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[[ -f $STATE_DIR/env ]] || die "no running cluster in $STATE_DIR (run cluster/start_local.sh first)"
# shellcheck disable=SC1091
. "$STATE_DIR/env"
[[ $RAY_AUTH_MODE == token ]] || unset RAY_AUTH_TOKEN_PATH
export PATH="$BIN_DIR:$PATH"
# Ray refuses to start a worker node with clusters disabled (the head's
# loopback-only mode, see start_local.sh); ray_start_loopback.py keeps this
# node on 127.0.0.1 another way.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1

n=1
while [[ -e $STATE_DIR/node-$n.pgid ]]; do n=$((n + 1)); done
agent_port="$(free_port)"
node_args=(start --address "$GPTDIST_RAY_GCS_ADDRESS"
    --node-ip-address 127.0.0.1
    --num-cpus "${GPTDIST_NODE_NUM_CPUS:-1}"
    --min-worker-port $((20000 + 1000 * n)) --max-worker-port $((20999 + 1000 * n))
    --dashboard-agent-listen-port "$agent_port"
    --disable-usage-stats --log-color false)
[[ -n ${GPTDIST_NODE_RESOURCES:-} ]] && node_args+=(--resources "$GPTDIST_NODE_RESOURCES")

setsid "$PY" "$HERE/ray_start_loopback.py" "${node_args[@]}" >"$STATE_DIR/logs/node-$n-start.log" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$STATE_DIR/node-$n.pgid"
if ! wait "$pid"; then
    tail -n 30 "$STATE_DIR/logs/node-$n-start.log" >&2 || true
    "$PY" "$HERE/local_processes.py" stop "$pid" --grace 5 || true
    rm -f "$STATE_DIR/node-$n.pgid"
    die "ray start --address $GPTDIST_RAY_GCS_ADDRESS failed (log: $STATE_DIR/logs/node-$n-start.log)"
fi
record_group "$STATE_DIR/node-$n.pgid"
echo "node $n joined the Ray cluster at $GPTDIST_RAY_GCS_ADDRESS with ${GPTDIST_NODE_NUM_CPUS:-1} CPU(s)"
