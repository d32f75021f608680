"""Build a dataset on storage (shared/DESIGN.md, "Dataset on storage") from a `Source`.

    shards/<split>-<NNNNNN>.tar   WebDataset tars: <key>.png|webp + <key>.json, sorted, mtime 0
    manifest.parquet              one row per shard; written last: without it the dataset is incomplete
    rejects.parquet               every input that could not be used, with the reason
    dataset.json                  source, preprocessing, counts, content fingerprint
    _progress/                    the job's spec, one record per finished shard (for resume), the writer's lock

`ShardJob.pending()` runs on the driver, `build_shard` once per shard anywhere (a Ray task),
`ShardJob.finalize` on the driver at the end. Same input and options → byte-identical shards and
manifest; a re-run skips the shards whose record, size and sha256 check out and builds the others
again, also in a complete dataset. One job writes an output at a time (`_progress/lock.json`).
Readers open shards with `ShardReader`, which checks the bytes they read against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from .errors import UserError
from .image_prep import ImageRejected, Preprocess
from .output_lock import OutputLock
from .sources import ShardPlan, Source, decode_record
from .storage import Storage, sha256_file

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
DATASET_JSON = "dataset.json"
PROGRESS = "_progress"
LOCK = f"{PROGRESS}/lock.json"
FORMAT_VERSION = 1
DATASET_KEYS = ("counts", "encoding", "fingerprint", "resolution", "spec")

MANIFEST_SCHEMA = pa.schema([
    ("shard_index", pa.int32()), ("split", pa.string()), ("url", pa.string()), ("num_samples", pa.int32()),
    ("size_bytes", pa.int64()), ("sha256", pa.string()), ("first_key", pa.string()), ("last_key", pa.string()),
])
REJECTS_SCHEMA = pa.schema([
    ("shard_index", pa.int32()), ("key", pa.string()), ("source_key", pa.string()), ("reason", pa.string()),
])


class DatasetError(UserError):
    """An output that cannot take this dataset, or a dataset that cannot be read, with the reason."""


@dataclass(frozen=True)
class ShardResult:
    index: int
    url: str  # relative to the dataset root, so a dataset can be moved or copied as a whole
    num_samples: int
    size_bytes: int
    sha256: str
    first_key: str
    last_key: str
    rejects: tuple[tuple[str, str, str], ...]  # (key, source_key, reason)


def shard_name(split: str, index: int) -> str:
    return f"shards/{split}-{index:06d}.tar"


def _progress_name(split: str, index: int) -> str:
    return f"{PROGRESS}/{split}-{index:06d}.json"


def build_shard(source: Source, preprocess: Preprocess, plan: ShardPlan, split: str, storage: Storage) -> ShardResult:
    """Write one shard: read its inputs, preprocess, tar them deterministically, upload, record it."""
    rejects: list[tuple[str, str, str]] = []
    keys: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ddpm-shard-") as tmp:
        local = Path(tmp) / "shard.tar"
        with open(local, "wb") as stream, wds.TarWriter(stream, mtime=0.0, user="", group="", encoder=False) as tar:
            for record in source.read(plan):
                try:
                    encoded, meta = preprocess.apply(decode_record(record))
                except ImageRejected as error:
                    rejects.append((record.key, record.meta.get("source_key", record.key), str(error)))
                    continue
                info = {**record.meta, **meta}
                tar.write({"__key__": record.key, preprocess.encoding: encoded,
                           "json": json.dumps(info, sort_keys=True).encode()})
                keys.append(record.key)
        digest = sha256_file(local)
        name = shard_name(split, plan.index)
        storage.upload(local, name, digest)
        result = ShardResult(plan.index, name, len(keys), local.stat().st_size, digest,
                             keys[0] if keys else "", keys[-1] if keys else "", tuple(rejects))
    storage.write_bytes(_progress_name(split, plan.index), json.dumps(asdict(result), sort_keys=True).encode())
    return result


class ShardReader:
    """A shard's bytes as they are read, hashed on the way (no second read).

    Use it in a `with` block: at its end the rest of the stream (a tar reader stops at the end-of-archive
    blocks) is hashed too, and a digest other than the manifest's raises DatasetError naming both.
    """

    def __init__(self, storage: Storage, row: dict):
        self.url, self.expected = storage.url(row["url"]), row["sha256"]
        self.digest = hashlib.sha256()
        try:
            self.stream = storage.open_read(row["url"])
        except FileNotFoundError:
            raise DatasetError(f"shard {self.url} listed in {MANIFEST} is missing; "
                               "re-run the sharding job on this output to rebuild it") from None

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(None if size < 0 else size)
        self.digest.update(data)
        return data

    def verify(self) -> None:
        while self.read(1 << 20):
            pass
        actual = self.digest.hexdigest()
        if actual != self.expected:
            raise DatasetError(f"shard {self.url} is not the one in {MANIFEST}: its bytes have sha256 {actual}, "
                               f"the manifest says {self.expected}; re-run the sharding job on this output to "
                               "rebuild it")

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            # A reader stopped early (GeneratorExit, Ctrl-C) has nothing to check. A read error is checked:
            # damaged bytes are its likeliest cause, and the digests say so plainly.
            if kind is None or issubclass(kind, Exception):
                self.verify()
        finally:
            self.stream.close()


class ShardJob:
    """The driver's side: check the output, list what is left to do, and commit the dataset.

    `pending` takes the output's lock and `finalize` releases it; a job that stops on an error in between
    releases it when it is dropped or its process exits.
    """

    def __init__(self, source: Source, preprocess: Preprocess, storage: Storage, split: str = "train",
                 per_shard: int = 1000, limit: int | None = None):
        if per_shard < 1:
            raise DatasetError(f"samples per shard (--per-shard) must be >= 1, got {per_shard}")
        if limit is not None and limit < 1:
            raise DatasetError(f"--limit must be >= 1, got {limit}")
        if not split.isidentifier():
            raise DatasetError(f"split name {split!r} must be letters, digits and underscores")
        self.source, self.preprocess, self.storage, self.split = source, preprocess, storage, split
        self.spec = {
            "format_version": FORMAT_VERSION,
            "source": source.describe(),
            "preprocess": preprocess.describe(),
            "split": split,
            "samples_per_shard": per_shard,
            "limit": limit,
        }
        self.plans = source.plan(per_shard, limit)
        self._lock = OutputLock(storage, LOCK, "sharding job", DatasetError)
        self._release: weakref.finalize | None = None

    def _hold_output(self) -> None:
        if self._release is None or not self._release.alive:
            self._lock.acquire()
            self._release = weakref.finalize(self, self._lock.release)

    def _check_output(self) -> None:
        """Raise when the output holds another dataset, or shards of another run."""
        spec_json = json.dumps(self.spec, sort_keys=True)
        if self.storage.exists(DATASET_JSON):
            existing = _load_dataset_json(self.storage)
            if json.dumps(existing["spec"], sort_keys=True) != spec_json:
                raise DatasetError(f"output {self.storage.uri} already holds a different dataset "
                                   f"({existing['spec'].get('source')}); choose another output")
            return
        spec_name = f"{PROGRESS}/spec.json"
        if self.storage.exists(spec_name):
            if self.storage.read_bytes(spec_name).decode() != spec_json:
                raise DatasetError(f"output {self.storage.uri} holds an unfinished run with other inputs or options "
                                   f"(see {self.storage.url(spec_name)}); choose another output")
        elif self.storage.list("shards/"):
            raise DatasetError(f"output {self.storage.uri} already holds shards that this job did not write")
        else:
            self.storage.write_bytes(spec_name, spec_json.encode())

    def _finished(self, plan: ShardPlan) -> ShardResult | None:
        name = _progress_name(self.split, plan.index)
        if not self.storage.exists(name):
            return None
        data = json.loads(self.storage.read_bytes(name))
        result = ShardResult(**{**data, "rejects": tuple(tuple(r) for r in data["rejects"])})
        if (self.storage.size(result.url) != result.size_bytes
                or self.storage.stored_sha256(result.url) != result.sha256):
            return None  # the shard is missing or damaged: build it again
        return result

    def pending(self) -> tuple[list[ShardPlan], list[ShardResult]]:
        """(plans still to build, results of shards already finished), after taking the output's lock."""
        self._hold_output()
        try:
            self._check_output()
            done, todo = [], []
            for plan in self.plans:
                result = self._finished(plan)
                (done.append(result) if result else todo.append(plan))
        except BaseException:
            self._release()
            raise
        return todo, done

    def finalize(self, results: list[ShardResult]) -> dict:
        """Write rejects, dataset.json and, last, the manifest; return dataset.json's content. Frees the output."""
        self._hold_output()
        try:
            return self._commit(results)
        finally:
            self._release()

    def _commit(self, results: list[ShardResult]) -> dict:
        results = sorted(results, key=lambda r: r.index)
        if [r.index for r in results] != [p.index for p in self.plans]:
            raise DatasetError("cannot finalize: some shards are missing")
        rejects = [{"shard_index": r.index, "key": k, "source_key": s, "reason": why}
                   for r in results for k, s, why in r.rejects]
        self.storage.write_bytes(REJECTS, _parquet_bytes(rejects, REJECTS_SCHEMA))
        rows = [{"shard_index": r.index, "split": self.split, "url": r.url, "num_samples": r.num_samples,
                 "size_bytes": r.size_bytes, "sha256": r.sha256, "first_key": r.first_key, "last_key": r.last_key}
                for r in results]
        fingerprint = hashlib.sha256("\n".join(r.sha256 for r in results).encode()).hexdigest()
        dataset = {
            "spec": self.spec,
            "resolution": self.preprocess.resolution,
            "encoding": self.preprocess.encoding,
            "counts": {"inputs": sum(p.count for p in self.plans), "written": sum(r.num_samples for r in results),
                       "rejected": len(rejects), "shards": len(results)},
            "fingerprint": fingerprint,
        }
        self.storage.write_bytes(DATASET_JSON, json.dumps(dataset, indent=2, sort_keys=True).encode())
        self.storage.write_bytes(MANIFEST, _parquet_bytes(rows, MANIFEST_SCHEMA))
        return dataset


