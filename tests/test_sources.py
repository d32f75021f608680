import os
import pickle

import numpy as np
import pytest

from ddpm_core.sources import (
    CifarSource,
    FolderSource,
    LmdbSource,
    SourceError,
    file_key,
    load_cifar_batch,
    open_source,
)
from tests.datasets import make_cifar_batches, make_image_folder, make_lsun_lmdb


def test_lmdb_plans_are_key_ranges_and_tasks_read_only_their_range(tmp_path):
    kinds = make_lsun_lmdb(tmp_path / "bedroom_train_lmdb", n=23)
    source = LmdbSource(tmp_path / "bedroom_train_lmdb")
    assert source.describe()["entries"] == 23
    plans = source.plan(per_shard=5, limit=None)
    assert [p.count for p in plans] == [5, 5, 5, 5, 3]
    keys = [[r.key for r in source.read(p)] for p in plans]
    assert sum(keys, []) == sorted(kinds)  # LMDB order, each key exactly once
    assert all(p.spec == k[0] for p, k in zip(plans, keys))
    assert [p.count for p in source.plan(per_shard=5, limit=12)] == [5, 5, 2]
    record = next(source.read(plans[0]))
    assert len(record.key) == 40 and record.meta["source_key"] == record.key


def test_folder_lists_recursively_sorted_with_dot_free_keys(tmp_path):
    files = make_image_folder(tmp_path / "imgs")
    source = FolderSource(tmp_path / "imgs")
    assert source.names == sorted(files)  # notes.txt is not an image
    assert file_key("a/cat.0001.jpg") == "a/cat_0001"
    assert file_key("z/upper.JPG") == "z/upper"
    records = list(source.read(source.plan(100, None)[0]))
    assert [r.key for r in records] == [file_key(n) for n in sorted(files)]


def test_cifar_batches_load_without_unsafe_unpickling(tmp_path):
    images = make_cifar_batches(tmp_path)
    source = open_source("cifar10", tmp_path)
    assert isinstance(source, CifarSource) and source.describe()["entries"] == 60
    plans = source.plan(per_shard=25, limit=None)
    records = [r for p in plans for r in source.read(p)]
    assert [r.key for r in records] == [f"{i:05d}" for i in range(60)]
    assert np.array_equal(np.asarray(records[13].image), images[13])
    assert records[13].meta["label"] in range(10)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_malicious_cifar_batch_is_refused(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}))
    with pytest.raises(SourceError, match="refusing to load posix.system"):
        load_cifar_batch(path)


def test_bad_inputs_get_one_clear_error_each(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        LmdbSource(tmp_path / "missing_lmdb")
    (tmp_path / "not_lmdb").mkdir()
    (tmp_path / "not_lmdb" / "x.jpg").write_bytes(b"")
    with pytest.raises(SourceError, match="is not an LMDB: no data.mdb inside"):
        LmdbSource(tmp_path / "not_lmdb")
    (tmp_path / "fake_lmdb").mkdir()
    (tmp_path / "fake_lmdb" / "data.mdb").write_bytes(b"x" * 100)
    with pytest.raises(SourceError, match="is not a readable LMDB"):
        LmdbSource(tmp_path / "fake_lmdb")
    make_lsun_lmdb(tmp_path / "empty_lmdb", n=0)
    with pytest.raises(SourceError, match="is empty"):
        LmdbSource(tmp_path / "empty_lmdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no jpg/jpeg/png/webp images under"):
        FolderSource(tmp_path / "empty")
    with pytest.raises(SourceError, match="missing data_batch_1"):
        CifarSource(tmp_path / "empty")
    with pytest.raises(SourceError, match="source 'imagenet' is unknown"):
        open_source("imagenet", tmp_path)
