"""The training reader: shards split across DDP ranks and loader workers, equal batch counts."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_core.image_prep import Preprocess
from ddpm_core.loader import TrainLoader, assign_shards, batches_per_rank
from ddpm_core.pixels import to_uint8
from ddpm_core.sharding import DatasetError, ShardJob, build_shard, read_manifest
from ddpm_core.sources import LmdbSource
from ddpm_core.storage import open_storage
from tests.datasets import make_lsun_lmdb
from tests.test_sharding import tar_samples


def make_dataset(tmp_path, out: str, n=61, per_shard=6, resolution=16):
    """Shard in-process (no Ray needed here): the same functions the Ray tasks run."""
    lmdb = tmp_path / "lmdb"
    if not lmdb.exists():
        make_lsun_lmdb(lmdb, n=n, corrupt=1, seed=7)
    storage = open_storage(out)
    job = ShardJob(LmdbSource(lmdb), Preprocess(resolution), storage, per_shard=per_shard)
    todo, done = job.pending()
    job.finalize(done + [build_shard(job.source, job.preprocess, plan, "train", storage) for plan in todo])
    return storage


def all_images(storage) -> dict[str, np.ndarray]:
    images = {}
    for row in read_manifest(storage):
        for key, members in tar_samples(storage.read_bytes(row["url"])).items():
            images[key] = np.asarray(Image.open(io.BytesIO(members["png"])))
    return images


def test_assignment_balances_samples_and_is_the_same_on_every_rank():
    rows = [{"url": f"s{i}", "num_samples": 10} for i in range(9)] + [{"url": "last", "num_samples": 3}]
    slots = assign_shards(rows, 4, seed=0, epoch=0)
    assert slots == assign_shards(rows, 4, seed=0, epoch=0)
    assert slots != assign_shards(rows, 4, seed=0, epoch=1)
    assert sorted(r["url"] for s in slots for r in s) == sorted(r["url"] for r in rows)
    totals = sorted(sum(r["num_samples"] for r in s) for s in slots)
    assert totals[-1] - totals[0] <= 10
    assert batches_per_rank(slots, world_size=2, num_workers=2, batch_size=4) >= 10


def test_two_ranks_with_two_workers_read_disjoint_data_covering_the_set_with_equal_batches(tmp_path):
    storage = make_dataset(tmp_path, str(tmp_path / "data"))
    originals = all_images(storage)
    assert len(originals) == 60
    seen, counts = [], []
    for rank in range(2):
        loader = TrainLoader(str(tmp_path / "data"), batch_size=4, rank=rank, world_size=2, num_workers=2, seed=3,
                             random_flip=False, resolution=16)
        keys = []
        for images, batch_keys in loader:
            assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
            assert images.min() >= -1.0 and images.max() <= 1.0
            for image, key in zip(images, batch_keys):  # decoded and scaled exactly: x / 127.5 - 1
                expected = torch.from_numpy(originals[key].copy()).permute(2, 0, 1).float() / 127.5 - 1
                assert torch.equal(image, expected)
            keys += batch_keys
        counts.append((len(loader), len(keys) // 4))
        seen.append(keys)
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    assert len(set(seen[0])) == len(seen[0]) and not set(seen[0]) & set(seen[1])
    covered = set(seen[0]) | set(seen[1])
    assert covered <= set(originals)
    assert len(originals) - len(covered) <= 12  # at most a partial batch per worker is dropped


def test_random_flips_mirror_about_half_the_images_and_epochs_reshuffle_as_a_resumed_loader_would(tmp_path):
    storage = make_dataset(tmp_path, str(tmp_path / "data"))
    originals = all_images(storage)
    loader = TrainLoader(str(tmp_path / "data"), batch_size=5, num_workers=1, seed=1, random_flip=True)
    flipped = kept = 0
    orders = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        order = []
        for images, keys in loader:
            for image, key in zip(images, keys):
                pixels = ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
                if np.array_equal(pixels, originals[key]):
                    kept += 1
                else:
                    assert np.array_equal(pixels, originals[key][:, ::-1])
                    flipped += 1
            order += keys
        orders.append(order)
    assert flipped > 20 and kept > 20
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]
    # The persistent worker's second epoch is the one a new loader (a resumed job) starts at epoch 1.
    resumed = TrainLoader(str(tmp_path / "data"), batch_size=5, num_workers=1, seed=1, random_flip=True)
    resumed.set_epoch(1)
    assert [key for _, keys in resumed for key in keys] == orders[1]


def test_a_grey_loader_reads_the_luminance_and_grey_samples_come_back_as_grey_rgb(tmp_path):
    storage = make_dataset(tmp_path, str(tmp_path / "data"))
    originals = all_images(storage)
    rgb, grey = (TrainLoader(str(tmp_path / "data"), batch_size=4, num_workers=0, seed=2, channels=channels)
                 for channels in (3, 1))
    for (_, keys), (luma, grey_keys) in zip(rgb, grey):
        assert keys == grey_keys and luma.shape == (4, 1, 16, 16)
        levels = []
        for image, key in zip(luma, keys):  # PIL's "L": ITU-R 601 luma in 16-bit fixed point, rounded
            r, g, b = originals[key].astype(np.int64).transpose(2, 0, 1)
            levels.append((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16)
            assert torch.equal(image[0], torch.from_numpy(levels[-1]).float() / 127.5 - 1)
    pixels = to_uint8(luma)  # the last batch back as pixels: each luma level in R, G and B
    assert pixels.shape == (4, 16, 16, 3) and np.array_equal(pixels, np.repeat(np.stack(levels)[..., None], 3, -1))


def test_reading_from_s3_streams_the_same_samples(tmp_path, s3_bucket):
    make_dataset(tmp_path, str(tmp_path / "local"))
    make_dataset(tmp_path, f"s3://{s3_bucket}/data")
    batches = []
    for data in (str(tmp_path / "local"), f"s3://{s3_bucket}/data"):
        loader = TrainLoader(data, batch_size=4, rank=1, world_size=2, num_workers=2, seed=5)
        batches.append([(images, keys) for images, keys in loader])
    assert [k for _, k in batches[0]] == [k for _, k in batches[1]]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(*batches))


def test_bad_datasets_get_one_clear_error(tmp_path):
    make_dataset(tmp_path, str(tmp_path / "data"))
    with pytest.raises(DatasetError, match="holds 16×16 images; the model expects 32×32"):
        TrainLoader(str(tmp_path / "data"), batch_size=4, resolution=32)
    with pytest.raises(DatasetError, match="cannot fill one batch of 64 for each of 2 ranks × 4 loader workers"):
        TrainLoader(str(tmp_path / "data"), batch_size=64, world_size=2, num_workers=4)
    (tmp_path / "data" / "manifest.parquet").unlink()
    with pytest.raises(DatasetError, match="is not a complete dataset: no manifest.parquet"):
        TrainLoader(str(tmp_path / "data"), batch_size=4)
