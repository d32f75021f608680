"""Token authentication on a fresh machine: every local Ray makes its own token; ~/.ray is never touched.

Each test runs its Ray in a subprocess whose HOME is a new empty folder and whose environment names
no token, as a new user's shell would.
"""

import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines.ray_runtime import free_ports
from tests.datasets import make_lsun_lmdb

HEAD_SCRIPT = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from pipelines.ray_runtime import LocalHead

    state = Path(sys.argv[1])
    head = LocalHead(num_cpus=1, state_dir=state)
    later = LocalHead(num_cpus=2, state_dir=state / "later")  # another cluster of the machine, started later
    try:
        from ray.job_submission import JobSubmissionClient
        client = JobSubmissionClient(head.job_api)
        # A job's driver joins its own cluster (1 CPU), not the one the machine started last (2 CPUs).
        job = client.submit_job(
            entrypoint="python -c 'import ray; ray.init(); print(6 * 7, ray.cluster_resources().get(\\"CPU\\"))'")
        while not client.get_job_status(job).is_terminal():
            time.sleep(0.5)
        print("job:", client.get_job_status(job), client.get_job_logs(job).strip().splitlines()[-1], flush=True)
        later.stop()
        # Clients of the same cluster that have no token: a job joining it, and the scheduler.
        bare = {"HOME": sys.argv[2], "PATH": "/usr/bin:/bin", "RAY_AUTH_MODE": "token"}
        for command in (["pipelines.shard_lsun", "--lmdb", sys.argv[3], "--out", str(state / "data"),
                         "--address", head.address],
                        ["pipelines.schedule_sampling", "--model-name", "m", "--once", "--out-root", "/tmp/x",
                         "--address", head.job_api, "--tracking-uri", f"sqlite:///{state}/mlflow.db"]):
            done = subprocess.run([sys.executable, "-m", *command], env=bare, capture_output=True, text=True,
                                  timeout=120)
            errors = [line for line in (done.stdout + done.stderr).splitlines() if " ERROR " in line]
            print("tokenless:", done.returncode, len(errors), errors[-1:], flush=True)
    finally:
        head.stop()
""")


def fresh_env(home: Path) -> dict[str, str]:
    """This environment as a new user's shell has it: an empty HOME and no Ray token settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN") and k != "RAY_ADDRESS"}
    env.pop("RAY_AUTH_MODE", None)
    home.mkdir()
    return {**env, "HOME": str(home)}


@pytest.mark.slow
def test_a_local_head_makes_its_own_token_its_jobs_join_it_and_clients_without_one_get_the_fix(tmp_path):
    home, state = tmp_path / "home", tmp_path / "state"
    make_lsun_lmdb(tmp_path / "lmdb", n=4, corrupt=0)
    done = subprocess.run([sys.executable, "-c", HEAD_SCRIPT, str(state), str(tmp_path / "other-home"),
                           str(tmp_path / "lmdb")],
                          env=fresh_env(home), capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    token = state / "auth_token"
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text()) and token.stat().st_mode & 0o777 == 0o600
    assert not (home / ".ray").exists()  # never read nor written
    assert "job: SUCCEEDED 42 1.0" in done.stdout, done.stdout
    refusals = [line for line in done.stdout.splitlines() if line.startswith("tokenless:")]
    assert len(refusals) == 2, done.stdout
    for line in refusals:  # each: exit status 2, one error line, and it names the fix
        assert line.startswith("tokenless: 2 1 [") and "refused this client's token" in line, line
        assert "RAY_AUTH_TOKEN_PATH=<a file holding the cluster's token>" in line, line


@pytest.mark.slow
def test_a_job_without_an_address_starts_a_local_ray_with_a_token_of_its_own(tmp_path):
    home = tmp_path / "home"
    make_lsun_lmdb(tmp_path / "lmdb", n=8, corrupt=0)
    done = subprocess.run([sys.executable, "-m", "pipelines.shard_lsun", "--lmdb", str(tmp_path / "lmdb"),
                           "--out", str(tmp_path / "data"), "--resolution", "16", "--per-shard", "4"],
                          env=fresh_env(home), capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "data" / "shards").iterdir()) == ["train-000000.tar", "train-000001.tar"]
    assert not (home / ".ray").exists()


def test_a_local_heads_ports_are_distinct_and_free():
    # One after another, the OS repeats a just-released port: 9 picks (a LocalHead's) repeated one in about
    # 200 starts, and Ray refused to start ("trying to use a port number ... used by other components").
    for _ in range(5):
        ports = free_ports(200)
        assert len(set(ports)) == 200
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[0]))  # released again: free for Ray to take
