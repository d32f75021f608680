"""The MLflow model registry for the jobs: registering the EMA model, and which model a job samples from
(a registered version, models:/name@alias or /version, or a checkpoint)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

import ddpm_core
from ddpm_core.checkpoint import EMA_WEIGHTS, load_ema_unet, read_state
from ddpm_core.config import Config
from ddpm_core.sampling import SamplesError


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
        raise SamplesError(f"model {reference} is neither a models:/ URI nor a checkpoint directory")
    return f"{path}@step{read_state(path).step}", None


def load_model(resolved: str, tracking_uri: str):
    """(EMA U-Net in eval mode, its Config) for a reference from `resolve_model`."""
    if resolved.startswith("models:/"):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)  # actors run elsewhere: they must be told where the registry is
        sampler = mlflow.pyfunc.load_model(resolved).unwrap_python_model()
        return sampler.model, sampler.config
    return load_ema_unet(resolved.rsplit("@step", 1)[0])


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ddpm-ray")
    except PackageNotFoundError:
        return "unknown"


def register(client, run_id: str, checkpoint_dir: Path, config: Config, tags: dict) -> str:
    """Log the EMA model as a pyfunc in the run, register it as ddpm-<preset>, alias `candidate`."""
    import mlflow
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from pipelines import ddpm_model

    r = config.model.resolution
    signature = ModelSignature(
        inputs=Schema([ColSpec("long", "index")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, r, r, config.model.out_channels))]),
        params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("sampler", "string", "ddim"),
                            ParamSpec("steps", "long", 50), ParamSpec("eta", "double", 0.0)]),
    )
    with tempfile.TemporaryDirectory(prefix="ddpm-model-") as scratch:
        model_dir = Path(scratch) / "model"
        model_dir.mkdir()
        shutil.copy(checkpoint_dir / EMA_WEIGHTS, model_dir / EMA_WEIGHTS)
        (model_dir / "config.json").write_text(config.to_json())
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=ddpm_model.__file__, artifacts={"model": str(model_dir)},
                code_paths=[str(Path(ddpm_core.__file__).parent)], signature=signature,
                pip_requirements=["torch", "numpy", "safetensors", "pillow"])
    name = f"ddpm-{config.preset}"
    version = mlflow.register_model(info.model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, "candidate", version.version)
    return version.version
