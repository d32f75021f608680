"""MLflow tracking for the jobs: the tracking URI, one experiment per dataset, one run per run name, the
training run's metrics from rank 0, and the evaluation runs. Every run and run-name convention is here."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import mlflow
import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from ddpm_core.errors import UserError, first_line

log = logging.getLogger("ddpm.train")  # the rank-zero tracker reports in the training job's log
RUN_NAME_TAG = "ddpm.run_name"
REPLACED_BY_TAG = "ddpm.replaced_by"
CHECKPOINT_DIR_TAG = "ddpm.checkpoint_dir"  # the run's folder under --storage, where Ray Train resumes from
EVALUATION_KIND = {"ddpm.kind": "evaluation"}  # the tag of every evaluation run
EVALUATION_EXPERIMENT = "ddpm-evaluations"  # for a model that no training run of this store made
CALIBRATION_EXPERIMENT = "ddpm-calibrations"
IMPORT_EXPERIMENT = "ddpm-imports"
MLFLOW_BATCH_METRICS = 1000  # the most metrics MLflow takes in one log_batch
# Workers try an MLflow request once, for at most 10 s (MLflow's defaults: 7 retries over minutes, 120 s each):
# RankZeroTracker keeps what fails, so a retry inside the request only stalls training. The driver keeps the
# defaults: its few calls (create the run, register the model) are worth waiting for.
WORKER_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(UserError):
    """An MLflow server or store that cannot be used, with the reason."""


def redact(uri: str) -> str:
    """The URI without any user:password part, for logs."""
    parsed = urlparse(uri)
    if parsed.password or parsed.username:
        return urlunparse(parsed._replace(netloc=parsed.hostname + (f":{parsed.port}" if parsed.port else "")))
    return uri


def resolve_tracking_uri(flag: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else a SQLite store in the working directory."""
    uri = flag or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Workers run in other directories: a relative SQLite path must become absolute.
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def connect(uri: str) -> MlflowClient:
    """Set the tracking URI and check that the store answers; one clear error when it does not."""
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is unusable
        if isinstance(error, mlflow.MlflowException) and error.get_http_status_code() in (401, 403):
            # 401 alike for a missing, unknown or wrong credential (403: a user without access); the message
            # names the variables to set, never their values.
            raise TrackingError(f"MLflow at {redact(uri)} refused the credentials: set MLFLOW_TRACKING_USERNAME "
                                "and MLFLOW_TRACKING_PASSWORD") from None
        raise TrackingError(f"cannot reach the MLflow tracking store at {redact(uri)}: {first_line(error)}") from None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return client


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # Without a server, artifacts go next to the database, not into whatever CWD a worker has.
        location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


def param_value(value) -> str:
    """`value` as an MLflow param stores it (a string of at most 6000 characters)."""
    return str(value)[:6000]


