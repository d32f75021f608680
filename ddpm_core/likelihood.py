"""Gaussian KLs and the discretised Gaussian decoder of the variational bound (paper Eq. 5, 13)."""

from __future__ import annotations

import math

import torch

# Data lie on 256 levels scaled to [-1, 1]: bins are 2/255 wide, so their half-width is 1/255.
BIN_HALF_WIDTH = 1.0 / 255.0


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log p(x) of Eq. 13: a Gaussian integrated over x's bin, the edge bins taking the tails to ±∞.

    `x` holds 8-bit images scaled to [-1, 1]. Computed in float64 with the exact normal CDF (the
    official code uses a tanh approximation of it); elementwise, in nats.
    """
    x, mean, log_scale = (v.to(torch.float64) for v in (x, mean, log_scale))
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - BIN_HALF_WIDTH)
    log_cdf_upper = torch.special.log_ndtr(upper)  # the bottom bin: (-inf, x + 1/255]
    log_survival_lower = torch.special.log_ndtr(-lower)  # the top bin: [x - 1/255, +inf)
    bin_mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_survival_lower, torch.log(bin_mass.clamp(min=1e-300))),
    )


def mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean over every dimension but the batch (the official `meanflat`)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def nats_to_bits_per_dim(nats_per_dim: torch.Tensor) -> torch.Tensor:
    return nats_per_dim / math.log(2.0)
