"""The CUDA path measured by one command, meant to take about four minutes on one H100 (issue 29).

    python bench/gpu.py [--out DIR] [--quick | --smoke]      (or: make bench-gpu)

Sections, in this order; each runs under a time cap, writes its figures to results.json and results.md in
--out as soon as it ends, and if it fails records its error, and the next one runs:

- environment: GPU, memory, torch / CUDA / cuDNN, the precision settings, and the matmul peak measured
  here (bf16 and fp32 GEMM loops): the denominator of every MFU below.
- correctness: PASS/FAIL lines: bf16 against fp32 ε, per-seed samples at batch 16 and 8, and a one-process
  DDP step (NCCL; gloo on CPU) against a plain one. First, so that a run cut short still answers them.
- train_256, train_cifar10: `train_step` at the preset's batch (the paper's 64 and 128) for fp32, bf16
  autocast, bf16 + channels_last, and that + torch.compile (compile time apart): images/s, peak memory,
  MFU of the model FLOPs (3 × the forward's, from FlopCounterMode) against the measured bf16 peak.
- attention: the SDPA kernel picked at the 256² model's 16×16 attention, and each kernel's time per call.
- sampling: one DDPM step (bf16, fp32), DDIM-50 and DPM-Solver++(2M)-20 end to end, and the GPU-hours
  50,000 samples take with each sampler, DDPM-1000 included.
- fid: Inception features/s (random-init weights: the speed is the real network's).

--quick skips torch.compile and shortens every measurement (about a minute); --smoke runs every section
on CPU with the tiny preset in seconds (tests/test_bench_gpu.py). Prints figures; never fails on time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from ddpm_core.config import Config, ModelConfig  # noqa: E402
from ddpm_core.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_core.inception import RANDOM_INIT_SEED, FIDInception  # noqa: E402
from ddpm_core.model_stats import forward_flops  # noqa: E402
from ddpm_core.pixels import to_uint8  # noqa: E402
from ddpm_core.presets import get_preset  # noqa: E402
from ddpm_core.rng import image_generators  # noqa: E402
from ddpm_core.sampling import bf16_autocast, bf16_is_fast, sample_images  # noqa: E402
from ddpm_core.training import build_ema, build_optimizer, train_step  # noqa: E402
from ddpm_core.unet import UNet  # noqa: E402

# The bounds the CPU tests hold the same quantities to.
EPS_BF16_BOUND = 0.05  # ‖ε_bf16 - ε_fp32‖ / ‖ε_fp32‖, tests/test_unet.py::test_bf16_autocast_stays_close_to_fp32
DDP_GRADIENT_BOUND = 1e-4  # relative gradient difference; one rank all-reduces nothing, so only kernel noise
SAMPLES_FOR_PROJECTION = 50_000  # the paper's FID sample count
TRAIN_VARIANTS = {  # name: (bf16 autocast, channels_last, torch.compile)
    "fp32": (False, False, False),
    "bf16 autocast": (True, False, False),
    "bf16 + channels_last": (True, True, False),
    "bf16 + channels_last + compile": (True, True, True),
}


@dataclass(frozen=True)
class Plan:
    """What one mode (default, --quick, --smoke) runs: models, sizes, time per figure and caps."""

    device: str
    model_256: str  # the preset standing for the 256² model (smoke: tiny)
    model_cifar: str
    train_batch: int | None  # None: the preset's own (the paper's per-device batch)
    sample_batch: int
    fid_batch: int
    gemm_size: int
    seconds_per_figure: float  # the timed part of each measurement, after warm-up
    check_steps: int  # DDIM steps of the per-seed check
    compile_backend: str | None  # None: the compile variant is skipped
    caps: dict[str, float]  # seconds per section


FULL = Plan("cuda", "lsun_bedroom256", "cifar10", None, 64, 250, 8192, 2.0, 20, "inductor",
            caps={"environment": 15, "correctness": 35, "train_256": 130, "train_cifar10": 60, "attention": 15,
                  "sampling": 30, "fid": 15})
QUICK = replace(FULL, seconds_per_figure=0.5, compile_backend=None,
                caps={"environment": 10, "correctness": 30, "train_256": 30, "train_cifar10": 15, "attention": 10,
                      "sampling": 15, "fid": 10})
# Dynamo with the eager backend: the compile variant's code path, without minutes of C++ builds on a CPU.
SMOKE = Plan("cpu", "tiny", "tiny", 4, 2, 1, 256, 0.05, 10, "eager",
             caps=dict.fromkeys(QUICK.caps, 120.0))


class SectionTimeout(BaseException):
    """A section's time cap ran out; a BaseException, so that no `except Exception` inside torch swallows it."""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def seconds_per_call(fn: Callable[[], object], device: torch.device, budget_s: float, warmup: int = 1,
                     max_calls: int = 10_000) -> float:
    """Mean wall time of `fn` after `warmup` calls: one timed call sizes a run of about `budget_s`."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    calls = min(max_calls, int(budget_s / first))
    if calls == 0:  # one call outlasts the budget: it is the measurement
        return first
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def unet_on(config: ModelConfig, device: torch.device, perturbed: bool = False) -> UNet:
    """The U-Net built on `device`; `perturbed` adds seeded noise to every weight, without which the
    zero-initialised layers make ε ≡ 0 and every comparison of outputs void."""
    torch.manual_seed(0)
    with torch.device(device):
        model = UNet(config)
    if perturbed:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    return model


def random_images(config: ModelConfig, batch: int, device: torch.device) -> torch.Tensor:
    r = config.resolution
    generator = torch.Generator(device).manual_seed(0)
    return torch.rand(batch, config.in_channels, r, r, device=device, generator=generator) * 2 - 1


# -- sections ---------------------------------------------------------------------------------------------


def environment(plan: Plan, device: torch.device, out: dict) -> None:
    """The machine, the precision defaults the other sections run under, and the measured matmul peaks."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(device=props.name, memory_gib=props.total_memory / 2**30,
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    else:
        out.update(device=f"CPU {platform.machine()}, {torch.get_num_threads()} threads",
                   memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    out.update(torch=torch.__version__, python=platform.python_version(),
               float32_matmul_precision=torch.get_float32_matmul_precision(),
               cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    n = plan.gemm_size
    out["gemm_size"] = n
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
        seconds = seconds_per_call(lambda: torch.mm(a, b, out=c), device, plan.seconds_per_figure, warmup=3)
        out[f"{name}_matmul_tflops"] = 2 * n**3 / seconds / 1e12


def correctness(plan: Plan, device: torch.device, out: dict) -> None:
    """PASS/FAIL lines, each with its measured value and the bound it is held to."""
    config = get_preset(plan.model_256)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    model = unet_on(config.model, device, perturbed=True).eval()
    checks = out["checks"] = []
    for check in (check_bf16_eps, check_per_seed_samples, check_ddp_step):
        checks.append(check(plan, config, diffusion, model, device))


def verdict(name: str, value: float, bound: float, detail: str, passed: bool | None = None) -> dict:
    passed = value < bound if passed is None else passed
    return {"check": name, "status": "PASS" if passed else "FAIL", "value": value, "bound": bound, "detail": detail}


def check_bf16_eps(plan: Plan, config: Config, diffusion: GaussianDiffusion, model: UNet,
                   device: torch.device) -> dict:
    x = random_images(config.model, 4, device)
    t = torch.linspace(0, diffusion.num_timesteps - 1, 4, device=device).long()
    with torch.no_grad():
        reference, low = model(x, t), bf16_autocast(model, device)(x, t).float()
    relative = ((low - reference).norm() / reference.norm()).item()
    return verdict("bf16 vs fp32 ε", relative, EPS_BF16_BOUND,
                   f"‖ε_bf16 - ε_fp32‖ / ‖ε_fp32‖ over 4 images at t = {t.tolist()}, {plan.model_256}")


def check_per_seed_samples(plan: Plan, config: Config, diffusion: GaussianDiffusion, model: UNet,
                           device: torch.device) -> dict:
    bf16 = bf16_is_fast(device)  # the sampling job's default precision on this device

    def draw(indices: range) -> np.ndarray:
        # η = 1: fresh per-image noise at every step, not only x_T.
        return to_uint8(sample_images(model, diffusion, config, indices, seed=0, sampler="ddim",
                                      steps=plan.check_steps, eta=1.0, device=device, bf16=bf16))

    whole = draw(range(16)).astype(np.int16)
    halves = np.concatenate([draw(range(0, 8)), draw(range(8, 16))]).astype(np.int16)
    levels = int(np.abs(whole - halves).max())
    return verdict("per-seed samples, batch 16 = 2 × batch 8", levels, 0,
                   f"DDIM-{plan.check_steps} η=1, {'bf16' if bf16 else 'fp32'}, uint8 images 0-15: "
                   f"{(whole != halves).mean():.2%} of pixels differ, by at most {levels} levels",
                   passed=levels == 0)


def check_ddp_step(plan: Plan, config: Config, diffusion: GaussianDiffusion, model: UNet,
                   device: torch.device) -> dict:
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)  # port 0: any free loopback port
    dist.init_process_group(backend, store=store, rank=0, world_size=1)
    try:
        train = replace(config.train, warmup_steps=0)  # a full-lr step: a wrong gradient moves the weights
        x0 = random_images(config.model, 4, device)
        plain, replica = copy.deepcopy(model).train(), copy.deepcopy(model).train()
        ddp = DistributedDataParallel(replica, device_ids=[device.index] if device.type == "cuda" else None)
        losses = []
        for module, stepped in ((plain, plain), (replica, ddp)):
            torch.manual_seed(0)  # dropout
            losses.append(train_step(stepped, diffusion, build_optimizer(module, train), build_ema(module, train),
                                     x0, 0, train, generator=torch.Generator(device).manual_seed(0)).loss)
        grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (plain, replica)]
        relative = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
        weights = max((a - b).abs().max().item() for a, b in zip(plain.parameters(), replica.parameters()))
    finally:
        dist.destroy_process_group()
    return verdict(f"{backend} DDP step, world size 1, vs a plain step", relative, DDP_GRADIENT_BOUND,
                   f"relative gradient difference; losses {losses[0]:.6g} and {losses[1]:.6g}, "
                   f"largest weight difference after the step {weights:.3g} (lr {train.lr:g})",
                   passed=relative < DDP_GRADIENT_BOUND and losses[0] == losses[1])


