"""The pictures of the docs, drawn from real runs: the demo's training curves and the samplers' quality vs cost.

    make demo                                               # or DEMO_FAST=1 make demo (a 12-step curve)
    python bench/sampler_table.py > docs/sampler_table.md   # the table the third picture plots
    python bench/figures.py [--demo demo] [--sampler-table docs/sampler_table.md] [--out docs]

Writes, under --out:
- demo_loss.png: the demo training run's loss against the step (its MLflow metric `loss`);
- demo_quality.png: its quality-vs-step curve (`train/<pseudo_fid|spec_fid>_<sampler><steps>_n<N>`,
  train.fid_every), read from the demo's MLflow store (<demo>/mlflow.db);
- sampler_quality_cost.png: each sampler's Fréchet distance against its cost (s / 1k samples, log scale),
  from bench/sampler_table.py's markdown table (fp32 rows), DDPM-1000 as the reference point.
A figure says what its numbers are: a pseudo-FID or a pixel FD is labelled so, never called FID.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

QUALITY_PREFIX = "train/"  # the metrics of training/quality (pipelines/training_quality.py)
METRIC_LABELS = {"pseudo_fid": "pseudo-FID (random-init\nInception, not an FID)", "spec_fid": "spec-FID (FID network)"}


def demo_training_run(store: Path):
    """(client, the demo's training run): the newest run with a loss curve (once training has ended, the later
    stages need not have run)."""
    client = MlflowClient(f"sqlite:///{store.resolve()}")
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    (run,) = client.search_runs(experiments, filter_string="metrics.loss >= 0", max_results=1,
                                order_by=["attributes.start_time DESC"])
    return client, run


def curve(client: MlflowClient, run_id: str, key: str) -> tuple[list[int], list[float]]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def plot_demo(store: Path, out: Path) -> list[Path]:
    client, run = demo_training_run(store)
    run_id, name = run.info.run_id, run.info.run_name
    written = []
    figure, axes = plt.subplots(figsize=(6, 3.6))
    steps, losses = curve(client, run_id, "loss")
    axes.plot(steps, losses, color="tab:blue")
    axes.set(xlabel="training step", ylabel="loss (L_simple, Eq. 14)", title=f"make demo: training loss (run {name})",
             yscale="log" if max(losses) > 3 * min(losses) else "linear")  # log only where it spans a range
    axes.title.set_fontsize(9)
    axes.grid(alpha=0.3)
    written.append(save(figure, out / "demo_loss.png"))

    (key,) = [k for k in run.data.metrics if k.startswith(QUALITY_PREFIX)]
    kind = next(label for label in METRIC_LABELS if key.startswith(QUALITY_PREFIX + label))
    setting = key[len(QUALITY_PREFIX + kind) + 1:]  # e.g. dpmpp_2m10_n256: sampler, steps and N
    figure, axes = plt.subplots(figsize=(6, 3.6))
    axes.plot(*curve(client, run_id, key), marker="o", color="tab:red")
    axes.set(xlabel="training step", ylabel=f"{METRIC_LABELS.get(kind, kind)}, lower is better",
             title=f"make demo: EMA model quality during training\n{key} ({setting}: sampler, steps, N)")
    axes.title.set_fontsize(9)
    axes.yaxis.label.set_fontsize(9)
    axes.grid(alpha=0.3)
    written.append(save(figure, out / "demo_quality.png"))
    return written


def read_sampler_table(path: Path) -> tuple[str, list[dict]]:
    """(the metric's column name, the rows) of bench/sampler_table.py's markdown table."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    return header[3], rows


def plot_samplers(table: Path, out: Path) -> Path:
    metric, rows = read_sampler_table(table)
    figure, axes = plt.subplots(figsize=(6.4, 4))
    reference = next(row for row in rows if row["sampler"] == "ddpm")
    axes.scatter([float(reference["s / 1k samples"])], [float(reference[metric])], color="black", zorder=3,
                 label="DDPM-1000 (the paper's sampler)")
    for sampler in dict.fromkeys(row["sampler"] for row in rows if row["sampler"] != "ddpm"):
        chosen = [row for row in rows if row["sampler"] == sampler and row["precision"] == "fp32"]
        axes.plot([float(row["s / 1k samples"]) for row in chosen], [float(row[metric]) for row in chosen],
                  marker="o", label=sampler)
        for row in chosen:
            axes.annotate(row["steps"], (float(row["s / 1k samples"]), float(row[metric])), fontsize=7,
                          xytext=(3, 3), textcoords="offset points")
    axes.set(xscale="log", xlabel="seconds per 1k samples (this machine's CPU; read as ratios)",
             ylabel=f"{metric} (lower is better)",
             title=f"samplers: quality vs cost (bench/sampler_table.py; numbers = steps; {metric} is a toy metric)")
    axes.title.set_fontsize(8)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=8)
    return save(figure, out / "sampler_quality_cost.png")


def save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("demo"), help="the demo's folder (default ./demo)")
    parser.add_argument("--sampler-table", type=Path, default=Path("docs/sampler_table.md"),
                        help="bench/sampler_table.py's output (default docs/sampler_table.md)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where the PNGs go (default docs)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in [*plot_demo(args.demo / "mlflow.db", args.out), plot_samplers(args.sampler_table, args.out)]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
