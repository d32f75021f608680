"""What an evaluation is, shared by the sampling job (pipelines/sample_fid.py) and the scheduler
(pipelines/schedule_sampling.py); I/O-free.

- The sampler flags, declared once (`add_sampler_arguments`), with one meaning in `ddpm sample`, `ddpm fid`
  and `ddpm schedule`; `run_options` forwards the ones that say how a batch runs, not what it is.
- `EvalSpec`: what the scheduler evaluates a version under; its digest names the records, the tags and
  the Ray job ids of that evaluation.
- `EvaluationResult`: fid.json, written by the sampling job and read back, then checked against a spec
  (`check_result`), by the scheduler.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from ddpm_core.diffusion import SPACINGS
from ddpm_core.errors import UserError
from ddpm_core.fid import FEATURE_DIM
from ddpm_core.inception import FEATURES, accepted_weights
from ddpm_core.sampling import SAMPLERS, SPEC_DEFAULTS, SamplesError, SampleSpec, bf16_is_fast
from pipelines.arguments import add_cpus_argument

PUBLISHED_N = 50000  # samples per published FID
# Settings added after the first specs and results were recorded, with the value those meant.
ADDED_FIELDS = {key: SPEC_DEFAULTS[key] for key in ("spacing", "clip")}
# What a Fréchet distance is called: "fid" only under the paper's protocol (`EvaluationResult.is_paper_protocol`);
# "spec_fid" with the FID network under any other spec (its metric and tag names say the sampler, steps and N);
# "pseudo_fid" with the random-init network (never an FID); "pixel_fd" with pixel features (a toy metric, no
# Inception at all: ddpm_core/pixel_features.py).
FID_LABELS = ("fid", "spec_fid", "pseudo_fid", "pixel_fd")
TOY_SCORES = {"pseudo_fid": "pseudo-FID", "pixel_fd": "pixel FD"}  # the labels that never promote, as people read them


@dataclass(frozen=True)
class SamplerSetting:
    """A sampler and where its steps lie: what the sampler flags default to in a command."""

    sampler: str
    steps: int
    spacing: str
    eta: float = 0.0

    @property
    def name(self) -> str:
        """e.g. dpmpp_2m-20-trailing, ddim-50-trailing-eta1, ddpm (all T steps)."""
        if self.sampler == "ddpm":
            return "ddpm"
        return f"{self.sampler}-{self.steps}-{self.spacing}" + (f"-eta{self.eta:g}" if self.eta else "")

    def flags(self) -> list[str]:
        return ["--sampler", self.sampler, "--steps", str(self.steps), "--spacing", self.spacing, "--eta",
                f"{self.eta:g}"]

    @classmethod
    def parse(cls, text: str) -> SamplerSetting:
        """SAMPLER[:STEPS[:SPACING[:ETA]]], e.g. `dpmpp_2m:20`, `ddim:50:trailing:1`, `ddpm`; the spacing
        defaults to the routine one's."""
        parts = text.split(":")
        try:
            sampler, steps = parts[0], int(parts[1]) if len(parts) > 1 else PAPER_SAMPLER.steps
            spacing = parts[2] if len(parts) > 2 else ROUTINE_SAMPLER.spacing
            eta = float(parts[3]) if len(parts) > 3 else 0.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not SAMPLER[:STEPS[:SPACING[:ETA]]]") from None
        if sampler not in SAMPLERS or spacing not in SPACINGS or len(parts) > 4 or steps < 1 or eta < 0:
            raise argparse.ArgumentTypeError(f"{text!r}: the sampler is one of {', '.join(SAMPLERS)}, the spacing "
                                             f"one of {', '.join(SPACINGS)}, steps >= 1, eta >= 0")
        return PAPER_SAMPLER if sampler == "ddpm" else cls(sampler, steps, spacing, eta)


