"""The demo's built-in dataset: scikit-learn's handwritten digits, upscaled, as an LSUN LMDB.

scikit-learn (a dependency of MLflow) ships 1,797 digits of 8×8 pixels in 17 grey levels. Each is
upscaled to 64×64 (bicubic: smooth strokes), white on black, JPEG-encoded under LSUN's 40-hex keys,
and goes through exactly the path LSUN takes: `ddpm shard --source lsun`. Shapes that a small model
learns in minutes on a CPU, and that anyone can check by eye (the bundled photos were textures
whose crops a short run turned into colour blobs).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_core.sources import write_lmdb

STORED_SIDE = 64


def digit_images() -> np.ndarray:
    """scikit-learn's digits as uint8 (N, 8, 8), 0 black to 255 white."""
    from sklearn.datasets import load_digits

    return np.round(load_digits().images * (255 / 16)).astype(np.uint8)


def digits(count: int):
    """`count` (LSUN key, JPEG bytes) pairs: the first `count` digits, upscaled to STORED_SIDE, grey RGB."""
    images = digit_images()
    if not 1 <= count <= len(images):
        raise ValueError(f"the demo dataset holds 1..{len(images)} digits, not {count}")
    for i in range(count):
        image = Image.fromarray(images[i]).resize((STORED_SIDE, STORED_SIDE), Image.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        yield hashlib.sha1(f"demo-digit-{i}".encode()).hexdigest().encode("ascii"), buffer.getvalue()


def build_lmdb(path: Path, count: int) -> int:
    """Write the dataset as an LSUN-style LMDB at `path`; returns the number of images."""
    path.mkdir(parents=True, exist_ok=True)
    return write_lmdb(path, digits(count), map_size=1 << 30)
