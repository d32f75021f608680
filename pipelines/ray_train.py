"""Ray Train for the training job: the DDP worker (an adapter of ddpm_core's TrainingLoop) and its trainer.

Each rank builds the model, restores Ray Train's latest checkpoint, wraps the model in DDP and runs the
library loop; rank 0 sends metrics, sample grids, its machine's system metrics and (with `train.fid_every`) a
cheap FID of the EMA model to MLflow, every rank reports checkpoints (a barrier).

Ray Train restarts a failed worker group up to `max_failures` times, whatever the error. One a user must fix
(a shard whose bytes are not the manifest's) would fail the same way each time, so the failing rank first
writes it to a stop record beside the checkpoints: the restarted ranks find it and stop at once, and the
driver reports it as one line. (A rank cannot simply return: its peers would wait for it in DDP's all-reduce.)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow.fs
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer

from ddpm_core.checkpoint import TrainingState, checkpoint_name, load_checkpoint, read_state, save_checkpoint
from ddpm_core.config import Config
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.errors import UserError, first_line
from ddpm_core.loader import TrainLoader
from ddpm_core.sampling import bf16_is_fast
from ddpm_core.storage import open_storage, storage_filesystem
from ddpm_core.training import StepResult, TrainingHooks, TrainingLoop, build_ema, build_optimizer
from ddpm_core.unet import UNet
from pipelines.job_runner import configure_logging
from pipelines.mlflow_tracking import WORKER_MLFLOW_ENV, RankZeroTracker
from pipelines.training_quality import QualityProbe

log = logging.getLogger("ddpm.train")
TEST_HOOKS = ("DDPM_TEST_FAIL_AT_STEP", "DDPM_TEST_FAIL_RANK", "DDPM_TEST_FAIL_ONCE", "DDPM_TEST_TRACE_DIR")


class TrainingFailed(UserError):
    """Training that ended without a model: a worker group that failed past its restarts, or a stop."""


# -- on every worker -------------------------------------------------------------------------------

def train_loop_per_worker(loop: dict) -> dict:
    """One DDP rank: stop on an earlier attempt's user error, else train (`_train`), recording a user error."""
    configure_logging()  # a worker process: its progress lines reach the driver's output
    rank = ray.train.get_context().get_world_rank()
    stop = StopRecord(*loop["stop_record"])
    if message := stop.read():
        log.info("rank %d not restarted: an earlier attempt stopped on an input to fix", rank)
        return {"stopped": message}
    try:
        return _train(loop, rank)
    except UserError as error:
        stop.write(f"rank {rank} stopped: {_message_of(error)}")
        raise


def _message_of(error: UserError) -> str:
    """The one-line message; from a DataLoader worker, torch re-raises the type with the worker's traceback as
    its message ("Caught DatasetError in DataLoader worker process 0. ... DatasetError: <message>")."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Caught ") and ": " in lines[-1]:
        return lines[-1].split(": ", 1)[1]
    return first_line(error)


def _train(loop: dict, rank: int) -> dict:
    """Restore, then train to `train.steps` with ddpm_core's TrainingLoop."""
    config = Config.from_dict(loop["config"])
    world = ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.train.seed)  # the initial weights of a run are its seed's (DDP then broadcasts rank 0's)
    if device.type == "cuda":
        model = UNet(config.model).to(device, memory_format=torch.channels_last)
    else:
        torch.set_num_threads(loop["threads_per_worker"])
        model = UNet(config.model)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    optimizer, ema = build_optimizer(model, config.train), build_ema(model, config.train)
    state = TrainingState(step=0, config=config.to_dict(), seed=config.train.seed,
                          dataset_fingerprint=loop["dataset_fingerprint"])
    if checkpoint := ray.train.get_checkpoint():  # of this dataset: the driver checked (pipelines/train.py)
        state = replace(resume_from(checkpoint, model, ema, optimizer), dataset_fingerprint=loop["dataset_fingerprint"])
        log.info("rank %d resumed at step %d (epoch %d, batch %d)", rank, state.step, state.epoch,
                 state.batch_in_epoch)
    ddp = ray.train.torch.prepare_model(model)  # DDP; broadcasts rank 0's weights
    loader = TrainLoader(loop["data"], config.train.batch_size // world, rank, world, loop["loader_workers"],
                         config.train.seed, config.train.random_flip, resolution=config.model.resolution,
                         channels=config.model.in_channels)
    tracker = RankZeroTracker(loop["tracking_uri"], loop["run_id"]) if rank == 0 else None
    probe = QualityProbe(loop["fid_reference"], config, device) if tracker and config.train.fid_every else None
    hooks = TrainingHooks(
        on_batch=functools.partial(_test_hooks, rank=rank) if any(os.environ.get(k) for k in TEST_HOOKS) else None,
        on_metrics=tracker.metrics if tracker else None, on_grid=tracker.image if tracker else None,
        on_checkpoint=functools.partial(_report_checkpoint, rank, model, ema, optimizer),
        on_ema=(lambda ema_model, step: tracker.metrics(probe(ema_model, step), step)) if probe else None)
    # bf16 autocast where it is fast: CUDA, and CPUs with native bf16 (bench/learnability.py).
    autocast = torch.bfloat16 if loop["bf16"] and bf16_is_fast(device) else None
    training = TrainingLoop(model, diffusion, optimizer, ema, config, device, rank=rank, world=world,
                            autocast_dtype=autocast, ddp_model=torch.compile(ddp) if loop["compile"] else ddp)
    system = tracker.system_metrics() if tracker else contextlib.nullcontext()
    try:
        with system:
            return asdict(training.run(loader, state, hooks))
    finally:
        if tracker:
            tracker.close()  # what an MLflow outage held back, also when this worker fails


