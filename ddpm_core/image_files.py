"""Images on disk to score (`ddpm fid --images`): folders of PNG/JPEG files and sample tars.

A path is a folder (its PNG and JPEG files and its .tar files, found at any depth, in sorted order) or a tar
(its PNG and JPEG members: the sampling job's samples/*.tar, a WebDataset shard). Every image is decoded to
RGB uint8 (EXIF orientation applied, as the sharding job does) and goes to the FID network as the sampling
job's samples do, at its own size (the network's TF1 resize to 299 is the one step between).
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .image_prep import ImageRejected, decode_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PER_CHUNK = 500  # files of a folder per unit of work (a tar is one unit)


class ImageSetError(UserError):
    """Images that cannot be scored as one set, with the reason."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def image_chunks(paths: list[str]) -> list[dict]:
    """Units of work over `paths`: {"tar": a tar's path} or {"files": image paths joined by newlines}, each with
    "first", the index of its first image. A tar's images are counted when it is read (`count` is None)."""
    chunks, files = [], []
    for given in paths:
        path = Path(given).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            files += [str(p) for p in found if is_image_name(p.name)]
            chunks += [{"tar": str(p)} for p in found if p.name.endswith(".tar")]
        elif path.is_file() and (is_image_name(path.name) or path.name.endswith(".tar")):
            (files.append(str(path)) if is_image_name(path.name) else chunks.append({"tar": str(path)}))
        elif path.exists():
            raise ImageSetError(f"--images {given} is not a folder, a PNG/JPEG file or a tar")
        else:
            raise ImageSetError(f"--images {given} does not exist")
    chunks += [{"files": "\n".join(files[i:i + PER_CHUNK])} for i in range(0, len(files), PER_CHUNK)]
    counts = [tar_image_count(chunk["tar"]) if "tar" in chunk else chunk["files"].count("\n") + 1 for chunk in chunks]
    if not sum(counts):
        raise ImageSetError(f"--images {' '.join(paths)}: no PNG or JPEG images (nor tars holding any) there")
    firsts = np.cumsum([0, *counts])
    return [{"tar": "", "files": "", **chunk, "first": int(first), "count": count}
            for chunk, first, count in zip(chunks, firsts, counts)]


def tar_image_count(path: str) -> int:
    try:
        with tarfile.open(path) as tar:
            return sum(1 for member in tar if member.isfile() and is_image_name(member.name))
    except (tarfile.TarError, OSError) as error:
        raise ImageSetError(f"--images {path} is not a readable tar: {error}") from None


def read_chunk(tar: str, files: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images of one chunk of `image_chunks` as (positions in the chunk, uint8 images (N, H, W, 3)), one
    pair per image size (a batch of the FID network has one size)."""
    if tar:
        with tarfile.open(tar) as archive:
            named = [(f"{tar}:{m.name}", archive.extractfile(m).read()) for m in sorted(
                (m for m in archive if m.isfile() and is_image_name(m.name)), key=lambda m: m.name)]
    else:
        named = [(name, Path(name).read_bytes()) for name in files.split("\n")]
    images = []
    for name, data in named:
        try:
            images.append(np.asarray(decode_rgb(data)[0]))
        except ImageRejected as error:
            raise ImageSetError(f"{name}: {error}") from None
    shapes = sorted({image.shape for image in images})
    return [(positions, np.stack([images[i] for i in positions])) for positions in (
        np.array([i for i, image in enumerate(images) if image.shape == shape]) for shape in shapes)]
