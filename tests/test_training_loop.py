"""The training loop as a library object: resume equals an uninterrupted run, hook cadence, non-finite stop."""

import logging

import numpy as np
import pytest
import torch

from ddpm_core.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.loader import TrainLoader
from ddpm_core.presets import get_preset
from ddpm_core.training import GRID_IMAGES, TrainingHooks, TrainingLoop, build_ema, build_optimizer, sample_grid
from ddpm_core.unet import UNet
from tests.test_loader import make_dataset

# Batches of 8 from the 60 images: 7 per epoch, so 10 steps cross an epoch boundary.
CONFIG = get_preset("tiny").with_overrides(["train.batch_size=8", "train.steps=10", "train.warmup_steps=2",
                                            "train.checkpoint_every=4", "train.log_every=3", "train.sample_every=5"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("training-loop")
    make_dataset(root, str(root / "data"))
    return str(root / "data")


def new_loop(config=CONFIG, init_seed=0) -> TrainingLoop:
    torch.manual_seed(init_seed)
    model = UNet(config.model)
    optimizer, ema = build_optimizer(model, config.train), build_ema(model, config.train)
    return TrainingLoop(model, GaussianDiffusion.from_config(config.diffusion), optimizer, ema, config, "cpu")


def new_loader(data, config=CONFIG) -> TrainLoader:
    return TrainLoader(data, config.train.batch_size, num_workers=0, seed=config.train.seed,
                       random_flip=config.train.random_flip, resolution=config.model.resolution)


def fresh_state(config=CONFIG) -> TrainingState:
    return TrainingState(step=0, config=config.to_dict(), seed=config.train.seed)


def tensors(loop: TrainingLoop) -> dict[str, torch.Tensor]:
    """Every tensor a run changes: weights, EMA weights and Adam's state."""
    found = {f"model.{k}": v for k, v in loop.model.state_dict().items()}
    found |= {f"ema.{k}": v for k, v in loop.ema.model.state_dict().items()}
    for index, values in loop.optimizer.state_dict()["state"].items():
        found |= {f"adam.{index}.{k}": v for k, v in values.items()}
    return found


def assert_same_tensors(a: TrainingLoop, b: TrainingLoop) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


def recorder(keys: list[list[str]]):
    return lambda step, batch_keys, model: keys.append(batch_keys)


def test_stopping_at_a_step_and_resuming_from_its_checkpoint_equals_an_uninterrupted_run(data, tmp_path):
    steps, stop = CONFIG.train.steps, 6  # mid-epoch; not a multiple of checkpoint_every
    assert len(new_loader(data)) < steps

    whole, whole_keys = new_loop(), []
    result = whole.run(new_loader(data), fresh_state(), TrainingHooks(on_batch=recorder(whole_keys)))
    assert (result.step, result.nonfinite_steps, result.stopped) == (steps, 0, None)

    first, keys, saved = new_loop(), [], []

    def save(state, step_result):
        saved.append(state.step)
        save_checkpoint(tmp_path / f"step{state.step}", first.model, first.ema, first.optimizer, state)

    result = first.run(new_loader(data), fresh_state(), TrainingHooks(on_batch=recorder(keys), on_checkpoint=save),
                       stop_at=stop)
    assert result.step == stop and saved == [4, stop]

    resumed = new_loop(init_seed=1)  # other initial weights: everything must come from the checkpoint
    state = load_checkpoint(tmp_path / f"step{stop}", resumed.model, resumed.ema, resumed.optimizer)
    assert (state.step, state.epoch, state.batch_in_epoch) == (stop, 0, stop)
    result = resumed.run(new_loader(data), state, TrainingHooks(on_batch=recorder(keys)))
    assert result.step == steps
    assert keys == whole_keys and len(keys) == steps
    assert_same_tensors(resumed, whole)


class CountingLoader:
    """A TrainLoader that counts how often an epoch's reading starts."""

    def __init__(self, loader: TrainLoader):
        self.loader, self.iterations = loader, 0

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        self.iterations += 1
        return iter(self.loader)


def test_runs_of_one_step_each_continue_one_another_as_one_run(data):
    """The bench's round-robin use: each run() goes on with the batches where the last one stopped."""
    whole, whole_keys = new_loop(), []
    whole.run(new_loader(data), fresh_state(), TrainingHooks(on_batch=recorder(whole_keys)))

    stepwise, keys, states, faults = new_loop(), [], [fresh_state()], [3]

    def on_batch(step, batch_keys, model):
        if step in faults:  # once: the batch taken for a step that fails must not be lost to the next run
            faults.remove(step)
            raise RuntimeError("fault")
        keys.append(batch_keys)

    loader = CountingLoader(new_loader(data))
    hooks = TrainingHooks(on_batch=on_batch, on_checkpoint=lambda state, result: states.append(state))
    for step in range(CONFIG.train.steps):
        if step == 3:
            with pytest.raises(RuntimeError, match="fault"):
                stepwise.run(loader, states[-1], hooks, stop_at=step + 1)
        assert stepwise.run(loader, states[-1], hooks, stop_at=step + 1).step == step + 1
    assert [s.step for s in states] == list(range(CONFIG.train.steps + 1))
    assert keys == whole_keys
    # Epochs 0 and 1 read once each, and epoch 0 again after the fault: nothing re-read to skip batches.
    assert loader.iterations == 3
    assert_same_tensors(stepwise, whole)


def test_hooks_come_at_the_multiples_asked_and_checkpoints_also_at_the_last_step(data, caplog):
    caplog.set_level(logging.INFO, logger="ddpm.train")
    loop, calls = new_loop(), {"batch": [], "metrics": [], "grid": [], "checkpoint": []}
    hooks = TrainingHooks(
        on_batch=lambda step, keys, model: calls["batch"].append((step, len(keys), model)),
        on_metrics=lambda values, step: calls["metrics"].append((step, values)),
        on_grid=lambda grid, step: calls["grid"].append((step, grid)),
        on_checkpoint=lambda state, result: calls["checkpoint"].append((state, result)))
    assert loop.run(new_loader(data), fresh_state(), hooks).step == 10

    assert calls["batch"] == [(step, 8, loop.model) for step in range(10)]
    assert [step for step, _ in calls["metrics"]] == [3, 6, 9]
    for _, values in calls["metrics"]:
        assert set(values) == {"loss", "grad_norm", "lr", "images_per_s", "nonfinite_steps", "epoch"}  # no CUDA
        assert 0 < values["loss"] < 10 and values["grad_norm"] > 0 and values["images_per_s"] > 0
        assert values["lr"] == CONFIG.train.lr and values["nonfinite_steps"] == 0
    assert [values["epoch"] for _, values in calls["metrics"]] == [0, 0, 1]  # step 9 read epoch 1's 2nd batch
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split(":")[0] for line in progress] == ["step 3/10", "step 6/10", "step 9/10"]
    assert all("images/s, about" in line for line in progress)

    assert [step for step, _ in calls["grid"]] == [5, 10]
    side = 4 * (16 + 2) + 2  # GRID_IMAGES in 4 columns of 16×16 images with 2-pixel borders
    assert GRID_IMAGES == 16
    for _, grid in calls["grid"]:
        assert grid.shape == (side, side, 3) and grid.dtype == np.uint8
    # The grid is of the EMA model: at the last step, what that model samples now.
    assert np.array_equal(calls["grid"][-1][1], sample_grid(loop.ema.model, loop.diffusion, CONFIG, loop.device))

    assert [state.step for state, _ in calls["checkpoint"]] == [4, 8, 10]
    assert [(s.epoch, s.batch_in_epoch) for s, _ in calls["checkpoint"]] == [(0, 4), (1, 1), (1, 3)]
    assert all(result.applied for _, result in calls["checkpoint"])


def test_consecutive_non_finite_steps_stop_the_loop_with_a_message_naming_the_step(data, caplog):
    config = CONFIG.with_overrides(["train.max_nonfinite_steps=3", "train.steps=20"])
    loop, checkpoints = new_loop(config), []
    weight, kept = loop.model.conv_out.weight, []

    def poison(step, keys, model):
        # One isolated non-finite step (index 1), then non-finite from index 4 on.
        if step == 1:
            kept.append(weight.detach().clone())
        if step == 1 or step >= 4:
            weight.data.fill_(float("nan"))
        elif step == 2:
            weight.data.copy_(kept[0])

    result = loop.run(new_loader(data, config), fresh_state(config),
                      TrainingHooks(on_batch=poison, on_checkpoint=lambda s, r: checkpoints.append(s.step)))
    assert (result.step, result.nonfinite_steps) == (7, 4)
    assert result.stopped == ("stopped at step 7: 3 consecutive steps had a non-finite loss or gradient (last loss "
                              "nan); lower train.lr or check the data")
    assert checkpoints == [4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "ddpm.train"]
    assert [w.split(":")[0] for w in warnings] == ["rank 0 step 2", "rank 0 step 5", "rank 0 step 6",
                                                   "rank 0 step 7"]
    assert all("non-finite loss or gradient" in w and w.endswith("step skipped") for w in warnings)
