"""The scheduler's decisions as pure functions: no Ray, no MLflow, milliseconds (pipelines/scheduler_decisions.py)."""

from dataclasses import dataclass

import pytest

from pipelines.evaluation import PUBLISHED_N, EvalSpec
from pipelines.scheduler_decisions import (
    FAILED,
    FINISH,
    GAVE_UP,
    GIVE_UP,
    RESUBMIT,
    SKIP,
    SUBMIT,
    SUBMITTED,
    SUCCEEDED,
    WATCH,
    Authority,
    ChampionOwnerError,
    Decision,
    Promotion,
    SchedulerError,
    ScoreName,
    Step,
    TickReport,
    VersionState,
    attempts_of,
    batch_metadata,
    champion_authority,
    decide_promotion,
    failed_decision,
    job_prefix,
    next_step,
    read_count,
    retrying,
    score_name,
    submission_id,
    unvouched,
)

DIGEST = "07940bdd29"
PREFIX = f"ddpm-eval-ddpm-tiny-v3-{DIGEST}-a"
OTHER = "0123456789"  # another spec's digest
OWNS = Authority(True)  # a scheduler started with --owns-champion whose spec owns `champion`
FID = ScoreName("fid")  # the paper's protocol: DDPM-1000, clipped, fp32, N >= 50k


@dataclass(frozen=True)
class Job:
    submission_id: str
    ended: bool
    status: str = "SUCCEEDED"
    metadata: dict | None = None


def state(tags=None, batches=(), attempts=0, selected=True) -> VersionState:
    """Version 3 with these eval tags and these batches (attempt, ended) on the cluster."""
    return VersionState(3, tags or {}, {a: Job(f"{PREFIX}{a}", ended) for a, ended in batches}, attempts, PREFIX,
                        selected)


def test_submission_ids_name_model_version_spec_and_attempt():
    spec = EvalSpec(num=16, sampler="ddim", steps=4, eta=0.0, seed=0, ref="/data/fid_stats.npz",
                    features="inception", per_tar=8, reference_sha256="cd" * 32)
    assert spec.digest == DIGEST
    assert job_prefix("ddpm-tiny", 3, DIGEST) == PREFIX
    assert submission_id("ddpm-tiny", 3, spec, 2) == f"{PREFIX}2"
    assert submission_id("DDPM lsun_bedroom256", 1, spec, 1) == f"ddpm-eval-ddpm-lsun-bedroom256-v1-{DIGEST}-a1"
    jobs = {f"{PREFIX}1": "one", f"{PREFIX}12": "twelve", f"{PREFIX}x": "not an attempt",
            f"ddpm-eval-ddpm-tiny-v33-{DIGEST}-a1": "another version"}
    assert attempts_of(jobs, PREFIX) == {1: "one", 12: "twelve"}


def test_a_new_version_is_submitted_and_a_running_batch_watched():
    assert next_step(state(), max_attempts=3) == Step(SUBMIT, f"{PREFIX}1", 1)
    running = state({"status": SUBMITTED, "job": f"{PREFIX}1", "attempts": "1"}, [(1, False)], attempts=1)
    assert next_step(running, 3) == Step(WATCH, f"{PREFIX}1", 1)
    # Another scheduler submitted attempt 1 but has not tagged it yet: follow it, never start a second.
    assert next_step(state(batches=[(1, False)]), 3) == Step(WATCH, f"{PREFIX}1", 1)


def test_recorded_versions_are_skipped_and_unselected_ones_never_submitted():
    assert next_step(state({"status": SUCCEEDED, "job": f"{PREFIX}1"}, [(1, True)], 1), 3) == Step(SKIP)
    assert next_step(state({"status": GAVE_UP}, attempts=3), 3) == Step(SKIP)
    assert next_step(state(selected=False), 3) == Step(SKIP)


def test_an_ended_batch_is_finished_and_a_forgotten_one_resubmitted():
    ended = state({"status": SUBMITTED, "job": f"{PREFIX}2", "attempts": "2"}, [(1, True), (2, True)], attempts=2)
    assert next_step(ended, 3) == Step(FINISH, f"{PREFIX}2", 2)
    # The tags say succeeded but not of the latest batch (another scheduler's): record it.
    other = state({"status": FAILED, "job": f"{PREFIX}1"}, [(1, True), (2, True)], attempts=1)
    assert next_step(other, 3) == Step(FINISH, f"{PREFIX}2", 2)
    # The cluster restarted and forgot the batch: the same id again (the samples resume).
    forgotten = state({"status": SUBMITTED, "job": f"{PREFIX}2"}, attempts=2)
    assert next_step(forgotten, 3) == Step(RESUBMIT, f"{PREFIX}2", 2)


