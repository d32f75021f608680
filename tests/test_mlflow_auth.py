"""MLflow's basic-auth app as infra/k8s runs it, for real on loopback: the Deployment's own command and
environment (its Secrets filled with fresh values, its paths below a temporary root), its auth config rendered
by its own init container, the service user created by jobs/mlflow-service-user.yaml, and the clients logging
in with what the Ray pods get from the Secret mlflow-client."""

from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.mlflow_servers import wait_until_healthy
from tests.test_infra import (
    CREDENTIALS,
    REPO,
    bare_env,
    commands_mentioning,
    container_env,
    containers,
    free_ports,
    named,
    secret_ref,
    the,
)

SERVICE_USER = "ddpm-jobs"


def container(kind: str, name: str) -> dict:
    (found,) = [c for c in containers(the(kind)) if c["name"] == name]
    return found


def rerooted(path: str, root: Path) -> Path:
    """A container's absolute path, below `root` (standing in for the container's filesystem)."""
    return root / Path(path).relative_to("/")


def environment(spec: dict, secret_values: dict[tuple[str, str], str]) -> dict[str, str]:
    """A container's `env`, each secretKeyRef looked up in `secret_values`."""
    env = {}
    for name, entry in container_env({"containers": [spec]}).items():
        if "value" in entry:
            env[name] = entry["value"]
        else:
            env[name] = secret_values[secret_ref(entry)]
    return env


def render_auth_config(root: Path, database_uri: str) -> Path:
    """Run the Deployment's auth-config init container: the ConfigMap and the Secret's file in, the ini out."""
    init = container("Deployment", "auth-config")
    python, flag, script, *paths = init["command"]
    assert (python, flag) == ("python", "-c")
    template, uri_file, out = (rerooted(path, root) for path in paths)
    policy = named("ConfigMap", "mlflow-auth")["data"][template.name]
    for path, text in ((template, policy), (uri_file, database_uri)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", script, str(template), str(uri_file), str(out)], check=True, timeout=60)
    return out


def test_rendered_auth_config_is_what_mlflow_reads(tmp_path, monkeypatch):
    from mlflow.server.auth.config import read_auth_config

    # A percent-encoded password (`@` and `%` in it): configparser would read `%40` as an interpolation.
    uri = "postgresql+psycopg2://mlflow_auth:p%40ss%25word@db.internal:5432/mlflow_auth?sslmode=require"
    ini = render_auth_config(tmp_path, uri)
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "not-used-here-at-all")
    config = read_auth_config()
    assert config.database_uri == uri
    assert config.default_permission == "READ"
    assert (config.admin_username, config.admin_password) == ("admin", "not-used-here-at-all")


