#!/usr/bin/env bash
# Submit a gptdist job to a Ray cluster through the Jobs API:
#
#   cluster/submit.sh <job> [args...]
#   cluster/submit.sh train --set ray.address=auto --set train.max_steps=100
#
# runs, from the repository root,
#   ray job submit --address $RAY_ADDRESS --runtime-env cluster/runtime_env.yaml \
#       --working-dir . -- python -m jobs.<job> [args...]
# <job> is one of the modules of jobs/ (prepare_data, train, tune, sample,
# evaluate). It waits for the job and streams its logs; the exit status is
# non-zero when the job fails.
#
# Where to: $RAY_ADDRESS (default http://127.0.0.1:8265). When RAY_ADDRESS is
# unset and a local cluster is running (cluster/start_local.sh), its
# $GPTDIST_CLUSTER_DIR/env supplies the address and the auth token.
# Auth: Ray 2.60 clients send a token only with RAY_AUTH_MODE=token; when
# RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN,
# RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) this script sets it.
# Extra `ray job submit` options go in GPTDIST_SUBMIT_ARGS, e.g.
#   GPTDIST_SUBMIT_ARGS="--no-wait --submission-id my-run-1" cluster/submit.sh train ...
# GPTDIST_RUNTIME_ENV picks another runtime env file.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

[[ $# -ge 1 ]] || die "usage: cluster/submit.sh <job> [args...]  (jobs: $(cd "$REPO_ROOT/jobs" && ls [a-z]*.py | sed 's/\.py$//' | tr '\n' ' '))"
job=${1#jobs.}
shift
[[ -f $REPO_ROOT/jobs/$job.py ]] || die "no job module jobs/$job.py"

if [[ -z ${RAY_ADDRESS:-} && -f $STATE_DIR/env ]]; then
    # shellcheck disable=SC1091
    . "$STATE_DIR/env"
fi
export RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
if [[ -z ${RAY_AUTH_MODE:-} ]]; then
    if [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
        export RAY_AUTH_MODE=token
    fi
fi

RAY=$BIN_DIR/ray
[[ -x $RAY ]] || RAY=ray
RUNTIME_ENV=${GPTDIST_RUNTIME_ENV:-cluster/runtime_env.yaml}
read -r -a extra <<<"${GPTDIST_SUBMIT_ARGS:-}"

cd "$REPO_ROOT"
exec "$RAY" job submit --address "$RAY_ADDRESS" --runtime-env "$RUNTIME_ENV" --working-dir . \
    "${extra[@]}" -- python -m "jobs.$job" "$@"
