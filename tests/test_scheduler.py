"""The sampling scheduler against a real Ray head (`ray start`, token auth) and a real `mlflow server`.

This machine has no copy of the FID network's published weights, so the test vouches for a seeded
random-initialised Inception state_dict through DDPM_INCEPTION_TRUSTED_SHA256 — exactly what an
operator does for their own conversion of the TF graph. Its scores are therefore labelled "fid" and
can promote; the random-init *feature mode* (pseudo-FID) is checked never to promote.
"""

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
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
from pipelines.evaluation import EvalSpec, InvalidResult, check_result, verified_fid
from pipelines.fid_reference import main as reference_main
from pipelines.mlflow_registry import CHAMPION, register
from pipelines.mlflow_tracking import logged_model_id
from pipelines.schedule_sampling import add_arguments, build
from pipelines.schedule_sampling import main as schedule_main
from pipelines.scheduler_decisions import score_name, submission_id
from tests.errors import expect_one_error
from tests.models import tiny_checkpoint
from tests.test_loader import make_dataset

SPEC = EvalSpec(num=16, sampler="ddim", steps=4, eta=0.0, seed=0, ref="/data/fid_stats.npz", features="inception",
                per_tar=8, reference_sha256="cd" * 32)


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


def test_only_checked_results_of_the_same_spec_and_verified_weights_count(monkeypatch):
    official = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    result = {"model": "models:/m/3", "model_weights_sha256": "ee" * 32, "num": 16, "sampler": "ddim", "steps": 4,
              "eta": 0.0, "seed": 0, "features": "inception", "bf16": False, "reference_sha256": "cd" * 32,
              "inception_weights_sha256": official, "fid": 12.5}
    assert verified_fid(check_result(result, "models:/m/3", SPEC, "ee" * 32)) == 12.5
    for changed, message in (({"model": "models:/m/4"}, "it scores 'models:/m/4'"),
                             ({"steps": 50}, "its steps is 50, the spec's 4"),
                             ({"bf16": True}, "its bf16 is True"),
                             ({"reference_sha256": "ab" * 32}, "its reference_sha256"),  # another reference file
                             ({"model_weights_sha256": "ff" * 32}, "other weights"),
                             ({"fid": float("nan")}, "its spec_fid is nan, not a finite number"),
                             ({"fid": "12.5"}, "its spec_fid is '12.5'")):
        with pytest.raises(InvalidResult, match=re.escape(message)):
            check_result({**result, **changed}, "models:/m/3", SPEC, "ee" * 32)
    other_reference = EvalSpec(**{**SPEC.__dict__, "reference_sha256": "ab" * 32})
    assert other_reference.digest != SPEC.digest  # never compared: another spec
    assert verified_fid({**result, "inception_weights_sha256": "ab" * 32}) is None
    monkeypatch.setenv(TRUSTED_ENV, "ab" * 32)
    assert verified_fid({**result, "inception_weights_sha256": "ab" * 32}) == 12.5
    assert verified_fid({k: v for k, v in result.items() if k != "fid"} | {"pseudo_fid": 3.0}) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory, mlflow_server, ray_head):
    root = tmp_path_factory.mktemp("scheduler")
    weights = root / "inception.pth"
    torch.save(FIDInception.random_init(seed=1).state_dict(), weights)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TRUSTED_ENV, sha256_file(weights))
        make_dataset(root, str(root / "data"), n=25, per_shard=8, resolution=16)
        # In this process (--actors 0), which has the trusted sha: the head's Ray workers do not.
        assert reference_main(["--data", str(root / "data"), "--inception-weights", str(weights), "--actors", "0"]) == 0
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


def schedule_args(world, *extra, owner: bool = True) -> list[str]:
    """The test's scheduler; `owner`: the one that moves `champion` (--owns-champion)."""
    return ["--model-name", "ddpm-tiny", "--once", "--num", "16", "--per-tar", "8", "--sampler", "ddim",
            "--steps", "4", "--ref", world["ref"], "--out-root", str(world["root"] / "evaluations"),
            "--inception-weights", str(world["weights"]), "--allow-small-n", "--cpus-per-worker", "0.5",
            "--batch-size", "8", "--poll", "1", "--address", world["ray"], "--tracking-uri", world["tracking"],
            *(["--owns-champion"] if owner else []), *extra]


def scheduler(world, *extra, owner: bool = True):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build(parser.parse_args(schedule_args(world, *extra, owner=owner)))


