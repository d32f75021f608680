"""Job: does a cheap evaluation spec rank models as the expensive one does?

    ddpm calibrate --models models:/ddpm-lsun_bedroom256/3 models:/ddpm-lsun_bedroom256/5 ... \\
        --ref s3://bucket/lsun-bedroom-256/fid_stats.npz --num 10000 --out s3://bucket/calibration \\
        --cheap dpmpp_2m:20 unipc:20 ddim:50 --actors 8 --gpu

Every model (registered versions, or checkpoints of one run) is scored under the expensive spec
(`--expensive`, default the paper's DDPM-1000) and under each cheap one, by the sampling job
(`python -m pipelines.sample_fid`, one process per sample set: each resumes what it finished, and runs its
actors where that job does). Per cheap spec it reports the cost ratio (network evaluations per image, and
the seconds measured here), the Spearman rank correlation of its scores with the expensive spec's, and
whether both pick the same best model. Writes calibration.json, calibration.md and calibration.png to
--out and logs them to MLflow. A score is the one the record carries (fid, spec_fid or, with
--features random-init or pixels, pseudo_fid or pixel_fd: toy metrics, for tests and development only).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import spearmanr

from ddpm_core.errors import ArgumentError, UserError
from ddpm_core.storage import open_storage
from pipelines.evaluation import (
    PAPER_SAMPLER,
    ROUTINE_SAMPLER,
    EvaluationResult,
    SamplerSetting,
    add_sample_set_arguments,
    run_options,
)
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.calibrate")
MIN_MODELS = 3  # a rank correlation of fewer says nothing


class CalibrationError(UserError):
    """A sample set of the calibration that failed or left no score."""


@dataclass(frozen=True)
class Scored:
    model: str
    setting: str
    label: str  # one of FID_LABELS
    score: float
    evaluations_per_image: int  # network evaluations: T for ddpm, --steps otherwise
    seconds: float | None  # measured here; None when the set was already complete


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", required=True,
                        help=f"at least {MIN_MODELS} models: models:/<name>/<version> or checkpoint folders")
    parser.add_argument("--expensive", type=SamplerSetting.parse, default=PAPER_SAMPLER,
                        help="the spec of record, SAMPLER[:STEPS[:SPACING[:ETA]]] (default ddpm: all T steps)")
    parser.add_argument("--cheap", type=SamplerSetting.parse, nargs="+", default=[ROUTINE_SAMPLER],
                        help=f"the specs to calibrate (default the routine {ROUTINE_SAMPLER.name})")
    parser.add_argument("--out", required=True, help="folder (local or s3://) of the sample sets and the report")
    add_sample_set_arguments(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("--address", default=None, help="Ray address of the sampling jobs (default RAY_ADDRESS)")


def run(args: argparse.Namespace) -> int:
    return run_job(calibrate, args)


def calibrate(args: argparse.Namespace) -> int:
    if args.features == "none" or not args.ref:
        raise ArgumentError("calibration ranks scores: give --ref and --features inception (or random-init, pixels)")
    if len(set(args.models)) < MIN_MODELS:
        raise ArgumentError(f"--models needs at least {MIN_MODELS} different models to rank, got {len(args.models)}")
    settings = [args.expensive, *args.cheap]
    if len({s.name for s in settings}) < len(settings):
        raise ArgumentError(f"--expensive and --cheap name one spec twice: {[s.name for s in settings]}")
    scored = [score(args, model, setting) for model in args.models for setting in settings]
    report = compare(scored, args.expensive.name, [s.name for s in args.cheap], args.models)
    storage = open_storage(args.out)
    table, plot = markdown(report), scatter_png(report)
    storage.write_bytes("calibration.json", json.dumps(report, indent=2).encode())
    storage.write_bytes("calibration.md", table.encode())
    storage.write_bytes("calibration.png", plot)
    print(table, flush=True)
    try:
        from pipelines.mlflow_tracking import log_calibration

        log_calibration(args.tracking_uri, report, table, plot)
    except Exception:  # noqa: BLE001 - the report is in --out; MLflow only mirrors it
        log.warning("the report is in %s; logging it to MLflow failed:", storage.url("calibration.md"), exc_info=True)
    return 0


def score(args: argparse.Namespace, model: str, setting: SamplerSetting) -> Scored:
    """One sample set through the sampling job (resumed if it is there); its score from its fid.json."""
    out = f"{args.out.rstrip('/')}/{slug(model)}/{setting.name}"
    storage = open_storage(out)
    if storage.exists("fid.json"):  # a re-run: this set was scored (the sampling job refuses other settings)
        result = EvaluationResult.parse(storage.read_bytes("fid.json"), storage.url("fid.json"))
        if (result.num, result.seed, result.features, result.reference) == (args.num, args.seed, args.features,
                                                                            args.ref):
            log.info("%s under %s: scored already (%s)", model, setting.name, storage.url("fid.json"))
            return scored(model, setting, result, storage, seconds=None)
    command = [sys.executable, "-m", "pipelines.sample_fid", "--model", model, "--out", out, *setting.flags(),
               "--num", str(args.num), "--seed", str(args.seed), "--per-tar", str(args.per_tar), "--ref", args.ref,
               "--features", args.features, "--no-bf16", "--clip", *run_options(args),
               *(["--tracking-uri", args.tracking_uri] if args.tracking_uri else []),
               *(["--address", args.address] if args.address else [])]
    log.info("%s under %s: sampling into %s", model, setting.name, out)
    started = time.perf_counter()
    finished = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    if finished.returncode != 0:
        raise CalibrationError(f"the sampling job of {model} under {setting.name} failed (exit status "
                               f"{finished.returncode}; its log is above); re-run to resume")
    result = EvaluationResult.parse(storage.read_bytes("fid.json"), storage.url("fid.json"))
    return scored(model, setting, result, storage, seconds=time.perf_counter() - started)


def scored(model: str, setting: SamplerSetting, result: EvaluationResult, storage, seconds: float | None) -> Scored:
    if (value := getattr(result, result.label)) is None:
        raise CalibrationError(f"{storage.url('fid.json')} has no {result.label}")
    return Scored(model, setting.name, result.label, float(value), result.steps, seconds)


def slug(model: str) -> str:
    """A folder name for a model reference: readable, and distinct (a digest of the whole reference)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", model.removeprefix("models:/")).strip("-.")[-60:]
    return f"{readable}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def compare(scored: list[Scored], expensive: str, cheap: list[str], models: list[str]) -> dict:
    """Per cheap spec: cost ratio, Spearman's rho against the expensive spec, and the best model under each."""
    by = {(s.model, s.setting): s for s in scored}
    reference = np.array([by[m, expensive].score for m in models])
    best = models[int(np.argmin(reference))]
    rows = []
    for name in cheap:
        values = np.array([by[m, name].score for m in models])
        seconds = [(by[m, expensive].seconds, by[m, name].seconds) for m in models]
        measured = [(e, c) for e, c in seconds if e is not None and c is not None]
        rows.append({
            "spec": name, "label": by[models[0], name].label,
            "evaluations_per_image": by[models[0], name].evaluations_per_image,
            "cost_ratio": by[models[0], expensive].evaluations_per_image / by[models[0], name].evaluations_per_image,
            "measured_cost_ratio": sum(e for e, _ in measured) / sum(c for _, c in measured) if measured else None,
            "spearman": float(spearmanr(reference, values).statistic),
            "best": models[int(np.argmin(values))], "agrees": models[int(np.argmin(values))] == best})
    return {"expensive": expensive, "expensive_label": by[models[0], expensive].label, "best": best,
            "models": models, "specs": rows, "scores": [asdict(s) for s in scored]}


