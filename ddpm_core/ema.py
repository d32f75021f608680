"""Exponential moving average of the weights (App. B: decay 0.9999), used for every evaluation.

As the official code (TF `ExponentialMovingAverage` with decay 1e-10 before step 1), the first
update copies the weights; afterwards the decay is constant, with no warm-up.

`debias=True` (an option, not the paper's) is Adam's bias correction (Kingma & Ba 2015, §3) of an average
started at zero: θ_ema after update s weights each θ_k, k ≤ s, by (1 - d)·d^(s-k) / (1 - d^(s+1)), so the
weights the average started from keep no share. That share is d^s of the paper's EMA (22 % after 300 steps at
d = 0.995), and with the paper's init it holds zero residual branches and a zero output layer.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of a model whose parameters follow θ_ema ← d·θ_ema + (1 - d)·θ."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, debias: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.debias = decay, debias
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in `model`'s current weights after optimisation step `step` (0-based)."""
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        if step == 0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay_at(step))
        # Buffers (none in the U-Net today) are copied, never averaged.
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)

    def decay_at(self, step: int) -> float:
        """The decay of update `step`: d, or debiased d·(1 - d^step) / (1 - d^(step+1)), which tends to d."""
        if not self.debias:
            return self.decay
        return self.decay * (1.0 - self.decay**step) / (1.0 - self.decay ** (step + 1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
