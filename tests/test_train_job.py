"""Integration: the training job on a real local Ray (2 workers, gloo) with a real MLflow SQLite store."""

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ddpm_core.checkpoint import load_ema_unet, read_state
from ddpm_core.config import ConfigError
from ddpm_core.ema import EMA
from ddpm_core.presets import get_preset
from ddpm_core.training import build_optimizer
from ddpm_core.unet import UNet
from pipelines.mlflow_tracking import CHECKPOINT_DIR_TAG, REPLACED_BY_TAG, RUN_NAME_TAG, find_or_create_run
from pipelines.train import check_resumable
from pipelines.train import main as train_main
from tests.errors import expect_one_error
from tests.mlflow_servers import LOG_BATCH, OutageProxy
from tests.test_loader import make_dataset

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--set", "train.steps=24", "--set", "train.checkpoint_every=8", "--set", "train.log_every=4",
         "--set", "train.sample_every=12"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    make_dataset(root, str(root / "tiny16"), n=49, per_shard=6, resolution=16)
    return str(root / "tiny16")


def job(tmp_path, dataset, *extra):
    return ["--preset", "tiny", "--data", dataset, "--workers", "2", "--loader-workers", "0",
            "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--name", "tiny-run", *STEPS, *extra]


def read_trace(trace: Path, ranks=(0, 1)) -> dict[int, list[dict]]:
    return {rank: [json.loads(line) for line in (trace / f"rank{rank}.jsonl").read_text().splitlines()]
            for rank in ranks}


def the_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny16").experiment_id])
    assert len(runs) == 1  # one run per run name, resumed or not
    return client, runs[0]


def test_ddp_run_trains_checkpoints_tracks_and_registers(tmp_path, dataset, ray_local, monkeypatch):
    monkeypatch.setenv("DDPM_TEST_TRACE_DIR", str(tmp_path))
    assert train_main(job(tmp_path, dataset)) == 0

    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.ch"] == "32"
    assert run.data.params["workers"] == "2" and run.data.params["preset"] == "tiny"
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0]
    for key in ("grad_norm", "lr", "images_per_s", "nonfinite_steps"):
        assert client.get_metric_history(run.info.run_id, key)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr")][-1] == pytest.approx(1e-3)
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert sorted(p.split("+step+")[1].split("+")[0] for p in grids) == ["12", "24"]  # EMA sample grids

    checkpoints = sorted((tmp_path / "runs" / "tiny-run").glob("checkpoint_0*"))
    assert [c.name for c in checkpoints] == ["checkpoint_000000016", "checkpoint_000000024"]  # keep 2
    state = read_state(checkpoints[-1])
    assert state.step == 24 and state.config["preset"] == "tiny" and state.nonfinite_steps == 0
    assert run.data.tags["checkpoint"] == str(checkpoints[-1])

    version = client.get_model_version_by_alias("ddpm-tiny", "candidate")
    assert version.tags["steps"] == "24" and version.tags["run_id"] == run.info.run_id
    info = json.loads((Path(dataset) / "dataset.json").read_text())
    assert version.tags["dataset_fingerprint"] == info["fingerprint"]
    (data_input,) = run.inputs.dataset_inputs  # the dataset as the run's input, with its fingerprint and counts
    assert data_input.dataset.name == "tiny16" and json.loads(data_input.dataset.profile)["counts"] == info["counts"]
    assert json.loads(data_input.dataset.profile)["fingerprint"] == info["fingerprint"]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    loaded = mlflow.pyfunc.load_model("models:/ddpm-tiny@candidate")
    ema = load_file(str(checkpoints[-1] / "ema.safetensors"))
    registered = loaded.unwrap_python_model().model.state_dict()
    assert set(registered) == set(ema) and all(torch.equal(registered[k], ema[k]) for k in ema)
    samples = loaded.predict(pd.DataFrame({"index": [0, 1, 2]}), params={"steps": 5})
    assert samples.shape == (3, 16, 16, 3) and samples.dtype == np.uint8
    again = loaded.predict(pd.DataFrame({"index": [1]}), params={"steps": 5})
    assert np.array_equal(again[0], samples[1])  # image i depends only on (seed, i)
    model, config = load_ema_unet(checkpoints[-1])
    assert config.preset == "tiny" and torch.equal(model.conv_out.weight, ema["conv_out.weight"])

    # The ranks saw different data at every step, and their weights stayed identical.
    trace = read_trace(tmp_path)
    assert [t["step"] for t in trace[0]] == [t["step"] for t in trace[1]] == list(range(24))
    for a, b in zip(trace[0], trace[1]):
        assert not set(a["keys"]) & set(b["keys"]) and len(a["keys"]) == len(b["keys"]) == 8
        assert a["weights"] == b["weights"]
    # ...and they changed at every step but the first, whose warmed-up lr is 0 as in the official code.
    assert len({t["weights"] for t in trace[0]}) == 23


