"""Scheduled sampling batches: score every new model version by FID on the Ray cluster; promote the best.

    ddpm schedule --model-name ddpm-lsun_bedroom256 --num 50000 --ref s3://bucket/lsun-bedroom-256/fid_stats.npz \\
        --out-root s3://bucket/evaluations --actors 8 --gpu --cron "0 * * * *" --owns-champion

Each tick lists the versions of the registered model and, for every version without an evaluation
under this evaluation spec, submits the sampling job (pipelines/sample_fid.py) through the Ray Jobs
API, waits for it and reads its fid.json. The `champion` alias then moves to the best verified FID;
a pseudo-FID never promotes. The decision and both scores are version tags, and a line of the version's
description (score, sampler, N, decision).

State lives in MLflow version tags, one namespace per spec (`ddpm.eval.<digest>.*`,
`ddpm.promotion.<digest>.*`), and in Ray job ids, never in local files. Tags only say where a batch
is; what counts is the evaluation's own record: promotion re-reads each fid.json, checks its sha256, model,
spec, reference and Inception weights, and that its batch is a SUCCEEDED Ray job this scheduler submitted for
that version and spec (Jobs-API metadata). Only a scheduler with --owns-champion moves `champion`, and only
while its spec owns it (--take-over-champion hands it over); others record only, and warn of a better score.
What to do is decided by pure functions (pipelines/scheduler_decisions.py: one batch per version at a
time, deterministic job ids); `Scheduler` reads the registry (mlflow_registry.EvaluationRecords) and
the cluster (ray_jobs.JobQueue), and applies them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import asdict
from urllib.parse import urlparse

from ddpm_core.errors import ArgumentError
from ddpm_core.inception import TRUSTED_ENV, WEIGHTS_ENV
from ddpm_core.storage import StorageError, read_uri
from pipelines import scheduler_decisions as decisions
from pipelines.cron import Cron
from pipelines.evaluation import (
    ROUTINE_SAMPLER,
    EvalSpec,
    EvaluationResult,
    InvalidResult,
    add_sampler_arguments,
    check_result,
    run_options,
    toy_label,
    verified_fid,
)
from pipelines.job_runner import command_line, run_job
from pipelines.scheduler_decisions import FAILED, SUBMITTED, SUCCEEDED, SchedulerError, TickReport, retrying

log = logging.getLogger("ddpm.schedule")
# Settings the job needs from the scheduler's side (the cluster provides its own credentials and endpoints).
PASSED_ENV = (WEIGHTS_ENV, TRUSTED_ENV)


def _missing_file(error: Exception) -> bool:
    return isinstance(error, StorageError) and "does not exist" in str(error)


def claim_authority(records, digest: str, owns: bool, take_over: bool = False) -> decisions.Authority:
    """What the scheduler of spec `digest` may do with `champion` (ChampionOwnerError: refused); claims it if told."""
    authority = decisions.champion_authority(digest, records.champion_spec(), owns, take_over, records.name)
    if authority.claim:
        records.claim_champion()
        log.warning("champion of %s is now moved by the scheduler of spec %s (%s)", records.name, digest,
                    f"--take-over-champion, from spec {authority.previous}" if authority.previous else "no owner yet")
    return authority


class Scheduler:
    """One registered model, one evaluation spec, one Ray cluster; `tick()` is idempotent."""

    def __init__(self, spec: EvalSpec, out_root: str, records, jobs, job_options: list[str], max_attempts: int = 3,
                 aliases: tuple[str, ...] = (), working_dir: str | None = None, deadline: float = 24 * 3600,
                 owns: bool = False):
        self.spec, self.out_root, self.records, self.jobs = spec, out_root.rstrip("/"), records, jobs
        self.job_options, self.max_attempts, self.aliases = job_options, max_attempts, aliases
        self.working_dir, self.deadline, self.owns, self.results_read = working_dir, deadline, owns, {}

    def out_uri(self, version: int) -> str:
        return f"{self.out_root}/{self.records.name}/v{version}-{self.spec.digest}"

    def tick(self, wait_timeout: float = 6 * 3600, poll: float = 10.0) -> TickReport:
        report, watching, authority = TickReport(), {}, claim_authority(self.records, self.spec.digest, self.owns)
        holders = {self.records.alias_holder(alias) for alias in self.aliases}
        # The tags first, then the cluster: every batch whose tags were read is in this listing (a scheduler
        # submits before it tags), so the attempt count never misses a batch that another one started.
        versions, jobs = self.records.versions(), self.jobs.jobs()
        for version in versions:
            number, tags = int(version.version), self.records.evals(version)
            prefix = decisions.job_prefix(self.records.name, number, self.spec.digest)
            if (attempts := decisions.read_count(tags.get("attempts"))) is None:
                log.warning("v%d: tag %s is %r, not a count; read as 0", number, self.records.eval_key("attempts"),
                            tags["attempts"])
            state = decisions.VersionState(number, tags, decisions.attempts_of(jobs, prefix), attempts or 0, prefix,
                                           not self.aliases or number in holders)
            self.apply(decisions.next_step(state, self.max_attempts), state, report, watching)
        for number, job, stopped in self.jobs.follow(watching, wait_timeout, poll, self.deadline):
            if stopped:
                self.record_failure(number, job.submission_id, f"stopped: still {job.status} after the deadline of "
                                                               f"{self.deadline:.0f} s (--deadline)", report)
            else:
                self.finish(number, job, report)
        self.promote(report, authority)
        return report

    def apply(self, step: decisions.Step, state: decisions.VersionState, report: TickReport,
              watching: dict[int, str]) -> None:
        number = state.number
        if step.action == decisions.WATCH:  # one batch per version at a time: follow it
            report.note(number, SUBMITTED, job=step.job)
        elif step.action == decisions.FINISH:  # a failure observed now is retried on the next tick
            self.finish(number, state.batches[step.attempt], report)
        elif step.action in (decisions.RESUBMIT, decisions.SUBMIT):
            if step.action == decisions.RESUBMIT:  # the samples resume
                log.warning("v%d: the cluster has no record of %s; submitting it again", number, step.job)
            self.submit(number, step.job, step.attempt, report)
        elif step.action == decisions.GIVE_UP:
            self.records.record_evaluation(number, {"status": decisions.GAVE_UP})
            log.error("v%d: gave up after %d failed batches (%s); delete the tag %s to try again", number,
                      step.attempt, step.error, self.records.eval_key("status"))
            report.note(number, decisions.GAVE_UP, job=step.job, decision=step.error)
        if step.action in (decisions.WATCH, decisions.RESUBMIT, decisions.SUBMIT):
            watching[number] = step.job

    def submit(self, version: int, job_id: str, attempt: int, report: TickReport) -> None:
        """Submit the batch under `job_id`; an id that exists means another scheduler already did."""
        arguments = ["--model", self.records.uri(version), "--out", self.out_uri(version),
                     *self.spec.job_arguments(), *self.job_options]
        tracking_uri = self.records.tracking_uri
        if not urlparse(tracking_uri).password:  # credentials never go into a job's command line
            arguments += ["--tracking-uri", tracking_uri]
        metadata = decisions.batch_metadata(self.records.name, version, self.spec.digest, attempt)
        if self.jobs.submit(job_id, ["python", "-m", "pipelines.sample_fid", *arguments],
                            {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}, self.working_dir, metadata):
            log.info("v%d: submitted %s (attempt %d/%d)", version, job_id, attempt, self.max_attempts)
            report.submitted.append(job_id)
        else:
            log.info("v%d: %s was already submitted (another scheduler, or an earlier tick)", version, job_id)
        self.records.record_evaluation(version, {"job": job_id, "attempts": attempt, "out": self.out_uri(version),
                                                 "status": SUBMITTED})
        report.note(version, SUBMITTED, job=job_id)

    def read_result(self, version: int, job_id: str | None, jobs: dict,
                    expected_sha256: str | None = None) -> tuple[EvaluationResult, str]:
        """(the checked fid.json of this spec's batch `job_id` for `version`, its sha256); InvalidResult if it cannot
        count. The batch must be a SUCCEEDED one of this scheduler's (`jobs`: the cluster's, by id); the location
        is the scheduler's own (out root, model, version, spec), never a tag's."""
        uri = f"{self.out_uri(version)}/fid.json"
        try:
            data = retrying(f"reading {uri}", lambda: read_uri(uri), permanent=_missing_file)
        except StorageError as error:
            raise InvalidResult(str(error)) from None
        digest = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise InvalidResult(f"{uri} changed after it was recorded (sha256 {digest[:12]}, recorded "
                                f"{expected_sha256[:12]})")
        result = check_result(EvaluationResult.parse(data, uri), self.records.uri(version), self.spec,
                              self.records.weights_sha256(version))
        if reason := decisions.unvouched(job_id, self.records.name, version, self.spec.digest, jobs):
            raise InvalidResult(reason)
        return result, digest

    def finish(self, version: int, job, report: TickReport) -> None:
        """Record an ended batch: its result (written completely, `status` last) or why it failed."""
        if job.status != "SUCCEEDED":
            return self.record_failure(version, job.submission_id, self.jobs.failure_reason(job), report)
        try:
            result, digest = self.read_result(version, job.submission_id, {job.submission_id: job})
        except InvalidResult as error:
            return self.record_failure(version, job.submission_id, f"succeeded but its fid.json cannot count: "
                                                                   f"{error}", report)
        scores, self.results_read[version] = result.fids(), result
        self.records.record_evaluation(version, {**scores, "result_sha256": digest, "error": "", "status": SUCCEEDED})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items()) or "samples only"
        log.info("v%d: %s succeeded: %s", version, job.submission_id, shown)
        report.note(version, SUCCEEDED, job=job.submission_id, score=shown)

    def record_failure(self, version: int, job_id: str, reason: str, report: TickReport) -> None:
        self.records.record_evaluation(version, {"error": reason, "status": FAILED})
        log.error("v%d: batch %s failed, retried on the next tick: %s", version, job_id, reason)
        report.note(version, FAILED, job=job_id, decision=decisions.failed_decision(reason))

    def verified_scores(self, versions: dict[int, dict[str, str]]) -> dict[int, float]:
        """Verified FIDs of this spec, each re-read and vouched for (`read_result`); others are skipped (a warning)."""
        scores, jobs = {}, self.jobs.jobs()
        for number, tags in versions.items():
            if tags.get("status") != SUCCEEDED:
                continue
            try:
                if not tags.get("result_sha256"):
                    raise InvalidResult(f"its tags say {SUCCEEDED} but no result was recorded "
                                        f"({self.records.eval_key('result_sha256')} is missing)")
                result, _ = self.read_result(number, tags.get("job"), jobs, tags["result_sha256"])
            except InvalidResult as error:
                log.warning("v%d: its evaluation under spec %s is skipped: %s", number, self.spec.digest, error)
                continue
            if (fid := verified_fid(result)) is not None:
                scores[number] = fid
        return scores

    def promote(self, report: TickReport, authority: decisions.Authority) -> None:
        """Move `champion` to this spec's best verified FID (if it may); record a decision for each new score."""
        versions = {int(v.version): self.records.evals(v) for v in self.records.versions()}
        holder = self.records.champion()
        new = [number for number, outcome in report.outcomes.items() if outcome.status == SUCCEEDED]
        scores, toy = self.verified_scores(versions), {n: toy_label(versions.get(n, {})) for n in new}
        promotion = decisions.decide_promotion(authority, scores, holder, versions.get(holder, {}).get("status"), new,
                                               toy, name=decisions.score_name(self.spec))
        if promotion.warning:
            log.warning("%s (spec %s)", promotion.warning, self.spec.digest)
        if promotion.champion is not None:
            self.records.move_champion(promotion.champion)
            log.info("v%d is the new champion (%s)", promotion.champion, promotion.decisions[promotion.champion].text)
            report.promoted = promotion.champion
        for number, decision in promotion.decisions.items():
            self.records.record_decision(number, decision.tags, self.results_read.get(number))
            report.note(number, report.outcomes[number].status if number in report.outcomes else SUCCEEDED,
                        decision=decision.text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-name", required=True, help="registered model, e.g. ddpm-lsun_bedroom256")
    when = parser.add_mutually_exclusive_group(required=True)
    when.add_argument("--once", action="store_true", help="one tick, then exit (for an external cron)")
    when.add_argument("--cron", metavar="EXPR", help="run a tick at every match of this 5-field cron expression (UTC)")
    parser.add_argument("--out-root", required=True, help="evaluations go to <out-root>/<model>/v<version>-<spec>")
    add_sampler_arguments(parser, defaults=ROUTINE_SAMPLER)
    parser.add_argument("--max-attempts", type=int, default=3, help="failed batches per version before giving up")
    parser.add_argument("--wait-timeout", type=float, default=6 * 3600,
                        help="seconds a tick waits for its batches; later ticks pick up what still runs")
    parser.add_argument("--deadline", type=float, default=24 * 3600,
                        help="seconds a batch may run in all; a batch still running then is stopped and failed")
    parser.add_argument("--poll", type=float, default=15.0, help="seconds between job status checks")
    parser.add_argument("--owns-champion", action="store_true", help="this scheduler moves `champion` (refused if "
                        "another spec owns it); else scores are recorded only. Give it to one: the CronJob's")
    parser.add_argument("--take-over-champion", action="store_true",
                        help="hand `champion` over to this scheduler's spec (logged), then own it as --owns-champion")
    parser.add_argument("--aliases", nargs="+", default=(),
                        help="only versions holding one of these aliases (default: every version)")
    parser.add_argument("--working-dir", help="ship this directory with each job (else the cluster's image has it)")
    parser.add_argument("--address", default=None, help="Ray job API, e.g. http://127.0.0.1:8265 (default RAY_ADDRESS)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")


def build(args: argparse.Namespace) -> Scheduler:
    from pipelines.mlflow_registry import EvaluationRecords
    from pipelines.mlflow_tracking import connect, resolve_tracking_uri
    from pipelines.ray_jobs import JobQueue

    for name, value in (("--num", args.num), ("--max-attempts", args.max_attempts), ("--actors", args.actors),
                        ("--deadline", args.deadline)):
        if value < 1:
            raise ArgumentError(f"{name} must be >= 1, got {value}")
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(tracking_uri)
    jobs = JobQueue(args.address, retry=retrying)
    try:  # what --ref holds: a changed reference file is another spec
        reference = args.ref and retrying(f"reading {args.ref}", lambda: read_uri(args.ref), permanent=_missing_file)
    except StorageError as error:
        raise SchedulerError(f"--ref: {error}") from None
    spec = EvalSpec.from_arguments(args, hashlib.sha256(reference).hexdigest() if reference else None)
    records = EvaluationRecords(client, args.model_name, spec.digest, tracking_uri, retry=retrying)
    return Scheduler(spec, args.out_root, records, jobs, run_options(args), args.max_attempts, tuple(args.aliases),
                     args.working_dir, args.deadline, args.owns_champion or args.take_over_champion)


def schedule(args: argparse.Namespace) -> int:
    """One tick (exit status 1 if a batch failed), or ticks on --cron forever."""
    cron = Cron.parse(args.cron) if args.cron else None
    scheduler = build(args)
    log.info("evaluating %s under spec %s: %s", args.model_name, scheduler.spec.digest, asdict(scheduler.spec))
    # Refused before any work; a take-over happens here, once, not at every tick.
    authority = claim_authority(scheduler.records, scheduler.spec.digest, scheduler.owns, args.take_over_champion)
    if not authority.moves:
        log.info("scores are recorded only: %s", authority.note)
    if cron is None:
        report = scheduler.tick(args.wait_timeout, args.poll)
        print(report.table(), flush=True)
        return 1 if report.failed else 0
    cron.serve(lambda: print(scheduler.tick(args.wait_timeout, args.poll).table(), flush=True))
    return 0


def run(args: argparse.Namespace) -> int:
    return run_job(schedule, args)


def main(argv: list[str] | None = None) -> int:
    return command_line(__doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
