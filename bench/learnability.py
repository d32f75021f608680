"""Does the project's training learn as fast as a plain PyTorch loop, RGB and grey? Judged on real digits.

    python bench/learnability.py [--colours rgb,grey] [--steps 200,600] [--batch 64] [--lr 2e-4] [--ema 0.995]
                                 [--samples 200] [--eta 0] [--paths project,reference] [--sampling fp32,chain]
                                 [--threads 2] [--seeds 0,1] [--json rows.json]
    python bench/learnability.py --table rows-seed0.json rows-seed1.json

The network is the `--preset`'s (default `tiny`: the paper's U-Net at 16×16, ch 32, 0.70M parameters,
PyTorch's default init, as its notes say why; `--set model.FIELD=VALUE` changes it for every path).
`--colours` trains it in two arms: rgb (3 channels in and out, the preset's default) and grey (1 channel, as
the demo preset's). The task: scikit-learn's 1,797 handwritten digits (8×8, 17 grey levels, ten classes),
upscaled to 16×16 (bicubic) and written as RGB PNGs with R = G = B, then sharded by the project (`ShardJob`
over a folder, the path of `ddpm shard`); the grey arm reads the same shards as their luminance. Every path
trains the same network size with the same batch, lr, warm-up, Adam, grad clip 1.0, EMA and no flips, for the
same number of steps; the EMA is the preset's scheme in every path and arm (ddpm_core's `EMA`: `tiny` debiases
it, `train.ema_debias`; `--set train.ema_debias=false` gives every path the paper's), so the paths differ in
their training loop, not in how they average it. At each step count of `--steps` the EMA model draws
`--samples` images with the same DDIM-50 sampler (η `--eta`, the same seeds), once per `--sampling`: fp32,
and/or "chain", as `ddpm sample` draws and stores them on this CPU (the network under bf16 autocast where the
CPU has native bf16, the images rounded to uint8 PNG values).

Paths (all in this one process, stepped round-robin so that other load on the machine hits each alike):
- project: ddpm_core's `TrainingLoop`, as the training job's worker runs it on one rank, without Ray:
  over a `TrainLoader` of the shards (one loader worker), bf16 autocast where the CPU has native bf16
  (as the job), `UNet` built from the bench's `ModelConfig`; one `run` per step (`stop_at`), each
  continuing the batches of the last.
- reference: a plain loop: the same decoded images in memory, a new permutation every epoch,
  diffusers' `UNet2DModel` with the same architecture and its default init, MSE on ε, Adam, clip
  1.0, fp32; the same warm-up (`learning_rate`) and EMA (`build_ema`) as the project.
- reference-ours: the plain loop with our `UNet` (separates the network from the job).
- project-fp32: the project path without bf16 (separates the precision).
- project-memory: the project path over the plain loop's batches in memory instead of the shards'
  loader (separates the loader).

Judge: an RBF SVM (calibrated) fitted on 80 % of the real digits (at 8×8); a sample is turned grey (channel
mean), averaged 2×2 back to 8×8 and scored. `conf` is the mean top-class probability (the held-out real
digits give the ceiling), `classes` the effective number of predicted classes (exp of the entropy of the
predicted-class histogram; 10 is every class equally), `cast` the mean per-image spread (standard deviation)
of the three channel means in grey levels (the data has 0; a grey model has none by construction).
images/s count training steps only, in steady state: every path's first WARMUP_STEPS are left out (the
project's loader worker starting, oneDNN building its kernels); compare them only within one process.
`--seeds` trains every path once per seed (one judge for all); the table gives mean ± standard deviation
over the seeds (`--json` and `--table` combine seeds run side by side). Prints figures only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from ddpm_core.checkpoint import TrainingState  # noqa: E402
from ddpm_core.config import Config, DiffusionConfig, ModelConfig, TrainConfig  # noqa: E402
from ddpm_core.diffusers_bridge import diffusers_config  # noqa: E402
from ddpm_core.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_core.image_prep import Preprocess  # noqa: E402
from ddpm_core.loader import TrainLoader, decode_image  # noqa: E402
from ddpm_core.model_stats import count_parameters  # noqa: E402
from ddpm_core.pixels import to_uint8  # noqa: E402
from ddpm_core.presets import get_preset  # noqa: E402
from ddpm_core.rng import image_generators  # noqa: E402
from ddpm_core.sampling import bf16_autocast, bf16_is_fast  # noqa: E402
from ddpm_core.sharding import ShardJob, build_shard  # noqa: E402
from ddpm_core.sources import FolderSource  # noqa: E402
from ddpm_core.storage import open_storage  # noqa: E402
from ddpm_core.training import TrainingHooks, TrainingLoop, build_ema, build_optimizer, learning_rate  # noqa: E402
from ddpm_core.unet import UNet  # noqa: E402

PATHS = ("project", "reference", "reference-ours", "project-fp32", "project-memory")
COLOURS = {"rgb": 3, "grey": 1}
WARMUP_STEPS = 10


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target


def write_dataset(root: Path, resolution: int) -> str:
    """The digits as grey RGB PNGs at `resolution`, sharded by the project; returns the dataset URI."""
    images, _ = digits()
    folder = root / "digits"
    folder.mkdir()
    for i, image in enumerate(images):
        grey = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8))
        grey.resize((resolution, resolution), Image.BICUBIC).convert("RGB").save(folder / f"{i:05d}.png")
    storage = open_storage(root / "data")
    job = ShardJob(FolderSource(folder), Preprocess(resolution), storage, per_shard=200)
    todo, _ = job.pending()
    job.finalize([build_shard(job.source, job.preprocess, plan, "train", storage) for plan in todo])
    return str(root / "data")


def decoded_shards(data: str, channels: int) -> torch.Tensor:
    """Every training image as the loader sees it, in [-1, 1]: what the plain loops train on."""
    images = []
    for tar_path in sorted(Path(data, "shards").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    images.append(decode_image(tar.extractfile(member).read(), channels))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class Judge:
    """A classifier of the real 8×8 digits, scoring images in [-1, 1]."""

    def __init__(self, seed: int = 0):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        images, labels = digits()
        order = np.random.default_rng(seed).permutation(len(images))
        cut = int(0.8 * len(images))
        # An RBF SVM is unsure far from the data (noise, blobs: ~0.25), a linear model is not.
        self.classifier = CalibratedClassifierCV(SVC(), ensemble=False)
        self.classifier.fit(images[order[:cut]].reshape(cut, -1) / 16, labels[order[:cut]])
        self.real = self.confidence(images[order[cut:]].reshape(len(images) - cut, -1) / 16)

    def confidence(self, features: np.ndarray) -> tuple[float, float]:
        probabilities = self.classifier.predict_proba(features)
        counts = np.bincount(probabilities.argmax(1), minlength=10) / len(features)
        nonzero = counts[counts > 0]
        return float(probabilities.max(1).mean()), float(math.exp(-(nonzero * np.log(nonzero)).sum()))

    def score(self, images: torch.Tensor) -> dict[str, float]:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [0, 1]
        cast = float(x.mean(dim=(2, 3)).std(dim=1).mean()) * 255 if x.shape[1] == 3 else 0.0
        grey = F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8)
        conf, classes = self.confidence(grey.reshape(len(grey), -1).numpy())
        return {"conf": conf, "classes": classes, "cast": cast}


class PlainLoop:
    """The reference: a plain PyTorch DDPM loop over images in memory."""

    def __init__(self, model: torch.nn.Module, call, images: torch.Tensor, diffusion: GaussianDiffusion,
                 train: TrainConfig, seed: int):
        self.model, self.call, self.images, self.train = model, call, images, train
        self.ema = build_ema(model, train)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
        self.abar = torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.step = torch.empty(0, dtype=torch.long), 0

    def batch(self) -> torch.Tensor:
        if len(self.order) < self.train.batch_size:
            self.order = torch.randperm(len(self.images), generator=self.generator)
        index, self.order = self.order[:self.train.batch_size], self.order[self.train.batch_size:]
        return self.images[index]

    def __call__(self) -> None:
        x0 = self.batch()
        t = torch.randint(0, len(self.abar), (len(x0),), generator=self.generator)
        noise = torch.randn(x0.shape, generator=self.generator)
        abar = self.abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(self.call(self.model, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t), noise)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step, self.train)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model, self.step)
        self.step += 1

    def denoiser(self):
        return lambda x, t: self.call(self.ema.model, x, t)


class MemoryLoader:
    """The plain loops' batches (the decoded images in memory, a new permutation every epoch) as an `EpochLoader`."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int):
        self.images, self.batch_size, self.seed, self.order = images, batch_size, seed, torch.empty(0)

    def set_epoch(self, epoch: int) -> None:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        self.order = torch.randperm(len(self.images), generator=generator)

    def __iter__(self):
        for start in range(0, len(self.order) - self.batch_size + 1, self.batch_size):
            index = self.order[start:start + self.batch_size]
            yield self.images[index], [str(int(i)) for i in index]


