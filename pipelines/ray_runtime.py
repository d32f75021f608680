"""Ray for the jobs: joining the cluster a job was submitted to (or a local Ray on 127.0.0.1, token auth on),
running work on it (tasks, Ray Data actor pools, a resource check) and a local head with its job API."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import ray
import torch
from ray.job_submission import JobSubmissionClient

from ddpm_core.errors import ArgumentError, UserError

log = logging.getLogger(__name__)
# Where a client finds a cluster's token (Ray reads them in this order, then ~/.ray/auth_token).
TOKEN_ENV = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
REMOTE_TOKEN_FIX = ("set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<a file holding the cluster's token> "
                    "(or RAY_AUTH_TOKEN=<the token>); the cluster's admin has it (`ray get-auth-token` on the head)")


class RayConnectionError(UserError):
    """A cluster this job cannot join, with the fix."""


class ClusterTooSmall(UserError):
    """A cluster without the resources a job asks for."""


def use_local_token(state_dir: Path) -> Path | None:
    """A token of its own, in `state_dir`, for a Ray this process starts (token mode: pipelines/__init__.py).

    A token the user configured (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) is used as it is. Otherwise the
    token is created in `state_dir` and RAY_AUTH_TOKEN_PATH points this process and its children (the
    head, its workers, the jobs they run) to it: `~/.ray/auth_token` is never read or written, so a
    fresh HOME works and other clusters' tokens are left alone. Call before Ray first reads a token.
    Returns the token file, or None when the user's token is used.
    """
    if any(os.environ.get(name) for name in TOKEN_ENV):
        return None
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "auth_token"
    if not _own_private_token(path):
        path.unlink(missing_ok=True)  # a link, another user's file or one others can read: never reused
        # O_EXCL | O_NOFOLLOW: created here, by this process, not through a link planted in between.
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "w") as token:
            token.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    return path


def _own_private_token(path: Path) -> bool:
    """Whether `path` is a regular file (not a link) of this user, readable by no one else, holding a token."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(found.st_mode) and found.st_uid == os.getuid() and found.st_mode & 0o077 == 0
            and bool(path.read_text().strip()))


def is_auth_failure(error: BaseException) -> bool:
    """Whether Ray refused a client for a missing or wrong token."""
    text = f"{type(error).__name__} {error}".lower()
    # 401 as a status, not as digits of a port, a PID or a job id.
    return (any(word in text for word in ("authentication", "unauthorized", "unauthenticated"))
            or re.search(r"(?<![\w.:/=-])401(?![\w.:/=-])", text) is not None)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    `--address auto` joins a cluster that `ray start` runs on this machine; without an address the
    job never attaches to one by accident. A local Ray gets a token of its own (`use_local_token`),
    kept in a folder that goes with this process.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=True)
        except Exception as error:
            if is_auth_failure(error):
                raise RayConnectionError(f"the Ray cluster at {address} refused this client's token: "
                                   f"{REMOTE_TOKEN_FIX}") from None
            raise
    else:
        state = Path(tempfile.mkdtemp(prefix="ddpm-ray-"))
        atexit.register(shutil.rmtree, state, ignore_errors=True)
        use_local_token(state)
        # Loopback only (single-machine mode, pipelines/__init__.py): a laptop run must not open ports on the
        # network. Its own session folder: see LocalHead.
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=True, _temp_dir=str(state))
    log.info("Ray resources: %s", ray.cluster_resources())


class WorkerUserError(UserError):
    """A UserError raised by an actor on a worker, as that actor's one line."""


USER_ERROR = "user_error"  # the column of a row that carries an actor's UserError to the driver


