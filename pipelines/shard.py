"""Ray job: shard LSUN / CelebA-HQ / an image folder / CIFAR-10 into WebDataset tars on disk or S3.

    python pipelines/shard.py --source lsun --input /data/bedroom_train_lmdb --out s3://bucket/lsun-bedroom-256
    ray job submit --working-dir . -- python pipelines/shard.py --source folder --input /data/imgs --out ...

One Ray task per shard; re-running the same command resumes, skipping finished shards.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ddpm_core.image_prep import ENCODINGS, FILTERS, Preprocess
from ddpm_core.progress import track
from ddpm_core.sharding import ShardJob, build_shard
from ddpm_core.sources import open_source
from ddpm_core.storage import open_storage
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.shard")
SOURCES = ("lsun", "celebahq", "folder", "cifar10")
DEFAULT_FILTER = {"lsun": "lanczos", "celebahq": "box", "folder": "lanczos", "cifar10": "lanczos"}


def add_arguments(parser: argparse.ArgumentParser, source: str | None = None) -> None:
    if source is None:
        parser.add_argument("--source", required=True, choices=SOURCES, help="kind of input")
    parser.add_argument("--input", "--lmdb", dest="input", required=True,
                        help="LSUN LMDB folder, image folder or zip, or CIFAR-10 python folder")
    parser.add_argument("--out", required=True, help="dataset root: local path, file:// or s3://bucket/prefix")
    parser.add_argument("--resolution", type=int, default=256, help="output side in pixels (default 256)")
    parser.add_argument("--filter", choices=sorted(FILTERS), default=None,
                        help="resize filter after the centre crop (default: lanczos; box for celebahq)")
    parser.add_argument("--encoding", choices=ENCODINGS, default="png", help="lossless image encoding")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N inputs")
    parser.add_argument("--parallel", type=int, default=None, help="shard tasks in flight (default: CPUs)")
    parser.add_argument("--split", default="train", help="split name in shard names (default train)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    return run_job(shard, args)


def shard(args: argparse.Namespace) -> None:
    """Plan the shards, build the missing ones as Ray tasks, then write the manifest and dataset.json."""
    from pipelines.ray_runtime import run_tasks

    source = open_source(args.source, args.input, split=args.split)
    preprocess = Preprocess(args.resolution, args.filter or DEFAULT_FILTER[args.source], args.encoding)
    storage = open_storage(args.out)
    storage.check_writable()
    job = ShardJob(source, preprocess, storage, args.split, args.per_shard, args.limit)
    todo, done = job.pending()
    log.info("%s: %d inputs in %d shards; %d already finished, %d to build",
             storage.uri, sum(p.count for p in job.plans), len(job.plans), len(done), len(todo))
    results = list(done)
    if todo:
        built = run_tasks(build_shard, source, [(preprocess, plan, args.split, storage) for plan in todo],
                          args.address, args.parallel)
        # Counted in inputs (written or rejected): the plans' counts, which the time left is of.
        results += track(built, sum(p.count for p in job.plans), "images",
                         done=sum(r.num_samples + len(r.rejects) for r in done),
                         count=lambda result: result.num_samples + len(result.rejects))
    dataset = job.finalize(results)
    counts = dataset["counts"]
    log.info("done: %s — %d written, %d rejected of %d inputs in %d shards; fingerprint %s",
             storage.uri, counts["written"], counts["rejected"], counts["inputs"], counts["shards"],
             dataset["fingerprint"][:16])


def main(argv: list[str] | None = None, source: str | None = None) -> int:
    """`python pipelines/shard.py`, or an alias script with its `source` fixed (shard_lsun.py)."""
    def run_source(args: argparse.Namespace) -> int:
        args.source = source or args.source
        return run(args)

    return command_line(__doc__.splitlines()[0], lambda parser: add_arguments(parser, source), run_source, argv)


if __name__ == "__main__":
    sys.exit(main())