def test_a_stopped_run_resumes_in_its_mlflow_run_and_ray_train_recovers_a_worker_fault_from_s3(
        tmp_path, dataset, ray_local, monkeypatch, s3_bucket, caplog):
    from ddpm_core.storage import s3_client

    def s3_keys() -> set[str]:
        return {item["Key"] for item in s3_client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/")["Contents"]}

    monkeypatch.setenv("DDPM_TEST_TRACE_DIR", str(tmp_path))
    monkeypatch.setenv("DDPM_TEST_FAIL_AT_STEP", "13")
    monkeypatch.setenv("DDPM_TEST_FAIL_RANK", "1")
    caplog.set_level(logging.ERROR)
    storage = ["--storage", f"s3://{s3_bucket}/runs"]
    # No failure allowed: the run stops, and says how to resume.
    assert train_main(job(tmp_path, dataset, "--max-failures", "0", *storage)) == 2
    assert "re-run the same command (--name tiny-run) to resume" in caplog.text
    assert {key.split("/")[2] for key in s3_keys() if "/checkpoint_0" in key} == {"checkpoint_000000008"}
    client, run = the_run(tmp_path)
    assert run.info.status == "FAILED"

    # The same command resumes from the step-8 checkpoint; a worker fault at step 19 is then recovered by
    # Ray Train itself (--max-failures 1) from the step-16 checkpoint, read back from S3.
    monkeypatch.setenv("DDPM_TEST_FAIL_AT_STEP", "19")
    monkeypatch.setenv("DDPM_TEST_FAIL_ONCE", str(tmp_path / "failed-once"))
    (tmp_path / "rank0.jsonl").unlink()
    (tmp_path / "rank1.jsonl").unlink()
    assert train_main(job(tmp_path, dataset, "--max-failures", "1", *storage)) == 0
    assert (tmp_path / "failed-once").exists()
    steps = [t["step"] for t in read_trace(tmp_path)[1]]  # rank 1 failed before tracing step 19
    assert steps == list(range(8, 19)) + list(range(16, 24))  # from the checkpoints, never from zero
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [4, 8, 12, 12, 16, 20, 24]
    # Steps 9-12 ran before the stop and again after the resume, from the same data, seeds and state:
    # the two logged losses of step 12 are the same number.
    first, replayed = [m.value for m in history if m.step == 12]
    assert replayed == pytest.approx(first, rel=1e-6)
    assert client.get_model_version_by_alias("ddpm-tiny", "candidate").tags["steps"] == "24"

    keys = s3_keys()
    checkpoint = "runs/tiny-run/checkpoint_000000024"
    assert {f"{checkpoint}/{name}" for name in ("model.safetensors", "ema.safetensors", "optimizer.pt",
                                                  "state.json")} <= keys
    assert not any(key.startswith("runs/tiny-run/checkpoint_000000008/") for key in keys)  # keep 2: 16 and 24
    state = json.loads(s3_client().get_object(Bucket=s3_bucket, Key=f"{checkpoint}/state.json")["Body"].read())
    assert state["step"] == 24
    assert run.data.tags["checkpoint_location"] == f"s3://{s3_bucket}/runs/tiny-run"


def test_each_rank_reads_a_remote_checkpoint_into_a_folder_of_its_own(tmp_path, s3_bucket):
    """Ray's one download per node (`as_directory`) races when ranks arrive apart; the job's restore does not
    use it: it restores while another process holds that download's lock (as_directory would wait for it)."""
    import threading

    from ray.train import Checkpoint

    from ddpm_core.storage import s3_client, storage_filesystem
    from pipelines.ray_train import resume_from
    from tests.models import tiny_checkpoint

    local = tiny_checkpoint(tmp_path / "checkpoint", seed=3, step=16)
    for file in local.iterdir():
        s3_client().upload_file(str(file), s3_bucket, f"runs/checkpoint_000000016/{file.name}")
    checkpoint = Checkpoint(f"{s3_bucket}/runs/checkpoint_000000016", storage_filesystem(f"s3://{s3_bucket}"))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ray.air._internal.filelock import TempFileLock; "
         "lock = TempFileLock(sys.argv[1], timeout=0); lock.__enter__(); print('held', flush=True); time.sleep(300)",
         checkpoint._get_temporary_checkpoint_dir()], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        config = get_preset("tiny")
        model = UNet(config.model)
        restored = []
        reader = threading.Thread(target=lambda: restored.append(resume_from(
            checkpoint, model, EMA(model, config.train.ema_decay), build_optimizer(model, config.train))),
            daemon=True)
        reader.start()
        reader.join(60)
        assert [state.step for state in restored] == [16]
    finally:
        holder.kill()
        holder.wait()
    saved = load_file(str(local / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], saved[k]) for k in saved)


