"""Image sources for sharding: LSUN LMDB, image folders and zips (CelebA-HQ), CIFAR-10 python batches.

A source is opened on the driver, which only lists it (LMDB keys without values, file names) to
cut it into shard plans with a deterministic assignment: LMDB key ranges, slices of the sorted
file list, index ranges of CIFAR. Each shard task re-opens the source and reads its own range.
An input over MAX_INPUT_BYTES is rejected from its recorded size, before it is read.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .image_prep import ImageRejected, decode_rgb, to_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
# Far above any real photo (LSUN's are ~50 KB, CelebA-HQ's 1024² PNGs a few MB): a bigger value or
# zip member is not read into memory at all.
MAX_INPUT_BYTES = 256 * 1024 * 1024
# A key made of these is its own tar member name (LSUN's 40-hex keys); see `lmdb_member_key`.
_MEMBER_KEY = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]*")


class SourceError(UserError):
    """An input that cannot be sharded at all (missing, empty, wrong format), with the reason."""


@dataclass(frozen=True)
class ShardPlan:
    """Which inputs go to shard `index`: `spec` is source-specific and small (a key range or names)."""

    index: int
    count: int
    spec: Any


@dataclass
class Record:
    """One input: a stable key, encoded bytes or decoded pixels, and what the json should say of it."""

    key: str
    data: bytes | None = None
    image: Image.Image | None = None
    meta: dict = field(default_factory=dict)


def _slices(total: int, per_shard: int) -> list[tuple[int, int]]:
    return [(start, min(per_shard, total - start)) for start in range(0, total, per_shard)]


def _oversize(size: int) -> str | None:
    """The reject reason for an input of `size` bytes, None when it may be read."""
    return f"{size} bytes is over the {MAX_INPUT_BYTES}-byte limit" if size > MAX_INPUT_BYTES else None


def lmdb_member_key(key: bytes) -> str:
    """The sample key (tar member name) of an LMDB key: itself when it is letters, digits, '-' and '_' only,
    else '_' and its hex, since '/', '..', dots (webdataset splits names at the first) and control bytes
    must never reach a member name. The leading '_' keeps the two forms from ever colliding."""
    text = key.decode("ascii", "replace")
    return text if _MEMBER_KEY.fullmatch(text) else "_" + key.hex()


class Source(ABC):
    kind: str

    @abstractmethod
    def describe(self) -> dict:
        """What the dataset records of its source (kind, path, entries)."""

    @abstractmethod
    def plan(self, per_shard: int, limit: int | None) -> list[ShardPlan]:
        """Cut the first `limit` inputs (all when None) into shards of `per_shard`."""

    @abstractmethod
    def read(self, plan: ShardPlan) -> Iterator[Record]:
        """The records of one shard, in order; runs inside the shard's task."""


class LmdbSource(Source):
    """An LSUN LMDB (`<category>_train_lmdb/`): 40-hex ASCII keys, JPEG or WebP bytes as values.

    The json's `source_key` is the key as text (UTF-8; other bytes as \\x escapes); its member name comes
    from `lmdb_member_key`.
    """

    kind = "lsun"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise SourceError(f"LMDB {self.path} does not exist")
        data_file = self.path / "data.mdb" if self.path.is_dir() else self.path
        if not data_file.is_file():
            raise SourceError(f"{self.path} is not an LMDB: no data.mdb inside")
        with self._open() as env:
            self.entries = env.stat()["entries"]
        if self.entries == 0:
            raise SourceError(f"LMDB {self.path} is empty")

    def _open(self):
        import lmdb

        try:
            # Read-only and lock-free: many tasks read the same LMDB at once.
            return lmdb.open(str(self.path), subdir=self.path.is_dir(), readonly=True, lock=False,
                             readahead=False, meminit=False, max_readers=512)
        except lmdb.Error as error:
            raise SourceError(f"{self.path} is not a readable LMDB: {error}") from None

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "entries": self.entries}

    def plan(self, per_shard: int, limit: int | None) -> list[ShardPlan]:
        total = self.entries if limit is None else min(limit, self.entries)
        plans = []
        with self._open() as env, env.begin() as txn:
            # Keys only: values of real LSUN images sit in overflow pages that this never touches.
            for position, key in enumerate(txn.cursor().iternext(keys=True, values=False)):
                if position >= total:
                    break
                if position % per_shard == 0:
                    # latin-1 maps each byte to one character: any key round-trips, an ASCII one is unchanged.
                    plans.append(ShardPlan(len(plans), min(per_shard, total - position), key.decode("latin-1")))
        return plans

    def read(self, plan: ShardPlan) -> Iterator[Record]:
        # buffers=True: values are views into the map, so a value's size is known before its pages are read.
        with self._open() as env, env.begin(buffers=True) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(plan.spec.encode("latin-1")):
                return
            for _ in range(plan.count):
                key, value = bytes(cursor.key()), cursor.value()
                record = Record(key=lmdb_member_key(key),
                                meta={"source_key": key.decode("utf-8", "backslashreplace")})
                if error := _oversize(len(value)):
                    record.meta["error"] = error
                else:
                    record.data = bytes(value)
                yield record
                if not cursor.next():
                    return


