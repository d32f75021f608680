"""Integration: the sharding job on a real local Ray, to local disk and to S3 on a loopback moto server."""

import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ddpm_core.storage import s3_client
from pipelines.shard import main as shard_main
from tests.datasets import make_cifar_batches, make_image_folder, make_lsun_lmdb, photo_like
from tests.errors import expect_one_error

REPO = Path(__file__).resolve().parents[1]


def tar_samples(data: bytes) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        assert names == sorted(names)
        for member in tar.getmembers():
            assert member.mtime == 0
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def check_dataset(read, kinds: dict[str, str], resolution: int = 256) -> dict[str, dict]:
    """Assert the dataset's invariants; `read(name)` returns an object's bytes. Returns key -> json."""
    manifest = pq.read_table(io.BytesIO(read("manifest.parquet"))).to_pylist()
    rejects = pq.read_table(io.BytesIO(read("rejects.parquet"))).to_pylist()
    info = json.loads(read("dataset.json"))
    corrupt = sorted(k for k, kind in kinds.items() if kind == "corrupt")
    assert info["counts"] == {"inputs": len(kinds), "written": len(kinds) - len(corrupt),
                              "rejected": len(corrupt), "shards": len(manifest)}
    assert sorted(r["key"] for r in rejects) == corrupt
    assert all("decode failed" in r["reason"] for r in rejects)
    metas = {}
    for row in manifest:
        data = read(row["url"])
        assert len(data) == row["size_bytes"] and hashlib.sha256(data).hexdigest() == row["sha256"]
        samples = tar_samples(data)
        assert len(samples) == row["num_samples"]
        assert (min(samples), max(samples)) == (row["first_key"], row["last_key"])
        for key, members in samples.items():
            assert set(members) == {"png", "json"} and key not in metas
            image = Image.open(io.BytesIO(members["png"]))
            assert image.mode == "RGB" and image.size == (resolution, resolution)
            metas[key] = json.loads(members["json"])
    assert sorted(metas) == sorted(k for k in kinds if k not in corrupt)
    assert hashlib.sha256("\n".join(r["sha256"] for r in manifest).encode()).hexdigest() == info["fingerprint"]
    return metas


def test_lsun_lmdb_to_local_folder(tmp_path, ray_local):
    kinds = make_lsun_lmdb(tmp_path / "bedroom_train_lmdb", n=36, corrupt=1)
    out = tmp_path / "out"
    assert shard_main(["--source", "lsun", "--input", str(tmp_path / "bedroom_train_lmdb"), "--out", str(out),
                       "--per-shard", "10"]) == 0
    metas = check_dataset(lambda name: (out / name).read_bytes(), kinds)
    assert len(list((out / "shards").iterdir())) == 4
    for key, meta in metas.items():
        assert meta["source_key"] == key and meta["filter"] == "lanczos"
        expected = {"gray": "jpeg", "cmyk": "jpeg"}.get(kinds[key], kinds[key])
        assert meta["source_format"] == expected
        assert meta["original_size"] in ([341, 256], [256, 341], [300, 280])


def test_lsun_lmdb_to_s3_gives_the_same_bytes_as_local_disk(tmp_path, ray_local, s3_bucket):
    kinds = make_lsun_lmdb(tmp_path / "lmdb", n=24, corrupt=1, seed=3)
    args = ["--source", "lsun", "--input", str(tmp_path / "lmdb"), "--per-shard", "8"]
    assert shard_main(args + ["--out", f"s3://{s3_bucket}/lsun/v1"]) == 0
    assert shard_main(args + ["--out", str(tmp_path / "local")]) == 0

    def read_s3(name):
        return s3_client().get_object(Bucket=s3_bucket, Key=f"lsun/v1/{name}")["Body"].read()

    check_dataset(read_s3, kinds)
    for name in ("manifest.parquet", "rejects.parquet", "shards/train-000000.tar", "shards/train-000002.tar"):
        assert read_s3(name) == (tmp_path / "local" / name).read_bytes()
    head = s3_client().head_object(Bucket=s3_bucket, Key="lsun/v1/shards/train-000001.tar")
    assert head["Metadata"]["sha256"] == hashlib.sha256(read_s3("shards/train-000001.tar")).hexdigest()


