"""Integration: mass sampling and scoring on a real local Ray (Ray Data actors) and MLflow store."""

import fcntl
import io
import json
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import tarfile
import termios
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from ddpm_core.fid import frechet_distance, save_reference
from ddpm_core.presets import get_preset
from ddpm_core.reference_provenance import RESIZE
from pipelines.cli import main as ddpm
from pipelines.fid_reference import main as reference_main
from pipelines.mlflow_registry import register
from pipelines.sample_fid import main as sample_main
from tests.errors import expect_one_error
from tests.models import tiny_checkpoint
from tests.test_loader import make_dataset


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A tiny model with non-trivial weights, checkpointed and registered as the training job does."""
    root = tmp_path_factory.mktemp("sampling")
    config = get_preset("tiny")
    checkpoint = tiny_checkpoint(root / "checkpoint")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    mlflow.set_tracking_uri(uri)
    experiment = client.create_experiment("tiny16", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(experiment)
    version = register(client, run.info.run_id, checkpoint, config, {"steps": 7})
    return {"root": root, "tracking": uri, "checkpoint": str(checkpoint), "version": version}


def common(registered, out, *extra):
    return ["--out", str(out), "--tracking-uri", registered["tracking"], "--cpus-per-worker", "0.5",
            "--per-tar", "8", "--sampler", "ddim", "--steps", "4", *extra]


def tar_pngs(folder: Path) -> dict[int, bytes]:
    pngs = {}
    for path in sorted((folder / "samples").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key = int(member.name.split(".")[0])
                assert key not in pngs
                pngs[key] = tar.extractfile(member).read()
    return pngs


def test_model_to_pseudo_fid_end_to_end_on_s3(tmp_path, registered, ray_local, s3_bucket):
    from ddpm_core.storage import s3_client

    make_dataset(tmp_path, f"s3://{s3_bucket}/data", n=25, per_shard=8, resolution=16)
    assert reference_main(["--data", f"s3://{s3_bucket}/data", "--features", "random-init",
                           "--cpus-per-worker", "0.5"]) == 0

    def read(key):
        return s3_client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    with np.load(io.BytesIO(read("data/fid_stats_pseudo.npz"))) as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) and int(ref["n"]) == 24
    # Without Ray (--actors 0), the same actor code in this process: the same statistics.
    assert reference_main(["--data", f"s3://{s3_bucket}/data", "--features", "random-init", "--actors", "0",
                           "--out", "local.npz"]) == 0
    with np.load(io.BytesIO(read("data/fid_stats_pseudo.npz"))) as ref, \
            np.load(io.BytesIO(read("data/local.npz"))) as local:
        assert int(local["n"]) == 24 and str(local["extractor_sha256"]) == str(ref["extractor_sha256"])
        assert np.allclose(local["mu"], ref["mu"], rtol=1e-5, atol=1e-7)
        assert np.allclose(local["sigma"], ref["sigma"], rtol=1e-5, atol=1e-7)
    assert reference_main(["--data", f"s3://{s3_bucket}/data", "--features", "random-init", "--shards", "1",
                           "--out", "first_shard.npz", "--actors", "0"]) == 0
    with np.load(io.BytesIO(read("data/first_shard.npz"))) as first:
        assert int(first["n"]) == 8  # the first shard only
    out = f"s3://{s3_bucket}/samples"
    assert sample_main(["--model", "models:/ddpm-tiny@candidate", "--num", "20", "--actors", "2",
                        "--features", "random-init", "--allow-small-n",
                        "--ref", f"s3://{s3_bucket}/data/fid_stats_pseudo.npz", *common(registered, out)]) == 0

    result = json.loads(read("samples/fid.json"))
    assert "fid" not in result and "inception_score" not in result  # never called FID without the real network
    assert result["pseudo_fid"] > 0 and result["pseudo_inception_score"] >= 1.0
    assert result["model"] == f"models:/ddpm-tiny/{registered['version']}" and result["num"] == 20
    assert result["reference_sha256"] and result["inception_weights_sha256"] == "random-init(seed=0)"
    spec = json.loads(read("samples/samples.json"))
    assert (spec["sampler"], spec["steps"], spec["seed"], spec["num"]) == ("ddim", 4, 0, 20)
    keys = []
    for k in range(3):
        with tarfile.open(fileobj=io.BytesIO(read(f"samples/samples/{k:06d}.tar"))) as tar:
            keys += [int(name.split(".")[0]) for name in tar.getnames()]
    assert keys == list(range(20))

    client = MlflowClient(registered["tracking"])
    version = client.get_model_version("ddpm-tiny", registered["version"])
    scores = {k: v for k, v in version.tags.items() if "fid" in k}
    kind = f"pseudo_fid/ddim-4/n20/seed0/{'bf16' if result['bf16'] else 'fp32'}"  # the default follows the CPU
    assert list(scores) == [kind]  # keyed by the kind of sample set; never "fid"
    assert float(scores[kind]) == pytest.approx(result["pseudo_fid"], abs=1e-4)
    assert result["model_weights_sha256"] == version.tags["ddpm.weights_sha256"]
    runs = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                              filter_string="tags.`ddpm.kind` = 'evaluation'")
    assert len(runs) == 1 and runs[0].data.metrics["pseudo_fid"] == pytest.approx(result["pseudo_fid"])
    assert runs[0].data.params["num"] == "20"
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"fid.json", "samples_first_64.png"} <= artifacts


def sampling_actors() -> int:
    """How many sampling actors this session's Ray has started so far (ended ones included)."""
    from ray._private.state import actors

    return sum(a["ActorClassName"] == "MapWorker(MapBatches(SampleAndScore))" for a in actors().values())


