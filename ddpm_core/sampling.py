"""Mass sampling on storage: image i drawn from its own seed, stored in WebDataset tars keyed by index.

    samples.json             model, sampler, steps, spacing, eta, clip, seed, N, bf16: what these samples are
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
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from .config import Config
from .diffusion import SPACINGS, Denoiser, GaussianDiffusion, final_sample
from .errors import UserError
from .rng import image_generators
from .solvers import dpm_solver_pp_2m, unipc
from .storage import Storage, sha256_file

# ddpm: Algorithm 2, all T steps; the others take `steps` of a spacing (ddpm_core/diffusion.py, solvers.py).
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "unipc")
SOLVERS = {"dpmpp_2m": dpm_solver_pp_2m, "unipc": unipc}
SPEC = "samples.json"
LOCK = "_progress/lock.json"  # one sampling job per output (output_lock.py)


class SamplesError(UserError):
    """A sampling output or request that cannot be used, with the reason."""


def bf16_is_fast(device: torch.device | str) -> bool:
    """The default of the bf16 fast path: on for CUDA, and on CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16)."""
    if torch.device(device).type == "cuda":
        return True
    capabilities = torch.cpu.get_capabilities()
    # Without the instructions oneDNN emulates bf16, which is no faster than fp32.
    return torch.backends.mkldnn.is_available() and any(
        capabilities.get(name, False) for name in ("avx512_bf16", "amx_bf16", "bf16"))


def bf16_autocast(model: torch.nn.Module, device: torch.device | str) -> Denoiser:
    """The model with its forward pass under bf16 autocast; the diffusion arithmetic around it stays fp32."""
    device_type = torch.device(device).type

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            return model(x, t)

    return denoise


def sample_images(model: torch.nn.Module, diffusion: GaussianDiffusion, config: Config, indices: Sequence[int],
                  seed: int, sampler: str = "ddpm", steps: int = 50, eta: float = 0.0,
                  device: torch.device | str = "cpu", bf16: bool = False, spacing: str = "linspace",
                  clip: bool | None = None) -> torch.Tensor:
    """Images in [-1, 1] for `indices`: the paper's ancestral sampler (all T steps), DDIM (η = `eta`),
    DPM-Solver++(2M) or UniPC, the last three at `steps` timesteps of `spacing`.

    `clip` clips x̂0 to [-1, 1] (default: the configuration's `clip_denoised`). `bf16` runs the network under
    bf16 autocast: faster on CUDA and bf16 CPUs (bench/vs_diffusers.py), and the images differ slightly from
    fp32 ones (bench/sampler_table.py).
    """
    if sampler not in SAMPLERS:
        raise SamplesError(f"sampler {sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if spacing not in SPACINGS:
        raise SamplesError(f"spacing {spacing!r} is unknown; choose one of {', '.join(SPACINGS)}")
    r = config.model.resolution
    shape = (len(indices), config.model.in_channels, r, r)
    generators = image_generators(seed, indices, device)
    denoiser = bf16_autocast(model, device) if bf16 else model
    if sampler == "ddpm":
        return diffusion.p_sample_loop(denoiser, shape, generators, device, clip_denoised=clip)
    if sampler == "ddim":
        return diffusion.ddim_sample_loop(denoiser, shape, steps=steps, eta=eta, generators=generators, device=device,
                                          spacing=spacing, clip_denoised=clip)
    chain = SOLVERS[sampler](diffusion, denoiser, shape, steps, spacing, generators=generators, device=device,
                             clip_denoised=clip)
    return final_sample(chain, steps)


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
    bf16: bool = False  # network under bf16 autocast; specs written before this field were fp32
    spacing: str = "linspace"  # the step-time spacing; specs before it were DDIM's linspace (ddpm: every step)
    clip: bool = True  # x̂0 clipped to [-1, 1]; specs before it clipped (every preset's clip_denoised)

    def tars(self) -> list[tuple[int, int, int]]:
        """(tar index, first image index, image count) for every tar."""
        return [(k, start, min(self.per_tar, self.num - start))
                for k, start in enumerate(range(0, self.num, self.per_tar))]


# Fields added after the first specs were written, with the value those specs meant.
SPEC_DEFAULTS = {f.name: f.default for f in fields(SampleSpec) if f.default is not MISSING}


def tar_name(k: int) -> str:
    return f"samples/{k:06d}.tar"


def _progress_name(k: int) -> str:
    return f"_progress/{k:06d}.json"


def prepare_output(storage: Storage, spec: SampleSpec) -> list[int]:
    """Check the output and return the tar indices already finished (size and sha256 verified)."""
    wanted = asdict(spec)
    if storage.exists(SPEC):
        existing = {**SPEC_DEFAULTS, **json.loads(storage.read_bytes(SPEC))}
        if existing != wanted:
            differences = ", ".join(f"{key} {existing.get(key)!r} there, {wanted.get(key)!r} asked"
                                    for key in sorted(existing.keys() | wanted.keys())
                                    if existing.get(key) != wanted.get(key))
            raise SamplesError(f"output {storage.uri} holds samples of another model or setting ({differences}); "
                               "choose another --out")
    elif storage.list("samples/"):
        raise SamplesError(f"output {storage.uri} already holds sample tars without a {SPEC}; choose another --out")
    elif foreign := [name for name in storage.list() if not name.startswith("_progress/")]:
        raise SamplesError(f"output {storage.uri} already holds other files ({foreign[0]}, {len(foreign)} in all) "
                           "and no samples; choose an empty or new --out")
    else:
        storage.write_bytes(SPEC, json.dumps(wanted, sort_keys=True).encode())
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
