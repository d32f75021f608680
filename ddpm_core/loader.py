"""Reading a sharded dataset for training: a WebDataset pipeline per DDP rank and loader worker.

Every epoch the manifest's shards are shuffled with (seed, epoch) and dealt to the
world_size × num_workers slots, balancing sample counts; each slot streams its tars (local files,
or S3 through boto3: no AWS CLI on the nodes), checking each against the manifest's sha256 as it
reads it, shuffles samples in a buffer, decodes, flips when asked, scales to [-1, 1] and batches.
All ranks compute the same plan, so each knows how many batches every rank can fill and yields
exactly that many: no rank waits at the end of an epoch for another (the DDP hang). The few samples
that do not fill a batch are dropped.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from .sharding import DatasetError, ShardReader, read_dataset_info, read_manifest
from .storage import Storage, StorageError, open_storage


def assign_shards(rows: list[dict], slots: int, seed: int, epoch: int) -> list[list[dict]]:
    """Deal shards to `slots` readers: shuffled by (seed, epoch), each to the least-filled slot."""
    order = np.random.default_rng([seed, epoch]).permutation(len(rows))
    assigned: list[list[dict]] = [[] for _ in range(slots)]
    filled = [0] * slots
    for index in order:
        slot = min(range(slots), key=lambda s: (filled[s], s))
        assigned[slot].append(rows[index])
        filled[slot] += rows[index]["num_samples"]
    return assigned


def batches_per_rank(assigned: list[list[dict]], world_size: int, num_workers: int, batch_size: int) -> int:
    """Batches every rank can fill this epoch: the smallest rank's Σ_workers ⌊samples / batch⌋."""
    per_slot = [sum(row["num_samples"] for row in rows) // batch_size for rows in assigned]
    return min(sum(per_slot[r * num_workers:(r + 1) * num_workers]) for r in range(world_size))


def decode_image(data: bytes, channels: int = 3) -> np.ndarray:
    """PNG or WebP bytes → uint8 (H, W, channels): RGB, or its luminance (ITU-R 601) for a grey model."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    return array if channels == 3 else array[:, :, None]


def shard_samples(storage: Storage, rows: list[dict]) -> Iterator[dict]:
    """The samples of these manifest rows in order; each shard's bytes are checked as they are read."""
    for row in rows:
        with ShardReader(storage, row) as stream:
            yield from group_by_keys(tar_file_expander(iter([{"url": stream.url, "stream": stream}])))


class ShardStream(IterableDataset):
    """The batches of one rank's DataLoader worker, as (images in [-1, 1], keys)."""

    def __init__(self, storage: Storage, rows: list[dict], batch_size: int, rank: int, world_size: int,
                 num_workers: int, seed: int, random_flip: bool, shuffle_buffer: int, channels: int):
        self.storage, self.rows, self.batch_size, self.channels = storage, rows, batch_size, channels
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.random_flip, self.shuffle_buffer = seed, random_flip, shuffle_buffer
        # In shared memory: persistent loader workers hold their own copy of this object, and read the
        # epoch that `TrainLoader.set_epoch` wrote here each time a new epoch's iteration starts.
        self.shared_epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self.shared_epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.shared_epoch.fill_(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        info = get_worker_info()
        worker = info.id if info else 0
        slot = self.rank * self.num_workers + worker
        epoch = self.epoch
        assigned = assign_shards(self.rows, self.world_size * self.num_workers, self.seed, epoch)[slot]
        stream_seed = int(np.random.SeedSequence([self.seed, epoch, slot]).generate_state(1)[0])
        samples = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100),
                              seed=stream_seed)(shard_samples(self.storage, assigned))
        flips = random.Random(stream_seed + 1)
        images, keys = [], []
        for sample in samples:
            data = sample.get("png") or sample.get("webp")
            if data is None:
                raise DatasetError(f"sample {sample['__key__']} in {sample.get('__url__')} has no png or webp image")
            array = decode_image(data, self.channels)
            if self.random_flip and flips.random() < 0.5:
                array = array[:, ::-1]
            images.append(torch.from_numpy(array.copy()).permute(2, 0, 1))
            keys.append(sample["__key__"])
            if len(images) == self.batch_size:
                yield torch.stack(images).float() / 127.5 - 1.0, keys
                images, keys = [], []


class TrainLoader:
    """Batches of one DDP rank, the same count on every rank; call `set_epoch` before each epoch.

    `channels` 1 reads every image as its luminance, for a grey model (`model.in_channels=1`).
    """

    def __init__(self, data: str, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 seed: int = 0, random_flip: bool = False, shuffle_buffer: int = 1000,
                 resolution: int | None = None, channels: int = 3):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        storage = open_storage(data)
        try:
            rows = read_manifest(storage)
            info = read_dataset_info(storage)
        except StorageError as error:
            raise DatasetError(f"cannot read dataset {data}: {error}") from None
        if resolution is not None and info["resolution"] != resolution:
            raise DatasetError(f"dataset {data} holds {info['resolution']}×{info['resolution']} images; "
                               f"the model expects {resolution}×{resolution}")
        self.info, self.rows = info, rows
        self.num_workers, self.world_size, self.batch_size = num_workers, world_size, batch_size
        self.seed = seed
        self.dataset = ShardStream(storage, rows, batch_size, rank, world_size, max(num_workers, 1), seed, random_flip,
                                   shuffle_buffer, channels)
        # Workers outlive the epoch: restarting them and refilling their shuffle buffers cost a few
        # steps' time at every epoch boundary of a small data set.
        self.loader = DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers else None)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.epoch = epoch
        slots = self.world_size * max(self.num_workers, 1)
        assigned = assign_shards(self.rows, slots, self.seed, epoch)
        self.batches = batches_per_rank(assigned, self.world_size, max(self.num_workers, 1), self.batch_size)
        if self.batches == 0:
            raise DatasetError(
                f"{len(self.rows)} shards holding {sum(r['num_samples'] for r in self.rows)} samples cannot fill one "
                f"batch of {self.batch_size} for each of {self.world_size} ranks × {max(self.num_workers, 1)} "
                "loader workers; use smaller shards, fewer loader workers or a smaller batch")

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        return itertools.islice(iter(self.loader), self.batches)