def test_too_many_non_finite_steps_stop_the_run_naming_the_step(tmp_path, dataset, ray_local, caplog, monkeypatch):
    caplog.set_level(logging.ERROR)
    # --data relative to the driver's directory: the workers, elsewhere, are given it resolved.
    monkeypatch.chdir(Path(dataset).parent)
    code = train_main(job(tmp_path, Path(dataset).name, "--workers", "1", "--set", "train.lr=1e30", "--set",
                          "train.warmup_steps=0", "--set", "train.max_nonfinite_steps=3"))
    assert code == 2
    message = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert message.startswith("stopped at step ") and "3 consecutive steps had a non-finite loss" in message
    assert the_run(tmp_path)[1].info.status == "FAILED"


def test_a_shard_not_the_manifests_stops_training_at_once_with_one_line(tmp_path, dataset, ray_local, caplog):
    """A user error on a worker is not retried by Ray Train (--max-failures 3): the restarted ranks read the
    failing rank's stop record and return, and the driver reports the one line."""
    caplog.set_level(logging.ERROR)
    damaged = tmp_path / "tiny16"  # the experiment's name
    shutil.copytree(dataset, damaged)
    shard = sorted(damaged.rglob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    shard.write_bytes(bytes(data))
    args = job(tmp_path, str(damaged), "--max-failures", "3", "--loader-workers", "1")
    assert train_main(args) == 2
    message = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR][-1]
    assert message.startswith("rank ") and shard.name in message
    assert "is not the one in manifest.parquet" in message and "; then re-run the same command" in message, message
    record = json.loads((tmp_path / "runs" / "tiny-run.stopped.json").read_text())
    assert record["message"] in message and "\n" not in message
    assert the_run(tmp_path)[1].info.status == "FAILED"


