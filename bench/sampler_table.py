"""Quality against cost of the few-step samplers, against DDPM-1000 of the same model and seeds.

    python bench/sampler_table.py [--train-steps 600] [--num 256] [--ode-num 64] [--resolution 8]
                                  [--features pixels|random-init] [--released /models/ddpm-cifar10-32]

1. Trains the `tiny` preset in-process (sizes are flags) on scikit-learn's digits (pipelines/demo_data.py),
   or, with --released, takes a model folder (`ddpm convert import --out`) instead.
2. Samples --num images with DDPM-1000 (Algorithm 2, the reference) and with every sampler × {10, 20, 50}
   steps from the same per-image seeds, in fp32, and the 20-step ones again in bf16.
3. For each: the Fréchet distance of the features (`pixels`: a toy metric, not an FID; the seeded
   random-init Inception; or the FID network) against the training images, or with --released against
   the dataset's statistics (--ref) or the DDPM-1000 samples; the same
   for DDPM-1000; the mean per-image RMS distance (uint8 levels) to the DDPM-1000 image of the same seed
   (which shares x_T; later noise, where a sampler draws any, comes from the same per-image stream) and,
   for the first --ode-num images, to the probability-flow ODE solution (DDIM-1000, η = 0) from the
   same x_T, which is what the deterministic samplers approximate; and wall time per 1k samples.
Prints one table (markdown). Timings are of this run on this machine; read them as ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpm_core.checkpoint import load_ema_unet  # noqa: E402
from ddpm_core.diffusion import SPACINGS, GaussianDiffusion  # noqa: E402
from ddpm_core.ema import EMA  # noqa: E402
from ddpm_core.fid import FeatureStats, frechet_distance, image_statistics, load_reference  # noqa: E402
from ddpm_core.inception import feature_network  # noqa: E402
from ddpm_core.pixels import to_uint8  # noqa: E402
from ddpm_core.presets import get_preset  # noqa: E402
from ddpm_core.sampling import sample_images  # noqa: E402
from ddpm_core.training import build_optimizer, train_step  # noqa: E402
from ddpm_core.unet import UNet  # noqa: E402
from pipelines.demo_data import digit_images  # noqa: E402

SOLVERS = (("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0), ("unipc", 0.0))


def digits(resolution: int) -> torch.Tensor:
    """scikit-learn's digits at `resolution`², grey RGB in [-1, 1]."""
    images = torch.from_numpy(digit_images()).float()[:, None] / 127.5 - 1.0
    images = torch.nn.functional.interpolate(images, size=resolution, mode="bicubic", align_corners=False)
    return images.clamp(-1, 1).repeat(1, 3, 1, 1)


