"""The scheduler's decisions, as pure functions of what it has read (I/O-free; tests/test_scheduler_decisions.py).

- `next_step`: what to do with one model version, given this spec's tags on it and the Ray jobs of its
  batches: skip it, watch its running batch, finish (record) an ended one, resubmit a batch the cluster
  forgot, submit the next attempt, or give up.
- `champion_authority`: whether this scheduler moves `champion`: only one started with --owns-champion
  whose spec owns the alias (or that takes it over, --take-over-champion); any other records scores only.
- `unvouched`: why a version's record does not count, or None: its tags must name a SUCCEEDED batch of
  this scheduler's for that version and spec (job id and Jobs-API metadata, `batch_metadata`).
- `decide_promotion`: whom `champion` goes to, given that authority, the verified scores of this spec, the
  alias holder and whether the holder is still being evaluated; and the decision each new score gets
  (promoted / kept / deferred / not promoted / recorded only, with a warning when it was the better one).
  Every decision names the score it compared (`score_name`): `fid` under the paper's protocol only, else
  e.g. `spec_fid (dpmpp_2m-20-trailing, N=50000)`, so that a cheap spec's number is never read as an FID.

The scheduler (pipelines/schedule_sampling.py) reads the registry and the cluster, calls these and applies
what they return. Submission ids are deterministic, ddpm-eval-<model>-v<version>-<spec digest>-a<attempt>,
and Ray refuses a second job with an existing id: schedulers that race submit each batch once, a
restarted scheduler picks up the jobs it finds in the tags, and attempt k+1 is only submitted once
attempt k has ended, so no two batches for one version ever run at once.

Also here, the one part that is not a pure function: `retrying`, how the scheduler retries every call to
MLflow, Ray and S3 (the owners pipelines.mlflow_registry and pipelines.ray_jobs take it as `retry`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from ddpm_core.errors import UserError, first_line
from pipelines.evaluation import TOY_SCORES, EvalSpec, SamplerSetting, sampled_as_paper

log = logging.getLogger("ddpm.schedule")
REGISTRY_ATTEMPTS, REGISTRY_BACKOFF = 5, 0.5  # seconds, doubled after each failed attempt

# The `status` of a version's evaluation under a spec (its eval tags).
SUBMITTED, SUCCEEDED, FAILED, GAVE_UP = "submitted", "succeeded", "failed", "gave_up"
# What `next_step` says to do with a version.
SKIP, WATCH, FINISH, RESUBMIT, SUBMIT, GIVE_UP = "skip", "watch", "finish", "resubmit", "submit", "give up"


def job_prefix(model_name: str, version: int, digest: str) -> str:
    """The submission ids of one version's batches under one spec, but for the attempt number."""
    safe = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    return f"ddpm-eval-{safe}-v{version}-{digest}-a"


def submission_id(model_name: str, version: int, spec: EvalSpec, attempt: int) -> str:
    return f"{job_prefix(model_name, version, spec.digest)}{attempt}"


Job = TypeVar("Job")


def attempts_of(jobs: Mapping[str, Job], prefix: str) -> dict[int, Job]:
    """The jobs (by submission id) whose ids are `prefix` + an attempt number, by attempt number."""
    return {int(i[len(prefix):]): job for i, job in jobs.items()
            if i.startswith(prefix) and i[len(prefix):].isdigit()}


class Batch(Protocol):
    """What a decision needs to know of a Ray job (pipelines.ray_jobs.RayJob is one)."""

    submission_id: str
    ended: bool
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED
    metadata: Mapping[str, str] | None  # as submitted through the Jobs API


def batch_metadata(model_name: str, version: int, digest: str, attempt: int) -> dict[str, str]:
    """The Jobs-API metadata the scheduler submits a batch with, and requires of the batch behind a record."""
    return {"ddpm.model": model_name, "ddpm.version": str(version), "ddpm.spec": digest, "ddpm.attempt": str(attempt)}


