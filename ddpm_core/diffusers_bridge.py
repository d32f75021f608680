"""The bridge to Hugging Face diffusers: `UNet2DModel` folders in and out, tensor for tensor.

A DDPM-faithful diffusers UNet (the released `google/ddpm-*` layout: `flip_sin_to_cos=False`,
`freq_shift=1`, `downsample_padding=0`, `norm_eps=1e-6`, `attention_head_dim=None`) has exactly our
tensors under other names; attention projections are Linear there and 1×1 convolutions here.
Import is strict (every tensor mapped, none left over) and also reads the folders of diffusers' old
conversion, as released on the Hub: attention tensors named query/key/value/proj_attn (renamed as
diffusers' `_fix_state_dict_keys_on_load` does) and weights only in `diffusion_pytorch_model.bin`
(read with `torch.load(weights_only=True)`; safetensors is preferred when both exist). Export writes a
folder that `DDPMPipeline.from_pretrained` loads. This module does not need diffusers installed;
`download_hub` needs huggingface_hub.

A folder's scheduler_config.json (`scheduler/` of a pipeline folder; the root of a flat one, as the released
`google/ddpm-*` repos are: config.json, weights, model_index.json and scheduler_config.json side by side)
is read field by field: the forward process and the sampler's clipping
become the imported Config's diffusion (num_train_timesteps, beta_start, beta_end, clip_sample, and
variance_type where no --preset decides it); a field the paper's diffusion cannot represent (another beta
schedule, v- or x0-prediction, dynamic thresholding, ...) or one this module does not know is refused,
naming it. Malformed files are one BridgeError line naming the file, never a traceback.

The imported model keeps its preset's training settings: dropout among them (the released configs have no
dropout key, which would read as 0.0 where the paper's CIFAR-10 trained with 0.1) unless overridden.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import load_tensors, read_json_object
from .config import Config, ConfigError, ModelConfig, typed_value
from .errors import UserError
from .presets import PRESETS, get_preset
from .unet import UNet

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS = "diffusion_pytorch_model.bin"
# diffusers' old attention names (its conversion of the official checkpoints) → the current ones.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
# The released google/ddpm-* models by dataset: what --dataset and a folder's name select.
DATASET_PRESETS = {"cifar10": "cifar10", "church": "lsun_church256", "bedroom": "lsun_bedroom256",
                   "cat": "lsun_cat256", "celebahq": "celebahq256"}
RESNET = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
          "nin_shortcut": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# What a DDPM-faithful UNet2DModel config must say (shared/reference/ddpm.md §3.1).
FAITHFUL = {"flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "norm_eps": 1e-6,
            "norm_num_groups": 32, "act_fn": "silu", "attention_head_dim": None, "mid_block_scale_factor": 1,
            "resnet_time_scale_shift": "default", "time_embedding_type": "positional"}
# The UNet2DModel config fields the architecture is read from: their type, and the value of an absent one
# (None: it must be there).
UNET_FIELDS = {"sample_size": (int, None), "block_out_channels": (tuple[int, ...], None),
               "down_block_types": (tuple[str, ...], None), "layers_per_block": (int, None), "dropout": (float, 0.0),
               "in_channels": (int, 3), "out_channels": (int, 3)}
# scheduler_config.json (DDPMScheduler's defaults for an absent field). What becomes our diffusion:
SCHEDULER_MAPPED = {"num_train_timesteps": ("timesteps", int), "beta_start": ("beta_start", float),
                    "beta_end": ("beta_end", float), "clip_sample": ("clip_denoised", bool)}
SCHEDULER_VARIANCE = {"fixed_large": "fixedlarge", "fixed_small": "fixedsmall"}
# The one value the paper's diffusion has: another is another process, parameterisation or sampling rule.
SCHEDULER_REQUIRED = {"beta_schedule": "linear", "trained_betas": None, "prediction_type": "epsilon",
                      "thresholding": False, "rescale_betas_zero_snr": False}
# No part of the model: metadata, and how a sampler with fewer steps than training picks its timesteps.
SCHEDULER_IGNORED = ("_class_name", "_diffusers_version", "_use_default_values", "timestep_spacing", "steps_offset",
                     "set_alpha_to_one", "skip_prk_steps", "dynamic_thresholding_ratio", "sample_max_value")


class BridgeError(UserError):
    """A diffusers folder or model that does not map onto the DDPM U-Net, with the reason."""


def architecture(model: ModelConfig) -> ModelConfig:
    """`model` without its training settings (dropout, gradient checkpointing, init): what the weights fix."""
    return replace(model, dropout=0.0, gradient_checkpointing=False, init="paper")


def key_map(config: ModelConfig) -> dict[str, str]:
    """Our parameter name → diffusers' name, for every tensor of the model."""
    names = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
             "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
             "mid.attn_1": "mid_block.attentions.0"}
    levels = len(config.ch_mult)
    modules: dict[str, tuple[str, dict]] = {}
    for i in range(levels):
        up = levels - 1 - i  # diffusers counts the up path from the bottom
        for j in range(config.num_res_blocks):
            modules[f"down.{i}.block.{j}"] = (f"down_blocks.{i}.resnets.{j}", RESNET)
            modules[f"down.{i}.attn.{j}"] = (f"down_blocks.{i}.attentions.{j}", ATTENTION)
        for j in range(config.num_res_blocks + 1):
            modules[f"up.{i}.block.{j}"] = (f"up_blocks.{up}.resnets.{j}", RESNET)
            modules[f"up.{i}.attn.{j}"] = (f"up_blocks.{up}.attentions.{j}", ATTENTION)
        names[f"down.{i}.downsample.conv"] = f"down_blocks.{i}.downsamplers.0.conv"
        names[f"up.{i}.upsample.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
    modules["mid.block_1"] = ("mid_block.resnets.0", RESNET)
    modules["mid.block_2"] = ("mid_block.resnets.1", RESNET)
    modules["mid.attn_1"] = ("mid_block.attentions.0", ATTENTION)
    for ours, (theirs, parts) in modules.items():
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in parts.items()})
    with torch.device("meta"):
        model_keys = UNet(config).state_dict().keys()
    mapping = {}
    for key in model_keys:
        module, _, tensor = key.rpartition(".")
        if module not in names:
            raise BridgeError(f"no diffusers name for {key}")
        mapping[key] = f"{names[module]}.{tensor}"
    return mapping


