"""The data plane (issue 25): reads verify, one writer at a time, damaged shards rebuilt, bombs rejected, safe names."""

import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ddpm_core import sources
from ddpm_core.image_prep import Preprocess, decode_rgb
from ddpm_core.loader import TrainLoader
from ddpm_core.sharding import DatasetError, ShardJob, build_shard, read_dataset_info, read_manifest
from ddpm_core.sources import FolderSource, LmdbSource, write_lmdb
from ddpm_core.storage import open_storage, s3_client
from pipelines.shard import main as shard_main
from tests.datasets import encode, lsun_key, make_lsun_lmdb, photo_like
from tests.test_loader import make_dataset
from tests.test_sharding import REPO

LOCK = "_progress/lock.json"


def shard_in_process(source, out, resolution=16, per_shard=4) -> dict:
    """The sharding job without Ray (the functions its tasks run); returns dataset.json's content."""
    storage = open_storage(out)
    job = ShardJob(source, Preprocess(resolution), storage, per_shard=per_shard)
    todo, done = job.pending()
    return job.finalize(done + [build_shard(source, job.preprocess, plan, "train", storage) for plan in todo])


def read_all(loader) -> list[str]:
    return [key for _, keys in loader for key in keys]


def files_of(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and "_progress" not in p.parts}


# -- 1. reads verify the manifest's sha256 ---------------------------------------------------------

@pytest.mark.parametrize("damage", ["another shard's bytes", "one byte of the end padding"])
@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_shard_whose_bytes_changed_stops_with_both_digests(tmp_path, damage, workers):
    storage = make_dataset(tmp_path, str(tmp_path / "data"))
    assert len(read_all(TrainLoader(str(tmp_path / "data"), batch_size=4, num_workers=workers))) > 40
    shards = tmp_path / "data" / "shards"
    expected = {row["url"]: row["sha256"] for row in read_manifest(storage)}["shards/train-000000.tar"]
    if damage == "another shard's bytes":  # a valid tar of other images: read today without a word
        data = (shards / "train-000001.tar").read_bytes()
    else:
        data = bytearray((shards / "train-000000.tar").read_bytes())
        data[-1] ^= 1
        data = bytes(data)
    (shards / "train-000000.tar").write_bytes(data)
    with pytest.raises(DatasetError) as error:
        read_all(TrainLoader(str(tmp_path / "data"), batch_size=4, num_workers=workers))
    message = str(error.value)
    assert "shards/train-000000.tar" in message
    assert expected in message and hashlib.sha256(data).hexdigest() in message


def test_on_s3_the_bytes_are_hashed_not_the_metadata_header_trusted(tmp_path, s3_bucket):
    make_dataset(tmp_path, f"s3://{s3_bucket}/data")
    client = s3_client()
    original = client.head_object(Bucket=s3_bucket, Key="data/shards/train-000002.tar")["Metadata"]["sha256"]
    other = client.get_object(Bucket=s3_bucket, Key="data/shards/train-000003.tar")["Body"].read()
    # Other bytes under the original's metadata header: what `stored_sha256` sees is unchanged.
    client.put_object(Bucket=s3_bucket, Key="data/shards/train-000002.tar", Body=other,
                      Metadata={"sha256": original})
    with pytest.raises(DatasetError, match=f"shards/train-000002.tar.*{original}"):
        read_all(TrainLoader(f"s3://{s3_bucket}/data", batch_size=4, num_workers=2))


# -- 2. one writer at a time -----------------------------------------------------------------------

@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_writer_is_refused_with_one_line_and_the_lock_goes_at_the_end(tmp_path, where, request):
    make_lsun_lmdb(tmp_path / "lmdb", n=9, corrupt=0)
    out = str(tmp_path / "out") if where == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/out"
    storage = open_storage(out)
    first = ShardJob(LmdbSource(tmp_path / "lmdb"), Preprocess(16), storage, per_shard=4)
    todo, _ = first.pending()
    assert storage.exists(LOCK)
    second = ShardJob(LmdbSource(tmp_path / "lmdb"), Preprocess(16), storage, per_shard=4)
    with pytest.raises(DatasetError) as error:
        second.pending()
    message = str(error.value)
    assert "\n" not in message and storage.url(LOCK) in message and "delete" in message
    assert f"pid {os.getpid()} on {socket.gethostname()}" in message
    first.finalize([build_shard(first.source, first.preprocess, plan, "train", storage) for plan in todo])
    assert not storage.exists(LOCK)
    assert second.pending()[0] == []  # the output is free again, and complete
    second.finalize(second.pending()[1])
    assert not storage.exists(LOCK)


