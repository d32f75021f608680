"""Gaussian diffusion (paper §2–4): forward process, ε-parameterised reverse process, L_simple,
the variational bound in bits/dim, and the samplers (ancestral, progressive, interpolation, DDIM) with
the step-time spacings every few-step sampler shares (the multistep ODE solvers are in `solvers.py`).

Every coefficient is precomputed once in float64 and gathered per timestep as float32, as the
official `GaussianDiffusion2`. Timesteps are 0-based: code's t = 0 is the paper's t = 1.
`model(x_t, t)` is any callable returning ε_θ(x_t, t) (a `UNet`, or an exact oracle in tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .config import DiffusionConfig
from .likelihood import discretized_gaussian_log_likelihood, mean_over_pixels, nats_to_bits_per_dim, normal_kl
from .rng import randn_per_image

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A progress wrapper such as tqdm: progress(iterable, total=n) yields the iterable's items.
Progress = Callable[..., Iterator]
SPACINGS = ("linspace", "leading", "trailing", "quadratic")


def linear_beta_schedule(timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """β_1..β_T rising linearly (App. B: 1e-4 to 0.02, T = 1000), in float64."""
    return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)


def spaced_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """The `steps` increasing timesteps in 0..T-1 at which a few-step sampler evaluates the network.

    Every sampler then steps from the largest to the smallest and, from there, to x_0 (ᾱ = 1).
    - linspace: 0 and T-1 and evenly between, rounded; one step is [T-1]. DDIM's timesteps before
      spacings were an option, and diffusers' DDIMScheduler "linspace".
    - leading: 0, k, 2k, … with k = T // steps: DDIM's "uniform" and diffusers' default ("leading",
      steps_offset 0). Never reaches T-1.
    - trailing: T-1, T-1-T/steps, … rounded (Lin et al. 2024, Table 2): starts at T-1.
    - quadratic: ⌊(i √(0.8 T) / (steps-1))²⌋, DDIM's choice for CIFAR-10 (Song et al. 2021, App. D.2).
      Where the formula repeats a timestep (small t, many steps) the next integer is taken, so every
      step evaluates the network at a new t.
    diffusers' multistep solvers define "linspace" and "leading" over steps+1 points without t = 0;
    these definitions are one for every sampler, and diffusers takes them as `timesteps=`.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing {spacing!r} is unknown; choose one of {', '.join(SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_timesteps}, got {steps}")
    if spacing == "linspace":
        if steps == 1:
            return [num_timesteps - 1]
        return [int(round(s)) for s in np.linspace(0, num_timesteps - 1, steps)]
    if spacing == "leading":
        return [i * (num_timesteps // steps) for i in range(steps)]
    if spacing == "trailing":
        return sorted(int(round(num_timesteps - i * num_timesteps / steps)) - 1 for i in range(steps))
    kept: list[int] = []
    for s in np.linspace(0, math.sqrt(0.8 * num_timesteps), steps) ** 2:
        kept.append(max(int(s), kept[-1] + 1) if kept else int(s))
    return kept


def final_sample(chain: Iterator[ReverseStep], total: int, progress: Progress | None = None) -> torch.Tensor:
    """Run a reverse chain to its end and return its last sample, x_0."""
    for step in progress(chain, total=total) if progress else chain:
        pass
    return step.sample


@dataclass
class ReverseStep:
    """One step of a reverse chain: the timestep t just denoised, x_{t-1}, and x̂0 (Eq. 15)."""

    t: int
    sample: torch.Tensor
    pred_x0: torch.Tensor


class GaussianDiffusion:
    """The diffusion of a `DiffusionConfig`: q(x_t|x_0), q(x_{t-1}|x_t,x_0), p_θ, losses, samplers."""

    def __init__(self, betas: np.ndarray, variance: str = "fixedlarge", clip_denoised: bool = True):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D array with every value in (0, 1)")
        self.num_timesteps = len(betas)
        self.variance = variance
        self.clip_denoised = clip_denoised

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Eq. 4: q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)
        # Eq. 6-7: q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I)
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # β̃ at the first step is 0; its log takes β̃ of the second step, as the official code.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod)
        # §3.2: σ_t² = β_t ("fixedlarge") or β̃_t ("fixedsmall").
        if variance == "fixedlarge":
            self.model_log_variance = np.log(np.append(self.posterior_variance[1], betas[1:]))
        elif variance == "fixedsmall":
            self.model_log_variance = self.posterior_log_variance_clipped
        else:
            raise ValueError(f"variance {variance!r} is unknown; choose fixedlarge or fixedsmall")
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> GaussianDiffusion:
        betas = linear_beta_schedule(config.timesteps, config.beta_start, config.beta_end)
        return cls(betas, variance=config.variance, clip_denoised=config.clip_denoised)

    # -- helpers --------------------------------------------------------------------------------

    def _gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """table[t] as float32 on t's device, shaped to broadcast over images of `ndim` dims."""
        key = (name, t.device)
        table = self._device_tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(device=t.device, dtype=torch.float32)
            self._device_tables[key] = table
        return table[t].reshape(-1, *([1] * (ndim - 1)))

    def check_timesteps(self, t: torch.Tensor) -> None:
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        low, high = int(t.min()), int(t.max())
        if low < 0 or high >= self.num_timesteps:
            raise ValueError(f"timestep out of range: got values in [{low}, {high}], "
                             f"expected 0..{self.num_timesteps - 1}")

    def sampling_timesteps(self, steps: int, spacing: str = "linspace",
                           timesteps: Sequence[int] | None = None) -> list[int]:
        """`timesteps` if given (checked), else `spaced_timesteps(T, steps, spacing)`."""
        if timesteps is None:
            return spaced_timesteps(self.num_timesteps, steps, spacing)
        kept = [int(t) for t in timesteps]
        if not kept or sorted(set(kept)) != kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError("sampling timesteps must be strictly increasing within "
                             f"0..{self.num_timesteps - 1}; got {kept}")
        return kept

    @staticmethod
    def check_images(x0: torch.Tensor) -> None:
        """x0 must be finite and scaled to [-1, 1] (x / 127.5 - 1)."""
        finite, low, high = torch.stack([x0.isfinite().all().float(), x0.min(), x0.max()]).tolist()
        if not finite:
            raise ValueError("images contain NaN or infinite values")
        if low < -1.0 - 1e-3 or high > 1.0 + 1e-3:
            raise ValueError(f"images must be scaled to [-1, 1] (x / 127.5 - 1); got values in [{low:.4g}, {high:.4g}]")

    @staticmethod
    def _randn(shape: Sequence[int], generators: Sequence[torch.Generator] | None,
               device: torch.device) -> torch.Tensor:
        if generators is None:
            return torch.randn(tuple(shape), device=device)
        if len(generators) != shape[0]:
            raise ValueError(f"need one generator per image: {shape[0]} images, {len(generators)} generators")
        return randn_per_image(generators, shape[1:], device)

    # -- forward process and posterior ----------------------------------------------------------

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) (Eq. 4)."""
        mean = self._gather("sqrt_alphas_cumprod", t, x0.ndim) * x0
        variance = 1.0 - self._gather("alphas_cumprod", t, x0.ndim)
        return mean, variance, self._gather("log_one_minus_alphas_cumprod", t, x0.ndim)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε (Eq. 4)."""
        return (self._gather("sqrt_alphas_cumprod", t, x0.ndim) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """μ̃_t(x_t, x_0), β̃_t and log β̃_t (clipped) of q(x_{t-1} | x_t, x_0) (Eq. 6-7)."""
        mean = (self._gather("posterior_mean_coef1", t, x_t.ndim) * x0
                + self._gather("posterior_mean_coef2", t, x_t.ndim) * x_t)
        return (mean, self._gather("posterior_variance", t, x_t.ndim),
                self._gather("posterior_log_variance_clipped", t, x_t.ndim))

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x̂0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t (Eq. 15)."""
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t
                - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim) * eps)

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The ε for which x_t = √ᾱ_t x0 + √(1 - ᾱ_t) ε (Eq. 4 solved for ε)."""
        return ((self._gather("sqrt_recip_alphas_cumprod", t, x_t.ndim) * x_t - x0)
                / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t.ndim))

    # -- reverse process ------------------------------------------------------------------------

    def p_mean_variance(self, model: Denoiser, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool | None = None
                        ) -> dict[str, torch.Tensor]:
        """p_θ(x_{t-1} | x_t) with the ε-parameterised mean of Eq. 11.

        The mean is computed as μ̃_t(x_t, x̂0) with x̂0 from Eq. 15, which equals Eq. 11 exactly and
        lets x̂0 be clipped to [-1, 1] first, as the official sampler does.
        """
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        eps = model(x_t, t).float()
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        log_variance = self._gather("model_log_variance", t, x_t.ndim)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def training_loss(self, model: Denoiser, x0: torch.Tensor, t: torch.Tensor | None = None,
                      noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """L_simple (Eq. 14): ‖ε - ε_θ(√ᾱ_t x0 + √(1-ᾱ_t) ε, t)‖², mean over pixels, one value per image.

        t is uniform on {0..T-1} and ε standard normal unless given.
        """
        self.check_images(x0)
        if t is None:
            t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=x0.device, generator=generator)
        else:
            self.check_timesteps(t)
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        eps = model(self.q_sample(x0, t, noise), t)
        return mean_over_pixels((noise - eps.float()) ** 2)

    # -- variational bound ----------------------------------------------------------------------

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, per image (Eq. 5)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))
        return nats_to_bits_per_dim(mean_over_pixels(kl))

    def vb_term_bpd(self, model: Denoiser, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One term of Eq. 5 in bits/dim, per image, and x̂0.

        For t > 0, L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)); at t = 0,
        L_0 = -log p_θ(x_0 | x_1), the discretised Gaussian decoder of Eq. 13.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model, x_t, t)
        kl = mean_over_pixels(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        decoder_nll = -mean_over_pixels(
            discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        ).to(kl.dtype)
        return nats_to_bits_per_dim(torch.where(t == 0, decoder_nll, kl)), out["pred_x0"]

    @torch.no_grad()
    def calc_bpd_loop(self, model: Denoiser, x0: torch.Tensor, generators: Sequence[torch.Generator] | None = None,
                      progress: Progress | None = None) -> dict[str, torch.Tensor]:
        """The full variational bound (Eq. 5) in bits/dim: Table 1's NLL. T network evaluations per image.

        Returns per image `total_bpd`, `prior_bpd`, and per image and timestep `vb` (bits/dim),
        `xstart_mse` and `mse` (of ε).
        """
        self.check_images(x0)
        batch, steps = x0.shape[0], range(self.num_timesteps - 1, -1, -1)
        vb, xstart_mse, mse = (torch.zeros(batch, self.num_timesteps, device=x0.device) for _ in range(3))
        for step in progress(steps, total=self.num_timesteps) if progress else steps:
            t = torch.full((batch,), step, device=x0.device, dtype=torch.long)
            noise = self._randn(x0.shape, generators, x0.device)
            x_t = self.q_sample(x0, t, noise)
            vb[:, step], pred_x0 = self.vb_term_bpd(model, x0, x_t, t)
            xstart_mse[:, step] = mean_over_pixels((pred_x0 - x0) ** 2)
            mse[:, step] = mean_over_pixels((self.eps_from_x0(x_t, t, pred_x0) - noise) ** 2)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse, "mse": mse}

    # -- samplers -------------------------------------------------------------------------------

    @torch.no_grad()
    def p_sample_loop_progressive(self, model: Denoiser, shape: Sequence[int],
                                  generators: Sequence[torch.Generator] | None = None,
                                  device: torch.device | str = "cpu", x_t: torch.Tensor | None = None,
                                  start_t: int | None = None, clip_denoised: bool | None = None
                                  ) -> Iterator[ReverseStep]:
        """Algorithm 2, yielding x_{t-1} and x̂0 after every step (progressive generation, Fig. 6).

        Starts from x_T ~ N(0, I), or from `x_t` at step `start_t`. No noise is added at t = 0.
        `clip_denoised` (default: the configuration's) clips x̂0 to [-1, 1] before the mean is formed.
        """
        device = torch.device(device)
        start = self.num_timesteps - 1 if start_t is None else start_t
        if not 0 <= start < self.num_timesteps:
            raise ValueError(f"start_t out of range: got {start}, expected 0..{self.num_timesteps - 1}")
        x = self._randn(shape, generators, device) if x_t is None else x_t.to(device)
        for step in range(start, -1, -1):
            t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
            out = self.p_mean_variance(model, x, t, clip_denoised)
            x = out["mean"]
            if step > 0:
                x = x + torch.exp(0.5 * out["log_variance"]) * self._randn(x.shape, generators, device)
            yield ReverseStep(step, x, out["pred_x0"])

    def p_sample_loop(self, model: Denoiser, shape: Sequence[int], generators: Sequence[torch.Generator] | None = None,
                      device: torch.device | str = "cpu", progress: Progress | None = None,
                      clip_denoised: bool | None = None) -> torch.Tensor:
        """Ancestral sampling (Algorithm 2) with the configured σ_t²; returns x_0 in [-1, 1]."""
        chain = self.p_sample_loop_progressive(model, shape, generators, device, clip_denoised=clip_denoised)
        return final_sample(chain, self.num_timesteps, progress)

    @torch.no_grad()
    def interpolate(self, model: Denoiser, x_a: torch.Tensor, x_b: torch.Tensor, t: int, lambdas: Sequence[float],
                    seed: int, device: torch.device | str = "cpu", progress: Progress | None = None) -> torch.Tensor:
        """§4.4, Fig. 8: diffuse two images to step t, mix the latents (1-λ)x_t + λx'_t, and decode.

        Every λ shares the same reverse-chain noise (one generator per λ, all seeded with `seed`),
        so the row varies only through λ. Returns one image per λ.
        """
        if x_a.shape != x_b.shape or x_a.ndim != 3:
            raise ValueError("interpolate takes two images of the same shape (C, H, W); "
                             f"got {tuple(x_a.shape)}, {tuple(x_b.shape)}")
        pair = torch.stack([x_a, x_b]).to(device)
        self.check_images(pair)
        steps = torch.full((2,), t, device=device, dtype=torch.long)
        self.check_timesteps(steps)
        encoder = torch.Generator(device=device).manual_seed(seed)
        latents = self.q_sample(pair, steps, torch.randn(pair.shape, generator=encoder, device=device))
        lam = torch.tensor(list(lambdas), device=device, dtype=torch.float32).reshape(-1, 1, 1, 1)
        mixed = (1.0 - lam) * latents[0] + lam * latents[1]
        generators = [torch.Generator(device=device).manual_seed(seed + 1) for _ in lambdas]
        chain = self.p_sample_loop_progressive(model, mixed.shape, generators, device, x_t=mixed, start_t=t)
        return final_sample(chain, t + 1, progress)

    @torch.no_grad()
    def ddim_sample_loop_progressive(self, model: Denoiser, shape: Sequence[int], steps: int = 50, eta: float = 0.0,
                                     timesteps: Sequence[int] | None = None,
                                     generators: Sequence[torch.Generator] | None = None,
                                     device: torch.device | str = "cpu", spacing: str = "linspace",
                                     clip_denoised: bool | None = None) -> Iterator[ReverseStep]:
        """DDIM (Song et al. 2021, Eq. 12) over an increasing subset of timesteps, with stochasticity η.

        The timesteps are `timesteps`, else `steps` of `spacing` (`spaced_timesteps`). σ = η √((1-ᾱ_s)/
        (1-ᾱ_t)) √(1-ᾱ_t/ᾱ_s) from step t to the previous kept step s (ᾱ = 1 after the last). With η = 1
        and every step this is the ancestral sampler with σ² = β̃ ("fixedsmall"); with η = 0 it is
        deterministic given x_T. When x̂0 is clipped (`clip_denoised`, default: the configuration's),
        ε is recomputed from the clipped x̂0.
        """
        device = torch.device(device)
        kept = self.sampling_timesteps(steps, spacing, timesteps)
        clip = self.clip_denoised if clip_denoised is None else clip_denoised
        if eta < 0:
            raise ValueError(f"DDIM eta must be >= 0, got {eta}")
        x = self._randn(shape, generators, device)
        for i in range(len(kept) - 1, -1, -1):
            step, prev = kept[i], (kept[i - 1] if i > 0 else -1)
            t = torch.full((x.shape[0],), step, device=device, dtype=torch.long)
            eps = model(x, t).float()
            pred_x0 = self.predict_x0_from_eps(x, t, eps)
            if clip:
                pred_x0 = pred_x0.clamp(-1.0, 1.0)
                eps = self.eps_from_x0(x, t, pred_x0)
            abar_t = float(self.alphas_cumprod[step])
            abar_s = float(self.alphas_cumprod[prev]) if prev >= 0 else 1.0
            sigma = eta * math.sqrt((1.0 - abar_s) / (1.0 - abar_t) * (1.0 - abar_t / abar_s))
            x = math.sqrt(abar_s) * pred_x0 + math.sqrt(max(1.0 - abar_s - sigma**2, 0.0)) * eps
            if prev >= 0 and sigma > 0:
                x = x + sigma * self._randn(x.shape, generators, device)
            yield ReverseStep(step, x, pred_x0)

    def ddim_sample_loop(self, model: Denoiser, shape: Sequence[int], steps: int = 50, eta: float = 0.0,
                         timesteps: Sequence[int] | None = None, generators: Sequence[torch.Generator] | None = None,
                         device: torch.device | str = "cpu", progress: Progress | None = None,
                         spacing: str = "linspace", clip_denoised: bool | None = None) -> torch.Tensor:
        """DDIM sampling; returns x_0 in [-1, 1]."""
        chain = self.ddim_sample_loop_progressive(model, shape, steps, eta, timesteps, generators, device, spacing,
                                                  clip_denoised)
        return final_sample(chain, len(timesteps) if timesteps else steps, progress)