def test_a_failed_batch_is_retried_then_given_up():
    failed = state({"status": FAILED, "job": f"{PREFIX}1", "error": "FAILED: boom"}, [(1, True)], attempts=1)
    assert next_step(failed, 3) == Step(SUBMIT, f"{PREFIX}2", 2)
    last = state({"status": FAILED, "job": f"{PREFIX}3", "error": "FAILED: boom"}, [(3, True)], attempts=3)
    assert next_step(last, 3) == Step(GIVE_UP, f"{PREFIX}3", 3, "FAILED: boom")
    # A count the tags lost (read as 0) is made up by the cluster's batches.
    assert next_step(state({"status": FAILED, "job": f"{PREFIX}2"}, [(1, True), (2, True)]), 2) == \
        Step(GIVE_UP, f"{PREFIX}2", 2, "")
    assert failed_decision("x" * 200) == f"not promoted: the batch failed ({'x' * 120})"


def test_the_best_verified_fid_is_promoted_and_the_others_told_why_not():
    promotion = decide_promotion(OWNS, {1: 20.0, 2: 12.5}, None, None, new=[1, 2], name=FID)
    assert promotion.champion == 2
    first = "promoted: fid 12.5000; no champion before"
    loser = "not promoted: fid 20.0000 >= champion v2's 12.5000"
    assert promotion.decisions == {
        2: Decision(first, {"fid": 12.5, "champion": "", "champion_fid": "", "decision": first}),
        1: Decision(loser, {"fid": 20.0, "champion": 2, "champion_fid": 12.5, "decision": loser})}
    assert list(promotion.decisions) == [2, 1]  # the promoted version's decision is written first
    better = decide_promotion(OWNS, {1: 20.0, 2: 12.5, 3: 9.0}, 2, SUCCEEDED, new=[3], name=FID)
    text = "promoted: fid 9.0000 < champion v2's 12.5000"
    assert better == Promotion(3, {3: Decision(text, {"fid": 9.0, "champion": 2, "champion_fid": 12.5,
                                                             "decision": text})})
    # A tie keeps the older version; the holder without a score under this spec is replaced.
    assert decide_promotion(OWNS, {4: 9.0, 3: 9.0}, 3, SUCCEEDED, new=[4], name=FID).champion is None
    unscored = decide_promotion(OWNS, {4: 9.0}, 1, GAVE_UP, new=[4], name=FID)
    assert unscored.champion == 4 and unscored.decisions[4].text == \
        "promoted: fid 9.0000; champion v1 has no fid under this spec"


def spec(**changes) -> EvalSpec:
    """The scheduler's spec of the paper's protocol, with `changes`."""
    return EvalSpec(**{**dict(num=PUBLISHED_N, sampler="ddpm", steps=0, eta=0.0, seed=0, ref="ref.npz",
                              features="inception", per_tar=1000, spacing="linspace"), **changes})


def test_each_decision_names_the_score_it_compared_and_a_cheap_spec_never_says_fid():
    assert score_name(spec()) == FID
    cheap = score_name(spec(sampler="dpmpp_2m", steps=20, spacing="trailing"))
    assert str(cheap) == "spec_fid (dpmpp_2m-20-trailing, N=50000)"
    assert [str(score_name(spec(**c))) for c in (dict(num=10000), dict(bf16=True), dict(clip=False))] == [
        "spec_fid (ddpm, N=10000)", "spec_fid (ddpm, N=50000)", "spec_fid (ddpm, N=50000)"]
    promoted = decide_promotion(OWNS, {1: 20.0, 2: 12.5, 3: 30.0}, 1, SUCCEEDED, new=[2, 3, 4], name=cheap)
    deferred = decide_promotion(OWNS, {6: 1.0}, 2, SUBMITTED, new=[6], name=cheap)
    kept = decide_promotion(OWNS, {2: 12.5}, 2, SUCCEEDED, new=[2], name=cheap)
    recorded = decide_promotion(Authority(False, note="spec x owns champion"), {1: 20.0, 2: 12.5}, 1, SUCCEEDED,
                                new=[2], name=cheap)
    texts = {n: d.text for p in (promoted, deferred, kept, recorded) for n, d in p.decisions.items()}
    assert promoted.decisions[2].text == f"promoted: {cheap} 12.5000 < champion v1's 20.0000"
    assert promoted.decisions[3].text == f"not promoted: {cheap} 30.0000 >= champion v2's 12.5000"
    assert promoted.decisions[4].text == f"not promoted: no {cheap} (it needs the verified Inception weights)"
    assert kept.decisions[2].text == f"kept: already champion, {cheap} 12.5000"
    assert recorded.warning == f"v2 would be champion ({cheap} 12.5000 < champion v1's 20.0000) but is recorded " \
                               "only: spec x owns champion"
    assert all("FID" not in text and "fid" not in text.replace("spec_fid", "")
               for text in [*texts.values(), recorded.warning])
    # Its promotion tags are named after the score too: never `fid`.
    assert promoted.decisions[3].tags == {"spec_fid": 30.0, "champion": 2, "champion_spec_fid": 12.5,
                                          "decision": promoted.decisions[3].text}
    assert deferred.decisions[6].tags == {"spec_fid": 1.0, "champion": 2, "champion_spec_fid": "",
                                          "decision": deferred.decisions[6].text}