def eval_jobs(world, version: int) -> list[str]:
    return sorted(j.submission_id for j in world["jobs"].list_jobs()
                  if (j.submission_id or "").startswith(f"ddpm-eval-ddpm-tiny-v{version}-"))


def tags(world, version: int, spec: EvalSpec | None = None, kind: str = "eval") -> dict[str, str]:
    """The version's tags; with `spec`, those of its namespace (`ddpm.<kind>.<digest>.`), prefix removed."""
    found = world["client"].get_model_version("ddpm-tiny", str(version)).tags
    if spec is None:
        return found
    prefix = f"ddpm.{kind}.{spec.digest}."
    return {k[len(prefix):]: v for k, v in found.items() if k.startswith(prefix)}


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
        t = tags(world, version, planner.spec)
        record = (world["root"] / "evaluations" / "ddpm-tiny" / f"v{version}-{planner.spec.digest}" / "fid.json")
        assert t["status"] == "succeeded" and t["result_sha256"] == hashlib.sha256(record.read_bytes()).hexdigest()
        result = json.loads(record.read_bytes())
        assert result["inception_weights_sha256"] == sha256_file(world["weights"])
        assert result["model"] == f"models:/ddpm-tiny/{version}" and result["num"] == 16
        assert result["model_weights_sha256"] == tags(world, version)["ddpm.weights_sha256"]
        fids[version] = float(t["spec_fid"])  # DDIM-4, N=16: never called FID
        assert fids[version] == pytest.approx(result["spec_fid"], abs=1e-9) and fids[version] > 0
        assert "fid" not in result
        assert eval_jobs(world, version) == [submission_id("ddpm-tiny", version, planner.spec, 1)]
        assert world["jobs"].get_job_info(t["job"]).metadata == {  # what vouches for the record
            "ddpm.model": "ddpm-tiny", "ddpm.version": str(version), "ddpm.spec": planner.spec.digest,
            "ddpm.attempt": "1"}
    best, other = sorted(fids, key=fids.get)
    assert report.promoted == best and champion(world) == best
    name = score_name(planner.spec)  # spec_fid (ddim-4-linspace, N=16): never called FID
    assert tags(world, best, planner.spec, "promotion")["decision"].startswith(f"promoted: {name} ")
    loser = tags(world, other, planner.spec, "promotion")
    assert loser["decision"] == f"not promoted: {name} {fids[other]:.4f} >= champion v{best}'s {fids[best]:.4f}"
    assert float(loser["spec_fid"]) == fids[other] and float(loser["champion_spec_fid"]) == fids[best]
    for version in (best, other):  # for people: the score, sampler, N and decision on the version's page
        found = world["client"].get_model_version("ddpm-tiny", str(version))
        decision = tags(world, version, planner.spec, "promotion")["decision"]
        assert found.description.splitlines()[1:] == [
            f"- `ddim-4-trailing/n16/seed0/fp32`: spec-FID **{fids[version]:.4f}**, N=16; scheduler spec "
            f"{planner.spec.digest}: {decision}"]  # the sampling job's line, the decision added by the scheduler
        linked = {m.key: m.value for m in world["client"].get_logged_model(logged_model_id(found)).metrics}
        assert linked["fid_ddim4_n16"] == pytest.approx(fids[version], abs=1e-9)  # the evaluation run's metric
    assert world["client"].get_registered_model("ddpm-tiny").tags["ddpm.champion_spec"] == planner.spec.digest

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
    t = tags(world, version, planner.spec)
    assert t["status"] == "failed" and t["attempts"] == "1"
    assert "holds samples of another model" in t["error"]
    assert tags(world, version, planner.spec, "promotion") == {} and champion(world) == before

    (blocked / "samples.json").unlink()
    report = planner.tick(poll=1)
    retry = submission_id("ddpm-tiny", version, planner.spec, 2)
    assert report.submitted == [retry] and tags(world, version, planner.spec)["status"] == "succeeded"
    assert eval_jobs(world, version) == sorted([submission_id("ddpm-tiny", version, planner.spec, 1), retry])
    scored = {v: float(tags(world, v, planner.spec)["spec_fid"]) for v in range(1, version + 1)}
    assert champion(world) == min(scored, key=scored.get)
    assert tags(world, version, planner.spec, "promotion")["decision"].startswith(
        "promoted" if champion(world) == version else f"not promoted: {score_name(planner.spec)} ")


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
    first_spec = scheduler(world).spec
    kept = tags(world, candidate, first_spec)
    pseudo = scheduler(world, "--features", "random-init", "--aliases", "candidate", owner=False)
    report = pseudo.tick(poll=1)
    assert list(report.outcomes) == [candidate] and report.promoted is None
    t = tags(world, candidate, pseudo.spec)
    assert float(t["pseudo_fid"]) > 0 and "fid" not in t
    assert tags(world, candidate, first_spec) == kept  # the other spec's record is untouched
    # Without --owns-champion a scheduler records, and never moves it.
    assert tags(world, candidate, pseudo.spec, "promotion")["decision"] == (
        f"recorded only: spec {first_spec.digest} owns champion (--take-over-champion hands it to this spec)")
    assert champion(world) == before
    assert scheduler(world).tick(poll=1).submitted == [] and champion(world) == before  # no flip back and forth


