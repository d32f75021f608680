"""The diffusers bridge, against diffusers itself (an optional dependency, installed for the tests)."""

import json

import numpy as np
import pytest
import torch

from ddpm_core.diffusers_bridge import BridgeError, diffusers_config, export_folder, import_folder
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


def test_convert_import_registers_and_export_round_trips(tmp_path):
    import mlflow

    from pipelines.cli import main as ddpm

    theirs = random_diffusers_unet("tiny", seed=5)
    theirs.save_pretrained(tmp_path / "unet")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ddpm(["convert", "import", "--folder", str(tmp_path / "unet"), "--register",
                 "--tracking-uri", tracking]) == 0
    mlflow.set_tracking_uri(tracking)
    sampler = mlflow.pyfunc.load_model("models:/ddpm-tiny@candidate").unwrap_python_model()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([9])
    with torch.no_grad():
        assert (sampler.model(x, t) - theirs(x, t).sample).abs().max().item() <= 1e-5
    assert ddpm(["convert", "export", "--model", "models:/ddpm-tiny@candidate", "--out", str(tmp_path / "out"),
                 "--tracking-uri", tracking]) == 0
    back = diffusers.UNet2DModel.from_pretrained(tmp_path / "out" / "unet")
    assert all(torch.equal(a, b) for a, b in zip(theirs.state_dict().values(), back.state_dict().values()))