# The numbers of record: Algorithm 2, all T steps (`ddpm sample`, `ddpm fid`); --steps 50 for a sampler chosen.
PAPER_SAMPLER = SamplerSetting("ddpm", 50, "linspace")
# The routine evaluation (`ddpm schedule`, its CronJob, the README): a deterministic solver at 20 evaluations,
# ~50x cheaper than DDPM-1000. Published evidence for the paper's own model ranks deterministic few-step
# sampling above stochastic (DDIM paper, Table 1: at 50 steps eta 0 gives FID 4.67, eta 1 gives 8.01); a
# calibration on your own run (`ddpm calibrate`) says whether it ranks your versions as DDPM-1000 does.
ROUTINE_SAMPLER = SamplerSetting("dpmpp_2m", 20, "trailing")


def add_sampler_arguments(parser: argparse.ArgumentParser, features_default: str = "inception",
                          defaults: SamplerSetting = PAPER_SAMPLER) -> None:
    """What `ddpm sample`, `ddpm fid` and `ddpm schedule` sample and score with, and how a batch runs;
    `defaults`: the sampler the command uses unless told (the paper's, or the routine one for the scheduler)."""
    add_sample_set_arguments(parser, features_default)
    parser.add_argument("--sampler", choices=SAMPLERS, default=defaults.sampler,
                        help=f"ddpm: Algorithm 2, all T steps; ddim; dpmpp_2m: DPM-Solver++(2M); unipc: UniPC-2 "
                             f"(default {defaults.sampler}; docs: the quality-vs-cost table)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="network evaluations of ddim, dpmpp_2m and unipc (ddpm always uses all T)")
    parser.add_argument("--spacing", choices=SPACINGS, default=defaults.spacing,
                        help="where those steps lie in 0..T-1 (ddpm: every step). linspace: both ends, DDIM's "
                             "timesteps here so far; leading: diffusers' default; trailing: starts at T-1; "
                             "quadratic: DDIM's CIFAR-10 choice")
    parser.add_argument("--eta", type=float, default=defaults.eta,
                        help="DDIM eta: 0 deterministic, 1 as stochastic as DDPM (dpmpp_2m, unipc: deterministic)")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                        help="clip x̂0 to [-1, 1] at every step (default: the model's clip_denoised, on for every "
                             "preset, as the paper; the scheduler records it as on). Recorded in samples.json")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="the network under bf16 autocast, the diffusion arithmetic in fp32. Default: fp32 "
                             "when scoring (paper parity; bench/sampler_table.py shows what bf16 moves); samples "
                             "only: on with --gpu and on CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16). "
                             "Recorded in samples.json")


def add_sample_set_arguments(parser: argparse.ArgumentParser, features_default: str = "inception") -> None:
    """Of every sample set, whatever its sampler: N, reference, seed, features, and how a batch runs."""
    parser.add_argument("--num", type=int, default=PUBLISHED_N,
                        help=f"number of samples N (default {PUBLISHED_N}, as published FIDs)")
    parser.add_argument("--ref", default=None, help="reference statistics .npz (ours from `ddpm fid-ref`, "
                                                     "pytorch-fid's, clean-fid's legacy_tensorflow, ADM's); default: "
                                                     "none, no FID")
    parser.add_argument("--seed", type=int, default=0, help="base seed: image i uses (seed, i)")
    parser.add_argument("--per-tar", type=int, default=1000, help="images per output tar (a tar is the unit of resume)")
    parser.add_argument("--features", choices=FEATURES, default=features_default,
                        help="inception: the FID network (verified weights); random-init: development only, "
                             "reported as pseudo-FID, which never promotes; pixels: 8x8 area means, reported as "
                             "pixel FD (a toy metric for CPU calibrations, never promotes); none: sample only")
    parser.add_argument("--actors", type=int, default=1, help="sampling actors (one GPU each with --gpu); 0: in "
                                                              "this process, without Ray (small sample sets)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass on an actor")
    add_cpus_argument(parser, "sampling actor")
    add_weights_argument(parser)
    parser.add_argument("--allow-small-n", action="store_true",
                        help=f"allow N < {FEATURE_DIM} (the covariance is then singular; tests and smoke runs only)")


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """--inception-weights: a path each scoring process opens on its own node (relative: to this directory)."""
    parser.add_argument("--inception-weights", default=None, type=lambda path: str(Path(path).expanduser().absolute()),
                        help="FID Inception weights file, at this path on every node that scores (else each node's "
                             "DDPM_INCEPTION_WEIGHTS, else its cache, fetched there unless DDPM_INCEPTION_DOWNLOAD=0)")


