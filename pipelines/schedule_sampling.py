"""Scheduled sampling batches: score every new model version by FID on the Ray cluster; promote the best.

    ddpm schedule --model-name ddpm-lsun_bedroom256 --num 50000 --ref s3://bucket/lsun-bedroom-256/fid_stats.npz \\
        --out-root s3://bucket/evaluations --actors 8 --gpu --cron "0 * * * *"

Each tick lists the versions of the registered model and, for every version without an evaluation
under this evaluation spec, submits the sampling job (pipelines/sample_fid.py) through the Ray Jobs
API, waits for it and reads its fid.json. The `champion` alias then moves to the best verified FID;
a pseudo-FID never promotes. The decision and both scores are version tags.

State lives in MLflow version tags, one namespace per spec (`ddpm.eval.<digest>.*`,
`ddpm.promotion.<digest>.*`), and in Ray job ids, never in local files. Tags only say where a batch
is; what counts is the evaluation's own record: promotion re-reads each fid.json from the artifact
store, checks its sha256, model, spec, reference and Inception weights, and compares only results of
one spec (which includes the reference file's sha256). Submission ids are deterministic,
ddpm-eval-<model>-v<version>-<spec digest>-a<attempt>, and Ray refuses a second job with an existing
id: schedulers that race submit each batch once, a restarted scheduler picks up the jobs it finds in
the tags, and attempt k+1 is only submitted once attempt k has ended, so no two batches for one
version ever run at once. One spec holds the `champion` alias (recorded on the registered model);
schedulers of other specs score and record, but never move it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from urllib.parse import urlparse

from ddpm_core.inception import TRUSTED_ENV, WEIGHTS_ENV, accepted_weights
from ddpm_core.sampling import SPEC_DEFAULTS, SamplesError
from ddpm_core.storage import StorageError, read_uri
from pipelines.registry import WEIGHTS_SHA_TAG
from pipelines.sample_fid import add_sampler_arguments, sampler_settings

log = logging.getLogger("ddpm.schedule")
CHAMPION = "champion"
PROGRESS_EVERY_S = 30.0  # the longest gap between two "waiting for" lines while batches run
CHAMPION_SPEC = "ddpm.champion_spec"  # registered-model tag: the spec whose scheduler moves `champion`
EVAL = "ddpm.eval."  # + <digest>. + status, job, attempts, out, error, result_sha256, fid | pseudo_fid
PROMOTION = "ddpm.promotion."  # + <digest>. + decision, fid, champion, champion_fid
SUBMITTED, SUCCEEDED, FAILED, GAVE_UP = "submitted", "succeeded", "failed", "gave_up"
# Settings the job needs from the scheduler's side (the cluster provides its own credentials and endpoints).
PASSED_ENV = (WEIGHTS_ENV, TRUSTED_ENV)
# Spec fields added after the first specs were recorded, with the value those specs meant.
ADDED_FIELDS = {key: SPEC_DEFAULTS[key] for key in ("spacing", "clip")}


REGISTRY_ATTEMPTS, REGISTRY_BACKOFF = 5, 0.5  # seconds, doubled after each failed attempt


class SchedulerError(RuntimeError):
    """A registry or cluster the scheduler cannot use, with the reason."""


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
                raise SchedulerError(f"{what} failed {attempts} times: {_first_line(error)}") from None
            log.warning("%s failed (attempt %d/%d), retrying: %s", what, attempt, attempts, _first_line(error))
            time.sleep(backoff * 2 ** (attempt - 1))


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation is; a version is evaluated once per spec (its digest is in the job ids)."""

    num: int
    sampler: str
    steps: int
    eta: float
    seed: int
    ref: str | None
    features: str
    per_tar: int
    bf16: bool = False  # the network's precision: FIDs under one spec come from one precision
    reference_sha256: str | None = None  # what `ref` held: a changed reference file is another spec
    spacing: str = "linspace"  # where the steps lie (ddpm: every step)
    clip: bool = True  # x̂0 clipped to [-1, 1]

    @property
    def digest(self) -> str:
        # Fields added after the first specs were recorded count only away from the value those specs
        # meant, so that an existing spec keeps its digest, its records and its champion.
        fields = {k: v for k, v in asdict(self).items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    def mismatch(self, result: dict) -> str | None:
        """How a fid.json differs from what this spec asks, or None (one written before a field read as its default)."""
        steps = self.steps if self.sampler != "ddpm" else result.get("steps")
        asked = {"num": self.num, "sampler": self.sampler, "steps": steps, "spacing": self.spacing, "eta": self.eta,
                 "clip": self.clip, "seed": self.seed, "features": self.features, "bf16": self.bf16,
                 "reference_sha256": self.reference_sha256}
        for key, value in asked.items():
            found = result.get(key, ADDED_FIELDS.get(key))
            if found != value:
                return f"its {key} is {found!r}, the spec's {value!r}"
        return None

    def job_arguments(self) -> list[str]:
        arguments = ["--num", str(self.num), "--sampler", self.sampler, "--steps", str(self.steps),
                     "--spacing", self.spacing, "--eta", str(self.eta), "--clip" if self.clip else "--no-clip",
                     "--seed", str(self.seed), "--features", self.features, "--per-tar", str(self.per_tar),
                     "--bf16" if self.bf16 else "--no-bf16"]
        return arguments + (["--ref", self.ref] if self.ref else [])


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


def submission_id(model_name: str, version: int, spec: EvalSpec, attempt: int) -> str:
    safe = re.sub(r"[^a-z0-9]+", "-", model_name.lower()).strip("-")
    return f"ddpm-eval-{safe}-v{version}-{spec.digest}-a{attempt}"


class InvalidResult(ValueError):
    """A fid.json that cannot count, with the reason."""


def check_result(result: dict, model: str, spec: EvalSpec, model_weights_sha256: str | None) -> dict:
    """`result` (a parsed fid.json) if it is this spec's evaluation of `model`, else InvalidResult."""
    if result.get("model") != model:
        raise InvalidResult(f"it scores {result.get('model')!r}, not {model}")
    if (difference := spec.mismatch(result)) is not None:
        raise InvalidResult(difference)
    if result.get("model_weights_sha256") != model_weights_sha256:
        raise InvalidResult("it was computed from other weights than the version's registered ones")
    for label in ("fid", "pseudo_fid"):
        if label in result and not (isinstance(result[label], (int, float)) and math.isfinite(result[label])):
            raise InvalidResult(f"its {label} is {result[label]!r}, not a finite number")
    return result


def verified_fid(result: dict) -> float | None:
    """The FID of a checked result, if it was computed with verified Inception weights (never a pseudo-FID)."""
    if "fid" not in result or result.get("inception_weights_sha256") not in accepted_weights():
        return None
    return float(result["fid"])


class Scheduler:
    """One registered model, one evaluation spec, one Ray cluster; `tick()` is idempotent."""

    def __init__(self, model_name: str, spec: EvalSpec, out_root: str, jobs, client, tracking_uri: str,
                 job_options: list[str], max_attempts: int = 3, aliases: tuple[str, ...] = (),
                 working_dir: str | None = None, deadline: float = 24 * 3600):
        self.model_name, self.spec, self.out_root = model_name, spec, out_root.rstrip("/")
        self.jobs, self.client, self.tracking_uri = jobs, client, tracking_uri
        self.job_options, self.max_attempts, self.aliases = job_options, max_attempts, aliases
        self.working_dir, self.deadline = working_dir, deadline

    # --- the registry -------------------------------------------------------------------------
    def registered_model(self):
        try:
            return self.client.get_registered_model(self.model_name)
        except Exception as error:  # noqa: BLE001 - MLflow raises several kinds for "not found"
            if "RESOURCE_DOES_NOT_EXIST" not in str(error) and "not found" not in str(error).lower():
                raise  # an outage, not an answer: retried by the caller
            raise SchedulerError(f"registered model {self.model_name!r} does not exist in the MLflow registry at "
                                 f"{_redact(self.tracking_uri)}: {_first_line(error)}") from None

    def versions(self) -> list:
        retrying(f"reading the registered model {self.model_name}", self.registered_model)
        found = retrying(f"listing the versions of {self.model_name}",
                         lambda: self.client.search_model_versions(f"name = '{self.model_name}'"))
        return sorted(found, key=lambda v: int(v.version))

    def eval_key(self, key: str) -> str:
        return f"{EVAL}{self.spec.digest}.{key}"

    def tag(self, version: int, prefix: str, values: dict[str, object]) -> None:
        """Write tags of this spec's namespace, in order (callers put the deciding tag last)."""
        for key, value in values.items():
            self.set_tag(version, f"{prefix}{self.spec.digest}.{key}", str(value))

    def set_tag(self, version: int, key: str, value: str) -> None:
        """Write one version tag idempotently: a tag that already holds `value` is success.

        Schedulers that race write the same new tag at once; MLflow's SQL store answers one of them
        with a unique-key conflict (HTTP 400) that its client does not retry. Read back and compare,
        then retry with backoff.
        """
        def holds_value() -> bool:
            return self.client.get_model_version(self.model_name, str(version)).tags.get(key) == value

        retrying(f"setting tag {key} of {self.model_name} v{version}",
                 lambda: self.client.set_model_version_tag(self.model_name, str(version), key, value), holds_value)

    def alias_holder(self, alias: str):
        """The version holding `alias`, or None; an unreachable registry is an error, not "no holder"."""
        def read():
            try:
                return self.client.get_model_version_by_alias(self.model_name, alias)
            except Exception as error:  # noqa: BLE001 - MLflow answers a missing alias with an error
                if _not_found(error):
                    return None
                raise

        return retrying(f"reading the alias {alias} of {self.model_name}", read)

    def champion_spec(self) -> str | None:
        """The spec whose scheduler moves `champion` (the first one that promoted), or None."""
        return self.registered_model().tags.get(CHAMPION_SPEC)

    # --- the cluster --------------------------------------------------------------------------
    def out_uri(self, version: int) -> str:
        return f"{self.out_root}/{self.model_name}/v{version}-{self.spec.digest}"

    def submit(self, version: int, job_id: str, attempt: int, report: TickReport) -> None:
        """Submit the batch under `job_id`; an id that exists means another scheduler already did."""
        arguments = ["--model", f"models:/{self.model_name}/{version}", "--out", self.out_uri(version),
                     *self.spec.job_arguments(), *self.job_options]
        if not urlparse(self.tracking_uri).password:  # credentials never go into a job's command line
            arguments += ["--tracking-uri", self.tracking_uri]
        runtime_env = {"env_vars": {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}}
        if self.working_dir:
            runtime_env["working_dir"] = self.working_dir
        try:
            retrying(f"submitting {job_id}", lambda: self.jobs.submit_job(
                entrypoint=shlex.join(["python", "-m", "pipelines.sample_fid", *arguments]),
                submission_id=job_id, runtime_env=runtime_env,
                metadata={"ddpm.model": self.model_name, "ddpm.version": str(version), "ddpm.spec": self.spec.digest,
                          "ddpm.attempt": str(attempt)}), permanent=_already_submitted)
        except RuntimeError as error:
            if not _already_submitted(error):
                raise
            log.info("v%d: %s was already submitted (another scheduler, or an earlier tick)", version, job_id)
        else:
            log.info("v%d: submitted %s (attempt %d/%d)", version, job_id, attempt, self.max_attempts)
            report.submitted.append(job_id)
        self.tag(version, EVAL, {"job": job_id, "attempts": attempt, "out": self.out_uri(version),
                                 "status": SUBMITTED})
        report.note(version, SUBMITTED, job=job_id)

    def jobs_by_id(self) -> dict:
        jobs = retrying("listing the jobs of the Ray cluster", self.jobs.list_jobs)
        return {job.submission_id: job for job in jobs if job.submission_id}

    def failure_reason(self, job) -> str:
        """The job's message and the last error line of its log."""
        try:
            lines = [line for line in self.jobs.get_job_logs(job.submission_id).splitlines() if line.strip()]
        except Exception:  # noqa: BLE001 - logs are a courtesy
            lines = []
        errors = [line for line in lines if "ERROR" in line or "Error" in line]
        detail = (errors or lines or [""])[-1].strip()
        summary = (job.message or "").split(", last available logs")[0]  # Ray appends the log tail
        return f"{job.status}: {summary}: {detail}"[:1000]

    def past_deadline(self, job) -> bool:
        """Whether a running batch has run longer than the deadline (then it is stopped and failed)."""
        started = getattr(job, "start_time", None)  # ms since the epoch
        return bool(started) and time.time() - started / 1000 > self.deadline

    def stop(self, job_id: str, timeout: float = 60) -> bool:
        """Stop a batch and wait until it has ended: the next attempt must never run beside it."""
        retrying(f"stopping {job_id}", lambda: self.jobs.stop_job(job_id))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if retrying(f"reading the status of {job_id}", lambda: self.jobs.get_job_status(job_id)).is_terminal():
                return True
            time.sleep(1)
        log.warning("%s has not ended %.0f s after it was stopped; checked again on the next poll", job_id, timeout)
        return False

    # --- one tick -----------------------------------------------------------------------------
    def batches(self, jobs: dict, version: int) -> dict[int, object]:
        """This spec's batches of `version` that the cluster knows, by attempt number."""
        prefix = submission_id(self.model_name, version, self.spec, 0)[:-1]  # ...-a<attempt>
        return {int(i[len(prefix):]): job for i, job in jobs.items()
                if i.startswith(prefix) and i[len(prefix):].isdigit()}

    def tick(self, wait_timeout: float = 6 * 3600, poll: float = 10.0) -> TickReport:
        report = TickReport()
        watching: dict[int, str] = {}
        holders = {int(v.version) for v in map(self.alias_holder, self.aliases) if v is not None}
        # The tags first, then the cluster: every batch whose tags were read is in this listing (a scheduler
        # submits before it tags), so the attempt count below never misses a batch that another one started.
        versions, jobs = self.versions(), self.jobs_by_id()
        for version in versions:
            number, tags = int(version.version), version.tags
            status, job_id = tags.get(self.eval_key("status")), tags.get(self.eval_key("job"))
            known = self.batches(jobs, number)
            attempts = max([_count(tags, self.eval_key("attempts"), number), *known])
            latest = known.get(attempts)
            if status in (SUCCEEDED, GAVE_UP):
                continue
            if latest is not None and not latest.status.is_terminal():
                watching[number] = latest.submission_id  # one batch per version at a time: follow it
                report.note(number, SUBMITTED, job=latest.submission_id)
                continue
            if latest is not None and (status == SUBMITTED or job_id != latest.submission_id):
                self.finish(number, latest, report)  # ended, not yet recorded
                continue  # a failure observed now is retried on the next tick
            if status == SUBMITTED and job_id:
                # The cluster no longer knows it (restarted): run it again; the samples resume.
                log.warning("v%d: the cluster has no record of %s; submitting it again", number, job_id)
                self.submit(number, job_id, max(attempts, 1), report)
                watching[number] = job_id
                continue
            if self.aliases and number not in holders:
                continue
            if attempts >= self.max_attempts:
                error = tags.get(self.eval_key("error"), "")
                self.tag(number, EVAL, {"status": GAVE_UP})
                log.error("v%d: gave up after %d failed batches (%s); delete the tag %s to try again",
                          number, attempts, error, self.eval_key("status"))
                report.note(number, GAVE_UP, job=job_id or "", decision=error)
                continue
            job_id = submission_id(self.model_name, number, self.spec, attempts + 1)
            self.submit(number, job_id, attempts + 1, report)
            watching[number] = job_id
        self.wait(watching, report, wait_timeout, poll)
        self.promote(report)
        return report

    def wait(self, watching: dict[int, str], report: TickReport, timeout: float, poll: float) -> None:
        started, last_line, logged_at = time.monotonic(), None, -math.inf
        while watching:
            jobs = self.jobs_by_id()
            for number, job_id in list(watching.items()):
                job = jobs.get(job_id)
                if job is not None and job.status.is_terminal():
                    self.finish(number, job, report)
                    del watching[number]
                elif job is not None and self.past_deadline(job) and self.stop(job_id):
                    self.record_failure(number, job_id, f"stopped: still {job.status} after the deadline of "
                                                        f"{self.deadline:.0f} s (--deadline)", report)
                    del watching[number]
            if not watching:
                break
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                log.info("still running after %.0f s: %s; the next tick picks them up", elapsed,
                         ", ".join(watching.values()))
                break
            line = ", ".join(f"v{n} {jobs[j].status if j in jobs else 'PENDING'}" for n, j in watching.items())
            if line != last_line or elapsed - logged_at >= PROGRESS_EVERY_S:  # a fast poll does not flood the log
                log.info("waiting for %d batch(es): %s (%.0f s)", len(watching), line, elapsed)
                last_line, logged_at = line, elapsed
            time.sleep(poll)

    def read_result(self, version: int, expected_sha256: str | None = None) -> tuple[dict, str]:
        """(the checked fid.json of this spec's batch for `version`, its sha256); InvalidResult if it cannot count.

        The location is the scheduler's own (out root, model, version, spec), never a tag's.
        """
        uri = f"{self.out_uri(version)}/fid.json"
        try:
            data = retrying(f"reading {uri}", lambda: read_uri(uri), permanent=_missing_file)
        except StorageError as error:
            raise InvalidResult(str(error)) from None
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise InvalidResult(f"{uri} changed after it was recorded (sha256 {digest[:12]}, recorded "
                                f"{expected_sha256[:12]})")
        try:
            result = json.loads(data)
        except ValueError as error:
            raise InvalidResult(f"{uri} is not JSON: {error}") from None
        model = f"models:/{self.model_name}/{version}"
        weights = retrying(f"reading {model}", lambda: self.client.get_model_version(self.model_name, str(version)))
        return check_result(result, model, self.spec, weights.tags.get(WEIGHTS_SHA_TAG)), digest

    def finish(self, version: int, job, report: TickReport) -> None:
        """Record an ended batch: its result (written completely, `status` last) or why it failed."""
        if str(job.status) != "SUCCEEDED":
            self.record_failure(version, job.submission_id, self.failure_reason(job), report)
            return
        try:
            result, digest = self.read_result(version)
        except InvalidResult as error:
            self.record_failure(version, job.submission_id, f"succeeded but its fid.json cannot count: {error}",
                                report)
            return
        scores = {key: result[key] for key in ("fid", "pseudo_fid") if key in result}
        self.tag(version, EVAL, {**scores, "result_sha256": digest, "error": "", "status": SUCCEEDED})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) or "samples only"
        log.info("v%d: %s succeeded: %s", version, job.submission_id, shown)
        report.note(version, SUCCEEDED, job=job.submission_id, score=shown)

    def record_failure(self, version: int, job_id: str, reason: str, report: TickReport) -> None:
        self.tag(version, EVAL, {"error": reason, "status": FAILED})
        log.error("v%d: batch %s failed, retried on the next tick: %s", version, job_id, reason)
        report.note(version, FAILED, job=job_id, decision=f"not promoted: the batch failed ({reason[:120]})")

    # --- promotion ----------------------------------------------------------------------------
    def verified_scores(self, versions: dict[int, dict]) -> dict[int, float]:
        """Verified FIDs of this spec, each re-read from its fid.json; a result that cannot count is skipped
        with one warning."""
        scores = {}
        for number, tags in versions.items():
            if tags.get(self.eval_key("status")) != SUCCEEDED:
                continue
            try:
                recorded = tags.get(self.eval_key("result_sha256"))
                if not recorded:
                    raise InvalidResult(f"its tags say {SUCCEEDED} but no result was recorded "
                                        f"({self.eval_key('result_sha256')} is missing)")
                result, _ = self.read_result(number, recorded)
            except InvalidResult as error:
                log.warning("v%d: its evaluation under spec %s is skipped: %s", number, self.spec.digest, error)
                continue
            if (fid := verified_fid(result)) is not None:
                scores[number] = fid
        return scores

    def promote(self, report: TickReport) -> None:
        """Move `champion` to the best verified FID under this spec; record a decision for each new score."""
        versions = {int(v.version): v.tags for v in self.versions()}
        scored = self.verified_scores(versions)
        owner = self.champion_spec()
        if owner not in (None, self.spec.digest):
            for number, outcome in report.outcomes.items():
                if outcome.status == SUCCEEDED:
                    decision = (f"recorded only: {CHAMPION} is decided under spec {owner}, not {self.spec.digest}")
                    self.tag(number, PROMOTION, {"decision": decision, "fid": scored.get(number, "")})
                    outcome.decision = decision
            return
        champion = self.alias_holder(CHAMPION)
        holder = int(champion.version) if champion else None
        held = scored.get(holder) if holder is not None else None
        best = min(scored, key=lambda n: (scored[n], n), default=None)
        pending = holder is not None and held is None and versions.get(holder, {}).get(
            self.eval_key("status")) in (SUBMITTED, FAILED)
        promote = best is not None and not pending and (held is None or scored[best] < held)
        if promote:
            if owner is None:
                retrying(f"recording the champion spec of {self.model_name}",
                         lambda: self.client.set_registered_model_tag(self.model_name, CHAMPION_SPEC,
                                                                      self.spec.digest))
            retrying(f"moving {CHAMPION} of {self.model_name} to v{best}",
                     lambda: self.client.set_registered_model_alias(self.model_name, CHAMPION, str(best)),
                     lambda: getattr(self.alias_holder(CHAMPION), "version", None) == str(best))
            decision = (f"promoted: FID {scored[best]:.4f} < champion v{holder} FID {held:.4f}" if held is not None
                        else f"promoted: FID {scored[best]:.4f}; " + (f"champion v{holder} has no FID under this "
                                                                      "spec" if holder else "no champion before"))
            self.tag(best, PROMOTION, {"fid": scored[best], "champion": holder or "",
                                       "champion_fid": "" if held is None else held, "decision": decision})
            log.info("v%d is the new %s (%s)", best, CHAMPION, decision)
            report.promoted = best
            report.note(best, report.outcomes[best].status if best in report.outcomes else SUCCEEDED,
                        decision=decision)
            holder, held = best, scored[best]
        for number, outcome in report.outcomes.items():
            if outcome.status != SUCCEEDED or number == report.promoted:
                continue
            if number not in scored:
                kind = "pseudo-FID" if self.eval_key("pseudo_fid") in versions[number] else "no FID"
                decision = f"not promoted: {kind} only (FID needs the verified Inception weights)"
                values = {"fid": "", "champion": holder or "", "champion_fid": held or ""}
            elif pending:
                decision = f"deferred: champion v{holder} is still being evaluated under this spec"
                values = {"fid": scored[number], "champion": holder, "champion_fid": ""}
            elif number == holder:
                decision = f"kept: already {CHAMPION}, FID {scored[number]:.4f}"
                values = {"fid": scored[number], "champion": holder, "champion_fid": held}
            else:
                decision = f"not promoted: FID {scored[number]:.4f} >= champion v{holder} FID {held:.4f}"
                values = {"fid": scored[number], "champion": holder, "champion_fid": held}
            self.tag(number, PROMOTION, {**values, "decision": decision})
            outcome.decision = decision


