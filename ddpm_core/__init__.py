"""ddpm_core: the DDPM model and mathematics (Ho, Jain, Abbeel 2020), usable without Ray or MLflow."""

from .config import Config, ConfigError, DiffusionConfig, ModelConfig, TrainConfig
from .diffusion import GaussianDiffusion
from .ema import EMA
from .presets import PRESETS, get_preset
from .unet import UNet

__all__ = [
    "Config", "ConfigError", "DiffusionConfig", "ModelConfig", "TrainConfig",
    "GaussianDiffusion", "EMA", "PRESETS", "get_preset", "UNet",
]
