"""Size and cost of a model: parameter count and forward FLOPs, computed without allocating weights."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import Config, ModelConfig
from .unet import UNet


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _meta_unet(config: ModelConfig) -> UNet:
    # On the meta device shapes are real and storage is not: a 256M-parameter model costs nothing.
    with torch.device("meta"):
        return UNet(config)


def forward_flops(config: ModelConfig) -> int:
    """FLOPs (2 per multiply-add) of one forward pass on one image, as PyTorch's flop counter sees it."""
    model = _meta_unet(config)
    r = config.resolution
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, config.in_channels, r, r), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops()


def preset_summary(config: Config) -> dict:
    """The row `ddpm presets` prints for a preset."""
    return {
        "name": config.preset,
        "resolution": config.model.resolution,
        "parameters": count_parameters(_meta_unet(config.model)),
        "gflops_per_image": round(forward_flops(config.model) / 1e9, 2),
        "lr": config.train.lr,
        "batch_size": config.train.batch_size,
        "dropout": config.model.dropout,
        "variance": config.diffusion.variance,
        "random_flip": config.train.random_flip,
        "steps": config.train.steps,
        "notes": config.notes,
    }