def unvouched(job: str | None, model_name: str, version: int, digest: str, jobs: Mapping[str, Batch]) -> str | None:
    """Why the record of `version` under spec `digest` whose tags name batch `job` does not count, or None.

    Anyone who can write the version's tags and the output prefix could write a complete record for a
    version never sampled; the cluster's own record of the batch (`jobs`, by submission id) vouches for it.
    """
    if not job:
        return "its tags name no batch (ddpm.eval.<spec>.job is missing)"
    prefix = job_prefix(model_name, version, digest)
    if not (job.startswith(prefix) and job[len(prefix):].isdigit()):
        return f"its tags name {job}, not a batch of v{version} under spec {digest}"
    if (batch := jobs.get(job)) is None:
        return f"the Ray cluster has no job {job} (none of this scheduler's batches ran it)"
    if batch.status != "SUCCEEDED":
        return f"its batch {job} is {batch.status}, not SUCCEEDED"
    expected, found = batch_metadata(model_name, version, digest, int(job[len(prefix):])), dict(batch.metadata or {})
    if any(found.get(key) != value for key, value in expected.items()):
        return (f"its batch {job} was not submitted by this scheduler for v{version} under spec {digest} (its "
                f"Jobs-API metadata is {found}, not {expected})")
    return None


@dataclass(frozen=True)
class VersionState:
    """What the scheduler knows of one version under its spec."""

    number: int
    tags: Mapping[str, str]  # this spec's eval tags, prefix removed: status, job, attempts, error, ...
    batches: Mapping[int, Batch]  # this spec's Ray jobs for the version, by attempt
    attempts: int  # the recorded count of batches (a tag that is not a count reads as 0)
    prefix: str  # `job_prefix` of the version and spec
    selected: bool = True  # it holds one of --aliases, or there are none


@dataclass(frozen=True)
class Step:
    """What to do with a version: `action`, the batch it concerns and its attempt number; GIVE_UP: the last error."""

    action: str
    job: str = ""
    attempt: int = 0
    error: str = ""


def next_step(version: VersionState, max_attempts: int) -> Step:
    """One batch per version at a time: follow a running one, record an ended one, else (if the version is
    selected) submit the next attempt, or give up after `max_attempts` failed ones."""
    status, job = version.tags.get("status"), version.tags.get("job")
    attempts = max([version.attempts, *version.batches])  # the cluster may know a batch the tags do not yet
    latest = version.batches.get(attempts)
    if status in (SUCCEEDED, GAVE_UP):
        return Step(SKIP)
    if latest is not None and not latest.ended:
        return Step(WATCH, latest.submission_id, attempts)
    if latest is not None and (status == SUBMITTED or job != latest.submission_id):
        return Step(FINISH, latest.submission_id, attempts)  # ended, not yet recorded
    if status == SUBMITTED and job:
        return Step(RESUBMIT, job, max(attempts, 1))  # the cluster no longer knows it (restarted)
    if not version.selected:
        return Step(SKIP)
    if attempts >= max_attempts:
        return Step(GIVE_UP, job or "", attempts, version.tags.get("error", ""))
    return Step(SUBMIT, f"{version.prefix}{attempts + 1}", attempts + 1)


def read_count(value: str | None) -> int | None:
    """A counter tag (attempts): missing is 0; a value that is not a count is None (the caller warns, reads 0)."""
    try:
        return max(0, int(value or 0))
    except ValueError:
        return None


def failed_decision(reason: str) -> str:
    """The decision a version gets when its batch failed."""
    return f"not promoted: the batch failed ({reason[:120]})"


@dataclass(frozen=True)
class Decision:
    """The decision a version gets, and its promotion tags (`decision` last: written last, it says the rest is)."""

    text: str
    tags: dict[str, object]


class ChampionOwnerError(UserError):
    """A scheduler started with --owns-champion whose spec is not the one that owns `champion`."""


@dataclass(frozen=True)
class Authority:
    """What this scheduler may do with `champion`."""

    moves: bool  # it moves `champion`; else it records scores only
    claim: bool = False  # record this spec as the owner first (there is none, or a take-over)
    previous: str | None = None  # the owner a take-over replaces
    note: str = ""  # why it records only, for its log and its decisions