def _parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_manifest(storage: Storage) -> list[dict]:
    """The manifest's rows; one clear error when the dataset is missing or incomplete."""
    if not storage.exists(MANIFEST):
        if not storage.found():
            raise DatasetError(f"dataset {storage.uri} does not exist")
        raise DatasetError(f"{storage.uri} is not a complete dataset: no {MANIFEST} "
                           "(is the sharding job still running, or did it stop early?)")
    return pq.read_table(pa.BufferReader(storage.read_bytes(MANIFEST))).to_pylist()


def read_dataset_info(storage: Storage) -> dict:
    """dataset.json of a complete dataset, with every key the sharding job writes."""
    read_manifest(storage)
    if not storage.exists(DATASET_JSON):
        raise DatasetError(f"{storage.uri} is not a complete dataset: no {DATASET_JSON}")
    return _load_dataset_json(storage)


def _load_dataset_json(storage: Storage) -> dict:
    url = storage.url(DATASET_JSON)
    try:
        info = json.loads(storage.read_bytes(DATASET_JSON))
    except ValueError as error:
        raise DatasetError(f"{url} is not valid JSON ({error})") from None
    missing = sorted(set(DATASET_KEYS) - (set(info) if isinstance(info, dict) else set()))
    if missing:
        raise DatasetError(f"{url} is missing {', '.join(missing)}: it was not written by the sharding job, "
                           "or was changed since")
    return info
