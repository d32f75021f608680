"""`make demo`: the whole pipeline on one machine, on scikit-learn's handwritten digits.

    ddpm demo [--dir demo] [--fast]          # also: make demo, python -m pipelines.demo

Local Ray on 127.0.0.1 (with its job API, for the scheduler), MLflow on SQLite, the local disk for
storage, CPU. Stages: build an LSUN-style LMDB of the digits, upscaled → shard it (the LSUN path) → reference
statistics → train the `demo` preset with two DDP workers → register → score an untrained model as
the baseline → one scheduler tick (it submits the sampling batch through the Ray Jobs API, scores it,
decides promotion) → the sample grid. Training scores its EMA model every few hundred steps (train.fid_every,
a small N), so MLflow shows a quality-vs-step curve beside the loss. A pseudo-FID is used unless verified
Inception weights are found. `--fast` (or DEMO_FAST=1) runs the same chain with a few steps, for CI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_core.inception import DOWNLOAD_ENV, InceptionWeightsError, find_weights
from ddpm_core.pixels import image_grid
from ddpm_core.presets import get_preset
from ddpm_core.sampling import read_sample_tar
from ddpm_core.sharding import read_manifest
from ddpm_core.storage import open_storage
from pipelines.arguments import DefaultsFormatter


@dataclass(frozen=True)
class DemoSize:
    images: int  # crops in the dataset
    steps: int  # training steps of the demo preset
    samples: int  # images per scored batch
    ddim_steps: int
    log_every: int  # training steps between points of the loss curve
    fid_every: int  # training steps between the cheap scores of the EMA model (the quality-vs-step curve)
    fid_num: int  # images per cheap score


FULL = DemoSize(images=1797, steps=get_preset("demo").train.steps, samples=128, ddim_steps=50,
                log_every=get_preset("demo").train.log_every, fid_every=250, fid_num=64)
FAST = DemoSize(images=300, steps=12, samples=32, ddim_steps=10, log_every=2, fid_every=6, fid_num=8)
MODEL = "ddpm-demo"


class Stages:
    """Runs the numbered stages, prints progress, and keeps each stage's wall time."""

    def __init__(self, total: int):
        self.total, self.done, self.seconds = total, 0, {}
        self.started = time.monotonic()

    def run(self, name: str, what: str, action):
        self.done += 1
        print(f"\n==> [{self.done}/{self.total}] {name}: {what}", flush=True)
        start = time.monotonic()
        result = action()
        self.seconds[name] = time.monotonic() - start
        print(f"==> [{self.done}/{self.total}] {name} done in {self.seconds[name]:.0f} s "
              f"({time.monotonic() - self.started:.0f} s so far)", flush=True)
        return result

    def table(self) -> str:
        total = time.monotonic() - self.started
        lines = [f"{'stage':<12} {'seconds':>8} {'share':>6}"]
        lines += [f"{name:<12} {sec:8.1f} {sec / total:6.1%}" for name, sec in self.seconds.items()]
        return "\n".join(lines + [f"{'total':<12} {total:8.1f} {1:6.1%}"])


def check(code: int, stage: str) -> None:
    if code != 0:
        raise SystemExit(f"demo: the {stage} stage failed (exit status {code}); its error is logged above")


def first_training_images(data: str, count: int) -> np.ndarray:
    """The first `count` training images exactly as the model sees them (decoded from the shards)."""
    storage = open_storage(data)
    images = []
    for shard in sorted(read_manifest(storage), key=lambda row: row["shard_index"]):
        with storage.open_read(shard["url"]) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name.endswith(".png"):
                    images.append(np.asarray(Image.open(tar.extractfile(member)).convert("RGB")))
                if len(images) == count:
                    return np.stack(images)
    return np.stack(images)


