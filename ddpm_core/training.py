"""Training by the paper's recipe (App. B, official `utils.make_optimizer`, `run_training`).

Adam (eps 1e-8, no weight decay), lr warmed up linearly over 5,000 steps then constant,
gradients clipped to global norm 1.0, EMA updated after every step, loss L_simple (Eq. 14).
`train_step` is one update; `TrainingLoop` runs them over a loader, resumable at any step, and
reports through `TrainingHooks`. Both run in one process or under DDP (where backward all-reduces
the gradients), with no Ray and no MLflow: pipelines/train.py adapts the loop to Ray Train.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .checkpoint import TrainingState
from .config import Config, TrainConfig
from .diffusion import GaussianDiffusion
from .ema import EMA
from .pixels import image_grid, to_uint8
from .progress import format_duration
from .rng import image_generators, image_seed

log = logging.getLogger("ddpm.train")  # the training job's logger: its progress lines keep their name
GRID_IMAGES, GRID_DDIM_STEPS = 16, 25


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


def sample_grid(model: torch.nn.Module, diffusion: GaussianDiffusion, config: Config,
                device: torch.device) -> np.ndarray:
    """DDIM samples of `model` from fixed seeds, as one uint8 grid: the same images at every step."""
    r = config.model.resolution
    images = diffusion.ddim_sample_loop(model, (GRID_IMAGES, config.model.in_channels, r, r),
                                        steps=min(GRID_DDIM_STEPS, diffusion.num_timesteps),
                                        generators=image_generators(0, range(GRID_IMAGES), device), device=device)
    return image_grid(to_uint8(images), columns=4)


class EpochLoader(Protocol):
    """What the loop reads: `ddpm_core.loader.TrainLoader`, the same batches for the same epoch every time."""

    def set_epoch(self, epoch: int) -> None: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]: ...


@dataclass
class TrainingHooks:
    """What the loop reports; each is optional (None: the loop skips the work, e.g. no grid is sampled)."""

    on_batch: Callable[[int, list[str], nn.Module], None] | None = None  # (step, sample keys, model) before each step
    on_metrics: Callable[[dict[str, float], int], None] | None = None  # (values, step) every train.log_every steps
    on_grid: Callable[[np.ndarray, int], None] | None = None  # (uint8 grid of EMA samples, step) every sample_every
    on_checkpoint: Callable[[TrainingState, StepResult], None] | None = None  # every checkpoint_every and at the end
    on_ema: Callable[[nn.Module, int], None] | None = None  # (EMA model, step) every train.fid_every steps (if > 0)


@dataclass
class LoopResult:
    step: int
    nonfinite_steps: int
    stopped: str | None = None  # the message when max_nonfinite_steps consecutive non-finite steps stopped it


def _batches(loader: EpochLoader, epoch: int, skip: int) -> Iterator[tuple[int, int, torch.Tensor, list[str]]]:
    """(epoch, index in epoch, images, keys) from `epoch` on, without the first `skip` batches of `epoch`."""
    while True:
        loader.set_epoch(epoch)
        for index, (images, keys) in enumerate(loader):
            if index >= skip:  # the batches this epoch had consumed before the checkpoint are read, not trained on
                yield epoch, index, images, keys
        epoch, skip = epoch + 1, 0


@dataclass
class _Stream:
    """What one `run` leaves the next that continues at the same step: batches, window and counter go on."""

    loader: EpochLoader
    batches: Iterator[tuple[int, int, torch.Tensor, list[str]]]
    position: tuple[int, int, int] | None  # (step, epoch, batch_in_epoch) the next step starts from
    consecutive_nonfinite: int = 0
    window: list[StepResult] = field(default_factory=list)  # applied steps since the last metrics
    window_start: float = field(default_factory=time.monotonic)
    window_first_step: int = 0


class TrainingLoop:
    """One rank's training: batches of a loader, one seed per rank and step, `train_step`, reports.

    `model` is the raw module (its weights are what checkpoints and `on_batch` see); `ddp_model`, default
    `model`, is what the step runs through (DDP, torch.compile). With `world` ranks, rank r seeds step s
    with image_seed(train.seed, s·world + r), so t, ε and dropout are the same whenever a step is replayed.
    """

    def __init__(self, model: nn.Module, diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer, ema: EMA,
                 config: Config, device: torch.device | str, *, rank: int = 0, world: int = 1,
                 autocast_dtype: torch.dtype | None = None, ddp_model: nn.Module | None = None):
        self.model, self.diffusion, self.optimizer, self.ema = model, diffusion, optimizer, ema
        self.config, self.device = config, torch.device(device)
        self.rank, self.world, self.autocast_dtype = rank, world, autocast_dtype
        self.ddp_model = model if ddp_model is None else ddp_model
        self._stream: _Stream | None = None

    def run(self, loader: EpochLoader, state: TrainingState, hooks: TrainingHooks = TrainingHooks(),
            stop_at: int | None = None) -> LoopResult:
        """Train from `state` (a fresh one, or a checkpoint's) to train.steps, or to step `stop_at` if earlier.

        Resumes at state.epoch, past the state.batch_in_epoch batches that epoch had consumed, so a resumed
        run sees the data an uninterrupted one would. A call that starts where the previous one on the same
        loader ended continues its batches (no re-reading of the epoch), metric window and count of
        consecutive non-finite steps; any other state starts them afresh, as a restarted job does.
        """
        train = self.config.train
        end = train.steps if stop_at is None else min(stop_at, train.steps)
        stream = self._stream
        if stream is None or stream.loader is not loader or stream.position != (state.step, state.epoch,
                                                                                 state.batch_in_epoch):
            stream = self._stream = _Stream(loader, _batches(loader, state.epoch, state.batch_in_epoch),
                                            (state.step, state.epoch, state.batch_in_epoch),
                                            window_first_step=state.step)
        step, config_dict = state.step, self.config.to_dict()
        cuda = self.device.type == "cuda"
        while step < end:
            stream.position = None  # until the step is done: one cut short by an exception leaves nothing to continue
            epoch, index, images, keys = next(stream.batches)
            if hooks.on_batch:
                hooks.on_batch(step, keys, self.model)
            # Every rank and step has its own seed: t, ε and dropout are reproducible across resumes.
            torch.manual_seed(image_seed(train.seed, step * self.world + self.rank))
            x0 = images.to(self.device, non_blocking=True)
            if cuda:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            result = train_step(self.ddp_model, self.diffusion, self.optimizer, self.ema, x0, step, train,
                                autocast_dtype=self.autocast_dtype)
            step += 1
            state = replace(state, step=step, config=config_dict, epoch=epoch, batch_in_epoch=index + 1,
                            seed=train.seed, nonfinite_steps=state.nonfinite_steps + (not result.applied))
            stream.position = (step, epoch, index + 1)
            if result.applied:
                stream.consecutive_nonfinite = 0
                if hooks.on_metrics:
                    stream.window.append(result)
            else:
                stream.consecutive_nonfinite += 1
                log.warning("rank %d step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped",
                            self.rank, step, result.loss, result.grad_norm)
                if stream.consecutive_nonfinite >= train.max_nonfinite_steps:
                    return LoopResult(step, state.nonfinite_steps, stopped=(
                        f"stopped at step {step}: {stream.consecutive_nonfinite} consecutive steps had a non-finite "
                        f"loss or gradient (last loss {result.loss}); lower train.lr or check the data"))
            if hooks.on_metrics and stream.window and step % train.log_every == 0:
                self._report_metrics(hooks.on_metrics, stream, step, epoch, state.nonfinite_steps, result.lr)
            if hooks.on_grid and step % train.sample_every == 0:
                hooks.on_grid(sample_grid(self.ema.model, self.diffusion, self.config, self.device), step)
            if hooks.on_ema and train.fid_every and step % train.fid_every == 0:
                hooks.on_ema(self.ema.model, step)
            if hooks.on_checkpoint and (step % train.checkpoint_every == 0 or step == end):
                hooks.on_checkpoint(state, result)
        return LoopResult(step, state.nonfinite_steps)

    def _report_metrics(self, on_metrics: Callable[[dict[str, float], int], None], stream: _Stream, step: int,
                        epoch: int, nonfinite_steps: int, lr: float) -> None:
        """Means over the applied steps since the last report, to `on_metrics` and one progress line."""
        train = self.config.train
        elapsed = time.monotonic() - stream.window_start
        values = {"loss": float(np.mean([r.loss for r in stream.window])),
                  "grad_norm": float(np.mean([r.grad_norm for r in stream.window])), "lr": lr,
                  "images_per_s": (step - stream.window_first_step) * train.batch_size / elapsed,
                  "nonfinite_steps": nonfinite_steps, "epoch": epoch}
        if self.device.type == "cuda":
            values["gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        on_metrics(values, step)
        log.info("step %d/%d: loss %.4f, %.1f images/s, about %s left", step, train.steps, values["loss"],
                 values["images_per_s"],
                 format_duration((train.steps - step) * train.batch_size / values["images_per_s"]))
        # The next window starts after the report, so the time `on_metrics` took (an MLflow call) is in none.
        stream.window, stream.window_start, stream.window_first_step = [], time.monotonic(), step
