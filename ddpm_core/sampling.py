"""Mass sampling on storage: image i drawn from its own seed, stored in WebDataset tars keyed by index.

    samples.json             model, sampler, steps, eta, seed, N: what these samples are
    samples/000000.tar       <index:08d>.png for indices [k·per_tar, (k+1)·per_tar)
    _progress/000000.json    size and sha256 of each finished tar (a re-run skips those)

Whatever the number of actors or the batch size, image i is the same: its noise comes only from a
generator seeded with (seed, i), and it is quantised as the paper's evaluation (uint8, rounded).
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from .config import Config
from .diffusion import GaussianDiffusion
from .rng import image_generators
from .storage import Storage, sha256_file

SAMPLERS = ("ddpm", "ddim")
SPEC = "samples.json"


class SamplesError(ValueError):
    """A sampling output or request that cannot be used, with the reason."""


def sample_images(model: torch.nn.Module, diffusion: GaussianDiffusion, config: Config, indices: Sequence[int],
                  seed: int, sampler: str = "ddpm", steps: int = 50, eta: float = 0.0,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Images in [-1, 1] for `indices`: the paper's ancestral sampler (all T steps) or DDIM."""
    r = config.model.resolution
    shape = (len(indices), config.model.in_channels, r, r)
    generators = image_generators(seed, indices, device)
    if sampler == "ddpm":
        return diffusion.p_sample_loop(model, shape, generators, device)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(model, shape, steps=steps, eta=eta, generators=generators, device=device)
    raise SamplesError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")


@dataclass(frozen=True)
class SampleSpec:
    """What a sample set is; a re-run must match it to reuse the tars."""

    model: str  # the resolved model: models:/<name>/<version> or a checkpoint path
    sampler: str
    steps: int
    eta: float
    seed: int
    num: int
    per_tar: int
    resolution: int

    def tars(self) -> list[tuple[int, int, int]]:
        """(tar index, first image index, image count) for every tar."""
        return [(k, start, min(self.per_tar, self.num - start))
                for k, start in enumerate(range(0, self.num, self.per_tar))]


def tar_name(k: int) -> str:
    return f"samples/{k:06d}.tar"


def _progress_name(k: int) -> str:
    return f"_progress/{k:06d}.json"


def prepare_output(storage: Storage, spec: SampleSpec) -> list[int]:
    """Check the output and return the tar indices already finished (size and sha256 verified)."""
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if storage.exists(SPEC):
        existing = json.loads(storage.read_bytes(SPEC))
        if json.dumps(existing, sort_keys=True) != wanted:
            raise SamplesError(f"output {storage.uri} holds samples of another model or setting "
                               f"({existing.get('model')}, {existing.get('sampler')}, seed {existing.get('seed')}, "
                               f"N {existing.get('num')}); choose another --out")
    elif storage.list("samples/"):
        raise SamplesError(f"output {storage.uri} already holds sample tars without a {SPEC}; choose another --out")
    else:
        storage.write_bytes(SPEC, wanted.encode())
    finished = []
    for k, _, _ in spec.tars():
        if not storage.exists(_progress_name(k)):
            continue
        record = json.loads(storage.read_bytes(_progress_name(k)))
        if storage.size(tar_name(k)) == record["size_bytes"] and storage.stored_sha256(tar_name(k)) == record["sha256"]:
            finished.append(k)
    return finished


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def write_sample_tar(storage: Storage, k: int, indices: Sequence[int], images: np.ndarray) -> None:
    """Store uint8 images (N, H, W, 3) as tar k, then its progress record (the commit)."""
    with tempfile.TemporaryDirectory(prefix="ddpm-samples-") as scratch:
        local = Path(scratch) / "samples.tar"
        with open(local, "wb") as stream, wds.TarWriter(stream, mtime=0.0, user="", group="", encoder=False) as tar:
            for index, image in zip(indices, images):
                tar.write({"__key__": f"{index:08d}", "png": encode_png(image)})
        digest = sha256_file(local)
        storage.upload(local, tar_name(k), digest)
        record = {"size_bytes": local.stat().st_size, "sha256": digest, "count": len(indices)}
    storage.write_bytes(_progress_name(k), json.dumps(record, sort_keys=True).encode())


def read_sample_tar(storage: Storage, k: int) -> tuple[list[int], np.ndarray]:
    """Indices and uint8 images (N, H, W, 3) of tar k."""
    indices, images = [], []
    with storage.open_read(tar_name(k)) as stream:
        members = tar_file_expander(iter([{"url": storage.url(tar_name(k)), "stream": stream}]))
        for sample in group_by_keys(members):
            indices.append(int(sample["__key__"]))
            images.append(np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
    return indices, np.stack(images)