def _count(tags: dict[str, str], key: str, version: int) -> int:
    """A counter tag; a value that is not a count is read as 0, with one warning."""
    value = tags.get(key, "0")
    try:
        return max(0, int(value))
    except ValueError:
        log.warning("v%d: tag %s is %r, not a count; read as 0", version, key, value)
        return 0


def _not_found(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_DOES_NOT_EXIST" in text or "not found" in text.lower() or "INVALID_PARAMETER_VALUE" in text


def _already_submitted(error: Exception) -> bool:
    return "already exists" in str(error)


def _missing_file(error: Exception) -> bool:
    return isinstance(error, StorageError) and "does not exist" in str(error)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _redact(uri: str) -> str:
    from pipelines.tracking import redact

    return redact(uri)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", required=True, help="registered model, e.g. ddpm-lsun_bedroom256")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="one tick, then exit (for an external cron)")
    when.add_argument("--cron", metavar="EXPR", help="run a tick at every match of this 5-field cron expression (UTC)")
    parser.add_argument("--num", type=int, default=50000, help="samples per evaluation (50000 for published FIDs)")
    parser.add_argument("--out-root", required=True, help="evaluations go to <out-root>/<model>/v<version>-<spec>")
    parser.add_argument("--ref", default=None, help="reference statistics .npz (as for `ddpm fid`)")
    add_sampler_arguments(parser)
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                        help="clip x̂0 to [-1, 1] at every step (default on, as the paper and every preset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-tar", type=int, default=1000, help="images per output tar")
    parser.add_argument("--features", choices=("inception", "random-init", "none"), default="inception",
                        help="random-init gives a pseudo-FID, which is recorded but never promotes")
    parser.add_argument("--bf16", action="store_true",
                        help="sample with the network under bf16 autocast (faster; default fp32, the exact path)")
    parser.add_argument("--actors", type=int, default=1, help="sampling actors per batch")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--inception-weights", default=None, help="path to the FID weights on the cluster's nodes")
    parser.add_argument("--allow-small-n", action="store_true", help="passed to the job (tests and smoke runs)")
    parser.add_argument("--max-attempts", type=int, default=3, help="failed batches per version before giving up")
    parser.add_argument("--wait-timeout", type=float, default=6 * 3600,
                        help="seconds a tick waits for its batches; later ticks pick up what still runs")
    parser.add_argument("--deadline", type=float, default=24 * 3600,
                        help="seconds a batch may run in all; a batch still running then is stopped and failed")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between job status checks")
    parser.add_argument("--aliases", nargs="+", default=(),
                        help="only versions holding one of these aliases (default: every version)")
    parser.add_argument("--working-dir", default=None, help="ship this directory with each job (else the cluster's "
                                                            "image provides the code)")
    parser.add_argument("--address", default=None, help="Ray job API, e.g. http://127.0.0.1:8265 "
                                                        "(default RAY_ADDRESS)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")