class AuthServer:
    """The Deployment's `mlflow server --app-name basic-auth` on 127.0.0.1, with a SQLite store and user store."""

    def __init__(self, root: Path):
        self.root = root
        (self.port,) = free_ports(1)
        self.uri = f"http://127.0.0.1:{self.port}"
        # What `kubectl create secret` would hold (config.yaml).
        self.secrets = {
            ("mlflow-db", "backend-store-uri"): f"sqlite:///{root / 'mlflow.db'}",
            ("mlflow-auth", "database-uri"): f"sqlite:///{root / 'basic_auth.db'}",
            ("mlflow-auth", "admin-username"): "admin",
            ("mlflow-auth", "admin-password"): secrets.token_hex(32),
            ("mlflow-auth", "flask-secret-key"): secrets.token_hex(32),
            ("mlflow-client", "username"): SERVICE_USER,
            ("mlflow-client", "password"): secrets.token_hex(32),
            ("mlflow-scheduler", "username"): "ddpm-scheduler",
            ("mlflow-scheduler", "password"): secrets.token_hex(32),
        }
        render_auth_config(root, self.secrets["mlflow-auth", "database-uri"])
        spec = container("Deployment", "mlflow")
        env = environment(spec, self.secrets)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(rerooted(env["MLFLOW_AUTH_CONFIG_PATH"], root))
        # The manifest's command on loopback: another address and port, local artifacts, one worker; the
        # allowed Host names are the cluster's, so that check is left to MLflow's default (localhost).
        loopback = {"--host": "127.0.0.1", "--port": str(self.port),
                    "--artifacts-destination": str(root / "artifacts"), "--workers": "1"}
        command = [arg for arg in spec["command"] if arg.split("=")[0] not in (*loopback, "--allowed-hosts")]
        command = [str(Path(sys.executable).parent / command[0]), *command[1:],
                   *(f"{name}={value}" for name, value in loopback.items())]
        # Its own session: stop() ends the server and its workers, nothing else.
        self.process = subprocess.Popen(command, env={**bare_env(), **env}, stdout=open(root / "server.log", "wb"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_healthy(self.uri, self.process, root / "server.log", timeout=150)
        except RuntimeError:
            self.stop()
            raise

    def credentials(self, kind: str, name: str) -> dict[str, str]:
        """MLFLOW_TRACKING_USERNAME/PASSWORD as the manifest's container `name` of `kind` gets them."""
        env = container_env({"containers": [container(kind, name)]})
        return {key: self.secrets[secret_ref(env[key])] for key in CREDENTIALS}

    def create_service_user(self) -> subprocess.CompletedProcess:
        """Run jobs/mlflow-service-user.yaml's container against this server."""
        job = container("Job", "service-user")
        python, flag, script, secret_dir = job["command"]
        assert (python, flag) == ("python", "-c")
        folder = rerooted(secret_dir, self.root)
        folder.mkdir(parents=True, exist_ok=True)
        (mount,) = job["volumeMounts"]
        assert mount["mountPath"] == secret_dir
        (volume,) = the("Job")["spec"]["template"]["spec"]["volumes"]
        for key in ("username", "password"):
            (folder / key).write_text(self.secrets[volume["secret"]["secretName"], key])
        env = {**bare_env(), **environment(job, self.secrets), "MLFLOW_TRACKING_URI": self.uri}
        return subprocess.run([sys.executable, "-c", script, str(folder)], env=env, capture_output=True, text=True,
                              timeout=120)

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.process.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = AuthServer(tmp_path_factory.mktemp("mlflow-auth", numbered=True))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service_user(server):
    created = server.create_service_user()
    assert created.returncode == 0, created.stderr[-3000:]
    assert created.stdout.strip() == f"created the MLflow user {SERVICE_USER}"


@pytest.fixture
def logged_in_as(monkeypatch):
    """Set (or, with None, unset) the MLflow credentials of this process."""
    def login(credentials: dict[str, str] | None) -> None:
        for key in CREDENTIALS:
            if credentials is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, credentials[key])
        # A failing test fails at once, not after MLflow's minutes of retries on a server error.
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    return login


def refusal(call) -> int:
    """The HTTP status with which MLflow refuses `call` (artifact uploads raise requests' own error)."""
    import requests
    from mlflow.exceptions import MlflowException

    try:
        call()
    except MlflowException as error:
        return error.get_http_status_code()
    except requests.HTTPError as error:
        return error.response.status_code
    raise AssertionError(f"{call} was not refused")


def experiment_names(client) -> set[str]:
    return {experiment.name for experiment in client.search_experiments()}


def test_service_user_registers_a_model_with_the_ray_pods_credentials(server, service_user, logged_in_as, tmp_path):
    from mlflow.tracking import MlflowClient

    # The head's credentials (the workers' and the scheduler's are the same Secret keys: test_infra).
    logged_in_as(server.credentials("RayCluster", "ray-head"))
    client = MlflowClient(server.uri)
    experiment = client.create_experiment("auth-check")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "loss", 0.25)
    # Artifacts go through the server's proxy, which checks the same permissions.
    client.log_text(run.info.run_id, "weights", "model/weights.txt")
    assert Path(client.download_artifacts(run.info.run_id, "model/weights.txt", str(tmp_path))).read_text() == "weights"
    model = client.create_registered_model("ddpm-auth-check")
    version = client.create_model_version(model.name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_registered_model_alias(model.name, "candidate", version.version)
    assert client.get_model_version_by_alias(model.name, "candidate").version == version.version == "1"
    assert client.get_run(run.info.run_id).data.metrics == {"loss": 0.25}
    # The scheduler logs in as a user of its own (docs/roles.md).
    assert server.credentials("CronJob", "scheduler")["MLFLOW_TRACKING_USERNAME"] == "ddpm-scheduler"

    # No secret was on any command line: the server's, its workers', the service-user job's.
    for (name, key), value in server.secrets.items():
        if key not in ("backend-store-uri", "database-uri", "username", "admin-username"):
            assert commands_mentioning(value) == [], f"{name}/{key} on a command line"


def test_without_or_with_wrong_credentials_mlflow_refuses(server, service_user, logged_in_as):
    from mlflow.tracking import MlflowClient

    from pipelines.mlflow_tracking import TrackingError, connect

    wrong = {"MLFLOW_TRACKING_USERNAME": SERVICE_USER, "MLFLOW_TRACKING_PASSWORD": "wrong-" + secrets.token_hex(8)}
    for credentials in (None, wrong):
        logged_in_as(credentials)
        assert refusal(lambda: MlflowClient(server.uri).create_registered_model("ddpm-never")) == 401
        with pytest.raises(TrackingError) as failed:
            connect(server.uri)
        assert str(failed.value) == (f"MLflow at {server.uri} refused the credentials: set MLFLOW_TRACKING_USERNAME "
                                     "and MLFLOW_TRACKING_PASSWORD")
        assert failed.value.__cause__ is None and failed.value.__suppress_context__
    # The API itself, not only MLflow's client: a request without an Authorization header.
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=30)
    assert raw.value.code == 401
    logged_in_as(server.credentials("RayCluster", "ray-head"))
    assert "Default" in experiment_names(connect(server.uri))


