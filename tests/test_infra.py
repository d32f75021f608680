"""The deployment files: Ray's own validation of ray_cluster.yaml, agreement between the launcher config, the
image and the Kubernetes manifests, every command line parsed by the parser that will read it, and the local
stack (infra/local) brought up and used for real."""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import json
import os
import re
import runpy
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
IMAGE = "ghcr.io/ddpm-ray/ddpm-ray:0.1.0"
# What MLflow's client logs in with (the server runs basic-auth: infra/k8s/mlflow.yaml).
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


# -- reading the files -----------------------------------------------------------------------------

def cluster_config() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def manifests() -> list[tuple[Path, dict]]:
    found = [(path, doc) for path in sorted(K8S.rglob("*.yaml"))
             for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert found, f"no manifests under {K8S}"
    return found


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def the(kind: str) -> dict:
    docs = of_kind(kind)
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def dicts(node):
    """Every mapping in a parsed YAML tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from dicts(value)
    elif isinstance(node, list):
        for value in node:
            yield from dicts(value)


def containers(doc: dict) -> list[dict]:
    return [c for d in dicts(doc) for key in ("containers", "initContainers") for c in d.get(key) or []]


def container_env(doc: dict) -> dict[str, dict]:
    return {e["name"]: e for c in containers(doc) for e in c.get("env") or []}


def docker_env(config: dict) -> dict[str, str]:
    """The `--env NAME=VALUE` options the launcher passes to `docker run`."""
    pairs = [option.split(None, 1)[1] for option in config["docker"]["run_options"] if option.startswith("--env ")]
    return dict(pair.split("=", 1) for pair in pairs)


def named(kind: str, name: str) -> dict:
    (doc,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return doc


def config_map() -> dict[str, str]:
    return named("ConfigMap", "ddpm-env")["data"]


def secret_ref(env: dict) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def volumes_by_name(doc: dict) -> dict[str, dict]:
    return {v["name"]: v for d in dicts(doc) for v in d.get("volumes") or []}


def command_lines() -> list[list[str]]:
    """Every command the manifests run: container commands (+ args) and RayJob entrypoints."""
    lines = [list(c.get("command") or []) + list(c.get("args") or [])
             for _, doc in manifests() for c in containers(doc)]
    lines += [shlex.split(job["spec"]["entrypoint"]) for job in of_kind("RayJob")]
    return [line for line in lines if line]


def option(argv: list[str], name: str) -> str:
    """The value of `--name=value` / `--name value` in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    raise AssertionError(f"{name} not in {argv}")


def dockerfile() -> str:
    return (INFRA / "Dockerfile").read_text()


def image_home() -> str:
    homes = re.findall(r"^ENV HOME=(\S+)$", dockerfile(), flags=re.M)
    assert len(homes) == 1, "the Dockerfile sets HOME once (the cluster launcher reads it from the image)"
    return homes[0]


# -- ray_cluster.yaml ------------------------------------------------------------------------------

def test_ray_cluster_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before touching AWS: merge the provider defaults, then validate against the schema.
    prepared = prepare_config(copy.deepcopy(cluster_config()))
    validate_config(prepared)
    # Nothing of the defaults' per-node installs (a Ray wheel, boto3) crept in: the image has everything.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert prepared[key] == [], key
    assert prepared["docker"]["image"] == IMAGE


def test_ray_cluster_head_takes_no_work_and_workers_have_gpus():
    config = cluster_config()
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}
    workers = {name: spec for name, spec in types.items() if name != head}
    assert workers and all(spec["resources"]["GPU"] >= 1 for spec in workers.values())
    assert 8 in [spec["resources"]["GPU"] for spec in workers.values()], "a node type for 8-GPU DDP training"
    assert all(spec["min_workers"] == 0 for spec in workers.values()), "GPU nodes scale from zero"
    assert sum(spec["max_workers"] for spec in workers.values()) <= config["max_workers"]
    spot = [name for name, spec in workers.items()
            if spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and set(spot) != set(workers), "sampling on spot, training on demand"
    # AWS credentials come from instance profiles on every node.
    assert all("IamInstanceProfile" in spec["node_config"] for spec in types.values())


def test_ray_cluster_dashboard_is_private_and_token_auth_reaches_every_node():
    config = cluster_config()
    assert "0.0.0.0" not in json.dumps(config)
    start = " ".join(config["head_start_ray_commands"])
    host = re.search(r"--dashboard-host[= ](\S+)", start)
    assert host and "ray.util.get_node_ip_address()" in start, start
    assert host.group(1) not in ("0.0.0.0", "::")
    env = docker_env(config)
    assert env["RAY_AUTH_MODE"] == "token"
    # The token file is inside a directory that file_mounts copies to every node, at the image's HOME.
    home = image_home()
    mounted = {remote.replace("~", home, 1) for remote in config["file_mounts"]}
    assert str(Path(env["RAY_AUTH_TOKEN_PATH"]).parent) in mounted
    assert env["MLFLOW_TRACKING_URI"].startswith("http") and env["AWS_DEFAULT_REGION"]


def test_ray_cluster_nodes_read_the_mlflow_credentials_from_a_mounted_file(monkeypatch):
    from mlflow.utils.credentials import _get_credentials_path

    config = cluster_config()
    # MLflow's client reads ~/.mlflow/credentials; the launcher mounts the operator's folder there, at the
    # image's HOME. (tests/test_mlflow_auth.py logs in with the file as the header writes it.)
    monkeypatch.setenv("HOME", image_home())
    mounted = {remote.replace("~", image_home(), 1): local for remote, local in config["file_mounts"].items()}
    assert mounted[str(Path(_get_credentials_path()).parent)] == "~/.ddpm-ray/mlflow-client"
    assert not set(CREDENTIALS) & set(docker_env(config))


# -- the image -------------------------------------------------------------------------------------

def test_dockerfile_pins_torch_like_the_makefile_then_installs_the_project():
    pin = re.search(r"^TORCH_PIN := (.+)$", (REPO / "Makefile").read_text(), flags=re.M).group(1).strip()
    text = dockerfile()
    torch_at = text.index(f"pip install {pin}\n")
    project_at = text.index("pip install '.[server]' ")  # the image also runs the MLflow server
    assert torch_at < project_at, "torch is installed before the project, so the project cannot pull another"
    assert "ddpm --help" in text[project_at:], "the build checks that the ddpm console script runs"
    assert re.search(r"^FROM nvidia/cuda:12\.\S+-ubuntu\S+$", text, flags=re.M)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert f"-t {IMAGE} ." in text, "the build command names the image the manifests use"


def test_docker_context_admits_exactly_what_the_dockerfile_copies():
    ignore = [line for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*", "an allowlist: everything is excluded first"
    admitted = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {source for line in re.findall(r"^COPY (.+)$", dockerfile(), flags=re.M) for source in line.split()[:-1]}
    assert copied == admitted
    assert all((REPO / path).exists() for path in copied)


# -- Kubernetes ------------------------------------------------------------------------------------

def test_manifests_parse_and_name_their_objects():
    docs = manifests()
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), path
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in docs}
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob"), ("batch/v1", "CronJob"), ("apps/v1", "Deployment"),
            ("v1", "Service"), ("v1", "ConfigMap"), ("v1", "ServiceAccount"), ("batch/v1", "Job")} <= kinds