def write_lmdb(path: Path, items: Iterator[tuple[bytes, bytes]], map_size: int = 1 << 30) -> int:
    """Write (key, encoded image) pairs as an LMDB in LSUN's layout; returns the number written."""
    import lmdb

    count = 0
    env = lmdb.open(str(path), map_size=map_size)
    try:
        with env.begin(write=True) as txn:
            for key, value in items:
                txn.put(key, value)
                count += 1
    finally:
        env.close()
    return count


def file_key(relative: str) -> str:
    """A WebDataset key from a relative path: no extension, and no dots in the base name."""
    stem = relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative
    folder, _, name = stem.rpartition("/")
    name = name.replace(".", "_")
    return f"{folder}/{name}" if folder else name


class FolderSource(Source):
    """Images (jpg/png/webp) under a folder, recursively, or inside a zip; sorted by relative path."""

    def __init__(self, path: str | Path, kind: str = "folder"):
        self.kind = kind
        self.path = Path(path).expanduser().resolve()
        if not self.path.exists():
            raise SourceError(f"image folder {self.path} does not exist")
        if self.path.is_file() and not zipfile.is_zipfile(self.path):
            raise SourceError(f"{self.path} is neither a folder nor a zip of images")
        self.names = self._list()
        if not self.names:
            raise SourceError(f"no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images under {self.path}")

    def _list(self) -> list[str]:
        if self.path.is_file():
            with zipfile.ZipFile(self.path) as archive:
                names = [n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES)]
        else:
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*")
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        return sorted(names)

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "entries": len(self.names)}

    def plan(self, per_shard: int, limit: int | None) -> list[ShardPlan]:
        names = self.names if limit is None else self.names[:limit]
        return [ShardPlan(i, count, tuple(names[start:start + count]))
                for i, (start, count) in enumerate(_slices(len(names), per_shard))]

    def read(self, plan: ShardPlan) -> Iterator[Record]:
        archive = zipfile.ZipFile(self.path) if self.path.is_file() else None
        try:
            for name in plan.spec:
                record = Record(key=file_key(name), meta={"source_key": name})
                try:
                    size = archive.getinfo(name).file_size if archive else (self.path / name).stat().st_size
                    if error := _oversize(size):
                        record.meta["error"] = error
                    elif archive:
                        with archive.open(name) as member:
                            # At most the size checked: a forged header never gets a bigger stream inflated.
                            record.data = member.read(size)
                    else:
                        record.data = (self.path / name).read_bytes()
                except Exception as error:  # noqa: BLE001 - an unreadable input (bad CRC, I/O) is a reject
                    record.meta["error"] = f"unreadable: {error}"
                yield record
        finally:
            if archive:
                archive.close()


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow only what a dict of numpy arrays needs, nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    """(N, 32, 32, 3) uint8 images and labels of one official python batch, without unsafe unpickling."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[b"labels"]
    except (pickle.UnpicklingError, KeyError, EOFError, TypeError) as error:
        raise SourceError(f"{path} is not a CIFAR-10 python batch: {error}") from None
    return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), list(labels)


class CifarSource(Source):
    """The CIFAR-10 python batches (`cifar-10-batches-py/`); keys are the split's image index."""

    kind = "cifar10"

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path).expanduser().resolve()
        if (self.path / "cifar-10-batches-py").is_dir():
            self.path = self.path / "cifar-10-batches-py"
        if split not in CIFAR_BATCHES:
            raise SourceError(f"CIFAR-10 split {split!r} is unknown; choose train or test")
        self.split = split
        self.files = [self.path / name for name in CIFAR_BATCHES[split]]
        missing = [f.name for f in self.files if not f.is_file()]
        if missing:
            raise SourceError(f"{self.path} is not a CIFAR-10 python folder: missing {', '.join(missing)}")
        self.sizes = [len(load_cifar_batch(f)[1]) for f in self.files]

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "split": self.split, "entries": sum(self.sizes)}

    def plan(self, per_shard: int, limit: int | None) -> list[ShardPlan]:
        total = sum(self.sizes) if limit is None else min(limit, sum(self.sizes))
        return [ShardPlan(i, count, start) for i, (start, count) in enumerate(_slices(total, per_shard))]

    def read(self, plan: ShardPlan) -> Iterator[Record]:
        offset = 0
        for path, size in zip(self.files, self.sizes):
            lo, hi = max(plan.spec - offset, 0), min(plan.spec + plan.count - offset, size)
            if lo < hi:
                images, labels = load_cifar_batch(path)
                for i in range(lo, hi):
                    index = offset + i
                    yield Record(key=f"{index:05d}", image=Image.fromarray(images[i]),
                                 meta={"source_key": f"{self.split}/{index}", "label": labels[i]})
            offset += size


def open_source(kind: str, path: str | Path, split: str = "train") -> Source:
    if kind == "lsun":
        return LmdbSource(path)
    if kind in ("folder", "celebahq"):
        return FolderSource(path, kind=kind)
    if kind == "cifar10":
        return CifarSource(path, split=split)
    raise SourceError(f"source {kind!r} is unknown; choose lsun, celebahq, folder or cifar10")


def decode_record(record: Record) -> Image.Image:
    """The record's pixels, decoding bytes when needed (raises ImageRejected)."""
    if "error" in record.meta:
        raise ImageRejected(record.meta["error"])
    if record.image is not None:
        return to_rgb(record.image)
    image, kind = decode_rgb(record.data)
    record.meta["source_format"] = kind
    return image
