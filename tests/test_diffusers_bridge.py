"""The diffusers bridge, against diffusers itself (an optional dependency, installed for the tests)."""

import json
import logging

import numpy as np
import pytest
import torch

from ddpm_core.diffusers_bridge import BridgeError, diffusers_config, export_folder, import_folder, matching_preset
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.presets import get_preset
from ddpm_core.unet import UNet

diffusers = pytest.importorskip("diffusers")


def random_diffusers_unet(preset="cifar10", seed=0):
    torch.manual_seed(seed)
    config = {k: v for k, v in diffusers_config(get_preset(preset).model).items() if k != "_class_name"}
    unet = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():  # every tensor random, so a mis-mapped one cannot hide behind a zero
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet


def test_a_diffusers_unet_imports_strictly_and_computes_the_same_function(tmp_path):
    theirs = random_diffusers_unet()
    theirs.save_pretrained(tmp_path / "unet")
    ours, config = import_folder(tmp_path / "unet")
    assert config.preset == "cifar10"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 777])
    with torch.no_grad():
        expected = theirs(x, t).sample
        got = ours(x, t)
    assert (got - expected).abs().max().item() <= 1e-5


def test_export_then_import_round_trips_and_ddpm_pipeline_loads_it(tmp_path):
    config = get_preset("tiny")
    torch.manual_seed(2)
    model = UNet(config.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    export_folder(model, config, tmp_path / "pipe")
    back, back_config = import_folder(tmp_path / "pipe")
    assert back_config.preset == "tiny" and back_config.diffusion.variance == "fixedlarge"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert pipeline.scheduler.config.variance_type == "fixed_large"
    images = pipeline(batch_size=1, num_inference_steps=3, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("variance, theirs", [("fixedlarge", "fixed_large"), ("fixedsmall", "fixed_small")])
def test_our_ancestral_step_equals_ddpm_scheduler_step(variance, theirs, monkeypatch):
    import diffusers.schedulers.scheduling_ddpm as ddpm

    diffusion = GaussianDiffusion.from_config(get_preset("cifar10").diffusion.__class__(variance=variance))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                        beta_end=0.02, variance_type=theirs, clip_sample=True)
    scheduler.set_timesteps(1000)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(ddpm, "randn_tensor", lambda shape, **kwargs: noise.clone())  # the same z for both
    for step in (999, 500, 10, 1):
        t = torch.full((2,), step)
        out = diffusion.p_mean_variance(lambda x_, t_: eps, x, t)
        ours = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
        expected = scheduler.step(eps, step, x).prev_sample
        # diffusers keeps its coefficients in float32, ours are float64 (as the official code) then cast.
        assert (ours - expected).abs().max().item() < 2e-4, step


def test_unfaithful_configs_are_refused(tmp_path):
    theirs = random_diffusers_unet()
    theirs.save_pretrained(tmp_path / "unet")
    data = json.loads((tmp_path / "unet" / "config.json").read_text())
    data["freq_shift"] = 0
    (tmp_path / "unet" / "config.json").write_text(json.dumps(data))
    with pytest.raises(BridgeError, match=r"is not a DDPM U-Net: \{'freq_shift': 0\}"):
        import_folder(tmp_path / "unet")
    with pytest.raises(BridgeError, match="is not a diffusers folder"):
        import_folder(tmp_path / "nothing")


def test_convert_import_registers_once_and_export_round_trips(tmp_path, caplog):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main as ddpm
    from pipelines.mlflow_tracking import IMPORT_EXPERIMENT

    theirs = random_diffusers_unet("tiny", seed=5)
    theirs.save_pretrained(tmp_path / "unet")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register = ["convert", "import", "--folder", str(tmp_path / "unet"), "--register", "--tracking-uri", tracking]
    assert ddpm(register) == 0
    # Again (the same weights and config): the version registered first, said in one line; no second run.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddpm.convert"):
        assert ddpm(register) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "ddpm.convert" and "version" in r.getMessage()] \
        == ["ddpm-tiny version 1 has these weights and config already: reused it (alias candidate)"]
    client = MlflowClient(tracking)
    assert [str(v.version) for v in client.search_model_versions("name = 'ddpm-tiny'")] == ["1"]
    assert len(client.search_runs([client.get_experiment_by_name(IMPORT_EXPERIMENT).experiment_id])) == 1
    mlflow.set_tracking_uri(tracking)
    sampler = mlflow.pyfunc.load_model("models:/ddpm-tiny@candidate").unwrap_python_model()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([9])
    with torch.no_grad():
        assert (sampler.model(x, t) - theirs(x, t).sample).abs().max().item() <= 1e-5
    assert ddpm(["convert", "export", "--model", "models:/ddpm-tiny@candidate", "--out", str(tmp_path / "out"),
                 "--tracking-uri", tracking]) == 0
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet")
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), back.state_dict().values()))


