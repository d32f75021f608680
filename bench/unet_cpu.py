"""CPU cost of the U-Net: forward and train-step time per image, medians of alternating runs.

    python bench/unet_cpu.py [--preset cifar10] [--batch 8] [--repeats 7]

Variants run round-robin in one process, so drift hits all alike; ratios are against fp32.
Prints figures only; it never passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time

import torch

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.ema import EMA
from ddpm_core.model_stats import forward_flops
from ddpm_core.presets import get_preset
from ddpm_core.training import build_optimizer, train_step
from ddpm_core.unet import UNet

VARIANTS = {
    "fp32": (torch.contiguous_format, False),
    "channels_last": (torch.channels_last, False),
    "bf16 autocast": (torch.contiguous_format, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    config = get_preset(args.preset)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    train_config = dataclasses.replace(config.train, warmup_steps=0)
    r = config.model.resolution
    torch.manual_seed(0)
    x0 = torch.rand(args.batch, 3, r, r) * 2 - 1
    t = torch.randint(0, diffusion.num_timesteps, (args.batch,))

    setups = {}
    for name, (memory_format, bf16) in VARIANTS.items():
        model = UNet(config.model).to(memory_format=memory_format)
        setups[name] = (model, build_optimizer(model, train_config), EMA(model, train_config.ema_decay),
                        x0.to(memory_format=memory_format), bf16)

    def autocast(bf16: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run_forward(name: str) -> float:
        model, _, _, x, bf16 = setups[name]
        model.eval()
        start = time.perf_counter()
        with torch.no_grad(), autocast(bf16):
            model(x, t)
        return time.perf_counter() - start

    def run_train(name: str) -> float:
        model, optimizer, ema, x, bf16 = setups[name]
        model.train()
        start = time.perf_counter()
        with autocast(bf16):
            train_step(model, diffusion, optimizer, ema, x, step=1, config=train_config)
        return time.perf_counter() - start

    times: dict[tuple[str, str], list[float]] = {(k, v): [] for k in ("forward", "train step") for v in VARIANTS}
    for repeat in range(args.repeats + 1):  # the first round warms up and is dropped
        for name in VARIANTS:
            for kind, run in (("forward", run_forward), ("train step", run_train)):
                elapsed = run(name)
                if repeat:
                    times[(kind, name)].append(elapsed)

    gflops = forward_flops(config.model) / 1e9
    print(f"preset {args.preset}, batch {args.batch}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"median of {args.repeats} alternating runs; forward = {gflops:.2f} GFLOPs/image")
    print(f"{'':11} {'variant':14} {'ms/image':>9} {'images/s':>9} {'GFLOP/s':>8} {'vs fp32':>8}")
    for kind in ("forward", "train step"):
        base = statistics.median(times[(kind, "fp32")])
        flops_per_image = gflops * (1 if kind == "forward" else 3)  # backward ≈ 2× forward
        for name in VARIANTS:
            median = statistics.median(times[(kind, name)])
            per_image = median / args.batch
            print(f"{kind:11} {name:14} {per_image * 1e3:9.1f} {1 / per_image:9.2f} "
                  f"{flops_per_image / per_image:8.1f} {base / median:7.2f}x")


if __name__ == "__main__":
    main()
