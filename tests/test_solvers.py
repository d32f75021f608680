"""Few-step samplers against diffusers: step-time spacings, DDIM, DPM-Solver++(2M) and UniPC-2, step for step."""

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ddpm_core.diffusion import SPACINGS, GaussianDiffusion, linear_beta_schedule, spaced_timesteps
from ddpm_core.rng import image_generators, randn_per_image
from ddpm_core.solvers import dpm_solver_pp_2m, unipc
from tests.test_diffusion import gaussian_data_denoiser

DIFFUSION = GaussianDiffusion(linear_beta_schedule(1000, 1e-4, 0.02), "fixedsmall")
# Data N(0.2, 0.8²) per pixel: x̂0 leaves [-1, 1] often, so clipping changes the trajectory.
ORACLE = gaussian_data_denoiser(DIFFUSION, 0.2, 0.8)
SHAPE = (4, 3, 8, 8)
TOLERANCE = 1e-4


def x_T(seed=0):
    return randn_per_image(image_generators(seed, range(SHAPE[0])), SHAPE[1:], "cpu")


def diffusers_chain(scheduler, x, noises=None, **step_options):
    """Every intermediate sample of a diffusers scheduler driven by the oracle from x_T."""
    chain = []
    for i, t in enumerate(scheduler.timesteps):
        eps = ORACLE(x, torch.full((x.shape[0],), int(t)))
        if noises is not None:
            step_options["variance_noise"] = noises[i]
        x = scheduler.step(eps, t, x, **step_options).prev_sample
        chain.append(x)
    return chain


def assert_same_trajectory(ours, theirs):
    ours = [step.sample for step in ours]
    assert len(ours) == len(theirs)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, theirs))
    assert worst <= TOLERANCE, f"the trajectories differ by up to {worst:.2e}"


