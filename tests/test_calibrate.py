"""`ddpm calibrate`: checkpoints of one toy run, whose ranking is known by construction (a longer run of one
recipe is the better model), scored under an expensive and a cheap spec by the real sampling job (in-process,
pixel features: a toy metric), the report checked against the records and the known ranking."""

import json
import logging

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy.stats import spearmanr

from bench.calibration_cpu import toy_config, train_run, write_reference
from bench.sampler_table import digits
from ddpm_core.pixels import to_uint8
from pipelines.cli import main as ddpm
from pipelines.evaluation import ROUTINE_SAMPLER, EvaluationResult, SamplerSetting

LENGTHS = [20, 100, 500]  # training steps of the checkpoints: the last is the best model


def test_a_calibration_ranks_one_runs_checkpoints_by_training_length_and_reports_it(tmp_path):
    # The tiny preset at 8x8 on the digits (T = 100): 500 steps take ~30 s on one core. Pixel FD sees these
    # checkpoints improve (59/45/29 at N=16, measured); the random-init Inception ranks them backwards
    # (docs/evaluation.md), which is why this calibration scores with --features pixels.
    data = digits(8)
    config = toy_config("tiny", 8, 100, 0.995).with_overrides(["train.random_flip=false"])
    models = [str(path) for path in train_run(config, data, LENGTHS, tmp_path / "run")]
    write_reference(to_uint8(data[:256]), tmp_path / "ref.npz", "pixels")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["calibrate", "--models", *models, "--expensive", "ddim:20", "--cheap", "dpmpp_2m:4",
            "--out", str(tmp_path / "cal"), "--num", "16", "--per-tar", "16", "--allow-small-n", "--actors", "0",
            "--features", "pixels", "--ref", str(tmp_path / "ref.npz"), "--tracking-uri", tracking]
    assert ddpm(argv) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    specs = ["ddim-20-trailing", "dpmpp_2m-4-trailing"]
    scores = {}
    for fid_json in (tmp_path / "cal").glob("*/*/fid.json"):
        result = EvaluationResult.parse(fid_json.read_bytes(), str(fid_json))
        assert result.label == "pixel_fd" and result.num == 16 and not result.bf16
        scores[fid_json.parent.parent.name, fid_json.parent.name] = result.pixel_fd
    assert len(scores) == 6 and {spec for _, spec in scores} == set(specs)
    recorded = {(s["setting"], s["score"]) for s in report["scores"]}
    assert recorded == {(spec, value) for (_, spec), value in scores.items()}
    by = {(s["model"], s["setting"]): s["score"] for s in report["scores"]}
    expensive, cheap = ([by[m, spec] for m in models] for spec in specs)
    # The known ranking: every spec scores a longer run better, so the cheap one agrees on all of it.
    assert expensive == sorted(expensive, reverse=True) and cheap == sorted(cheap, reverse=True)
    assert report["best"] == models[-1] and report["expensive_label"] == "pixel_fd"
    (row,) = report["specs"]
    assert row["spec"] == specs[1] and row["cost_ratio"] == pytest.approx(20 / 4) and row["label"] == "pixel_fd"
    assert row["spearman"] == pytest.approx(spearmanr(expensive, cheap).statistic) == pytest.approx(1.0)
    assert row["agrees"] and row["best"] == models[-1]
    assert f"| {specs[1]} | pixel_fd | 4 | 5.0× |" in (tmp_path / "cal" / "calibration.md").read_text()
    assert Image.open(tmp_path / "cal" / "calibration.png").size[0] > 400
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm-calibrations").experiment_id])
    assert run.data.metrics[f"spearman_{specs[1]}"] == pytest.approx(1.0)
    # Again: every set is found complete, nothing is sampled twice, the same report.
    assert ddpm(argv) == 0
    assert json.loads((tmp_path / "cal" / "calibration.json").read_text())["scores"] == [
        {**s, "seconds": None} for s in report["scores"]]


def test_a_calibration_needs_three_models_and_distinct_specs(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    base = ["calibrate", "--out", str(tmp_path / "cal"), "--ref", str(tmp_path / "ref.npz")]
    assert ddpm([*base, "--models", "a", "b", "a"]) == 2
    assert "at least 3 different models" in caplog.records[-1].getMessage()
    assert ddpm([*base, "--models", "a", "b", "c", "--cheap", "ddim:20", "--expensive", "ddim:20"]) == 2
    assert "name one spec twice" in caplog.records[-1].getMessage()
    assert SamplerSetting.parse("dpmpp_2m:20") == ROUTINE_SAMPLER and SamplerSetting.parse("ddpm").name == "ddpm"
    assert not (tmp_path / "cal").exists()
