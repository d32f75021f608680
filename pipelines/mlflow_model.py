"""The registered model: an MLflow pyfunc that samples images from a DDPM's EMA weights.

Logged as "models from code": MLflow stores this file and the safetensors weights, and loading
runs this file; nothing is pickled. Input: a column `index` of image indices; params: `seed`,
`sampler` (ddpm | ddim), `steps`, `eta`. Output: uint8 images (N, H, W, 3). Image i depends only
on (seed, i), as every sample of the project.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from ddpm_core.checkpoint import load_ema_unet
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.pixels import to_uint8
from ddpm_core.sampling import sample_images


class DDPMSampler(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.model, self.config = load_ema_unet(Path(context.artifacts["model"]))
        self.diffusion = GaussianDiffusion.from_config(self.config.diffusion)

    def sample(self, indices: list[int], seed: int = 0, sampler: str = "ddim", steps: int = 50,
               eta: float = 0.0, device: str = "cpu") -> torch.Tensor:
        """Images in [-1, 1] for the given indices."""
        return sample_images(self.model.to(device), self.diffusion, self.config, indices, seed, sampler, steps, eta,
                             device)

    def predict(self, context, model_input, params: dict | None = None) -> np.ndarray:
        params = params or {}
        indices = [int(i) for i in model_input["index"]]
        images = self.sample(indices, int(params.get("seed", 0)), str(params.get("sampler", "ddim")),
                             int(params.get("steps", 50)), float(params.get("eta", 0.0)))
        return to_uint8(images)


mlflow.models.set_model(DDPMSampler())
