"""Metric points written to a SQL tracking store's two metric tables in one transaction.

MLflow's `SqlAlchemyStore.log_batch` spends ~90 us of CPU a point in its ORM (an object,
two validations and attribute events each): ~270 us a step at the loop's three points.
The writer process does that on the second core, which is free only on a quiet host. Where
the host runs both cores on less than two (a contended VM), that CPU comes out of the
training step: +300 us a 1.8 ms step, measured with one busy process beside the run. The
same rows written with SQLAlchemy Core, through MLflow's own table definitions
(`mlflow.store.tracking.dbmodels.models`), cost ~17 us a point.

What is written is what `log_batch` writes for points without a model id:

- one `metrics` row a point; NaN stored as 0 with `is_nan`, infinities as the largest
  float (`SqlAlchemyStore.sanitize_metric_value`);
- in `latest_metrics`, each key's point that is newest by (step, timestamp, value), the
  rule of `SqlAlchemyStore._update_latest_metrics_if_necessary`, its rows locked first.

Everything else goes through `log_batch` itself, so its answers stay MLflow's own:

- a store that is not MLflow's plain SQL store (a tracking server writes with its own
  store; a workspace-aware or a plugin's SQL store may scope or write more);
- an active model (`MLFLOW_ACTIVE_MODEL_ID`): `log_batch` links each point to it;
- tables whose columns differ from the ones written here (another MLflow schema);
- a key MLflow would refuse, a value that is not a number, a timestamp or a step that is
  not an int (or a negative timestamp);
- a run that is not active;
- any error of the direct write, which then leaves nothing (one transaction): a point
  already written (a replay), which MLflow drops, a full disk or a locked database,
  which MLflow reports.

Only the writer process imports this module (MLflow and SQLAlchemy at the top).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import sqlalchemy as sa
from mlflow.entities import Metric
from mlflow.entities.lifecycle_stage import LifecycleStage
from mlflow.exceptions import MlflowException
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from mlflow.tracking import MlflowClient
from mlflow.tracking.fluent import get_active_model_id
from mlflow.utils.validation import _validate_metric

from pipeline.tracking.spool import Point

COLUMNS = {"key", "value", "timestamp", "step", "is_nan", "run_uuid"}  # of both tables


def point_writer(client: MlflowClient, uri: str, run_id: str) -> Callable[[list[Point]], None]:
    """A function writing a batch of points to run `run_id` of the store at `uri`, the
    way `client.log_batch` would; raises what `log_batch` raises.

    Direct where the store at `uri` is a SQL store with the tables this module knows,
    `client.log_batch` otherwise (see the module doc).
    """

    def log_batch(batch: list[Point]) -> None:
        client.log_batch(run_id, metrics=[Metric(*p) for p in batch])

    store = _sql_store(uri)
    if store is None or get_active_model_id() is not None:
        return log_batch  # log_batch also links each point to the active model
    direct = _DirectWrite(store, run_id)

    def write(batch: list[Point]) -> None:
        if not direct.write(batch):
            log_batch(batch)

    return write


def _sql_store(uri: str) -> SqlAlchemyStore | None:
    """The store at `uri` if it is a SQL store whose metric tables have exactly `COLUMNS`,
    in the database and in MLflow's table definitions, else None."""
    from mlflow.tracking._tracking_service.utils import _get_store

    try:
        store = _get_store(uri)
        # Not a subclass: MLflow's workspace-aware store (MLFLOW_ENABLE_WORKSPACES) scopes
        # runs to a workspace, and a plugin's store may write other rows.
        if type(store) is not SqlAlchemyStore:
            return None
        found = sa.inspect(store.engine)
        for table in (SqlMetric.__table__, SqlLatestMetric.__table__):
            in_db = {c["name"] for c in found.get_columns(table.name)}
            if in_db != COLUMNS or set(table.columns.keys()) != COLUMNS:
                return None
    except Exception:  # MLflow's own calls will say what is wrong with the store
        return None
    return store


class _DirectWrite:
    """`log_batch`'s rows for one run, written with SQLAlchemy Core."""

    def __init__(self, store: SqlAlchemyStore, run_id: str) -> None:
        self.engine, self.run_id = store.engine, run_id
        self.sanitize = store.sanitize_metric_value
        self.keys: set[str] = set()  # keys MLflow accepts, checked once each

    def write(self, batch: list[Point]) -> bool:
        """Write `batch`; False, with nothing written, if `log_batch` must write it."""
        rows: list[dict] = []
        newest: dict[str, dict] = {}
        for key, value, timestamp, step in batch:
            if key not in self.keys and not self._valid(key):
                return False
            if type(timestamp) is not int or timestamp < 0 or type(step) is not int:
                return False
            if type(value) is not float:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    return False
                value = float(value)
            is_nan = False
            if not math.isfinite(value):
                is_nan, value = self.sanitize(value)
            row = {"key": key, "value": value, "timestamp": timestamp, "step": step,
                   "is_nan": is_nan, "run_uuid": self.run_id}  # fmt: skip
            rows.append(row)
            last = newest.get(key)
            if last is None or _order(row) > _order(last):
                newest[key] = row
        if not rows:
            return True
        try:
            with self.engine.begin() as conn:
                if not self._active(conn):
                    return False  # nothing written yet: log_batch raises MLflow's error
                conn.execute(sa.insert(SqlMetric.__table__), rows)
                self._update_latest(conn, newest)
        except Exception:  # rolled back: log_batch writes it or raises MLflow's error
            return False
        return True

    def _valid(self, key: str) -> bool:
        try:
            _validate_metric(key, 0.0, 0, 0)  # its name and length; the rest is per point
        except MlflowException:
            return False
        self.keys.add(key)
        return True

    def _active(self, conn: sa.Connection) -> bool:
        runs = SqlRun.__table__
        stage = conn.execute(
            sa.select(runs.c.lifecycle_stage).where(runs.c.run_uuid == self.run_id)
        ).scalar()
        return stage == LifecycleStage.ACTIVE

    def _update_latest(self, conn: sa.Connection, newest: dict[str, dict]) -> None:
        latest = SqlLatestMetric.__table__
        mine = latest.c.run_uuid == self.run_id
        # Locked in key order, as MLflow locks them: two writers of a run cannot deadlock.
        query = sa.select(latest).where(mine, latest.c.key.in_(sorted(newest)))
        query = query.order_by(latest.c.key).with_for_update()
        known = {r.key: r._mapping for r in conn.execute(query)}
        for key, row in newest.items():
            old = known.get(key)
            if old is None:
                conn.execute(sa.insert(latest), row)
            elif _order(row) > _order(old):
                values = {c: row[c] for c in ("value", "timestamp", "step", "is_nan")}
                conn.execute(sa.update(latest).where(mine, latest.c.key == key).values(values))


def _order(row) -> tuple:
    """What makes a point newer than another for `latest_metrics` (MLflow's rule)."""
    return (row["step"], row["timestamp"], row["value"])
