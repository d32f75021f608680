"""The bf16 sampling fast path: close to fp32, deterministic, chosen by one rule, and recorded in the spec."""

import io
import json
import logging
import tarfile
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_core.checkpoint import load_ema_unet
from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.pixels import to_uint8
from ddpm_core.presets import get_preset
from ddpm_core.sampling import SamplesError, SampleSpec, bf16_is_fast, prepare_output, sample_images
from ddpm_core.storage import open_storage
from ddpm_core.unet import UNet
from pipelines.sample_fid import main as sample_main
from tests.errors import expect_one_error
from tests.models import tiny_checkpoint


@pytest.fixture(scope="module")
def tiny():
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = UNet(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():  # the zero-initialised layers would make ε ≡ 0 in both precisions
            p.add_(0.05 * torch.randn_like(p))
    return model, GaussianDiffusion.from_config(config.diffusion), config


def test_bf16_ddim_is_close_to_fp32_and_deterministic(tiny):
    model, diffusion, config = tiny
    fp32, bf16, again = (sample_images(model, diffusion, config, range(8), seed=0, sampler="ddim", steps=10, bf16=b)
                         for b in (False, True, True))
    other_seed = sample_images(model, diffusion, config, range(8), seed=1, sampler="ddim", steps=10)
    assert bf16.dtype == torch.float32 and torch.equal(bf16, again)
    # Measured on 4 weight seeds × DDIM-4/20/50: mean |bf16 - fp32| 0.002-0.005 (under one uint8 level,
    # 2/255), against ~1.0 between images of different seeds. A few pixels differ a lot: the first step
    # multiplies ε's rounding by √(1/ᾱ_T - 1) ≈ 156 before x̂0 is clipped.
    assert (bf16 - fp32).abs().flatten(1).mean(1).max() < 0.02
    assert (other_seed - fp32).abs().mean() > 0.5


def test_bf16_is_on_for_cuda_and_for_cpus_with_native_bf16(monkeypatch):
    assert bf16_is_fast("cuda:0")
    for capabilities, expected in (({"avx512_bf16": True}, True), ({"amx_bf16": True}, True), ({"bf16": True}, True),
                                   ({"avx512_bf16": False, "avx512_f": True, "avx2": True}, False)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda capabilities=capabilities: capabilities)
        assert bf16_is_fast("cpu") is expected


def test_a_spec_without_the_precision_field_reads_as_fp32(tmp_path):
    storage = open_storage(str(tmp_path))
    spec = SampleSpec("checkpoint", "ddim", 4, 0.0, 0, 8, 8, 16)
    storage.write_bytes("samples.json", json.dumps({k: v for k, v in asdict(spec).items() if k != "bf16"}).encode())
    assert prepare_output(storage, spec) == []
    with pytest.raises(SamplesError, match="holds samples of another model or setting "
                                           r"\(bf16 False there, True asked\)"):
        prepare_output(storage, SampleSpec(**{**asdict(spec), "bf16": True}))


def test_the_job_samples_in_the_precision_it_records(tmp_path, ray_local, caplog):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--num", "4", "--out", str(out), "--features", "none", "--sampler", "ddim",
            "--steps", "4", "--per-tar", "4", "--batch-size", "4", "--cpus-per-actor", "0.5",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert sample_main([*args, "--bf16"]) == 0
    assert json.loads((out / "samples.json").read_bytes())["bf16"] is True
    with tarfile.open(out / "samples" / "000000.tar") as tar:
        stored = np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))) for m in tar.getmembers()])
    model, config = load_ema_unet(checkpoint)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    expected = {bf16: to_uint8(sample_images(model, diffusion, config, range(4), 0, "ddim", 4, bf16=bf16))
                for bf16 in (False, True)}
    assert np.array_equal(stored, expected[True]) and not np.array_equal(stored, expected[False])
    caplog.set_level(logging.ERROR)
    expect_one_error(caplog, sample_main, [*args, "--no-bf16"],
                     "holds samples of another model or setting (bf16 True there, False asked)")
