"""MLflow for the jobs: tracking URI, one experiment per dataset, one run per run name, the registry."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import mlflow
from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
RUN_NAME_TAG = "ddpm.run_name"
REPLACED_BY_TAG = "ddpm.replaced_by"


class TrackingError(RuntimeError):
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
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TrackingError(f"cannot reach the MLflow tracking store at {redact(uri)}: {first_line}") from None
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