class ProjectPath:
    """ddpm_core's TrainingLoop as rank 0 of a one-worker training job runs it (without Ray), a step per call."""

    def __init__(self, config: Config, data: str, diffusion: GaussianDiffusion, bf16: bool,
                 images: torch.Tensor | None = None):
        train = config.train
        torch.manual_seed(train.seed)
        model = UNet(config.model)
        self.loop = TrainingLoop(model, diffusion, build_optimizer(model, train), build_ema(model, train), config,
                                 "cpu", autocast_dtype=torch.bfloat16 if bf16 else None)
        self.loader = MemoryLoader(images, train.batch_size, train.seed) if images is not None else TrainLoader(
            data, train.batch_size, num_workers=1, seed=train.seed, random_flip=train.random_flip,
            resolution=config.model.resolution, channels=config.model.in_channels)
        self.state = TrainingState(step=0, config=config.to_dict(), seed=train.seed)
        # A run ending at `stop_at` reports its state there: where the next call continues.
        self.hooks = TrainingHooks(on_checkpoint=lambda state, result: setattr(self, "state", state))

    def __call__(self) -> None:
        result = self.loop.run(self.loader, self.state, self.hooks, stop_at=self.state.step + 1)
        if result.stopped:
            raise RuntimeError(result.stopped)

    def denoiser(self):
        return self.loop.ema.model