def test_spacings_are_diffusers_ddim_ones_and_ddim_papers_quadratic():
    for spacing in ("linspace", "leading", "trailing"):
        for steps in (10, 20, 50, 1000):
            scheduler = DDIMScheduler(timestep_spacing=spacing)
            scheduler.set_timesteps(steps)
            assert spaced_timesteps(1000, steps, spacing) == sorted(scheduler.timesteps.tolist()), (spacing, steps)
    assert spaced_timesteps(1000, 10, "leading") == list(range(0, 1000, 100))
    assert spaced_timesteps(1000, 10, "trailing") == list(range(99, 1000, 100))
    # DDIM's code: (np.linspace(0, √(0.8 T), S) ** 2).astype(int) = ⌊800 i² / 81⌋ for S = 10.
    assert spaced_timesteps(1000, 10, "quadratic") == [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]
    # At 50 steps the formula gives 0, 0, 1, 3, 5, 8, …: repeats move to the next integer.
    assert spaced_timesteps(1000, 50, "quadratic")[:6] == [0, 1, 2, 3, 5, 8]
    for spacing in SPACINGS:
        for steps in (1, 2, 10, 49, 50, 333, 1000):
            kept = spaced_timesteps(1000, steps, spacing)
            assert len(kept) == steps and kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] <= 999
    assert spaced_timesteps(1000, 1, "linspace") == [999]  # what DDIM-1 always meant here
    with pytest.raises(ValueError, match="spacing 'karras' is unknown; choose one of linspace, leading, trailing"):
        spaced_timesteps(1000, 10, "karras")


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_is_diffusers_ddim_scheduler(spacing, eta, clip):
    steps = 10
    generators = image_generators(0, range(SHAPE[0]))
    ours = list(DIFFUSION.ddim_sample_loop_progressive(ORACLE, SHAPE, steps, eta, generators=generators,
                                                       spacing=spacing, clip_denoised=clip))
    # The same per-image streams: x_T first, then one draw per step except the last (σ = 0 there).
    generators = image_generators(0, range(SHAPE[0]))
    start = randn_per_image(generators, SHAPE[1:], "cpu")
    noises = [randn_per_image(generators, SHAPE[1:], "cpu") for _ in range(steps - 1)] + [torch.zeros(SHAPE)]
    scheduler = DDIMScheduler(timestep_spacing=spacing, clip_sample=clip)
    scheduler.set_timesteps(steps)
    theirs = diffusers_chain(scheduler, start, noises, eta=eta, use_clipped_model_output=True)
    assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize("spacing", ["linspace", "quadratic"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_at_any_spacing_is_first_order_dpm_solver_pp(spacing, clip):
    # DDIMScheduler steps from t to t - T//S, which for these spacings is not the next of its own timesteps;
    # first-order DPM-Solver++ is DDIM (Lu et al. 2022, §4.1) and takes the timesteps as given.
    kept = spaced_timesteps(1000, 10, spacing)
    ours = DIFFUSION.ddim_sample_loop_progressive(ORACLE, SHAPE, 10, 0.0, generators=image_generators(0, range(4)),
                                                  spacing=spacing, clip_denoised=clip)
    scheduler = DPMSolverMultistepScheduler(solver_order=1, thresholding=clip, sample_max_value=1.0)
    scheduler.set_timesteps(timesteps=kept[::-1])
    assert_same_trajectory(ours, diffusers_chain(scheduler, x_T()))


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("clip", [False, True])
def test_dpm_solver_pp_2m_is_diffusers_dpm_solver_multistep(spacing, steps, clip):
    ours = dpm_solver_pp_2m(DIFFUSION, ORACLE, SHAPE, steps, spacing, generators=image_generators(0, range(4)),
                            clip_denoised=clip)
    # Clipping x̂0 is diffusers' dynamic thresholding with the threshold capped at sample_max_value = 1.
    scheduler = DPMSolverMultistepScheduler(thresholding=clip, sample_max_value=1.0, timestep_spacing=spacing
                                            if spacing == "trailing" else "linspace")
    if spacing == "trailing":  # diffusers' own trailing spacing is ours
        scheduler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=spaced_timesteps(1000, steps, spacing)[::-1])
    assert scheduler.timesteps.tolist() == spaced_timesteps(1000, steps, spacing)[::-1]
    assert_same_trajectory(ours, diffusers_chain(scheduler, x_T()))


def unipc_scheduler(spacing, steps, clip):
    """diffusers' UniPC on our timesteps: its set_timesteps takes no `timesteps=`, so the timesteps and σ
    = √((1-ᾱ)/ᾱ) (then 0) are set as its set_timesteps sets them; trailing is diffusers' own."""
    scheduler = UniPCMultistepScheduler(thresholding=clip, sample_max_value=1.0, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    if spacing != "trailing":
        kept = torch.tensor(spaced_timesteps(1000, steps, spacing)[::-1])
        abar = scheduler.alphas_cumprod[kept]
        scheduler.timesteps = kept
        scheduler.sigmas = torch.cat([((1 - abar) / abar) ** 0.5, torch.zeros(1)]).float()
    assert scheduler.timesteps.tolist() == spaced_timesteps(1000, steps, spacing)[::-1]
    return scheduler


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("clip", [False, True])
def test_unipc_is_diffusers_unipc_multistep(spacing, steps, clip):
    ours = unipc(DIFFUSION, ORACLE, SHAPE, steps, spacing, generators=image_generators(0, range(4)),
                 clip_denoised=clip)
    assert_same_trajectory(ours, diffusers_chain(unipc_scheduler(spacing, steps, clip), x_T()))


def test_the_options_change_the_samples_and_the_solvers_sample_the_data():
    final = {}
    for name, solver in (("dpmpp_2m", dpm_solver_pp_2m), ("unipc", unipc)):
        for clip in (False, True):
            chain = solver(DIFFUSION, ORACLE, SHAPE, 10, "trailing", generators=image_generators(0, range(4)),
                           clip_denoised=clip)
            final[name, clip] = list(chain)[-1].sample
    # Each differs from the others by far more than the tolerance of the equivalence tests.
    assert (final["dpmpp_2m", False] - final["unipc", False]).abs().max() > 100 * TOLERANCE
    assert (final["dpmpp_2m", False] - final["dpmpp_2m", True]).abs().max() > 100 * TOLERANCE
    assert final["unipc", True].abs().max() <= 1.0 < final["unipc", False].abs().max()
    # 20 steps of either solver from 4000 seeds sample N(0.2, 0.8²) (the ODE's marginals are the data's).
    generators = image_generators(1, range(4000))
    for solver in (dpm_solver_pp_2m, unipc):
        samples = list(solver(DIFFUSION, ORACLE, (4000, 1, 1, 1), 20, "trailing", generators=generators,
                              clip_denoised=False))[-1].sample
        assert samples.mean().item() == pytest.approx(0.2, abs=0.04)
        assert samples.std().item() == pytest.approx(0.8, rel=0.04)
