"""Model outputs as pictures: the paper's evaluation quantisation and sample grids."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) → uint8 RGB (N, H, W, 3), rounded as the paper's evaluation.

    A grey model's one channel becomes R = G = B: sample tars, grids and FID then hold exactly what a
    grey RGB data set holds.
    """
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    return pixels.permute(0, 2, 3, 1).numpy()


def image_grid(images: np.ndarray, columns: int | None = None, padding: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 → one (rows·H, columns·W, C) picture with `padding` white pixels between cells."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = padding + (i // columns) * (h + padding), padding + (i % columns) * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid
