import math

import numpy as np
import pytest
import torch

from ddpm_core.config import DiffusionConfig
from ddpm_core.diffusion import GaussianDiffusion, linear_beta_schedule
from ddpm_core.likelihood import discretized_gaussian_log_likelihood
from ddpm_core.presets import get_preset
from ddpm_core.rng import image_generators
from ddpm_core.unet import UNet

LARGE = GaussianDiffusion.from_config(DiffusionConfig(variance="fixedlarge"))
SMALL = GaussianDiffusion.from_config(DiffusionConfig(variance="fixedsmall"))


def gaussian_data_denoiser(diffusion, mean, std):
    """The exact E[ε | x_t] when every pixel of x0 is N(mean, std²): the optimal ε_θ."""
    abar = torch.from_numpy(diffusion.alphas_cumprod)

    def model(x_t, t):
        a = abar[t].to(x_t.dtype).sqrt().reshape(-1, *([1] * (x_t.ndim - 1)))
        b = (1 - abar[t]).to(x_t.dtype).sqrt().reshape(a.shape)
        return b * (x_t - a * mean) / (a**2 * std**2 + b**2)

    return model


def quantised_images(n, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 127.5 - 1.0


def test_schedule_is_the_papers_linear_one_in_float64():
    assert LARGE.betas.dtype == np.float64
    assert LARGE.num_timesteps == 1000
    assert LARGE.betas[0] == 1e-4 and LARGE.betas[-1] == 0.02
    assert np.allclose(np.diff(LARGE.betas), (0.02 - 1e-4) / 999)
    assert np.allclose(LARGE.alphas_cumprod, np.cumprod(1 - linear_beta_schedule(1000, 1e-4, 0.02)), rtol=0)


def test_closed_form_q_matches_iterating_the_forward_chain():
    torch.manual_seed(0)
    x0 = torch.tensor([-0.8, 0.0, 0.5], dtype=torch.float64).repeat(40_000)
    x = x0.clone()
    checkpoints = {0, 9, 99, 499, 999}
    for step in range(1000):
        beta = LARGE.betas[step]
        x = math.sqrt(1 - beta) * x + math.sqrt(beta) * torch.randn_like(x)
        if step in checkpoints:
            t = torch.full((x.numel(),), step)
            mean, variance, _ = LARGE.q_mean_variance(x0.float().reshape(-1, 1), t)
            for k in range(3):
                samples = x[k::3]
                closed_mean, closed_var = mean[k].item(), variance[0].item()
                tolerance = 5 * math.sqrt(closed_var / samples.numel())
                assert samples.mean().item() == pytest.approx(closed_mean, abs=tolerance)
                assert samples.var().item() == pytest.approx(closed_var, rel=0.05)


@pytest.mark.parametrize("step", [1, 10, 300, 999])
def test_posterior_agrees_with_bayes_rule_computed_numerically(step):
    x0, x_t = 0.3, 0.1
    t = torch.tensor([step])
    mean, variance, log_variance = LARGE.q_posterior_mean_variance(torch.tensor([[x0]]), torch.tensor([[x_t]]), t)
    mean, variance = mean.item(), variance.item()
    # q(x_{t-1} | x_t, x0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x0), evaluated on a fine grid.
    abar_prev, beta = LARGE.alphas_cumprod[step - 1], LARGE.betas[step]
    width = 20 * math.sqrt(variance)
    grid = np.linspace(mean - width, mean + width, 200_001)
    log_density = (-0.5 * (x_t - math.sqrt(1 - beta) * grid) ** 2 / beta
                   - 0.5 * (grid - math.sqrt(abar_prev) * x0) ** 2 / (1 - abar_prev))
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    numeric_mean = (weights * grid).sum()
    numeric_var = (weights * (grid - numeric_mean) ** 2).sum()
    assert mean == pytest.approx(numeric_mean, abs=1e-4 * math.sqrt(variance) + 1e-7)
    assert variance == pytest.approx(numeric_var, rel=1e-3)
    assert log_variance.item() == pytest.approx(math.log(variance), rel=1e-4)


def test_first_step_posterior_log_variance_is_clipped_like_the_official_code():
    assert LARGE.posterior_variance[0] == 0.0
    assert LARGE.posterior_log_variance_clipped[0] == math.log(LARGE.posterior_variance[1])
    assert np.isfinite(LARGE.posterior_log_variance_clipped).all()


def test_model_variances_are_beta_and_beta_tilde():
    assert np.allclose(np.exp(LARGE.model_log_variance[1:]), LARGE.betas[1:], rtol=1e-12)
    assert np.allclose(np.exp(SMALL.model_log_variance[1:]), SMALL.posterior_variance[1:], rtol=1e-12)


def test_eps_parameterised_mean_is_eq_11_and_equals_mu_tilde_for_the_true_noise():
    x0 = quantised_images(4)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 400, 999])
    x_t = LARGE.q_sample(x0, t, noise)
    out = LARGE.p_mean_variance(lambda x, s: noise, x_t, t, clip_denoised=False)
    mu_tilde, _, _ = LARGE.q_posterior_mean_variance(x0, x_t, t)
    assert torch.allclose(out["mean"], mu_tilde, atol=2e-5)
    # Eq. 11: μ_θ = (x_t - β_t / √(1 - ᾱ_t) · ε) / √α_t
    beta = torch.tensor(LARGE.betas, dtype=torch.float32)[t].reshape(-1, 1, 1, 1)
    abar = torch.tensor(LARGE.alphas_cumprod, dtype=torch.float32)[t].reshape(-1, 1, 1, 1)
    eq11 = (x_t - beta / (1 - abar).sqrt() * noise) / (1 - beta).sqrt()
    assert torch.allclose(out["mean"], eq11, atol=2e-5)
    assert torch.allclose(out["pred_x0"], x0, atol=2e-3)


def test_l_simple_is_zero_for_the_true_noise_and_one_for_a_zero_model():
    x0 = quantised_images(6)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 5, 50, 500, 900, 999])
    assert torch.equal(LARGE.training_loss(lambda x, s: noise, x0, t, noise), torch.zeros(6))
    zero = LARGE.training_loss(lambda x, s: torch.zeros_like(x), x0, t, noise)
    assert torch.allclose(zero, noise.square().mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("mean", [-1.0, -0.37, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("scale", [0.003, 0.05, 0.4, 2.0])
def test_discretised_decoder_integrates_to_one_over_256_bins(mean, scale):
    x = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    log_p = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(scale)))
    assert torch.isfinite(log_p).all()
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def _reference_log_likelihood(x: float, mean: float, scale: float) -> float:
    """Eq. 13 in 50-digit arithmetic (mpmath), rounded to float64. A bin's mass is ½[erfc(a/√2) − erfc(b/√2)]
    above the mean and ½[erfc(−b/√2) − erfc(−a/√2)] below it (two small numbers subtracted, never two
    near 1); a mass near 1 is log1p of minus the other bins' mass."""
    import mpmath

    with mpmath.workdps(50):
        x, mean, scale = mpmath.mpf(x), mpmath.mpf(mean), mpmath.mpf(scale)
        a = (x - mpmath.mpf(1) / 255 - mean) / scale if x > -0.999 else -mpmath.inf
        b = (x + mpmath.mpf(1) / 255 - mean) / scale if x < 0.999 else mpmath.inf
        root2 = mpmath.sqrt(2)
        outside = (mpmath.erfc(-a / root2) + mpmath.erfc(b / root2)) / 2  # the mass of the other bins
        if outside < 0.5:
            return float(mpmath.log1p(-outside))
        if x > mean:
            return float(mpmath.log((mpmath.erfc(a / root2) - mpmath.erfc(b / root2)) / 2))
        return float(mpmath.log((mpmath.erfc(-b / root2) - mpmath.erfc(-a / root2)) / 2))


@pytest.mark.parametrize("scale", [0.01, 0.07, 0.5])
def test_discretised_decoder_equals_an_exact_reference_out_to_40_sigma_in_both_tails(scale):
    # Every bin of the data range at offsets of up to ±40σ from the mean: both tails, the interior and the
    # two edge bins. Φ(b) − Φ(a) is exactly 0 in float64 beyond ~8σ above the mean (log → −690.8).
    x = torch.tensor([-1.0, -0.6, 2 / 255 - 1, 0.0, 0.3, 1 - 2 / 255, 1.0], dtype=torch.float64)
    z = torch.linspace(-40, 40, 161, dtype=torch.float64)
    xs, zs = (v.flatten() for v in torch.meshgrid(x, z, indexing="ij"))
    means = xs - zs * scale
    got = discretized_gaussian_log_likelihood(xs, means, torch.full_like(xs, math.log(scale)))
    expected = torch.tensor([_reference_log_likelihood(a, m, scale) for a, m in zip(xs.tolist(), means.tolist())],
                            dtype=torch.float64)
    relative = ((got - expected).abs() / expected.abs().clamp(min=1e-300)).max().item()
    assert relative <= 1e-6, relative
    assert expected.min().item() < -700  # the far tails are really exercised, beyond the old −690.8 floor


@pytest.mark.parametrize("diffusion", [LARGE, SMALL], ids=["fixedlarge", "fixedsmall"])
def test_bound_for_the_true_noise_is_finite_with_closed_form_terms(diffusion):
    x0 = quantised_images(2, size=4)
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0  # both edge bins present

    def oracle(x_t, t):
        return diffusion.eps_from_x0(x_t, t, x0)

    result = diffusion.calc_bpd_loop(oracle, x0, generators=image_generators(0, range(2)))
    assert torch.isfinite(result["total_bpd"]).all()
    assert torch.allclose(result["total_bpd"], result["vb"].sum(1) + result["prior_bpd"])
    assert result["xstart_mse"].max() < 1e-6

    ln2 = math.log(2)
    # L_{t-1}, t > 0: KL(N(μ̃, β̃) || N(μ̃, σ_t²)) per dimension.
    var_q = diffusion.posterior_variance[1:]
    log_var_p = diffusion.model_log_variance[1:]
    kl = 0.5 * (log_var_p - np.log(var_q) + var_q / np.exp(log_var_p) - 1) / ln2
    assert np.allclose(result["vb"][:, 1:].numpy(), kl[None, :], atol=1e-5)
    if diffusion is SMALL:
        assert result["vb"][:, 1:].abs().max() < 1e-5
    # L_0: the decoder at the exact mean: interior bins 2Φ(δ/σ) - 1, edge bins Φ(δ/σ).
    z = (1 / 255) / math.exp(0.5 * diffusion.model_log_variance[0])
    phi = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    nll = -np.where(np.abs(x0.numpy()) > 0.999, math.log(phi), math.log(2 * phi - 1)).reshape(2, -1).mean(1) / ln2
    assert np.allclose(result["vb"][:, 0].numpy(), nll, rtol=1e-4)
    # L_T: KL(N(√ᾱ_T x0, 1 - ᾱ_T) || N(0, 1)).
    abar = diffusion.alphas_cumprod[-1]
    prior = 0.5 * (-np.log(1 - abar) + (1 - abar) + abar * x0.double().numpy() ** 2 - 1)
    assert np.allclose(result["prior_bpd"].numpy(), prior.reshape(2, -1).mean(1) / ln2, rtol=1e-4, atol=1e-9)


def test_bound_of_an_untrained_unet_is_finite_and_positive():
    diffusion = GaussianDiffusion(linear_beta_schedule(20, 1e-4, 0.2), "fixedlarge")
    model = UNet(get_preset("tiny").model).eval()
    result = diffusion.calc_bpd_loop(model, quantised_images(2, size=16))
    assert torch.isfinite(result["total_bpd"]).all()
    assert (result["total_bpd"] > 0).all()


def tiny_random_unet(seed=0):
    torch.manual_seed(seed)
    model = UNet(get_preset("tiny").model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_ddim_eta_one_with_every_step_is_ancestral_fixed_small():
    diffusion = GaussianDiffusion(linear_beta_schedule(100, 1e-4, 0.05), "fixedsmall")
    model = tiny_random_unet()
    shape = (3, 3, 16, 16)
    ancestral = diffusion.p_sample_loop(model, shape, generators=image_generators(7, range(3)))
    ddim = diffusion.ddim_sample_loop(model, shape, steps=100, eta=1.0, generators=image_generators(7, range(3)))
    assert torch.allclose(ancestral, ddim, atol=1e-4)


def test_ddim_eta_one_matches_ancestral_in_distribution_and_both_sample_the_data():
    # With the exact denoiser of N(0.2, 0.3²) data, both chains must return that distribution.
    diffusion = GaussianDiffusion(linear_beta_schedule(1000, 1e-4, 0.02), "fixedsmall", clip_denoised=False)
    model = gaussian_data_denoiser(diffusion, 0.2, 0.3)
    shape = (20_000, 1, 1, 1)
    torch.manual_seed(3)
    ancestral = diffusion.p_sample_loop(model, shape)
    torch.manual_seed(4)  # other noise: the two agree in distribution, not sample by sample
    ddim = diffusion.ddim_sample_loop(model, shape, steps=1000, eta=1.0)
    for samples in (ancestral, ddim):
        assert samples.mean().item() == pytest.approx(0.2, abs=0.01)
        assert samples.std().item() == pytest.approx(0.3, rel=0.03)
    assert ancestral.mean().item() == pytest.approx(ddim.mean().item(), abs=0.012)
    assert ancestral.std().item() == pytest.approx(ddim.std().item(), rel=0.03)
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    assert torch.allclose(ancestral.flatten().quantile(quantiles), ddim.flatten().quantile(quantiles), atol=0.02)


def test_ddim_eta_zero_is_deterministic_given_x_T_and_a_subset_of_steps_samples_the_data():
    diffusion = GaussianDiffusion(linear_beta_schedule(1000, 1e-4, 0.02), "fixedsmall", clip_denoised=False)
    model = gaussian_data_denoiser(diffusion, -0.1, 0.25)
    generators = image_generators(11, range(5000))
    first = diffusion.ddim_sample_loop(model, (5000, 1, 1, 1), steps=250, eta=0.0, generators=generators)
    # Only x_T was drawn: each generator moved by exactly one normal draw.
    fresh = image_generators(11, range(5000))
    for g, f in zip(generators[:5], fresh[:5]):
        torch.randn((1, 1, 1), generator=f)
        assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=f))
    again = diffusion.ddim_sample_loop(model, (5000, 1, 1, 1), steps=250, eta=0.0,
                                       generators=image_generators(11, range(5000)))
    assert torch.equal(first, again)
    assert first.mean().item() == pytest.approx(-0.1, abs=0.015)
    # 250 of 1000 steps: the deterministic chain's discretisation shrinks the spread by ~2%.
    assert first.std().item() == pytest.approx(0.25, rel=0.05)


def test_ddim_linspace_timesteps_cover_both_ends():
    assert LARGE.sampling_timesteps(1000) == list(range(1000))
    steps = LARGE.sampling_timesteps(50)
    assert len(steps) == 50 and steps[0] == 0 and steps[-1] == 999
    with pytest.raises(ValueError, match="sampling steps must be in 1..1000, got 0"):
        LARGE.sampling_timesteps(0)


def test_a_sample_depends_only_on_its_own_seed():
    diffusion = GaussianDiffusion(linear_beta_schedule(30, 1e-4, 0.1), "fixedlarge")
    model = tiny_random_unet(1)
    batch = diffusion.p_sample_loop(model, (3, 3, 16, 16), generators=image_generators(5, [10, 11, 12]))
    alone = diffusion.p_sample_loop(model, (1, 3, 16, 16), generators=image_generators(5, [11]))
    assert torch.allclose(batch[1], alone[0], atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    assert batch.abs().max() <= 1.0 + 1e-6  # x̂0 clipped, last step adds no noise


def test_progressive_sampling_yields_every_step_and_x0_predictions():
    diffusion = GaussianDiffusion(linear_beta_schedule(25, 1e-4, 0.1), "fixedlarge")
    model = tiny_random_unet(2)
    steps = list(diffusion.p_sample_loop_progressive(model, (2, 3, 16, 16), image_generators(0, range(2))))
    assert [s.t for s in steps] == list(range(24, -1, -1))
    assert all(s.pred_x0.abs().max() <= 1.0 for s in steps)
    final = diffusion.p_sample_loop(model, (2, 3, 16, 16), image_generators(0, range(2)))
    assert torch.equal(steps[-1].sample, final)
    assert torch.equal(steps[-1].sample, steps[-1].pred_x0)  # at t = 0 the mean is x̂0


def test_interpolation_mixes_latents_and_shares_the_reverse_noise():
    diffusion = GaussianDiffusion(linear_beta_schedule(40, 1e-4, 0.1), "fixedsmall")
    model = tiny_random_unet(3)
    x_a, x_b = quantised_images(2, size=16, seed=5)
    forward = diffusion.interpolate(model, x_a, x_b, t=30, lambdas=[0.0, 0.3, 0.3, 0.5], seed=9)
    swapped = diffusion.interpolate(model, x_b, x_a, t=30, lambdas=[0.7, 0.5], seed=9)
    assert forward.shape == (4, 3, 16, 16)
    assert torch.equal(forward[1], forward[2])  # same λ, same noise: same image
    assert torch.allclose(forward[3], swapped[1], atol=1e-5)  # λ = 0.5 is symmetric in the pair
    assert not torch.allclose(forward[0], forward[3])


def test_bad_inputs_get_one_clear_error_each():
    x0 = quantised_images(2)
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    with pytest.raises(ValueError, match=r"timestep out of range: got values in \[0, 1000\], expected 0..999"):
        LARGE.training_loss(model, x0, t=torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="timesteps must be integers"):
        LARGE.training_loss(model, x0, t=torch.tensor([0.5, 1.0]))
    bad = x0.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images contain NaN or infinite values"):
        LARGE.training_loss(model, bad)
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\] .* got values in \[0, 255\]"):
        LARGE.training_loss(model, torch.tensor([[[[0.0, 255.0]]]]))
    with pytest.raises(ValueError, match="need one generator per image: 3 images, 2 generators"):
        LARGE.p_sample_loop(model, (3, 3, 8, 8), generators=image_generators(0, range(2)))
    with pytest.raises(ValueError, match="start_t out of range: got 1000"):
        next(LARGE.p_sample_loop_progressive(model, (1, 3, 8, 8), x_t=torch.zeros(1, 3, 8, 8), start_t=1000))
    with pytest.raises(ValueError, match="variance 'learned' is unknown"):
        GaussianDiffusion(LARGE.betas, "learned")