def legacy_folder(theirs, folder, *, safetensors_too=False):
    """The layout of diffusers' old conversion (the released google/ddpm-* folders): query/key/value/proj_attn
    attention names, weights in diffusion_pytorch_model.bin."""
    theirs.save_pretrained(folder)
    state = theirs.state_dict()
    renamed = {}
    for key, tensor in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f".{new}.", f".{old}.") if ".attentions." in key else key
        renamed[key] = tensor.clone()
    assert sum(".proj_attn." in k for k in renamed) == 2 * sum(".to_out.0.weight" in k for k in state)
    torch.save(renamed, folder / "diffusion_pytorch_model.bin")
    if not safetensors_too:
        (folder / "diffusion_pytorch_model.safetensors").unlink()
    return folder


# google/ddpm-cifar10-32's scheduler_config.json and model_index.json, as released.
RELEASED_SCHEDULER = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
                      "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
                      "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}
RELEASED_INDEX = {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1",
                  "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def released_repo(theirs, folder, *, safetensors_too=False):
    """A repo as the google/ddpm-* models are released: flat (config.json, the weights, model_index.json and
    scheduler_config.json side by side), the old conversion's weights (`legacy_folder`), no dropout key."""
    legacy_folder(theirs, folder, safetensors_too=safetensors_too)
    config = json.loads((folder / "config.json").read_text())
    del config["dropout"]
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "scheduler_config.json").write_text(json.dumps(RELEASED_SCHEDULER))
    (folder / "model_index.json").write_text(json.dumps(RELEASED_INDEX))
    return folder


def edit_scheduler(folder, **change):
    (folder / "scheduler_config.json").write_text(json.dumps({**RELEASED_SCHEDULER, **change}))


def test_a_flat_released_repo_has_its_scheduler_config_read(tmp_path, caplog):
    repo = released_repo(random_diffusers_unet("tiny", seed=4), tmp_path / "ddpm-tiny-16")
    _, config = import_folder(repo)
    assert config.preset == "tiny" and config.diffusion == get_preset("tiny").diffusion
    edit_scheduler(repo, num_train_timesteps=4000, beta_end=0.01)
    _, config = import_folder(repo)
    assert (config.diffusion.timesteps, config.diffusion.beta_end) == (4000, 0.01)
    edit_scheduler(repo, variance_type="fixed_small")  # the variance cross-check
    with caplog.at_level("WARNING"):
        assert import_folder(repo, "tiny")[1].diffusion.variance == "fixedlarge"
    assert "its scheduler says fixedsmall, preset tiny uses fixedlarge (the preset wins)" in caplog.text
    with pytest.raises(BridgeError, match="no preset has this architecture"):
        import_folder(repo)
    edit_scheduler(repo, prediction_type="v_prediction")
    with pytest.raises(BridgeError, match=f"{repo / 'scheduler_config.json'}: prediction_type=\"v_prediction\""):
        import_folder(repo)


