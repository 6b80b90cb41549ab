"""The writer process's direct write of metric points into a SQL store (`tracking.points`)
leaves the rows `log_batch` would leave, in real sqlite and PostgreSQL stores, and hands
everything it does not know to `log_batch`; its queue merges what the loop hands over but
lets no point wait past `LINGER_S`."""

from __future__ import annotations

import math
import threading
import time

import pytest
import sqlalchemy as sa
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.tracking import points, spool
from pipeline.tracking.connection import open_store

from .conftest import PG_BIN

NAN, INF = math.nan, math.inf
# Out of order on purpose: the newest point of a key by (step, timestamp, value) is in the
# first batch for train/loss, in the second for train/lr; a NaN, both infinities, an int,
# two points of one step that differ only by timestamp, or only by value.
BATCHES = [
    [("train/loss", 0.5, 1000, 3), ("train/loss", 0.7, 1000, 1), ("train/lr", 0.1, 1000, 1),
     ("val/loss", NAN, 1001, 2), ("train/x", INF, 1002, 2), ("train/x", -INF, 1003, 2)],
    [("train/loss", 0.9, 1010, 2), ("train/lr", 0.05, 1010, 2), ("val/loss", 0.3, 1000, 2),
     ("train/n", 7, 1011, 5), ("train/n", 8, 1011, 5), ("train/y", 1.0, 1012, 4),
     ("train/y", 1.0, 1013, 4)],
]  # fmt: skip


def _rows(engine: sa.Engine, table: str, run_id: str) -> list[tuple]:
    """A run's rows of `table`, without its id, NaN as a string (NaN != NaN), sorted."""
    with engine.connect() as conn:
        found = conn.execute(
            sa.text(f"SELECT key, value, timestamp, step, is_nan FROM {table} WHERE run_uuid = :r"),
            {"r": run_id},
        )
        return sorted(tuple("nan" if v != v else v for v in r) for r in found)


def _same_rows_as_log_batch(uri: str) -> None:
    open_store(uri)
    client = MlflowClient(uri)
    experiment = client.create_experiment("points")
    direct, reference = (client.create_run(experiment).info.run_id for _ in range(2))
    store = points._sql_store(uri)
    assert store is not None, "the direct write is not used on this store"
    write = points.point_writer(client, uri, direct)
    for batch in BATCHES:
        write(batch)
        client.log_batch(reference, metrics=[Metric(*p) for p in batch])
    for table in ("metrics", "latest_metrics"):
        ours, mlflows = _rows(store.engine, table, direct), _rows(store.engine, table, reference)
        assert ours == mlflows, table
    latest = client.get_run(direct).data.metrics
    assert latest["train/loss"] == 0.5 and latest["train/lr"] == 0.05 and latest["train/n"] == 8
    assert math.isnan(latest["val/loss"])


def test_direct_writes_leave_log_batchs_rows_in_sqlite(tmp_path):
    _same_rows_as_log_batch(f"sqlite:///{tmp_path}/mlflow.db")


@pytest.mark.slow
@pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL binaries (initdb, pg_ctl) not installed")
def test_direct_writes_leave_log_batchs_rows_in_postgresql(postgres):
    _same_rows_as_log_batch(f"{postgres}/mlflow")


@pytest.fixture
def store(tmp_path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    open_store(uri)
    client = MlflowClient(uri)
    return uri, client, client.create_run(client.create_experiment("points")).info.run_id


def _error(write, batch) -> str:
    with pytest.raises(MlflowException) as raised:
        write(batch)
    return raised.value.message


def test_what_the_direct_write_does_not_know_gets_log_batchs_answer(store):
    uri, client, run_id = store
    write = points.point_writer(client, uri, run_id)
    write(BATCHES[0])
    write(BATCHES[0])  # sent again (its answer lost): MLflow keeps each point once
    engine = points._sql_store(uri).engine
    assert len(_rows(engine, "metrics", run_id)) == len(BATCHES[0])
    bad_key = [("train/loss", 0.1, 1, 9), ("bad\nkey", 0.1, 1, 9)]
    for bad in (bad_key, [("train/loss", None, 1, 9)], [("train/loss", 0.1, -1, 9)]):
        refused = _error(lambda b: client.log_batch(run_id, [Metric(*p) for p in b]), bad)
        assert _error(write, bad) == refused
    assert len(_rows(engine, "metrics", run_id)) == len(BATCHES[0])  # nothing of it written
    client.delete_run(run_id)
    message = _error(write, [("train/loss", 0.1, 2, 10)])
    assert "must be in the 'active' state" in message


def test_tables_of_another_schema_and_servers_are_left_to_log_batch(store):
    uri, client, run_id = store
    assert points._sql_store("http://127.0.0.1:1") is None  # the server writes its own rows
    engine = points._sql_store(uri).engine
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE metrics ADD COLUMN origin VARCHAR(10)"))
    assert points._sql_store(uri) is None
    points.point_writer(client, uri, run_id)(BATCHES[0])
    assert len(client.get_metric_history(run_id, "train/loss")) == 2


def test_a_point_waits_for_others_at_most_linger_s(store):
    uri, client, run_id = store
    queue = spool.PointQueue(client, uri, run_id)
    start = time.monotonic()
    queue.put([("train/loss", 0.5, 1, 1)])
    while not client.get_metric_history(run_id, "train/loss"):
        assert time.monotonic() - start < spool.LINGER_S + 10, "not written while the run goes on"
        time.sleep(0.05)
    assert time.monotonic() - start >= spool.LINGER_S * 0.9  # it waited for company
    for step in range(2, 2 + spool.MAX_POINTS_PER_BATCH):  # merged into two writes
        queue.put([("train/loss", 0.5, 1, step)])
    assert queue.close(0.0) == {"kept": 0}
    assert len(client.get_metric_history(run_id, "train/loss")) == 1 + spool.MAX_POINTS_PER_BATCH


def test_points_of_a_run_with_an_active_model_are_linked_to_it_as_log_batch_links_them(
    store, monkeypatch
):
    uri, client, run_id = store
    model = client.create_logged_model(client.get_run(run_id).info.experiment_id)
    monkeypatch.setenv("MLFLOW_ACTIVE_MODEL_ID", model.model_id)
    # On a fresh thread, as the writer's sender thread: MLflow reads the variable into a
    # thread-local the first time a thread asks.
    write = threading.Thread(
        target=lambda: points.point_writer(client, uri, run_id)([("train/loss", 0.5, 1, 1)])
    )
    write.start()
    write.join()
    assert [(m.key, m.value) for m in client.get_logged_model(model.model_id).metrics] == [
        ("train/loss", 0.5)
    ]
