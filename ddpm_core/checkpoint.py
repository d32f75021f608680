"""Training checkpoints as directories that load without unpickling anything untrusted.

    model.safetensors   the raw weights
    ema.safetensors     the EMA weights (what evaluation and the registry use)
    optimizer.pt        Adam's state, loaded with torch.load(weights_only=True)
    state.json          step, resolved config, data position, seed, counters

A directory is written under a temporary name and renamed when complete, so a crash never leaves
a checkpoint that looks finished but is not.

A model folder is what every command takes in place of a checkpoint (and what an import writes):

    config.json             the resolved Config
    ema.safetensors         the weights
    ema.safetensors.sha256  their sha256, in `sha256sum` format; written last
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config
from .ema import EMA
from .errors import UserError
from .storage import sha256_file
from .unet import UNet

MODEL, EMA_WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"
CONFIG, WEIGHTS_SHA256 = "config.json", "ema.safetensors.sha256"


class CheckpointError(UserError):
    """A checkpoint directory that is incomplete or does not match the model."""


@dataclass
class TrainingState:
    """Where training stands: everything besides the tensors that a resumed run needs."""

    step: int
    config: dict
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    seed: int = 0
    nonfinite_steps: int = 0
    extra: dict = field(default_factory=dict)


def _state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous tensors; channels_last weights are not.
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, ema: EMA, optimizer: torch.optim.Optimizer,
                    state: TrainingState) -> Path:
    """Write a complete checkpoint at `directory` (which must not exist yet)."""
    final = Path(directory)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(_state_dict(model), str(partial / MODEL))
    save_file(_state_dict(ema.model), str(partial / EMA_WEIGHTS))
    torch.save(optimizer.state_dict(), partial / OPTIMIZER)
    (partial / STATE).write_text(json.dumps(asdict(state), indent=2, sort_keys=True))
    os.replace(partial, final)
    return final


def read_state(directory: str | os.PathLike) -> TrainingState:
    path = Path(directory)
    missing = [name for name in (MODEL, EMA_WEIGHTS, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return TrainingState(**json.loads((path / STATE).read_text()))


def _load_weights(module: nn.Module, file: Path) -> None:
    tensors = load_file(str(file))
    try:
        module.load_state_dict(tensors)
    except RuntimeError as error:
        raise CheckpointError(f"{file} does not fit this model: {str(error).splitlines()[0]}") from None


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, ema: EMA,
                    optimizer: torch.optim.Optimizer) -> TrainingState:
    """Restore model, EMA and optimizer in place; return the training state."""
    path = Path(directory)
    state = read_state(path)
    _load_weights(model, path / MODEL)
    _load_weights(ema.model, path / EMA_WEIGHTS)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location=device, weights_only=True))
    return state


def load_ema_unet(directory: str | os.PathLike, weights: str = EMA_WEIGHTS) -> tuple[UNet, Config]:
    """The EMA model of a checkpoint (or of a registered model's artifacts), ready to sample."""
    path = Path(directory)
    config_file = path / STATE if (path / STATE).is_file() else path / CONFIG
    if not config_file.is_file() or not (path / weights).is_file():
        raise CheckpointError(f"{path} holds no model: expected {weights} and state.json or config.json")
    data = json.loads(config_file.read_text())
    config = Config.from_dict(data["config"] if "config" in data and "step" in data else data)
    model = UNet(config.model)
    _load_weights(model, path / weights)
    return model.eval(), config


def seal_model_folder(directory: str | os.PathLike) -> str:
    """Record the sha256 of a folder's ema.safetensors next to it (the last file of a model folder)."""
    path = Path(directory)
    digest = sha256_file(path / EMA_WEIGHTS)
    (path / WEIGHTS_SHA256).write_text(f"{digest}  {EMA_WEIGHTS}\n")
    return digest


def save_model_folder(directory: str | os.PathLike, model: nn.Module, config: Config) -> Path:
    """Write a model folder: config.json, ema.safetensors and, last, ema.safetensors.sha256."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_SHA256).unlink(missing_ok=True)
    save_file(_state_dict(model), str(path / EMA_WEIGHTS))
    (path / CONFIG).write_text(config.to_json())
    seal_model_folder(path)
    return path


def copy_model_folder(source: str | os.PathLike, directory: str | os.PathLike, config: Config) -> Path:
    """A model folder at `directory` from the EMA weights of a checkpoint or model folder `source`."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    (path / WEIGHTS_SHA256).unlink(missing_ok=True)
    shutil.copy(Path(source) / EMA_WEIGHTS, path / EMA_WEIGHTS)
    (path / CONFIG).write_text(config.to_json())
    seal_model_folder(path)
    return path


def verify_model_folder(directory: str | os.PathLike) -> str:
    """The sha256 of a model folder's weights, checked against the one recorded in it."""
    path = Path(directory)
    missing = [name for name in (CONFIG, EMA_WEIGHTS, WEIGHTS_SHA256) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"model folder {path} is incomplete: missing {', '.join(missing)}")
    recorded = ((path / WEIGHTS_SHA256).read_text().split() or [""])[0]
    found = sha256_file(path / EMA_WEIGHTS)
    if found != recorded:
        raise CheckpointError(f"model folder {path}: {EMA_WEIGHTS} has sha256 {found}, not the {recorded or 'nothing'} "
                              f"recorded in {WEIGHTS_SHA256}; refusing to use it")
    return found
