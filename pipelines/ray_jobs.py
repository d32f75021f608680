"""The Ray Jobs API: work submitted to a cluster by id (the scheduler's sampling batches), listed, read, stopped.

Every call goes through `retry(what, call, done=None, permanent=None)`, the caller's backoff through
transient errors (the scheduler's `retrying`); by default each call is tried once.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from ray.job_submission import JobSubmissionClient

from ddpm_core.errors import first_line
from pipelines.ray_runtime import REMOTE_TOKEN_FIX, RayConnectionError, is_auth_failure

log = logging.getLogger("ddpm.schedule")
PROGRESS_EVERY_S = 30.0  # the longest gap between two "waiting for" lines while jobs run


def once(what: str, call, done=None, permanent=None):
    """No retries: `call()`."""
    return call()


def already_submitted(error: Exception) -> bool:
    return "already exists" in str(error)


@dataclass(frozen=True)
class RayJob:
    """A job as the cluster reports it."""

    submission_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
    ended: bool
    message: str = ""
    start_time: float | None = None  # seconds since the epoch
    metadata: Mapping[str, str] = field(default_factory=dict)  # as submitted: what the job is for (the scheduler's)

    def running_longer_than(self, seconds: float) -> bool:
        return bool(self.start_time) and time.time() - self.start_time > seconds


class JobQueue:
    """The job API of one Ray cluster (`--address`, else RAY_ADDRESS), checked to answer this client's token."""

    def __init__(self, address: str | None, retry=once):
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise RayConnectionError("no Ray job API address: pass --address http://<head>:8265 or set RAY_ADDRESS")
        try:
            self.client = JobSubmissionClient(address)
        except Exception as error:  # noqa: BLE001 - connection, HTTP and authentication errors alike
            if is_auth_failure(error):
                raise RayConnectionError(f"the Ray job API at {address} refused this client's token: "
                                         f"{REMOTE_TOKEN_FIX}") from None
            raise RayConnectionError(f"cannot reach the Ray job API at {address}: {first_line(error)}") from None
        self.address, self.retry = address, retry

    def submit(self, job_id: str, command: list[str], env: dict[str, str], working_dir: str | None = None,
               metadata: dict[str, str] | None = None) -> bool:
        """Submit `command` under `job_id`: True, or False when a job of that id exists (Ray refuses a second)."""
        runtime_env: dict = {"env_vars": env}
        if working_dir:
            runtime_env["working_dir"] = working_dir
        try:
            self.retry(f"submitting {job_id}", lambda: self.client.submit_job(
                entrypoint=shlex.join(command), submission_id=job_id, runtime_env=runtime_env, metadata=metadata),
                permanent=already_submitted)
        except RuntimeError as error:
            if not already_submitted(error):
                raise
            return False
        return True

    def jobs(self) -> dict[str, RayJob]:
        """Every job the cluster knows that has a submission id, by that id."""
        found = self.retry("listing the jobs of the Ray cluster", self.client.list_jobs)
        return {job.submission_id: RayJob(job.submission_id, str(job.status), job.status.is_terminal(),
                                          job.message or "", job.start_time / 1000 if job.start_time else None,
                                          dict(job.metadata or {}))
                for job in found if job.submission_id}

    def failure_reason(self, job: RayJob) -> str:
        """The job's status and message, and the last error line of its log."""
        try:
            lines = [line for line in self.client.get_job_logs(job.submission_id).splitlines() if line.strip()]
        except Exception:  # noqa: BLE001 - logs are a courtesy
            lines = []
        errors = [line for line in lines if "ERROR" in line or "Error" in line]
        detail = (errors or lines or [""])[-1].strip()
        summary = job.message.split(", last available logs")[0]  # Ray appends the log tail
        return f"{job.status}: {summary}: {detail}"[:1000]

    def stop(self, job_id: str, timeout: float = 60) -> bool:
        """Stop a job and wait until it has ended (False if it has not after `timeout` seconds)."""
        self.retry(f"stopping {job_id}", lambda: self.client.stop_job(job_id))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.retry(f"reading the status of {job_id}", lambda: self.client.get_job_status(job_id)).is_terminal():
                return True
            time.sleep(1)
        log.warning("%s has not ended %.0f s after it was stopped; checked again on the next poll", job_id, timeout)
        return False

    def follow(self, watching: dict[int, str], timeout: float, poll: float,
               deadline: float) -> Iterator[tuple[int, RayJob, bool]]:
        """(key, job, False) as each job of `watching` ({key, e.g. a version: submission id}) ends, and (key, job,
        True) once one that ran past `deadline` seconds is stopped; after `timeout` seconds the rest is left
        running. Progress is logged when it changes, at least every PROGRESS_EVERY_S seconds."""
        watching, started, last_line, logged_at = dict(watching), time.monotonic(), None, -math.inf
        while watching:
            jobs = self.jobs()
            for key, job_id in list(watching.items()):
                job = jobs.get(job_id)
                if job is not None and (job.ended or (job.running_longer_than(deadline) and self.stop(job_id))):
                    del watching[key]
                    yield key, job, not job.ended
            if not watching:
                return
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                log.info("still running after %.0f s: %s; the next tick picks them up", elapsed,
                         ", ".join(watching.values()))
                return
            line = ", ".join(f"v{k} {jobs[j].status if j in jobs else 'PENDING'}" for k, j in watching.items())
            if line != last_line or elapsed - logged_at >= PROGRESS_EVERY_S:  # a fast poll does not flood the log
                log.info("waiting for %d batch(es): %s (%.0f s)", len(watching), line, elapsed)
                last_line, logged_at = line, elapsed
            time.sleep(poll)
