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
    official code uses a tanh approximation of it and floors the mass at 1e-12); elementwise, in nats.
    An interior bin's mass Φ(b) − Φ(a) is taken in log space, log Φ(b) + log(1 − Φ(a)/Φ(b)), on the
    side of the mean where both CDFs are small (bins above the mean are mirrored: Φ(−a) − Φ(−b)), so a
    bin 40σ from the mean still gets its true log-mass instead of log 0.
    """
    x, mean, log_scale = (v.to(torch.float64) for v in (x, mean, log_scale))
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (x - mean + BIN_HALF_WIDTH)
    lower = inv_std * (x - mean - BIN_HALF_WIDTH)
    above = x > mean
    log_cdf_high = torch.special.log_ndtr(torch.where(above, -lower, upper))
    log_cdf_low = torch.special.log_ndtr(torch.where(above, -upper, lower))
    log_bin_mass = log_cdf_high + _log1mexp(log_cdf_high - log_cdf_low)
    return torch.where(
        x < -0.999,
        torch.special.log_ndtr(upper),  # the bottom bin: (-inf, x + 1/255]
        torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_bin_mass),  # the top bin: [x - 1/255, +inf)
    )


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 − e^−d) for d ≥ 0, accurate at both ends (Mächler 2012: expm1 below ln 2, log1p above)."""
    return torch.where(d < math.log(2.0), torch.log(-torch.expm1(-d)), torch.log1p(-torch.exp(-d)))


def mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean over every dimension but the batch (the official `meanflat`)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def nats_to_bits_per_dim(nats_per_dim: torch.Tensor) -> torch.Tensor:
    return nats_per_dim / math.log(2.0)
