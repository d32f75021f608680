"""Ray job: the FID reference statistics of a sharded dataset, stored next to its shards.

    python pipelines/fid_reference.py --data s3://bucket/lsun-bedroom-256      # → .../fid_stats.npz

    python pipelines/fid_reference.py --data s3://bucket/lsun-church-256 --subset 50000 --subset-seed 0 \
        --out fid_stats_50k.npz                              # 50k reals, as the paper's LSUN FIDs

One Ray Data row per shard; actors hold the FID Inception network and return exactly mergeable
float64 statistics. `--actors 0` runs the same actor code in this process, without Ray (small data
sets). Every image is used unless `--subset N`: then N images drawn uniformly without replacement by
`--subset-seed` (the same seed, the same images). The .npz has `mu` and `sigma` (as pytorch-fid,
clean-fid and ADM files) plus provenance: N, the weights' sha256, the resize, the dataset fingerprint,
and for a subset the images it was drawn from, its seed and the sha256 of its sorted indices.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import sys

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from ddpm_core.errors import ArgumentError
from ddpm_core.fid import image_statistics, merge_statistics, save_reference, statistics_row
from ddpm_core.inception import feature_network
from ddpm_core.reference_provenance import REFERENCE_NAMES, resize_of
from ddpm_core.sharding import read_dataset_info, read_manifest
from ddpm_core.storage import open_storage
from pipelines.arguments import add_cpus_argument
from pipelines.evaluation import add_weights_argument
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.fid_reference")


class ShardStatistics:
    """A Ray Data actor: the feature statistics of one dataset shard per row (of the images whose dataset
    index is in `selection`, when there is one)."""

    def __init__(self, data: str, features: str, weights: str | None, threads: int,
                 selection: np.ndarray | None = None):
        torch.set_num_threads(threads)
        self.storage = open_storage(data)
        self.selection = None if selection is None else set(selection.tolist())
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        network, self.extractor = feature_network(features, weights)  # this node's file (ddpm_core/inception.py)
        self.network = network.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        url, first = str(batch["url"][0]), int(batch["first_index"][0])
        with self.storage.open_read(url) as stream:
            samples = group_by_keys(tar_file_expander(iter([{"url": url, "stream": stream}])))
            chosen = [(index, s) for index, s in enumerate(samples, start=first)
                      if self.selection is None or index in self.selection]
            images = np.stack([np.asarray(Image.open(io.BytesIO(s.get("png") or s["webp"])).convert("RGB"))
                               for _, s in chosen])
        indices = np.array([index for index, _ in chosen])
        return statistics_row(*image_statistics(self.network, images, indices, device=self.device), self.extractor)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset root made by the sharding job")
    parser.add_argument("--out", default=None, help="the .npz to write: a name (in --data) or a path, local or s3:// "
                                                    "(default <data>/fid_stats.npz, fid_stats_pseudo.npz with "
                                                    "--features random-init, fid_stats_pixels.npz with pixels)")
    parser.add_argument("--features", choices=REFERENCE_NAMES, default="inception",
                        help="inception: the FID network (verified weights); random-init: the pseudo-FID network "
                             "(development only); pixels: 8x8 area means (pixel FD, toy calibrations)")
    add_weights_argument(parser)
    parser.add_argument("--shards", type=int, default=None,
                        help="use only the first K shards (a quicker, noisier reference; N is recorded)")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="N images drawn at random (e.g. 50000: 50k reals, as StyleGAN2's fid50k, which the "
                             "paper's LSUN FIDs used); default: every image")
    parser.add_argument("--subset-seed", type=int, default=None,
                        help="with --subset: the seed of its draw (default 0; recorded in the .npz)")
    parser.add_argument("--actors", type=int, default=1, help="Ray actors; 0: in this process, without Ray")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    add_cpus_argument(parser, "scoring actor")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    return run_job(reference_statistics, args)


def reference_statistics(args: argparse.Namespace) -> int:
    """The Inception statistics of the dataset (or its first --shards shards, or a --subset of either),
    written as an .npz."""
    from pipelines.ray_runtime import map_rows

    storage = open_storage(args.data)
    rows, info = read_manifest(storage), read_dataset_info(storage)
    if args.shards is not None:
        if args.shards < 1:
            raise ArgumentError(f"--shards must be >= 1, got {args.shards}")
        rows = sorted(rows, key=lambda row: row["shard_index"])[:args.shards]
    name = args.out or REFERENCE_NAMES[args.features]
    offsets = np.cumsum([0] + [row["num_samples"] for row in rows])
    total = int(offsets[-1])
    selection, subset = subset_indices(args, total)
    items = [{"url": row["url"], "first_index": int(offset)} for row, offset in zip(rows, offsets)
             if selection is None or np.searchsorted(selection, offset + row["num_samples"]) > np.searchsorted(
                 selection, offset)]  # a shard none of whose images were drawn is not read
    actor = {"data": storage.uri, "features": args.features, "weights": args.inception_weights,
             "threads": max(1, int(args.cpus_per_worker)), "selection": selection}
    statistics = map_rows(ShardStatistics, actor, items, args.actors, args.address, num_cpus=args.cpus_per_worker,
                          gpu=args.gpu)
    features, _, extractor = merge_statistics(statistics, total if selection is None else len(selection), "images")
    mu, sigma = features.mean_cov()
    payload = save_reference(mu, sigma, n=features.n, extractor_sha256=extractor, resize=resize_of(args.features),
                             dataset_fingerprint=info["fingerprint"], features=args.features, **subset)
    if "/" in name:
        parent, _, leaf = name.rpartition("/")
        open_storage(parent).write_bytes(leaf, payload)
        where = name
    else:
        storage.write_bytes(name, payload)
        where = storage.url(name)
    log.info("done: %s — statistics of %d images (%s)", where, features.n, args.features)
    return 0


def subset_indices(args: argparse.Namespace, total: int) -> tuple[np.ndarray | None, dict]:
    """The sorted dataset indices of `--subset` (None: every image) and their provenance for the .npz."""
    if args.subset is None:
        if args.subset_seed is not None:
            raise ArgumentError("--subset-seed goes with --subset N")
        return None, {}
    if not 1 <= args.subset <= total:
        raise ArgumentError(f"--subset must be between 1 and the {total} images used, got {args.subset}")
    seed = args.subset_seed or 0
    selection = np.sort(np.random.default_rng(seed).choice(total, args.subset, replace=False))
    return selection, {"subset_of": total, "subset_seed": seed,
                       "subset_sha256": hashlib.sha256(selection.astype("<i8").tobytes()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    return command_line(__doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