def test_the_champion_is_kept_and_a_worse_score_not_promoted():
    promotion = decide_promotion(OWNS, {2: 12.5, 5: 13.0}, 2, SUCCEEDED, new=[2, 5], name=FID)
    kept, worse = "kept: already champion, fid 12.5000", "not promoted: fid 13.0000 >= champion v2's 12.5000"
    assert promotion == Promotion(None, {
        2: Decision(kept, {"fid": 12.5, "champion": 2, "champion_fid": 12.5, "decision": kept}),
        5: Decision(worse, {"fid": 13.0, "champion": 2, "champion_fid": 12.5, "decision": worse})})


def test_nothing_moves_while_the_champion_is_still_being_evaluated():
    for status in (SUBMITTED, FAILED):
        promotion = decide_promotion(OWNS, {6: 1.0}, 2, status, new=[6], name=FID)
        text = "deferred: champion v2 is still being evaluated under this spec"
        assert promotion == Promotion(None, {6: Decision(text, {"fid": 1.0, "champion": 2, "champion_fid": "",
                                                                       "decision": text})})
    # Once the holder has a score under this spec, the comparison is made.
    assert decide_promotion(OWNS, {2: 3.0, 6: 1.0}, 2, SUCCEEDED, new=[6], name=FID).champion == 6


def test_a_pseudo_fid_or_a_pixel_fd_never_promotes():
    promotion = decide_promotion(OWNS, {}, None, None, new=[7, 8, 9], toy={7: "pseudo_fid", 8: None, 9: "pixel_fd"},
                                 name=FID)
    pseudo = "not promoted: pseudo-FID only (a toy metric, which never promotes)"
    pixel = "not promoted: pixel FD only (a toy metric, which never promotes)"
    none = "not promoted: no fid (it needs the verified Inception weights)"
    assert promotion == Promotion(None, {
        7: Decision(pseudo, {"fid": "", "champion": "", "champion_fid": "", "decision": pseudo}),
        8: Decision(none, {"fid": "", "champion": "", "champion_fid": "", "decision": none}),
        9: Decision(pixel, {"fid": "", "champion": "", "champion_fid": "", "decision": pixel})})
    with_champion = decide_promotion(OWNS, {2: 12.5}, 2, SUCCEEDED, new=[7], toy={7: "pseudo_fid"}, name=FID)
    assert with_champion.champion is None and with_champion.decisions[7].tags == {
        "fid": "", "champion": 2, "champion_fid": 12.5, "decision": pseudo}


def test_only_a_scheduler_told_to_own_champion_moves_it():
    assert champion_authority(DIGEST, None, owns=True, take_over=False) == Authority(True, claim=True)
    assert champion_authority(DIGEST, DIGEST, owns=True, take_over=False) == OWNS
    # Another spec owns it: refused, unless this one takes it over (which implies owning it).
    with pytest.raises(ChampionOwnerError, match=f"^champion of ddpm-tiny is moved by the scheduler of spec {OTHER}, "
                                                 f"this one's spec is {DIGEST} "):
        champion_authority(DIGEST, OTHER, owns=True, take_over=False, model="ddpm-tiny")
    assert champion_authority(DIGEST, OTHER, owns=False, take_over=True) == Authority(True, claim=True, previous=OTHER)
    assert champion_authority(DIGEST, DIGEST, owns=True, take_over=True) == OWNS  # nothing to hand over
    # Without --owns-champion, whoever owns it: scores are recorded only, and the scheduler says why.
    notes = {owner: champion_authority(DIGEST, owner, owns=False, take_over=False) for owner in (None, DIGEST, OTHER)}
    assert not any(a.moves or a.claim for a in notes.values())
    assert notes[None].note == "no scheduler owns champion yet: start the one that should with --owns-champion"
    assert notes[DIGEST].note == "this scheduler was started without --owns-champion (its spec owns champion)"
    assert notes[OTHER].note == f"spec {OTHER} owns champion (--take-over-champion hands it to this spec)"


