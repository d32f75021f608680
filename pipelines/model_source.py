"""Which model a job samples from: a registered version (models:/name@alias or /version) or a checkpoint."""

from __future__ import annotations

from pathlib import Path

from ddpm_core.checkpoint import load_ema_unet, read_state
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
