"""Ray job: train a DDPM with Ray Train DDP, MLflow tracking, checkpoints, resume and registration.

    python pipelines/train.py --preset cifar10 --data /data/cifar10-32 --workers 2
    ray job submit --working-dir . -- python pipelines/train_lsun.py --data s3://bucket/lsun-bedroom-256 \\
        --preset lsun_bedroom256 --workers 8 --gpu --storage s3://bucket/runs --name bedroom-v1

The same `--name` resumes: from the latest checkpoint, in the same MLflow run, if the dataset and the
config are the same but for RESUMABLE; `--force-new` starts a new run. At the end the EMA model becomes a
new version of `ddpm-<preset>` in the MLflow registry, alias `candidate`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from ddpm_core.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from ddpm_core.config import Config, ConfigError
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.loader import TrainLoader
from ddpm_core.pixels import image_grid, to_uint8
from ddpm_core.presets import PRESETS, get_preset
from ddpm_core.rng import image_generators, image_seed
from ddpm_core.sampling import bf16_is_fast
from ddpm_core.sharding import DatasetError, read_dataset_info
from ddpm_core.storage import StorageError, open_storage
from ddpm_core.training import build_ema, build_optimizer, train_step
from ddpm_core.unet import UNet

log = logging.getLogger("ddpm.train")
GRID_IMAGES, GRID_DDIM_STEPS = 16, 25
TEST_HOOKS = ("DDPM_TEST_FAIL_AT_STEP", "DDPM_TEST_FAIL_RANK", "DDPM_TEST_FAIL_ONCE", "DDPM_TEST_TRACE_DIR")
MLFLOW_BATCH_METRICS = 1000  # the most metrics MLflow takes in one log_batch
# Workers try an MLflow request once, for at most 10 s (MLflow's defaults: 7 retries over minutes, 120 s each):
# RankZeroTracker keeps what fails, so a retry inside the request only stalls training. The driver keeps the
# defaults: its few calls (create the run, register the model) are worth waiting for.
WORKER_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# The params a resumed run may change: how long it trains, the worker layout, where the data lives (not its
# fingerprint) and the cadence of logs, samples and checkpoints. Any other change would continue the
# checkpoint as a different model, recipe or dataset than the run records.
RESUMABLE = ("train.steps", "workers", "gpu", "compile", "train.micro_batch", "data", "train.log_every",
             "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints", "train.max_nonfinite_steps")
CHECKPOINT_DIR_TAG = "ddpm.checkpoint_dir"  # the run's folder under --storage, where Ray Train resumes from


# -- on every worker -------------------------------------------------------------------------------

class RankZeroTracker:
    """Metrics and sample grids of rank 0 to the run the driver created; an MLflow outage never stops training.

    What MLflow does not take is kept in memory (at most `max_values` metric values and `max_grids` grids,
    the oldest dropped first and counted in the metric `mlflow_points_dropped`) and re-sent in order, with
    its original step and timestamp, before anything newer. A value sent twice (a reply lost after the
    server stored it) is stored once: MLflow's SQL store drops exact (key, step, timestamp, value) repeats.

    Sent from the training loop, not from a background thread: the worker gets one try per request and a
    short timeout (WORKER_MLFLOW_ENV), so a dead server costs a refused connection and a hung one at most
    one timeout per log call, while order, the final flush and the tests stay simple.
    """

    def __init__(self, tracking_uri: str, run_id: str, max_values: int = 100_000, max_grids: int = 8):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri), run_id
        self.max_values, self.max_grids = max_values, max_grids
        self.dropped = 0  # points (metric values and grids) lost to a full buffer
        self._values: deque[list] = deque()  # one list of mlflow Metric per call, oldest first
        self._value_count = 0
        self._grids: deque[tuple[np.ndarray, int, int]] = deque()  # (grid, step, timestamp in ms)
        self._outage_since: float | None = None  # time.monotonic() of the first failure
        self._warned_full = False

    @property
    def pending(self) -> int:
        """Points (metric values and grids) MLflow has not taken yet."""
        return self._value_count + len(self._grids)

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        if self.dropped:
            values = {**values, "mlflow_points_dropped": self.dropped}
        now = int(time.time() * 1000)
        self._values.append([Metric(k, float(v), now, step) for k, v in values.items()])
        self._value_count += len(values)
        self._send()

    def image(self, grid: np.ndarray, step: int) -> None:
        self._grids.append((grid, step, int(time.time() * 1000)))
        self._send()

    def close(self) -> int:
        """Send what is pending (the end of training); returns how many points could not be, with one warning."""
        error = self._flush()
        if error:
            log.warning("MLflow is still unreachable at the end of training (%s): %d metric values and %d sample "
                        "grids were not logged", error, self._value_count, len(self._grids))
        return self.pending

    def _send(self) -> None:
        pending = self.pending
        error = self._flush()
        if error:
            if self._outage_since is None:
                self._outage_since = time.monotonic()
                log.warning("MLflow did not take the metrics (%s); training goes on, keeping them in memory until "
                            "it answers again", error)
            self._trim()
        elif self._outage_since is not None:
            log.info("MLflow answers again after %.0f s: sent the %d points logged meanwhile",
                     time.monotonic() - self._outage_since, pending)
            self._outage_since, self._warned_full = None, False

    def _trim(self) -> None:
        """Drop the oldest points beyond the bounds, with one warning per outage."""
        dropped = self.dropped
        while self._value_count > self.max_values:
            call = self._values.popleft()
            self._value_count -= len(call)
            self.dropped += len(call)
        while len(self._grids) > self.max_grids:
            self._grids.popleft()
            self.dropped += 1
        if self.dropped > dropped and not self._warned_full:
            log.warning("the buffer for MLflow is full (%d metric values, %d grids): dropping the oldest points, "
                        "counted in the metric mlflow_points_dropped", self.max_values, self.max_grids)
            self._warned_full = True

    def _flush(self) -> str | None:
        """Send the pending points oldest first; at the first failure stop and return its first line."""
        from mlflow.exceptions import MlflowException

        try:
            while self._values:
                count, batch = 0, []  # whole calls, merged into as few requests as MLflow allows
                for call in self._values:
                    if batch and len(batch) + len(call) > MLFLOW_BATCH_METRICS:
                        break
                    count, batch = count + 1, batch + call
                self.client.log_batch(self.run_id, metrics=batch)
                for _ in range(count):
                    self._values.popleft()
                self._value_count -= len(batch)
            while self._grids:
                grid, step, timestamp = self._grids[0]
                self.client.log_image(self.run_id, grid, key="ema_samples", step=step, timestamp=timestamp)
                self._grids.popleft()
        except Exception as error:  # noqa: BLE001 - an outage surfaces as any transport or server error
            if isinstance(error, MlflowException) and error.get_http_status_code() == 400:
                raise  # the server read the request and refused it: a bug, not an outage
            text = str(error).strip()
            return text.splitlines()[0] if text else type(error).__name__
        return None


def sample_grid(model: torch.nn.Module, diffusion: GaussianDiffusion, config: Config,
                device: torch.device) -> np.ndarray:
    """DDIM samples of `model` from fixed seeds, as one uint8 grid: the same images at every step."""
    r = config.model.resolution
    images = diffusion.ddim_sample_loop(model, (GRID_IMAGES, config.model.in_channels, r, r),
                                        steps=min(GRID_DDIM_STEPS, diffusion.num_timesteps),
                                        generators=image_generators(0, range(GRID_IMAGES), device), device=device)
    return image_grid(to_uint8(images), columns=4)


def _test_hooks(step: int, rank: int, keys: list[str], model: torch.nn.Module) -> None:
    """Environment-controlled hooks for the integration tests only: a fault, and a per-step trace.

    Called only when one of TEST_HOOKS is set, so a real run pays nothing for them.
    """
    fail_at = os.environ.get("DDPM_TEST_FAIL_AT_STEP")
    if fail_at and step == int(fail_at) and rank == int(os.environ.get("DDPM_TEST_FAIL_RANK", "0")):
        once = os.environ.get("DDPM_TEST_FAIL_ONCE")
        if not once or not Path(once).exists():
            if once:
                Path(once).touch()
            raise RuntimeError(f"test fault injected at step {step} on rank {rank}")
    trace = os.environ.get("DDPM_TEST_TRACE_DIR")
    if trace:
        weights = torch.cat([p.detach().flatten().cpu() for p in model.parameters()]).numpy().tobytes()
        with open(Path(trace) / f"rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "keys": keys, "weights": hashlib.sha256(weights).hexdigest()}) + "\n")


def resume_from(checkpoint, model, ema, optimizer) -> TrainingState:
    """Load a Ray Train checkpoint into the model, EMA and optimizer; returns its training state.

    A remote checkpoint is downloaded into a folder of this rank's own. Ray's `as_directory` shares one
    download per node and deletes it when its last reader leaves: a rank arriving at that moment fails
    with "Checkpoint directory ... does not exist" (Ray 2.60), as ranks restarted after a fault do.
    """
    import pyarrow.fs

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return load_checkpoint(checkpoint.path, model, ema, optimizer)
    with tempfile.TemporaryDirectory(prefix="ddpm-resume-") as directory:
        return load_checkpoint(checkpoint.to_directory(directory), model, ema, optimizer)


def train_loop_per_worker(loop: dict) -> dict:
    """One DDP rank: restore, then train to `train.steps`, checkpointing every `checkpoint_every`."""
    import ray.train
    import ray.train.torch

    from pipelines.ray_runtime import configure_logging

    configure_logging()  # a worker process: its progress lines reach the driver's output
    config = Config.from_dict(loop["config"])
    train = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(loop["threads_per_worker"])

    model = UNet(config.model).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    optimizer, ema = build_optimizer(model, train), build_ema(model, train)
    state = TrainingState(step=0, config=config.to_dict(), seed=train.seed)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state = resume_from(checkpoint, model, ema, optimizer)
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch,
                 state.batch_in_epoch)
    ddp = ray.train.torch.prepare_model(model)  # DDP; broadcasts rank 0's weights
    if loop["compile"]:
        ddp = torch.compile(ddp)
    loader = TrainLoader(loop["data"], train.batch_size // world, rank, world, loop["loader_workers"], train.seed,
                         train.random_flip, resolution=config.model.resolution,
                         channels=config.model.in_channels)
    tracker = RankZeroTracker(loop["tracking_uri"], loop["run_id"]) if rank == 0 else None
    try:
        step, epoch, skip = state.step, state.epoch, state.batch_in_epoch
        config_dict = config.to_dict()
        test_hooks = any(os.environ.get(name) for name in TEST_HOOKS)
        consecutive_nonfinite, window, window_start, window_first_step = 0, [], time.monotonic(), step
        # bf16 autocast where it is fast: CUDA, and CPUs with native bf16 (1.3–1.5× fp32 on the 16×16 U-Net
        # of bench/learnability.py).
        autocast = torch.bfloat16 if loop["bf16"] and bf16_is_fast(device) else None
        while step < train.steps:
            loader.set_epoch(epoch)
            for index, (images, keys) in enumerate(loader):
                if index < skip:  # the batches this epoch had consumed before the checkpoint
                    continue
                if test_hooks:
                    _test_hooks(step, rank, keys, model)
                # Every rank and step has its own seed: t, ε and dropout are reproducible across resumes.
                torch.manual_seed(image_seed(train.seed, step * world + rank))
                x0 = images.to(device, non_blocking=True)
                if cuda:
                    x0 = x0.contiguous(memory_format=torch.channels_last)
                result = train_step(ddp, diffusion, optimizer, ema, x0, step, train, autocast_dtype=autocast)
                step += 1
                state = TrainingState(step, config_dict, epoch, index + 1, train.seed,
                                      state.nonfinite_steps + (not result.applied))
                if result.applied:
                    consecutive_nonfinite = 0
                    window.append(result)
                else:
                    consecutive_nonfinite += 1
                    log.warning("rank %d step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped",
                                rank, step, result.loss, result.grad_norm)
                    if consecutive_nonfinite >= train.max_nonfinite_steps:
                        return {"stopped": f"stopped at step {step}: {consecutive_nonfinite} consecutive steps had a "
                                           f"non-finite loss or gradient (last loss {result.loss}); lower train.lr or "
                                           "check the data", "step": step}
                if tracker and window and step % train.log_every == 0:
                    elapsed = time.monotonic() - window_start
                    values = {"loss": np.mean([r.loss for r in window]),
                              "grad_norm": np.mean([r.grad_norm for r in window]), "lr": result.lr,
                              "images_per_s": (step - window_first_step) * train.batch_size / elapsed,
                              "nonfinite_steps": state.nonfinite_steps, "epoch": epoch}
                    if cuda:
                        values["gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    tracker.metrics(values, step)
                    log.info("step %d/%d: loss %.4f, %.1f images/s, about %.0f min left", step, train.steps,
                             values["loss"], values["images_per_s"],
                             (train.steps - step) * train.batch_size / values["images_per_s"] / 60)
                    window, window_start, window_first_step = [], time.monotonic(), step
                if tracker and step % train.sample_every == 0:
                    tracker.image(sample_grid(ema.model, diffusion, config, device), step)
                if step % train.checkpoint_every == 0 or step == train.steps:
                    _report_checkpoint(rank, model, ema, optimizer, state, result)
                if step >= train.steps:
                    break
            else:
                epoch, skip = epoch + 1, 0
        return {"step": step, "nonfinite_steps": state.nonfinite_steps}
    finally:
        if tracker:
            tracker.close()  # what an MLflow outage held back, also when this worker fails


def _report_checkpoint(rank: int, model, ema, optimizer, state: TrainingState, result) -> None:
    """Rank 0 writes the checkpoint; every rank reports (ray.train.report is a barrier)."""
    import ray.train

    metrics = {"step": state.step, "loss": result.loss}
    if rank != 0:
        ray.train.report(metrics)
        return
    scratch = Path(tempfile.mkdtemp(prefix="ddpm-checkpoint-"))
    try:
        directory = save_checkpoint(scratch / "checkpoint", model, ema, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_{state.step:09d}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- on the driver ---------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, default_preset: str | None = None,
                  presets: tuple[str, ...] = tuple(PRESETS)) -> None:
    parser.add_argument("--data", required=True, help="dataset root made by the sharding job (path or s3://)")
    parser.add_argument("--preset", default=default_preset, required=default_preset is None, choices=presets)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override any preset field, e.g. --set train.lr=1e-5 (repeatable)")
    parser.add_argument("--workers", type=int, default=1, help="DDP workers (default 1)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL); default CPU (gloo)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per worker")
    parser.add_argument("--loader-workers", type=int, default=2, help="data loader processes per worker")
    parser.add_argument("--storage", default="runs", help="checkpoint storage: local path or s3:// (default ./runs)")
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
    parser.add_argument("--no-bf16", dest="bf16", action="store_false",
                        help="fp32 (default: bf16 autocast on CUDA and on CPUs with native bf16)")
    parser.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")


def storage_filesystem(uri: str):
    """A pyarrow filesystem for s3:// storage that honours AWS_ENDPOINT_URL (MinIO, moto); else None."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not uri.startswith("s3://") or not endpoint:
        return None
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme=endpoint.split("://")[0],
                                   region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def run(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import configure_logging

    configure_logging()
    try:
        return _run(args)
    except (ConfigError, DatasetError, StorageError, RuntimeError, ValueError) as error:
        log.error("%s", error)
        return 2


def _run(args: argparse.Namespace) -> int:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.ray_runtime import init_ray
    from pipelines.registry import code_version, register
    from pipelines.tracking import connect, experiment_id, find_or_create_run, param_value, redact, resolve_tracking_uri

    config = get_preset(args.preset).with_overrides(args.set)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if config.train.batch_size % args.workers:
        raise ConfigError(f"the global batch {config.train.batch_size} does not split evenly over {args.workers} "
                          "workers; choose a worker count that divides it")
    data = open_storage(args.data)
    info = read_dataset_info(data)
    if info["resolution"] != config.model.resolution:
        raise DatasetError(f"dataset {args.data} holds {info['resolution']}×{info['resolution']} images but preset "
                           f"{config.preset} trains at {config.model.resolution}×{config.model.resolution}")
    storage_uri = args.storage if args.storage.startswith("s3://") else str(Path(args.storage).expanduser().resolve())
    open_storage(storage_uri).check_writable()
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(tracking_uri)

    init_ray(args.address)
    resources = {"CPU": args.cpus_per_worker, **({"GPU": 1} if args.gpu else {})}
    available = ray.cluster_resources()
    for kind, amount in resources.items():
        if available.get(kind, 0) < amount * args.workers:
            raise RuntimeError(f"cannot place {args.workers} workers needing {amount:g} {kind} each: the cluster has "
                               f"{available.get(kind, 0):g} {kind}")

    dataset_name = Path(data.uri.rstrip("/")).name
    name = args.name or f"{config.preset}-{dataset_name}"
    experiment = experiment_id(client, args.experiment or dataset_name, tracking_uri)
    params = {**config.flat(), "data": args.data, "workers": args.workers, "gpu": args.gpu, "compile": args.compile,
              "dataset_fingerprint": info["fingerprint"]}
    # --force-new gets a folder of its own: Ray Train resumes from whatever checkpoints the folder holds.
    folder = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}" if args.force_new else name
    run, resumed = find_or_create_run(client, experiment, name, params, {CHECKPOINT_DIR_TAG: folder},
                                      args.force_new)
    run_id = run.info.run_id
    if resumed:
        check_resumable(name, run.data.params, {k: param_value(v) for k, v in params.items()})
        folder = run.data.tags.get(CHECKPOINT_DIR_TAG, name)  # a run from before the tag: <name>
        client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "checkpoint_location", f"{storage_uri.rstrip('/')}/{folder}")
    log.info("%s MLflow run %s (%s) of experiment %s; checkpoints in %s/%s",
             "resuming" if resumed else "created", run_id, redact(tracking_uri), args.experiment or dataset_name,
             storage_uri, folder)

    threads = max(1, int(args.cpus_per_worker))
    loop_config = {"config": config.to_dict(), "data": args.data, "tracking_uri": tracking_uri, "run_id": run_id,
                   "loader_workers": args.loader_workers, "compile": args.compile, "bf16": args.bf16,
                   "threads_per_worker": threads}
    hooks = {k: os.environ[k] for k in TEST_HOOKS if k in os.environ}
    filesystem = storage_filesystem(storage_uri)
    # With an explicit pyarrow filesystem Ray wants "bucket/prefix", not "s3://bucket/prefix".
    storage_path = storage_uri[len("s3://"):] if filesystem is not None else storage_uri
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if args.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=args.gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=folder, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=args.max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), **WORKER_MLFLOW_ENV, **hooks}},
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        client.set_terminated(run_id, "FAILED")
        cause = [line.strip() for line in str(error).splitlines() if line.strip()]
        again = "the same command" + (" without --force-new" if args.force_new else "")
        raise RuntimeError(f"training failed ({cause[-1] if cause else type(error).__name__}); re-run {again} "
                           f"(--name {name}) to resume from the last checkpoint") from None
    outcome = result.return_value or {}
    if "stopped" in outcome:
        client.set_terminated(run_id, "FAILED")
        raise RuntimeError(outcome["stopped"])
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / "state.json").read_text())
        client.set_tag(run_id, "checkpoint", result.checkpoint.path)
        version = register(client, run_id, Path(directory), config, {
            "dataset_fingerprint": info["fingerprint"], "steps": state["step"], "code_version": code_version(),
            "run_id": run_id, "checkpoint": result.checkpoint.path})
    log.info("done: step %d, %d non-finite steps skipped; checkpoint %s; registered ddpm-%s version %s "
             "(alias candidate); MLflow run %s", state["step"], state["nonfinite_steps"], result.checkpoint.path,
             config.preset, version, run_id)
    return 0


def check_resumable(name: str, started: dict[str, str], now: dict[str, str]) -> None:
    """Refuse to resume run `name` if the params it was started with differ from `now` outside RESUMABLE.

    A config field the run has no param for (it was started before the field existed) counts as its default.
    """
    from pipelines.tracking import param_value

    started = {**{k: param_value(v) for k, v in Config.field_defaults().items()}, **started}
    differ = sorted(k for k in started.keys() | now.keys() if k not in RESUMABLE and started.get(k) != now.get(k))
    if differ:
        def settings(params: dict[str, str]) -> str:
            return " and ".join(f"{k}={params.get(k, '(unset)')}" for k in differ)

        raise ConfigError(f"run {name!r} was started with {settings(started)}; this command has {settings(now)}; "
                          "use the same settings to resume, or --force-new to start over")
    changed = [f"{k}={now[k]} (was {started[k]})" for k in RESUMABLE if k in started and started[k] != now.get(k)]
    if changed:
        log.info("resuming run %r with %s", name, ", ".join(changed))


def main(argv: list[str] | None = None, default_preset: str | None = None,
         presets: tuple[str, ...] = tuple(PRESETS)) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser, default_preset, presets)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
