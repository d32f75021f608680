"""The bf16 sampling fast path and the sampler options: close to fp32, deterministic, chosen by one rule, and
recorded in the spec, so that sample sets and evaluations of different settings never mix."""

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
from pipelines.cli import build_parser
from pipelines.evaluation import EvalSpec, sampler_settings, sampling_precision_is_bf16
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


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_bf16_is_close_to_fp32_and_deterministic(tiny, sampler):
    model, diffusion, config = tiny
    fp32, bf16, again = (sample_images(model, diffusion, config, range(8), seed=0, sampler=sampler, steps=10, bf16=b)
                         for b in (False, True, True))
    other_seed = sample_images(model, diffusion, config, range(8), seed=1, sampler=sampler, steps=10)
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


def test_scored_samples_default_to_fp32_and_samples_only_to_the_fast_path(monkeypatch):
    monkeypatch.setattr("pipelines.evaluation.bf16_is_fast", lambda device: True)
    parser = build_parser()
    for command, default in (("fid", False), ("sample", True)):
        args = parser.parse_args([command, "--model", "m", "--num", "8", "--out", "o"])
        scoring = args.features != "none"
        assert scoring is (command == "fid") and sampling_precision_is_bf16(args, scoring) is default
        for flag, explicit in (("--bf16", True), ("--no-bf16", False)):
            args = parser.parse_args([command, "--model", "m", "--num", "8", "--out", "o", flag])
            assert sampling_precision_is_bf16(args, scoring) is explicit


def test_a_spec_without_the_later_fields_reads_as_fp32_linspace_clipped(tmp_path):
    storage = open_storage(str(tmp_path))
    spec = SampleSpec("checkpoint", "ddim", 4, 0.0, 0, 8, 8, 16)
    later = ("bf16", "spacing", "clip")
    storage.write_bytes("samples.json", json.dumps({k: v for k, v in asdict(spec).items() if k not in later}).encode())
    assert prepare_output(storage, spec) == []
    for change, difference in (({"bf16": True}, "bf16 False there, True asked"),
                               ({"spacing": "trailing"}, "spacing 'linspace' there, 'trailing' asked"),
                               ({"clip": False}, "clip True there, False asked"),
                               ({"sampler": "unipc", "spacing": "trailing"},
                                "sampler 'ddim' there, 'unipc' asked, spacing 'linspace' there, 'trailing' asked")):
        with pytest.raises(SamplesError, match=f"holds samples of another model or setting \\({difference}\\)"):
            prepare_output(storage, SampleSpec(**{**asdict(spec), **change}))


def test_specs_record_only_what_applies_to_the_sampler():
    parser = build_parser()

    def settings(*options, timesteps=1000):
        return sampler_settings(parser.parse_args(["fid", "--model", "m", "--num", "8", "--out", "o", *options]),
                                timesteps)

    options = ("--steps", "10", "--spacing", "trailing", "--eta", "1")
    assert settings("--sampler", "ddpm", *options) == (1000, "linspace", 0.0)
    assert settings("--sampler", "ddim", *options) == (10, "trailing", 1.0)
    assert settings("--sampler", "dpmpp_2m", "--steps", "10", "--eta", "1") == (10, "linspace", 0.0)
    assert settings("--sampler", "ddpm", timesteps=None) == (0, "linspace", 0.0)
    for options, message in ((("--sampler", "unipc", "--steps", "1001"), "--steps must be in 1..1000, got 1001"),
                             (("--sampler", "unipc", "--steps", "0"), "--steps must be in 1..1000, got 0"),
                             (("--sampler", "ddim", "--eta", "-1"), "--eta must be >= 0, got -1.0")):
        with pytest.raises(SamplesError, match=message):
            settings(*options)


def test_evaluation_specs_of_other_samplers_never_mix():
    spec = EvalSpec(num=16, sampler="ddim", steps=4, eta=0.0, seed=0, ref="/data/fid_stats.npz",
                    features="inception", per_tar=8, bf16=False, reference_sha256="cd" * 32)
    assert spec.digest == "07940bdd29"  # as before spacing and clip were fields: its records still count
    others = [EvalSpec(**{**asdict(spec), **change}) for change in
              ({"spacing": "trailing"}, {"clip": False}, {"sampler": "dpmpp_2m"}, {"sampler": "unipc"})]
    assert len({spec.digest, *(other.digest for other in others)}) == 5
    result = {"num": 16, "sampler": "ddim", "steps": 4, "eta": 0.0, "seed": 0, "features": "inception",
              "bf16": False, "reference_sha256": "cd" * 32}  # a fid.json from before spacing and clip
    assert spec.mismatch(result) is None
    assert others[0].mismatch(result) == "its spacing is 'linspace', the spec's 'trailing'"
    assert others[1].mismatch({**result, "clip": True}) == "its clip is True, the spec's False"
    assert others[2].mismatch({**result, "spacing": "linspace", "clip": True}) == \
        "its sampler is 'ddim', the spec's 'dpmpp_2m'"
    # The job the scheduler submits samples exactly what the spec says.
    for evaluation in (spec, *others):
        args = build_parser().parse_args(["fid", "--model", "m", "--out", "o", *evaluation.job_arguments()])
        assert (args.sampler, *sampler_settings(args, 1000), args.clip, args.bf16, args.seed, args.num) == (
            evaluation.sampler, evaluation.steps, evaluation.spacing, evaluation.eta, evaluation.clip,
            evaluation.bf16, evaluation.seed, evaluation.num)


def test_the_job_samples_in_the_precision_it_records(tmp_path, ray_local, caplog):
    checkpoint = tiny_checkpoint(tmp_path / "checkpoint")
    out = tmp_path / "out"
    args = ["--model", str(checkpoint), "--num", "4", "--out", str(out), "--features", "none", "--sampler", "unipc",
            "--steps", "4", "--spacing", "trailing", "--per-tar", "4", "--batch-size", "4", "--cpus-per-worker", "0.5",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert sample_main([*args, "--bf16"]) == 0
    spec = json.loads((out / "samples.json").read_bytes())
    assert (spec["sampler"], spec["steps"], spec["spacing"], spec["clip"], spec["bf16"]) == ("unipc", 4, "trailing",
                                                                                          True, True)
    with tarfile.open(out / "samples" / "000000.tar") as tar:
        stored = np.stack([np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read()))) for m in tar.getmembers()])
    model, config = load_ema_unet(checkpoint)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    expected = {bf16: to_uint8(sample_images(model, diffusion, config, range(4), 0, "unipc", 4, bf16=bf16,
                                             spacing="trailing")) for bf16 in (False, True)}
    assert np.array_equal(stored, expected[True]) and not np.array_equal(stored, expected[False])
    caplog.set_level(logging.ERROR)
    expect_one_error(caplog, sample_main, [*args, "--no-bf16"],
                     "holds samples of another model or setting (bf16 True there, False asked)")