def test_the_lock_is_released_when_the_job_fails_or_is_refused(tmp_path):
    make_lsun_lmdb(tmp_path / "lmdb", n=6, corrupt=0)
    storage = open_storage(tmp_path / "out")

    def job(resolution=16):
        return ShardJob(LmdbSource(tmp_path / "lmdb"), Preprocess(resolution), storage, per_shard=4)

    def fails_after_pending():
        running = job()
        running.pending()
        assert storage.exists(LOCK)
        raise RuntimeError("a shard task failed")

    with pytest.raises(RuntimeError):
        fails_after_pending()
    assert not storage.exists(LOCK)
    shard_in_process(LmdbSource(tmp_path / "lmdb"), tmp_path / "out")
    with pytest.raises(DatasetError, match="already holds a different dataset"):
        job(resolution=32).pending()
    assert not storage.exists(LOCK)


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over_another_hosts_is_not(tmp_path):
    make_lsun_lmdb(tmp_path / "lmdb", n=6, corrupt=0)
    storage = open_storage(tmp_path / "out")
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    stale = {"host": socket.gethostname(), "pid": dead, "since": "2020-01-01T00:00:00Z", "token": "stale"}
    storage.write_bytes(LOCK, json.dumps(stale).encode())
    shard_in_process(LmdbSource(tmp_path / "lmdb"), tmp_path / "out")  # a killed run's lock: resumed
    assert not storage.exists(LOCK) and storage.exists("manifest.parquet")

    storage.write_bytes(LOCK, json.dumps({**stale, "host": "another-host", "pid": 1}).encode())
    with pytest.raises(DatasetError, match=f"pid 1 on another-host.*delete {storage.url(LOCK)}"):
        shard_in_process(LmdbSource(tmp_path / "lmdb"), tmp_path / "out")
    assert storage.exists(LOCK)


