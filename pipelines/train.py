"""Ray job: train a DDPM with Ray Train DDP, MLflow tracking, checkpoints, resume and registration.

    python pipelines/train.py --preset cifar10 --data /data/cifar10-32 --workers 2
    ray job submit --working-dir . -- python pipelines/train_lsun.py --data s3://bucket/lsun-bedroom-256 \\
        --preset lsun_bedroom256 --workers 8 --gpu --storage s3://bucket/runs --name bedroom-v1

The same `--name` resumes: from the latest checkpoint, in the same MLflow run, if the dataset and the
config are the same but for RESUMABLE, as the MLflow run and the checkpoint itself (whatever the tracking
store or experiment) record them; `--force-new` starts a new run. At the end the EMA model becomes a
new version of `ddpm-<preset>` in the MLflow registry, alias `candidate`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from ddpm_core.checkpoint import latest_state, read_config
from ddpm_core.config import Config, ConfigError
from ddpm_core.errors import ArgumentError, UserError
from ddpm_core.presets import PRESETS, get_preset
from ddpm_core.progress import follow
from ddpm_core.sharding import DatasetError, read_dataset_info
from ddpm_core.storage import open_storage
from pipelines.arguments import add_cpus_argument
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.train")
# The params a resumed run may change: how long it trains, the worker layout, where the data lives (not its
# fingerprint) and the cadence of logs, samples and checkpoints. Any other change would continue the
# checkpoint as a different model, recipe or dataset than the run records.
RESUMABLE = ("train.steps", "workers", "gpu", "compile", "train.micro_batch", "data", "train.log_every",
             "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps",
             "train.fid_every", "train.fid_num", "fid_ref")


def add_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None,
                  presets: tuple[str, ...] = tuple(PRESETS)) -> None:
    parser.add_argument("--data", help="dataset root made by `ddpm shard` (path or s3://); required unless "
                                       "--print-config")
    parser.add_argument("--preset", default=default_preset, required=default_preset is None, choices=presets,
                        help="the named configuration (`ddpm presets` lists them)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any preset field, e.g. --set train.lr=1e-5 (repeatable)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (the preset with every --set) as JSON and exit")
    parser.add_argument("--workers", type=int, default=1, help="DDP workers")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); else CPU (gloo)")
    add_cpus_argument(parser, "DDP worker")
    parser.add_argument("--loader-workers", type=int, default=2, help="data loader processes per worker")
    parser.add_argument("--storage", default="runs", help="where the checkpoints go, in <storage>/<name>: local folder "
                                                          "or s3://")
    parser.add_argument("--name", default=None, help="run name; the same name resumes, with the same dataset and "
                                                     "config (see --force-new) (default <preset>-<data>)")
    parser.add_argument("--force-new", action="store_true",
                        help="start --name over: a new MLflow run and checkpoint folder (the old run stays, no longer "
                             "resumed). Without it a run resumes only with the same dataset fingerprint and config; "
                             f"these may differ: {', '.join(k if '.' in k else '--' + k for k in RESUMABLE)}")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI, "
                                                             "else sqlite:///./mlflow.db)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the dataset's name)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last checkpoint")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast where it is fast (CUDA, CPUs with native bf16), else fp32; --no-bf16: "
                             "fp32 everywhere")
    parser.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--fid-ref", default=None,
                        help="reference statistics of the FID during training (train.fid_every; default the "
                             "dataset's own: <data>/fid_stats.npz, else fid_stats_pseudo.npz, from `ddpm fid-ref`)")


def run(args: argparse.Namespace) -> int:
    return run_job(print_config if args.print_config else train, args)


def print_config(args: argparse.Namespace) -> None:
    """The config a run of these flags would train: the preset with every --set, as JSON (no Ray, no MLflow)."""
    print(json.dumps(resolved_config(args).to_dict(), indent=2))


def resolved_config(args: argparse.Namespace) -> Config:
    """The preset with every --set applied."""
    return get_preset(args.preset).with_overrides(args.set)


def train(args: argparse.Namespace) -> None:
    """Check the inputs, create or resume the MLflow run, train on Ray, register the EMA model."""
    from pipelines import ray_train
    from pipelines.mlflow_registry import code_version, register, registered_name
    from pipelines.mlflow_tracking import TrainingRun, connect, param_value, redact, resolve_tracking_uri
    from pipelines.ray_runtime import init_ray, require_resources

    config, data, info = checked_inputs(args)
    fid_reference = quality_reference(data.uri, args.fid_ref) if config.train.fid_every else None
    storage_uri = args.storage if args.storage.startswith("s3://") else str(Path(args.storage).expanduser().resolve())
    open_storage(storage_uri).check_writable()
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(tracking_uri)
    init_ray(args.address)
    require_resources(ray_train.worker_resources(args.cpus_per_worker, args.gpu), args.workers)

    dataset_name = Path(data.uri.rstrip("/")).name
    name = args.name or f"{config.preset}-{dataset_name}"
    params = {**config.flat(), "data": args.data, "workers": args.workers, "gpu": args.gpu, "compile": args.compile,
              "dataset_fingerprint": info["fingerprint"], **({"fid_ref": fid_reference} if fid_reference else {})}
    # --force-new gets a folder of its own: Ray Train resumes from whatever checkpoints the folder holds.
    folder = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if args.force_new else name
    run = TrainingRun(client, tracking_uri, args.experiment or dataset_name, name, params, folder, args.force_new)
    check_resume(run, name, f"{storage_uri.rstrip('/')}/{run.folder}", {k: param_value(v) for k, v in params.items()})
    run.record_checkpoints(f"{storage_uri.rstrip('/')}/{run.folder}")
    run.record_dataset(data.uri, dataset_name, info)
    log.info("%s MLflow run %s (%s) of experiment %s; checkpoints in %s/%s", "resuming" if run.resumed else "created",
             run.run_id, redact(tracking_uri), args.experiment or dataset_name, storage_uri, run.folder)

    loop_config = {"config": config.to_dict(), "data": data.uri, "tracking_uri": tracking_uri, "run_id": run.run_id,
                   "loader_workers": args.loader_workers, "compile": args.compile, "bf16": args.bf16,
                   "threads_per_worker": max(1, int(args.cpus_per_worker)), "dataset_fingerprint": info["fingerprint"],
                   "fid_reference": fid_reference}
    again = "the same command" + (" without --force-new" if args.force_new else "")
    try:
        with follow(lambda: trained_steps(client, run.run_id), config.train.steps, "steps"), ray_train.fit(
                loop_config, workers=args.workers, gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                storage_uri=storage_uri, folder=run.folder, keep_checkpoints=config.train.keep_checkpoints,
                max_failures=args.max_failures,
                resume_hint=f"re-run {again} (--name {name}) to resume from the last checkpoint") as done:
            run.record_final_checkpoint(done.checkpoint_uri)
            version = register(client, run.run_id, done.directory, config, {
                "dataset_fingerprint": info["fingerprint"], "steps": done.step, "code_version": code_version(),
                "run_id": run.run_id, "checkpoint": done.checkpoint_uri})
    except ray_train.TrainingFailed:
        run.fail()
        raise
    log.info("done: step %d, %d non-finite steps skipped; checkpoint %s; registered %s version %s "
             "(alias candidate); MLflow run %s", done.step, done.nonfinite_steps, done.checkpoint_uri,
             registered_name(config.preset), version, run.run_id)


def checked_inputs(args: argparse.Namespace):
    """The config, the opened dataset and its dataset.json, refused when they cannot train together."""
    config = resolved_config(args)
    if args.data is None:
        raise ArgumentError("--data is required: the dataset root made by `ddpm shard`")
    if args.workers < 1:
        raise ArgumentError(f"--workers must be >= 1, got {args.workers}")
    if config.train.batch_size % args.workers:
        raise ConfigError(f"the global batch {config.train.batch_size} does not split evenly over {args.workers} "
                          "workers; choose a worker count that divides it")
    data = open_storage(args.data)
    info = read_dataset_info(data)
    if info["resolution"] != config.model.resolution:
        raise DatasetError(f"dataset {args.data} holds {info['resolution']}×{info['resolution']} images but preset "
                           f"{config.preset} trains at {config.model.resolution}×{config.model.resolution}")
    return config, data, info


def trained_steps(client, run_id: str) -> int:
    """The last step rank 0 has logged metrics of: how far training is, as the driver sees it."""
    return max((metric.step for metric in client.get_run(run_id).data.to_proto().metrics if metric.key == "loss"),
               default=0)


def quality_reference(data_uri: str, flag: str | None) -> str:
    """The reference statistics of train.fid_every, read once here: a bad file is refused before training."""
    from ddpm_core.fid import load_reference
    from ddpm_core.storage import read_uri
    from pipelines.training_quality import find_reference

    reference = find_reference(data_uri, flag)
    load_reference(read_uri(reference), reference)
    log.info("train.fid_every: the EMA model is scored against %s", reference)
    return reference


def check_resume(run, name: str, checkpoints: str, now: dict[str, str]) -> None:
    """Refuse to go on with run `name` in another dataset or config than its MLflow run was started with, or than
    the newest checkpoint in `checkpoints` records (the checkpoint's record counts whatever the MLflow store or
    experiment: a new one finds no run, and Ray Train would resume the checkpoint all the same). A run created
    by this command is deleted again when refused; a found one is left as it was."""
    from pipelines.mlflow_tracking import param_value

    try:
        if run.resumed:
            check_resumable(name, run.started_params, now)
        if latest := latest_state(open_storage(checkpoints)):
            url, state = latest
            recorded = {**read_config(url, state.config).flat(),  # "": a checkpoint from before the field
                        "dataset_fingerprint": state.dataset_fingerprint or now["dataset_fingerprint"]}
            check_resumable(name, {k: param_value(v) for k, v in recorded.items()}, now,
                            source=f" (checkpoint {url})", announce=not run.resumed)
    except UserError:
        if not run.resumed:
            run.discard()
        raise
    if run.resumed:
        run.mark_running()


def check_resumable(name: str, started: dict[str, str], now: dict[str, str], source: str = "",
                    announce: bool = True) -> None:
    """Refuse to resume run `name` if the params it was started with (as its MLflow run, or the checkpoint
    `source`, records them) differ from `now` outside RESUMABLE; `announce` logs the RESUMABLE ones that do.

    A config field the run has no param for (it was started before the field existed) counts as its default.
    """
    from pipelines.mlflow_tracking import param_value

    started = {**{k: param_value(v) for k, v in Config.field_defaults().items()}, **started}
    differ = sorted(k for k in started.keys() | now.keys() if k not in RESUMABLE and started.get(k) != now.get(k))
    if differ:
        def settings(params: dict[str, str]) -> str:
            return " and ".join(f"{k}={params.get(k, '(unset)')}" for k in differ)

        raise ConfigError(f"run {name!r}{source} was started with {settings(started)}; this command has "
                          f"{settings(now)}; use the same settings to resume, or --force-new to start over")
    changed = [f"{k}={now[k]} (was {started[k]})" for k in RESUMABLE if k in started and started[k] != now.get(k)]
    if changed and announce:
        log.info("resuming run %r with %s", name, ", ".join(changed))


def main(argv: list[str] | None = None, default_preset: str | None = None,
         presets: tuple[str, ...] = tuple(PRESETS)) -> int:
    return command_line(__doc__.splitlines()[0], lambda parser: add_arguments(parser, default_preset, presets), run,
                        argv)


if __name__ == "__main__":
    sys.exit(main())
