#!/usr/bin/env bash
# The team set-up on one host: a PostgreSQL server holding MLflow's runs (database `mlflow`)
# and the search studies (database `optuna`), and an `mlflow server` on it, both bound to
# 127.0.0.1. Then, on this host or any other that reaches it:
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#   pipeline sweep experiments/optimizers-tuned.yaml --storage postgresql://postgres@127.0.0.1:5433/optuna
#   pipeline worker experiments/optimizers-tuned.yaml --storage postgresql://postgres@127.0.0.1:5433/optuna
#
#   deploy/team-server.sh start | stop | status        (make team-server runs `start`)
#
# For a laptop or a test box: the database trusts local connections (no password) and
# everything listens on 127.0.0.1 only. To serve other hosts, put both behind your network's
# authentication (PostgreSQL: a password in ~/.pgpass or PGPASSWORD, never in a logged URI;
# MLflow: its basic-auth app or a proxy) and set HOST to an address they reach.
#
# Environment:
#   PIPELINE_SERVER_DIR  state (database files, artifacts, logs); default <project>/.team-server
#   HOST                 default 127.0.0.1
#   PG_PORT              default 5433 (5432 is often a system PostgreSQL's)
#   MLFLOW_PORT          default 5000
#   PIPELINE_PYTHON      default: <project>/.venv/bin/python, else python3
# PostgreSQL's initdb refuses to run as root: as root, the database runs as the `postgres`
# system user (runuser), which must be able to reach PIPELINE_SERVER_DIR.
set -euo pipefail
umask 077

PROJECT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${PIPELINE_SERVER_DIR:-$PROJECT_DIR/.team-server}"
HOST="${HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5433}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
PYTHON="${PIPELINE_PYTHON:-$PROJECT_DIR/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
# Debian's server binaries (initdb, pg_ctl, createdb, psql side by side), else PATH's.
PG_BIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
if [[ -z "$PG_BIN" ]] && command -v pg_ctl >/dev/null; then
    PG_BIN="$(dirname "$(command -v pg_ctl)")"
fi
[[ -n "$PG_BIN" && -x "$PG_BIN/pg_ctl" ]] || { echo "Error: PostgreSQL (pg_ctl) not found" >&2; exit 1; }

as_pg() {
    # From /: runuser keeps the current folder, which the postgres user may not reach.
    if [[ "$(id -u)" = 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

start() {
    mkdir -p "$STATE/pg" "$STATE/artifacts"
    if [[ "$(id -u)" = 0 ]]; then
        chmod 755 "$STATE"
        chown postgres:postgres "$STATE/pg"
    fi
    if [[ ! -f "$STATE/pg/data/PG_VERSION" ]]; then
        as_pg "$PG_BIN/initdb" -D "$STATE/pg/data" -A trust -U postgres >"$STATE/initdb.log"
    fi
    if ! as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" status >/dev/null 2>&1; then
        as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/postgres.log" -w \
            -o "-h $HOST -p $PG_PORT -k $STATE/pg" start >/dev/null
    fi
    for db in mlflow optuna; do
        as_pg "$PG_BIN/psql" -h "$HOST" -p "$PG_PORT" -U postgres -tAc \
            "SELECT 1 FROM pg_database WHERE datname = '$db'" postgres | grep -q 1 \
            || as_pg "$PG_BIN/createdb" -h "$HOST" -p "$PG_PORT" -U postgres "$db"
    done
    if [[ -f "$STATE/mlflow.pid" ]] && kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null; then
        echo "mlflow server already running (pid $(cat "$STATE/mlflow.pid"))"
    else
        "$PYTHON" -m mlflow server --host "$HOST" --port "$MLFLOW_PORT" \
            --backend-store-uri "postgresql://postgres@$HOST:$PG_PORT/mlflow" \
            --artifacts-destination "$STATE/artifacts" >"$STATE/mlflow.log" 2>&1 &
        echo $! >"$STATE/mlflow.pid"
        for _ in $(seq 120); do
            "$PYTHON" -c "import urllib.request as u; u.urlopen('http://$HOST:$MLFLOW_PORT/health', timeout=2)" \
                2>/dev/null && break
            kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null || { tail -n 20 "$STATE/mlflow.log" >&2; exit 1; }
            sleep 1
        done
    fi
    echo "export MLFLOW_TRACKING_URI=http://$HOST:$MLFLOW_PORT"
    echo "search storage: --storage postgresql://postgres@$HOST:$PG_PORT/optuna"
}

stop() {
    if [[ -f "$STATE/mlflow.pid" ]]; then
        kill "$(cat "$STATE/mlflow.pid")" 2>/dev/null || true
        rm -f "$STATE/mlflow.pid"
    fi
    if [[ -d "$STATE/pg/data" ]]; then
        as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" -m fast stop >/dev/null 2>&1 || true
    fi
}

status() {
    as_pg "$PG_BIN/pg_ctl" -D "$STATE/pg/data" status || true
    if [[ -f "$STATE/mlflow.pid" ]] && kill -0 "$(cat "$STATE/mlflow.pid")" 2>/dev/null; then
        echo "mlflow server: running (pid $(cat "$STATE/mlflow.pid")) on http://$HOST:$MLFLOW_PORT"
    else
        echo "mlflow server: not running"
    fi
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "Error: unknown command '${1}'; valid: start, stop, status" >&2; exit 2 ;;
esac