def train(config, data: torch.Tensor, steps: int, batch: int, ema_decay: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet(config.model)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    optimizer, ema = build_optimizer(model, config.train), EMA(model, ema_decay)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for step in range(steps):
        x0 = data[torch.randint(0, len(data), (batch,), generator=generator)]
        result = train_step(model, diffusion, optimizer, ema, x0, step, config.train, generator)
        if (step + 1) % 100 == 0:
            print(f"  train step {step + 1}/{steps}: loss {result.loss:.4f}, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
    ema_model = UNet(config.model)
    ema_model.load_state_dict(ema.state_dict())
    return ema_model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--ema-decay", type=float, default=0.995, help="short runs need a short EMA")
    parser.add_argument("--resolution", type=int, default=8, help="the digits' native size is 8")
    parser.add_argument("--ch", type=int, default=32, help="the tiny preset's base channels")
    parser.add_argument("--num", type=int, default=256, help="samples per sampler (the same seeds for each)")
    parser.add_argument("--ode-num", type=int, default=64, help="images that also get the DDIM-1000 η=0 reference")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--spacing", choices=SPACINGS, default="trailing")
    parser.add_argument("--batch", type=int, default=256, help="images per forward pass when sampling")
    parser.add_argument("--features", choices=("pixels", "random-init", "inception"), default="pixels",
                        help="pixels: the Fréchet distance of 8x8 area means in [0, 1], at 8² the pixels themselves "
                             "(ddpm_core/pixel_features.py; a toy metric, 'pixel FD'); "
                             "random-init: of the seeded random-init Inception (pseudo-FID; slow on CPU); "
                             "inception: the FID network (--inception-weights or its usual places)")
    parser.add_argument("--inception-weights", default=None, help="the FID Inception weights file")
    parser.add_argument("--ref", default=None, help="with --released: the dataset's reference statistics .npz "
                                                    "(`ddpm fid-ref`) to score against, instead of DDPM-1000's samples")
    parser.add_argument("--released", default=None, help="a model folder to evaluate instead of training one")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than one spins on a busy CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.released:
        model, config = load_ema_unet(args.released)
        reference_images, origin = None, f"released model {args.released}"
    else:
        config = get_preset("tiny").with_overrides([f"model.resolution={args.resolution}", f"model.ch={args.ch}",
                                                    "model.attn_resolutions=[4]"])
        data = digits(config.model.resolution)
        print(f"training tiny ({args.ch} channels, {args.resolution}²) for {args.train_steps} steps on "
              f"{len(data)} digits", file=sys.stderr)
        model = train(config, data, args.train_steps, args.train_batch, args.ema_decay)
        reference_images, origin = to_uint8(data), f"tiny, {args.train_steps} steps on the digits"
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    network = feature_network(args.features, args.inception_weights)[0]

    def features(images: np.ndarray) -> FeatureStats:
        return image_statistics(network, images, np.arange(len(images)))[0]

    def sample(sampler: str, steps: int, eta: float = 0.0, bf16: bool = False, num: int = args.num
               ) -> tuple[np.ndarray, float]:
        started = time.perf_counter()
        batches = [sample_images(model, diffusion, config, range(i, min(i + args.batch, num)), 0, sampler, steps,
                                 eta, bf16=bf16, spacing=args.spacing) for i in range(0, num, args.batch)]
        seconds = time.perf_counter() - started
        return to_uint8(torch.cat(batches)), seconds * 1000 / num

    def rms(a: np.ndarray, b: np.ndarray) -> float:
        """Mean over images of the RMS pixel difference, in uint8 levels."""
        diff = a.astype(np.float64) - b[:len(a)].astype(np.float64)
        return float(np.sqrt((diff ** 2).reshape(len(a), -1).mean(axis=1)).mean())

    print("sampling DDPM-1000 (the reference) and DDIM-1000 η=0 (the ODE reference)", file=sys.stderr)
    ddpm, ddpm_seconds = sample("ddpm", diffusion.num_timesteps)
    ode = sample("ddim", diffusion.num_timesteps, num=min(args.ode_num, args.num))[0]
    if args.ref:
        mu_ref, sigma_ref = load_reference(Path(args.ref).read_bytes(), args.ref)
    else:
        mu_ref, sigma_ref = features(reference_images if reference_images is not None else ddpm).mean_cov()

    def score(images: np.ndarray) -> float:
        return frechet_distance(*features(images).mean_cov(), mu_ref, sigma_ref)

    ddpm_fid = score(ddpm)
    rows = [("ddpm", "1000", "fp32", ddpm_fid, 0.0, rms(ddpm, ddpm), rms(ode, ddpm), ddpm_seconds)]
    for sampler, eta in SOLVERS:
        for steps in args.steps:
            for bf16 in (False, True) if steps == 20 and eta == 0.0 else (False,):
                print(f"sampling {sampler} η={eta:g} {steps} steps {'bf16' if bf16 else 'fp32'}", file=sys.stderr)
                images, seconds = sample(sampler, steps, eta, bf16)
                fid = score(images)
                name = f"{sampler} η=1" if eta else sampler
                rows.append((name, str(steps), "bf16" if bf16 else "fp32", fid, fid - ddpm_fid, rms(images, ddpm),
                             rms(images[:len(ode)], ode), seconds))

    against = args.ref or ("the training images" if reference_images is not None else "the DDPM-1000 samples")
    metric = {"pixels": "pixel FD", "random-init": "pseudo-FID", "inception": "FID-network FD"}[args.features]
    print(f"\n{origin}; {args.num} samples per row (seeds 0..{args.num - 1}), {args.spacing} spacing, x̂0 clipped; "
          f"{metric}: Fréchet distance of {args.features} features to {against}; RMS in uint8 levels; "
          f"ODE: DDIM-1000 η=0 from the same x_T, first {len(ode)} images.\n")
    print(f"| sampler | steps | precision | {metric} | Δ vs DDPM-1000 | RMS to DDPM-1000 | RMS to ODE | "
          "s / 1k samples | speed-up |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for name, steps, precision, fid, delta, to_ddpm, to_ode, seconds in rows:
        print(f"| {name} | {steps} | {precision} | {fid:.2f} | {delta:+.2f} | {to_ddpm:.1f} | {to_ode:.1f} | "
              f"{seconds:.1f} | {ddpm_seconds / seconds:.0f}× |")


if __name__ == "__main__":
    main()