def test_resume_refuses_another_dataset_or_config_and_force_new_starts_over(tmp_path, dataset, ray_local,
                                                                          monkeypatch, caplog):
    monkeypatch.setenv("DDPM_TEST_TRACE_DIR", str(tmp_path))
    caplog.set_level(logging.INFO)
    one = ["--workers", "1", "--set", "train.steps=8"]
    assert train_main(job(tmp_path, dataset, *one)) == 0
    client, first = the_run(tmp_path)
    fingerprint = json.loads((Path(dataset) / "dataset.json").read_text())["fingerprint"]

    # Other images under the same dataset name (so the same experiment): the --data path may differ, they may not.
    other = tmp_path / "other"
    other.mkdir()
    make_dataset(other, str(other / "tiny16"), n=37, per_shard=6, resolution=16)
    other_fingerprint = json.loads((other / "tiny16" / "dataset.json").read_text())["fingerprint"]
    assert other_fingerprint != fingerprint
    expect_one_error(caplog, train_main, job(tmp_path, str(other / "tiny16"), *one),
                     f"run 'tiny-run' was started with dataset_fingerprint={fingerprint}; this command has "
                     f"dataset_fingerprint={other_fingerprint}; use the same settings to resume, or --force-new to "
                     "start over")
    expect_one_error(caplog, train_main, job(tmp_path, dataset, *one, "--set", "train.lr=0.002"),
                     "run 'tiny-run' was started with train.lr=0.001; this command has train.lr=0.002; use the same")
    client, refused = the_run(tmp_path)
    assert refused.info.status == "FINISHED" and refused.info.end_time == first.info.end_time  # left as it was

    # A new MLflow store or another experiment finds no run, but Ray Train would resume the checkpoints of --name
    # all the same: they record their dataset and config, checked before training; the run just made is deleted.
    newest = tmp_path / "runs" / "tiny-run" / "checkpoint_000000008" / "state.json"
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    expect_one_error(caplog, train_main, [*job(tmp_path, str(other / "tiny16"), *one), "--tracking-uri", elsewhere],
                     f"run 'tiny-run' (checkpoint {newest}) was started with dataset_fingerprint={fingerprint}; this "
                     f"command has dataset_fingerprint={other_fingerprint}; use the same settings to resume")
    expect_one_error(caplog, train_main, [*job(tmp_path, dataset, *one, "--set", "train.lr=0.002"), "--experiment",
                                          "other"],
                     f"run 'tiny-run' (checkpoint {newest}) was started with train.lr=0.001; this command has "
                     "train.lr=0.002")
    assert not MlflowClient(elsewhere).search_runs([MlflowClient(elsewhere).get_experiment_by_name("tiny16")
                                                    .experiment_id])
    assert not client.search_runs([client.get_experiment_by_name("other").experiment_id])

    # A run started before a config field existed has no param for it: it counts as the field's default.
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("DELETE FROM params WHERE key = 'train.max_nonfinite_steps' AND run_uuid = ?",
                          (first.info.run_id,)).rowcount == 1
    # train.steps may change: the run goes on from its step-8 checkpoint, in the same MLflow run.
    assert train_main(job(tmp_path, dataset, "--workers", "1", "--set", "train.steps=16")) == 0
    assert "resuming run 'tiny-run' with train.steps=16 (was 8)" in caplog.text
    client, extended = the_run(tmp_path)
    assert extended.info.run_id == first.info.run_id and extended.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "loss")] == [4, 8, 12, 16]
    assert [t["step"] for t in read_trace(tmp_path, ranks=(0,))[0]] == list(range(16))
    assert read_state(tmp_path / "runs" / "tiny-run" / "checkpoint_000000016").step == 16

    # --force-new: a new run, from step 0, in a folder of its own; the old run is kept but never resumed again.
    assert train_main(job(tmp_path, dataset, *one, "--set", "train.lr=0.002", "--force-new")) == 0
    runs = client.search_runs([first.info.experiment_id])
    new = next(r for r in runs if r.info.run_id != first.info.run_id)
    old = client.get_run(first.info.run_id)
    assert len(runs) == 2 and new.data.params["train.lr"] == "0.002" and new.info.status == "FINISHED"
    assert RUN_NAME_TAG not in old.data.tags and old.data.tags[REPLACED_BY_TAG] == new.info.run_id
    assert [m.step for m in client.get_metric_history(old.info.run_id, "loss")] == [4, 8, 12, 16]
    assert [m.step for m in client.get_metric_history(new.info.run_id, "loss")] == [4, 8]
    trace = read_trace(tmp_path, ranks=(0,))[0]
    assert [t["step"] for t in trace] == list(range(16)) + list(range(8))
    assert trace[16]["weights"] == trace[0]["weights"]  # the same seed, the same initial weights (train.seed)
    folder = new.data.tags[CHECKPOINT_DIR_TAG]
    assert folder.startswith("tiny-run-") and new.data.tags["checkpoint_location"] == str(tmp_path / "runs" / folder)
    assert [c.name for c in (tmp_path / "runs" / folder).glob("checkpoint_0*")] == ["checkpoint_000000008"]
    assert sorted(c.name for c in (tmp_path / "runs" / "tiny-run").glob("checkpoint_0*")) == [
        "checkpoint_000000008", "checkpoint_000000016"]
    found, resumed = find_or_create_run(client, first.info.experiment_id, "tiny-run", {}, {})
    assert resumed and found.info.run_id == new.info.run_id  # the next command resumes the new run


def test_a_param_the_run_lacks_is_the_fields_default_when_resuming():
    now = {k: str(v) for k, v in get_preset("tiny").with_overrides(["model.init=paper"]).flat().items()}
    before_init = {k: v for k, v in now.items() if k != "model.init"}
    check_resumable("old", before_init, now)  # model.init=paper, the default: the behaviour before the field
    with pytest.raises(ConfigError, match="^run 'old' was started with model.init=paper; this command has "
                                          "model.init=pytorch; use the same settings"):
        check_resumable("old", before_init, {**now, "model.init": "pytorch"})


def test_an_mlflow_outage_during_training_loses_no_point_and_fails_nothing(tmp_path, dataset, ray_local,
                                                                          mlflow_server):
    # MLflow goes down at the metrics of step 8 and comes back at those of step 12: the metrics and the grid of
    # step 8 (whose call sends the pending metrics first) find no server.
    proxy = OutageProxy(mlflow_server, down_at=8, up_at=12)
    try:
        args = job(tmp_path, dataset, "--workers", "1", "--tracking-uri", proxy.uri, "--set", "train.steps=16",
                   "--set", "train.checkpoint_every=16", "--set", "train.sample_every=8")
        assert train_main(args) == 0
        assert proxy.dropped == [f"POST {LOG_BATCH}"] * 2  # one try each: the worker does not retry into a stall
        client = MlflowClient(mlflow_server)
        runs = client.search_runs([client.get_experiment_by_name("tiny16").experiment_id])
        assert len(runs) == 1  # the session's server holds no other run of this data set
        run = runs[0]
        assert run.info.status == "FINISHED"
        for key in ("loss", "grad_norm", "lr", "images_per_s"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [4, 8, 12, 16]
        grids = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
        assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in grids) == [8, 16]
        assert client.get_model_version_by_alias("ddpm-tiny", "candidate").tags["run_id"] == run.info.run_id
    finally:
        proxy.close()


