"""ddpm_core: the DDPM model and mathematics (Ho, Jain, Abbeel 2020), usable without Ray or MLflow.

It never imports ray, mlflow or pipelines (tests/test_layers.py): a notebook trains (training.TrainingLoop)
and samples with it alone. Every error a user can fix subclasses errors.UserError.
"""

from .config import Config, ConfigError, DiffusionConfig, ModelConfig, TrainConfig
from .diffusion import GaussianDiffusion
from .ema import EMA
from .errors import UserError
from .presets import PRESETS, get_preset
from .unet import UNet

__all__ = [
    "Config", "ConfigError", "DiffusionConfig", "ModelConfig", "TrainConfig",
    "GaussianDiffusion", "EMA", "PRESETS", "get_preset", "UNet", "UserError",
]
