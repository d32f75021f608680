"""Sampling and Inception throughput on CPU for a preset (random weights: speed does not depend on them).

    python bench/sample_cpu.py [--preset cifar10] [--batch 8] [--repeats 3]

1. In-process samples/s, fp32 and the bf16 fast path alternating, medians of `--repeats` runs:
   DDIM-50, and DDPM-1000 timed over its first 10 steps (every step costs the same network
   evaluation, so the rate scales exactly by 10/1000).
2. The Ray sampling job (DDIM-50, no scoring, the job's default precision) with 1 and 2 actors:
   wall-clock samples/s, actor start-up included, and the ratio.
3. FID Inception features/s on the preset's images.
Prints figures only.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ddpm_core.checkpoint import TrainingState, save_checkpoint  # noqa: E402
from ddpm_core.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_core.ema import EMA  # noqa: E402
from ddpm_core.inception import FIDInception  # noqa: E402
from ddpm_core.presets import get_preset  # noqa: E402
from ddpm_core.rng import image_generators  # noqa: E402
from ddpm_core.sampling import bf16_autocast, bf16_is_fast, sample_images  # noqa: E402
from ddpm_core.training import build_optimizer  # noqa: E402
from ddpm_core.unet import UNet  # noqa: E402
from pipelines.ray_runtime import init_ray  # noqa: E402
from pipelines.sample_fid import main as sample_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--job-samples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = get_preset(args.preset)
    torch.manual_seed(0)
    model = UNet(config.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    r, b = config.model.resolution, args.batch

    def ddim(bf16: bool) -> float:
        start = time.perf_counter()
        sample_images(model, diffusion, config, range(b), seed=0, sampler="ddim", steps=50, bf16=bf16)
        return b / (time.perf_counter() - start)

    def ddpm(bf16: bool) -> float:
        denoiser = bf16_autocast(model, "cpu") if bf16 else model
        chain = diffusion.p_sample_loop_progressive(denoiser, (b, 3, r, r), image_generators(0, range(b)))
        start = time.perf_counter()
        for _ in itertools.islice(chain, 10):
            pass
        return b / ((time.perf_counter() - start) * diffusion.num_timesteps / 10)

    samplers = {"DDIM-50": ddim, "DDPM-1000 (from 10 steps)": ddpm}
    rates = {(name, bf16): [] for name in samplers for bf16 in (False, True)}
    for _ in range(args.repeats):
        for name, bf16 in rates:
            rates[name, bf16].append(samplers[name](bf16))
    rate = {case: statistics.median(runs) for case, runs in rates.items()}

    inception = FIDInception.random_init(0)
    images = torch.randint(0, 256, (50, 3, r, r), dtype=torch.uint8)
    inception(images[:2])
    start = time.perf_counter()
    inception(images)
    features = 50 / (time.perf_counter() - start)

    job_rates = {}
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-sample-") as tmp:
        root = Path(tmp)
        ema = EMA(model, 0.9999)
        ema.update(model, 0)
        checkpoint = save_checkpoint(root / "checkpoint", model, ema, build_optimizer(model, config.train),
                                     TrainingState(step=0, config=config.to_dict()))
        init_ray(num_cpus=2)
        for actors in (1, 2):
            start = time.perf_counter()
            code = sample_main(["--model", str(checkpoint), "--num", str(args.job_samples), "--out",
                                str(root / f"out{actors}"), "--sampler", "ddim", "--steps", "50", "--features",
                                "none", "--actors", str(actors), "--batch-size", str(b), "--per-tar", str(b),
                                "--cpus-per-worker", str(2 / actors), "--tracking-uri",
                                f"sqlite:///{root / 'mlflow.db'}"])
            assert code == 0
            job_rates[actors] = args.job_samples / (time.perf_counter() - start)

    print(f"\npreset {args.preset} ({r}x{r}), batch {b}, CPU (2 cores), random weights; in-process: medians of "
          f"{args.repeats} alternating runs")
    print(f"{'':54} {'samples/s':>10}")
    for name, bf16 in rate:
        label = f"in-process {name}, {'bf16' if bf16 else 'fp32'}"
        print(f"{label:54} {rate[name, bf16]:10.4f}" + (f"   {rate[name, True] / rate[name, False]:.2f}x vs fp32"
                                                       if bf16 else ""))
    precision = "bf16" if bf16_is_fast("cpu") else "fp32"
    for actors, job_rate in job_rates.items():
        print(f"{f'Ray job, DDIM-50 ({precision}), {actors} actor(s), wall clock':54} {job_rate:10.3f}   "
              f"{job_rate / job_rates[1]:.2f}x vs 1 actor, {job_rate / actors:.3f} per actor")
    print(f"{'FID Inception features (299x299 after resize)':54} {features:10.2f} images/s")


if __name__ == "__main__":
    main()