@pytest.mark.slow
def test_only_the_owning_scheduler_moves_champion_and_a_hand_over_is_explicit(world, caplog):
    caplog.set_level(logging.INFO, logger="ddpm.schedule")
    client, first, before = world["client"], scheduler(world).spec, champion(world)
    version = new_version(world, 31)  # the candidate, not evaluated yet
    other = schedule_args(world, "--seed", "5", "--aliases", "candidate", owner=False)
    other_spec = scheduler(world, "--seed", "5", owner=False).spec
    try:
        # Another spec told to own champion: one line, exit 2, before any batch.
        expect_one_error(caplog, schedule_main, [*other, "--owns-champion"],
                         f"champion of ddpm-tiny is moved by the scheduler of spec {first.digest}, this one's spec is "
                         f"{other_spec.digest} (other sampler flags or another --ref file): drop --owns-champion")
        assert tags(world, version, other_spec) == {}
        # Without it: scored and recorded only, and the score it would have promoted is a warning, not an INFO.
        caplog.clear()
        assert schedule_main(other) == 0 and champion(world) == before
        note = f"spec {first.digest} owns champion (--take-over-champion hands it to this spec)"
        assert tags(world, version, other_spec, "promotion")["decision"] == (
            f"recorded only ({score_name(other_spec)} {float(tags(world, version, other_spec)['spec_fid']):.4f}; "
            f"champion v{before} has no spec_fid under this spec): {note}")
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum(f"v{version} would be champion ({score_name(other_spec)} " in w
                   and f"but is recorded only: {note}" in w for w in warnings) == 1, warnings
        # The documented hand-over: logged, then this spec's best moves champion; the old owner is refused.
        caplog.clear()
        assert schedule_main([*other, "--take-over-champion"]) == 0
        assert client.get_registered_model("ddpm-tiny").tags["ddpm.champion_spec"] == other_spec.digest
        assert any(r.levelno == logging.WARNING and r.getMessage() == (
            f"champion of ddpm-tiny is now moved by the scheduler of spec {other_spec.digest} "
            f"(--take-over-champion, from spec {first.digest})") for r in caplog.records)
        assert champion(world) == version
        expect_one_error(caplog, schedule_main, schedule_args(world),
                         f"champion of ddpm-tiny is moved by the scheduler of spec {other_spec.digest}")
    finally:  # as it was, for the tests that follow
        client.set_registered_model_tag("ddpm-tiny", "ddpm.champion_spec", first.digest)
        client.set_registered_model_alias("ddpm-tiny", CHAMPION, str(before))
        client.delete_model_version("ddpm-tiny", str(version))


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


def forge(world, version: int, spec: EvalSpec, record: dict, status: str = "succeeded") -> None:
    """Write what a registry writer without the scheduler could: a fid.json where the scheduler reads it,
    and the tags that would record it."""
    out = world["root"] / "evaluations" / "ddpm-tiny" / f"v{version}-{spec.digest}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "fid.json").write_text(json.dumps(record))
    digest = hashlib.sha256((out / "fid.json").read_bytes()).hexdigest()
    for key, value in {"result_sha256": digest, "spec_fid": record.get("spec_fid", ""), "status": status}.items():
        world["client"].set_model_version_tag("ddpm-tiny", str(version), f"ddpm.eval.{spec.digest}.{key}", str(value))


