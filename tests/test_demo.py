"""`make demo` in its reduced mode (DEMO_FAST=1): the whole chain on its own local Ray, asserted by its outputs."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipelines.demo import FAST, MODEL
from pipelines.demo_data import STORED_SIDE, digit_images, digits
from pipelines.mlflow_tracking import logged_model_id
from tests.test_ray_auth import fresh_env


def test_the_built_in_dataset_is_the_digits_upscaled_as_grey_jpegs_under_lsun_keys():
    first, again = list(digits(6)), list(digits(6))
    assert first == again and len({key for key, _ in first}) == 6
    assert all(len(key) == 40 for key, _ in first)  # LSUN's 40-hex keys
    images = [np.asarray(Image.open(io.BytesIO(value))).astype(int) for _, value in first]
    assert all(image.shape == (STORED_SIDE, STORED_SIDE, 3) for image in images)
    assert max(int(np.abs(image - image.mean(2, keepdims=True)).max()) for image in images) <= 2  # grey
    small = [np.asarray(Image.fromarray(image[..., 0].astype(np.uint8)).resize((8, 8), Image.BOX)) for image in images]
    # Downscaled back, each is its own digit (the bicubic round trip blurs it a little), not another one.
    corr = np.corrcoef([a.ravel() for a in small] + [d.ravel() for d in digit_images()[:6]])[:6, 6:]
    assert corr.diagonal().min() > 0.9 and (corr - np.eye(6) * 2).max() < 0.9
    with pytest.raises(ValueError, match="1..1797 digits, not 1798"):
        next(digits(1798))


@pytest.mark.slow
def test_demo_fast_mode_produces_grid_registered_version_and_scores(tmp_path):
    home = tmp_path / "home"  # a new user's: empty, and no Ray token configured
    done = subprocess.run([sys.executable, "-m", "pipelines.demo", "--dir", str(tmp_path)],
                          env={**fresh_env(home), "DEMO_FAST": "1"}, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert all(f"[{i}/7]" in done.stdout for i in range(1, 8))  # progress through every stage
    assert (tmp_path / "ray" / "auth_token").stat().st_mode & 0o777 == 0o600 and not (home / ".ray").exists()

    summary = json.loads((tmp_path / "summary.json").read_text())
    grid = np.asarray(Image.open(summary["samples_grid"]))
    side = 8 * 32 + 9 * 2  # 8 cells of 32 px a row, a 2 px border around each
    assert grid.shape[1] == side and grid.shape[2] == 3 and grid.shape[0] == (FAST.samples // 8) * 34 + 2
    assert np.asarray(Image.open(summary["data_grid"])).shape == (side, side, 3)

    result = json.loads(open(summary["fid_json"]).read())
    assert result["model"] == summary["model"] == f"models:/{MODEL}/1"
    assert result["num"] == FAST.samples and result["features"] == "random-init" and "fid" not in result
    assert result["pseudo_fid"] == summary["trained"] > 0 and summary["untrained"] > 0

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version_by_alias(MODEL, "candidate")
    digest = Path(summary["fid_json"]).parent.name.rsplit("-", 1)[1]  # <out-root>/<model>/v1-<spec digest>
    assert str(version.version) == "1" and version.tags[f"ddpm.eval.{digest}.status"] == "succeeded"
    assert float(version.tags[f"ddpm.eval.{digest}.pseudo_fid"]) == pytest.approx(result["pseudo_fid"], abs=1e-9)
    decision = version.tags[f"ddpm.promotion.{digest}.decision"]
    assert decision.startswith("not promoted: pseudo-FID only")
    assert set(summary["stage_seconds"]) == {"ray", "dataset", "shard", "reference", "train", "baseline", "schedule"}

    # Where an MLflow user looks: the version's own page (its logged model's metrics, its description) ...
    linked = {m.key: m for m in client.get_logged_model(logged_model_id(version)).metrics}
    assert linked["pseudo_fid"].value == pytest.approx(result["pseudo_fid"], abs=1e-9)
    assert linked["loss"].step == FAST.steps and not any(key.startswith("system/") for key in linked)  # its training
    evaluation = client.get_run(linked["pseudo_fid"].run_id)
    assert evaluation.info.run_name == f"eval {MODEL} v1 ddim{FAST.ddim_steps} n{FAST.samples}"
    line = (f"pseudo-FID (random-init network, not an FID) **{result['pseudo_fid']:.4f}**, N={FAST.samples}; "
            f"scheduler spec {digest}: {decision}")
    assert line in version.description and version.description.count("\n- ") == 1  # one line per kind of sample set
    # ... and the training run: a quality-vs-step curve beside the loss, and the dataset as its input.
    training = client.get_run(version.run_id)
    curve = client.get_metric_history(version.run_id, f"train/pseudo_fid_dpmpp_2m10_n{FAST.fid_num}")
    assert [m.step for m in curve] == list(range(FAST.fid_every, FAST.steps + 1, FAST.fid_every))
    assert len(curve) >= 2 and all(m.value > 0 for m in curve)
    assert len(client.get_metric_history(version.run_id, "loss")) == FAST.steps // FAST.log_every
    (data_input,) = training.inputs.dataset_inputs
    fingerprint = json.loads((tmp_path / f"data_{FAST.images}" / "dataset.json").read_text())["fingerprint"]
    assert json.loads(data_input.dataset.profile)["fingerprint"] == fingerprint
    assert data_input.dataset.digest == fingerprint[:36] and data_input.dataset.name == f"data_{FAST.images}"
