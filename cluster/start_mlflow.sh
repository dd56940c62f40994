#!/usr/bin/env bash
# Start an MLflow tracking server for gptdist runs and wait until it answers.
#
#   cluster/start_mlflow.sh            # http://127.0.0.1:5000, the store in runs/
#
# Environment (all optional):
#   GPTDIST_CLUSTER_DIR        state folder: PID, log, SQLite store, artifacts (default: runs/cluster)
#   GPTDIST_MLFLOW_HOST        interface to bind (default: 127.0.0.1, this machine only)
#   GPTDIST_MLFLOW_PORT        port (default: 5000)
#   GPTDIST_MLFLOW_BACKEND_URI run store (default: sqlite:///<runs>/mlflow.db, where <runs> is the
#                              folder holding GPTDIST_CLUSTER_DIR: runs/ by default, the store
#                              `gptdist train --local` writes, so both local ways share one store);
#                              e.g. postgresql://user:pass@db:5432/mlflow for a shared server
#   GPTDIST_MLFLOW_ARTIFACTS   where the server keeps artifacts (default: <runs>/mlartifacts, as
#                              `gptdist train --local`; s3://bucket/prefix on a cloud head)
#   GPTDIST_MLFLOW_ALLOWED_HOSTS  extra Host headers to accept (comma-separated). MLflow answers
#                              403 to other Host names, e.g. a Kubernetes Service name.
#   GPTDIST_PYTHON             the Python environment holding mlflow (default: .venv/bin/python)
#
# Artifacts are proxied (--serve-artifacts): clients can upload through the
# server and need no access to the artifact store themselves. A local artifact
# folder is also the default root of new experiments (a file URI), so that
# `gptdist train --local`, which writes to the same store without the server,
# can log to an experiment the server created. The job runner of
# `mlflow server` is disabled and one worker serves requests: that takes
# 0.5 GB instead of 2.6 GB and starts in about 5 s.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

mkdir -p "$STATE_DIR/logs"
MLFLOW_HOST=${GPTDIST_MLFLOW_HOST:-127.0.0.1}
MLFLOW_PORT=${GPTDIST_MLFLOW_PORT:-5000}
RUNS_DIR="$(dirname "$STATE_DIR")"
BACKEND_URI=${GPTDIST_MLFLOW_BACKEND_URI:-sqlite:///$RUNS_DIR/mlflow.db}
ARTIFACTS=${GPTDIST_MLFLOW_ARTIFACTS:-$RUNS_DIR/mlartifacts}
MLFLOW_URL="http://$(url_host "$MLFLOW_HOST"):$MLFLOW_PORT"

if group_running "$STATE_DIR/mlflow.pid"; then
    die "an MLflow server from $STATE_DIR is already running (PID $(cat "$STATE_DIR/mlflow.pid")); stop it with cluster/stop_local.sh"
fi
port_free "$MLFLOW_HOST" "$MLFLOW_PORT" || die "port $MLFLOW_PORT on $MLFLOW_HOST is in use; set GPTDIST_MLFLOW_PORT"
case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac

args=(server
    --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers 1
    --backend-store-uri "$BACKEND_URI"
    --serve-artifacts --artifacts-destination "$ARTIFACTS")
case "$ARTIFACTS" in *://*) ;; *) args+=(--default-artifact-root "file://$(realpath -m "$ARTIFACTS")") ;; esac
if [[ -n ${GPTDIST_MLFLOW_ALLOWED_HOSTS:-} ]]; then
    args+=(--allowed-hosts "$GPTDIST_MLFLOW_ALLOWED_HOSTS")
fi

# setsid: the server and its workers form one process group that
# stop_local.sh can stop without touching any other MLflow on the machine.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    setsid "$BIN_DIR/mlflow" "${args[@]}" >"$STATE_DIR/logs/mlflow.log" 2>&1 </dev/null &
echo $! >"$STATE_DIR/mlflow.pid"

if ! wait_for_url "$MLFLOW_URL/health" 90 "" "$(cat "$STATE_DIR/mlflow.pid")"; then
    tail -n 30 "$STATE_DIR/logs/mlflow.log" >&2 || true
    "$HERE/stop_local.sh" --mlflow-only >&2 || true
    die "MLflow did not answer at $MLFLOW_URL/health (log: $STATE_DIR/logs/mlflow.log)"
fi
record_group "$STATE_DIR/mlflow.pid"
echo "$MLFLOW_URL" >"$STATE_DIR/mlflow.url"
echo "MLflow tracking server: $MLFLOW_URL (store: ${BACKEND_URI%%://*}, log: $STATE_DIR/logs/mlflow.log)"
