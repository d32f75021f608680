"""Per-image random streams: image i of a job draws all its noise from a generator seeded by (seed, i).

A sample then depends only on its own seed, never on the batch it ran in or how many workers
shared the job (shared/DESIGN.md, "Samples").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch


def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a job with base `seed`, well mixed by SeedSequence."""
    if seed < 0 or index < 0:
        raise ValueError(f"seed and image index must be >= 0; got seed={seed}, index={index}")
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def image_generators(seed: int, indices: Iterable[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One `torch.Generator` per image index, on `device`."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]


def randn_per_image(generators: Sequence[torch.Generator], image_shape: Sequence[int],
                    device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch of standard normal tensors, row i drawn from generators[i]."""
    return torch.stack([torch.randn(tuple(image_shape), generator=g, device=device, dtype=dtype) for g in generators])