def test_an_imported_model_keeps_its_presets_dropout_unless_set(tmp_path):
    from pipelines.cli import main as ddpm

    repo = released_repo(random_diffusers_unet("cifar10", seed=6), tmp_path / "ddpm-cifar10-32")
    model, config = import_folder(repo)
    assert "dropout" not in json.loads((repo / "config.json").read_text())  # as released: it would read as 0.0
    assert config.preset == "cifar10" and config.model.dropout == 0.1 == get_preset("cifar10").model.dropout
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}
    _, config = import_folder(repo, overrides=["model.dropout=0.2", "train.lr=1e-4"])
    assert (config.model.dropout, config.train.lr, config.train.batch_size) == (0.2, 1e-4, 128)
    with pytest.raises(BridgeError, match=r"--set model.ch=64: the architecture is .*ddpm-cifar10-32's"):
        import_folder(repo, overrides=["model.ch=64"])
    assert ddpm(["convert", "import", "--folder", str(repo), "--set", "model.dropout=0.3",
                 "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["dropout"] == 0.3


def test_the_released_legacy_layout_imports_to_what_diffusers_itself_loads(tmp_path):
    theirs = random_diffusers_unet("tiny", seed=7)
    legacy = legacy_folder(theirs, tmp_path / "ddpm-legacy")
    reloaded = diffusers.UNet2DModel.from_pretrained(legacy)  # diffusers' own renaming of the old names
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), reloaded.state_dict().values()))
    ours, config = import_folder(legacy)
    theirs.save_pretrained(tmp_path / "modern")
    modern, _ = import_folder(tmp_path / "modern")
    assert config.preset == "tiny"
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), modern.state_dict().values()))


def test_safetensors_is_preferred_over_the_bin_and_a_pickle_with_code_is_refused(tmp_path):
    folder = legacy_folder(random_diffusers_unet("tiny", seed=1), tmp_path / "both", safetensors_too=True)
    other = random_diffusers_unet("tiny", seed=2)
    other.save_pretrained(tmp_path / "other")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(
        (tmp_path / "other" / "diffusion_pytorch_model.safetensors").read_bytes())
    ours, _ = import_folder(folder)
    expected, _ = import_folder(tmp_path / "other")
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), expected.state_dict().values()))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1), "code": print}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(BridgeError, match=r"diffusion_pytorch_model.bin is not a plain state_dict of tensors"):
        import_folder(folder)


def test_a_tensor_under_both_its_legacy_and_current_name_is_refused(tmp_path):
    folder = legacy_folder(random_diffusers_unet("tiny", seed=3), tmp_path / "dup")
    state = torch.load(folder / "diffusion_pytorch_model.bin", weights_only=True)
    key = next(k for k in state if k.endswith(".query.weight"))
    state[key.replace(".query.", ".to_q.")] = state[key].clone()
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(BridgeError, match=r"holds .*\.to_q\.weight under both its legacy and its current name"):
        import_folder(folder)


@pytest.mark.parametrize("name, variance, expected", [
    ("google/ddpm-church-256", "fixedsmall", "lsun_church256"),
    ("ddpm-ema-bedroom-256", None, "lsun_bedroom256"),
    ("google/ddpm-cat-256", "fixedsmall", "lsun_cat256"),
    ("google/ddpm-celebahq-256", None, "celebahq256"),
])
def test_a_256_model_is_registered_under_its_dataset_read_from_the_name(name, variance, expected):
    model = get_preset("celebahq256").model
    assert matching_preset(model, variance, name=name).preset == expected


def test_an_unnamed_256_model_asks_for_its_dataset_and_an_explicit_preset_wins():
    model = get_preset("celebahq256").model
    with pytest.raises(BridgeError, match=r"my-model fits presets celebahq256, lsun_bedroom256, lsun_church256, "
                                          r"lsun_cat256: say which with --preset, or --dataset cifar10\|church"):
        matching_preset(model, "fixedsmall", name="my-model")
    chosen = matching_preset(model, None, "lsun_cat256", name="google/ddpm-church-256")
    assert chosen.preset == "lsun_cat256" and chosen.diffusion.variance == "fixedsmall"
    with pytest.raises(BridgeError, match=r"m does not have preset cifar10's architecture"):
        matching_preset(model, None, "cifar10", name="m")
    with pytest.raises(BridgeError, match=r"--preset: unknown preset 'church'"):
        matching_preset(model, None, "church", name="m")
    assert matching_preset(get_preset("cifar10").model, None, name="anything").preset == "cifar10"