def test_samples_do_not_depend_on_actors_or_batch_size(tmp_path, registered, ray_local):
    # --actors 0: the same actor code in this process, without Ray. 3 actors asked for 2 tars start 2.
    for name, actors, batch, started in (("one", "1", "4", 1), ("three", "3", "8", 2), ("none", "0", "16", 0)):
        before = sampling_actors()
        assert sample_main(["--model", registered["checkpoint"], "--num", "16", "--actors", actors,
                            "--batch-size", batch, "--features", "none",
                            *common(registered, tmp_path / name)]) == 0
        assert sampling_actors() - before == started, name
    one, three, none = (tar_pngs(tmp_path / name) for name in ("one", "three", "none"))
    assert sorted(one) == list(range(16)) and one == three and sorted(none) == sorted(one)
    # In this process the network runs on the process's threads, whose fp32 convolutions round differently
    # from the actors' one thread: a pixel may move by one level (seen once in 16 images), never more.
    for index, png in one.items():
        a, b = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in (png, none[index]))
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, index
    assert len(set(one.values())) == 16
    # The actors' tars are byte-equal; this process's hold the same members in the same order.
    for name in ("000000.tar", "000001.tar"):
        one_tar, three_tar, none_tar = (tmp_path / run / "samples" / name for run in ("one", "three", "none"))
        assert one_tar.read_bytes() == three_tar.read_bytes(), name
        with tarfile.open(one_tar) as a, tarfile.open(none_tar) as b:
            assert a.getnames() == b.getnames() and len(a.getnames()) == 8, name


def test_a_stopped_job_resumes_to_exactly_n_distinct_samples(tmp_path, registered, ray_local):
    args = ["--model", registered["checkpoint"], "--num", "24", "--actors", "2", "--features", "none",
            *common(registered, tmp_path / "out")]
    assert sample_main(args) == 0
    first = tar_pngs(tmp_path / "out")
    kept = (tmp_path / "out" / "samples" / "000000.tar").stat().st_mtime_ns
    (tmp_path / "out" / "samples" / "000001.tar").unlink()  # never finished
    (tmp_path / "out" / "_progress" / "000001.json").unlink()
    damaged = tmp_path / "out" / "samples" / "000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:500])  # cut short by the stop
    assert sample_main(args) == 0
    assert (tmp_path / "out" / "samples" / "000000.tar").stat().st_mtime_ns == kept  # reused
    again = tar_pngs(tmp_path / "out")
    assert sorted(again) == list(range(24)) and again == first