def test_a_scheduler_that_does_not_own_champion_records_only_and_warns_of_a_better_score():
    recorder = champion_authority(DIGEST, OTHER, owns=False, take_over=False)
    note = recorder.note
    promotion = decide_promotion(recorder, {2: 12.5, 3: 9.0, 4: 20.0}, 2, SUCCEEDED, new=[3, 4, 5],
                                 toy={5: "pseudo_fid"}, name=FID)
    better, plain = f"recorded only (fid 9.0000 < champion v2's 12.5000): {note}", f"recorded only: {note}"
    assert promotion == Promotion(None, {3: Decision(better, {"fid": 9.0, "decision": better}),
                                         4: Decision(plain, {"fid": 20.0, "decision": plain}),
                                         5: Decision(plain, {"fid": "", "decision": plain})},
                                  f"v3 would be champion (fid 9.0000 < champion v2's 12.5000) but is recorded only: "
                                  f"{note}")
    # No champion at all: the first verified score would be it.
    first = decide_promotion(recorder, {3: 9.0}, None, None, new=[3], name=FID)
    assert first.champion is None and first.warning == (
        f"v3 would be champion (fid 9.0000; no champion before) but is recorded only: {note}")
    # Nothing better, or a better score warned of on an earlier tick: no warning.
    assert decide_promotion(recorder, {2: 12.5, 4: 20.0}, 2, SUCCEEDED, new=[4], name=FID).warning == ""
    assert decide_promotion(recorder, {2: 12.5, 3: 9.0, 4: 20.0}, 2, SUCCEEDED, new=[4], name=FID).warning == ""


def test_a_record_counts_only_when_its_own_succeeded_batch_vouches_for_it():
    metadata = batch_metadata("ddpm-tiny", 3, DIGEST, 2)
    assert metadata == {"ddpm.model": "ddpm-tiny", "ddpm.version": "3", "ddpm.spec": DIGEST, "ddpm.attempt": "2"}
    jobs = {f"{PREFIX}2": Job(f"{PREFIX}2", True, "SUCCEEDED", metadata)}

    def why(job, found=jobs):
        return unvouched(job, "ddpm-tiny", 3, DIGEST, found)

    assert why(f"{PREFIX}2") is None
    assert why(None) == "its tags name no batch (ddpm.eval.<spec>.job is missing)"
    for job in ("ddpm-eval-ddpm-tiny-v2-07940bdd29-a2", f"ddpm-eval-ddpm-tiny-v3-{OTHER}-a2", f"{PREFIX}x"):
        assert why(job) == f"its tags name {job}, not a batch of v3 under spec {DIGEST}"
    assert why(f"{PREFIX}1") == f"the Ray cluster has no job {PREFIX}1 (none of this scheduler's batches ran it)"
    failed = {f"{PREFIX}2": Job(f"{PREFIX}2", True, "FAILED", metadata)}
    assert why(f"{PREFIX}2", failed) == f"its batch {PREFIX}2 is FAILED, not SUCCEEDED"
    for wrong in ({}, None, {**metadata, "ddpm.spec": OTHER}, {**metadata, "ddpm.version": "4"},
                  {**metadata, "ddpm.attempt": "1"}):
        found = {f"{PREFIX}2": Job(f"{PREFIX}2", True, "SUCCEEDED", wrong)}
        assert why(f"{PREFIX}2", found).startswith(f"its batch {PREFIX}2 was not submitted by this scheduler for v3 "
                                                   f"under spec {DIGEST} (its Jobs-API metadata ")


def test_the_report_says_failed_and_gave_up_and_tabulates_each_version():
    report = TickReport()
    assert report.table() == "nothing to do: every version is evaluated under this spec" and not report.failed
    report.note(1, SUBMITTED, job=f"{PREFIX}1")
    report.note(1, SUCCEEDED, score="fid 12.500")
    assert not report.failed
    report.note(2, FAILED, job="j2", decision=failed_decision("FAILED: boom"))
    assert report.failed
    gave_up = TickReport()
    gave_up.note(3, GAVE_UP, decision="FAILED: boom")
    assert gave_up.failed
    lines = report.table().splitlines()
    assert lines[0].split() == ["version", "status", "job", "score", "decision"]
    assert lines[1].split()[:4] == ["1", SUCCEEDED, f"{PREFIX}1", "fid"]
    assert lines[2].endswith("not promoted: the batch failed (FAILED: boom)")


def test_counts_and_retries():
    assert (read_count(None), read_count("2"), read_count("-1"), read_count("three")) == (0, 2, 0, None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "answer"

    assert retrying("reading", flaky, backoff=0) == "answer" and len(calls) == 3

    def refused():
        raise ConnectionError("refused")

    with pytest.raises(SchedulerError, match="^writing failed 2 times: refused$"):
        retrying("writing", refused, attempts=2, backoff=0)
    # A write that took effect although its reply was lost; an answer that is not an outage.
    assert retrying("writing", lambda: 1 / 0, done=lambda: True, backoff=0) is None
    with pytest.raises(KeyError):
        retrying("reading", lambda: {}["x"], permanent=lambda error: isinstance(error, KeyError), backoff=0)