def test_bad_inputs_are_refused_before_training(tmp_path, dataset, ray_local, caplog, monkeypatch):
    caplog.set_level(logging.ERROR)

    def fails(args, message):
        expect_one_error(caplog, train_main, args, message)

    base = job(tmp_path, dataset)
    (tmp_path / "incomplete").mkdir()
    fails([*base, "--data", str(tmp_path / "incomplete")], "is not a complete dataset: no manifest.parquet")
    fails([*base, "--preset", "demo"], "holds 16×16 images but preset demo trains at 32×32")
    fails([*base, "--workers", "4"], "cannot place 4 workers needing 1 CPU each: the cluster has 2 CPU")
    fails([*base, "--workers", "3"], "global batch 16 does not split evenly over 3 workers")
    fails([*base, "--set", "train.lr=-1"], "train.lr must be positive")
    fails([*base, "--set", "train.fid_every=8"], "train.fid_every needs reference statistics: ")
    fails([*base, "--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking store at http://127.0.0.1:9")
    (tmp_path / "dataset.json").write_text("{}")
    fails([*base, "--storage", str(tmp_path / "dataset.json" / "x")], "is not writable")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    fails([*base, "--storage", "s3://runs/ddpm"], "cannot reach the S3 endpoint")
    assert not list(tmp_path.rglob("checkpoint_0*"))  # nothing started
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_experiment_by_name("tiny16") is None


def test_ray_job_submit_trains_the_tiny_preset_end_to_end(tmp_path, dataset, ray_head):
    ray_cli = str(Path(sys.executable).parent / "ray")
    command = [ray_cli, "job", "submit", "--address", ray_head, "--working-dir", str(REPO), "--",
               "python", "pipelines/train_lsun.py", "--preset", "tiny", "--data", dataset, "--workers", "2",
               "--loader-workers", "0", "--storage", str(tmp_path / "runs"), "--name", "submitted",
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *STEPS, "--set", "train.steps=12"]
    done = subprocess.run(command, env={**os.environ, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "registered ddpm-tiny version 1 (alias candidate)" in output
    assert read_state(tmp_path / "runs" / "submitted" / "checkpoint_000000012").step == 12


def test_the_training_fid_scores_against_the_datasets_own_statistics_named_by_their_network(tmp_path):
    from ddpm_core.fid import save_reference
    from ddpm_core.reference_provenance import recorded_features as reference_features
    from pipelines.training_quality import QualityReferenceError, find_reference, metric_name

    with pytest.raises(QualityReferenceError, match=f"{tmp_path} has none of fid_stats.npz, fid_stats_pseudo.npz, "
                                                    "fid_stats_pixels.npz"):
        find_reference(str(tmp_path), None)
    mu, sigma = np.zeros(2), np.eye(2)  # a real file holds 2048 features; these functions read only provenance
    (tmp_path / "fid_stats_pseudo.npz").write_bytes(save_reference(mu, sigma, extractor_sha256="random-init(seed=0)"))
    assert find_reference(str(tmp_path), None).endswith("/fid_stats_pseudo.npz")
    assert reference_features((tmp_path / "fid_stats_pseudo.npz").read_bytes()) == "random-init"
    (tmp_path / "fid_stats.npz").write_bytes(save_reference(mu, sigma, extractor_sha256="ab" * 32))
    assert find_reference(str(tmp_path), None).endswith("/fid_stats.npz")  # the FID network's first
    assert find_reference(str(tmp_path), "/elsewhere/ref.npz") == "/elsewhere/ref.npz"
    assert reference_features(save_reference(mu, sigma)) == "inception"  # pytorch-fid, clean-fid, ADM files
    assert metric_name("random-init", 256) == "train/pseudo_fid_dpmpp_2m10_n256"
    assert metric_name("inception", 64) == "train/spec_fid_dpmpp_2m10_n64"
    assert metric_name("pixels", 32) == "train/pixel_fd_dpmpp_2m10_n32"
    assert reference_features(save_reference(mu, sigma, extractor_sha256="pixels(8x8)")) == "pixels"
