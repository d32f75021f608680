"""The `ddpm` command: one subcommand per job of the pipeline, and the demo.

Every job imports Ray and MLflow only when it runs, so `ddpm --help` and `ddpm presets` need neither.
`python pipelines/<job>.py` runs the same job with the same flags: the entry point of `ray job submit`.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import sys

from ddpm_core.model_stats import preset_summary
from ddpm_core.presets import PRESETS
from pipelines import (
    calibrate,
    convert,
    demo,
    fid_reference,
    paper_figures,
    sample_fid,
    schedule_sampling,
    shard,
    train,
)
from pipelines.arguments import DefaultsFormatter
from pipelines.job_runner import run_job

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


def fetch_inception_weights(args: argparse.Namespace) -> None:
    from ddpm_core.inception import fetch_weights

    print(fetch_weights(args.url))


def run_fetch_weights(args: argparse.Namespace) -> int:
    return run_job(fetch_inception_weights, args)


def add_presets_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the same fields (and notes) as JSON")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    sample_fid.add_arguments(parser, features_default="none")
    parser.add_argument("--progressive", action="store_true",
                        help="write the Fig. 6 strip instead: --num rows (at most 64) of x̂0 to the PNG --out")
    parser.add_argument("--every", type=int, default=100, help="steps between x̂0 snapshots (--progressive)")


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="a mirror (default: DDPM_INCEPTION_URL, else pytorch-fid's "
                                                    "release)")


def package_version() -> str:
    try:
        return importlib.metadata.version("ddpm-ray")
    except importlib.metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


# (command, one-line help, description, add_arguments, run)
COMMANDS = (
    ("presets", "list the named configurations",
     "Every preset: resolution, parameter count, forward GFLOPs per image, learning rate, global batch, dropout, "
     "reverse-process variance, random flips and training steps.", add_presets_arguments, run_presets),
    ("shard", "shard LSUN / CelebA-HQ / an image folder / CIFAR-10 into WebDataset tars",
     "Run the sharding job (pipelines/shard.py): one Ray task per shard, resumable.", shard.add_arguments, shard.run),
    ("train", "train a preset with Ray Train DDP, MLflow tracking and registration",
     "Run the training job (pipelines/train.py). The same --name resumes the run.", train.add_arguments, train.run),
    ("sample", "sample N images into tars (or, with --progressive, the paper's Fig. 6 strip)",
     "Run the sampling job (pipelines/sample_fid.py) without scoring unless --features is given. With "
     "--progressive, write x̂0 every --every steps for --num images to the PNG --out.", add_sample_arguments,
     run_sample),
    ("fid", "sample N images and score them (FID, IS) against --ref",
     "Run the sampling and scoring job (pipelines/sample_fid.py).", sample_fid.add_arguments, sample_fid.run),
    ("fid-ref", "compute a dataset's FID reference statistics",
     "Run pipelines/fid_reference.py: fid_stats.npz next to the shards.", fid_reference.add_arguments,
     fid_reference.run),
    ("interpolate", "the paper's Fig. 8: two images mixed at step t",
     "Diffuse two images to step t, mix, decode; write a PNG row.", paper_figures.add_interpolate_arguments,
     functools.partial(paper_figures.run, figure=paper_figures.interpolate)),
    ("schedule", "score every new model version by FID on the cluster; promote the best to champion",
     "Run the scheduler (pipelines/schedule_sampling.py) on a cron expression, or --once.",
     schedule_sampling.add_arguments, schedule_sampling.run),
    ("calibrate", "does a cheap evaluation spec rank models as DDPM-1000 does? (Spearman rho, cost, champion)",
     "Run pipelines/calibrate.py: score --models under --expensive and each --cheap spec; a table and a plot.",
     calibrate.add_arguments, calibrate.run),
    ("convert", "diffusers folders in (and registered) or out",
     "Bridge to Hugging Face diffusers (UNet2DModel / DDPMPipeline).", convert.add_arguments, convert.run),
    ("demo", "the whole pipeline on this machine, on scikit-learn's digits (make demo)",
     "Shard, reference statistics, train, register, score and one scheduler tick on a local Ray head, MLflow on "
     "SQLite and the local disk (pipelines/demo.py).", demo.add_arguments, demo.run),
    ("fetch-weights", "download the FID Inception weights into the cache, verified by sha256",
     "Pre-seed the cache (DDPM_CACHE, default ~/.cache/ddpm-ray) with the FID Inception weights, e.g. while "
     "building an image for an air-gapped cluster (DDPM_INCEPTION_DOWNLOAD=0).", add_fetch_arguments,
     run_fetch_weights),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Train and evaluate DDPM models on Ray.",
                                     formatter_class=DefaultsFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary, description, add_arguments, run in COMMANDS:
        command = commands.add_parser(name, help=summary, description=description, formatter_class=DefaultsFormatter)
        add_arguments(command)
        command.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
