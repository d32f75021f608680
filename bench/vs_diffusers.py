"""Ours vs Hugging Face diffusers on the same network and weights: forward, train step, sampling.

    python bench/vs_diffusers.py [--preset cifar10] [--batch 8] [--repeats 5]

diffusers' `UNet2DModel` is built with our architecture (same parameter count) and given our
weights through the bridge, so both compute the same function. Runs alternate, in this one
process; medians are compared. Sampling compares 50 network evaluations of our ancestral loop with
`DDPMPipeline` (its per-step cost is what a 1000-step run repeats), and our DDIM-50. Achieved
FLOP/s is set against this machine's measured matmul peak, and a profile of our forward pass says
where the time goes. Prints figures only.
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
    args = parser.parse_args()
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
    steps = 50
    start = time.perf_counter()
    for _, _ in zip(range(steps), diffusion.p_sample_loop_progressive(ours, x.shape, image_generators(0, range(b)))):
        pass
    ours_step = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    diffusion.ddim_sample_loop(ours, x.shape, steps=50, generators=image_generators(0, range(b)))
    ours_ddim = time.perf_counter() - start
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              variance_type="fixed_large" if config.diffusion.variance == "fixedlarge"
                              else "fixed_small", clip_sample=True)
    pipeline = DDPMPipeline(unet=theirs.eval(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    pipeline(batch_size=b, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np")
    their_step = (time.perf_counter() - start) / steps
    print(f"\nsampling, batch {b} (fp32)           ours samples/s  DDPMPipeline  ratio")
    print(f"DDPM-1000 (from 50 timed steps)     {b / (ours_step * 1000):14.4f}  {b / (their_step * 1000):12.4f}"
          f"  {their_step / ours_step:5.2f}x")
    print(f"DDIM-50 (ours) vs DDPMPipeline-50   {b / ours_ddim:14.3f}  {b / (their_step * 50):12.3f}"
          f"  {their_step * 50 / ours_ddim:5.2f}x")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, torch.no_grad():
        ours(x, t)
    print("\nprofile of our fp32 forward (top operators by self CPU time):")
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