def save_untrained(directory: Path) -> Path:
    """A checkpoint of the demo preset at initialisation: the baseline the trained model must beat."""
    import torch

    from ddpm_core.checkpoint import TrainingState, save_checkpoint
    from ddpm_core.ema import EMA
    from ddpm_core.training import build_optimizer
    from ddpm_core.unet import UNet

    if directory.exists():
        return directory
    config = get_preset("demo")
    torch.manual_seed(0)
    model = UNet(config.model)
    ema = EMA(model, config.train.ema_decay)
    ema.update(model, 0)
    return save_checkpoint(directory, model, ema, build_optimizer(model, config.train),
                           TrainingState(step=0, config=config.to_dict()))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default="demo", help="where everything goes: data, runs, MLflow, samples (the "
                                                      "demo's --out)")
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEMO_FAST") == "1",
                        help="a few steps only (CI); also DEMO_FAST=1")


def main(argv: list[str] | None = None) -> int:
    """`python -m pipelines.demo` and `make demo`; `ddpm demo` is the same."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=DefaultsFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Every stage on a local Ray head of its own, stopped at the end."""
    from pipelines.ray_runtime import LocalHead

    size = FAST if args.fast else FULL
    root = Path(args.dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)

    stages = Stages(total=7)
    # Token authentication on, with the demo's own token in demo/ray/ (the jobs it submits inherit it).
    head = stages.run("ray", "a local Ray head on 127.0.0.1 with its job API (token authentication)",
                      lambda: LocalHead(num_cpus=2, state_dir=root / "ray"))
    try:
        return run_stages(args, size, root, head, stages)
    finally:
        head.stop()


def scoring_network(data: Path) -> tuple[str | None, str, str, Path]:
    """(weights, --features, score label, reference file): the FID weights already on this machine, else a
    pseudo-FID. The demo downloads nothing (`ddpm fetch-weights` fetches them once, beforehand)."""
    os.environ.setdefault(DOWNLOAD_ENV, "0")
    try:
        # A few hundred DDIM samples: never the paper's protocol, so its score is a spec_fid, not an FID.
        return str(find_weights()), "inception", "spec_fid", data / "fid_stats.npz"
    except InceptionWeightsError:
        return None, "random-init", "pseudo_fid", data / "fid_stats_pseudo.npz"


