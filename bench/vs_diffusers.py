"""Ours vs Hugging Face diffusers on the same network and weights: forward, train step, sampling.

    python bench/vs_diffusers.py [--preset cifar10] [--batch 8] [--repeats 5] [--sampling-steps 20]

diffusers' `UNet2DModel` is built with our architecture (same parameter count) and given our
weights through the bridge, so both compute the same function. Runs alternate, in this one
process; medians are compared. Forward and train step run in fp32 and under bf16 autocast.
Sampling takes one step of each sampler in turn (`--sampling-steps` of each; a step's cost is what
a full run repeats, so rates scale to 1000 or 50 steps): our ancestral loop and DDIM, fp32 and the
bf16 fast path (`bf16_autocast`, as `sample_images(bf16=True)`), against `DDPMPipeline` in fp32.
Achieved FLOP/s is set against this machine's measured matmul peak, and a profile of one sampling
step (fp32 and bf16) says where the time goes. Prints figures only.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ddpm_core.diffusers_bridge import diffusers_config, to_diffusers
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.model_stats import forward_flops
from ddpm_core.presets import get_preset
from ddpm_core.rng import image_generators
from ddpm_core.sampling import bf16_autocast
from ddpm_core.unet import UNet


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampling-steps", type=int, default=20, help="timed steps per sampler (at most 49)")
    args = parser.parse_args()
    if not 1 <= args.sampling_steps <= 49:
        parser.error("--sampling-steps must be in 1..49 (DDIM-50 has 50 steps, one is the warm-up)")
    config = get_preset(args.preset)
    torch.manual_seed(0)
    ours = UNet(config.model)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    theirs = UNet2DModel(**{k: v for k, v in diffusers_config(config.model).items() if k != "_class_name"})
    theirs.load_state_dict(to_diffusers(ours.state_dict(), config.model))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    r, b = config.model.resolution, args.batch
    x, t = torch.randn(b, 3, r, r), torch.randint(0, 1000, (b,))
    noise = torch.randn_like(x)
    models = {"ours": (ours, lambda m, x_, t_: m(x_, t_)), "diffusers": (theirs, lambda m, x_, t_: m(x_, t_).sample)}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-6) for name, (m, _) in models.items()}

    def autocast(bf16: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def forward(name: str, bf16: bool) -> float:
        model, call = models[name]
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast(bf16):
            call(model, x, t)
        return time.perf_counter() - start

    def train(name: str, bf16: bool) -> float:
        model, call = models[name]
        model.train()
        start = time.perf_counter()
        with autocast(bf16):
            loss = (call(model, x, t).float() - noise).square().mean()
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start

    cases = [(kind, name, bf16) for kind in ("forward", "train step") for bf16 in (False, True)
             for name in ("ours", "diffusers")]
    times = {case: [] for case in cases}
    for repeat in range(args.repeats + 1):
        for case in cases:
            elapsed = (forward if case[0] == "forward" else train)(case[1], case[2])
            if repeat:
                times[case].append(elapsed)

    gflops = forward_flops(config.model) / 1e9
    peaks = {False: matmul_peak(torch.float32), True: matmul_peak(torch.bfloat16)}
    print(f"\npreset {args.preset}, batch {b}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"medians of {args.repeats} alternating runs; forward {gflops:.2f} GFLOPs/image")
    print(f"measured matmul peak: fp32 {peaks[False]:.0f} GFLOP/s, bf16 {peaks[True]:.0f} GFLOP/s")
    print(f"{'':11} {'precision':9} {'ours img/s':>10} {'diffusers':>10} {'ratio':>6} {'ours % of peak':>15}")
    for kind in ("forward", "train step"):
        for bf16 in (False, True):
            ours_rate = b / statistics.median(times[(kind, "ours", bf16)])
            their_rate = b / statistics.median(times[(kind, "diffusers", bf16)])
            flops = gflops * (1 if kind == "forward" else 3) * ours_rate
            print(f"{kind:11} {'bf16' if bf16 else 'fp32':9} {ours_rate:10.2f} {their_rate:10.2f} "
                  f"{ours_rate / their_rate:5.2f}x {100 * flops / peaks[bf16]:14.0f}%")

    diffusion = GaussianDiffusion.from_config(config.diffusion)
    ours.eval()
    theirs.eval()
    denoisers = {False: ours, True: bf16_autocast(ours, "cpu")}
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              variance_type="fixed_large" if config.diffusion.variance == "fixedlarge"
                              else "fixed_small", clip_sample=True)
    pipeline = DDPMPipeline(unet=theirs, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    # One step of every sampler in turn, so load from other processes hits all alike. A step's cost is
    # what a full run repeats: one network evaluation (a 1-step DDPMPipeline call adds only its set-up).
    chains = {("DDPM", 1000, bf16): diffusion.p_sample_loop_progressive(
        denoisers[bf16], x.shape, image_generators(0, range(b))) for bf16 in (False, True)}
    chains |= {("DDIM", 50, bf16): diffusion.ddim_sample_loop_progressive(
        denoisers[bf16], x.shape, steps=50, generators=image_generators(0, range(b))) for bf16 in (False, True)}
    step_times = {case: [] for case in [*chains, "DDPMPipeline"]}
    for repeat in range(args.sampling_steps + 1):
        for case, runs in step_times.items():
            start = time.perf_counter()
            if case == "DDPMPipeline":
                pipeline(batch_size=b, num_inference_steps=1, generator=torch.Generator().manual_seed(0),
                         output_type="np")
            else:
                next(chains[case])
            if repeat:
                runs.append(time.perf_counter() - start)
    step = {case: statistics.median(runs) for case, runs in step_times.items()}
    theirs_step = step.pop("DDPMPipeline")
    print(f"\nsampling, batch {b}: medians of {args.sampling_steps} steps per sampler, taken in turn, as images/s "
          "of a full run;\nDDPMPipeline in fp32 (as users run it), at the same number of steps")
    print(f"{'':9} {'precision':9} {'ours img/s':>10} {'DDPMPipeline':>12} {'ratio':>6} {'vs our fp32':>11}")
    for (name, length, bf16), ours_step in step.items():
        print(f"{f'{name}-{length}':9} {'bf16' if bf16 else 'fp32':9} {b / (ours_step * length):10.4f} "
              f"{b / (theirs_step * length):12.4f} {theirs_step / ours_step:5.2f}x "
              f"{step[name, length, False] / ours_step:10.2f}x")

    for bf16 in (False, True):
        profile_sampling_step(diffusion, denoisers[bf16], x.shape, "bf16" if bf16 else "fp32")


def profile_sampling_step(diffusion: GaussianDiffusion, denoiser, shape: tuple[int, ...], precision: str) -> None:
    """Where one ancestral step's time goes: top operators, and the share of the network evaluation."""

    def network(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function("network"):
            return denoiser(x_t, t)

    chain = diffusion.p_sample_loop_progressive(network, shape, image_generators(0, range(shape[0])))
    next(chain)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with torch.profiler.record_function("step"):
            next(chain)
    events = {event.key: event for event in profile.key_averages()}
    step_ms, network_ms = events["step"].cpu_time_total / 1e3, events["network"].cpu_time_total / 1e3
    print(f"\nprofile of one {precision} ancestral step, batch {shape[0]}: {step_ms:.1f} ms, of which the network "
          f"{network_ms:.1f} ms ({100 * network_ms / step_ms:.2f}%); the rest (per-image noise, coefficient gathers, "
          f"clipping, posterior mean) {step_ms - network_ms:.2f} ms, noise draws (aten::normal_) alone "
          f"{events['aten::normal_'].self_cpu_time_total / 1e3:.2f} ms")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