def diffusers_unet(config: ModelConfig) -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(**{k: v for k, v in diffusers_config(config).items() if k != "_class_name"})


def draw_samples(denoiser, diffusion: GaussianDiffusion, model_config: ModelConfig, args, seed: int,
                 mode: str) -> torch.Tensor:
    """DDIM-50 samples in [-1, 1] from the same seeds: fp32, or as `ddpm sample` draws and stores them on this
    CPU ("chain": the network under bf16 autocast where the CPU has native bf16, the images rounded to uint8)."""
    chain = mode == "chain"
    if chain and bf16_is_fast("cpu"):
        denoiser = bf16_autocast(denoiser, "cpu")
    shape = (args.samples, model_config.in_channels, model_config.resolution, model_config.resolution)
    with torch.no_grad():
        samples = diffusion.ddim_sample_loop(denoiser, shape, steps=50, eta=args.eta,
                                             generators=image_generators(seed + 1, range(args.samples)))
    if chain:  # the stored PNG: uint8 RGB (a grey model's one channel repeated), read back in [-1, 1]
        samples = torch.from_numpy(to_uint8(samples)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return samples


def train_and_judge(args, seed: int, checkpoints: list[int], paths: list[str], model_config: ModelConfig,
                    ema_debias: bool, judge: Judge) -> list[tuple[int, str, dict[str, float], float]]:
    """(steps, path, score, images/s) of every path at every step count, for one seed."""
    train = TrainConfig(lr=args.lr, batch_size=args.batch, warmup_steps=args.warmup, ema_decay=args.ema,
                        ema_debias=ema_debias, random_flip=False, steps=checkpoints[-1], seed=seed)
    config = Config(preset=args.preset, model=model_config, diffusion=DiffusionConfig(variance="fixedlarge"),
                    train=train)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    bf16 = bf16_is_fast("cpu")
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-learn-") as tmp:
        data = write_dataset(Path(tmp), model_config.resolution)
        images = decoded_shards(data, model_config.in_channels)
        runners = {}
        for name in paths:
            if name.startswith("project"):
                runners[name] = ProjectPath(config, data, diffusion, bf16 and name != "project-fp32",
                                            images if name == "project-memory" else None)
            else:
                torch.manual_seed(seed)
                ours = name == "reference-ours"
                model = UNet(model_config) if ours else diffusers_unet(model_config)
                call = (lambda m, x, t: m(x, t)) if ours else (lambda m, x, t: m(x, t).sample)
                runners[name] = PlainLoop(model, call, images, diffusion, train, seed)
        seconds = dict.fromkeys(paths, 0.0)
        rows = []
        step = 0
        for target in checkpoints:
            while step < target:
                for name, runner in runners.items():
                    start = time.perf_counter()
                    runner()
                    if step >= WARMUP_STEPS:
                        seconds[name] += time.perf_counter() - start
                step += 1
                if step % 50 == 0:
                    rates = (f"{n} {(step - WARMUP_STEPS) * args.batch / s:.0f} images/s" for n, s in seconds.items())
                    print(f"  seed {seed} step {step}: " + ", ".join(rates), flush=True)
            for name, runner in runners.items():
                rate = (target - WARMUP_STEPS) * args.batch / seconds[name]
                for mode in args.sampling.split(","):
                    samples = draw_samples(runner.denoiser(), diffusion, model_config, args, seed, mode)
                    label = name if mode == "fp32" else f"{name} [{mode} sampling]"
                    rows.append((target, label, judge.score(samples), rate))
                    print(f"  seed {seed} step {target} {label}: {rows[-1][2]}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="200,600", help="comma-separated step counts to judge at")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup", type=int, default=0, help="linear lr warm-up steps, both paths")
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--preset", default="tiny", help="the model (and its init) of every path and the project "
                                                         "paths' EMA scheme (default tiny)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a field of the preset, e.g. --set model.dropout=0.1 (repeatable)")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's η of the judged samples (1: as DDPM)")
    parser.add_argument("--paths", default="project,reference", help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds; the table is their mean")
    parser.add_argument("--colours", default="rgb,grey",
                        help="comma-separated arms, of rgb (3 channels, R = G = B) and grey (1 channel)")
    parser.add_argument("--sampling", default="fp32",
                        help="comma-separated, of fp32 and chain (bf16 network where the CPU has it, uint8 images: "
                             "as `ddpm sample` draws and stores them)")
    parser.add_argument("--json", help="also write every (seed, arm, steps, path) row to this JSON file")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="print the table of these --json files and exit "
                                                                   "(runs of other seeds side by side)")
    args = parser.parse_args()
    if args.table:
        print_table([row for name in args.table for row in json.loads(Path(name).read_text())])
        return
    checkpoints = sorted(int(s) for s in args.steps.split(","))
    paths, colours = args.paths.split(","), args.colours.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not set(paths) <= set(PATHS):
        parser.error(f"--paths must be among {', '.join(PATHS)}")
    if not set(colours) <= set(COLOURS) or not set(args.sampling.split(",")) <= {"fp32", "chain"}:
        parser.error("--colours must be among rgb, grey and --sampling among fp32, chain")
    if checkpoints[0] <= WARMUP_STEPS:
        parser.error(f"--steps must be above the {WARMUP_STEPS} warm-up steps, got {checkpoints[0]}")
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset).with_overrides(args.set)
    scheme = "debiased" if preset.train.ema_debias else "the paper's, from the first update"
    ema = f"EMA {args.ema} ({scheme}, in every path and arm)"
    print(f"digits × {preset.model.resolution}² grey, arms {args.colours}, batch {args.batch}, lr {args.lr:g}, "
          f"warm-up {args.warmup}, {ema}, no flips; DDIM-50 η {args.eta:g} ({args.sampling}), {args.samples} "
          f"samples; project bf16 {'on' if bf16_is_fast('cpu') else 'off (no native bf16)'}; {args.threads} threads; "
          f"seeds {args.seeds}", flush=True)
    judge = Judge()  # one judge for every seed: the seeds are of training, not of the measure
    rows = []
    for colour in colours:
        channels = COLOURS[colour]
        model_config = replace(preset.model, in_channels=channels, out_channels=channels)
        print(f"{colour}: {count_parameters(UNet(model_config)) / 1e6:.2f}M params", flush=True)
        for seed in seeds:
            rows += [{"seed": seed, "arm": colour, "steps": target, "path": name, **score, "images_per_s": rate}
                     for target, name, score, rate in train_and_judge(args, seed, checkpoints, paths, model_config,
                                                                      preset.train.ema_debias, judge)]
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    real_conf, real_classes = judge.real
    print(f"\nreal held-out digits: conf {real_conf:.3f}, classes {real_classes:.2f}, cast 0.0")
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Mean ± standard deviation over the seeds of every (arm, steps, path); images/s relative to the reference."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["steps"], row["path"]), []).append(row)
    seeds = sorted({row["seed"] for row in rows})
    print(f"mean ± std over seeds {','.join(map(str, seeds))}; classes of each seed in brackets\n")
    print(f"{'arm':<5} {'steps':>6} {'path':<34} {'conf':>13} {'classes':>11} {'cast':>11} {'images/s':>9} "
          f"{'vs ref':>7}  per seed")

    def spread(values: list[float], digits: int) -> str:
        std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"

    for (arm, steps, path), group in sorted(groups.items(), key=lambda item: (item[0][0] != "rgb", item[0][1])):
        rate = float(np.mean([r["images_per_s"] for r in group]))
        base = groups.get((arm, steps, "reference"))
        ratio = f"{rate / np.mean([r['images_per_s'] for r in base]):.2f}×" if base else "-"
        per_seed = " ".join(f"{r['classes']:.2f}" for r in sorted(group, key=lambda r: r["seed"]))
        print(f"{arm:<5} {steps:>6} {path:<34} {spread([r['conf'] for r in group], 3):>13} "
              f"{spread([r['classes'] for r in group], 2):>11} {spread([r['cast'] for r in group], 1):>11} "
              f"{rate:9.1f} {ratio:>7}  [{per_seed}]")


if __name__ == "__main__":
    main()