def run_options(args: argparse.Namespace) -> list[str]:
    """The sampler flags that say how a batch runs (resources, batch size), not what the evaluation is."""
    options = ["--actors", str(args.actors), "--batch-size", str(args.batch_size),
               "--cpus-per-worker", str(args.cpus_per_worker)]
    options += ["--gpu"] if args.gpu else []
    options += ["--allow-small-n"] if args.allow_small_n else []
    return options + (["--inception-weights", args.inception_weights] if args.inception_weights else [])


def sampler_settings(args: argparse.Namespace, timesteps: int | None) -> tuple[int, str, float]:
    """(steps, spacing, eta) as a spec records them: what does not apply to the sampler takes its default.

    `timesteps` is the model's T; the scheduler, which does not know it, passes None (ddpm's steps are then 0).
    """
    if args.sampler == "ddpm":
        return timesteps or 0, "linspace", 0.0
    if args.steps < 1 or (timesteps is not None and args.steps > timesteps):
        raise SamplesError(f"--steps must be in 1..{timesteps or 'T'}, got {args.steps}")
    if args.eta < 0:
        raise SamplesError(f"--eta must be >= 0, got {args.eta}")
    return args.steps, args.spacing, args.eta if args.sampler == "ddim" else 0.0


def sampling_precision_is_bf16(args: argparse.Namespace, scoring: bool) -> bool:
    """--bf16 / --no-bf16 if given; else fp32 for a scored sample set (paper parity), the fast path otherwise."""
    if args.bf16 is not None:
        return args.bf16
    return not scoring and bf16_is_fast("cuda" if args.gpu else "cpu")


def clip_setting(args: argparse.Namespace, model_clips: bool = True) -> bool:
    """--clip / --no-clip if given, else the model's clip_denoised (on for every preset: the scheduler, which does
    not open the model, records on)."""
    return model_clips if args.clip is None else args.clip


class InvalidResult(UserError):
    """A fid.json that cannot count, with the reason."""


