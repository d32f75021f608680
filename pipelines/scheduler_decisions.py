"""The scheduler's decisions, as pure functions of what it has read (I/O-free; tests/test_scheduler_decisions.py).

- `next_step`: what to do with one model version, given this spec's tags on it and the Ray jobs of its
  batches: skip it, watch its running batch, finish (record) an ended one, resubmit a batch the cluster
  forgot, submit the next attempt, or give up.
- `decide_promotion`: whom `champion` goes to, given the verified FIDs of this spec, the alias holder, the
  spec that owns the alias and whether the holder is still being evaluated; and the decision each new
  score gets (promoted / kept / deferred / not promoted / recorded only).

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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from ddpm_core.errors import UserError, first_line

if TYPE_CHECKING:
    from pipelines.evaluation import EvalSpec

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


@dataclass(frozen=True)
class Promotion:
    champion: int | None = None  # the version `champion` moves to, or None: it stays
    claim: bool = False  # no spec owns `champion` yet: record this one as its owner first
    decisions: dict[int, Decision] = field(default_factory=dict)  # the promoted version first


def decide_promotion(digest: str, owner: str | None, scores: Mapping[int, float], holder: int | None,
                     holder_status: str | None, new: Iterable[int], pseudo: Collection[int] = ()) -> Promotion:
    """Whom `champion` goes to, and the decision of each version in `new` (those that succeeded this tick).

    `scores`: the verified FIDs under spec `digest`; `owner`: the spec whose scheduler moves `champion` (None:
    none yet; another: this one records only); `holder`: the version holding it, `holder_status` its evaluation
    status under this spec (while it is submitted or failed, nothing moves); `pseudo`: versions scored by a
    pseudo-FID, which never promotes.
    """
    new = sorted(new)
    if owner not in (None, digest):
        text = f"recorded only: champion is decided under spec {owner}, not {digest}"
        return Promotion(decisions={n: Decision(text, {"fid": scores.get(n, ""), "decision": text}) for n in new})
    held = scores.get(holder) if holder is not None else None
    best = min(scores, key=lambda n: (scores[n], n), default=None)
    pending = holder is not None and held is None and holder_status in (SUBMITTED, FAILED)
    decisions, champion = {}, None
    if best is not None and not pending and (held is None or scores[best] < held):
        if held is not None:
            text = f"promoted: FID {scores[best]:.4f} < champion v{holder} FID {held:.4f}"
        else:
            text = f"promoted: FID {scores[best]:.4f}; " + (
                f"champion v{holder} has no FID under this spec" if holder is not None else "no champion before")
        decisions[best] = Decision(text, {"fid": scores[best], "champion": "" if holder is None else holder,
                                          "champion_fid": "" if held is None else held, "decision": text})
        champion, holder, held = best, best, scores[best]
    for number in new:
        if number != champion:
            decisions[number] = _standing(number, scores, holder, held, pending, number in pseudo)
    return Promotion(champion, champion is not None and owner is None, decisions)


def _standing(number: int, scores: Mapping[int, float], holder: int | None, held: float | None, pending: bool,
              pseudo: bool) -> Decision:
    """The decision of a new score that did not promote."""
    if number not in scores:
        text = f"not promoted: {'pseudo-FID' if pseudo else 'no FID'} only (FID needs the verified Inception weights)"
        values = {"fid": "", "champion": "" if holder is None else holder, "champion_fid": "" if held is None else held}
    elif pending:
        text = f"deferred: champion v{holder} is still being evaluated under this spec"
        values = {"fid": scores[number], "champion": holder, "champion_fid": ""}
    elif number == holder:
        text = f"kept: already champion, FID {scores[number]:.4f}"
        values = {"fid": scores[number], "champion": holder, "champion_fid": held}
    else:
        text = f"not promoted: FID {scores[number]:.4f} >= champion v{holder} FID {held:.4f}"
        values = {"fid": scores[number], "champion": holder, "champion_fid": held}
    return Decision(text, {**values, "decision": text})


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
