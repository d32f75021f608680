"""`ddpm calibrate`: three models scored under an expensive and a cheap spec by the real sampling job
(in-process actors, the seeded random-init network: a toy metric), the report checked against the records."""

import json
import logging

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from scipy.stats import spearmanr

from ddpm_core.fid import save_reference
from pipelines.cli import main as ddpm
from pipelines.evaluation import ROUTINE_SAMPLER, EvaluationResult, SamplerSetting
from tests.models import tiny_checkpoint


def test_calibration_reports_rank_correlation_cost_and_champion_from_the_sample_sets(tmp_path):
    models = [str(tiny_checkpoint(tmp_path / f"model{seed}", seed=seed)) for seed in range(3)]
    (tmp_path / "ref.npz").write_bytes(save_reference(np.zeros(2048), np.eye(2048)))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["calibrate", "--models", *models, "--expensive", "ddim:20", "--cheap", "dpmpp_2m:4",
            "--out", str(tmp_path / "cal"), "--num", "16", "--per-tar", "16", "--allow-small-n", "--actors", "0",
            "--features", "random-init", "--ref", str(tmp_path / "ref.npz"), "--tracking-uri", tracking]
    assert ddpm(argv) == 0
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    specs = ["ddim-20-trailing", "dpmpp_2m-4-trailing"]
    scores = {}
    for fid_json in (tmp_path / "cal").glob("*/*/fid.json"):
        result = EvaluationResult.parse(fid_json.read_bytes(), str(fid_json))
        assert result.label == "pseudo_fid" and result.num == 16 and not result.bf16
        scores[fid_json.parent.parent.name, fid_json.parent.name] = result.pseudo_fid
    assert len(scores) == 6 and {spec for _, spec in scores} == set(specs)
    recorded = {(s["setting"], s["score"]) for s in report["scores"]}
    assert recorded == {(spec, value) for (_, spec), value in scores.items()}
    by = {(s["model"], s["setting"]): s["score"] for s in report["scores"]}
    expensive = [by[m, specs[0]] for m in models]
    assert report["best"] == models[int(np.argmin(expensive))]
    (row,) = report["specs"]
    cheap = [by[m, specs[1]] for m in models]
    assert row["spec"] == specs[1] and row["cost_ratio"] == pytest.approx(20 / 4)
    assert row["spearman"] == pytest.approx(spearmanr(expensive, cheap).statistic)
    assert row["agrees"] == (row["best"] == report["best"]) and row["best"] == models[int(np.argmin(cheap))]
    assert f"| {specs[1]} | pseudo_fid | 4 | 5.0× |" in (tmp_path / "cal" / "calibration.md").read_text()
    assert Image.open(tmp_path / "cal" / "calibration.png").size[0] > 400
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("ddpm-calibrations").experiment_id])
    assert run.data.metrics[f"spearman_{specs[1]}"] == pytest.approx(report["specs"][0]["spearman"])
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