def champion_authority(digest: str, owner: str | None, owns: bool, take_over: bool, model: str = "") -> Authority:
    """Whether the scheduler of spec `digest` moves `champion`, given the spec that owns it (`owner`, None: none
    yet), --owns-champion (`owns`) and --take-over-champion (`take_over`, which implies `owns`).

    Ownership is explicit so that a scheduler of another spec (a manual run, a changed CronJob, a new
    reference file) can never freeze promotion unnoticed: it is refused, or records only and says so.
    """
    if take_over and owner != digest:
        return Authority(True, claim=True, previous=owner)
    if owns or take_over:
        if owner not in (None, digest):
            raise ChampionOwnerError(
                f"champion of {model} is moved by the scheduler of spec {owner}, this one's spec is {digest} "
                "(other sampler flags or another --ref file): drop --owns-champion to record scores only, or "
                "pass --take-over-champion to hand champion over to this spec")
        return Authority(True, claim=owner is None)
    if owner is None:
        note = "no scheduler owns champion yet: start the one that should with --owns-champion"
    elif owner == digest:
        note = "this scheduler was started without --owns-champion (its spec owns champion)"
    else:
        note = f"spec {owner} owns champion (--take-over-champion hands it to this spec)"
    return Authority(False, note=note)


@dataclass(frozen=True)
class ScoreName:
    """What the scores a spec promotes on are called in its decisions and promotion tags."""

    label: str  # fid (the paper's protocol) or spec_fid; also the key of the promotion tags
    setting: str = ""  # of a spec_fid: its sampler, steps and N, e.g. "dpmpp_2m-20-trailing, N=50000"

    def __str__(self) -> str:
        return f"{self.label} ({self.setting})" if self.setting else self.label


def score_name(spec: EvalSpec) -> ScoreName:
    """The name of `spec`'s promoting scores: only verified FID-network scores promote (`verified_fid`), so `fid`
    if it samples as the paper's numbers do, else a `spec_fid` that says its sampler, steps and N."""
    if sampled_as_paper(spec):
        return ScoreName("fid")
    setting = SamplerSetting(spec.sampler, spec.steps, spec.spacing, spec.eta).name
    return ScoreName("spec_fid", f"{setting}, N={spec.num}")


@dataclass(frozen=True)
class Promotion:
    champion: int | None = None  # the version `champion` moves to, or None: it stays
    decisions: dict[int, Decision] = field(default_factory=dict)  # the promoted version first
    warning: str = ""  # a new score better than the champion's, recorded only (no authority to move it)


def decide_promotion(authority: Authority, scores: Mapping[int, float], holder: int | None,
                     holder_status: str | None, new: Iterable[int], toy: Mapping[int, str | None] | None = None, *,
                     name: ScoreName) -> Promotion:
    """Whom `champion` goes to, and the decision of each version in `new` (those that succeeded this tick).

    `scores`: the verified scores of this spec, called `name` in the decisions and tags; `holder`: the version
    holding `champion`, `holder_status` its evaluation status under this spec (while it is submitted or failed,
    nothing moves); `toy`: the label of the toy metric (TOY_SCORES) a new version was scored by, which never
    promotes. Without `authority.moves` every decision is "recorded only", and a new score that would have been
    champion gets a warning.
    """
    new = sorted(new)
    owner = _owner_promotion(scores, holder, holder_status, new, toy or {}, name)
    if authority.moves:
        return owner
    decisions, warning = {}, ""
    for number in new:
        text = f"recorded only: {authority.note}"
        if number == owner.champion and number != holder:
            better = owner.decisions[number].text.removeprefix("promoted: ")
            text = f"recorded only ({better}): {authority.note}"
            warning = f"v{number} would be champion ({better}) but is recorded only: {authority.note}"
        decisions[number] = Decision(text, {name.label: scores.get(number, ""), "decision": text})
    return Promotion(decisions=decisions, warning=warning)


