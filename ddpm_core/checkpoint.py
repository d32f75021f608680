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
    ema.safetensors.sha256  the sha256 of both, in `sha256sum -c` format; written last

Every file is checked before anything is built from it: a config's types and sizes (Config.from_dict),
state.json's fields, a model folder's seal; a file that fails is one CheckpointError naming it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, ConfigError
from .ema import EMA
from .errors import UserError, first_line
from .storage import Storage, sha256_file
from .unet import UNet

MODEL, EMA_WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "ema.safetensors", "optimizer.pt", "state.json"
CONFIG, WEIGHTS_SHA256 = "config.json", "ema.safetensors.sha256"
SEALED = (EMA_WEIGHTS, CONFIG)  # the files of a model folder whose sha256 WEIGHTS_SHA256 records


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
    # The content fingerprint of the dataset it trains on ("" in checkpoints from before the field): a resume
    # on other data is refused from the checkpoint itself, whatever the MLflow store says.
    dataset_fingerprint: str = ""


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


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of `step` among a run's checkpoints."""
    return f"checkpoint_{step:09d}"


def read_state(directory: str | os.PathLike) -> TrainingState:
    path = Path(directory)
    missing = [name for name in (MODEL, EMA_WEIGHTS, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return _parse_state(path / STATE, (path / STATE).read_bytes())


def latest_state(checkpoints: Storage) -> tuple[str, TrainingState] | None:
    """(its URL, the state) of the newest checkpoint in a run's folder of checkpoints; None if it has none."""
    names = [name for name in checkpoints.list() if re.fullmatch(r"checkpoint_\d{9}/" + re.escape(STATE), name)]
    if not names:
        return None
    url = checkpoints.url(max(names))
    return url, _parse_state(url, checkpoints.read_bytes(max(names)))


def read_json_object(file: str | os.PathLike, data: bytes | None = None,
                     error: type[UserError] = CheckpointError) -> dict:
    """The JSON object in `file` (or in its bytes `data`); `error` naming the file if it is not one."""
    try:
        found = json.loads(Path(file).read_bytes() if data is None else data)
    except (OSError, UnicodeDecodeError, ValueError) as problem:
        raise error(f"{file} is not readable JSON: {str(problem).splitlines()[0]}") from None
    if not isinstance(found, dict):
        raise error(f"{file} holds {type(found).__name__}, not a JSON object")
    return found


def _parse_state(file: str | os.PathLike, data: bytes) -> TrainingState:
    """A state.json's TrainingState, each field of its type (its config is checked where it is built)."""
    found = read_json_object(file, data)
    hints = typing.get_type_hints(TrainingState)
    unknown = sorted(set(found) - set(hints))
    wrong = [k for k, v in found.items() if k in hints and (not isinstance(v, hints[k]) or isinstance(v, bool)
                                                            or (hints[k] is int and v < 0))]
    missing = [f.name for f in fields(TrainingState) if f.name not in found and f.default is f.default_factory]
    if unknown or wrong or missing:
        problems = [*(f"{k} is {json.dumps(found[k])[:40]}, not a{' non-negative' if hints[k] is int else ''} "
                      f"{hints[k].__name__}" for k in wrong),
                    *(f"unknown field {k}" for k in unknown), *(f"no {k}" for k in missing)]
        raise CheckpointError(f"{file} is not a training state: {'; '.join(problems)}")
    return TrainingState(**found)


def read_config(file: str | os.PathLike, data: dict) -> Config:
    """`Config.from_dict` of a config read from `file`, its errors naming the file."""
    try:
        return Config.from_dict(data)
    except ConfigError as error:
        raise CheckpointError(f"{file}: {error}") from None


def load_tensors(file: str | os.PathLike, error: type[UserError] = CheckpointError) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; `error` naming it if it is truncated or not one."""
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as problem:
        raise error(f"{file} is not a readable safetensors file: {first_line(problem)}") from None


def _load_weights(module: nn.Module, file: Path) -> None:
    tensors = load_tensors(file)
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
    if config_file.name == STATE:
        config = read_config(config_file, _parse_state(config_file, config_file.read_bytes()).config)
    else:
        config = read_config(config_file, read_json_object(config_file))
    model = UNet(config.model)
    _load_weights(model, path / weights)
    return model.eval(), config


def seal_model_folder(directory: str | os.PathLike) -> str:
    """Record the sha256 of a folder's ema.safetensors and config.json next to them (the last file of a model
    folder); returns the weights'."""
    path = Path(directory)
    digests = {name: sha256_file(path / name) for name in SEALED}
    (path / WEIGHTS_SHA256).write_text("".join(f"{digests[name]}  {name}\n" for name in SEALED))
    return digests[EMA_WEIGHTS]


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
    """The sha256 of a model folder's weights, its weights and config checked against the sha256 recorded in it."""
    path = Path(directory)
    missing = [name for name in (CONFIG, EMA_WEIGHTS, WEIGHTS_SHA256) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"model folder {path} is incomplete: missing {', '.join(missing)}")
    lines = [line.split(maxsplit=1) for line in (path / WEIGHTS_SHA256).read_text(errors="replace").splitlines()]
    recorded = {parts[1].lstrip("*"): parts[0] for parts in lines if len(parts) == 2}
    for name in SEALED:
        if name not in recorded:
            raise CheckpointError(f"model folder {path}: {WEIGHTS_SHA256} records no sha256 of {name} (a folder "
                                  "sealed by an older ddpm-ray); write it again with `ddpm convert import --out`")
        found = sha256_file(path / name)
        if found != recorded[name]:
            raise CheckpointError(f"model folder {path}: {name} has sha256 {found}, not the {recorded[name]} "
                                  f"recorded in {WEIGHTS_SHA256}; refusing to use it")
    return recorded[EMA_WEIGHTS]