class _UserErrorsAsRows:
    """A Ray Data actor around `actor_class(**kwargs)` (a subclass per actor class, named after it: see
    `map_rows`): a UserError in its constructor or a call becomes a row {USER_ERROR: message}. Raised, Ray would
    retry what no retry fixes, then report a dead actor without the message (ActorDiedError keeps only text)."""

    actor_class: type

    def __init__(self, **kwargs):
        self.actor, self.error = None, None
        try:
            self.actor = self.actor_class(**kwargs)
        except UserError as error:
            self.error = str(error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is None:
            try:
                return self.actor(batch)
            except UserError as error:
                self.error = str(error)
        return {USER_ERROR: np.array([self.error])}


def _raise_user_errors(rows: Iterator[dict]) -> Iterator[dict]:
    for row in rows:
        if USER_ERROR in row:
            raise WorkerUserError(str(row[USER_ERROR]))
        yield row


ACTOR_RETRIES = 2  # restarts of an actor, and retries of its item, before the job fails (Ray Data's: forever)


def map_rows(actor_class, actor_kwargs: dict, items: list[dict], actors: int, address: str | None, *,
             num_cpus: float, gpu: bool = False) -> Iterator[dict]:
    """The rows of `actor_class(**actor_kwargs)` called on one item at a time, from a pool of `actors` Ray Data
    actors (joined or started by `init_ray(address)`).

    `actors=0`: one instance in this process yields the rows Ray Data would, using this process's threads
    (`actor_kwargs["threads"]`): small jobs need no Ray. The items stay in their order either way.
    The pool never holds more actors than there are items: an idle actor would only load its models.
    A UserError of an actor on a worker is raised here, as itself, and not retried; other failures are retried
    ACTOR_RETRIES times.
    """
    if actors < 0:
        raise ArgumentError(f"--actors must be >= 0, got {actors}")
    if actors == 0:
        actor = actor_class(**{**actor_kwargs, "threads": torch.get_num_threads()})
        return ({key: value[0] for key, value in actor({k: np.array([v]) for k, v in item.items()}).items()}
                for item in items)
    init_ray(address)
    # The caller's progress (ddpm_core/progress.py) counts images, not rows, and says the time left: Ray Data's
    # bars of rows beside it would overwrite it on a terminal and repeat it in a cluster job's log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    pool = ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items))))
    # Named after the actor class: Ray's stage, actor and dashboard names say what runs.
    guarded = type(actor_class.__name__, (_UserErrorsAsRows,), {"actor_class": actor_class})
    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args for the options it names (ray-project/ray#65227); an actor's
        # restarts and retries are not among them yet, so they stay there, and the warning, which would tell
        # every user of a sampling job to change code they cannot reach, is this call's alone to silence.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        mapped = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            guarded, batch_size=1, compute=pool, num_gpus=1 if gpu else 0, num_cpus=num_cpus,
            fn_constructor_kwargs=actor_kwargs, max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
    return _raise_user_errors(mapped.iter_rows())


def run_tasks(function: Callable, shared, calls: list[tuple], address: str | None, parallel: int | None,
              max_retries: int = 3) -> Iterator:
    """`function(shared, *call)` for each call as a Ray task of one CPU, at most `parallel` in flight (default:
    the cluster's CPUs); yields the results as they finish. `shared` is put in the object store once."""
    init_ray(address)
    task = ray.remote(num_cpus=1, max_retries=max_retries)(function)
    shared_ref = ray.put(shared)
    limit = parallel or max(1, int(ray.cluster_resources().get("CPU", 1)))
    queue, in_flight = list(calls), []
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            in_flight.append(task.remote(shared_ref, *queue.pop(0)))
        finished, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(finished[0])


def require_resources(per_worker: dict[str, float], workers: int) -> None:
    """Refuse a job the cluster cannot place: `workers` workers of `per_worker` resources each."""
    available = ray.cluster_resources()
    for kind, amount in per_worker.items():
        if available.get(kind, 0) < amount * workers:
            raise ClusterTooSmall(f"cannot place {workers} workers needing {amount:g} {kind} each: the cluster has "
                                  f"{available.get(kind, 0):g} {kind}")


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1: all held open at once, as one after another the OS may repeat one."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def free_port() -> int:
    return free_ports(1)[0]


class LocalHead:
    """A Ray head on 127.0.0.1 (`ray start --head --block`, token authentication on) with its job API.

    Every server of it listens on 127.0.0.1 only: Ray's single-machine mode (pipelines/__init__.py), which the
    head, its jobs and every client of this process share.

    Every port is explicit and free, so it coexists with other Ray clusters on the machine, and `stop()`
    ends this cluster's processes only (never `ray stop`, which ends every cluster of the machine).
    Jobs run `python ...` from the head's PATH: this environment's python comes first. Its token is
    created in `state_dir` unless the user configured one (`use_local_token`); this process and the
    jobs it submits use the same. Its session folder (`--temp-dir`) is its own too: a job's driver finds
    its cluster through `<temp dir>/ray_current_cluster`, which in the shared /tmp/ray names whichever
    cluster of the machine started last.
    """

    PORT_FLAGS = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
                  "runtime-env-agent-port", "ray-client-server-port", "node-manager-port", "object-manager-port")

    def __init__(self, num_cpus: int, state_dir: Path, timeout: float = 180):
        state_dir.mkdir(parents=True, exist_ok=True)
        use_local_token(state_dir)
        log_path = state_dir / "ray-head.log"
        # Short: Ray's unix sockets live below it (at most 107 characters).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ddpm-ray-head-"))
        ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        # Distinct: Ray refuses to start when two of its components are given the same port.
        gcs_port, dashboard_port, *component_ports = free_ports(2 + len(self.PORT_FLAGS))
        self.address, self.job_api = f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}"
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [ray_cli, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                 f"--num-cpus={num_cpus}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
                 "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
                 *(f"--{flag}={port}" for flag, port in zip(self.PORT_FLAGS, component_ports))],
                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_for_job_api(timeout, log_path)
        except BaseException:
            self.stop()
            raise

    def _wait_for_job_api(self, timeout: float, log_path: Path) -> None:
        """The job agent registers seconds after the head starts: wait until a trivial job has run."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = JobSubmissionClient(self.job_api)
                job = client.submit_job(entrypoint="python -c pass")
                while not client.get_job_status(job).is_terminal():
                    time.sleep(0.5)
                return
            except Exception as error:  # noqa: BLE001 - not up yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the local Ray head at {self.job_api} never accepted a job ({error}); "
                                       f"see {log_path}") from None
                time.sleep(1)

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM to the head's process group, then SIGKILL to whatever is left after `grace` seconds.

        Gracefully the raylet and GCS take 20-30 s to exit; nothing of this cluster outlives it (its
        session folder is removed next), so a short grace is enough. This process detaches from it first, if
        it joined it (a connection to another cluster is left alone).
        """
        if ray.is_initialized() and ray.get_runtime_context().gcs_address == self.address:
            ray.shutdown()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is still there
        except ProcessLookupError:
            pass
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
