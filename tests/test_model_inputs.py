"""Model folders, checkpoints and diffusers folders as untrusted input: every file checked before anything is
built from it, each bad one a single error line naming it (issue 25)."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm_core import checkpoint
from ddpm_core.checkpoint import (
    CheckpointError,
    TrainingState,
    read_state,
    save_model_folder,
    seal_model_folder,
    verify_model_folder,
)
from ddpm_core.diffusers_bridge import BridgeError, export_folder, import_folder
from ddpm_core.presets import get_preset
from ddpm_core.storage import open_storage
from ddpm_core.unet import UNet
from pipelines.cli import main as ddpm
from tests.errors import expect_one_error
from tests.models import tiny_checkpoint


@pytest.fixture
def folder(tmp_path) -> Path:
    """A model folder of the tiny preset, as `ddpm convert import --out` writes one."""
    config = get_preset("tiny")
    torch.manual_seed(0)
    return save_model_folder(tmp_path / "model", UNet(config.model), config)


def export(tmp_path, model: Path) -> list[str]:
    return ["convert", "export", "--model", str(model), "--out", str(tmp_path / "exported")]


def edit_json(file: Path, change) -> None:
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if a U-Net is built from a model folder or checkpoint."""
    def refuse(config):
        raise AssertionError(f"a U-Net was built for {config}")

    monkeypatch.setattr(checkpoint, "UNet", refuse)


def test_the_seal_covers_config_json_and_a_changed_config_is_refused(tmp_path, folder, caplog, nothing_built):
    lines = (folder / "ema.safetensors.sha256").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["ema.safetensors", "config.json"]  # `sha256sum -c` reads it
    edit_json(folder / "config.json", lambda c: c["model"].update(ch=1_000_000_000))
    expect_one_error(caplog, ddpm, export(tmp_path, folder),
                     f"model folder {folder}: config.json has sha256 ")
    (folder / "ema.safetensors.sha256").write_text(lines[0] + "\n")  # a seal of the weights only
    with pytest.raises(CheckpointError, match="records no sha256 of config.json"):
        verify_model_folder(folder)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["model"].update(ch=1_000_000_000), "config.json: model.ch=1000000000, ch_mult=(1, 2), "
                                                   "num_res_blocks=1 make a U-Net of about 4.5e+20 parameters, over "
                                                   "the limit of 2e+09"),
    (lambda c: c["model"].update(ch="128"), "config.json: model.ch must be an integer, got '128'"),
    (lambda c: c["model"].update(ch_mult=[1, 2.5]), "config.json: model.ch_mult must be a list of integers"),
    (lambda c: c["diffusion"].update(timesteps=10**9), "config.json: diffusion.timesteps must be in 1..100000"),
    (lambda c: c["train"].update(random_flip="no"), "config.json: train.random_flip must be true or false, got 'no'"),
    (lambda c: c.pop("model"), "config.json: config lacks ['model']"),
])
def test_a_sealed_config_out_of_type_or_size_is_one_line_and_builds_nothing(tmp_path, folder, caplog, nothing_built,
                                                                           change, message):
    edit_json(folder / "config.json", change)
    seal_model_folder(folder)  # written so, not tampered with: the check is of the values
    expect_one_error(caplog, ddpm, export(tmp_path, folder), message)


def test_a_config_json_that_is_not_json_is_one_line(tmp_path, folder, caplog, nothing_built):
    (folder / "config.json").write_text('{"preset": "tiny", ')
    seal_model_folder(folder)
    expect_one_error(caplog, ddpm, export(tmp_path, folder), f"{folder / 'config.json'} is not readable JSON")


def test_truncated_weights_are_one_line_naming_the_file(tmp_path, folder, caplog):
    (folder / "ema.safetensors").write_bytes((folder / "ema.safetensors").read_bytes()[:-100])
    seal_model_folder(folder)
    expect_one_error(caplog, ddpm, export(tmp_path, folder),
                     f"{folder / 'ema.safetensors'} is not a readable safetensors file")
    ckpt = tiny_checkpoint(tmp_path / "checkpoint")
    (ckpt / "ema.safetensors").write_bytes((ckpt / "ema.safetensors").read_bytes()[:1000])
    expect_one_error(caplog, ddpm, export(tmp_path, ckpt), f"{ckpt / 'ema.safetensors'} is not a readable safetensors")