def training(preset: str, plan: Plan, device: torch.device, out: dict, bf16_peak_tflops: float | None) -> None:
    """One row per TRAIN_VARIANTS entry; MFU against the bf16 matmul peak the environment section measured."""
    config = get_preset(preset)
    batch = plan.train_batch or config.train.batch_size
    # Backward costs two forwards (gradients of inputs and of weights): the usual MFU convention.
    flops_per_image = 3 * forward_flops(config.model)
    out.update(preset=preset, resolution=config.model.resolution, batch=batch,
               train_gflops_per_image=flops_per_image / 1e9, bf16_peak_tflops=bf16_peak_tflops)
    rows = out["rows"] = []
    for name, (bf16, channels_last, compiled) in TRAIN_VARIANTS.items():
        if compiled and plan.compile_backend is None:
            rows.append({"variant": name, "note": "skipped (--quick)"})
            continue
        row = {"variant": name, **train_throughput(config, batch, bf16, channels_last,
                                                   plan.compile_backend if compiled else None, plan, device)}
        if bf16_peak_tflops:
            row["mfu"] = row["images_per_s"] * flops_per_image / (bf16_peak_tflops * 1e12)
        rows.append(row)
        free_memory(device)


def train_throughput(config: Config, batch: int, bf16: bool, channels_last: bool, compile_backend: str | None,
                     plan: Plan, device: torch.device) -> dict:
    """`timed_train_steps` at `batch`; if it does not fit, the same batch in micro-batches of half the size
    and less (train.micro_batch: gradient accumulation), with a note."""
    micro = batch
    while True:
        try:
            row = timed_train_steps(config, batch, 0 if micro == batch else micro, bf16, channels_last,
                                    compile_backend, plan, device)
            if micro < batch:
                row["note"] = f"batch {batch} did not fit: micro-batches of {micro}"
            return row
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
        free_memory(device)  # after the except block, whose traceback held the failed attempt's tensors
        micro //= 2