def test_an_imported_model_folder_is_taken_by_export_register_and_the_sampling_jobs(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    from ddpm_core.checkpoint import verify_model_folder
    from ddpm_core.storage import sha256_file
    from pipelines.cli import main as ddpm
    from pipelines.mlflow_registry import load_model, resolve_model, weights_sha256
    from tests.errors import expect_one_error

    theirs = random_diffusers_unet("tiny", seed=11)
    legacy = legacy_folder(theirs, tmp_path / "ddpm-tiny-legacy")
    out = tmp_path / "models" / "tiny"
    assert ddpm(["convert", "import", "--folder", str(legacy), "--out", str(out)]) == 0
    digest = verify_model_folder(out)
    assert (out / "ema.safetensors.sha256").read_text() == (f"{digest}  ema.safetensors\n"
                                                            f"{sha256_file(out / 'config.json')}  config.json\n")
    resolved, version = resolve_model(str(out), None)  # what `ddpm sample` and `ddpm fid` do with --model
    assert resolved == f"{out}@sha256:{digest}+{sha256_file(out / 'config.json')}" and version is None
    assert weights_sha256(resolved, None) == digest
    model, config = load_model(resolved, "")
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([9])
    with torch.no_grad():
        assert (model(x, t) - theirs(x, t).sample).abs().max().item() <= 1e-5
    assert ddpm(["convert", "export", "--model", str(out), "--out", str(tmp_path / "back")]) == 0
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "back" / "unet")
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), back.state_dict().values()))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):  # the second time, the version of the first
        assert ddpm(["convert", "register", "--model", str(out), "--tracking-uri", tracking]) == 0
    registered = MlflowClient(tracking).get_model_version_by_alias("ddpm-tiny", "candidate")
    assert registered.tags["ddpm.weights_sha256"] == digest and str(registered.version) == "1"
    assert len(MlflowClient(tracking).search_model_versions("name = 'ddpm-tiny'")) == 1
    (out / "ema.safetensors").write_bytes((out / "ema.safetensors").read_bytes()[:-1] + b" ")
    expect_one_error(caplog, ddpm, ["convert", "export", "--model", str(out), "--out", str(tmp_path / "x")],
                     f"model folder {out}: ema.safetensors has sha256 ")
    (out / "ema.safetensors.sha256").unlink()
    expect_one_error(caplog, ddpm, ["convert", "export", "--model", str(out), "--out", str(tmp_path / "x")],
                     f"model folder {out} is incomplete: missing ema.safetensors.sha256")


def test_a_resolved_model_folder_is_pinned_to_its_weights_and_its_config(tmp_path):
    """A job resolves --model once; an actor that loads it later gets that model or an error, never the same
    weights under another config.json (sealed again, as `convert import --out` into the same folder would)."""
    from dataclasses import replace

    from ddpm_core.checkpoint import save_model_folder, seal_model_folder
    from ddpm_core.sampling import SamplesError
    from pipelines.mlflow_registry import load_model, resolve_model

    config = get_preset("tiny")
    folder = save_model_folder(tmp_path / "model", UNet(config.model), config)
    resolved, _ = resolve_model(str(folder), None)
    assert load_model(resolved, "")[1].to_dict() == config.to_dict()
    changed = replace(config, diffusion=replace(config.diffusion, variance="fixedsmall"))
    assert changed.diffusion.variance != config.diffusion.variance
    (folder / "config.json").write_text(changed.to_json())
    seal_model_folder(folder)
    with pytest.raises(SamplesError, match=f"model folder {folder}: its weights or config.json changed since the "
                                           "job resolved it"):
        load_model(resolved, "")
