"""The paper's sampling figures from a model: progressive x̂0 (Fig. 6) and latent interpolation (Fig. 8).

    ddpm sample --progressive --model models:/ddpm-celebahq256@candidate --num 4 --out fig6.png
    ddpm interpolate --model ... --images a.png b.png --t 500 --out fig8.png
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.image_prep import Preprocess, decode_rgb
from ddpm_core.pixels import image_grid, to_uint8
from ddpm_core.rng import image_generators

log = logging.getLogger("ddpm.figures")


def _load(args: argparse.Namespace):
    from pipelines.registry import load_model, resolve_model
    from pipelines.tracking import connect, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    # Only a registered model needs MLflow; a checkpoint directory is read directly.
    client = connect(tracking_uri) if args.model.startswith("models:/") else None
    resolved, _ = resolve_model(args.model, client)
    model, config = load_model(resolved, tracking_uri)
    return model, config, GaussianDiffusion.from_config(config.diffusion)


def progressive(args: argparse.Namespace) -> Path:
    """Fig. 6: one row per image, x̂0 (Eq. 15) every `--every` steps of Algorithm 2, then the sample."""
    model, config, diffusion = _load(args)
    r = config.model.resolution
    snapshots = []
    chain = diffusion.p_sample_loop_progressive(model, (args.num, config.model.in_channels, r, r),
                                                image_generators(args.seed, range(args.num)))
    for step in chain:
        if step.t % args.every == 0 or step.t == diffusion.num_timesteps - 1:
            snapshots.append(to_uint8(step.pred_x0))
    grid = np.stack(snapshots, axis=1).reshape(-1, r, r, 3)  # row-major: image × time
    out = Path(args.out)
    Image.fromarray(image_grid(grid, columns=len(snapshots))).save(out)
    log.info("wrote %s: %d images × %d x̂0 snapshots", out, args.num, len(snapshots))
    return out


def interpolate(args: argparse.Namespace) -> Path:
    """Fig. 8: two images diffused to step t, latents mixed for λ in [0, 1], decoded; sources at the ends."""
    model, config, diffusion = _load(args)
    prep = Preprocess(config.model.resolution)
    sources = []
    for path in args.images:
        encoded, _ = prep.apply(decode_rgb(Path(path).read_bytes())[0])
        pixels = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        sources.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    lambdas = np.linspace(0, 1, args.steps_between + 2).tolist()
    mixed = diffusion.interpolate(model, sources[0], sources[1], args.t, lambdas, args.seed)
    row = np.concatenate([to_uint8(sources[0][None]), to_uint8(mixed), to_uint8(sources[1][None])])
    out = Path(args.out)
    Image.fromarray(image_grid(row, columns=len(row))).save(out)
    log.info("wrote %s: source, %d interpolations at t=%d, source", out, len(lambdas), args.t)
    return out


def add_interpolate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="models:/... or a checkpoint directory")
    parser.add_argument("--images", nargs=2, required=True, metavar=("A", "B"), help="two image files")
    parser.add_argument("--t", type=int, default=500, help="diffusion step of the mix (Fig. 8 uses 250-1000)")
    parser.add_argument("--steps-between", type=int, default=9, help="interpolated images between the ends")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--tracking-uri", default=None)


def run(args: argparse.Namespace, figure) -> int:
    """Run `progressive` or `interpolate` as a command: one clear error instead of a traceback."""
    from ddpm_core.checkpoint import CheckpointError
    from ddpm_core.sampling import SamplesError
    from pipelines.ray_runtime import configure_logging
    from pipelines.tracking import TrackingError

    configure_logging()
    try:
        figure(args)
    except (SamplesError, TrackingError, CheckpointError, OSError, ValueError) as error:
        log.error("%s", error)
        return 2
    return 0