def resume_from(checkpoint, model, ema, optimizer) -> TrainingState:
    """Load a Ray Train checkpoint into the model, EMA and optimizer; returns its training state.

    A remote checkpoint is downloaded into a folder of this rank's own. Ray's `as_directory` shares one
    download per node and deletes it when its last reader leaves: a rank arriving at that moment fails
    with "Checkpoint directory ... does not exist" (Ray 2.60), as ranks restarted after a fault do.
    """
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return load_checkpoint(checkpoint.path, model, ema, optimizer)
    with tempfile.TemporaryDirectory(prefix="ddpm-resume-") as directory:
        return load_checkpoint(checkpoint.to_directory(directory), model, ema, optimizer)


def _report_checkpoint(rank: int, model, ema, optimizer, state: TrainingState, result: StepResult) -> None:
    """Rank 0 writes the checkpoint; every rank reports (ray.train.report is a barrier)."""
    metrics = {"step": state.step, "loss": result.loss}
    if rank != 0:
        ray.train.report(metrics)
        return
    scratch = Path(tempfile.mkdtemp(prefix="ddpm-checkpoint-"))
    try:
        directory = save_checkpoint(scratch / "checkpoint", model, ema, optimizer, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=checkpoint_name(state.step))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _test_hooks(step: int, keys: list[str], model: torch.nn.Module, rank: int) -> None:
    """Environment-controlled hooks for the integration tests only: a fault, and a per-step trace.

    Installed only when one of TEST_HOOKS is set, so a real run pays nothing for them.
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


@dataclass(frozen=True)
class StopRecord:
    """`<storage_uri>/<name>`: the one-line user error that stopped a training attempt, for its restarts."""

    storage_uri: str
    name: str

    def read(self) -> str | None:
        storage = open_storage(self.storage_uri)
        return json.loads(storage.read_bytes(self.name))["message"] if storage.exists(self.name) else None

    def write(self, message: str) -> None:
        open_storage(self.storage_uri).create_exclusive(self.name, json.dumps({"message": message}).encode())

    def clear(self) -> None:
        open_storage(self.storage_uri).delete(self.name)


# -- on the driver ---------------------------------------------------------------------------------

@dataclass
class FinishedTraining:
    step: int
    nonfinite_steps: int
    checkpoint_uri: str  # the final checkpoint where Ray Train keeps it
    directory: Path  # a local copy of it, while the `fit` context lasts


@contextlib.contextmanager
def fit(loop_config: dict, *, workers: int, gpu: bool, cpus_per_worker: float, storage_uri: str, folder: str,
        keep_checkpoints: int, max_failures: int, resume_hint: str) -> Iterator[FinishedTraining]:
    """Train with `workers` DDP ranks, checkpoints in `<storage_uri>/<folder>` (where a re-run resumes);
    yields the final checkpoint. TrainingFailed, with `resume_hint`, when the ranks fail past `max_failures`."""
    threads = loop_config["threads_per_worker"]
    hooks = {k: os.environ[k] for k in TEST_HOOKS if k in os.environ}
    filesystem = storage_filesystem(storage_uri)
    stop = StopRecord(storage_uri, f"{folder}.stopped.json")  # beside Ray Train's folder, not in it
    stop.clear()  # a re-run tries again
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "stop_record": (stop.storage_uri, stop.name)},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu,
                                     resources_per_worker=worker_resources(cpus_per_worker, gpu)),
        run_config=RunConfig(
            # With an explicit pyarrow filesystem Ray wants "bucket/prefix", not "s3://bucket/prefix".
            name=folder, storage_path=storage_uri.removeprefix("s3://") if filesystem else storage_uri,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures),
            worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), **WORKER_MLFLOW_ENV, **hooks}},
        ),
    )
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        if message := stop.read():  # --max-failures 0: no restart read it
            raise TrainingFailed(f"{message}; then {resume_hint}") from None
        cause = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise TrainingFailed(f"training failed ({cause[-1] if cause else type(error).__name__}); "
                             f"{resume_hint}") from None
    outcome = result.return_value or {}
    if outcome.get("stopped"):  # too many non-finite steps, or an earlier attempt's user error
        raise TrainingFailed(outcome["stopped"] + (f"; then {resume_hint}" if stop.read() else ""))
    if result.checkpoint is None:
        raise TrainingFailed("training ended without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = read_state(directory)
        yield FinishedTraining(state.step, state.nonfinite_steps, result.checkpoint.path, Path(directory))


def worker_resources(cpus_per_worker: float, gpu: bool) -> dict[str, float]:
    return {"CPU": cpus_per_worker, **({"GPU": 1} if gpu else {})}
