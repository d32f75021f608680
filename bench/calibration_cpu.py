"""`ddpm calibrate` on a real toy run: does a cheap spec rank one run's checkpoints as DDPM over all T steps does?

    nice -n 5 python bench/calibration_cpu.py --out /tmp/calibration --png docs/calibration_toy.png

1. Trains --preset (`tiny`, or the grey `demo`) in-process on scikit-learn's digits (pipelines/demo_data.py)
   at --resolution² (attention at half of it, EMA --ema-decay: short runs need a short EMA), one run from
   one seed, with a checkpoint at each of --train-steps: a longer run of the same recipe is the better model.
2. Reference statistics of the first --ref-num digits under --features: pixels (8×8 area means, pixel FD),
   which sees such checkpoints improve, or random-init (the seeded random Inception, pseudo-FID), which at
   these sizes ranks them backwards (docs/evaluation.md).
3. `ddpm calibrate` on those checkpoints: the expensive spec is DDPM over all T steps of the model
   (--timesteps, default the preset's 1000), the cheap ones --cheap; --num samples per set, scored with
   --features against that reference, in fp32 with x̂0 clipped, in this process's sampling jobs (no Ray).

A toy model and a toy metric: what it shows about this run does not transfer to the paper's presets (their
routine spec stays docs/evaluation.md's until calibrated at scale, with the FID network). Its report
(calibration.md, .json, .png and an MLflow run in --out/mlflow.db) is ranked by the expensive spec; each
score is the record the sampling job wrote. docs/evaluation.md shows a run of it.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.sampler_table import digits  # noqa: E402
from ddpm_core.checkpoint import TrainingState, checkpoint_name, save_checkpoint  # noqa: E402
from ddpm_core.config import Config  # noqa: E402
from ddpm_core.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_core.fid import image_statistics, save_reference  # noqa: E402
from ddpm_core.inception import feature_network  # noqa: E402
from ddpm_core.pixels import to_uint8  # noqa: E402
from ddpm_core.presets import get_preset  # noqa: E402
from ddpm_core.reference_provenance import resize_of  # noqa: E402
from ddpm_core.training import build_ema, build_optimizer, train_step  # noqa: E402
from ddpm_core.unet import UNet  # noqa: E402
from pipelines.cli import main as ddpm  # noqa: E402

CHEAP = ["dpmpp_2m:20:trailing", "ddim:50:trailing:0", "ddim:50:trailing:1"]


def toy_config(preset: str, resolution: int, timesteps: int, ema_decay: float) -> Config:
    """`preset` at `resolution`² (attention at half of it), T = `timesteps`, EMA `ema_decay`."""
    return get_preset(preset).with_overrides([f"model.resolution={resolution}",
                                              f"model.attn_resolutions=[{resolution // 2}]",
                                              f"diffusion.timesteps={timesteps}", f"train.ema_decay={ema_decay}"])


def train_run(config: Config, data: torch.Tensor, lengths: list[int], directory: Path, seed: int = 0) -> list[Path]:
    """One training run from `seed`, a checkpoint (`checkpoint_<step>`) after each of `lengths` steps (0 too)."""
    torch.manual_seed(seed)
    model = UNet(config.model)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    optimizer, ema = build_optimizer(model, config.train), build_ema(model, config.train)
    generator = torch.Generator().manual_seed(seed)
    checkpoints, started = [], time.perf_counter()
    for step in range(max(lengths) + 1):  # the checkpoint after `step` steps (0: the initialised model)
        if step in lengths:
            state = TrainingState(step=step, config=config.to_dict(), seed=seed)
            checkpoints.append(save_checkpoint(directory / checkpoint_name(step), model, ema, optimizer, state))
            print(f"  step {step}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if step < max(lengths):
            x0 = data[torch.randint(0, len(data), (config.train.batch_size,), generator=generator)]
            train_step(model, diffusion, optimizer, ema, x0, step, config.train, generator)
    return checkpoints


def write_reference(images: np.ndarray, path: Path, features: str = "pixels") -> None:
    """The statistics of `images` (uint8, N×H×W×3) under `features` (pixels or random-init) as a reference .npz."""
    network, extractor = feature_network(features)
    mu, sigma = image_statistics(network, images, np.arange(len(images)))[0].mean_cov()
    path.write_bytes(save_reference(mu, sigma, n=len(images), extractor_sha256=extractor, features=features,
                                    resize=resize_of(features),
                                    source=f"the first {len(images)} scikit-learn digits at {images.shape[1]}²"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of the run, the reference and the report")
    parser.add_argument("--train-steps", type=int, nargs="+", default=[50, 100, 200, 400, 800],
                        help="a checkpoint after each of these training steps (at least 3; 0: untrained)")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "demo"),
                        help="the network and recipe (demo: grey, 1 channel, three levels)")
    parser.add_argument("--resolution", type=int, default=8, help="the digits' native size is 8")
    parser.add_argument("--timesteps", type=int, default=get_preset("tiny").diffusion.timesteps,
                        help="the model's T: the expensive spec samples all of them")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="short runs need a short EMA")
    parser.add_argument("--cheap", nargs="+", default=CHEAP,
                        help="the specs to calibrate, SAMPLER[:STEPS[:SPACING[:ETA]]] (default: the routine spec, "
                             "DDIM-50 η=0 and η=1)")
    parser.add_argument("--num", type=int, default=32, help="samples per set (a toy metric: small N)")
    parser.add_argument("--features", choices=("pixels", "random-init"), default="pixels",
                        help="the toy metric: pixel FD, or the random-init Inception's pseudo-FID")
    parser.add_argument("--ref-num", type=int, default=256, help="training digits in the reference statistics")
    parser.add_argument("--png", default=None, help="copy the plot here too (e.g. docs/calibration.png)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (more than one spins on a busy CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    config = toy_config(args.preset, args.resolution, args.timesteps, args.ema_decay)
    data = digits(args.resolution)[:, :config.model.in_channels]  # R = G = B; a grey model takes one of them
    started = time.perf_counter()
    if not all((out / "run" / checkpoint_name(n)).is_dir() for n in args.train_steps):
        shutil.rmtree(out / "run", ignore_errors=True)
        print(f"training {args.preset} at {args.resolution}² (T={args.timesteps}) to {max(args.train_steps)} steps on "
              f"{len(data)} digits", file=sys.stderr)
        train_run(config, data, args.train_steps, out / "run")
    reference = f"ref-{args.features}.npz"
    if not (out / reference).is_file():
        write_reference(to_uint8(data[:args.ref_num]), out / reference, args.features)
    print(f"trained and referenced in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    models = [f"run/{checkpoint_name(n)}" for n in args.train_steps]  # relative: short names in the report
    with contextlib.chdir(out):
        code = ddpm(["calibrate", "--models", *models, "--expensive", "ddpm", "--cheap", *args.cheap, "--out",
                     "calibration", "--num", str(args.num), "--per-tar", str(args.num), "--allow-small-n",
                     "--actors", "0", "--features", args.features, "--ref", reference,
                     "--tracking-uri", f"sqlite:///{out / 'mlflow.db'}"])
    if code == 0 and args.png:
        shutil.copyfile(out / "calibration" / "calibration.png", args.png)
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
