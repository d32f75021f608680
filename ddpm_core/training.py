"""One optimisation step of the paper's recipe (App. B, official `utils.make_optimizer`, `run_training`).

Adam (eps 1e-8, no weight decay), lr warmed up linearly over 5,000 steps then constant,
gradients clipped to global norm 1.0, EMA updated after every step, loss L_simple (Eq. 14).
The same step runs in one process or under DDP (where backward all-reduces the gradients).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import TrainConfig
from .diffusion import GaussianDiffusion
from .ema import EMA


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Adam:
    # fused: the same Adam update in one kernel over every parameter (CUDA and CPU), not a loop of tensor ops.
    return torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.adam_betas, eps=config.adam_eps,
                            weight_decay=0.0, fused=True)


def build_ema(model: nn.Module, config: TrainConfig) -> EMA:
    return EMA(model, config.ema_decay, config.ema_debias)


def learning_rate(step: int, config: TrainConfig) -> float:
    """lr · min(step / warmup, 1), the official `get_warmed_up_lr` (step = updates done so far)."""
    if config.warmup_steps == 0:
        return config.lr
    return config.lr * min(step / config.warmup_steps, 1.0)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    applied: bool  # False when the loss or gradient was not finite and the update was skipped


def train_step(model: nn.Module, diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer, ema: EMA,
               x0: torch.Tensor, step: int, config: TrainConfig, generator: torch.Generator | None = None,
               autocast_dtype: torch.dtype | None = None) -> StepResult:
    """One update on batch `x0` (images in [-1, 1]); a non-finite gradient skips the update.

    With `config.micro_batch`, the batch runs in chunks whose gradients accumulate (DDP all-reduces
    only after the last one). Under DDP the gradient norm is the same on every rank, so every rank
    makes the same skip decision. `autocast_dtype` (bf16 on CUDA and bf16 CPUs) wraps the forward passes only.
    """
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    chunks = x0.split(config.micro_batch) if config.micro_batch else (x0,)
    loss_total = torch.zeros((), device=x0.device)
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(x0.device.type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                # Sum over the chunk / whole batch: the accumulated gradient is that of the batch mean.
                loss = diffusion.training_loss(model, chunk, generator=generator).sum() / x0.shape[0]
            loss.backward()
        loss_total += loss.detach().float()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    loss_value, norm_value = torch.stack([loss_total, grad_norm.float()]).tolist()
    applied = math.isfinite(norm_value)  # a non-finite loss makes the all-reduced norm non-finite everywhere
    if applied:
        optimizer.step()
        ema.update(model, step)
    else:
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=loss_value, grad_norm=norm_value, lr=lr, applied=applied)