def _owner_promotion(scores: Mapping[int, float], holder: int | None, holder_status: str | None, new: list[int],
                     toy: Mapping[int, str | None], name: ScoreName) -> Promotion:
    """The promotion as the owning scheduler decides it."""
    held = scores.get(holder) if holder is not None else None
    best = min(scores, key=lambda n: (scores[n], n), default=None)
    pending = holder is not None and held is None and holder_status in (SUBMITTED, FAILED)
    decisions, champion = {}, None
    if best is not None and not pending and (held is None or scores[best] < held):
        if held is not None:
            text = f"promoted: {name} {scores[best]:.4f} < champion v{holder}'s {held:.4f}"
        else:
            text = f"promoted: {name} {scores[best]:.4f}; " + (
                f"champion v{holder} has no {name.label} under this spec" if holder is not None
                else "no champion before")
        decisions[best] = Decision(text, _tags(name, scores[best], holder, held, text))
        champion, holder, held = best, best, scores[best]
    for number in new:
        if number != champion:
            decisions[number] = _standing(number, scores, holder, held, pending, toy.get(number), name)
    return Promotion(champion, decisions)


def _standing(number: int, scores: Mapping[int, float], holder: int | None, held: float | None, pending: bool,
              toy: str | None, name: ScoreName) -> Decision:
    """The decision of a new score that did not promote."""
    score = scores.get(number)
    if score is None:
        text = (f"not promoted: {TOY_SCORES[toy]} only (a toy metric, which never promotes)" if toy else
                f"not promoted: no {name} (it needs the verified Inception weights)")
    elif pending:
        text, held = f"deferred: champion v{holder} is still being evaluated under this spec", None
    elif number == holder:
        text = f"kept: already champion, {name} {score:.4f}"
    else:
        text = f"not promoted: {name} {score:.4f} >= champion v{holder}'s {held:.4f}"
    return Decision(text, _tags(name, score, holder, held, text))


def _tags(name: ScoreName, score: float | None, holder: int | None, held: float | None, text: str) -> dict:
    """The promotion tags of a decision, named after the score (`decision` last: written last, it says the rest is)."""
    return {name.label: "" if score is None else score, "champion": "" if holder is None else holder,
            f"champion_{name.label}": "" if held is None else held, "decision": text}


@dataclass
class Outcome:
    """What one tick did for one version, for the report."""

    version: int
    status: str
    job: str = ""
    score: str = ""
    decision: str = ""


@dataclass
class TickReport:
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    promoted: int | None = None

    def note(self, version: int, status: str, **details: str) -> None:
        outcome = self.outcomes.setdefault(version, Outcome(version, status))
        outcome.status = status
        for key, value in details.items():
            setattr(outcome, key, value)

    @property
    def failed(self) -> bool:
        return any(o.status in (FAILED, GAVE_UP) for o in self.outcomes.values())

    def table(self) -> str:
        if not self.outcomes:
            return "nothing to do: every version is evaluated under this spec"
        rows = [("version", "status", "job", "score", "decision")]
        rows += [(str(o.version), o.status, o.job, o.score, o.decision)
                 for o in sorted(self.outcomes.values(), key=lambda o: o.version)]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4]
                         for row in rows)


class SchedulerError(UserError):
    """A registry, store or cluster the scheduler cannot use, with the reason."""


def retrying(what: str, call, done=None, permanent=None, attempts: int = REGISTRY_ATTEMPTS,
             backoff: float = REGISTRY_BACKOFF):
    """`call()`, retried with exponential backoff through transient MLflow, Ray and S3 errors.

    After a failure `done()` may say the call took effect anyway (a write another scheduler made);
    an error `permanent(error)` accepts is an answer, not an outage, and is raised at once. After the
    last attempt: SchedulerError, which ends this tick (the next one starts over).
    """
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except SchedulerError:
            raise
        except Exception as error:  # noqa: BLE001 - MLflow, HTTP, S3 and connection errors alike
            if permanent is not None and permanent(error):
                raise
            try:
                if done is not None and done():
                    return None
            except Exception:  # noqa: BLE001 - the read-back failed too: retry the write
                pass
            if attempt == attempts:
                raise SchedulerError(f"{what} failed {attempts} times: {first_line(error)}") from None
            log.warning("%s failed (attempt %d/%d), retrying: %s", what, attempt, attempts, first_line(error))
            time.sleep(backoff * 2 ** (attempt - 1))