def test_one_image_everywhere():
    config = cluster_config()
    assert config["docker"]["image"] == IMAGE
    images = [(path.name, c["name"], c["image"]) for path, doc in manifests() for c in containers(doc)]
    assert images and all(image == IMAGE for *_, image in images), images


def test_raycluster_autoscales_gpu_groups_with_token_auth():
    import ray

    cluster = the("RayCluster")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token", "secretName": "ddpm-ray-auth"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    gpus = {}
    for group in spec["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        gpus[group["groupName"]] = int(worker["resources"]["limits"]["nvidia.com/gpu"])
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert sorted(gpus.values()) == [1, 8]


def test_every_ray_pod_has_the_inception_weights_where_the_config_says():
    """Job drivers run on the head and actors on the workers: each scoring process opens the file on its own pod."""
    (config,) = [doc for doc in of_kind("ConfigMap") if doc["metadata"]["name"] == "ddpm-env"]
    weights = Path(config["data"]["DDPM_INCEPTION_WEIGHTS"])
    spec = the("RayCluster")["spec"]
    pods = {"head": spec["headGroupSpec"]["template"]["spec"]}
    pods.update({group["groupName"]: group["template"]["spec"] for group in spec["workerGroupSpecs"]})
    assert set(pods) == {"head", "gpu-train", "gpu-sample"}
    for name, pod in pods.items():
        (fetch,) = [c for c in pod["initContainers"] if c["name"] == "fetch-inception"]
        assert fetch["command"][-1] == str(weights), name
        volume = next(v for v in pod["volumes"] if v["name"] == "inception")
        assert volume == {"name": "inception", "emptyDir": {}}, name
        (ray_container,) = pod["containers"]
        mounts = {m["name"]: m["mountPath"] for m in ray_container["volumeMounts"]}
        assert mounts["inception"] == str(weights.parent), name
        assert {m["name"]: m["mountPath"] for m in fetch["volumeMounts"]}["inception"] == str(weights.parent), name


def test_jobs_target_the_raycluster_with_the_token():
    name = the("RayCluster")["metadata"]["name"]
    job = the("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": name}
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert "WORKDIR /app" in dockerfile()
    cron = the("CronJob")
    (scheduler,) = containers(cron)
    address = urlparse(option(scheduler["command"], "--address"))
    # KubeRay's head Service is <cluster>-head-svc; the job API is the dashboard port.
    assert (address.hostname, address.port) == (f"{name}-head-svc", 8265)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    # The scheduler evaluates the model the training job registers (ddpm-<preset>), against the reference
    # statistics `ddpm fid-ref` writes next to the training data.
    train = shlex.split(job["spec"]["entrypoint"])
    assert option(scheduler["command"], "--model-name") == "ddpm-" + option(train, "--preset")
    assert option(scheduler["command"], "--ref") == option(train, "--data") + "/fid_stats.npz"
    for client in (job, cron):
        env = container_env(client)
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ddpm-ray-auth", "key": "auth_token"}
    assert config_map()["RAY_AUTH_MODE"] == "token"


def test_the_cronjob_the_cli_and_the_readme_evaluate_with_the_one_routine_sampler():
    from pipelines.cli import build_parser
    from pipelines.evaluation import PAPER_SAMPLER, ROUTINE_SAMPLER, EvalSpec, SamplerSetting

    (scheduler,) = containers(the("CronJob"))
    argv = scheduler["command"]
    assert argv[:2] == ["ddpm", "schedule"]
    cron = EvalSpec.from_arguments(build_parser().parse_args(argv[1:]), None)
    cli = EvalSpec.from_arguments(build_parser().parse_args(["schedule", "--model-name", "m", "--once",
                                                              "--out-root", "o"]), None)
    routine = SamplerSetting(cron.sampler, cron.steps, cron.spacing, cron.eta)
    assert routine == SamplerSetting(cli.sampler, cli.steps, cli.spacing, cli.eta) == ROUTINE_SAMPLER
    assert ROUTINE_SAMPLER.sampler in ("dpmpp_2m", "unipc") and ROUTINE_SAMPLER.steps <= 25  # deterministic, cheap
    assert (cron.bf16, cron.clip, cron.num) == (False, True, 50000)
    assert " ".join(ROUTINE_SAMPLER.flags()) in (REPO / "README.md").read_text()
    # `ddpm fid` keeps the paper's sampler: its numbers are the ones of record.
    fid = build_parser().parse_args(["fid", "--model", "m", "--out", "o"])
    assert (fid.sampler, fid.num) == (PAPER_SAMPLER.sampler, 50000) == ("ddpm", 50000)


def secret_names(doc: dict) -> set[str]:
    """Every Secret a manifest's pods read: env secretKeyRefs and secret volumes."""
    refs = {entry["valueFrom"]["secretKeyRef"]["name"] for entry in container_env(doc).values()
            if "secretKeyRef" in entry.get("valueFrom", {})}
    return refs | {volume["secret"]["secretName"] for volume in volumes_by_name(doc).values() if "secret" in volume}


def test_the_scheduler_has_an_identity_of_its_own():
    """docs/roles.md: the scheduler (the only writer of `champion`) shares no identity or MLflow Secret with the
    Ray pods, where every job runs; the jobs keep theirs; its output prefix is not the training jobs'."""
    cron, cluster, job = the("CronJob"), the("RayCluster"), the("RayJob")
    cron_pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    cluster_accounts = {d["serviceAccountName"] for d in dicts(cluster) if "serviceAccountName" in d}
    assert cluster_accounts == {"ddpm-ray"}
    assert cron_pod["serviceAccountName"] == "ddpm-scheduler"
    assert {doc["metadata"]["name"] for doc in of_kind("ServiceAccount")} >= {"ddpm-ray", "ddpm-scheduler"}
    # The MLflow credentials: the scheduler's Secret is read by the CronJob alone, the jobs' never by it.
    assert secret_names(cron) == {"ddpm-ray-auth", "mlflow-scheduler"}
    assert "mlflow-client" in secret_names(cluster)
    assert secret_names(cron) & secret_names(cluster) == set()  # KubeRay's token Secret is authOptions, not a ref
    readers = {(doc["kind"], doc["metadata"]["name"]) for _, doc in manifests()
               if "mlflow-scheduler" in secret_names(doc)}
    assert readers == {("CronJob", cron["metadata"]["name"])}
    (scheduler,) = containers(cron)
    out_root = option(scheduler["command"], "--out-root").rstrip("/") + "/"
    storage = option(shlex.split(job["spec"]["entrypoint"]), "--storage").rstrip("/") + "/"
    assert not out_root.startswith(storage) and not storage.startswith(out_root), (out_root, storage)
    # docs/roles.md describes these manifests, not a plan.
    roles = (REPO / "docs" / "roles.md").read_text()
    for name in ("ddpm-scheduler", "mlflow-scheduler", "ddpm-ray", "mlflow-client", out_root.rstrip("/")):
        assert name in roles, name


def test_mlflow_server_and_its_clients_agree():
    from mlflow.cli import server

    service, deployment = the("Service"), the("Deployment")
    assert service["spec"]["type"] == "ClusterIP"
    (server_container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = server_container["command"]
    assert command[:2] == ["mlflow", "server"]
    params = server.make_context("server", command[2:]).params
    assert params["app_name"] == "basic-auth"
    assert params["serve_artifacts"] is True and params["artifacts_destination"].startswith("s3://")
    assert params["backend_store_uri"] is None, "the store URI holds a password: it comes from the Secret"
    store = container_env(deployment)["MLFLOW_BACKEND_STORE_URI"]
    assert store["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    # The URI the pods use is the Service, and the server accepts its Host header (and the VPC name's).
    uri = urlparse(config_map()["MLFLOW_TRACKING_URI"])
    (port,) = service["spec"]["ports"]
    assert (uri.hostname, uri.port) == (service["metadata"]["name"], port["port"])
    allowed = params["allowed_hosts"].split(",")
    for netloc in (uri.netloc, urlparse(docker_env(cluster_config())["MLFLOW_TRACKING_URI"]).netloc):
        assert any(fnmatch.fnmatch(netloc, pattern) for pattern in allowed), (netloc, allowed)


def test_mlflow_auth_config_comes_from_the_config_map_and_the_secret():
    import configparser

    deployment = the("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (server_container,) = pod["containers"]
    (render,) = [c for c in pod["initContainers"] if c["name"] == "auth-config"]
    env = container_env(deployment)
    # The server reads the ini that the init container writes, in a memory volume that both mount.
    template, uri_file, rendered = render["command"][3:]
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == rendered
    mounts = {c["name"]: {m["mountPath"]: m["name"] for m in c["volumeMounts"]} for c in (render, server_container)}
    volumes = volumes_by_name(deployment)
    (shared,) = {mounts["auth-config"][str(Path(rendered).parent)], mounts["mlflow"][str(Path(rendered).parent)]}
    assert volumes[shared]["emptyDir"]["medium"] == "Memory"
    assert volumes[mounts["auth-config"][str(Path(template).parent)]]["configMap"] == {"name": "mlflow-auth"}
    assert volumes[mounts["auth-config"][str(Path(uri_file).parent)]]["secret"]["items"] == [
        {"key": "database-uri", "path": Path(uri_file).name}]
    assert volumes[mounts["auth-config"][str(Path(uri_file).parent)]]["secret"]["secretName"] == "mlflow-auth"
    # The ConfigMap holds the policy and nothing secret: the URI and the admin come from the Secret.
    ini = configparser.ConfigParser()
    ini.read_string(named("ConfigMap", "mlflow-auth")["data"][Path(template).name])
    assert dict(ini["mlflow"]) == {"default_permission": "READ"}
    assert {name: secret_ref(env[name]) for name in
            ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")} == {
        "MLFLOW_AUTH_ADMIN_USERNAME": ("mlflow-auth", "admin-username"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ("mlflow-auth", "admin-password"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": ("mlflow-auth", "flask-secret-key")}


def test_every_mlflow_client_logs_in_with_credentials_from_a_secret():
    holders = {}
    for _, doc in manifests():
        for c in containers(doc):
            env = {e["name"]: e for e in c.get("env") or []}
            if set(CREDENTIALS) & set(env):
                holders.setdefault((doc["kind"], c["name"]), []).append(tuple(secret_ref(env[n]) for n in CREDENTIALS))
    service_user = (("mlflow-client", "username"), ("mlflow-client", "password"))
    # Ray's head (where job drivers run: RayJobs, the scheduler's sampling jobs) and both worker groups are the
    # service user, the scheduler its own user; the RayJob's submitter only talks to Ray, the init containers to
    # S3 and PostgreSQL.
    assert holders.pop(("RayCluster", "ray-head")) == [service_user]
    assert holders.pop(("RayCluster", "ray-worker")) == [service_user, service_user]
    scheduler_user = (("mlflow-scheduler", "username"), ("mlflow-scheduler", "password"))
    assert holders.pop(("CronJob", "scheduler")) == [scheduler_user]
    # The job that creates the service user logs in as the admin that the server creates, and reads the
    # user's name and password from the Secret the clients read them from.
    admin = container_env(the("Deployment"))
    assert holders.pop(("Job", "service-user")) == [
        tuple(secret_ref(admin[n]) for n in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"))]
    assert holders == {}
    (volume,) = volumes_by_name(the("Job")).values()
    assert volume["secret"]["secretName"] == "mlflow-client"
    assert not set(CREDENTIALS) & set(config_map())


class Parsed(Exception):
    """Raised in place of running a job: its arguments parsed."""


def parse_script(argv: list[str], monkeypatch) -> argparse.Namespace:
    """Run `python pipelines/<job>.py ...` up to its argument parsing, with the job's own `main`."""
    script = REPO / argv[0]
    assert script.is_file() and script.parent.name == "pipelines", argv[0]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise Parsed(original(parser, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [str(script), *argv[1:]])
        with pytest.raises(Parsed) as parsed:
            runpy.run_path(str(script), run_name="__main__")
    return parsed.value.args[0]


def test_every_command_line_parses(monkeypatch):
    from mlflow.cli import server

    from pipelines.cli import build_parser

    seen = set()
    for argv in command_lines():
        if argv[0] == "ddpm":
            build_parser().parse_args(argv[1:])
            seen.add("ddpm " + argv[1])
        elif argv[0] == "python" and argv[1] == "-c":
            compile(argv[2], "<python -c>", "exec")
        elif argv[0] == "python":
            args = parse_script(argv[1:], monkeypatch)
            assert args.data.startswith("s3://") and args.storage.startswith("s3://") and args.gpu
            seen.add(argv[1])
        elif argv[:2] == ["mlflow", "server"]:
            server.make_context("server", argv[2:])
            seen.add("mlflow server")
        else:
            raise AssertionError(f"a command this test does not check: {argv}")
    assert {"ddpm schedule", "pipelines/train_lsun.py", "mlflow server"} <= seen


def test_no_secret_reaches_a_command_line():
    """A Secret's value in argv is readable by every process of the pod (/proc/<pid>/cmdline)."""
    checked = 0
    for _, doc in manifests():
        for container in containers(doc):
            secrets = {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
            argv = " ".join(container.get("command", []) + container.get("args", []))
            for name in secrets:
                checked += 1
                assert f"${name}" not in argv and f"${{{name}}}" not in argv, (container["name"], name)
    assert checked >= 3


def test_training_job_fits_one_training_node():
    (argv,) = [line for line in command_lines() if line[0] == "python" and line[1] != "-c"]
    workers, cpus = int(option(argv, "--workers")), float(option(argv, "--cpus-per-worker"))
    # Ray takes a pod's CPUs and GPUs from its limits.
    limits = [group["template"]["spec"]["containers"][0]["resources"]["limits"]
              for group in the("RayCluster")["spec"]["workerGroupSpecs"]]
    (k8s_node,) = [node for node in limits if int(node["nvidia.com/gpu"]) == workers]
    assert workers * cpus <= float(k8s_node["cpu"])
    (aws_node,) = [t["resources"] for t in cluster_config()["available_node_types"].values()
                   if t["resources"].get("GPU") == workers]
    assert workers * cpus <= aws_node["CPU"]


# -- environment and secrets -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_texts() -> dict[str, str]:
    """The source of the project and of the libraries that read environment variables for it."""
    texts = {"ddpm-ray": "\n".join(p.read_text() for d in ("ddpm_core", "pipelines") for p in (REPO / d).rglob("*.py"))}
    for package in ("ray", "mlflow", "botocore"):
        root = Path(importlib.util.find_spec(package).origin).parent
        texts[package] = "\n".join(p.read_text(errors="ignore") for p in root.rglob("*.py"))
    return texts


def test_environment_variables_are_ones_the_code_reads(source_texts):
    names = set(config_map()) | set(docker_env(cluster_config()))
    names |= {name for _, doc in manifests() for name in container_env(doc)}
    assert {"MLFLOW_TRACKING_URI", "AWS_DEFAULT_REGION", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
            "DDPM_INCEPTION_WEIGHTS", *CREDENTIALS, "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME",
            "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= names
    for name in sorted(names):
        readers = [who for who, text in source_texts.items() if f'"{name}"' in text or f"'{name}'" in text]
        assert readers, f"{name} is set in infra but read by neither ddpm-ray nor ray, mlflow, botocore"


def infra_files() -> list[Path]:
    return [REPO / "ray_cluster.yaml", *(p for p in INFRA.rglob("*") if p.is_file())]


SECRETISH_OPTION = re.compile(r"^--?[\w-]*(password|passwd|secret|token|credential)", re.I)
# What a generated secret looks like: long hex (secrets.token_hex), or long mixed-case with digits (base64).
SECRET_LITERAL = re.compile(r"\b[0-9a-fA-F]{32,}\b|"
                            r"(?<![\w+/-])(?=[\w+/-]*\d)(?=[\w+/-]*[a-z])(?=[\w+/-]*[A-Z])[\w+/-]{20,}")


def test_no_secret_on_a_command_line():
    launcher = cluster_config()
    lines = command_lines() + [shlex.split(line) for key in ("head_start_ray_commands", "worker_start_ray_commands")
                               for line in launcher[key]]
    lines += [shlex.split(option) for option in launcher["docker"]["run_options"]]
    args = [arg for line in lines for arg in line]
    # The local stack's scripts: every option-like word outside comments (heredocs and continuations make
    # shell lines unsplittable one by one).
    for script in sorted((INFRA / "local").glob("*.sh")):
        code = [line for line in script.read_text().splitlines() if not line.lstrip().startswith("#")]
        args += re.findall(r"(?<!\S)-{1,2}[\w-]+", "\n".join(code))
    # The scan sees the manifests' server and the local stack's.
    assert "--app-name=basic-auth" in args and "--app-name" in args
    assert [arg for arg in args if SECRETISH_OPTION.match(arg)] == []


def test_no_credentials_in_infra():
    secretish = re.compile(r"(TOKEN|PASSWORD|SECRET|_KEY)")
    for _, doc in manifests():
        assert doc["kind"] != "Secret", "Secrets are created from the command line, never committed"
        for name, env in container_env(doc).items():
            if secretish.search(name):
                assert "secretKeyRef" in env.get("valueFrom", {}), f"{name} must come from a Secret"
    for name, value in {**config_map(), **docker_env(cluster_config())}.items():
        assert not secretish.search(name) or name == "RAY_AUTH_TOKEN_PATH", f"{name}={value} in plain config"
    for path in infra_files():
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), f"an AWS access key id in {path}"
        assert "PRIVATE KEY-----" not in text, path
        assert SECRET_LITERAL.findall(text) == [], path
        # MLflow's credentials-file format in the documentation: placeholders only.
        for value in re.findall(r"(?:mlflow_tracking_password|admin_password)\s*=\s*(.*)", text):
            assert re.fullmatch(r"<[^>]+>", value.strip()), (path, value)
        assert not re.search(r"://[\w.%-]+:[^\s@/<>]+@", text), f"a password in a URI in {path}"
        for value in re.findall(r"AWS_SECRET_ACCESS_KEY\s*[=:]\s*(\S+)", text):
            # Only the local stack sets one: moto's dummy, which is not an AWS key.
            assert path == INFRA / "local" / "up.sh" and value == "$MOTO_CREDENTIAL", (path, value)


# -- the local stack ---------------------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def session_members(pid: int) -> list[str]:
    return subprocess.run(["pgrep", "-s", str(pid)], capture_output=True, text=True).stdout.split()


def commands_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


RAY_JOB = """
import json, os, sys, time
from ray.job_submission import JobStatus, JobSubmissionClient

client = JobSubmissionClient(os.environ["RAY_ADDRESS"])
job = client.submit_job(entrypoint=sys.argv[1])
deadline = time.monotonic() + 120
while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
    if time.monotonic() > deadline:
        sys.exit(f"job {job} still {status} after 120 s")
    time.sleep(1)
print(json.dumps({"status": str(status), "logs": client.get_job_logs(job)}))
"""

def bare_env() -> dict[str, str]:
    """This environment without the caller's Ray, AWS or MLflow settings; the venv's tools first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return env


def run(command: list[str], env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"{what} took more than {timeout:.0f} s; output so far: {error.stdout}{error.stderr}")
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def sourced(script: Path, env: dict) -> dict[str, str]:
    """The variables that sourcing `script` in bash adds to or changes in `env`."""
    done = subprocess.run(["bash", "-c", '. "$1" && env -0', "-", str(script)], env=env, capture_output=True,
                          check=True, timeout=30)
    after = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if item)
    return {k: v for k, v in after.items() if env.get(k) != v and k not in ("_", "SHLVL", "PWD", "OLDPWD")}


# A job that finds the experiment the test created, with the MLflow credentials of the head's environment.
MLFLOW_JOB = ("""python -c "from mlflow import MlflowClient; """
              """print('experiment', MlflowClient().get_experiment_by_name('local-stack-check').experiment_id)" """)


@pytest.mark.slow
def test_local_stack_up_use_down(monkeypatch):
    import boto3
    from mlflow.tracking import MlflowClient

    from pipelines.mlflow_tracking import TrackingError, connect

    # A short state path: Ray's unix sockets live below it (up.sh would otherwise move them to /tmp).
    state = Path(tempfile.mkdtemp(prefix="ddpm-ls-", dir="/tmp"))
    ray_port, dashboard_port, mlflow_port, s3_port = ports = free_ports(4)
    base = bare_env()
    stack = {**base, "DDPM_LOCAL_STACK_DIR": str(state), "DDPM_RAY_PORT": str(ray_port),
             "DDPM_RAY_DASHBOARD_PORT": str(dashboard_port), "DDPM_MLFLOW_PORT": str(mlflow_port),
             "DDPM_S3_PORT": str(s3_port), "DDPM_LOCAL_STACK_TIMEOUT": "150"}
    down = [str(INFRA / "local" / "down.sh")]
    try:
        up = run([str(INFRA / "local" / "up.sh")], stack, 400, "infra/local/up.sh")
        assert re.findall(r"^export .+$", up.stdout, flags=re.M) == (state / "env.sh").read_text().splitlines()
        exports = sourced(state / "env.sh", base)
        assert exports["RAY_ADDRESS"] == f"http://127.0.0.1:{dashboard_port}"
        assert exports["RAY_AUTH_MODE"] == "token"
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
        # MLflow's admin: a password made here, readable by its owner only, never printed nor on a command line.
        password_file = state / "mlflow" / "admin_password"
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        password = password_file.read_text().strip()
        assert re.fullmatch(r"[0-9a-f]{64}", password)
        assert exports["MLFLOW_TRACKING_USERNAME"] == "admin" and exports["MLFLOW_TRACKING_PASSWORD"] == password
        assert password not in up.stdout + up.stderr + (state / "env.sh").read_text()
        assert commands_mentioning(password) == []
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}"
        pids = {path.stem: int(path.read_text()) for path in (state / "pids").glob("*.pid")}
        assert set(pids) == {"ray", "mlflow", "s3"}

        for name in CREDENTIALS:
            monkeypatch.setenv(name, exports[name])
        client = MlflowClient(exports["MLFLOW_TRACKING_URI"])
        experiment = client.create_experiment("local-stack-check")
        assert client.get_experiment_by_name("local-stack-check").experiment_id == experiment
        # Basic-auth is on: no credentials, or a wrong password, and MLflow refuses.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{exports['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1",
                                   timeout=30)
        assert refused.value.code == 401
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-" + password)
        with pytest.raises(TrackingError, match="refused the credentials"):
            connect(exports["MLFLOW_TRACKING_URI"])

        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name=exports["AWS_DEFAULT_REGION"],
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="local-stack-check")
        s3.put_object(Bucket="local-stack-check", Key="a/b.bin", Body=bytes(range(256)) * 64)
        assert s3.get_object(Bucket="local-stack-check", Key="a/b.bin")["Body"].read() == bytes(range(256)) * 64

        # In a fresh process, as a user who sourced env.sh would (Ray caches the token it loaded once).
        # The submitter has no MLflow credentials: the job has those of the stack's Ray.
        submitter = {k: v for k, v in {**base, **exports}.items() if k not in CREDENTIALS}
        job = run([sys.executable, "-c", RAY_JOB, MLFLOW_JOB], submitter, 240, "a Ray job on the local stack")
        result = json.loads(job.stdout.strip().splitlines()[-1])
        assert result["status"] == "SUCCEEDED" and f"experiment {experiment}" in result["logs"], result
        # Token authentication is on: the job API refuses a request without the token.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{exports['RAY_ADDRESS']}/api/version", timeout=30)
        assert refused.value.code == 401
        # Every server of the stack, Ray's own included, on loopback only.
        from tests.test_ray_runtime import RAY_SERVERS, listening_sockets, on_loopback

        sockets = [found for pid in pids.values() for found in listening_sockets(pid)]
        assert RAY_SERVERS <= {process for process, _, _ in sockets}, sockets
        assert {port for _, _, port in sockets} >= set(ports)
        assert [socket for socket in sockets if not on_loopback(socket[1])] == []

        run(down, stack, 180, "infra/local/down.sh")
        assert [port for port in ports if port_open(port)] == []
        for name, pid in pids.items():
            assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still runs"
            assert session_members(pid) == [], f"{name}'s session still has processes"
        assert commands_mentioning(str(state)) == []
        assert list((state / "pids").iterdir()) == []
    finally:
        subprocess.run(down, env=stack, capture_output=True, timeout=180)
    shutil.rmtree(state)


def test_local_stack_refuses_a_user_store_whose_admin_password_is_gone(tmp_path):
    # The admin keeps the password it was created with: a new one would lock the exports out.
    (tmp_path / "mlflow").mkdir()
    (tmp_path / "mlflow" / "basic_auth.db").write_bytes(b"")
    ports = dict(zip(("DDPM_RAY_PORT", "DDPM_RAY_DASHBOARD_PORT", "DDPM_MLFLOW_PORT", "DDPM_S3_PORT"),
                     map(str, free_ports(4))))
    done = subprocess.run([str(INFRA / "local" / "up.sh")],
                          env={**bare_env(), **ports, "DDPM_LOCAL_STACK_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"up.sh: {tmp_path}/mlflow/basic_auth.db has an MLflow admin whose password file "
        f"({tmp_path}/mlflow/admin_password) is gone; remove basic_auth.db to start with a new admin (runs and "
        "models stay)")
    assert not (tmp_path / "mlflow" / "admin_password").exists() and list((tmp_path / "pids").iterdir()) == []
