#!/usr/bin/env bash
# Scheduled retrain, for cron and systemd: cd into the project, use its venv, append the
# run's output to a log file, and exit with retrain's own status:
#   0 promoted or kept the champion, 75 another retrain of that model holds the lock
#   (EX_TEMPFAIL: try later), anything else a failure (the champion is then unchanged).
# On a non-zero status the run's last lines also go to stderr: cron mails them, journald
# keeps them. Arguments are passed to `pipeline retrain` (e.g. --params-from champion).
#
# The log and the run's temporary output are created readable by this user only (umask
# 077), and the tracking URI is logged with its user and password replaced by ***; better
# still, keep the password out of the URI: MLflow reads MLFLOW_TRACKING_USERNAME and
# MLFLOW_TRACKING_PASSWORD.
#
# Environment (MLFLOW_TRACKING_URI is required; when it is not set, $PIPELINE_ENV_FILE is
# read first, default deploy/retrain.env next to this script):
#   MLFLOW_TRACKING_URI   where runs and the Model Registry live, e.g. http://mlflow:5000
#   PIPELINE_PYTHON       default: <project>/.venv/bin/python
#   PIPELINE_LOG_DIR      default: ${XDG_STATE_HOME:-~/.local/state}/pipeline/logs
#   PIPELINE_LOCK_DIR     default: ~/.cache/pipeline/locks (cron and systemd must agree)
#   PIPELINE_RETRAIN_CONFIG  default: experiments/retrain.yaml
set -euo pipefail
# The log holds run output (errors may quote the tracking URI): readable by this user only.
umask 077

PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_FILE="${PIPELINE_ENV_FILE:-$PROJECT_DIR/deploy/retrain.env}"
if [[ -z "${MLFLOW_TRACKING_URI:-}" && -f "$ENV_FILE" ]]; then
    set -a
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    set +a
fi
: "${MLFLOW_TRACKING_URI:?is not set: export it, or put it in $ENV_FILE}"
export MLFLOW_TRACKING_URI

PYTHON="${PIPELINE_PYTHON:-$PROJECT_DIR/.venv/bin/python}"
LOG_DIR="${PIPELINE_LOG_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/pipeline/logs}"
CONFIG="${PIPELINE_RETRAIN_CONFIG:-experiments/retrain.yaml}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/retrain.log"
touch "$LOG"
chmod 600 "$LOG" # a log made by an older version of this script was world-readable
# The URI as it may be logged: user and password (http://user:secret@host) replaced by ***.
shown_uri="$(printf '%s' "$MLFLOW_TRACKING_URI" | sed -E 's#^([A-Za-z][A-Za-z0-9+.-]*://)[^/]+@#\1***@#')"

cd "$PROJECT_DIR"
export PATH="$(dirname "$PYTHON"):$PATH"
export PYTHONPATH="$PROJECT_DIR${PYTHONPATH:+:$PYTHONPATH}"
run_log="$(mktemp "${TMPDIR:-/tmp}/pipeline-retrain.XXXXXX")"
trap 'rm -f "$run_log"' EXIT

started="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
status=0
"$PYTHON" -m pipeline retrain --config "$CONFIG" "$@" >"$run_log" 2>&1 || status=$?
{
    echo "=== retrain started $started pid $$ tracking $shown_uri"
    cat "$run_log"
    echo "=== retrain ended $(date -u +%Y-%m-%dT%H:%M:%SZ) exit $status"
} >>"$LOG"
if [[ $status -ne 0 ]]; then
    echo "pipeline retrain exited $status; last lines (full log: $LOG):" >&2
    tail -n 20 "$run_log" >&2
fi
exit "$status"