def find_or_create_run(client: MlflowClient, experiment: str, run_name: str, params: dict, tags: dict,
                       force_new: bool = False) -> tuple[mlflow.entities.Run, bool]:
    """(run, resumed): the run tagged with `run_name` in `experiment`, or a new one with `params` and `tags`.

    `force_new` creates a new run even when one exists; the old run keeps its history but loses the name
    tag (it gets `ddpm.replaced_by`), so it is never resumed again.
    """
    runs = client.search_runs([experiment], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                              max_results=1, order_by=["attributes.start_time DESC"])
    if runs and not force_new:
        return runs[0], True
    run = client.create_run(experiment, run_name=run_name, tags={**tags, RUN_NAME_TAG: run_name})
    items = [mlflow.entities.Param(k, param_value(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    # Untagged only once the new run exists: a crash in between leaves two tagged runs, and the newer is picked.
    for old in runs:
        client.set_tag(old.info.run_id, REPLACED_BY_TAG, run.info.run_id)
        client.delete_tag(old.info.run_id, RUN_NAME_TAG)
    return run, False


class RankZeroTracker:
    """Metrics and sample grids of rank 0 to the run the driver created; an MLflow outage never stops training.

    What MLflow does not take is kept in memory (at most `max_values` metric values and `max_grids` grids,
    the oldest dropped first and counted in the metric `mlflow_points_dropped`) and re-sent in order, with
    its original step and timestamp, before anything newer. A value sent twice (a reply lost after the
    server stored it) is stored once: MLflow's SQL store drops exact (key, step, timestamp, value) repeats.

    Sent from the training loop, not from a background thread: the worker gets one try per request and a
    short timeout (WORKER_MLFLOW_ENV), so a dead server costs a refused connection and a hung one at most
    one timeout per log call, while order, the final flush and the tests stay simple.
    """

    def __init__(self, tracking_uri: str, run_id: str, max_values: int = 100_000, max_grids: int = 8):
        self.client, self.run_id, self.tracking_uri = MlflowClient(tracking_uri), run_id, tracking_uri
        self.max_values, self.max_grids = max_values, max_grids
        self.dropped = 0  # points (metric values and grids) lost to a full buffer
        self._values: deque[list] = deque()  # one list of mlflow Metric per call, oldest first
        self._value_count = 0
        self._grids: deque[tuple[np.ndarray, int, int]] = deque()  # (grid, step, timestamp in ms)
        self._outage_since: float | None = None  # time.monotonic() of the first failure
        self._warned_full = False

    @property
    def pending(self) -> int:
        """Points (metric values and grids) MLflow has not taken yet."""
        return self._value_count + len(self._grids)

    def metrics(self, values: dict[str, float], step: int) -> None:
        if self.dropped:
            values = {**values, "mlflow_points_dropped": self.dropped}
        now = int(time.time() * 1000)
        self._values.append([Metric(k, float(v), now, step) for k, v in values.items()])
        self._value_count += len(values)
        self._send()

    def image(self, grid: np.ndarray, step: int) -> None:
        self._grids.append((grid, step, int(time.time() * 1000)))
        self._send()

    @contextlib.contextmanager
    def system_metrics(self):
        """MLflow's system metrics of this machine while the block runs (`system/cpu_utilization_percentage`,
        memory, disk, network, and with pynvml the GPUs), every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL);
        a resumed run continues their steps. `log_system_metrics=True` would monitor the driver, which only
        waits: the run is trained here. Without psutil, or with MLflow away at the start, there are none."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(self.run_id, resume_logging=True, tracking_uri=self.tracking_uri)
        except Exception as error:  # noqa: BLE001 - no psutil, or no answer: training goes on without them
            log.warning("no system metrics for this run: %s", first_line(error))
            yield
            return
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def close(self) -> int:
        """Send what is pending (the end of training); returns how many points could not be, with one warning."""
        error = self._flush()
        if error:
            log.warning("MLflow is still unreachable at the end of training (%s): %d metric values and %d sample "
                        "grids were not logged", error, self._value_count, len(self._grids))
        return self.pending

    def _send(self) -> None:
        pending = self.pending
        error = self._flush()
        if error:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("MLflow did not take the metrics (%s); training goes on, keeping them in memory until "
                            "it answers again", error)
            self._trim()
        elif self._outage_since is not None:
            log.info("MLflow answers again after %.0f s: sent the %d points logged meanwhile",
                     time.monotonic() - self._outage_since, pending)
            self._outage_since, self._warned_full = None, False

    def _trim(self) -> None:
        """Drop the oldest points beyond the bounds, with one warning per outage."""
        dropped = self.dropped
        while self._value_count > self.max_values:
            call = self._values.popleft()
            self._value_count -= len(call)
            self.dropped += len(call)
        while len(self._grids) > self.max_grids:
            self._grids.popleft()
            self.dropped += 1
        if self.dropped > dropped and not self._warned_full:
            log.warning("the buffer for MLflow is full (%d metric values, %d grids): dropping the oldest points, "
                        "counted in the metric mlflow_points_dropped", self.max_values, self.max_grids)
            self._warned_full = True

    def _flush(self) -> str | None:
        """Send the pending points oldest first; at the first failure stop and return its first line."""
        try:
            while self._values:
                count, batch = 0, []  # whole calls, merged into as few requests as MLflow allows
                for call in self._values:
                    if batch and len(batch) + len(call) > MLFLOW_BATCH_METRICS:
                        break
                    count, batch = count + 1, batch + call
                self.client.log_batch(self.run_id, metrics=batch)
                for _ in range(count):
                    self._values.popleft()
                self._value_count -= len(batch)
            while self._grids:
                grid, step, timestamp = self._grids[0]
                self.client.log_image(self.run_id, grid, key="ema_samples", step=step, timestamp=timestamp)
                self._grids.popleft()
        except Exception as error:  # noqa: BLE001 - an outage surfaces as any transport or server error
            if isinstance(error, MlflowException) and error.get_http_status_code() == 400:
                raise  # the server read the request and refused it: a bug, not an outage
            return first_line(error)
        return None


class TrainingRun:
    """The MLflow run of a training job's `--name`: created, or found again to resume, and its tags."""

    def __init__(self, client: MlflowClient, tracking_uri: str, experiment: str, name: str, params: dict,
                 new_folder: str, force_new: bool):
        self.client = client
        experiment_key = experiment_id(client, experiment, tracking_uri)
        run, self.resumed = find_or_create_run(client, experiment_key, name, params, {CHECKPOINT_DIR_TAG: new_folder},
                                               force_new)
        self.run_id = run.info.run_id
        # The params it was started with (to check a resume against), and its checkpoint folder (a run from
        # before the tag: <name>).
        self.started_params = dict(run.data.params) if self.resumed else None
        self.folder = run.data.tags.get(CHECKPOINT_DIR_TAG, name) if self.resumed else new_folder

    def mark_running(self) -> None:
        """A resumed run is running again (once the resume was found valid: a refused one stays as it was)."""
        self.client.update_run(self.run_id, status="RUNNING")

    def discard(self) -> None:
        """Delete a run this command created and then refused (it never trained)."""
        self.client.delete_run(self.run_id)

    def record_dataset(self, uri: str, name: str, info: dict) -> None:
        """The dataset as the run's input (MLflow's Datasets tab): its fingerprint (the digest shows its first
        36 characters, the store's limit; the profile has it whole), source and image counts (dataset.json)."""
        profile = {"fingerprint": info["fingerprint"], "counts": info["counts"], "resolution": info["resolution"],
                   "encoding": info["encoding"]}
        dataset = Dataset(name=name, digest=info["fingerprint"][:36], source_type="ddpm-shards",
                          source=json.dumps({"uri": redact(uri)}), profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def record_checkpoints(self, location: str) -> None:
        self.client.set_tag(self.run_id, "checkpoint_location", location)

    def record_final_checkpoint(self, uri: str) -> None:
        self.client.set_tag(self.run_id, "checkpoint", uri)

    def fail(self) -> None:
        self.client.set_terminated(self.run_id, "FAILED")


def logged_model_id(version) -> str | None:
    """The logged model a registered version was made from: its `model_id`, else (MLflow 3.17's SQL registry
    stores none) the id in its source `models:/<model_id>`, as `register` makes it."""
    if version.model_id:
        return version.model_id
    source = version.source or ""
    return source[len("models:/"):] if source.startswith("models:/m-") else None


def evaluation_run_name(result: dict, version=None) -> str:
    """e.g. `eval ddpm-demo v3 dpmpp_2m20 n2000`; a model folder or checkpoint is named by its folder."""
    model = f"{version.name} v{version.version}" if version is not None else Path(result["model"].split("@")[0]).name
    return f"eval {model} {result['sampler']}{result['steps']} n{result['num']}"


def log_evaluation(client: MlflowClient, tracking_uri: str, result: dict, metrics: dict[str, float],
                   training_run_id: str | None, grid: np.ndarray, version=None) -> None:
    """An evaluation run named after the model and spec: the result's settings as params, its scores as
    `metrics` (named by EvaluationResult.metrics), a grid of the first samples and the result itself; in the
    experiment of the training run that made the model, if there is one. The scores of a registered `version`
    are linked to its logged model (MLflow 3's model metrics): the version's page shows them."""
    experiment = client.get_run(training_run_id).info.experiment_id if training_run_id else None
    if experiment is None:
        experiment = experiment_id(client, EVALUATION_EXPERIMENT, tracking_uri)
    params = {k: v for k, v in result.items() if not (isinstance(v, float) and k != "eta")}
    with mlflow.start_run(experiment_id=experiment, run_name=evaluation_run_name(result, version),
                          tags=EVALUATION_KIND):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics, model_id=logged_model_id(version) if version is not None else None)
        mlflow.log_image(grid, "samples_first_64.png")
        mlflow.log_dict(result, "fid.json")


def log_calibration(tracking_flag: str | None, report: dict, table: str, plot: bytes) -> str:
    """A calibration run (pipelines/calibrate.py): per cheap spec its Spearman rho and cost ratio as metrics,
    the table, the plot and the report as artifacts. Returns the run id."""
    uri = resolve_tracking_uri(tracking_flag)
    client = connect(uri)
    run = client.create_run(experiment_id(client, CALIBRATION_EXPERIMENT, uri),
                            run_name=f"calibrate-{'-'.join(row['spec'] for row in report['specs'])}-vs-"
                                     f"{report['expensive']}",
                            tags={"ddpm.kind": "calibration"})
    metrics = {f"{kind}_{row['spec']}": row[kind] for row in report["specs"] for kind in ("spearman", "cost_ratio")}
    stamp = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(key, float(value), stamp, 0) for key, value in metrics.items()],
                     params=[Param("expensive", report["expensive"]), Param("models", str(len(report["models"])))])
    client.log_text(run.info.run_id, table, "calibration.md")
    client.log_dict(run.info.run_id, report, "calibration.json")
    client.log_image(run.info.run_id, np.asarray(Image.open(io.BytesIO(plot)).convert("RGB")), "calibration.png")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def import_run(client: MlflowClient, tracking_uri: str, preset: str, tags: dict) -> str:
    """A run that stands for an imported model (the registry wants one to log the model in)."""
    run = client.create_run(experiment_id(client, IMPORT_EXPERIMENT, tracking_uri), run_name=f"import-{preset}",
                            tags={k: str(v) for k, v in tags.items()})
    return run.info.run_id
