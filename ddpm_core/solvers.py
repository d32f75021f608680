"""Multistep ODE solvers for the probability-flow ODE of an ε-prediction, discrete-time linear-β model.

Both integrate dx/dλ exactly in its linear part and approximate the data prediction x̂0 (Eq. 15 of
the DDPM paper, optionally clipped to [-1, 1]) by a polynomial in λ = log(α/σ), with α = √ᾱ_t and
σ = √(1 - ᾱ_t); one network evaluation per step. They step over `spaced_timesteps` (largest first)
and end with a step to x_0 (σ = 0), which returns the last x̂0. Given x_T they are deterministic.

- DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): second order from two x̂0, first order
  at the first step and at the last one (the lower-order final step of diffusers' `lower_order_final`).
- UniPC-2 with B(h) = e^h - 1 (Zhao et al. 2023, "UniPC", Alg. 1 and 2, "bh2"): the same predictor,
  then the corrector UniC, which refines x_t with the x̂0 the network just gave at x_t, at no extra
  evaluation. Orders are lowered at the first step and the last one, as diffusers does.

They match diffusers' DPMSolverMultistepScheduler (algorithm_type "dpmsolver++", solver_order 2,
solver_type "midpoint") and UniPCMultistepScheduler (solver_order 2, "bh2", predict_x0) step for
step; x̂0 clipping is their `thresholding` with `sample_max_value` 1 (tests/test_solvers.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from .diffusion import Denoiser, GaussianDiffusion, ReverseStep


def _alpha_sigma_lambda(diffusion: GaussianDiffusion, step: int) -> tuple[float, float, float]:
    """α_t = √ᾱ_t, σ_t = √(1 - ᾱ_t) and the log-SNR λ_t = log(α_t/σ_t), in float64."""
    abar = float(diffusion.alphas_cumprod[step])
    alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
    return alpha, sigma, math.log(alpha) - math.log(sigma)


def _data_prediction(diffusion: GaussianDiffusion, model: Denoiser, x: torch.Tensor, step: int,
                     clip: bool) -> torch.Tensor:
    """x̂0 = (x_t - σ_t ε_θ(x_t, t)) / α_t (Eq. 15), clipped to [-1, 1] if `clip`."""
    t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
    pred_x0 = diffusion.predict_x0_from_eps(x, t, model(x, t).float())
    return pred_x0.clamp(-1.0, 1.0) if clip else pred_x0


def _start(diffusion: GaussianDiffusion, shape: Sequence[int], steps: int, spacing: str,
           timesteps: Sequence[int] | None, generators: Sequence[torch.Generator] | None,
           device: torch.device | str, clip_denoised: bool | None) -> tuple[list[int], torch.Tensor, bool]:
    """The timesteps (largest first), x_T ~ N(0, I) and whether x̂0 is clipped."""
    kept = diffusion.sampling_timesteps(steps, spacing, timesteps)[::-1]
    x = diffusion._randn(shape, generators, torch.device(device))
    return kept, x, diffusion.clip_denoised if clip_denoised is None else clip_denoised


@torch.no_grad()
def dpm_solver_pp_2m(diffusion: GaussianDiffusion, model: Denoiser, shape: Sequence[int], steps: int = 20,
                     spacing: str = "linspace", timesteps: Sequence[int] | None = None,
                     generators: Sequence[torch.Generator] | None = None, device: torch.device | str = "cpu",
                     clip_denoised: bool | None = None) -> Iterator[ReverseStep]:
    """DPM-Solver++(2M), yielding x_s and x̂0 after every step; the last sample is x_0.

    From s to t with h = λ_t - λ_s: x_t = (σ_t/σ_s) x_s - α_t (e^{-h} - 1) D, where D = x̂0_s at
    first order and D = x̂0_s + (x̂0_s - x̂0_u) h / (2 (λ_s - λ_u)) at second order, u being the
    step before s (Lu et al. 2022, Eq. 8 and the multistep form of Alg. 2, "midpoint").
    """
    kept, x, clip = _start(diffusion, shape, steps, spacing, timesteps, generators, device, clip_denoised)
    previous: tuple[torch.Tensor, float] | None = None  # (x̂0_u, λ_u)
    for i, step in enumerate(kept):
        pred_x0 = _data_prediction(diffusion, model, x, step, clip)
        if i == len(kept) - 1:
            x = pred_x0  # σ_0 = 0: e^{-h} = 0 and the first-order step lands on x̂0
        else:
            _, sigma_s, lambda_s = _alpha_sigma_lambda(diffusion, step)
            alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(diffusion, kept[i + 1])
            h = lambda_t - lambda_s
            d = pred_x0
            if previous is not None:
                d = pred_x0 + (pred_x0 - previous[0]) * (0.5 * h / (lambda_s - previous[1]))
            x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d
            previous = (pred_x0, lambda_s)
        yield ReverseStep(step, x, pred_x0)


def _unipc_rho(h: float, r: float | None) -> tuple[float, float]:
    """UniC's weights (ρ_1, ρ_t) for B(h) = e^h - 1 with x̂0 (hh = -h): ρ_t = 1/2 at order 1; at
    order 2 the solution of [[1, 1], [r, 1]] ρ = (φ_2/B, 2 φ_3/B) (Zhao et al. 2023, Eq. 13)."""
    hh = -h
    phi_1 = math.expm1(hh)
    if r is None:
        return 0.0, 0.5
    b_1 = (phi_1 / hh - 1.0) / phi_1
    b_2 = 2.0 * ((phi_1 / hh - 1.0) / hh - 0.5) / phi_1
    rho_1 = (b_1 - b_2) / (1.0 - r)
    return rho_1, b_1 - rho_1


@torch.no_grad()
def unipc(diffusion: GaussianDiffusion, model: Denoiser, shape: Sequence[int], steps: int = 20,
          spacing: str = "linspace", timesteps: Sequence[int] | None = None,
          generators: Sequence[torch.Generator] | None = None, device: torch.device | str = "cpu",
          clip_denoised: bool | None = None) -> Iterator[ReverseStep]:
    """UniPC-2 ("bh2", data prediction), yielding the predicted next x and x̂0 after every step.

    Predictor UniP-2, from s to t with h = λ_t - λ_s and B = e^{-h} - 1:
    x_t = (σ_t/σ_s) x_s - α_t B x̂0_s - α_t B (x̂0_u - x̂0_s) / (2 r), r = (λ_u - λ_s)/h.
    Corrector UniC, once x̂0_t = x̂0(x_t) is known: x_t ← (σ_t/σ_s) x_s - α_t B x̂0_s
    - α_t B (ρ_1 (x̂0_u - x̂0_s)/r + ρ_t (x̂0_t - x̂0_s)), with the order the predictor used.
    The network is evaluated at the predicted x_t; the corrected x_t carries on.
    """
    kept, x, clip = _start(diffusion, shape, steps, spacing, timesteps, generators, device, clip_denoised)
    history: list[tuple[torch.Tensor, float]] = []  # (x̂0, λ) of the steps so far, oldest first
    last: tuple[torch.Tensor, float, float, int] | None = None  # x_s (corrected), σ_s, λ_s, predictor order
    for i, step in enumerate(kept):
        pred_x0 = _data_prediction(diffusion, model, x, step, clip)
        if i == len(kept) - 1:
            yield ReverseStep(step, pred_x0, pred_x0)  # σ_0 = 0: the step lands on x̂0, the correction is void
            return
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(diffusion, step)
        if last is not None:
            x_s, sigma_s, lambda_s, order = last
            h = lambda_t - lambda_s
            m_s = history[-1][0]
            r = (history[-2][1] - lambda_s) / h if order == 2 else None
            rho_1, rho_t = _unipc_rho(h, r)
            correction = rho_t * (pred_x0 - m_s)
            if r is not None:
                correction = correction + (rho_1 / r) * (history[-2][0] - m_s)
            b = math.expm1(-h)
            x = (sigma_t / sigma_s) * x_s - (alpha_t * b) * m_s - (alpha_t * b) * correction
        history = (history + [(pred_x0, lambda_t)])[-2:]
        order = min(2, len(kept) - i, len(history))
        alpha_n, sigma_n, lambda_n = _alpha_sigma_lambda(diffusion, kept[i + 1])
        h = lambda_n - lambda_t
        b = math.expm1(-h)
        last = (x, sigma_t, lambda_t, order)
        prediction = (sigma_n / sigma_t) * x - (alpha_n * b) * pred_x0
        if order == 2:
            r = (history[-2][1] - lambda_t) / h
            prediction = prediction - (alpha_n * b * 0.5 / r) * (history[-2][0] - pred_x0)
        x = prediction
        yield ReverseStep(step, x, pred_x0)
