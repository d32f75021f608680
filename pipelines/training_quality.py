"""Quality during training (`train.fid_every`): a cheap Fréchet distance of the EMA model, on rank 0.

Every `train.fid_every` steps rank 0 samples `train.fid_num` images with TRAINING_SAMPLER (the same seeds each
time, so the curve moves only with the model) and scores them against the dataset's reference statistics
with the network those were made with: the FID network (a `spec_fid`, never the paper's FID at this N) or
the random-init one (`pseudo_fid`, development only). The metric's name says which, and the sampler and N,
e.g. `train/pseudo_fid_dpmpp_2m10_n256`: MLflow then shows a quality-vs-step curve beside the loss.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.errors import UserError
from ddpm_core.fid import frechet_distance, image_statistics, load_reference
from ddpm_core.inception import feature_dim, feature_network
from ddpm_core.pixels import to_uint8
from ddpm_core.reference_provenance import REFERENCE_NAMES, recorded_features
from ddpm_core.sampling import sample_images
from ddpm_core.storage import open_storage, read_uri
from pipelines.evaluation import SamplerSetting, fd_label, score_prefix

log = logging.getLogger("ddpm.train")
# Cheap on purpose: 10 solver steps, and train.fid_num images (256 by default). A small N biases a Fréchet
# distance upwards (the covariance of 256 samples is far from full rank), so the curve is for comparing
# the steps of one run, never for setting beside an evaluation's score.
TRAINING_SAMPLER = SamplerSetting("dpmpp_2m", 10, "trailing")
SAMPLE_BATCH = 64


class QualityReferenceError(UserError):
    """train.fid_every without reference statistics to score against."""


def find_reference(data_uri: str, flag: str | None) -> str:
    """--fid-ref if given, else the dataset's own statistics (`ddpm fid-ref --data`): the FID network's first."""
    if flag:
        return flag
    storage = open_storage(data_uri)
    for name in REFERENCE_NAMES.values():
        if storage.exists(name):
            return storage.url(name)
    raise QualityReferenceError(f"train.fid_every needs reference statistics: {data_uri} has none of "
                                f"{', '.join(REFERENCE_NAMES.values())}; run `ddpm fid-ref --data {data_uri}` first, "
                                "or give --fid-ref")


def metric_name(features: str, num: int) -> str:
    """e.g. `train/pseudo_fid_dpmpp_2m10_n256`: the score's kind, sampler, steps and N."""
    label = fd_label(score_prefix(features, paper_protocol=False))
    return f"train/{label}_{TRAINING_SAMPLER.sampler}{TRAINING_SAMPLER.steps}_n{num}"


class QualityProbe:
    """Rank 0's scorer: the reference and its feature network, loaded once; a call scores an EMA model."""

    def __init__(self, reference_uri: str, config, device: torch.device, weights: str | None = None):
        data = read_uri(reference_uri)
        self.features = recorded_features(data)
        self.reference = load_reference(data, reference_uri, feature_dim(self.features))
        self.num = config.train.fid_num
        self.name = metric_name(self.features, self.num)
        network, _ = feature_network(self.features, weights)
        self.network, self.config, self.device = network.to(device), config, device
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        start = time.monotonic()
        setting = TRAINING_SAMPLER
        images = np.concatenate([
            to_uint8(sample_images(model, self.diffusion, self.config, range(first, min(first + SAMPLE_BATCH,
                                                                                          self.num)),
                                   seed=0, sampler=setting.sampler, steps=setting.steps, device=self.device,
                                   spacing=setting.spacing))
            for first in range(0, self.num, SAMPLE_BATCH)])
        features, _ = image_statistics(self.network, images, np.arange(self.num), device=str(self.device))
        score = frechet_distance(*features.mean_cov(), *self.reference)
        log.info("step %d: %s %.2f (%.0f s)", step, self.name, score, time.monotonic() - start)
        return {self.name: score}
