import dataclasses
import json

import pytest

from ddpm_core.config import Config, ConfigError, ModelConfig
from ddpm_core.presets import PRESETS, get_preset


def test_paper_hyper_parameters():
    cifar = get_preset("cifar10")
    assert (cifar.model.ch, cifar.model.ch_mult, cifar.model.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert (cifar.model.attn_resolutions, cifar.model.dropout) == ((16,), 0.1)
    assert (cifar.train.lr, cifar.train.batch_size, cifar.diffusion.variance) == (2e-4, 128, "fixedlarge")
    for name in ("celebahq256", "lsun_bedroom256", "lsun_church256", "lsun_cat256"):
        c = get_preset(name)
        assert (c.model.resolution, c.model.ch, c.model.ch_mult) == (256, 128, (1, 1, 2, 2, 4, 4))
        assert (c.model.dropout, c.train.lr, c.train.batch_size, c.diffusion.variance) == (0.0, 2e-5, 64, "fixedsmall")
    for c in PRESETS.values():
        if c.preset in ("tiny", "demo"):
            continue
        d, t = c.diffusion, c.train
        assert (d.timesteps, d.beta_start, d.beta_end, d.beta_schedule, d.clip_denoised) == (
            1000, 1e-4, 0.02, "linear", True)
        assert (t.warmup_steps, t.grad_clip, t.ema_decay, t.ema_debias, t.adam_eps, t.adam_betas) == (
            5000, 1.0, 0.9999, False, 1e-8, (0.9, 0.999))
    assert get_preset("lsun_bedroom256").train.random_flip is False  # the paper: no flips for bedroom
    assert get_preset("lsun_bedroom256_large").model.ch == 192


def test_overrides_parse_by_field_type_and_leave_the_preset_alone():
    base = get_preset("cifar10")
    config = base.with_overrides(["train.lr=1e-5", "train.steps=8e5", "model.attn_resolutions=16,8",
                                  "train.random_flip=false", "diffusion.variance=fixedsmall", "model.dropout=0"])
    assert config.train.lr == 1e-5 and config.train.steps == 800_000
    assert config.model.attn_resolutions == (16, 8)
    assert config.train.random_flip is False and config.diffusion.variance == "fixedsmall"
    assert base.train.lr == 2e-4  # presets are immutable


def test_round_trip_through_json():
    config = get_preset("celebahq256").with_overrides(["train.lr=3e-5"])
    assert Config.from_dict(json.loads(config.to_json())) == config
    flat = config.flat()
    assert flat["train.lr"] == 3e-5 and flat["model.ch_mult"] == (1, 1, 2, 2, 4, 4) and flat["preset"] == "celebahq256"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "must look like section.field=value"),
        ("optim.lr=1", "unknown section 'optim'"),
        ("train.learning_rate=1", "train has no field 'learning_rate'"),
        ("train.steps=1.5", r"'1.5' is not a valid int"),
        ("train.random_flip=maybe", "'maybe' is not a valid bool"),
        ("diffusion.variance=learned", "diffusion.variance 'learned' is unknown"),
        ("model.ch=48", "multiple of 32 for GroupNorm"),
        ("model.attn_resolutions=12", r"attn_resolutions \[12\] are not U-Net levels"),
        ("model.in_channels=4", r"model.in_channels must be 3 \(RGB\) or 1 \(grey"),
        ("model.init=xavier", "model.init must be 'paper' or 'pytorch', got 'xavier'"),
        ("model.ch=0", "model.ch must be >= 1, got 0"),
        ("model.ch=-32", "model.ch must be >= 1, got -32"),
        ("model.ch=abc", "override 'model.ch=abc': 'abc' is not a valid int"),
        ("model.ch=1e9", r"make a U-Net of about 1.76e\+21 parameters, over the limit of 2e\+09"),
        ("model.resolution=8192", r"model.resolution must be in 1..4096, got 8192"),
        ("diffusion.timesteps=1e9", r"diffusion.timesteps must be in 1..100000, got 1000000000"),
    ],
)
def test_bad_overrides_get_one_clear_error(override, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("cifar10").with_overrides([override])


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown preset 'cifar100'; choose one of cifar10, celebahq256"):
        get_preset("cifar100")


def test_resolution_must_halve_cleanly():
    with pytest.raises(ConfigError, match="resolution 36 is not divisible by 2\\*\\*3"):
        dataclasses.replace(get_preset("cifar10").model, resolution=36)
    with pytest.raises(ConfigError, match="unknown model fields"):
        Config.from_dict({"preset": "x", "model": {"resolution": 32, "width": 3}})
    assert ModelConfig(resolution=32).ch_mult == (1, 2, 2, 2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=nan", "train.lr must be positive and finite, got nan"),
        ("train.lr=inf", "train.lr must be positive and finite, got inf"),
        ("train.lr=0", "train.lr must be positive and finite, got 0"),
        ("train.lr=-1e-4", "train.lr must be positive and finite"),
        ("train.adam_eps=0", "train.adam_eps must be positive and finite, got 0"),
        ("train.adam_eps=nan", "train.adam_eps must be positive and finite, got nan"),
        ("train.adam_betas=0.9", r"train.adam_betas must be two numbers in \[0, 1\), got \(0.9,\)"),
        ("train.adam_betas=0.9,0.99,0.999", r"train.adam_betas must be two numbers in \[0, 1\)"),
        ("train.adam_betas=0.9,1.0", r"train.adam_betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
        ("train.adam_betas=-0.1,0.999", r"train.adam_betas must be two numbers in \[0, 1\)"),
        ("train.adam_betas=nan,0.999", r"train.adam_betas must be two numbers in \[0, 1\)"),
        ("train.grad_clip=nan", "train.grad_clip must be positive, got nan"),
    ],
)
def test_optimizer_values_that_would_fail_on_the_workers_are_refused_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("cifar10").with_overrides([override])


@pytest.mark.parametrize("section, key, value, message", [
    ("model", "ch", "128", "model.ch must be an integer, got '128'"),
    ("model", "ch", 128.0, "model.ch must be an integer, got 128.0"),
    ("model", "gradient_checkpointing", 1, "model.gradient_checkpointing must be true or false, got 1"),
    ("model", "attn_resolutions", 16, "model.attn_resolutions must be a list of integers, got 16"),
    ("train", "adam_betas", [0.9, "x"], r"train.adam_betas must be a list of 2 numbers, got \[0.9, 'x'\]"),
    ("train", "lr", None, "train.lr must be a number, got None"),
    ("diffusion", "variance", ["fixedlarge"], r"diffusion.variance must be a string, got \['fixedlarge'\]"),
])
def test_a_stored_config_of_the_wrong_type_is_refused_naming_the_field(section, key, value, message):
    data = get_preset("cifar10").to_dict()
    data[section][key] = value
    with pytest.raises(ConfigError, match=f"^{message}$"):
        Config.from_dict(data)
    data = get_preset("cifar10").to_dict()
    data["train"]["lr"] = 1  # an integer stands for a float
    assert Config.from_dict(data).train.lr == 1.0
    with pytest.raises(ConfigError, match="^preset 'a/b' is not a name"):
        Config.from_dict({**data, "preset": "a/b"})


def test_a_stored_config_with_a_nan_learning_rate_is_refused_too():
    data = get_preset("cifar10").to_dict()
    data["train"]["lr"] = float("nan")
    with pytest.raises(ConfigError, match="train.lr must be positive and finite"):
        Config.from_dict(data)
