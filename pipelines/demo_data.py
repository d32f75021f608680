"""The demo's built-in dataset: crops of the photographs that installed packages ship, as an LSUN LMDB.

scikit-learn (a dependency of MLflow) ships two photos, `china.jpg` and `flower.jpg`, and matplotlib
ships `grace_hopper.jpg`. Random square crops of them, resized to 64×64 and JPEG-encoded under
LSUN's 40-hex keys, go through exactly the path LSUN takes: `ddpm shard --source lsun`.
"""

from __future__ import annotations

import hashlib
import io
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm_core.sources import write_lmdb

PHOTOS = (("sklearn.datasets", "images/china.jpg"), ("sklearn.datasets", "images/flower.jpg"),
          ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))
CROP_SIDES = (96, 200)  # pixels of the original photo per crop: large enough to hold recognisable structure
STORED_SIDE = 64


def photos() -> list[Image.Image]:
    """The bundled photographs, RGB."""
    loaded = []
    for package, name in PHOTOS:
        with resources.as_file(resources.files(package) / name) as path:
            if not path.is_file():
                raise FileNotFoundError(f"{package} does not ship {name} in this installation")
            loaded.append(Image.open(path).convert("RGB"))
    return loaded


def crops(count: int, seed: int = 0):
    """`count` (LSUN key, JPEG bytes) pairs: random crops, each photo equally often."""
    rng = np.random.default_rng(seed)
    sources = photos()
    for i in range(count):
        photo = sources[i % len(sources)]
        side = int(rng.integers(*CROP_SIDES))
        left = int(rng.integers(0, photo.width - side))
        top = int(rng.integers(0, photo.height - side))
        crop = photo.crop((left, top, left + side, top + side)).resize((STORED_SIDE, STORED_SIDE), Image.LANCZOS)
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=95)
        yield hashlib.sha1(f"demo-{seed}-{i}".encode()).hexdigest().encode("ascii"), buffer.getvalue()


def build_lmdb(path: Path, count: int, seed: int = 0) -> int:
    """Write the dataset as an LSUN-style LMDB at `path`; returns the number of images."""
    path.mkdir(parents=True, exist_ok=True)
    return write_lmdb(path, crops(count, seed), map_size=1 << 30)
