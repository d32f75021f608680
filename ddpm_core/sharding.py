"""Build a dataset on storage (shared/DESIGN.md, "Dataset on storage") from a `Source`.

    shards/<split>-<NNNNNN>.tar   WebDataset tars: <key>.png|webp + <key>.json, sorted, mtime 0
    manifest.parquet              one row per shard; written last: without it the dataset is incomplete
    rejects.parquet               every input that could not be used, with the reason
    dataset.json                  source, preprocessing, counts, content fingerprint
    _progress/                    the job's spec and one record per finished shard (for resume)

`ShardJob.pending()` runs on the driver, `build_shard` once per shard anywhere (a Ray task),
`ShardJob.finalize` on the driver at the end. Same input and options → byte-identical shards and
manifest; a re-run skips the shards whose record, size and sha256 check out.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from .image_prep import ImageRejected, Preprocess
from .sources import ShardPlan, Source, decode_record
from .storage import Storage, sha256_file

MANIFEST = "manifest.parquet"
REJECTS = "rejects.parquet"
DATASET_JSON = "dataset.json"
PROGRESS = "_progress"
FORMAT_VERSION = 1

MANIFEST_SCHEMA = pa.schema([
    ("shard_index", pa.int32()), ("split", pa.string()), ("url", pa.string()), ("num_samples", pa.int32()),
    ("size_bytes", pa.int64()), ("sha256", pa.string()), ("first_key", pa.string()), ("last_key", pa.string()),
])
REJECTS_SCHEMA = pa.schema([
    ("shard_index", pa.int32()), ("key", pa.string()), ("source_key", pa.string()), ("reason", pa.string()),
])


class DatasetError(ValueError):
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


class ShardJob:
    """The driver's side: check the output, list what is left to do, and commit the dataset."""

    def __init__(self, source: Source, preprocess: Preprocess, storage: Storage, split: str = "train",
                 per_shard: int = 1000, limit: int | None = None):
        if per_shard < 1:
            raise DatasetError(f"samples per shard must be >= 1, got {per_shard}")
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

    def _check_output(self) -> bool:
        """True when this exact dataset is already complete; raise when the output holds another one."""
        spec_json = json.dumps(self.spec, sort_keys=True)
        if self.storage.exists(DATASET_JSON):
            existing = json.loads(self.storage.read_bytes(DATASET_JSON))
            if json.dumps(existing.get("spec"), sort_keys=True) != spec_json:
                raise DatasetError(f"output {self.storage.uri} already holds a different dataset "
                                   f"({existing.get('spec', {}).get('source')}); choose another output")
            return self.storage.exists(MANIFEST)
        spec_name = f"{PROGRESS}/spec.json"
        if self.storage.exists(spec_name):
            if self.storage.read_bytes(spec_name).decode() != spec_json:
                raise DatasetError(f"output {self.storage.uri} holds an unfinished run with other inputs or options "
                                   f"(see {self.storage.url(spec_name)}); choose another output")
        elif self.storage.list("shards/"):
            raise DatasetError(f"output {self.storage.uri} already holds shards that this job did not write")
        else:
            self.storage.write_bytes(spec_name, spec_json.encode())
        return False

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
        """(plans still to build, results of shards already finished)."""
        if self._check_output():
            return [], [self._finished(plan) for plan in self.plans]
        done, todo = [], []
        for plan in self.plans:
            result = self._finished(plan)
            (done.append(result) if result else todo.append(plan))
        return todo, done

    def finalize(self, results: list[ShardResult]) -> dict:
        """Write rejects, dataset.json and, last, the manifest; return dataset.json's content."""
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
        raise DatasetError(f"{storage.uri} is not a complete dataset: no {MANIFEST} "
                           "(is the sharding job still running, or did it stop early?)")
    return pq.read_table(pa.BufferReader(storage.read_bytes(MANIFEST))).to_pylist()


def read_dataset_info(storage: Storage) -> dict:
    read_manifest(storage)
    return json.loads(storage.read_bytes(DATASET_JSON))