@dataclass(frozen=True)
class EvaluationResult:
    """fid.json: what was sampled from which weights, scored with which network against which reference, and the
    scores (a score that was not computed is left out of the file)."""

    model: str  # the resolved model: models:/<name>/<version>, a model folder or a checkpoint
    model_weights_sha256: str
    sampler: str
    steps: int
    spacing: str
    eta: float
    clip: bool
    seed: int
    num: int
    bf16: bool
    features: str  # inception, random-init or none
    inception_weights_sha256: str | None  # the FID network's weights, or random-init(seed=0)
    reference: str | None
    reference_sha256: str | None
    fid: float | None = None
    spec_fid: float | None = None
    pseudo_fid: float | None = None
    pixel_fd: float | None = None
    inception_score: float | None = None
    inception_score_std: float | None = None
    spec_inception_score: float | None = None
    spec_inception_score_std: float | None = None
    pseudo_inception_score: float | None = None
    pseudo_inception_score_std: float | None = None

    @classmethod
    def of_samples(cls, spec: SampleSpec, features: str, model_weights_sha256: str,
                   inception_weights_sha256: str | None, reference: str | None,
                   reference_sha256: str | None) -> EvaluationResult:
        """The record of a sample set, not scored yet."""
        return cls(spec.model, model_weights_sha256, spec.sampler, spec.steps, spec.spacing, spec.eta, spec.clip,
                   spec.seed, spec.num, spec.bf16, features, inception_weights_sha256, reference, reference_sha256)

    @property
    def is_paper_protocol(self) -> bool:
        """Made and scored as the paper's numbers (`sampled_as_paper`) with the verified FID network. Only such a
        score is called FID and set beside published ones."""
        return sampled_as_paper(self) and self.inception_weights_sha256 in accepted_weights()

    @property
    def prefix(self) -> str:
        """Of its score fields: "" under the paper's protocol, "spec_" with the FID network otherwise, "pseudo_"
        with the random-init network, "pixel_" with pixel features."""
        return score_prefix(self.features, self.is_paper_protocol)

    @property
    def label(self) -> str:
        """The field its Fréchet distance goes by (FID_LABELS)."""
        return fd_label(self.prefix)

    def scored(self, fid: float | None, inception_score: tuple[float, float] | None) -> EvaluationResult:
        """With its scores: the Fréchet distance (None without a reference) and the Inception Score (mean, std;
        None from pixel features, which classify nothing)."""
        found = {self.label: fid}
        if inception_score is not None:
            found.update({f"{self.prefix}inception_score": inception_score[0],
                          f"{self.prefix}inception_score_std": inception_score[1]})
        return replace(self, **found)

    def metrics(self) -> dict[str, float]:
        """Its scores under the names MLflow shows: a spec_ score is named after its sampler, steps and N
        (`fid_dpmpp_2m20_n50000`), so that it is never read as a paper number."""
        setting = f"_{self.sampler}{self.steps}_n{self.num}"
        return {key.removeprefix("spec_") + setting if key.startswith("spec_") else key: value
                for key, value in self.scores().items()}

    def scores(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if key in SCORES and value is not None}

    def fids(self) -> dict[str, float]:
        """Its Fréchet distance under its label (fid or pseudo_fid), if one was computed."""
        return {key: value for key, value in self.scores().items() if key in FID_LABELS}

    def to_json(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in SCORES or value is not None}

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: dict) -> EvaluationResult:
        """A parsed fid.json, as found: a setting written before it was recorded reads as the value it meant, any
        other missing field as None (values are not converted: `check_result` judges them). Files written before
        the spec_ scores called every score with the FID network "fid": outside the paper's protocol, it is read
        as the spec_ score it is."""
        found = cls(**{f.name: data.get(f.name, ADDED_FIELDS.get(f.name)) for f in fields(cls)})
        if found.prefix != "spec_":
            return found
        unprefixed = ("fid", "inception_score", "inception_score_std")
        moved = {f"spec_{key}": getattr(found, key) for key in unprefixed if getattr(found, key) is not None}
        return replace(found, **moved, **{key: None for key in unprefixed})

    @classmethod
    def parse(cls, data: bytes, name: str) -> EvaluationResult:
        """The one reader of fid.json files; InvalidResult if `data` is not one."""
        try:
            parsed = json.loads(data)
        except ValueError as error:
            raise InvalidResult(f"{name} is not JSON: {error}") from None
        if not isinstance(parsed, dict):
            raise InvalidResult(f"{name} is not a JSON object")
        return cls.from_json(parsed)


SCORES = {f.name for f in fields(EvaluationResult) if f.default is None}


def toy_label(record: dict) -> str | None:
    """The label of the toy metric (TOY_SCORES) whose score `record` holds, or None."""
    return next((label for label in TOY_SCORES if label in record), None)


def score_prefix(features: str, paper_protocol: bool) -> str:
    """The prefix of the score fields of features `features` (EvaluationResult.prefix)."""
    if features == "inception":
        return "" if paper_protocol else "spec_"
    return "pixel_" if features == "pixels" else "pseudo_"


def fd_label(prefix: str) -> str:
    """The name of a Fréchet distance under `prefix`: pixel features' is no Inception distance (pixel_fd)."""
    return "pixel_fd" if prefix == "pixel_" else f"{prefix}fid"


def sampled_as_paper(record: EvaluationResult | EvalSpec) -> bool:
    """Sampled and scored as the paper's numbers (§4, Table 1): Algorithm 2 over all T steps, x̂0 clipped, fp32,
    N >= 50k, the FID network (whose weights a result must also have verified: `is_paper_protocol`)."""
    return (record.sampler == "ddpm" and record.clip and not record.bf16 and record.num >= PUBLISHED_N
            and record.features == "inception")


