"""Sharding and loading throughput on a synthetic LSUN-like LMDB of 256×341 JPEGs.

    python bench/shard_throughput.py [--images 2000]

Baseline: a plain single-process PIL loop doing the same decode / centre crop / resize / PNG encode,
run in this same command. Then the Ray sharding job with 1 and 2 parallel tasks (Ray already
started, so its start-up is not counted), then the training loader reading the shards back.
Prints figures only; it never passes or fails on time.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import lmdb

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddpm_core.image_prep import Preprocess, decode_rgb  # noqa: E402
from ddpm_core.loader import TrainLoader  # noqa: E402
from pipelines.ray_runtime import init_ray  # noqa: E402
from pipelines.shard import main as shard_main  # noqa: E402
from tests.datasets import lsun_key, photo_like  # noqa: E402


def make_lmdb(path: Path, count: int) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    env = lmdb.open(str(path), map_size=1 << 32)
    with env.begin(write=True) as txn:
        for i in range(count):
            buffer = io.BytesIO()
            photo_like(rng, 341, 256).save(buffer, format="JPEG", quality=75)  # LSUN: JPEG q75, short side 256
            txn.put(lsun_key(i), buffer.getvalue())
    env.close()


def plain_pil_loop(path: Path) -> int:
    env = lmdb.open(str(path), readonly=True, lock=False)
    prep = Preprocess(256)
    count = 0
    with env.begin() as txn:
        for _, value in txn.cursor():
            image, _ = decode_rgb(bytes(value))
            prep.apply(image)
            count += 1
    env.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-") as tmp:
        root = Path(tmp)
        make_lmdb(root / "lmdb", args.images)
        init_ray(num_cpus=2)

        start = time.perf_counter()
        plain_pil_loop(root / "lmdb")
        baseline = args.images / (time.perf_counter() - start)
        rows = [("plain PIL loop, 1 process", baseline)]
        for parallel in (1, 2):
            start = time.perf_counter()
            code = shard_main(["--source", "lsun", "--input", str(root / "lmdb"), "--out", str(root / f"out{parallel}"),
                               "--per-shard", "100", "--parallel", str(parallel)])
            assert code == 0
            rows.append((f"Ray sharding job, {parallel} task(s)", args.images / (time.perf_counter() - start)))

        loader_rows = []
        for workers in (1, 2):
            loader = TrainLoader(str(root / "out1"), batch_size=32, num_workers=workers, random_flip=True)
            start = time.perf_counter()
            images = sum(len(keys) for _, keys in loader)
            rate = images / (time.perf_counter() - start)
            loader_rows.append((f"TrainLoader, {workers} worker(s)", rate, rate / workers))

    print(f"\n{args.images} synthetic LSUN-like 256x341 JPEGs -> 256x256 PNG shards (2 CPU cores)")
    print(f"{'':36} {'images/s':>9} {'vs plain':>9}")
    for name, rate in rows:
        print(f"{name:36} {rate:9.1f} {rate / baseline:8.2f}x")
    print(f"\n{'reading the shards back':36} {'images/s':>9} {'per worker':>11}")
    for name, rate, per_worker in loader_rows:
        print(f"{name:36} {rate:9.1f} {per_worker:11.1f}")


if __name__ == "__main__":
    main()