def timed_train_steps(config: Config, batch: int, micro_batch: int, bf16: bool, channels_last: bool,
                      compile_backend: str | None, plan: Plan, device: torch.device) -> dict:
    """images/s and peak memory of `train_step` on a fresh model, optimizer and EMA, as the training job
    builds them; compile_s is the first step's time beyond a steady step's."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = unet_on(config.model, device).to(memory_format=memory_format).train()
    train = replace(config.train, micro_batch=micro_batch)
    optimizer, ema = build_optimizer(model, train), build_ema(model, train)
    stepped = torch.compile(model, backend=compile_backend) if compile_backend else model
    x0 = random_images(config.model, batch, device).contiguous(memory_format=memory_format)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    step_index = itertools.count()

    def step() -> None:
        train_step(stepped, diffusion, optimizer, ema, x0, next(step_index), train,
                   autocast_dtype=torch.bfloat16 if bf16 else None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()  # builds the kernels (and compiles)
    first = time.perf_counter() - start
    seconds = seconds_per_call(step, device, plan.seconds_per_figure, warmup=0)
    row = {"images_per_s": batch / seconds, "step_ms": seconds * 1e3, "peak_memory_gib": peak_memory_gib(device)}
    if compile_backend:
        row["compile_s"] = first - seconds
    if micro_batch:
        row["micro_batch"] = micro_batch
    return row


def attention_shape(config: ModelConfig) -> tuple[int, int]:
    """(tokens, channels) at the model's first attention resolution."""
    resolution = config.attn_resolutions[0]
    level = int(math.log2(config.resolution // resolution))
    return resolution * resolution, config.ch * config.ch_mult[level]


def attention(plan: Plan, device: torch.device, out: dict) -> None:
    """SDPA as the U-Net calls it ((B, 1 head, tokens, C), bf16): the kernel it picks, and each kernel timed."""
    config = get_preset(plan.model_256)
    tokens, channels = attention_shape(config.model)
    batch = plan.train_batch or config.train.batch_size
    q, k, v = (torch.randn(batch, 1, tokens, channels, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.ones_like(q)
    names = {int(value): name for name, value in SDPBackend.__members__.items()}
    # The dispatcher's own choice: what F.scaled_dot_product_attention runs without a context manager.
    with torch.no_grad():
        sampling_choice = names[torch._fused_sdp_choice(q.detach(), k.detach(), v.detach())]
    out.update(shape=f"batch {batch}, 1 head, {tokens} tokens x {channels} channels, bf16",
               default_kernel_training=names[torch._fused_sdp_choice(q, k, v)], default_kernel_sampling=sampling_choice)
    rows = out["rows"] = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        row = {"kernel": backend.name}
        # SDPA says why a kernel cannot run in warnings; they become the row's reason.
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
            warnings.simplefilter("always")
            try:
                with torch.no_grad():
                    row["forward_ms"] = 1e3 * seconds_per_call(lambda: F.scaled_dot_product_attention(q, k, v),
                                                               device, plan.seconds_per_figure)
                row["forward_backward_ms"] = 1e3 * seconds_per_call(
                    lambda: F.scaled_dot_product_attention(q, k, v).backward(grad), device, plan.seconds_per_figure)
                row["runs"] = True
            except RuntimeError as error:
                reasons = [str(w.message).splitlines()[0] for w in caught] or [str(error).splitlines()[0]]
                row.update(runs=False, reason="; ".join(dict.fromkeys(reasons)))
        rows.append(row)


def sampling(plan: Plan, device: torch.device, out: dict) -> None:
    """images/s per sampler on one batch, and the GPU-hours SAMPLES_FOR_PROJECTION samples take at that rate."""
    config = get_preset(plan.model_256)
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    model = unet_on(config.model, device).eval()  # random weights: the speed does not depend on them
    r, b, total = config.model.resolution, plan.sample_batch, diffusion.num_timesteps
    out.update(preset=plan.model_256, resolution=r, batch=b)
    rows = out["rows"] = []

    def add(sampler: str, bf16: bool, images_per_s: float, projected: bool = True) -> None:
        row = {"sampler": sampler, "precision": "bf16" if bf16 else "fp32", "images_per_s": images_per_s}
        if projected:
            row["gpu_hours_50k"] = SAMPLES_FOR_PROJECTION / images_per_s / 3600
        rows.append(row)

    for bf16 in (True, False):
        denoiser = bf16_autocast(model, device) if bf16 else model
        chain = diffusion.p_sample_loop_progressive(denoiser, (b, config.model.in_channels, r, r),
                                                    image_generators(0, range(b), device), device)
        step_s = seconds_per_call(lambda: next(chain), device, plan.seconds_per_figure, max_calls=total // 2)
        add("DDPM, one step", bf16, b / step_s, projected=False)
        add(f"DDPM-{total} (from one step)", bf16, b / (step_s * total))  # every step is one network evaluation
    bf16 = bf16_is_fast(device)
    for sampler, steps, name in (("ddim", 50, "DDIM-50"), ("dpmpp_2m", 20, "DPM-Solver++(2M)-20")):
        start = time.perf_counter()
        sample_images(model, diffusion, config, range(b), seed=0, sampler=sampler, steps=steps, device=device,
                      bf16=bf16)
        synchronize(device)
        add(name, bf16, b / (time.perf_counter() - start))


def fid_features(plan: Plan, device: torch.device, out: dict) -> None:
    """The FID network on uint8 samples of the 256² model's size, resized to 299² inside, fp32 as scoring runs."""
    r = get_preset(plan.model_256).model.resolution
    inception = FIDInception.random_init(RANDOM_INIT_SEED).to(device)
    images = torch.randint(0, 256, (plan.fid_batch, 3, r, r), dtype=torch.uint8, device=device)
    seconds = seconds_per_call(lambda: inception(images), device, plan.seconds_per_figure)
    out.update(input=f"uint8 {r}x{r}, resized to 299x299", weights="random-init (speed only)", batch=plan.fid_batch,
               images_per_s=plan.fid_batch / seconds,
               gpu_hours_50k=SAMPLES_FOR_PROJECTION * seconds / plan.fid_batch / 3600)


# -- the report -------------------------------------------------------------------------------------------


def cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return "" if value is None else str(value)


def section_markdown(name: str, record: dict) -> str:
    lines = [f"## {name} ({record.get('seconds', 0):.1f} s)", ""]
    if "error" in record:
        lines += [f"**error**: {record['error']}", ""]
    scalars = {k: v for k, v in record.items() if not isinstance(v, list) and k not in ("seconds", "error")}
    lines += [f"- {key}: {cell(value)}" for key, value in scalars.items()]
    for check in record.get("checks", []):
        lines.append(f"- **{check['status']}** {check['check']}: {cell(check['value'])} "
                     f"(bound {cell(check['bound'])}); {check['detail']}")
    if rows := record.get("rows"):
        columns = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Report:
    """results.json and results.md in `out`, both rewritten whole after every section."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.meta, self.sections = out, meta, {}
        out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        for name, text in (("results.json", json.dumps({"meta": self.meta, "sections": self.sections}, indent=2)),
                           ("results.md", self.markdown())):
            partial = self.out / f".{name}.partial"
            partial.write_text(text)
            partial.replace(self.out / name)  # a reader never sees half a file

    def markdown(self) -> str:
        head = (f"# GPU benchmark, {self.meta['mode']} ({self.meta['started']})\n\n"
                f"`{self.meta['command']}`; figures from bench/gpu.py, one process.\n\n")
        return head + "\n".join(section_markdown(name, record) for name, record in self.sections.items())

    def run(self, name: str, cap_s: float, fill: Callable[[dict], None], device: torch.device) -> None:
        """`fill` the section's record under a time cap of `cap_s`; what it filled stays if it fails."""
        record = self.sections[name] = {}

        def expire(signum, frame):
            raise SectionTimeout(f"stopped at its time cap of {cap_s:g} s")

        previous = signal.signal(signal.SIGALRM, expire)
        start = time.perf_counter()
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, cap_s)
                fill(record)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except (Exception, SectionTimeout) as error:
            record["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            traceback.print_exc()
        finally:
            signal.signal(signal.SIGALRM, previous)
        record["seconds"] = time.perf_counter() - start
        free_memory(device)
        self.write()
        print(section_markdown(name, record), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md "
                                                 "(default: bench/results/gpu-<date>-<time>)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="no torch.compile, shorter measurements (~1 min)")
    mode.add_argument("--smoke", action="store_true", help="every section on CPU with tiny shapes, in seconds")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: bench/gpu.py measures a GPU (--smoke runs it on CPU)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device()) if plan.device == "cuda" else torch.device("cpu")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out = args.out or REPO / "bench" / "results" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}"
    report = Report(out, {"mode": "smoke" if args.smoke else "quick" if args.quick else "full", "started": started,
                          "command": " ".join(["python bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])})
    sections = {
        "environment": lambda record: environment(plan, device, record),
        "correctness": lambda record: correctness(plan, device, record),
        "train_256": lambda record: training(plan.model_256, plan, device, record, bf16_peak()),
        "train_cifar10": lambda record: training(plan.model_cifar, plan, device, record, bf16_peak()),
        "attention": lambda record: attention(plan, device, record),
        "sampling": lambda record: sampling(plan, device, record),
        "fid": lambda record: fid_features(plan, device, record),
    }

    def bf16_peak() -> float | None:
        return report.sections["environment"].get("bf16_matmul_tflops")

    for name, fill in sections.items():
        report.run(name, plan.caps[name], fill, device)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