@pytest.mark.slow
def test_written_tags_and_forged_or_bad_records_never_promote_and_never_stop_a_tick(world, caplog):
    caplog.set_level(logging.WARNING, logger="ddpm.schedule")
    planner = scheduler(world)
    before = champion(world)
    real = json.loads((world["root"] / "evaluations" / "ddpm-tiny" / f"v{before}-{planner.spec.digest}"
                       / "fid.json").read_text())
    by_hand, copied, nan, bad_counter = (new_version(world, seed) for seed in (11, 12, 13, 14))
    client = world["client"]
    # By hand: the tags of a perfect score, old style and namespaced, with no record behind them.
    for key, value in {"ddpm.eval.status": "succeeded", "ddpm.eval.fid": "0.001", "ddpm.eval.spec": planner.spec.digest,
                       f"ddpm.eval.{planner.spec.digest}.status": "succeeded",
                       f"ddpm.eval.{planner.spec.digest}.fid": "0.001"}.items():
        client.set_model_version_tag("ddpm-tiny", str(by_hand), key, value)
    forge(world, copied, planner.spec, {**real, "spec_fid": 0.001})  # the champion's record, another version's tags
    weights = tags(world, nan)["ddpm.weights_sha256"]
    forge(world, nan, planner.spec, {**real, "model": f"models:/ddpm-tiny/{nan}", "model_weights_sha256": weights,
                                     "spec_fid": float("nan")})
    forge(world, bad_counter, planner.spec, {}, status="gave_up")
    client.set_model_version_tag("ddpm-tiny", str(bad_counter), f"ddpm.eval.{planner.spec.digest}.attempts", "three")

    report = planner.tick(poll=1)
    assert report.submitted == [] and report.promoted is None and champion(world) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum(f"v{by_hand}: its evaluation" in w and "no result was recorded" in w for w in warnings) == 1, warnings
    assert sum(f"v{copied}: its evaluation" in w and f"it scores 'models:/ddpm-tiny/{before}'" in w
               for w in warnings) == 1, warnings
    assert sum(f"v{nan}: its evaluation" in w and "its spec_fid is nan, not a finite number" in w
               for w in warnings) == 1, warnings
    assert sum(f"v{bad_counter}: tag ddpm.eval.{planner.spec.digest}.attempts is 'three'" in w
               for w in warnings) == 1, warnings
    # A record changed after the scheduler recorded it no longer counts: here it would have won.
    loser = next(v for v in range(1, before + 3) if v != before and tags(world, v, planner.spec).get("spec_fid"))
    record = world["root"] / "evaluations" / "ddpm-tiny" / f"v{loser}-{planner.spec.digest}" / "fid.json"
    saved = record.read_bytes()
    try:
        record.write_text(json.dumps({**json.loads(saved), "spec_fid": 1e-6}))
        caplog.clear()
        assert planner.tick(poll=1).promoted is None
        assert sum(f"v{loser}: its evaluation" in r.getMessage() and "changed after it was recorded" in r.getMessage()
                   for r in caplog.records) == 1
    finally:
        record.write_bytes(saved)
    assert champion(world) == before
    for version in (by_hand, copied, nan, bad_counter):  # out of the way of the tests that follow
        client.delete_model_version("ddpm-tiny", str(version))