@pytest.mark.parametrize("text, message", [
    ("{not json", "state.json is not readable JSON"),
    ("[1, 2]", "state.json holds list, not a JSON object"),
    ('{"step": "8", "config": {}}', 'state.json is not a training state: step is "8", not a non-negative int'),
    ('{"step": 8}', "state.json is not a training state: no config"),
    ('{"step": 8, "config": {}, "rng": 1}', "state.json is not a training state: unknown field rng"),
])
def test_a_bad_state_json_is_one_line_naming_it(tmp_path, caplog, text, message):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint")
    (ckpt / "state.json").write_text(text)
    with pytest.raises(CheckpointError, match=message):
        read_state(ckpt)
    expect_one_error(caplog, ddpm, export(tmp_path, ckpt), message)


def test_the_config_in_a_state_json_is_checked_too(tmp_path, caplog, nothing_built):
    ckpt = tiny_checkpoint(tmp_path / "checkpoint")
    edit_json(ckpt / "state.json", lambda s: s["config"]["model"].update(num_res_blocks=True))
    expect_one_error(caplog, ddpm, export(tmp_path, ckpt),
                     f"{ckpt / 'state.json'}: model.num_res_blocks must be an integer, got True")


def test_the_newest_checkpoint_of_a_run_folder_records_its_dataset(tmp_path):
    from ddpm_core.checkpoint import latest_state

    runs = open_storage(tmp_path / "run")
    assert latest_state(runs) is None
    for step in (8, 16):
        tiny_checkpoint(tmp_path / "run" / f"checkpoint_{step:09d}", step=step)
    (tmp_path / "run" / "checkpoint_000000016.partial").mkdir()
    url, state = latest_state(runs)
    assert url == f"{tmp_path / 'run' / 'checkpoint_000000016' / 'state.json'}" and state.step == 16
    assert state.dataset_fingerprint == ""  # a checkpoint from before the field
    edit_json(tmp_path / "run" / "checkpoint_000000016" / "state.json", lambda s: s.update(dataset_fingerprint=7))
    with pytest.raises(CheckpointError, match="dataset_fingerprint is 7, not a str"):
        latest_state(runs)
    assert TrainingState(step=1, config={}, dataset_fingerprint="abc").dataset_fingerprint == "abc"


def test_an_invalid_registered_model_name_is_one_line(tmp_path, folder, caplog):
    edit_json(folder / "config.json", lambda c: c.update(preset="lsun/bedroom"))
    seal_model_folder(folder)
    expect_one_error(caplog, ddpm, ["convert", "register", "--model", str(folder), "--tracking-uri",
                                    f"sqlite:///{tmp_path / 'mlflow.db'}"],
                     "config.json: preset 'lsun/bedroom' is not a name: up to 100 letters, digits")


def test_registering_the_same_run_and_weights_again_returns_the_version_it_made(tmp_path, folder):
    from pipelines.mlflow_registry import register
    from pipelines.mlflow_tracking import connect, import_run

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client, config = connect(tracking), get_preset("tiny")
    run_id = import_run(client, tracking, "tiny", {})
    first = register(client, run_id, folder, config, {"steps": 7})
    client.set_registered_model_alias("ddpm-tiny", "candidate", first)
    again = register(client, run_id, folder, config, {"steps": 7})  # a re-run: the same run and files
    assert again == first and len(client.search_model_versions("name = 'ddpm-tiny'")) == 1
    other = import_run(client, tracking, "tiny", {})
    assert register(client, other, folder, config, {}) != first  # another run registers its own version
    torch.manual_seed(1)
    save_model_folder(folder, UNet(config.model), config)
    assert register(client, run_id, folder, config, {}) not in (first, again)  # other weights: a new version
    assert len(client.search_model_versions("name = 'ddpm-tiny'")) == 3


# -- diffusers folders ------------------------------------------------------------------------------

@pytest.fixture
def pipeline(tmp_path) -> Path:
    """A DDPMPipeline folder (unet/, scheduler/) of the tiny preset, as `ddpm convert export` writes one."""
    config = get_preset("tiny")
    torch.manual_seed(0)
    return export_folder(UNet(config.model), config, tmp_path / "pipeline")


