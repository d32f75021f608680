"""Integration: rank 0's MLflow logging through an outage of a real `mlflow server` (stopped, then restarted)."""

import logging
import time

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines.mlflow_tracking import WORKER_MLFLOW_ENV, RankZeroTracker
from pipelines.ray_runtime import free_port
from tests.mlflow_servers import MlflowServer


@pytest.fixture(autouse=True)
def worker_mlflow_env(monkeypatch):
    """The HTTP settings a training worker runs with: one try per request."""
    for key, value in WORKER_MLFLOW_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server
    server.stop()


def new_run(uri: str, monkeypatch) -> str:
    """The run to log to, made with MLflow's own retries: the worker's one try of 10 s is the tracker's alone (a
    server's first request after its start can take longer on a loaded machine)."""
    with monkeypatch.context() as patch:
        for key in WORKER_MLFLOW_ENV:
            patch.delenv(key)
        client = MlflowClient(uri)
        return client.create_run(client.create_experiment("outage")).info.run_id


def records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ddpm.train" and r.levelno == level]


def test_points_logged_during_an_outage_reach_mlflow_once_in_order_with_their_time(server, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="ddpm.train")
    server.start()
    run_id = new_run(server.uri, monkeypatch)
    tracker = RankZeroTracker(server.uri, run_id)
    logged = {"loss": [], "lr": []}

    def log_step(step):
        values = {"loss": 1.0 / step, "lr": step * 1e-4}
        tracker.metrics(values, step)
        for key, value in values.items():
            logged[key].append((step, value))

    log_step(1)
    log_step(2)
    assert tracker.pending == 0

    server.stop()
    for step in (3, 4, 5, 6):
        log_step(step)  # no exception: kept
    grid = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    tracker.image(grid, 4)
    assert tracker.pending == 4 * 2 + 1
    assert len(records(caplog, logging.WARNING)) == 1  # one warning for the outage, not one per call
    assert "MLflow did not take the metrics" in records(caplog, logging.WARNING)[0]

    restarted_ms = time.time() * 1000
    server.start()
    log_step(7)
    assert tracker.pending == 0
    assert tracker.close() == 0
    infos = records(caplog, logging.INFO)  # one line for the end of the outage
    assert len(infos) == 1 and "MLflow answers again after" in infos[0]
    assert "sent the 11 points logged meanwhile" in infos[0]  # steps 3-7, two values each, and the grid
    assert len(records(caplog, logging.WARNING)) == 1

    client = MlflowClient(server.uri)
    for key, expected in logged.items():
        history = client.get_metric_history(run_id, key)  # ordered by timestamp, then step
        assert [(m.step, m.value) for m in history] == expected  # each (step, value) once, in order
        # The buffered points kept the time they were logged, before the server came back.
        assert all(m.timestamp < restarted_ms for m in history if m.step <= 6)
        assert [m.timestamp for m in history if m.step == 7][0] >= restarted_ms
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert len(images) == 1 and "+step+4+" in images[0]
    assert int(images[0].split("+timestamp+")[1].split("+")[0]) < restarted_ms
    assert "mlflow_points_dropped" not in client.get_run(run_id).data.metrics


def test_a_full_buffer_drops_the_oldest_points_once_warned_and_counts_them(server, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="ddpm.train")
    # In the server's store; the server is not up yet.
    run_id = new_run(f"sqlite:///{server.root / 'mlflow.db'}", monkeypatch)
    tracker = RankZeroTracker(server.uri, run_id, max_values=4)
    for step in (1, 2, 3, 4):
        tracker.metrics({"loss": float(step), "lr": 0.1}, step)
    # Step 3 overflowed the buffer (step 1 dropped); step 4 added the counter (3 values) and dropped 2 and 3.
    assert tracker.dropped == 6 and tracker.pending == 3
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2 and "dropping the oldest points" in warnings[1]

    server.start()
    tracker.metrics({"loss": 5.0, "lr": 0.1}, 5)
    assert tracker.pending == 0 and tracker.close() == 0
    client = MlflowClient(server.uri)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [4, 5]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "mlflow_points_dropped")] == [(4, 2), (5, 6)]
    assert len(records(caplog, logging.WARNING)) == 2


def test_a_final_flush_that_fails_warns_once_naming_what_was_lost(caplog):
    caplog.set_level(logging.INFO, logger="ddpm.train")
    tracker = RankZeroTracker(f"http://127.0.0.1:{free_port()}", "0" * 32)  # nothing listens there
    for step in (1, 2, 3):
        tracker.metrics({"loss": 1.0, "lr": 0.1}, step)
    tracker.image(np.zeros((8, 8, 3), dtype=np.uint8), 3)
    assert tracker.close() == 7
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 2
    assert "still unreachable at the end of training" in warnings[1]
    assert "6 metric values and 1 sample grids were not logged" in warnings[1]


def test_system_metrics_of_the_training_machine_go_to_the_run_and_a_resume_continues_their_steps(tmp_path,
                                                                                               monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = new_run(uri, monkeypatch)
    for _ in range(2):  # the run, then the same run resumed
        with RankZeroTracker(uri, run_id).system_metrics():
            time.sleep(1.0)
    history = MlflowClient(uri).get_metric_history(run_id, "system/cpu_utilization_percentage")
    steps = [m.step for m in history]
    assert len(steps) >= 2 and steps == sorted(set(steps)) and all(0 <= m.value <= 100 for m in history)
    assert MlflowClient(uri).get_metric_history(run_id, "system/system_memory_usage_megabytes")[0].value > 0
