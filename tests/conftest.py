import os

# make test runs two test processes on two cores: a second torch thread per process only spins (150 training steps
# of `tiny` beside another busy process: 45.6 s with two threads, 23.7 s with one). Set before torch starts, so that
# the jobs and Ray workers the tests start inherit it; a job that sets its own thread count still does.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pipelines.ray_runtime import use_local_token  # noqa: E402

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Nothing is downloaded while testing: the FID-weights fetch is tested against a local server, explicitly.
os.environ.setdefault("DDPM_INCEPTION_DOWNLOAD", "0")
# Ray 2.60's token authentication stays on. Every Ray of the session (in-process, `ray start` heads, the
# jobs and subprocesses they run) shares one token made here, never ~/.ray/auth_token: a fresh HOME works.
# Set before Ray first reads its mode (at import) and token.
os.environ["RAY_AUTH_MODE"] = "token"
RAY_STATE = Path(tempfile.mkdtemp(prefix="ddpm-tests-ray-"))
use_local_token(RAY_STATE)


# make test's two processes take whole files (--dist loadfile) in collection order (--no-loadscope-reorder): the
# slowest files first, longest first (their summed --durations on a 2-core machine: 504, 362, 297, 217, 154, 138,
# 124 and 85 s), so that no long file starts last and runs alone at the end. Other files keep their order.
SLOW_FILES = ("test_train_job.py", "test_sample_job.py", "test_scheduler.py", "test_calibrate.py", "test_demo.py",
              "test_rank_zero_tracker.py", "test_ray_auth.py", "test_sharding.py")


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: tests keep their order


def pytest_unconfigure(config):
    shutil.rmtree(RAY_STATE, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's standalone server), reached through boto3 like AWS or MinIO."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    from ddpm_core.storage import s3_client

    name = "ddpm-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    s3_client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """A real local Ray on 127.0.0.1 for the whole session; workers inherit the S3 endpoint."""
    import ray

    # address="local": always a new cluster, never one that `ray start` left on this machine.
    # Its own session folder, as every local Ray of ours (pipelines/ray_runtime.py says why).
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False,
             log_to_driver=False, _temp_dir=str(RAY_STATE / "local"))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory, s3_endpoint):
    """`ray start --head` on 127.0.0.1 (token authentication on, as Ray 2.60 defaults); yields the job API URL."""
    from pipelines.ray_runtime import LocalHead

    head = LocalHead(num_cpus=2, state_dir=tmp_path_factory.mktemp("ray-head"))
    yield head.job_api
    head.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 (SQLite backend, proxied local artifacts): many writers at once are safe."""
    from tests.mlflow_servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server.uri
    server.stop()
