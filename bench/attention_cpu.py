"""CPU cost of the U-Net's attention: `ddpm_core.unet.attention` against SDPA, at the presets' token counts.

    python bench/attention_cpu.py [--batch 64] [--repeats 7] [--threads 1]

For every attention shape of the small presets (tokens × channels) and the 256² models' 16×16 level, in
fp32 and bf16, times SDPA, the project's `attention` (which takes two bmm over centred keys for CPU bf16
and SDPA otherwise) and two plain bmm (the keys not centred), forward alone and forward + backward.
Medians of alternating runs in this one process; ratios are SDPA's time over the project's, and the
project's over plain bmm (in bf16: what centring the keys costs). Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddpm_core.unet import attention  # noqa: E402

SHAPES = {"demo 16×16": (256, 64), "tiny/demo 8×8": (64, 64), "256² 16×16": (256, 512)}


def plain_bmm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Two bmm with the logits as they come: the baseline of the keys' centring."""
    return torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5, dim=-1), v)


def seconds(fn, q, k, v, backward: bool, calls: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(q, k, v)
        if backward:
            out.float().sum().backward()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch}, {args.threads} thread(s), medians of {args.repeats}; ms per call")
    print(f"{'shape':<13} {'tokens×C':>9} {'dtype':>5} {'pass':>9} {'SDPA':>7} {'project':>8} {'plain bmm':>9} "
          f"{'SDPA / project':>15} {'project / plain bmm':>20}")
    for name, (tokens, channels) in SHAPES.items():
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                q, k, v = (torch.randn(args.batch, tokens, channels, dtype=dtype, requires_grad=backward)
                           for _ in range(3))
                paths = {"sdpa": F.scaled_dot_product_attention, "project": attention, "bmm": plain_bmm}
                times = {path: [] for path in paths}
                with torch.set_grad_enabled(backward):
                    for path, fn in paths.items():
                        seconds(fn, q, k, v, backward, calls=2)  # warm-up: kernels built, memory allocated
                    for _ in range(args.repeats):
                        for path, fn in paths.items():
                            times[path].append(seconds(fn, q, k, v, backward))
                sdpa, ours, bmm = (statistics.median(times[p]) * 1e3 for p in paths)
                kind = "fwd+bwd" if backward else "fwd"
                label = "bf16" if dtype == torch.bfloat16 else "fp32"
                print(f"{name:<13} {f'{tokens}×{channels}':>9} {label:>5} {kind:>9} {sdpa:7.2f} {ours:8.2f} "
                      f"{bmm:9.2f} {sdpa / ours:14.2f}× {ours / bmm:19.2f}×")


if __name__ == "__main__":
    main()