def run_stages(args, size: DemoSize, root: Path, head, stages: Stages) -> int:
    """The README's `ddpm` commands, one per stage, on the demo's cluster, store and folder."""
    from pipelines.cli import main as ddpm
    from pipelines.demo_data import build_lmdb

    os.environ["RAY_ADDRESS"] = head.address  # every stage joins this cluster
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    lmdb, data = root / f"digits_{size.images}_lmdb", root / f"data_{size.images}"
    weights, features, label, ref = scoring_network(data)
    # DDIM with η = 1 (stochastic, 50 steps): η = 0 over-saturates the colours of a briefly trained model.
    # bf16 for the network, the same for the baseline and the scheduler's batch so that scores compare.
    scoring = ["--features", features, "--allow-small-n", "--sampler", "ddim", "--steps", str(size.ddim_steps),
               "--eta", "1.0", "--bf16", "--num", str(size.samples), "--per-tar", str(size.samples), "--ref", str(ref),
               "--cpus-per-worker", "1", "--batch-size", "64", "--tracking-uri", tracking,
               *(["--inception-weights", weights] if weights else [])]
    print(f"\nddpm-ray demo in {root} ({'fast' if args.fast else 'full'}: {size.images} images, {size.steps} "
          f"training steps, {size.samples} samples scored by {label.replace('_', '-')})", flush=True)

    stages.run("dataset", f"{size.images} of scikit-learn's handwritten digits, upscaled → LSUN-style LMDB",
               lambda: lmdb.exists() or build_lmdb(lmdb, size.images))
    stages.run("shard", "LMDB → 32×32 WebDataset shards (the LSUN path)", lambda: check(ddpm(
        ["shard", "--source", "lsun", "--input", str(lmdb), "--out", str(data), "--resolution", "32",
         "--per-shard", str(size.images // 12)]), "shard"))
    stages.run("reference", f"{features} statistics of the data's first {size.images // 12} images",
               lambda: ref.exists() or check(ddpm(
                   ["fid-ref", "--data", str(data), "--features", features, "--shards", "1", "--actors", "0",
                    *(["--inception-weights", weights] if weights else [])]), "reference"))
    stages.run("train", f"the demo preset, {size.steps} steps, 2 DDP workers (gloo), a {label.replace('_', '-')} of "
                        f"{size.fid_num} EMA samples every {size.fid_every} steps", lambda: check(ddpm(
        ["train", "--data", str(data), "--preset", "demo", "--workers", "2", "--cpus-per-worker", "1",
         "--loader-workers", "1", "--storage", str(root / "runs"), "--name", f"demo-{size.steps}",
         "--tracking-uri", tracking, "--fid-ref", str(ref), f"--set=train.log_every={size.log_every}",
         f"--set=train.fid_every={size.fid_every}", f"--set=train.fid_num={size.fid_num}",
         *([f"--set=train.{field}={size.steps}" for field in ("steps", "sample_every", "checkpoint_every")]
           if args.fast else [])]), "train"))
    untrained = root / "untrained"
    stages.run("baseline", "sample and score the untrained model", lambda: check(ddpm(
        ["fid", "--model", str(save_untrained(root / "untrained_checkpoint")), "--out", str(untrained), *scoring,
         "--actors", "0"]), "baseline"))
    stages.run("schedule", "one scheduler tick: it submits the sampling batch of the new version to the Ray "
                           "job API, scores it and decides promotion", lambda: check(ddpm(
        ["schedule", "--model-name", MODEL, "--once", "--owns-champion", "--out-root", str(root / "evaluations"),
         "--address", head.job_api, "--poll", "2", "--actors", "2", *scoring]), "schedule"))

    summarise(args, size, root, data, tracking, untrained, label, stages)
    return 0


def summarise(args, size: DemoSize, root: Path, data: Path, tracking: str, untrained: Path, label: str,
              stages: Stages) -> None:
    """Write summary.json and the two grids, and print where everything is."""
    from pipelines.mlflow_registry import evaluations
    from pipelines.mlflow_tracking import connect

    # The scheduler's one evaluation of the new version (one spec: the demo's).
    (evaluation,) = evaluations(connect(tracking), MODEL).values()
    out = Path(evaluation["out"])
    result = json.loads((out / "fid.json").read_text())
    baseline = json.loads((untrained / "fid.json").read_text())
    grid, data_grid = root / "samples_grid.png", root / "data_grid.png"
    _, samples = read_sample_tar(open_storage(str(out)), 0)
    Image.fromarray(image_grid(samples[:64], columns=8)).save(grid)
    Image.fromarray(image_grid(first_training_images(str(data), 64), columns=8)).save(data_grid)
    summary = {"mode": "fast" if args.fast else "full", "model": f"models:/{MODEL}/{evaluation['version']}",
               "samples_grid": str(grid), "data_grid": str(data_grid), "fid_json": str(out / "fid.json"),
               "score": label, "trained": result.get(label), "untrained": baseline.get(label),
               "decision": evaluation["decision"],
               "stage_seconds": stages.seconds}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n{stages.table()}\n")
    print(f"{label}: trained {summary['trained']:.2f} vs untrained {summary['untrained']:.2f} "
          f"({size.samples} samples each; lower is better)")
    print(f"registered version:  {summary['model']} (alias candidate); scheduler: {summary['decision']}")
    print(f"sample grid:         {grid}\ndata for comparison: {data_grid}\nscores:              {out / 'fid.json'}")
    print(f"MLflow UI:           mlflow ui --backend-store-uri {tracking} --host 127.0.0.1")


if __name__ == "__main__":
    sys.exit(main())