def test_bad_inputs_get_one_clear_error(tmp_path, registered, ray_local, caplog, monkeypatch):
    caplog.set_level(logging.ERROR)

    def fails(args, message):
        expect_one_error(caplog, sample_main, args, message)

    out = tmp_path / "out"
    base = ["--num", "16", "--allow-small-n", *common(registered, out)]
    fails(["--model", "models:/ddpm-nope@candidate", *base], "model models:/ddpm-nope@candidate does not exist")
    fails(["--model", str(tmp_path), *base], "is incomplete: missing model.safetensors")
    fails(["--model", registered["checkpoint"], "--num", "16", *common(registered, out)],
          "N=16 is smaller than the feature dimension 2048")
    # The weights are resolved where features are computed: here, with --actors 0 (on Ray: the next test).
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("DDPM_INCEPTION_DOWNLOAD", "0")
    fails(["--model", registered["checkpoint"], *base, "--actors", "0"], "no Inception weights for FID")
    fake = tmp_path / "inception.pth"
    fake.write_bytes(b"not the weights")
    fails(["--model", registered["checkpoint"], "--inception-weights", str(fake), *base],
          "which is not the FID network")  # on a Ray actor: its UserError comes back as one line
    (tmp_path / "bad.npz").write_bytes(save_reference(np.zeros(64), np.eye(64)))
    fails(["--model", registered["checkpoint"], "--features", "random-init", "--ref", str(tmp_path / "bad.npz"),
           *base], "has mu (64,) and sigma (64, 64); expected (2048,) and (2048, 2048)")
    fails(["--model", registered["checkpoint"], "--features", "random-init", "--ref", str(tmp_path / "none.npz"),
           *base], "none.npz does not exist")
    assert not out.exists() or not list(out.rglob("*.tar"))  # nothing sampled so far
    assert sample_main(["--model", registered["checkpoint"], "--features", "none", *base]) == 0
    fails(["--model", registered["checkpoint"], "--features", "none", "--seed", "1", *base],
          "holds samples of another model or setting")


def test_progressive_strip_and_interpolation_figures(tmp_path, registered):
    from pipelines.cli import main as ddpm
    from tests.datasets import photo_like

    strip = tmp_path / "fig6.png"
    assert ddpm(["sample", "--progressive", "--model", registered["checkpoint"], "--num", "2", "--every", "250",
                 "--out", str(strip)]) == 0
    # 2 rows × 5 snapshots (t = 999, 750, 500, 250, 0) of 16×16 with 2-pixel gutters.
    assert Image.open(strip).size == (5 * 18 + 2, 2 * 18 + 2)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        photo_like(rng, 40, 30).save(tmp_path / name)
    row = tmp_path / "fig8.png"
    assert ddpm(["interpolate", "--model", registered["checkpoint"], "--images", str(tmp_path / "a.png"),
                 str(tmp_path / "b.png"), "--t", "300", "--steps-between", "3", "--out", str(row)]) == 0
    pixels = np.asarray(Image.open(row))
    assert pixels.shape == (18 + 2, 7 * 18 + 2, 3)  # source, λ = 0, 1/4, 1/2, 3/4, 1, source
    assert ddpm(["interpolate", "--model", str(tmp_path / "nothing"), "--images", str(tmp_path / "a.png"),
                 str(tmp_path / "b.png"), "--out", str(row)]) == 2


def registered_files(registered) -> Path:
    """Where the version's logged model lies in the (file) artifact store."""
    uri = MlflowClient(registered["tracking"]).get_model_version_download_uri("ddpm-tiny", registered["version"])
    return Path(uri.removeprefix("file://"))


def test_sampling_reads_the_registered_version_as_data_never_its_code(tmp_path, registered, ray_local):
    """Someone who can write to the registry replaces the stored pyfunc code: none of it ever runs."""
    marker = tmp_path / "code-ran"
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n"
    stored = registered_files(registered)
    code_files = [stored / "mlflow_model.py", *sorted((stored / "code" / "ddpm_core").glob("*.py"))]
    assert len(code_files) > 10
    for file in code_files:
        file.write_text(payload + file.read_text())
    out = tmp_path / "samples"
    assert sample_main(["--model", f"models:/ddpm-tiny/{registered['version']}", "--num", "4", "--features", "none",
                        *common(registered, out)]) == 0
    direct = tiny_checkpoint(tmp_path / "same-weights")  # the registered weights, read from the checkpoint
    assert sample_main(["--model", str(direct), "--num", "4", "--features", "none",
                        *common(registered, tmp_path / "direct")]) == 0
    assert tar_pngs(out) == tar_pngs(tmp_path / "direct") and len(tar_pngs(out)) == 4
    assert not marker.exists()


def test_a_registered_file_changed_after_registration_is_refused(tmp_path, registered, caplog):
    caplog.set_level(logging.ERROR)
    weights = registered_files(registered) / "artifacts" / "model" / "ema.safetensors"
    original = weights.read_bytes()
    other = tiny_checkpoint(tmp_path / "other", seed=5)
    weights.write_bytes((other / "ema.safetensors").read_bytes())
    try:
        expect_one_error(caplog, sample_main, ["--model", "models:/ddpm-tiny@candidate", "--num", "4", "--features",
                                               "none", *common(registered, tmp_path / "samples")],
                         "ema.safetensors does not match the sha256 recorded at registration")
    finally:
        weights.write_bytes(original)
    assert not (tmp_path / "samples" / "samples").exists()  # refused before anything was sampled


