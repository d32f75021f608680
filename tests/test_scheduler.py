"""The sampling scheduler against a real Ray head (`ray start`, token auth) and a real `mlflow server`.

This machine has no copy of the FID network's published weights, so the test vouches for a seeded
random-initialised Inception state_dict through DDPM_INCEPTION_TRUSTED_SHA256 — exactly what an
operator does for their own conversion of the TF graph. Its scores are therefore labelled "fid" and
can promote; the random-init *feature mode* (pseudo-FID) is checked never to promote.
"""

import json
import logging
import os
import subprocess
import sys
from datetime import datetime

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient

from ddpm_core.inception import TRUSTED_ENV, FIDInception
from ddpm_core.presets import get_preset
from ddpm_core.storage import sha256_file
from pipelines.cron import Cron, CronError
from pipelines.schedule_sampling import (
    CHAMPION,
    EVAL,
    PROMOTION,
    EvalSpec,
    add_arguments,
    build,
    submission_id,
    verified_fid,
)
from pipelines.schedule_sampling import main as schedule_main
from pipelines.registry import register
from tests.errors import expect_one_error
from tests.models import tiny_checkpoint
from tests.test_loader import make_dataset

SPEC = EvalSpec(num=16, sampler="ddim", steps=4, eta=0.0, seed=0, ref="/data/fid_stats.npz", features="inception",
                per_tar=8)


def test_cron_expressions():
    hourly = Cron.parse("0 * * * *")
    assert hourly.next_after(datetime(2026, 11, 25, 23, 5)) == datetime(2026, 11, 26, 0, 0)
    every_15 = Cron.parse("*/15 8-9 * * 1-5")  # weekdays 08:00-09:45
    assert every_15.next_after(datetime(2026, 11, 27, 9, 50)) == datetime(2026, 11, 30, 8, 0)  # Fri → Mon
    assert every_15.next_after(datetime(2026, 11, 25, 8, 0)) == datetime(2026, 11, 25, 8, 15)
    either_day = Cron.parse("30 2 1 * 0")  # the 1st of the month or a Sunday (cron's OR rule)
    assert either_day.next_after(datetime(2026, 11, 25, 0, 0)) == datetime(2026, 11, 29, 2, 30)
    assert Cron.parse("0 0 * * 7").weekdays == frozenset({0})
    for bad, message in (("* * * *", "has 4 fields"), ("61 * * * *", "minute field"), ("* * * x *", "month field"),
                         ("*/0 * * * *", "step < 1")):
        with pytest.raises(CronError, match=message):
            Cron.parse(bad)


def test_submission_ids_are_deterministic_and_name_the_spec():
    assert submission_id("ddpm-lsun_bedroom256", 3, SPEC, 1) == submission_id("ddpm-lsun_bedroom256", 3, SPEC, 1)
    job = submission_id("ddpm-lsun_bedroom256", 3, SPEC, 2)
    assert job == f"ddpm-eval-ddpm-lsun-bedroom256-v3-{SPEC.digest}-a2" and len(SPEC.digest) == 10
    other = EvalSpec(**{**SPEC.__dict__, "num": 50000})
    assert other.digest != SPEC.digest


def test_only_verified_fids_count(monkeypatch):
    official = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    tags = {EVAL + "spec": SPEC.digest, EVAL + "status": "succeeded", EVAL + "fid": "12.5",
            EVAL + "weights_sha256": official}
    assert verified_fid(tags, SPEC) == 12.5
    assert verified_fid({**tags, EVAL + "weights_sha256": "ab" * 32}, SPEC) is None
    monkeypatch.setenv(TRUSTED_ENV, "ab" * 32)
    assert verified_fid({**tags, EVAL + "weights_sha256": "ab" * 32}, SPEC) == 12.5
    assert verified_fid({k: v for k, v in tags.items() if k != EVAL + "fid"} | {EVAL + "pseudo_fid": "3"}, SPEC) is None
    assert verified_fid({**tags, EVAL + "spec": "0123456789"}, SPEC) is None
    assert verified_fid({**tags, EVAL + "status": "failed"}, SPEC) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server, ray_head):
    root = tmp_path_factory.mktemp("scheduler")
    weights = root / "inception.pth"
    torch.save(FIDInception.random_init(seed=1).state_dict(), weights)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRUSTED_ENV, sha256_file(weights))
        make_dataset(root, str(root / "data"), n=25, per_shard=8, resolution=16)
        # Its own process: Ray workers only see the trusted sha if it is in their environment from the start.
        subprocess.run([sys.executable, "-m", "pipelines.fid_reference", "--data", str(root / "data"),
                        "--inception-weights", str(weights), "--cpus-per-actor", "0.5"], check=True, env=os.environ)
        mlflow.set_tracking_uri(mlflow_server)
        client = MlflowClient(mlflow_server)
        experiment = client.create_experiment("scheduler-test")
        yield {"root": root, "weights": weights, "ref": str(root / "data" / "fid_stats.npz"), "client": client,
               "experiment": experiment, "tracking": mlflow_server, "ray": ray_head,
               "jobs": JobSubmissionClient(ray_head)}


