#!/usr/bin/env bash
# Start a one-machine gptdist cluster: a Ray head (with the Jobs API) and an
# MLflow tracking server, both answering on 127.0.0.1 only. Returns once both
# answer, and prints the addresses to use:
#
#   cluster/start_local.sh
#   source runs/cluster/env          # RAY_ADDRESS, MLFLOW_TRACKING_URI, Ray auth
#   cluster/submit.sh train --set ray.address=auto ...
#   cluster/stop_local.sh
#
# Environment (all optional):
#   GPTDIST_CLUSTER_DIR         state folder (default: runs/cluster); see cluster/lib.sh
#   GPTDIST_RAY_HOST            Jobs API / dashboard interface (default: 127.0.0.1)
#   GPTDIST_RAY_PORT            GCS port (default: 6379)
#   GPTDIST_DASHBOARD_PORT      dashboard and Jobs API port (default: 8265)
#   GPTDIST_RAY_CLIENT_PORT     Ray Client port (default: 10001)
#   GPTDIST_DASHBOARD_AGENT_PORT  the node agent's HTTP port (default: a free port)
#   GPTDIST_RAY_NUM_CPUS        logical CPUs of the head (default: cores + 1, so that Ray Data
#                               keeps a slot beside the training workers)
#   GPTDIST_RAY_NUM_GPUS        GPUs of the head (default: detected)
#   GPTDIST_RAY_RESOURCES       custom resources, JSON (e.g. '{"trainer": 2}')
#   GPTDIST_RAY_AUTH            token (default) or disabled
#   GPTDIST_MLFLOW_*            see cluster/start_mlflow.sh
#
# Network exposure. With the default GPTDIST_RAY_HOST (127.0.0.1) everything
# the head starts listens on 127.0.0.1 only: GCS, raylet, workers, Ray
# Client, agents, metrics endpoints, the dashboard/Jobs API and MLflow.
# Ray 2.60 has no listen-address setting; it replaces a loopback
# --node-ip-address with the machine's own address and then binds every
# interface, except when clusters are disabled as on laptops
# (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), which this script sets for a loopback
# head and writes into the env file for its clients. A node added with
# cluster/add_local_node.sh cannot be loopback-only (Ray refuses worker nodes
# with clusters disabled) and listens on the machine's address. So token
# authentication is on by default as well: every Ray RPC and every Jobs API
# request must carry this cluster's token, kept in
# $GPTDIST_CLUSTER_DIR/auth_token (mode 600).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

mkdir -p "$STATE_DIR/logs"
RAY_HOST=${GPTDIST_RAY_HOST:-127.0.0.1}
RAY_PORT=${GPTDIST_RAY_PORT:-6379}
DASHBOARD_PORT=${GPTDIST_DASHBOARD_PORT:-8265}
CLIENT_PORT=${GPTDIST_RAY_CLIENT_PORT:-10001}
# The node agent's port is internal, and Ray's default (52365) is taken by
# any other Ray on the machine, `ray.init()` included: a free one by default.
AGENT_PORT=${GPTDIST_DASHBOARD_AGENT_PORT:-$(free_port)}
NUM_CPUS=${GPTDIST_RAY_NUM_CPUS:-$(($(nproc) + 1))}
AUTH=${GPTDIST_RAY_AUTH:-token}
DASHBOARD_URL="http://$(url_host "$RAY_HOST"):$DASHBOARD_PORT"
MLFLOW_URL="http://$(url_host "${GPTDIST_MLFLOW_HOST:-127.0.0.1}"):${GPTDIST_MLFLOW_PORT:-5000}"

[[ -x $BIN_DIR/ray ]] || die "no ray beside $PY (run make setup, or set GPTDIST_PYTHON)"
if group_running "$STATE_DIR/ray.pgid"; then
    die "a Ray head from $STATE_DIR is already running; stop it with cluster/stop_local.sh"
fi
for port in "$RAY_PORT" "$DASHBOARD_PORT" "$CLIENT_PORT" "$AGENT_PORT"; do
    port_free 127.0.0.1 "$port" || die "port $port is in use (another Ray?); see the GPTDIST_*_PORT variables"
done

# --- authentication ----------------------------------------------------------
case "$AUTH" in
token)
    if [[ ! -s $STATE_DIR/auth_token ]]; then
        # Same format as `ray get-auth-token --generate`: 256 random bits.
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$STATE_DIR/auth_token")
    fi
    chmod 600 "$STATE_DIR/auth_token"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$STATE_DIR/auth_token"
    ;;
