"""The MLflow model registry for the jobs: registering the EMA model, and which model a job samples from
(a registered version, models:/name@alias or /version, a checkpoint, or a model folder: config.json +
ema.safetensors + ema.safetensors.sha256, as `ddpm convert import --out` writes)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

import ddpm_core
from ddpm_core.checkpoint import (
    CONFIG,
    EMA_WEIGHTS,
    STATE,
    load_ema_unet,
    read_state,
    seal_model_folder,
    verify_model_folder,
)
from ddpm_core.config import Config
from ddpm_core.sampling import SamplesError
from ddpm_core.storage import sha256_file

# The registered model's data, inside the logged model: what sampling reads, and the version tags
# holding each file's sha256 as registered.
MODEL_FOLDER = "artifacts/model"
WEIGHTS_SHA_TAG = "ddpm.weights_sha256"
RECORDED_SHA256 = {"config.json": "ddpm.config_sha256", EMA_WEIGHTS: WEIGHTS_SHA_TAG}
# A resolved model folder carries its weights' sha256, so an actor elsewhere loads exactly those weights.
FOLDER_SHA256 = "@sha256:"


def resolve_model(reference: str, client) -> tuple[str, object | None]:
    """(a reference that cannot move, its ModelVersion or None): aliases become version numbers."""
    if reference.startswith("models:/"):
        name, _, selector = reference[len("models:/"):].partition("@")
        try:
            if selector:
                version = client.get_model_version_by_alias(name, selector)
            else:
                name, _, number = reference[len("models:/"):].partition("/")
                version = client.get_model_version(name, number)
        except Exception as error:  # noqa: BLE001 - MLflow raises several kinds for "not found"
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SamplesError(f"model {reference} does not exist: {message}") from None
        return f"models:/{version.name}/{version.version}", version
    path = Path(reference).expanduser().resolve()
    if not path.is_dir():
        raise SamplesError(f"model {reference} is neither a models:/ URI, a checkpoint directory nor a model folder")
    if (path / CONFIG).is_file() and not (path / STATE).is_file():
        return f"{path}{FOLDER_SHA256}{verify_model_folder(path)}", None
    return f"{path}@step{read_state(path).step}", None


def load_model(resolved: str, tracking_uri: str):
    """(EMA U-Net in eval mode, its Config) for a reference from `resolve_model`.

    A registered version is read as data: its config.json and safetensors weights are downloaded and
    checked against the sha256 recorded when it was registered. The pyfunc code stored with it is
    never imported or run (anyone who can write to the registry could have put code there).
    """
    if resolved.startswith("models:/"):
        return _load_registered(resolved, tracking_uri)
    if FOLDER_SHA256 in resolved:
        path, digest = resolved.rsplit(FOLDER_SHA256, 1)
        if verify_model_folder(path) != digest:
            raise SamplesError(f"model folder {path} changed since the job resolved it (sha256 {digest[:16]})")
        return load_ema_unet(path)
    return load_ema_unet(resolved.rsplit("@step", 1)[0])


def _load_registered(resolved: str, tracking_uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    name, number = resolved[len("models:/"):].rsplit("/", 1)
    client = MlflowClient(tracking_uri)  # actors run elsewhere: they must be told where the registry is
    recorded = client.get_model_version(name, number).tags
    missing = [tag for tag in RECORDED_SHA256.values() if not recorded.get(tag)]
    if missing:
        raise SamplesError(f"{resolved} has no recorded sha256 ({', '.join(missing)}): it was not registered by "
                           "this version of ddpm-ray; register it again (`ddpm convert import --register` or a "
                           "training run) to sample from it")
    source = client.get_model_version_download_uri(name, number).rstrip("/")
    with tempfile.TemporaryDirectory(prefix="ddpm-registered-") as scratch:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/{MODEL_FOLDER}", dst_path=scratch,
                                                          tracking_uri=tracking_uri))
        for file, tag in RECORDED_SHA256.items():
            found = sha256_file(folder / file) if (folder / file).is_file() else "missing"
            if found != recorded[tag]:
                raise SamplesError(f"{resolved}: {file} does not match the sha256 recorded at registration "
                                   f"({found[:16]} found, {recorded[tag][:16]} recorded): the artifact was "
                                   "changed after registration; refusing to use it")
        return load_ema_unet(folder)


def weights_sha256(resolved: str, version) -> str:
    """The sha256 of the EMA weights a resolved model samples with (as registered, or of the checkpoint)."""
    if version is not None:
        return version.tags[WEIGHTS_SHA_TAG]
    if FOLDER_SHA256 in resolved:
        return resolved.rsplit(FOLDER_SHA256, 1)[1]
    return sha256_file(Path(resolved.rsplit("@step", 1)[0]) / EMA_WEIGHTS)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddpm-ray")
    except PackageNotFoundError:
        return "unknown"


def register(client, run_id: str, checkpoint_dir: Path, config: Config, tags: dict) -> str:
    """Log the EMA model of a checkpoint or model folder in the run, register it as ddpm-<preset> with its
    files' sha256, alias `candidate`.

    It is logged as a pyfunc (for users of `mlflow.pyfunc`); our jobs read only its data (`load_model`).
    """
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from pipelines import ddpm_model

    r = config.model.resolution
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "index")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, 3))]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", "ddim"),
                            ParamSpec("steps", "long", 50), ParamSpec("eta", "double", 0.0)]),
    )
    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as scratch:
        model_dir = Path(scratch) / "model"
        model_dir.mkdir()
        shutil.copy(checkpoint_dir / EMA_WEIGHTS, model_dir / EMA_WEIGHTS)
        (model_dir / "config.json").write_text(config.to_json())
        seal_model_folder(model_dir)  # the registered data is a model folder too
        recorded = {tag: sha256_file(model_dir / file) for file, tag in RECORDED_SHA256.items()}
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=ddpm_model.__file__, artifacts={"model": str(model_dir)},
                code_paths=[str(Path(ddpm_core.__file__).parent)], signature=signature,
                pip_requirements=["torch", "numpy", "safetensors", "pillow"])
    name = f"ddpm-{config.preset}"
    version = mlflow.register_model(info.model_uri, name, tags={**{k: str(v) for k, v in tags.items()}, **recorded})
    client.set_registered_model_alias(name, "candidate", version.version)
    return version.version
