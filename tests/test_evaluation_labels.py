"""Only the paper's protocol is called FID: any other spec's score is a spec_fid in fid.json, and its MLflow
metric and version tag name the sampler, steps and N (milliseconds, no servers)."""

from dataclasses import replace

import pytest

from ddpm_core.inception import ACCEPTED_WEIGHTS
from ddpm_core.sampling import SampleSpec
from pipelines.evaluation import EvaluationResult, verified_fid
from pipelines.mlflow_registry import score_tag

OFFICIAL = next(iter(ACCEPTED_WEIGHTS))


def result(sampler="ddpm", steps=1000, num=50000, bf16=False, clip=True, weights=OFFICIAL, features="inception"):
    spec = SampleSpec("models:/m/1", sampler, steps, 0.0, 0, num, 1000, 256, bf16, "trailing", clip)
    return EvaluationResult.of_samples(spec, features, "ee" * 32, weights, "ref.npz", "cd" * 32).scored(7.5, (3.0, 0.1))


def test_the_paper_protocol_alone_is_called_fid():
    paper = result()
    assert paper.is_paper_protocol and paper.to_json()["fid"] == 7.5 and paper.metrics()["fid"] == 7.5
    assert score_tag(paper.to_json(), paper.label) == "fid/ddpm-1000-trailing/n50000/seed0/fp32"


@pytest.mark.parametrize("cheap, metric", [
    (dict(sampler="dpmpp_2m", steps=20), "fid_dpmpp_2m20_n50000"),  # the routine spec
    (dict(num=10000), "fid_ddpm1000_n10000"),  # too few samples
    (dict(bf16=True), "fid_ddpm1000_n50000"),  # another precision
    (dict(clip=False), "fid_ddpm1000_n50000"),
    (dict(weights="ab" * 32), "fid_ddpm1000_n50000"),  # unverified weights
])
def test_a_cheap_spec_is_never_recorded_under_the_paper_fid_name(cheap, metric):
    found = result(**cheap)
    record = found.to_json()
    assert not found.is_paper_protocol and "fid" not in record and "inception_score" not in record
    assert record["spec_fid"] == 7.5 and record["spec_inception_score"] == 3.0
    assert found.metrics() == {metric: 7.5, metric.replace("fid", "inception_score", 1): 3.0,
                               metric.replace("fid", "inception_score_std", 1): 0.1}
    tag = score_tag(record, found.label)
    assert tag.startswith("spec_fid/") and f"/n{found.num}/" in tag and found.sampler in tag
    assert EvaluationResult.from_json(record) == found


def test_a_record_written_before_spec_scores_reads_as_what_it_is():
    old = {**result(sampler="ddim", steps=50).to_json(), "fid": 9.0, "inception_score": 2.0}
    old.pop("spec_fid"), old.pop("spec_inception_score")
    found = EvaluationResult.from_json(old)
    assert (found.fid, found.spec_fid, found.inception_score, found.spec_inception_score) == (None, 9.0, None, 2.0)
    assert verified_fid(found) == 9.0  # ranked among its spec's records
    assert verified_fid(replace(found, inception_weights_sha256="ab" * 32)) is None
    assert verified_fid(result(features="random-init", weights="random-init(seed=0)")) is None


def test_pixel_features_give_a_pixel_fd_with_no_inception_score_and_never_a_verified_fid():
    spec = SampleSpec("models:/m/1", "ddpm", 1000, 0.0, 0, 50000, 1000, 256, False, "trailing", True)
    found = EvaluationResult.of_samples(spec, "pixels", "ee" * 32, "pixels(8x8)", "ref.npz", "cd" * 32).scored(
        0.25, None)
    record = found.to_json()
    assert found.label == "pixel_fd" and record["pixel_fd"] == 0.25 and found.metrics() == {"pixel_fd": 0.25}
    assert not {"fid", "spec_fid", "pseudo_fid"} & record.keys() and not any("inception_score" in k for k in record)
    assert verified_fid(found) is None and EvaluationResult.from_json(record) == found
    assert score_tag(record, found.label) == "pixel_fd/ddpm-1000-trailing/n50000/seed0/fp32"