def test_each_scoring_node_resolves_the_inception_weights_itself(tmp_path, registered, monkeypatch):
    """As on a cluster: the job's driver has no weights and may not download; the nodes' actors have the file
    in their own cache (the init container's job) and score with it."""
    import hashlib
    import os
    import subprocess
    import sys

    import torch

    from ddpm_core.inception import FILE_NAMES, TRUSTED_ENV, FIDInception
    from pipelines.ray_runtime import LocalHead

    node_cache = tmp_path / "node-cache"
    (node_cache / "inception").mkdir(parents=True)
    weights = node_cache / "inception" / FILE_NAMES[0]
    torch.save(FIDInception.random_init(5).state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    monkeypatch.setenv(TRUSTED_ENV, digest)  # vouched for, as an operator's own conversion would be
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("DDPM_CACHE", str(node_cache))
    head = LocalHead(num_cpus=2, state_dir=tmp_path / "head")  # its raylet and actors get this environment
    try:
        driver_home = tmp_path / "driver-home"
        driver_home.mkdir()
        driver_env = {**os.environ, "HOME": str(driver_home), "DDPM_CACHE": str(driver_home / "cache"),
                      "DDPM_INCEPTION_DOWNLOAD": "0"}

        def sample(*extra):
            return subprocess.run(
                [sys.executable, "-m", "pipelines.sample_fid", "--model", registered["checkpoint"], "--num", "16",
                 "--allow-small-n", "--features", "inception", "--address", head.address,
                 *common(registered, tmp_path / "out"), *extra], env=driver_env, capture_output=True, text=True)

        done = sample()
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((tmp_path / "out" / "fid.json").read_text())
        assert record["inception_weights_sha256"] == digest and record["num"] == 16
        # N=16: not the paper's protocol, so its scores are spec_ scores, never "inception_score" or "fid".
        assert np.isfinite(record["spec_inception_score"]) and "inception_score" not in record
        assert not (driver_home / "cache").exists()  # the driver looked for nothing
        # A path that no node has: the actor's error comes back as the job's one line, exit 2.
        missing = sample("--inception-weights", "/nowhere/inception.pth")
        assert missing.returncode == 2
        errors = [line for line in missing.stderr.splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "no Inception weights for FID: looked at /nowhere/inception.pth" in errors[0]
        assert "Traceback" not in missing.stderr
    finally:
        head.stop()


def test_a_second_sampling_job_on_one_output_is_refused_and_the_first_keeps_its_lock(tmp_path, registered, caplog):
    out = tmp_path / "out"
    (out / "_progress").mkdir(parents=True)
    holder = {"host": "another-host", "pid": 1, "token": "t", "since": "2026-12-05T00:00:00Z"}
    (out / "_progress" / "lock.json").write_text(json.dumps(holder))
    args = ["--model", registered["checkpoint"], "--num", "8", "--actors", "0", "--features", "none",
            *common(registered, out)]
    expect_one_error(caplog, sample_main, args, f"output {out} is being written by another sampling job "
                                                "(pid 1 on another-host, since 2026-12-05T00:00:00Z)")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["_progress", "_progress/lock.json"]
    (out / "_progress" / "lock.json").unlink()  # as the message says, once no such job runs
    assert sample_main(args) == 0
    assert sorted(tar_pngs(out)) == list(range(8)) and not (out / "_progress" / "lock.json").exists()


def test_an_mlflow_outage_after_the_scores_are_written_does_not_fail_the_batch(tmp_path, registered, monkeypatch,
                                                                             caplog):
    """fid.json is the batch's result (the scheduler reads it); the MLflow run only mirrors it."""
    from tests.mlflow_servers import MlflowServer, OutageProxy

    server = MlflowServer(tmp_path)
    server.start()
    proxy = OutageProxy(server.uri, down_on="/api/2.0/mlflow/runs/create")  # down once the scores are logged
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    caplog.set_level(logging.WARNING, logger="ddpm.sample")
    try:
        out = tmp_path / "out"
        assert sample_main(["--model", registered["checkpoint"], "--num", "16", "--actors", "0", "--allow-small-n",
                            "--features", "random-init", *common(registered, out), "--tracking-uri", proxy.uri]) == 0
        record = json.loads((out / "fid.json").read_text())
        assert record["num"] == 16 and np.isfinite(record["pseudo_inception_score"])
        assert proxy.dropped and proxy.dropped[0] == "POST /api/2.0/mlflow/runs/create"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"the scores are in {out}/fid.json; mirroring them to MLflow failed" in w for w in warnings)
    finally:
        proxy.close()
        server.stop()


def test_fid_of_images_on_disk_equals_the_sampling_jobs_score(tmp_path, registered, capsys):
    """`ddpm fid --images` on a folder of the job's PNGs, and on its tars, gives the job's own scores."""
    ref = tmp_path / "ref.npz"
    ref.write_bytes(save_reference(np.full(2048, 0.1), np.eye(2048), features="random-init", resize=RESIZE))
    out = tmp_path / "samples"
    assert sample_main(["--model", registered["checkpoint"], "--num", "10", "--actors", "0", "--features",
                        "random-init", "--allow-small-n", "--ref", str(ref), *common(registered, out)]) == 0
    job = json.loads((out / "fid.json").read_text())
    folder = tmp_path / "pngs"
    (folder / "later").mkdir(parents=True)
    for key, png in tar_pngs(out).items():  # the last two one level down: folders are searched at any depth
        (folder / ("later" if key >= 8 else "") / f"{key:08d}.png").write_bytes(png)
    capsys.readouterr()
    for images in (folder, out / "samples"):
        assert ddpm(["fid", "--images", str(images), "--ref", str(ref), "--features", "random-init",
                     "--allow-small-n", "--actors", "0"]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["images"] == 10 and scored["inception_weights_sha256"] == job["inception_weights_sha256"]
        assert scored["reference_sha256"] == job["reference_sha256"] and "fid" not in scored
        for key in ("pseudo_fid", "pseudo_inception_score", "pseudo_inception_score_std"):
            assert scored[key] == pytest.approx(job[key], rel=1e-6, abs=1e-9), (images, key)
    # Pixel features: the Fréchet distance of the images' 8x8 area means, as numpy computes it from the PNGs.
    pixel_ref = tmp_path / "pixels.npz"
    pixel_ref.write_bytes(save_reference(np.full(192, 0.5), 0.01 * np.eye(192), features="pixels", resize="area_8x8"))
    assert ddpm(["fid", "--images", str(folder), "--ref", str(pixel_ref), "--features", "pixels", "--allow-small-n",
                 "--actors", "0"]) == 0
    scored = json.loads(capsys.readouterr().out)
    images = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in tar_pngs(out).values()])
    n, side = len(images), images.shape[1]
    x = images.reshape(n, 8, side // 8, 8, side // 8, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(n, 192) / 255
    expected = frechet_distance(x.mean(axis=0), np.cov(x, rowvar=False), np.full(192, 0.5), 0.01 * np.eye(192))
    assert scored["pixel_fd"] == pytest.approx(expected, rel=1e-6)
    assert scored["inception_weights_sha256"] == "pixels(8x8)"
    assert not [key for key in scored if "fid" in key or "inception_score" in key]


def test_sampling_shows_a_bar_on_a_terminal_and_log_lines_elsewhere(tmp_path, registered, caplog):
    def argv(out: Path) -> list[str]:
        return ["--model", registered["checkpoint"], "--num", "8", "--actors", "0", "--features", "none",
                *common(registered, out), "--per-tar", "2"]  # 4 tars: the count moves 4 times

    # Not a terminal (pytest captures stderr): the count, the rate and the time left as log lines.
    caplog.set_level(logging.INFO, logger="ddpm.progress")
    assert sample_main(argv(tmp_path / "logged")) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "ddpm.progress"]
    assert re.fullmatch(r"samples 2/8 \(25%\), [\d.]+/s, [\d.]+ (s|min) left", lines[0]), lines
    assert re.fullmatch(r"samples 8/8 \(100%\), [\d.]+/s, 0 s left", lines[-1]), lines
    # On a terminal: a bar with the count, the time so far and left, and the rate; no progress log lines.
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sample", *argv(tmp_path / "bar")],
                               stdin=secondary, stdout=secondary, stderr=secondary, cwd=Path(__file__).parents[1])
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(primary)
    text = shown.decode(errors="replace")
    assert process.wait(timeout=60) == 0, text[-2000:]
    rate = r", +[\d.]+(s/ samples| samples/s)\]"  # tqdm turns a rate under 1/s into seconds per sample
    assert re.search(r"samples: +100%\|[^|\r]*\| 8/8 \[\d\d:\d\d<00:00" + rate, text), text[-2000:]
    assert re.search(r"samples: +\d+%\|[^|\r]*\| [2-6]/8 \[\d\d:\d\d<\d\d:\d\d" + rate, text), text[-2000:]
    assert "ddpm.progress" not in text
