"""Small real datasets the tests make themselves: an LSUN-style LMDB, an image folder, CIFAR-10 batches."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_core.sources import write_lmdb


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients plus noise: compresses like a photo, differs image to image."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.2, 1) + y * rng.uniform(0.2, 1)) % 256 for _ in range(3)], axis=-1)
    noisy = base + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90) if fmt in ("JPEG", "WEBP") else image.save(buffer, format=fmt)
    return buffer.getvalue()


def lsun_key(i: int) -> bytes:
    return hashlib.sha1(f"image-{i}".encode()).hexdigest().encode("ascii")  # 40 hex characters


def make_lsun_lmdb(path: Path, n: int = 36, corrupt: int = 1, seed: int = 0) -> dict[str, str]:
    """An LSUN-like LMDB: mixed JPEG/WebP, non-square, one grayscale, one CMYK, `corrupt` broken values.

    Returns key -> what the value is ("jpeg", "webp", "gray", "cmyk", "corrupt").
    """
    rng = np.random.default_rng(seed)
    kinds = {}

    def items():
        for i in range(n):
            size = [(341, 256), (256, 341), (300, 280)][i % 3]
            image = photo_like(rng, *size)
            if i == 3:
                kind, value = "gray", encode(image.convert("L"), "JPEG")
            elif i == 4:
                kind, value = "cmyk", encode(image.convert("CMYK"), "JPEG")
            elif i % 2:
                kind, value = "webp", encode(image, "WEBP")
            else:
                kind, value = "jpeg", encode(image, "JPEG")
            if i < corrupt:
                kind, value = "corrupt", value[: len(value) // 3]  # a truncated JPEG
            key = lsun_key(i)
            kinds[key.decode()] = kind
            yield key, value

    write_lmdb(path, items())
    return kinds


def make_image_folder(root: Path, seed: int = 1) -> dict[str, str]:
    """Nested jpg/png/webp images, one broken .jpg, one text file; returns relative path -> kind."""
    rng = np.random.default_rng(seed)
    files = {
        "a/cat.0001.jpg": "JPEG", "a/b/dog.png": "PNG", "c.webp": "WEBP", "z/upper.JPG": "JPEG",
        "rgba.png": "RGBA", "broken.jpg": "broken",
    }
    for relative, kind in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        image = photo_like(rng, 48, 40)
        if kind == "broken":
            path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        elif kind == "RGBA":
            rgba = image.convert("RGBA")
            rgba.putalpha(128)
            rgba.save(path)
        else:
            path.write_bytes(encode(image, kind))
    (root / "notes.txt").write_text("not an image")
    return files


def make_cifar_batches(root: Path, per_batch: int = 12, seed: int = 2) -> np.ndarray:
    """CIFAR-10 python batches in the official layout (pickled dicts, protocol 2); returns all train images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, per_batch).tolist(),
                 b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return np.concatenate(images)
