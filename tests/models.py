"""Small models for the job tests: real checkpoints of the `tiny` preset with non-trivial weights."""

from pathlib import Path

import torch

from ddpm_core.checkpoint import TrainingState, save_checkpoint
from ddpm_core.ema import EMA
from ddpm_core.presets import get_preset
from ddpm_core.training import build_optimizer
from ddpm_core.unet import UNet


def tiny_checkpoint(directory: Path, seed: int = 0, step: int = 7) -> Path:
    """A `tiny` checkpoint whose weights depend on `seed` (the zero-initialised layers made non-zero)."""
    config = get_preset("tiny")
    torch.manual_seed(seed)
    model = UNet(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = EMA(model, 0.9)
    ema.update(model, 0)
    return save_checkpoint(directory, model, ema, build_optimizer(model, config.train),
                           TrainingState(step=step, config=config.to_dict()))
