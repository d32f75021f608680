"""Pixel features: a toy feature space for CPU calibrations and tests, where no FID network is at hand.

An image's features are its pixels averaged over an 8×8 grid of areas, per channel, in [0, 1] (192 numbers),
so the Fréchet distance between two sets is that of their low-resolution pixel statistics: `pixel_fd`, never
an FID. Unlike the random-init Inception (pseudo-FID), whose features of small upscaled images rank a short
toy run's checkpoints backwards, it sees a toy model learn its data (docs/evaluation.md). It has no
classifier, so no Inception Score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GRID = 8  # the digits' own size: every model resolution (8, 16, 32, ...) averages exactly onto it
EXTRACTOR = f"pixels({GRID}x{GRID})"  # what a score or reference records as the network that computed it
RESIZE = f"area_{GRID}x{GRID}"  # the resize its references record (reference_provenance.py)


class PixelFeatures(nn.Module):
    """uint8 images (N, 3, H, W) → area means on a GRID×GRID grid (N, 3·GRID²), float32; no logits."""

    dim = 3 * GRID * GRID

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"pixel features take uint8 images (N, 3, H, W); got {images.dtype} "
                             f"{tuple(images.shape)}")
        return torch.flatten(F.adaptive_avg_pool2d(images.float() / 255, GRID), 1), None