def test_two_concurrent_shard_runs_one_wins_the_other_exits_2_and_the_dataset_is_a_single_runs(tmp_path,
                                                                                                ray_local):
    make_lsun_lmdb(tmp_path / "lmdb", n=60, corrupt=1, seed=5)
    args = ["--source", "lsun", "--input", str(tmp_path / "lmdb"), "--per-shard", "10", "--resolution", "16",
            "--parallel", "1"]
    assert shard_main(args + ["--out", str(tmp_path / "single")]) == 0
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    runs = [subprocess.Popen([sys.executable, "-m", "pipelines.shard", *args, "--out", str(tmp_path / "out")],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    codes = [run.returncode for run in runs]
    assert sorted(codes) == [0, 2], outputs
    loser = outputs[codes.index(2)]
    errors = [line for line in loser.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in loser, loser
    assert "is being written by another sharding job" in errors[0] and str(tmp_path / "out" / LOCK) in errors[0]
    assert files_of(tmp_path / "out") == files_of(tmp_path / "single")
    assert not (tmp_path / "out" / LOCK).exists()


# -- 3. a re-run rebuilds a damaged shard of a complete dataset ------------------------------------

def test_rerunning_a_complete_dataset_rebuilds_its_damaged_and_missing_shards(tmp_path):
    make_dataset(tmp_path, str(tmp_path / "data"))
    before = files_of(tmp_path / "data")
    shards = tmp_path / "data" / "shards"
    damaged = bytearray((shards / "train-000003.tar").read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # same size, other bytes
    (shards / "train-000003.tar").write_bytes(bytes(damaged))
    (shards / "train-000005.tar").unlink()
    untouched = (shards / "train-000004.tar").stat().st_mtime_ns
    make_dataset(tmp_path, str(tmp_path / "data"))
    assert files_of(tmp_path / "data") == before
    assert (shards / "train-000004.tar").stat().st_mtime_ns == untouched


# -- 4. decompression and memory bombs -------------------------------------------------------------

def test_a_150_megapixel_png_is_rejected_from_its_header_and_the_job_goes_on(tmp_path):
    (tmp_path / "imgs").mkdir()
    photo_like(np.random.default_rng(0), 40, 48).save(tmp_path / "imgs" / "good.png")
    Image.new("1", (15000, 10000)).save(tmp_path / "imgs" / "huge.png")  # 150 Mpx in a few KB
    info = shard_in_process(FolderSource(tmp_path / "imgs"), tmp_path / "out")
    assert info["counts"] == {"inputs": 2, "written": 1, "rejected": 1, "shards": 1}
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["source_key"] for r in rejects] == ["huge.png"]
    assert "15000×10000" in rejects[0]["reason"] and "pixel limit" in rejects[0]["reason"]


@pytest.mark.parametrize("kind", ["folder", "zip", "lsun"])
def test_inputs_over_the_byte_cap_are_rejected_before_they_are_read_whole(tmp_path, monkeypatch, kind):
    rng = np.random.default_rng(1)
    images = {"small1": encode(photo_like(rng, 8, 8), "PNG"), "big": encode(photo_like(rng, 64, 64), "PNG"),
              "small2": encode(photo_like(rng, 8, 8), "PNG")}
    assert max(len(images["small1"]), len(images["small2"])) < 4000 < len(images["big"])
    monkeypatch.setattr(sources, "MAX_INPUT_BYTES", 4000, raising=False)
    if kind == "folder":
        (tmp_path / "in").mkdir()
        for name, data in images.items():
            (tmp_path / "in" / f"{name}.png").write_bytes(data)
        source = FolderSource(tmp_path / "in")
    elif kind == "zip":
        with zipfile.ZipFile(tmp_path / "in.zip", "w") as archive:
            for name, data in images.items():
                archive.writestr(f"{name}.png", data)
        source = FolderSource(tmp_path / "in.zip")
    else:
        write_lmdb(tmp_path / "lmdb", iter([(name.encode(), data) for name, data in images.items()]))
        source = LmdbSource(tmp_path / "lmdb")
    info = shard_in_process(source, tmp_path / "out")
    assert info["counts"] == {"inputs": 3, "written": 2, "rejected": 1, "shards": 1}
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert [r["key"] for r in rejects] == ["big"]
    assert f"{len(images['big'])} bytes" in rejects[0]["reason"] and "4000-byte limit" in rejects[0]["reason"]


# -- 5. EXIF orientation ---------------------------------------------------------------------------

def test_a_jpeg_with_exif_orientation_6_is_sharded_upright(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)  # left half red, right half blue, as stored
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view": the stored left side is the top
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    image, _ = decode_rgb(buffer.getvalue())
    upright = np.asarray(image).astype(int)
    assert image.size == (40, 60)
    assert upright[5, 20, 0] > 200 and upright[5, 20, 2] < 60  # top: red
    assert upright[55, 20, 2] > 200 and upright[55, 20, 0] < 60  # bottom: blue

    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "rotated.jpg").write_bytes(buffer.getvalue())
    shard_in_process(FolderSource(tmp_path / "imgs"), tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "shards" / "train-000000.tar") as tar:
        meta = json.loads(tar.extractfile("rotated.json").read())
    assert meta["original_size"] == [40, 60] and meta["crop_box"] == [0, 10, 40, 50]


# -- 6. LMDB keys as tar member names --------------------------------------------------------------

def test_lmdb_keys_become_safe_member_names_and_the_json_keeps_the_key(tmp_path):
    unsafe = [b"../../etc/passwd", b"a/b", b"x.y.z", b"\x00\xff\x01", b"_underscore", b"with space"]
    normal = [lsun_key(1), lsun_key(2)]
    rng = np.random.default_rng(2)
    write_lmdb(tmp_path / "lmdb", iter([(key, encode(photo_like(rng, 20, 20), "JPEG")) for key in unsafe + normal]))
    shard_in_process(LmdbSource(tmp_path / "lmdb"), tmp_path / "out", per_shard=100)
    expected = {**{k.decode(): k.decode() for k in normal},
                **{"_" + k.hex(): k.decode("utf-8", "backslashreplace") for k in unsafe}}
    with tarfile.open(tmp_path / "out" / "shards" / "train-000000.tar") as tar:
        names = tar.getnames()
        metas = {name[:-5]: json.loads(tar.extractfile(name).read()) for name in names if name.endswith(".json")}
    assert sorted(names) == sorted(f"{name}.{ext}" for name in expected for ext in ("png", "json"))
    assert {name: meta["source_key"] for name, meta in metas.items()} == expected
    loader = TrainLoader(str(tmp_path / "out"), batch_size=1, num_workers=0)
    assert sorted(read_all(loader)) == sorted(expected)  # one sample per name: no key split at a dot


# -- 8. durable local writes -----------------------------------------------------------------------

def test_local_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    storage = open_storage(tmp_path / "data")
    storage.write_bytes("dataset.json", b"old")
    events = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(source, target):
        events.append(("replace", os.stat(source).st_ino))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    storage.write_bytes("manifest.parquet", b"new manifest")
    written = (tmp_path / "data" / "manifest.parquet").stat().st_ino
    assert events == [("fsync", "file", written), ("replace", written),
                      ("fsync", "folder", (tmp_path / "data").stat().st_ino)]


# -- 9. a missing dataset, a dataset.json missing keys ---------------------------------------------

def test_a_missing_dataset_says_it_does_not_exist(tmp_path, s3_bucket):
    for where in (str(tmp_path / "nope"), f"s3://{s3_bucket}/nope"):
        with pytest.raises(DatasetError, match=f"dataset {where} does not exist"):
            read_manifest(open_storage(where))
        with pytest.raises(DatasetError, match="does not exist"):
            TrainLoader(where, batch_size=4)
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "dataset.json").write_text("{}")
    with pytest.raises(DatasetError, match="is not a complete dataset: no manifest.parquet"):
        read_manifest(open_storage(tmp_path / "started"))


def test_a_dataset_json_missing_keys_or_unreadable_is_one_line_naming_them(tmp_path):
    storage = make_dataset(tmp_path, str(tmp_path / "data"))
    path = tmp_path / "data" / "dataset.json"
    info = json.loads(path.read_text())
    del info["resolution"], info["fingerprint"]
    path.write_text(json.dumps(info))
    for read in (lambda: read_dataset_info(storage), lambda: TrainLoader(str(tmp_path / "data"), batch_size=4,
                                                                         resolution=16)):
        with pytest.raises(DatasetError, match=r"dataset.json .*is missing fingerprint, resolution") as error:
            read()
        assert "\n" not in str(error.value)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="dataset.json .*is not valid JSON"):
        read_dataset_info(storage)
    path.unlink()
    with pytest.raises(DatasetError, match="is not a complete dataset: no dataset.json"):
        read_dataset_info(storage)