def test_the_scheduler_forward_process_and_clipping_are_imported(pipeline, caplog):
    edit_json(pipeline / "scheduler" / "scheduler_config.json",
              lambda s: s.update(num_train_timesteps=4000, beta_start=5e-5, beta_end=0.01, clip_sample=False,
                                 timestep_spacing="trailing", steps_offset=1, _diffusers_version="0.30.0"))
    caplog.set_level(logging.WARNING)
    _, config = import_folder(pipeline)
    d = config.diffusion
    assert (d.timesteps, d.beta_start, d.beta_end, d.clip_denoised, d.variance) == (4000, 5e-5, 0.01, False,
                                                                                   "fixedlarge")
    assert config.preset == "tiny" and "imported with its scheduler's" in caplog.text
    assert get_preset("tiny").diffusion.timesteps == 1000  # the preset itself is unchanged


@pytest.mark.parametrize("change, message", [
    (dict(prediction_type="v_prediction"), 'prediction_type="v_prediction" is not the paper\'s diffusion, which has '
                                           'prediction_type="epsilon"'),
    (dict(beta_schedule="squaredcos_cap_v2"), 'beta_schedule="squaredcos_cap_v2" is not the paper\'s diffusion'),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas=[0.1, 0.2] is not the paper's diffusion"),
    (dict(thresholding=True), "thresholding=true is not the paper's diffusion"),
    (dict(variance_type="learned_range"), 'variance_type="learned_range" is not the paper\'s diffusion, which has '
                                          "fixed_large or fixed_small"),
    (dict(clip_sample_range=2.0), "clip_sample_range=2.0 is not the paper's sampler"),
    (dict(use_karras_sigmas=True), "unknown fields ['use_karras_sigmas']"),
    (dict(num_train_timesteps="1000"), "num_train_timesteps must be an integer, got '1000'"),
    (dict(beta_start=0.5, beta_end=0.1), "diffusion betas need 0 < beta_start <= beta_end < 1"),
])
def test_a_scheduler_the_paper_cannot_represent_is_refused_naming_the_field(tmp_path, pipeline, caplog, change,
                                                                             message):
    edit_json(pipeline / "scheduler" / "scheduler_config.json", lambda s: s.update(change))
    with pytest.raises(BridgeError, match="scheduler_config.json: "):
        import_folder(pipeline)
    expect_one_error(caplog, ddpm, ["convert", "import", "--folder", str(pipeline), "--out", str(tmp_path / "m")],
                     message)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("file, change, message", [
    ("unet/config.json", lambda c: c.pop("block_out_channels"), "its config.json lacks ['block_out_channels']"),
    ("unet/config.json", lambda c: c.update(sample_size=[16, 16]), "sample_size must be an integer, got [16, 16]"),
    ("unet/config.json", lambda c: c.update(block_out_channels=[0, 0]), "block_out_channels [0, 0] are not positive"),
    ("unet/config.json", lambda c: c.update(block_out_channels=[32, 64, 64]), "one per down block (2)"),
    ("unet/config.json", lambda c: c.update(layers_per_block="1"), "layers_per_block must be an integer"),
    ("unet/config.json", lambda c: c.update(block_out_channels=[2**30, 2**31]), "over the limit of 2e+09"),
])
def test_a_malformed_diffusers_folder_is_one_line(tmp_path, pipeline, caplog, file, change, message):
    edit_json(pipeline / file, change)
    expect_one_error(caplog, ddpm, ["convert", "import", "--folder", str(pipeline)], message)


def test_unreadable_diffusers_files_are_one_line(tmp_path, pipeline, caplog):
    scheduler = pipeline / "scheduler" / "scheduler_config.json"
    scheduler.write_text("{")
    expect_one_error(caplog, ddpm, ["convert", "import", "--folder", str(pipeline)],
                     f"{scheduler} is not readable JSON")
    scheduler.unlink()
    weights = pipeline / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "conv_out.bias": torch.zeros(6)}, weights)
    expect_one_error(caplog, ddpm, ["convert", "import", "--folder", str(pipeline)],
                     "unet: its weights do not fit its config.json: ")
    save_file(tensors, weights)
    weights.write_bytes(weights.read_bytes()[:-64])
    expect_one_error(caplog, ddpm, ["convert", "import", "--folder", str(pipeline)],
                     f"{weights} is not a readable safetensors file")
    (pipeline / "unet" / "config.json").write_text("[]")
    expect_one_error(caplog, ddpm, ["convert", "import", "--folder", str(pipeline)], "holds list, not a JSON object")
