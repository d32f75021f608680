"""The Ray owner's rules: token files, what counts as a token refusal, bounded actor retries, and every local
Ray of ours (a job's in-process Ray, the local head) listening on 127.0.0.1 only."""

import ipaddress
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.ray_runtime import ACTOR_RETRIES, is_auth_failure, map_rows, use_local_token


@pytest.fixture
def no_user_token(monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_a_token_file_is_reused_only_when_private_and_never_through_a_link(tmp_path, no_user_token):
    state = tmp_path / "state"

    def token_of_a_new_process():
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)  # each call is a new process's: no token set yet
        return use_local_token(state)

    first = token_of_a_new_process()
    token = first.read_text()
    assert token_of_a_new_process() == first and first.read_text() == token  # reused as it is
    first.chmod(0o644)  # readable by others: someone may have it
    assert token_of_a_new_process().read_text() != token and first.stat().st_mode & 0o777 == 0o600
    planted = tmp_path / "planted"
    planted.write_text("f" * 64)
    planted.chmod(0o600)
    first.unlink()
    first.symlink_to(planted)  # a link to a token someone else chose
    assert token_of_a_new_process() == first and not first.is_symlink()
    assert first.read_text() != "f" * 64 and planted.read_text() == "f" * 64


@pytest.mark.parametrize("text, refused", [
    ("Unauthenticated: invalid token", True),
    ("HTTP 401 Unauthorized", True),
    ("status code 401", True),
    ("failed to connect to 127.0.0.1:40155", False),
    ("cannot reach http://127.0.0.1:4011/api/jobs/", False),
    ("job raysubmit_401abc failed", False),
    ("actor died (pid=401)", False),
])
def test_a_token_refusal_is_told_from_digits_that_happen_to_be_401(text, refused):
    assert is_auth_failure(RuntimeError(text)) is refused


class CrashesEveryTime:
    """An actor whose process dies on every item (as an OOM kill would), counting its attempts in a file."""

    def __init__(self, attempts: str, threads: int):
        self.attempts = Path(attempts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with open(self.attempts, "a") as out:
            out.write("attempt\n")
        os._exit(1)


def test_a_crashing_actor_is_retried_a_bounded_number_of_times_then_the_job_fails(tmp_path, ray_local):
    attempts = tmp_path / "attempts"
    with pytest.raises(Exception, match="(?i)actor|died|exit"):
        list(map_rows(CrashesEveryTime, {"attempts": str(attempts), "threads": 1}, [{"item": 0}], 1, None,
                      num_cpus=0.5))
    assert 1 <= len(attempts.read_text().splitlines()) <= 1 + ACTOR_RETRIES


def process_label(process) -> str:
    """A Ray process by what it runs: `gcs_server`, `raylet`, `ray::IDLE`; a Python one by its script, its module
    (`-m ray.util.client.server`) or `python -c` (a job's driver)."""
    arguments = process.cmdline()
    if not process.name().startswith("python"):
        return process.name()
    if script := next((arg for arg in arguments[1:] if arg.endswith(".py")), None):
        return Path(script).name
    return " ".join(arguments[1:3]) if "-m" in arguments[1:2] else "python -c"


def listening_sockets(root: int) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket of the process `root` and its descendants."""
    import psutil  # Ray's own copy: ray/thirdparty_files is on sys.path once Ray is imported

    found = []
    tree = psutil.Process(root)
    for process in [tree, *tree.children(recursive=True)]:
        try:
            found += [(process_label(process), connection.laddr.ip, connection.laddr.port)
                      for connection in process.net_connections(kind="tcp") if connection.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue  # a worker that ended meanwhile
    return found


def on_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1: a dual-stack socket's


# What a Ray node runs, each of which listens: these must all be seen, or the test looked at the wrong processes.
RAY_SERVERS = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}


def test_a_local_ray_listens_on_loopback_only(ray_local):
    """A job's own Ray (ray.init as init_ray calls it; here the session's, in this process): no server of it, nor of
    anything else this process started, on the network.

    Before Ray's single-machine mode (pipelines/__init__.py), 12 listening sockets here were on all interfaces
    or on the machine's address: gcs_server, raylet (2), the core workers, the agents, the metrics endpoints."""
    assert ray_local.get(ray_local.remote(lambda: "task ran").remote()) == "task ran"  # a worker that listens
    sockets = listening_sockets(os.getpid())
    assert RAY_SERVERS <= {process for process, _, _ in sockets}, sockets
    assert [socket for socket in sockets if not on_loopback(socket[1])] == []


def head_process(job_api: str):
    """The `ray start --head` process (LocalHead) whose job API is `job_api`, among this process's children."""
    import psutil

    port = f"--dashboard-port={job_api.rsplit(':', 1)[1]}"
    (head,) = [child for child in psutil.Process().children(recursive=True)
               if "start" in child.cmdline() and port in child.cmdline()]
    return head


def test_the_local_head_and_its_jobs_listen_on_loopback_only(ray_head):
    """The local head (`ddpm demo`, the tests' head): its servers, a job's supervisor and its task's worker.

    Before, 12 of its listening sockets were on all interfaces or on the machine's address: without the
    single-machine mode, Ray replaces `ray start --node-ip-address=127.0.0.1` by the machine's address."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head)
    job = client.submit_job(entrypoint="python -c \"import ray, time; ray.init(); print(ray.get(ray.remote(lambda: "
                                       "'task ran').remote()), flush=True); time.sleep(120)\"")
    try:
        deadline = time.monotonic() + 120
        while "task ran" not in client.get_job_logs(job):
            running = time.monotonic() < deadline and not client.get_job_status(job).is_terminal()
            assert running, client.get_job_logs(job)
            time.sleep(0.5)
        sockets = listening_sockets(head_process(ray_head).pid)
    finally:
        client.stop_job(job)
    processes = {process for process, _, _ in sockets}
    assert RAY_SERVERS | {"dashboard.py", "-m ray.util.client.server", "ray::JobSupervisor"} <= processes, sockets
    assert [socket for socket in sockets if not on_loopback(socket[1])] == []