def _as_result(result: EvaluationResult | dict) -> EvaluationResult:
    return result if isinstance(result, EvaluationResult) else EvaluationResult.from_json(result)


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation is; a version is evaluated once per spec (its digest is in the job ids)."""

    num: int
    sampler: str
    steps: int
    eta: float
    seed: int
    ref: str | None
    features: str
    per_tar: int
    bf16: bool = False  # the network's precision: FIDs under one spec come from one precision
    reference_sha256: str | None = None  # what `ref` held: a changed reference file is another spec
    spacing: str = "linspace"  # where the steps lie (ddpm: every step)
    clip: bool = True  # x̂0 clipped to [-1, 1]

    @classmethod
    def from_arguments(cls, args: argparse.Namespace, reference_sha256: str | None) -> EvalSpec:
        """The spec of the sampler flags (`add_sampler_arguments`), with the sha256 of what --ref holds."""
        steps, spacing, eta = sampler_settings(args, timesteps=None)
        bf16 = sampling_precision_is_bf16(args, scoring=args.features != "none")
        return cls(args.num, args.sampler, steps, eta, args.seed, args.ref, args.features, args.per_tar, bf16,
                   reference_sha256, spacing, clip_setting(args))

    @property
    def digest(self) -> str:
        # Fields added after the first specs were recorded count only away from the value those specs
        # meant, so that an existing spec keeps its digest, its records and its champion.
        fields_ = {k: v for k, v in asdict(self).items() if k not in ADDED_FIELDS or v != ADDED_FIELDS[k]}
        return hashlib.sha256(json.dumps(fields_, sort_keys=True).encode()).hexdigest()[:10]

    def mismatch(self, result: EvaluationResult | dict) -> str | None:
        """How a fid.json differs from what this spec asks, or None: every setting both record under one name
        (ddpm's steps are the model's T, which the spec does not know)."""
        found = _as_result(result)
        for key in COMPARED:
            asked, value = getattr(self, key), getattr(found, key)
            if value != asked and not (key == "steps" and self.sampler == "ddpm"):
                return f"its {key} is {value!r}, the spec's {asked!r}"
        return None

    def job_arguments(self) -> list[str]:
        """The sampler flags of the sampling job that evaluates this spec."""
        arguments = ["--num", str(self.num), "--sampler", self.sampler, "--steps", str(self.steps),
                     "--spacing", self.spacing, "--eta", str(self.eta), "--clip" if self.clip else "--no-clip",
                     "--seed", str(self.seed), "--features", self.features, "--per-tar", str(self.per_tar),
                     "--bf16" if self.bf16 else "--no-bf16"]
        return arguments + (["--ref", self.ref] if self.ref else [])


COMPARED = tuple(f.name for f in fields(EvalSpec) if f.name in {r.name for r in fields(EvaluationResult)})


def check_result(result: EvaluationResult | dict, model: str, spec: EvalSpec,
                 model_weights_sha256: str | None) -> EvaluationResult:
    """`result` if it is this spec's evaluation of `model` (its registered weights), else InvalidResult."""
    found = _as_result(result)
    if found.model != model:
        raise InvalidResult(f"it scores {found.model!r}, not {model}")
    if (difference := spec.mismatch(found)) is not None:
        raise InvalidResult(difference)
    if found.model_weights_sha256 != model_weights_sha256:
        raise InvalidResult("it was computed from other weights than the version's registered ones")
    for label in FID_LABELS:
        value = getattr(found, label)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise InvalidResult(f"its {label} is {value!r}, not a finite number")
    return found


def verified_fid(result: EvaluationResult | dict) -> float | None:
    """The Fréchet distance of a checked result with verified Inception weights (its fid, or its spec_fid: one
    spec's records are ranked among themselves); never a pseudo-FID."""
    found = _as_result(result)
    score = found.fid if found.fid is not None else found.spec_fid
    if score is None or found.inception_weights_sha256 not in accepted_weights():
        return None
    return float(score)