def job_options(args: argparse.Namespace) -> list[str]:
    """How each batch runs (resources, batch size): not part of what the evaluation is."""
    options = ["--actors", str(args.actors), "--batch-size", str(args.batch_size),
               "--cpus-per-actor", str(args.cpus_per_actor)]
    options += ["--gpu"] if args.gpu else []
    options += ["--allow-small-n"] if args.allow_small_n else []
    return options + (["--inception-weights", args.inception_weights] if args.inception_weights else [])


def build(args: argparse.Namespace) -> Scheduler:
    from ray.job_submission import JobSubmissionClient

    from pipelines.ray_runtime import REMOTE_TOKEN_FIX, is_auth_failure
    from pipelines.tracking import connect, resolve_tracking_uri

    for name, value in (("--num", args.num), ("--max-attempts", args.max_attempts), ("--actors", args.actors),
                        ("--deadline", args.deadline)):
        if value < 1:
            raise SchedulerError(f"{name} must be >= 1, got {value}")
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SchedulerError("no Ray job API address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(tracking_uri)
    try:
        jobs = JobSubmissionClient(address)
    except Exception as error:  # noqa: BLE001 - connection, HTTP and authentication errors alike
        if is_auth_failure(error):
            raise SchedulerError(f"the Ray job API at {address} refused this client's token: "
                                 f"{REMOTE_TOKEN_FIX}") from None
        raise SchedulerError(f"cannot reach the Ray job API at {address}: {_first_line(error)}") from None
    reference_sha256 = None
    if args.ref:
        try:
            reference_sha256 = hashlib.sha256(retrying(f"reading {args.ref}", lambda: read_uri(args.ref),
                                                       permanent=_missing_file)).hexdigest()
        except StorageError as error:
            raise SchedulerError(f"--ref: {error}") from None
    try:
        steps, spacing, eta = sampler_settings(args, timesteps=None)
    except SamplesError as error:
        raise SchedulerError(str(error)) from None
    spec = EvalSpec(args.num, args.sampler, steps, eta, args.seed, args.ref, args.features, args.per_tar,
                    args.bf16, reference_sha256, spacing, args.clip)
    return Scheduler(args.model_name, spec, args.out_root, jobs, client, tracking_uri, job_options(args),
                     args.max_attempts, tuple(args.aliases), args.working_dir, args.deadline)


def run(args: argparse.Namespace) -> int:
    from pipelines.cron import Cron, CronError
    from pipelines.ray_runtime import configure_logging
    from pipelines.tracking import TrackingError

    configure_logging()
    try:
        cron = Cron.parse(args.cron) if args.cron else None
        scheduler = build(args)
        log.info("evaluating %s under spec %s: %s", args.model_name, scheduler.spec.digest, asdict(scheduler.spec))
        if cron is None:
            report = scheduler.tick(args.wait_timeout, args.poll)
            print(report.table(), flush=True)
            return 1 if report.failed else 0
        serve(scheduler, cron, args.wait_timeout, args.poll)
    except (SchedulerError, TrackingError, CronError) as error:
        log.error("%s", error)
        return 2
    return 0


def serve(scheduler: Scheduler, cron, wait_timeout: float, poll: float, ticks: int | None = None,
          sleep=time.sleep) -> None:
    """A tick at every match of `cron`, forever (or `ticks` times). A tick that fails (an outage that
    outlasted the retries) is logged and the next one starts over: state is in MLflow and Ray."""
    done = 0
    while ticks is None or done < ticks:
        now = datetime.now(timezone.utc)
        next_tick = cron.next_after(now)
        log.info("next tick at %s UTC", next_tick.strftime("%Y-%m-%d %H:%M"))
        sleep((next_tick - now).total_seconds())
        try:
            print(scheduler.tick(wait_timeout, poll).table(), flush=True)
        except SchedulerError as error:
            log.error("this tick failed, the next one retries: %s", error)
        done += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