def _is_attention_projection(our_key: str) -> bool:
    """Attention q/k/v/proj_out weights: 1×1 convolutions here, Linear layers in diffusers."""
    module, _, tensor = our_key.rpartition(".")
    return ".attn" in module and module.rsplit(".", 1)[-1] in ("q", "k", "v", "proj_out") and tensor == "weight"


def to_diffusers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {}
    for ours, theirs in key_map(config).items():
        tensor = state[ours]
        out[theirs] = tensor[:, :, 0, 0].contiguous() if _is_attention_projection(ours) else tensor.contiguous()
    return out


def modern_attention_names(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The legacy query/key/value/proj_attn tensors under their current names (group_norm is unchanged)."""
    out = {}
    for key, tensor in state.items():
        match = _LEGACY_KEY.match(key)
        new = f"{match[1]}.{LEGACY_ATTENTION[match[2]]}.{match[3]}" if match else key
        if new in out or (match and new in state):
            raise BridgeError(f"{name} holds {new} under both its legacy and its current name")
        out[new] = tensor
    return out


def from_diffusers(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Strict: every diffusers tensor must be mapped and every one of ours found."""
    mapping = key_map(config)
    missing = sorted(set(mapping.values()) - set(state))
    extra = sorted(set(state) - set(mapping.values()))
    if missing or extra:
        raise BridgeError(f"diffusers weights do not match the DDPM U-Net: {len(missing)} missing "
                          f"(e.g. {missing[:3]}), {len(extra)} left over (e.g. {extra[:3]})")
    out = {}
    for ours, theirs in mapping.items():
        tensor = state[theirs]
        out[ours] = tensor[:, :, None, None] if _is_attention_projection(ours) else tensor
    return out


def diffusers_config(config: ModelConfig) -> dict:
    """The UNet2DModel config of our architecture (the released google/ddpm-* layout)."""
    resolution = config.resolution
    down, up = [], []
    for i in range(len(config.ch_mult)):
        attention = (resolution // 2**i) in config.attn_resolutions
        down.append("AttnDownBlock2D" if attention else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attention else "UpBlock2D")
    return {"_class_name": "UNet2DModel", "sample_size": resolution, "in_channels": config.in_channels,
            "out_channels": config.out_channels, "block_out_channels": [config.ch * m for m in config.ch_mult],
            "down_block_types": down, "up_block_types": up, "layers_per_block": config.num_res_blocks,
            "dropout": config.dropout, "center_input_sample": False, "add_attention": True, **FAITHFUL}


def model_config_from_diffusers(data: dict, name: str) -> ModelConfig:
    unfaithful = {k: data.get(k) for k, v in FAITHFUL.items() if k in data and data[k] != v}
    if unfaithful:
        expected = {k: FAITHFUL[k] for k in unfaithful}
        raise BridgeError(f"{name} is not a DDPM U-Net: {unfaithful} differ from {expected}")
    missing = [key for key, (_, default) in UNET_FIELDS.items() if default is None and key not in data]
    if missing:
        raise BridgeError(f"{name}: its config.json lacks {missing}")
    try:
        found = {key: typed_value(data.get(key, default), hint, f"{name}: {key}")
                 for key, (hint, default) in UNET_FIELDS.items()}
        channels, blocks = found["block_out_channels"], found["down_block_types"]
        if not channels or min(channels) < 1 or any(c % channels[0] for c in channels) or len(blocks) != len(channels):
            raise BridgeError(f"{name}: block_out_channels {list(channels)} are not positive multiples of the first, "
                              f"one per down block ({len(blocks)})")
        resolution = found["sample_size"]
        attention = tuple(resolution // 2**i for i, kind in enumerate(blocks) if "Attn" in kind)
        return ModelConfig(resolution=resolution, ch=channels[0], ch_mult=tuple(c // channels[0] for c in channels),
                           num_res_blocks=found["layers_per_block"], attn_resolutions=attention,
                           dropout=found["dropout"], in_channels=found["in_channels"],
                           out_channels=found["out_channels"])
    except ConfigError as error:
        raise BridgeError(f"{name}: {error}") from None


def scheduler_diffusion(file: Path) -> tuple[dict, str | None]:
    """What a scheduler_config.json says of the diffusion: (DiffusionConfig fields, its variance or None);
    BridgeError naming a field the paper's diffusion cannot represent, or one unknown here."""
    data = read_json_object(file, error=BridgeError)
    unknown = sorted(set(data) - {*SCHEDULER_MAPPED, *SCHEDULER_REQUIRED, *SCHEDULER_IGNORED, "variance_type",
                                  "clip_sample_range"})
    if unknown:
        raise BridgeError(f"{file}: unknown fields {unknown}; refusing a scheduler this import cannot read whole")
    for key, value in SCHEDULER_REQUIRED.items():
        if json.dumps(data.get(key, value)) != json.dumps(value):
            raise BridgeError(f"{file}: {key}={json.dumps(data[key])[:60]} is not the paper's diffusion, which has "
                              f"{key}={json.dumps(value)}")
    variance = data.get("variance_type")
    if variance is not None and variance not in SCHEDULER_VARIANCE:
        raise BridgeError(f"{file}: variance_type={json.dumps(variance)[:60]} is not the paper's diffusion, which has "
                          f"{' or '.join(SCHEDULER_VARIANCE)}")
    try:
        fields = {ours: typed_value(data[theirs], hint, f"{file}: {theirs}")
                  for theirs, (ours, hint) in SCHEDULER_MAPPED.items() if theirs in data}
    except ConfigError as error:
        raise BridgeError(str(error)) from None
    if fields.get("clip_denoised", True) and json.dumps(data.get("clip_sample_range", 1.0)) not in ("1", "1.0"):
        raise BridgeError(f"{file}: clip_sample_range={json.dumps(data['clip_sample_range'])[:60]} is not the "
                          "paper's sampler, which clips to [-1, 1]")
    return fields, SCHEDULER_VARIANCE.get(variance)


def matching_preset(model: ModelConfig, variance: str | None, preset: str | None = None,
                    name: str = "") -> Config:
    """The preset of an imported model: `preset` when given, else the one preset with this architecture
    (and variance, when known); several (the 256² datasets share one) are told apart by a dataset in `name`.
    Training settings (`architecture` leaves them out) are not compared, and the preset's are kept."""
    if preset is not None:
        try:
            config = get_preset(preset)
        except ConfigError as error:
            raise BridgeError(f"--preset: {error}") from None
        if architecture(config.model) != architecture(model):
            raise BridgeError(f"{name or 'the model'} does not have preset {preset}'s architecture: "
                              f"{model} vs {config.model}")
        if variance not in (None, config.diffusion.variance):
            log.warning("%s: its scheduler says %s, preset %s uses %s (the preset wins)", name, variance, preset,
                        config.diffusion.variance)
        return config
    fits = [p for p in PRESETS.values()
            if architecture(p.model) == architecture(model) and variance in (None, p.diffusion.variance)]
    if not fits:
        raise BridgeError(f"no preset has this architecture ({model}); add one or pass overrides")
    named = [p for p in fits if p.preset in {DATASET_PRESETS.get(t) for t in re.split(r"[^a-z0-9]+", name.lower())}]
    if len(fits) == 1 or len(named) == 1:
        return (named or fits)[0]
    raise BridgeError(f"{name or 'the model'} fits presets {', '.join(p.preset for p in fits)}: say which with "
                      f"--preset, or --dataset {'|'.join(DATASET_PRESETS)}")


def read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """diffusion_pytorch_model.safetensors, else the .bin of the old releases (tensors only, nothing run)."""
    if (unet_dir / WEIGHTS).is_file():
        return load_tensors(unet_dir / WEIGHTS, BridgeError)
    file = unet_dir / LEGACY_WEIGHTS
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise BridgeError(f"{file} is not a plain state_dict of tensors (refusing to unpickle it): "
                          f"{str(error).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BridgeError(f"{file} is not a state_dict of tensors")
    return state


def import_folder(path: str | Path, preset: str | None = None, name: str | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> tuple[UNet, Config]:
    """A diffusers pipeline folder (unet/ + scheduler/), a flat one (config.json and scheduler_config.json
    side by side, as released) or a bare UNet2DModel folder → our model and Config.

    `preset` names the preset to register it under (and its variance); without it the preset is read
    from the architecture, the scheduler's variance and a dataset in `name` (default: the folder's name
    and the config's `_name_or_path`), e.g. google/ddpm-church-256 → lsun_church256. `overrides`
    (`section.field=value`, as `--set`) change the preset's training settings, e.g. model.dropout; the
    architecture is the folder's.
    """
    root = Path(path)
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file() or not any((unet_dir / w).is_file() for w in (WEIGHTS, LEGACY_WEIGHTS)):
        raise BridgeError(f"{root} is not a diffusers folder: expected config.json and {WEIGHTS} or {LEGACY_WEIGHTS} "
                          "(or unet/ holding them)")
    data = read_json_object(unet_dir / "config.json", error=BridgeError)
    model_config = model_config_from_diffusers(data, str(unet_dir))
    scheduler = root / "scheduler" / "scheduler_config.json" if unet_dir != root else root / "scheduler_config.json"
    diffusion, variance = scheduler_diffusion(scheduler) if scheduler.is_file() else ({}, None)
    name = name or f"{root.resolve().name} {data.get('_name_or_path', '')}".strip()
    config = matching_preset(model_config, variance, preset, name)
    try:
        config = replace(config, diffusion=replace(config.diffusion, **diffusion))
    except ConfigError as error:
        raise BridgeError(f"{scheduler}: {error}") from None
    config = config.with_overrides(overrides)
    if architecture(config.model) != architecture(model_config):
        raise BridgeError(f"--set {' '.join(overrides)}: the architecture is {unet_dir}'s; of model.*, only "
                          "dropout, gradient_checkpointing and init can be set")
    if "dropout" in data and model_config.dropout != config.model.dropout:
        log.info("%s: dropout %g, the preset's or --set's (its config.json says %g)", name, config.model.dropout,
                 model_config.dropout)
    differ = {k: v for k, v in diffusion.items() if getattr(get_preset(config.preset).diffusion, k) != v}
    if differ:
        log.warning("%s: imported with its scheduler's %s, not preset %s's", name, differ, config.preset)
    model = UNet(config.model)
    state = modern_attention_names(read_weights(unet_dir), str(unet_dir))
    try:
        model.load_state_dict(from_diffusers(state, config.model))
    except RuntimeError as error:
        raise BridgeError(f"{unet_dir}: its weights do not fit its config.json: "
                          f"{str(error).strip().splitlines()[-1].strip()}") from None
    return model.eval(), config


def download_hub(repo_id: str, revision: str | None = None) -> Path:
    """The files of a Hub repo that `import_folder` reads, through huggingface_hub's cache (HF_HOME,
    HF_ENDPOINT, HF_HUB_OFFLINE apply); the .bin only when there is no safetensors. Returns the snapshot
    folder, named by the commit it resolved to."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        raise BridgeError("--hub needs huggingface_hub: pip install huggingface_hub "
                          "(or ddpm-ray[diffusers])") from None
    configs = ["model_index.json", "scheduler_config.json", "scheduler/scheduler_config.json", "config.json",
               "unet/config.json"]
    try:
        folder = Path(snapshot_download(repo_id, revision=revision,
                                        allow_patterns=[*configs, WEIGHTS, f"unet/{WEIGHTS}"]))
        unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
        if not (unet_dir / WEIGHTS).is_file():
            folder = Path(snapshot_download(repo_id, revision=folder.name,
                                            allow_patterns=[LEGACY_WEIGHTS, f"unet/{LEGACY_WEIGHTS}"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError) as error:
        raise BridgeError(f"cannot download {repo_id}@{revision or 'main'} from the Hub: "
                          f"{str(error).strip().splitlines()[0]}") from None
    return folder


def export_folder(model: UNet, config: Config, path: str | Path) -> Path:
    """Write a folder that `DDPMPipeline.from_pretrained(path)` loads: unet/, scheduler/, model_index.json."""
    root = Path(path)
    (root / "unet").mkdir(parents=True, exist_ok=True)
    (root / "scheduler").mkdir(exist_ok=True)
    save_file(to_diffusers(model.state_dict(), config.model), str(root / "unet" / WEIGHTS))
    (root / "unet" / "config.json").write_text(json.dumps(diffusers_config(config.model), indent=2))
    d = config.diffusion
    scheduler = {"_class_name": "DDPMScheduler", "num_train_timesteps": d.timesteps, "beta_start": d.beta_start,
                 "beta_end": d.beta_end, "beta_schedule": "linear", "clip_sample": d.clip_denoised,
                 "clip_sample_range": 1.0, "prediction_type": "epsilon",
                 "variance_type": {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[d.variance]}
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline",
                                                       "unet": ["diffusers", "UNet2DModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    return root