def markdown(report: dict) -> str:
    """Two tables: each cheap spec against the expensive one, and every score."""
    lines = [f"Calibration against {report['expensive']} ({report['expensive_label']}); best model: "
             f"{report['best']}", "",
             "| spec | score | evaluations / image | cost ratio | measured | Spearman ρ | its best | agrees |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for row in report["specs"]:
        measured = f"{row['measured_cost_ratio']:.1f}×" if row["measured_cost_ratio"] else "—"
        lines.append(f"| {row['spec']} | {row['label']} | {row['evaluations_per_image']} | {row['cost_ratio']:.1f}× "
                     f"| {measured} | {row['spearman']:.3f} | {row['best']} | {'yes' if row['agrees'] else 'no'} |")
    specs = [report["expensive"], *(row["spec"] for row in report["specs"])]
    by = {(s["model"], s["setting"]): s["score"] for s in report["scores"]}
    lines += ["", "| model | " + " | ".join(specs) + " |", "|---|" + "---:|" * len(specs)]
    lines += [f"| {m} | " + " | ".join(f"{by[m, s]:.3f}" for s in specs) + " |" for m in report["models"]]
    return "\n".join(lines) + "\n"


def scatter_png(report: dict) -> bytes:
    """One panel per cheap spec: its score against the expensive spec's, a point per model."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node
    from matplotlib import pyplot

    by = {(s["model"], s["setting"]): s["score"] for s in report["scores"]}
    specs = report["specs"]
    figure, axes = pyplot.subplots(1, len(specs), figsize=(4.2 * len(specs), 3.8), squeeze=False)
    x = [by[m, report["expensive"]] for m in report["models"]]
    for axis, row in zip(axes[0], specs):
        y = [by[m, row["spec"]] for m in report["models"]]
        axis.scatter(x, y)
        for i, (a, b) in enumerate(zip(x, y)):
            axis.annotate(str(i + 1), (a, b), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.set_xlabel(f"{report['expensive']} ({report['expensive_label']})")
        axis.set_ylabel(f"{row['spec']} ({row['label']})")
        axis.set_title(f"ρ = {row['spearman']:.2f}, {row['cost_ratio']:.0f}× cheaper", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    pyplot.close(figure)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> int:
    return command_line(__doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