@pytest.mark.slow
def test_a_complete_record_without_its_own_succeeded_batch_never_promotes(world, caplog):
    """What a job with the scheduler's registry and storage access could write: a perfect, consistent record of
    a version never sampled. Only the cluster's record of this scheduler's batch vouches for one."""
    caplog.set_level(logging.WARNING, logger="ddpm.schedule")
    planner, client = scheduler(world), world["client"]
    before = champion(world)
    real = json.loads((world["root"] / "evaluations" / "ddpm-tiny" / f"v{before}-{planner.spec.digest}"
                       / "fid.json").read_text())
    no_job, borrowed, foreign = (new_version(world, seed) for seed in (41, 42, 43))
    for version in (no_job, borrowed, foreign):
        forge(world, version, planner.spec, {**real, "model": f"models:/ddpm-tiny/{version}", "fid": 0.001,
                                             "model_weights_sha256": tags(world, version)["ddpm.weights_sha256"]})
    key = f"ddpm.eval.{planner.spec.digest}.job"
    champion_job = tags(world, before, planner.spec)["job"]  # a real batch, of another version
    client.set_model_version_tag("ddpm-tiny", str(borrowed), key, champion_job)
    # A job under this version's batch id that this scheduler did not submit (any Ray client can).
    foreign_job = submission_id("ddpm-tiny", foreign, planner.spec, 1)
    world["jobs"].submit_job(entrypoint=f"{sys.executable} -c pass", submission_id=foreign_job)
    for _ in range(120):
        if str(world["jobs"].get_job_status(foreign_job)) == "SUCCEEDED":
            break
        time.sleep(0.5)
    client.set_model_version_tag("ddpm-tiny", str(foreign), key, foreign_job)

    report = planner.tick(poll=1)
    assert report.submitted == [] and report.promoted is None and champion(world) == before
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for version, reason in ((no_job, "its tags name no batch"),
                            (borrowed, f"its tags name {champion_job}, not a batch of v{borrowed} under spec "
                                       f"{planner.spec.digest}"),
                            (foreign, f"its batch {foreign_job} was not submitted by this scheduler for v{foreign} "
                                      f"under spec {planner.spec.digest} (its Jobs-API metadata is {{}}")):
        assert sum(f"v{version}: its evaluation under spec {planner.spec.digest} is skipped: {reason}" in w
                   for w in warnings) == 1, (version, warnings)
    for version in (no_job, borrowed, foreign):
        client.delete_model_version("ddpm-tiny", str(version))


@pytest.mark.slow
def test_a_result_counts_only_once_recorded_completely(world):
    """The scheduler stopped between a batch's end and its record: the next tick records it, from fid.json."""
    planner = scheduler(world)
    version = champion(world)
    key = f"ddpm.eval.{planner.spec.digest}."
    complete = tags(world, version, planner.spec)
    world["client"].delete_model_version_tag("ddpm-tiny", str(version), key + "result_sha256")
    world["client"].set_model_version_tag("ddpm-tiny", str(version), key + "status", "submitted")
    report = planner.tick(poll=1)
    assert report.submitted == [] and report.outcomes[version].status == "succeeded"
    assert tags(world, version, planner.spec) == complete and champion(world) == version


@pytest.mark.slow
def test_a_batch_past_its_deadline_is_stopped_and_failed(world):
    version = new_version(world, 21)
    planner = scheduler(world, "--deadline", "1", "--max-attempts", "1")
    report = planner.tick(poll=1)
    job = submission_id("ddpm-tiny", version, planner.spec, 1)
    assert report.submitted == [job] and report.outcomes[version].status == "failed"
    assert "after the deadline of 1 s" in tags(world, version, planner.spec)["error"]
    assert str(world["jobs"].get_job_status(job)) == "STOPPED"  # ended before it was marked failed
    assert scheduler(world, "--max-attempts", "1").tick(poll=1).outcomes[version].status == "gave_up"
    world["client"].delete_model_version("ddpm-tiny", str(version))


@pytest.mark.slow
def test_cron_mode_survives_an_mlflow_outage(world, caplog, capsys, monkeypatch):
    """An outage longer than the retries fails one tick; the next tick runs as usual."""
    from tests.mlflow_servers import OutageProxy

    caplog.set_level(logging.INFO, logger="ddpm.schedule")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the scheduler's own retries are under test
    # The world's registry behind a proxy that the cron wait takes down and brings back: the outage spans
    # the first tick. Ticks submit nothing (--aliases) under a spec of their own (--seed).
    proxy = OutageProxy(world["tracking"])
    try:
        planner = scheduler(world, "--tracking-uri", proxy.uri, "--aliases", "nobody", "--seed", "7", owner=False)
        sleeps = []

        def sleep(seconds: float) -> None:  # the cron wait
            sleeps.append(seconds)
            proxy.down = len(sleeps) == 1

        Cron.parse("* * * * *").serve(lambda: print(planner.tick(60, 1).table(), flush=True), ticks=2, sleep=sleep)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("this tick failed, the next one retries" in m for m in messages) == 1, messages
        assert len(sleeps) == 2 and all(0 < s <= 60 for s in sleeps) and proxy.dropped
        # The second tick ran to its end: its report was printed once.
        assert capsys.readouterr().out.count("nothing to do: every version is evaluated under this spec") == 1
        registered = world["client"].search_model_versions("name = 'ddpm-tiny'")
        assert [v.version for v in planner.records.versions()] == sorted((v.version for v in registered), key=int)
        assert not any(planner.spec.digest in key for v in registered for key in v.tags)  # nothing written
    finally:
        proxy.close()