def test_killed_run_resumes_to_byte_identical_shards_and_manifest(tmp_path, ray_local):
    make_lsun_lmdb(tmp_path / "lmdb", n=120, corrupt=2, seed=4)
    args = ["--source", "lsun", "--input", str(tmp_path / "lmdb"), "--per-shard", "10", "--parallel", "1"]
    assert shard_main(args + ["--out", str(tmp_path / "reference")]) == 0

    out = tmp_path / "resumed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.shard", *args, "--out", str(out)], cwd=REPO,
                              env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while len(list((out / "_progress").glob("train-*.json"))) < 2:
        assert driver.poll() is None and time.monotonic() < deadline, "the driver ended before it could be killed"
        time.sleep(0.05)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not (out / "manifest.parquet").exists()
    finished = sorted(p.stem for p in (out / "_progress").glob("train-*.json"))
    assert 2 <= len(finished) < 12
    before = {name: (out / "shards" / f"{name}.tar").stat().st_mtime_ns for name in finished}
    damaged = out / "shards" / f"{finished[0]}.tar"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a finished shard that got damaged is rebuilt

    assert shard_main(args + ["--out", str(out)]) == 0
    for name in finished[1:]:
        assert (out / "shards" / f"{name}.tar").stat().st_mtime_ns == before[name]  # skipped, not rewritten
    reference = sorted(p.name for p in (tmp_path / "reference" / "shards").iterdir())
    assert sorted(p.name for p in (out / "shards").iterdir()) == reference
    for name in reference:
        assert (out / "shards" / name).read_bytes() == (tmp_path / "reference" / "shards" / name).read_bytes()
    for name in ("manifest.parquet", "rejects.parquet", "dataset.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    keys = [k for p in sorted((out / "shards").iterdir()) for k in tar_samples(p.read_bytes())]
    assert len(keys) == len(set(keys)) == 118

    # Once complete, a re-run finds nothing to do and changes nothing.
    stamp = (out / "manifest.parquet").stat().st_mtime_ns
    assert shard_main(args + ["--out", str(out)]) == 0
    assert (out / "manifest.parquet").read_bytes() == (tmp_path / "reference" / "manifest.parquet").read_bytes()
    assert (out / "shards" / reference[0]).stat().st_mtime_ns <= stamp


def test_image_folder_and_cifar10_batches_shard_correctly(tmp_path, ray_local):
    files = make_image_folder(tmp_path / "imgs")
    out = tmp_path / "folder"
    assert shard_main(["--source", "folder", "--input", str(tmp_path / "imgs"), "--out", str(out),
                       "--resolution", "32", "--encoding", "webp", "--per-shard", "2"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"] == {"inputs": 6, "written": 5, "rejected": 1, "shards": 3}
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert [r["source_key"] for r in rejects] == ["broken.jpg"]
    keys = [k for p in sorted((out / "shards").iterdir()) for k in tar_samples(p.read_bytes())]
    assert keys == ["a/b/dog", "a/cat_0001", "c", "rgba", "z/upper"]
    assert len(files) == 6

    images = make_cifar_batches(tmp_path / "cifar")
    out = tmp_path / "cifar10"
    assert shard_main(["--source", "cifar10", "--input", str(tmp_path / "cifar"), "--out", str(out),
                       "--resolution", "32", "--per-shard", "25"]) == 0
    samples = {}
    for path in sorted((out / "shards").iterdir()):
        samples.update(tar_samples(path.read_bytes()))
    assert sorted(samples) == [f"{i:05d}" for i in range(60)]
    for i in (0, 17, 59):  # 32x32 in, 32x32 out, PNG: pixel for pixel the source
        pixels = np.asarray(Image.open(io.BytesIO(samples[f"{i:05d}"]["png"])))
        assert np.array_equal(pixels, images[i])
        assert json.loads(samples[f"{i:05d}"]["json"])["source_key"] == f"train/{i}"


def test_celebahq_zip_is_box_filtered(tmp_path, ray_local):
    rng = np.random.default_rng(9)
    with zipfile.ZipFile(tmp_path / "celeba_hq.zip", "w") as archive:
        for i in range(3):
            buffer = io.BytesIO()
            photo_like(rng, 64, 64).save(buffer, format="PNG")
            archive.writestr(f"CelebA-HQ-img/{i}.png", buffer.getvalue())
    out = tmp_path / "celebahq"
    assert shard_main(["--source", "celebahq", "--input", str(tmp_path / "celeba_hq.zip"), "--out", str(out),
                       "--resolution", "16"]) == 0
    samples = tar_samples((out / "shards" / "train-000000.tar").read_bytes())
    assert sorted(samples) == [f"CelebA-HQ-img/{i}" for i in range(3)]
    meta = json.loads(samples["CelebA-HQ-img/1"]["json"])
    assert meta["filter"] == "box" and meta["original_size"] == [64, 64]
    assert Image.open(io.BytesIO(samples["CelebA-HQ-img/1"]["png"])).size == (16, 16)


def test_bad_inputs_fail_before_any_work_with_one_clear_error(tmp_path, caplog, monkeypatch, s3_bucket):
    caplog.set_level(logging.ERROR)
    make_lsun_lmdb(tmp_path / "lmdb", n=6, corrupt=0)
    (tmp_path / "file").write_text("x")

    def fails(args, message):
        expect_one_error(caplog, shard_main, args, message)

    lsun = ["--source", "lsun", "--input", str(tmp_path / "lmdb")]
    fails(["--source", "lsun", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "does not exist")
    fails(["--source", "lsun", "--input", str(tmp_path), "--out", str(tmp_path / "o")], "is not an LMDB")
    fails(["--source", "folder", "--input", str(tmp_path / "lmdb"), "--out", str(tmp_path / "o")], "no jpg/jpeg")
    fails(lsun + ["--out", str(tmp_path / "file" / "out")], "is not writable")
    fails(lsun + ["--out", f"s3://{s3_bucket}-missing/x"], "the bucket of s3://")

    # A finished dataset is never overwritten by another one.
    assert shard_main(lsun + ["--out", str(tmp_path / "done"), "--resolution", "16"]) == 0
    snapshot = {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()}
    fails(lsun + ["--out", str(tmp_path / "done"), "--resolution", "32"], "already holds a different dataset")
    assert snapshot == {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()}

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    from moto import settings
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server now checks credentials
    fails(lsun + ["--out", f"s3://{s3_bucket}/x"], "S3 rejected the credentials")
    monkeypatch.undo()

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fails(lsun + ["--out", f"s3://{s3_bucket}/x"], "cannot reach the S3 endpoint")


def test_ray_job_submit_runs_the_lsun_job_on_a_running_cluster(tmp_path, ray_head):
    make_lsun_lmdb(tmp_path / "lmdb", n=12, corrupt=1, seed=8)
    ray_cli = str(Path(sys.executable).parent / "ray")
    submit = [ray_cli, "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
              "python", "pipelines/shard_lsun.py", "--lmdb", str(tmp_path / "lmdb"), "--out", str(tmp_path / "out"),
              "--per-shard", "5", "--resolution", "32"]
    refused = subprocess.run(submit, env={**os.environ, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True)
    assert refused.returncode != 0  # the cluster keeps token authentication on
    done = subprocess.run(submit, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "11 written, 1 rejected of 12 inputs in 3 shards" in done.stdout + done.stderr
    info = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert info["counts"]["written"] == 11 and (tmp_path / "out" / "manifest.parquet").is_file()