def new_version(world, seed: int) -> int:
    """Register a tiny model with its own non-trivial weights, as the training job does."""
    checkpoint = tiny_checkpoint(world["root"] / f"checkpoint-{seed}", seed=seed, step=seed)
    run = world["client"].create_run(world["experiment"])
    return int(register(world["client"], run.info.run_id, checkpoint, get_preset("tiny"), {"steps": seed}))


def schedule_args(world, *extra) -> list[str]:
    return ["--model-name", "ddpm-tiny", "--once", "--num", "16", "--per-tar", "8", "--sampler", "ddim",
            "--steps", "4", "--ref", world["ref"], "--out-root", str(world["root"] / "evaluations"),
            "--inception-weights", str(world["weights"]), "--allow-small-n", "--cpus-per-actor", "0.5",
            "--batch-size", "8", "--poll", "1", "--address", world["ray"], "--tracking-uri", world["tracking"], *extra]


def scheduler(world, *extra):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build(parser.parse_args(schedule_args(world, *extra)))


def eval_jobs(world, version: int) -> list[str]:
    return sorted(j.submission_id for j in world["jobs"].list_jobs()
                  if (j.submission_id or "").startswith(f"ddpm-eval-ddpm-tiny-v{version}-"))


def tags(world, version: int) -> dict[str, str]:
    return world["client"].get_model_version("ddpm-tiny", str(version)).tags


def champion(world) -> int:
    return int(world["client"].get_model_version_by_alias("ddpm-tiny", CHAMPION).version)


@pytest.mark.slow
def test_two_new_versions_two_batches_one_promotion_then_nothing(world):
    first, second = new_version(world, 1), new_version(world, 2)
    planner = scheduler(world)
    report = planner.tick(poll=1)
    assert report.submitted == [submission_id("ddpm-tiny", v, planner.spec, 1) for v in (first, second)]
    fids = {}
    for version in (first, second):
        t = tags(world, version)
        assert t[EVAL + "status"] == "succeeded" and t[EVAL + "spec"] == planner.spec.digest
        assert t[EVAL + "weights_sha256"] == sha256_file(world["weights"])
        result = json.loads((world["root"] / "evaluations" / "ddpm-tiny" / f"v{version}-{planner.spec.digest}"
                             / "fid.json").read_bytes())
        assert result["model"] == f"models:/ddpm-tiny/{version}" and result["num"] == 16
        fids[version] = float(t[EVAL + "fid"])
        assert fids[version] == pytest.approx(result["fid"], abs=1e-9) and fids[version] > 0
        assert eval_jobs(world, version) == [submission_id("ddpm-tiny", version, planner.spec, 1)]
    best, other = sorted(fids, key=fids.get)
    assert report.promoted == best and champion(world) == best
    assert tags(world, best)[PROMOTION + "decision"].startswith("promoted: FID")
    loser = tags(world, other)
    assert loser[PROMOTION + "decision"] == (f"not promoted: FID {fids[other]:.4f} >= champion v{best} "
                                             f"FID {fids[best]:.4f}")
    assert float(loser[PROMOTION + "fid"]) == fids[other] and float(loser[PROMOTION + "champion_fid"]) == fids[best]

    again = scheduler(world).tick(poll=1)  # a restarted scheduler: state comes from MLflow and Ray
    assert again.submitted == [] and again.outcomes == {} and again.promoted is None
    assert champion(world) == best and eval_jobs(world, first) == [submission_id("ddpm-tiny", first, planner.spec, 1)]