def test_other_users_read_but_do_not_write_what_the_service_user_owns(server, service_user, logged_in_as):
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    admin = server.credentials("Job", "service-user")
    logged_in_as(admin)
    researcher = {"MLFLOW_TRACKING_USERNAME": "researcher", "MLFLOW_TRACKING_PASSWORD": secrets.token_hex(16)}
    get_app_client("basic-auth", tracking_uri=server.uri).create_user(*researcher.values())
    logged_in_as(server.credentials("RayCluster", "ray-head"))
    owner = MlflowClient(server.uri)
    experiment = owner.create_experiment("owned-by-the-service-user")
    run = owner.create_run(experiment)
    model = owner.create_registered_model("ddpm-owned")

    logged_in_as(researcher)
    reader = MlflowClient(server.uri)
    assert reader.get_experiment(experiment).name == "owned-by-the-service-user"
    assert reader.get_registered_model(model.name).name == "ddpm-owned"
    writes = (lambda: reader.log_metric(run.info.run_id, "loss", 1.0),
              lambda: reader.log_text(run.info.run_id, "x", "notes.txt"),
              lambda: reader.set_registered_model_tag(model.name, "k", "v"))
    assert [refusal(write) for write in writes] == [403, 403, 403]
    # Until an admin grants it, as docs/mlflow_auth.md does.
    logged_in_as(admin)
    users = get_app_client("basic-auth", tracking_uri=server.uri)
    users.grant_user_permission("researcher", "experiment", experiment, "EDIT")
    users.grant_user_permission("researcher", "registered_model", model.name, "EDIT")
    logged_in_as(researcher)
    reader.log_metric(run.info.run_id, "loss", 1.0)
    reader.set_registered_model_tag(model.name, "k", "v")
    assert reader.get_run(run.info.run_id).data.metrics == {"loss": 1.0}
    assert reader.get_registered_model(model.name).tags == {"k": "v"}


def test_rotating_the_service_users_password(server, service_user, logged_in_as):
    from mlflow.tracking import MlflowClient

    old = server.credentials("RayCluster", "ray-head")
    server.secrets["mlflow-client", "password"] = secrets.token_hex(32)
    rotated = server.create_service_user()
    assert rotated.stdout.strip() == f"set the password of the MLflow user {SERVICE_USER}", rotated.stderr[-3000:]
    logged_in_as(old)
    assert refusal(lambda: MlflowClient(server.uri).search_experiments()) == 401
    logged_in_as(server.credentials("RayCluster", "ray-head"))
    assert "Default" in experiment_names(MlflowClient(server.uri))


def test_service_user_job_refuses_a_secret_with_a_trailing_newline(server, service_user):
    server.secrets["mlflow-client", "password"] += "\n"
    try:
        refused = server.create_service_user()
    finally:
        server.secrets["mlflow-client", "password"] = server.secrets["mlflow-client", "password"].rstrip("\n")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "the Secret mlflow-client's password is empty or has surrounding whitespace (a trailing newline?): "
        "create it from files written without one")


def test_credentials_file_of_ray_cluster_yaml_logs_in(server, service_user, logged_in_as, tmp_path, monkeypatch):
    from mlflow.utils.credentials import _get_credentials_path

    from pipelines.mlflow_tracking import connect

    # The file as ray_cluster.yaml's header writes it (its placeholder filled in), in the folder that its
    # file_mounts put at ~/.mlflow on every node.
    header = (REPO / "ray_cluster.yaml").read_text()
    lines = re.findall(r"^#\s+(\[mlflow\]|mlflow_tracking_\w+ = .+)$", header, flags=re.M)
    assert lines[0] == "[mlflow]" and len(lines) == 3, lines
    assert f"mlflow_tracking_username = {SERVICE_USER}" in lines
    password = server.credentials("RayCluster", "ray-head")["MLFLOW_TRACKING_PASSWORD"]
    monkeypatch.setenv("HOME", str(tmp_path))
    credentials = Path(_get_credentials_path())
    assert credentials.parent == tmp_path / ".mlflow"
    credentials.parent.mkdir()
    credentials.write_text("\n".join(lines).replace("<its password>", password) + "\n")
    logged_in_as(None)
    assert "Default" in experiment_names(connect(server.uri))