disabled)
    export RAY_AUTH_MODE=disabled
    unset RAY_AUTH_TOKEN_PATH
    ;;
*) die "GPTDIST_RAY_AUTH=$AUTH must be token or disabled" ;;
esac
unset RAY_AUTH_TOKEN RAY_ADDRESS
LOOPBACK_ONLY=0
if [[ $RAY_HOST == 127.0.0.1 || $RAY_HOST == localhost ]]; then
    LOOPBACK_ONLY=1
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0  # see "Network exposure" above
fi

# Everything the head starts inherits this environment, job drivers and
# workers included: `python` in a job's entrypoint is this environment's
# Python, and jobs find the tracking server and the auth token.
export PATH="$BIN_DIR:$PATH"
export MLFLOW_TRACKING_URI=$MLFLOW_URL

# --- MLflow ------------------------------------------------------------------
"$HERE/start_mlflow.sh"

# --- Ray head ----------------------------------------------------------------
ray_args=(start --head
    --node-ip-address "$RAY_HOST" --port "$RAY_PORT"
    --dashboard-host "$RAY_HOST" --dashboard-port "$DASHBOARD_PORT"
    --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port "$AGENT_PORT"
    --num-cpus "$NUM_CPUS" --disable-usage-stats --log-color false)
[[ -n ${GPTDIST_RAY_NUM_GPUS:-} ]] && ray_args+=(--num-gpus "$GPTDIST_RAY_NUM_GPUS")
[[ -n ${GPTDIST_RAY_RESOURCES:-} ]] && ray_args+=(--resources "$GPTDIST_RAY_RESOURCES")

# setsid: `ray start` leads a new process group that all the head's daemons
# stay in; its id is what stop_local.sh stops (see cluster/local_processes.py).
setsid "$BIN_DIR/ray" "${ray_args[@]}" >"$STATE_DIR/logs/ray-start.log" 2>&1 </dev/null &
ray_pid=$!
echo "$ray_pid" >"$STATE_DIR/ray.pgid"
if ! wait "$ray_pid"; then
    tail -n 30 "$STATE_DIR/logs/ray-start.log" >&2 || true
    "$HERE/stop_local.sh" >&2 || true
    die "ray start failed (log: $STATE_DIR/logs/ray-start.log)"
fi
token=""
[[ $AUTH == token ]] && token="$(cat "$STATE_DIR/auth_token")"
# The Jobs API answers once the dashboard has loaded its job module.
if ! wait_for_url "$DASHBOARD_URL/api/jobs/" 120 "$token"; then
    "$HERE/stop_local.sh" >&2 || true
    die "the Ray Jobs API did not answer at $DASHBOARD_URL (logs: $STATE_DIR/logs/)"
fi
record_group "$STATE_DIR/ray.pgid"
# "ray start --address='<ip>:<port>'" is how ray start says where to join.
GCS_ADDRESS="$(sed -n "s/.*ray start --address='\([^']*\)'.*/\1/p" "$STATE_DIR/logs/ray-start.log" | head -n 1)"

# --- what clients need -------------------------------------------------------
{
    echo "# source this file to use the gptdist cluster started from $STATE_DIR"
    echo "export RAY_ADDRESS=$DASHBOARD_URL"
    echo "export MLFLOW_TRACKING_URI=$MLFLOW_URL"
    echo "export RAY_AUTH_MODE=$AUTH"
    [[ $AUTH == token ]] && echo "export RAY_AUTH_TOKEN_PATH=$STATE_DIR/auth_token"
    # A driver joining a loopback-only head must take 127.0.0.1 as its address too.
    [[ $LOOPBACK_ONLY == 1 ]] && echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    echo "# GCS address, for \`ray start --address\` of a second node on this machine"
    echo "export GPTDIST_RAY_GCS_ADDRESS=${GCS_ADDRESS:-127.0.0.1:$RAY_PORT}"
} >"$STATE_DIR/env"

cat <<EOF
Ray head: $NUM_CPUS CPUs, GCS ${GCS_ADDRESS:-port $RAY_PORT}, auth: $AUTH
  dashboard and Jobs API: $DASHBOARD_URL
MLflow: $MLFLOW_URL

To submit jobs:
  source $STATE_DIR/env     # RAY_ADDRESS=$DASHBOARD_URL MLFLOW_TRACKING_URI=$MLFLOW_URL
  cluster/submit.sh train --set ray.address=auto --set data.path=\$PWD/data/shakespeare --set ray.storage_path=\$PWD/runs/ray
To stop: cluster/stop_local.sh
EOF