@pytest.mark.slow
def test_a_failed_batch_is_reported_not_promoted_and_retried_next_tick(world):
    version = new_version(world, 3)
    before = champion(world)
    planner = scheduler(world)
    blocked = world["root"] / "evaluations" / "ddpm-tiny" / f"v{version}-{planner.spec.digest}"
    blocked.mkdir(parents=True)
    (blocked / "samples.json").write_text(json.dumps({"model": "someone else's samples"}))

    assert schedule_main(schedule_args(world)) == 1  # the tick reports the failure in its exit status
    t = tags(world, version)
    assert t[EVAL + "status"] == "failed" and t[EVAL + "attempts"] == "1"
    assert "holds samples of another model" in t[EVAL + "error"]
    assert PROMOTION + "decision" not in t and champion(world) == before

    (blocked / "samples.json").unlink()
    report = planner.tick(poll=1)
    retry = submission_id("ddpm-tiny", version, planner.spec, 2)
    assert report.submitted == [retry] and tags(world, version)[EVAL + "status"] == "succeeded"
    assert eval_jobs(world, version) == sorted([submission_id("ddpm-tiny", version, planner.spec, 1), retry])
    scored = {v: float(tags(world, v)[EVAL + "fid"]) for v in range(1, version + 1)}
    assert champion(world) == min(scored, key=scored.get)
    assert tags(world, version)[PROMOTION + "decision"].startswith(
        "promoted" if champion(world) == version else "not promoted: FID")


@pytest.mark.slow
def test_two_schedulers_started_at_once_submit_each_batch_once(world):
    version = new_version(world, 4)
    command = [sys.executable, "-m", "pipelines.schedule_sampling", *schedule_args(world)]
    env = {**os.environ, TRUSTED_ENV: sha256_file(world["weights"])}
    racers = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    logs = [racer.communicate(timeout=600)[0] for racer in racers]
    job = submission_id("ddpm-tiny", version, scheduler(world).spec, 1)
    # Both saw the one batch through to its end, and both succeeded (racing tag writes are idempotent).
    assert [racer.returncode for racer in racers] == [0, 0], logs
    assert all(f"v{version}: {job} succeeded" in log and "Traceback" not in log for log in logs), logs
    assert sum(f"v{version}: submitted {job}" in log for log in logs) == 1, logs
    assert eval_jobs(world, version) == [job]
    runs = world["client"].search_runs([world["experiment"]], filter_string="tags.`ddpm.kind` = 'evaluation'")
    assert sum(r.data.params["model"] == f"models:/ddpm-tiny/{version}" for r in runs) == 1


@pytest.mark.slow
def test_a_pseudo_fid_is_recorded_but_never_promotes(world):
    candidate = int(world["client"].get_model_version_by_alias("ddpm-tiny", "candidate").version)
    before = champion(world)
    report = scheduler(world, "--features", "random-init", "--aliases", "candidate").tick(poll=1)
    assert list(report.outcomes) == [candidate] and report.promoted is None
    t = tags(world, candidate)
    assert float(t[EVAL + "pseudo_fid"]) > 0 and EVAL + "fid" not in t  # the earlier spec's FID is not kept
    assert t[PROMOTION + "decision"] == "not promoted: pseudo-FID only (FID needs the verified Inception weights)"
    assert champion(world) == before


@pytest.mark.slow
def test_bad_inputs_get_one_clear_error(world, caplog, monkeypatch):
    caplog.set_level(logging.ERROR)
    args = schedule_args(world)

    def without(flag: str) -> list[str]:
        i = args.index(flag)
        return args[:i] + args[i + 2:]

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    expect_one_error(caplog, schedule_main, without("--address"), "no Ray job API address")
    expect_one_error(caplog, schedule_main, [*without("--model-name"), "--model-name", "ddpm-nope"],
                     "registered model 'ddpm-nope' does not exist")
    expect_one_error(caplog, schedule_main, [a for a in args if a != "--once"] + ["--cron", "0 25 * * *"],
                     "cron hour field '25'")
    expect_one_error(caplog, schedule_main, [*args, "--max-attempts", "0"], "--max-attempts must be >= 1")
