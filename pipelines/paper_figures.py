"""The paper's sampling figures from a model: progressive x̂0 (Fig. 6) and latent interpolation (Fig. 8).

    ddpm sample --progressive --model models:/ddpm-celebahq256@candidate --num 4 --out fig6.png
    ddpm interpolate --model ... --images a.png b.png --t 500 --out fig8.png
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.errors import ArgumentError
from ddpm_core.image_prep import ImageRejected, Preprocess, decode_rgb
from ddpm_core.pixels import image_grid, to_uint8
from ddpm_core.progress import track
from ddpm_core.rng import image_generators
from pipelines.arguments import add_tracking_argument
from pipelines.job_runner import run_job

log = logging.getLogger("ddpm.figures")


def _load(args: argparse.Namespace):
    """The model, its config and diffusion, once `--out` is known to be writable (before any sampling)."""
    from pipelines.mlflow_registry import open_model

    if not Path(args.out).expanduser().resolve().parent.is_dir():
        raise ArgumentError(f"--out {args.out}: its folder does not exist")
    model, config = open_model(args.model, args.tracking_uri).load()
    return model, config, GaussianDiffusion.from_config(config.diffusion)


PROGRESSIVE_MAX_ROWS = 64  # one PNG row per image: `ddpm sample`'s --num default (50,000) is for FID


def progressive(args: argparse.Namespace) -> None:
    """Fig. 6: one row per image, x̂0 (Eq. 15) every `--every` steps of Algorithm 2, then the sample."""
    if not 1 <= args.num <= PROGRESSIVE_MAX_ROWS:
        raise ArgumentError(f"--num {args.num}: --progressive draws one row per image, pass 1..{PROGRESSIVE_MAX_ROWS}")
    if args.every < 1:
        raise ArgumentError(f"--every must be at least 1, got {args.every}")
    model, config, diffusion = _load(args)
    r = config.model.resolution
    snapshots = []
    chain = diffusion.p_sample_loop_progressive(model, (args.num, config.model.in_channels, r, r),
                                                image_generators(args.seed, range(args.num)))
    for step in track(chain, diffusion.num_timesteps, "steps"):
        if step.t % args.every == 0 or step.t == diffusion.num_timesteps - 1:
            snapshots.append(to_uint8(step.pred_x0))
    grid = np.stack(snapshots, axis=1).reshape(-1, r, r, 3)  # row-major: image × time
    out = Path(args.out)
    Image.fromarray(image_grid(grid, columns=len(snapshots))).save(out)
    log.info("wrote %s: %d images × %d x̂0 snapshots", out, args.num, len(snapshots))


def interpolate(args: argparse.Namespace) -> None:
    """Fig. 8: two images diffused to step t, latents mixed for λ in [0, 1], decoded; sources at the ends."""
    model, config, diffusion = _load(args)
    if not 0 <= args.t < diffusion.num_timesteps:
        raise ArgumentError(f"--t must be in 0..{diffusion.num_timesteps - 1}, got {args.t}")
    prep = Preprocess(config.model.resolution)
    sources = []
    for path in args.images:
        try:
            encoded, _ = prep.apply(decode_rgb(Path(path).read_bytes())[0])
        except (OSError, ImageRejected) as error:
            raise ArgumentError(f"--images {path}: {getattr(error, 'strerror', None) or error}") from None
        pixels = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        sources.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    lambdas = np.linspace(0, 1, args.steps_between + 2).tolist()
    mixed = diffusion.interpolate(model, sources[0], sources[1], args.t, lambdas, args.seed,
                                  progress=functools.partial(track, what="steps"))
    row = np.concatenate([to_uint8(sources[0][None]), to_uint8(mixed), to_uint8(sources[1][None])])
    out = Path(args.out)
    Image.fromarray(image_grid(row, columns=len(row))).save(out)
    log.info("wrote %s: source, %d interpolations at t=%d, source", out, len(lambdas), args.t)


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/... or a checkpoint directory")
    parser.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="two image files")
    parser.add_argument("--t", type=int, default=500, help="diffusion step of the mix (Fig. 8 uses 250-1000)")
    parser.add_argument("--steps-between", type=int, default=9, help="interpolated images between the ends")
    parser.add_argument("--seed", type=int, default=0, help="seed of the forward and reverse noise (every λ shares it)")
    parser.add_argument("--out", required=True, help="the PNG to write: one row, source A to source B")
    add_tracking_argument(parser)


def run(args: argparse.Namespace, figure) -> int:
    """Run `progressive` or `interpolate` as a command."""
    return run_job(figure, args)
