"""The `ddpm` command: one subcommand per job of the pipeline.

Every job imports Ray and MLflow only when it runs, so `ddpm --help` and `ddpm presets` need neither.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from ddpm_core.model_stats import preset_summary
from ddpm_core.presets import PRESETS
from pipelines import convert, fid_reference, paper_figures, sample_fid, schedule_sampling, shard, train

TABLE_COLUMNS = (
    ("name", "preset", "{}"),
    ("resolution", "res", "{}"),
    ("parameters", "params", "{:,}"),
    ("gflops_per_image", "GFLOPs/img", "{:.2f}"),
    ("lr", "lr", "{:g}"),
    ("batch_size", "batch", "{}"),
    ("dropout", "dropout", "{:g}"),
    ("variance", "variance", "{}"),
    ("random_flip", "flip", "{}"),
    ("steps", "steps", "{:,}"),
)


def format_table(rows: list[dict]) -> str:
    cells = [[header for _, header, _ in TABLE_COLUMNS]]
    cells += [[fmt.format(row[key]) for key, _, fmt in TABLE_COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def run_presets(args: argparse.Namespace) -> int:
    rows = [preset_summary(config) for config in PRESETS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
        print("\nGFLOPs: one forward pass on one image (2 FLOPs per multiply-add). "
              "`ddpm presets --json` adds each preset's provenance notes.")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    if args.progressive:
        return paper_figures.run(args, paper_figures.progressive)
    return sample_fid.run(args)


def run_fetch_weights(args: argparse.Namespace) -> int:
    from ddpm_core.inception import InceptionWeightsError, fetch_weights

    try:
        print(fetch_weights(args.url))
    except InceptionWeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Train and evaluate DDPM models on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    presets = commands.add_parser(
        "presets", help="list the named configurations",
        description="Every preset: resolution, parameter count, forward GFLOPs per image, learning rate, "
                    "global batch, dropout, reverse-process variance, random flips and training steps.")
    presets.add_argument("--json", action="store_true", help="print the same fields (and notes) as JSON")
    presets.set_defaults(run=run_presets)

    shard_command = commands.add_parser(
        "shard", help="shard LSUN / CelebA-HQ / an image folder / CIFAR-10 into WebDataset tars",
        description="Run the sharding job (pipelines/shard.py): one Ray task per shard, resumable.")
    shard.add_arguments(shard_command)
    shard_command.set_defaults(run=shard.run)

    train_command = commands.add_parser(
        "train", help="train a preset with Ray Train DDP, MLflow tracking and registration",
        description="Run the training job (pipelines/train.py). The same --name resumes the run.")
    train.add_arguments(train_command)
    train_command.set_defaults(run=train.run)

    sample = commands.add_parser(
        "sample", help="sample N images into tars (or, with --progressive, the paper's Fig. 6 strip)",
        description="Run the sampling job (pipelines/sample_fid.py) without scoring unless --features is given. "
                    "With --progressive, write x̂0 every --every steps for --num images to the PNG --out.")
    sample_fid.add_arguments(sample, features_default="none")
    sample.add_argument("--progressive", action="store_true", help="write the Fig. 6 strip to --out (a PNG)")
    sample.add_argument("--every", type=int, default=100, help="steps between x̂0 snapshots (--progressive)")
    sample.set_defaults(run=run_sample)

    fid = commands.add_parser("fid", help="sample N images and score them (FID, IS) against --ref",
                              description="Run the sampling and scoring job (pipelines/sample_fid.py).")
    sample_fid.add_arguments(fid)
    fid.set_defaults(run=sample_fid.run)

    reference = commands.add_parser("fid-ref", help="compute a dataset's FID reference statistics",
                                    description="Run pipelines/fid_reference.py: fid_stats.npz next to the shards.")
    fid_reference.add_arguments(reference)
    reference.set_defaults(run=fid_reference.run)

    interpolate = commands.add_parser("interpolate", help="the paper's Fig. 8: two images mixed at step t",
                                      description="Diffuse two images to step t, mix, decode; write a PNG row.")
    paper_figures.add_interpolate_arguments(interpolate)
    interpolate.set_defaults(run=functools.partial(paper_figures.run, figure=paper_figures.interpolate))

    schedule = commands.add_parser(
        "schedule", help="score every new model version by FID on the cluster; promote the best to champion",
        description="Run the scheduler (pipelines/schedule_sampling.py) on a cron expression, or --once.")
    schedule_sampling.add_arguments(schedule)
    schedule.set_defaults(run=schedule_sampling.run)

    bridge = commands.add_parser("convert", help="diffusers folders in (and registered) or out",
                                  description="Bridge to Hugging Face diffusers (UNet2DModel / DDPMPipeline).")
    convert.add_arguments(bridge)
    bridge.set_defaults(run=convert.run)

    fetch = commands.add_parser(
        "fetch-weights", help="download the FID Inception weights into the cache, verified by sha256",
        description="Pre-seed the cache (DDPM_CACHE, default ~/.cache/ddpm-ray) with the FID Inception "
                    "weights, e.g. while building an image for an air-gapped cluster (DDPM_INCEPTION_DOWNLOAD=0).")
    fetch.add_argument("--url", default=None, help="a mirror (default: DDPM_INCEPTION_URL, else pytorch-fid's release)")
    fetch.set_defaults(run=run_fetch_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
