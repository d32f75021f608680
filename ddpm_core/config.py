"""Typed configuration of a run: model, diffusion and training hyper-parameters.

A `Config` is what a preset fixes and what every checkpoint and MLflow run stores. Any field
can be overridden with a dotted `section.field=value` string (`train.lr=1e-5`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

VARIANCE_TYPES = ("fixedlarge", "fixedsmall")
BETA_SCHEDULES = ("linear",)
GROUPNORM_GROUPS = 32
# Sizes past any DDPM (the paper's largest model has 256M parameters): a stored config asking for more is
# refused before anything is allocated for it.
MAX_RESOLUTION, MAX_LEVELS, MAX_PARAMETERS, MAX_TIMESTEPS = 4096, 12, 2_000_000_000, 100_000
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # also a valid MLflow registered-model name


class ConfigError(UserError):
    """A configuration value or override that cannot be used."""


@dataclass(frozen=True)
class ModelConfig:
    """The U-Net of App. B (`unet2d16b2*` in the official code)."""

    resolution: int
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    in_channels: int = 3  # 1: a grey model, trained on the images' luminance
    out_channels: int = 3
    # Recompute each block's activations in backward: less memory at 256², same numbers.
    gradient_checkpointing: bool = False
    # "paper": the official initialisation (ddpm_core/unet.py); "pytorch": PyTorch's default layer init,
    # as diffusers' UNet2DModel has it.
    init: str = "paper"

    def __post_init__(self) -> None:
        if not 0 < self.resolution <= MAX_RESOLUTION:
            raise ConfigError(f"model.resolution must be in 1..{MAX_RESOLUTION}, got {self.resolution}")
        if not 0 < len(self.ch_mult) <= MAX_LEVELS or any(m <= 0 for m in self.ch_mult):
            raise ConfigError(f"model.ch_mult must be 1 to {MAX_LEVELS} positive integers, got {self.ch_mult}")
        for name in ("ch", "num_res_blocks", "out_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.approx_parameters() > MAX_PARAMETERS:
            raise ConfigError(f"model.ch={self.ch}, ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks} make "
                              f"a U-Net of about {self.approx_parameters():.3g} parameters, over the limit of "
                              f"{MAX_PARAMETERS:.0e}")
        for mult in (1, *self.ch_mult):
            if (self.ch * mult) % GROUPNORM_GROUPS:
                raise ConfigError(
                    f"model.ch * ch_mult must be a multiple of {GROUPNORM_GROUPS} for GroupNorm, "
                    f"got ch={self.ch}, ch_mult={self.ch_mult}"
                )
        downsamples = len(self.ch_mult) - 1
        if self.resolution % (2**downsamples):
            raise ConfigError(
                f"model.resolution {self.resolution} is not divisible by 2**{downsamples} "
                f"(one halving per level of ch_mult={self.ch_mult})"
            )
        levels = {self.resolution // 2**i for i in range(len(self.ch_mult))}
        unreachable = sorted(set(self.attn_resolutions) - levels)
        if unreachable:
            raise ConfigError(
                f"model.attn_resolutions {unreachable} are not U-Net levels; levels are {sorted(levels)}"
            )
        if self.init not in ("paper", "pytorch"):
            raise ConfigError(f"model.init must be 'paper' or 'pytorch', got {self.init!r}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"model.in_channels must be 3 (RGB) or 1 (grey: the images' luminance), "
                              f"got {self.in_channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def approx_parameters(self) -> int:
        """About the U-Net's parameter count (its 3×3 convolutions; 20-35 % under for the presets), not building it."""
        return sum(45 * (self.num_res_blocks + 1) * (self.ch * m) ** 2 for m in self.ch_mult)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the reverse-process variance (§2, §4; App. B)."""

    timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # sigma_t^2 = beta_t ("fixedlarge", CIFAR-10) or beta~_t ("fixedsmall", the 256x256 models).
    variance: str = "fixedlarge"
    # Clip the x0 prediction to [-1, 1] while sampling, as the official sampler.
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.timesteps <= MAX_TIMESTEPS:
            raise ConfigError(f"diffusion.timesteps must be in 1..{MAX_TIMESTEPS}, got {self.timesteps}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ConfigError(
                f"diffusion.beta_schedule {self.beta_schedule!r} is unknown; choose one of {BETA_SCHEDULES}"
            )
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ConfigError(
                f"diffusion betas need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}"
            )
        if self.variance not in VARIANCE_TYPES:
            raise ConfigError(
                f"diffusion.variance {self.variance!r} is unknown; choose one of {VARIANCE_TYPES}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe of App. B and the official `run_*.py` scripts."""

    lr: float = 2e-4
    batch_size: int = 128  # global batch, whatever the number of workers
    warmup_steps: int = 5000  # linear warm-up, then constant
    grad_clip: float = 1.0  # global-norm clip
    ema_decay: float = 0.9999
    ema_debias: bool = False  # not the paper's: the EMA without its starting weights' share (ddpm_core.ema)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    random_flip: bool = True
    steps: int = 800_000
    # How a run is carried out (no effect on the mathematics):
    seed: int = 0
    micro_batch: int = 0  # images per forward on one worker, with gradient accumulation; 0 = the whole share
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2  # as the official keep_checkpoint_max
    log_every: int = 100  # as the official TensorBoard summaries
    sample_every: int = 10_000  # EMA sample grid to MLflow
    fid_every: int = 0  # a cheap FID of the EMA model during training (pipelines/training_quality.py); 0 = off
    fid_num: int = 256  # its number of samples: its cost (the FID network's forward passes, on rank 0)
    max_nonfinite_steps: int = 10  # consecutive skipped steps before the run stops

    def __post_init__(self) -> None:
        # nan passes every `<=` test: checked here, as the workers' optimiser would only fail (or diverge) later.
        for name in ("lr", "adam_eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"train.{name} must be positive and finite, got {value}")
        if len(self.adam_betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        if self.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if self.warmup_steps < 0 or self.steps < 0:
            raise ConfigError(
                f"train.warmup_steps and train.steps must be >= 0, got {self.warmup_steps}, {self.steps}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be positive, got {self.grad_clip}")
        for name in ("checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "max_nonfinite_steps",
                     "fid_num"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch < 0 or self.fid_every < 0:
            raise ConfigError(f"train.micro_batch and train.fid_every must be >= 0, got {self.micro_batch}, "
                              f"{self.fid_every}")


SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Config:
    """Everything a run needs to rebuild its model and diffusion; stored with every checkpoint."""

    preset: str
    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    notes: str = ""

    def __post_init__(self) -> None:
        if not PRESET_NAME.fullmatch(self.preset):
            raise ConfigError(f"preset {_shown(self.preset)} is not a name: up to 100 letters, digits, '_', '.' "
                              "or '-', starting with a letter or digit")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """A stored config (JSON), every value checked for its type and range before anything is built."""
        kwargs = _fields_from_dict(cls, "config", data)
        for name, section_cls in SECTIONS.items():
            if name in kwargs:
                kwargs[name] = section_cls(**_fields_from_dict(section_cls, name, kwargs[name]))
        return cls(**kwargs)

    def flat(self) -> dict[str, Any]:
        """`section.field -> value`, the shape MLflow params take."""
        out: dict[str, Any] = {"preset": self.preset}
        for section in SECTIONS:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                out[f"{section}.{key}"] = value
        return out

    @staticmethod
    def field_defaults() -> dict[str, Any]:
        """`section.field -> default`, as `flat` names them, for every field that has a default.

        A field is added with a default that keeps the behaviour from before it, so a run stored before the
        field existed was trained with that default.
        """
        out: dict[str, Any] = {}
        for section, section_cls in SECTIONS.items():
            for f in dataclasses.fields(section_cls):
                if f.default is not dataclasses.MISSING:
                    out[f"{section}.{f.name}"] = f.default
        return out

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> Config:
        """Apply `section.field=value` strings; values are parsed by the field's type."""
        config = self
        for item in overrides:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ConfigError(f"override {item!r} must look like section.field=value (e.g. train.lr=1e-5)")
            if section not in SECTIONS:
                raise ConfigError(f"override {item!r}: unknown section {section!r}; use model, diffusion or train")
            current = getattr(config, section)
            fields = {f.name: f for f in dataclasses.fields(current)}
            if name not in fields:
                raise ConfigError(f"override {item!r}: {section} has no field {name!r}; fields are {sorted(fields)}")
            hint = typing.get_type_hints(type(current))[name]
            value = _parse_value(raw.strip(), hint, item)
            config = dataclasses.replace(config, **{section: dataclasses.replace(current, **{name: value})})
        return config


def _fields_from_dict(cls: type, name: str, data: Any) -> dict[str, Any]:
    """The keyword arguments of `cls` from a JSON object, each of its field's type (a section stays a dict)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name} must be an object, got {_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown {name} {'sections' if cls is Config else 'fields'} {sorted(unknown)}")
    required = [k for k, f in fields.items() if k not in data and f.default is f.default_factory is dataclasses.MISSING]
    if required:
        raise ConfigError(f"{name} lacks {required}")
    hints = typing.get_type_hints(cls)
    return {k: v if k in SECTIONS else typed_value(v, hints[k], f"{name}.{k}") for k, v in data.items()}


def typed_value(value: Any, hint: Any, where: str) -> Any:
    """A JSON value as a field of type `hint` (lists become tuples, integers stand for floats); ConfigError,
    naming `where`, if it is not one: a string "128" or a bool is not an int."""
    def fits(v: Any, kind: type) -> bool:
        return isinstance(v, (int, float) if kind is float else kind) and (kind is bool or not isinstance(v, bool))

    if typing.get_origin(hint) is tuple:
        kind, *rest = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and all(fits(v, kind) for v in value) and (
                rest == [Ellipsis] or len(value) == len(rest) + 1):
            return tuple(float(v) if kind is float else v for v in value)
        count = "" if rest == [Ellipsis] else f"{len(rest) + 1} "
        wanted = f"a list of {count}{ {float: 'numbers', int: 'integers', str: 'strings'}[kind]}"
    elif fits(value, hint):
        return float(value) if hint is float else value
    else:
        wanted = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
    raise ConfigError(f"{where} must be {wanted}, got {_shown(value)}")


def _shown(value: Any) -> str:
    """A value as an error line quotes it: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _parse_value(raw: str, hint: Any, item: str) -> Any:
    try:
        if hint is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            number = float(raw)  # accepts 8e5 as well as 800000
            if not number.is_integer():
                raise ValueError(raw)
            return int(number)
        if hint is float:
            return float(raw)
        if hint is str:
            return raw
        if typing.get_origin(hint) is tuple:
            element = typing.get_args(hint)[0]
            parts = [p for p in raw.strip("()[] ").split(",") if p.strip()]
            return tuple(element(p.strip()) for p in parts)
    except ValueError:
        raise ConfigError(f"override {item!r}: {raw!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    raise ConfigError(f"override {item!r}: fields of type {hint} cannot be overridden")
