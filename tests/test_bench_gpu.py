"""bench/gpu.py: its --smoke run fills every section with consistent figures and passing checks, a failing or
overlong section leaves its error and lets the next one run, and a batch that does not fit falls back."""

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend

from ddpm_core.model_stats import forward_flops
from ddpm_core.presets import get_preset
from ddpm_core.sampling import bf16_is_fast

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["environment", "correctness", "train_256", "train_cifar10", "attention", "sampling", "fid"]
# The end-to-end samplers run at the sampling job's default precision on this CPU: bf16 only where it is native.
SAMPLER_PRECISION = "bf16" if bf16_is_fast("cpu") else "fp32"


@pytest.fixture(scope="module")
def bench():
    """bench/gpu.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-smoke")
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_smoke_fills_every_section_without_errors(smoke):
    results, _ = smoke
    assert results["meta"]["mode"] == "smoke"
    assert list(results["sections"]) == SECTIONS
    for name, record in results["sections"].items():
        assert "error" not in record, (name, record["error"])
        assert positive(record["seconds"]), name
    environment = results["sections"]["environment"]
    assert all(positive(environment[key]) for key in ("bf16_matmul_tflops", "fp32_matmul_tflops", "memory_gib"))


def test_smoke_training_figures_are_consistent(smoke):
    results, _ = smoke
    peak = results["sections"]["environment"]["bf16_matmul_tflops"]
    for name in ("train_256", "train_cifar10"):
        record = results["sections"][name]
        # Model FLOPs: forward (FlopCounterMode) + backward at twice the forward, of the preset it ran.
        assert record["train_gflops_per_image"] == pytest.approx(3 * forward_flops(get_preset("tiny").model) / 1e9)
        assert record["bf16_peak_tflops"] == peak
        rows = {row["variant"]: row for row in record["rows"]}
        assert list(rows) == ["fp32", "bf16 autocast", "bf16 + channels_last", "bf16 + channels_last + compile"]
        for variant, row in rows.items():
            assert positive(row["images_per_s"]) and positive(row["step_ms"]), variant
            assert row["images_per_s"] * row["step_ms"] / 1e3 == pytest.approx(record["batch"])
            assert row["mfu"] == pytest.approx(row["images_per_s"] * record["train_gflops_per_image"] / (peak * 1e3))
        assert isinstance(rows["bf16 + channels_last + compile"]["compile_s"], float)


def test_smoke_attention_sampling_and_fid_figures(smoke):
    results, _ = smoke
    attention = results["sections"]["attention"]
    kernels = set(SDPBackend.__members__)
    assert attention["default_kernel_training"] in kernels and attention["default_kernel_sampling"] in kernels
    rows = {row["kernel"]: row for row in attention["rows"]}
    assert list(rows) == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    math_kernel = rows["MATH"]
    assert math_kernel["runs"] and positive(math_kernel["forward_ms"]) and positive(math_kernel["forward_backward_ms"])
    for row in rows.values():  # a kernel either ran with its times or says why not
        assert positive(row.get("forward_ms")) if row["runs"] else row["reason"]

    sampling = {(row["sampler"], row["precision"]): row for row in results["sections"]["sampling"]["rows"]}
    assert set(sampling) == {("DDPM, one step", "bf16"), ("DDPM-1000 (from one step)", "bf16"),
                             ("DDPM, one step", "fp32"), ("DDPM-1000 (from one step)", "fp32"),
                             ("DDIM-50", SAMPLER_PRECISION), ("DPM-Solver++(2M)-20", SAMPLER_PRECISION)}
    for (sampler, precision), row in sampling.items():
        assert positive(row["images_per_s"]), sampler
        if sampler != "DDPM, one step":
            assert row["gpu_hours_50k"] * 3600 * row["images_per_s"] == pytest.approx(50_000)
    for precision in ("bf16", "fp32"):
        step, chain = sampling["DDPM, one step", precision], sampling["DDPM-1000 (from one step)", precision]
        assert chain["images_per_s"] == pytest.approx(step["images_per_s"] / 1000)

    fid = results["sections"]["fid"]
    assert positive(fid["images_per_s"]) and fid["gpu_hours_50k"] == pytest.approx(50_000 / fid["images_per_s"] / 3600)


def test_smoke_checks_pass_and_the_markdown_says_so(smoke):
    results, markdown = smoke
    checks = results["sections"]["correctness"]["checks"]
    assert [c["check"] for c in checks] == ["bf16 vs fp32 ε", "per-seed samples, batch 16 = 2 × batch 8",
                                            "gloo DDP step, world size 1, vs a plain step"]
    for check in checks:
        assert check["status"] == "PASS", check
        assert 0 <= check["value"] <= check["bound"], check
    assert checks[1]["value"] == 0  # per-seed samples are identical uint8 images, not merely close
    for name in SECTIONS:
        assert f"## {name} (" in markdown
    assert markdown.count("- **PASS** ") == 3 and "FAIL" not in markdown
    assert "| bf16 + channels_last + compile |" in markdown and f"| DDIM-50 | {SAMPLER_PRECISION} |" in markdown


def test_a_failing_or_overlong_section_keeps_its_figures_and_the_next_one_runs(bench, tmp_path):
    report = bench.Report(tmp_path, {"mode": "test", "started": "now", "command": "test"})
    cpu = torch.device("cpu")

    def overlong(record):
        record["finished_part"] = 1.5
        time.sleep(30)

    def failing(record):
        raise ValueError("no such kernel\nsecond line")

    report.run("overlong", 0.3, overlong, cpu)
    report.run("failing", 10, failing, cpu)
    report.run("next", 10, lambda record: record.update(value=2.0), cpu)
    sections = json.loads((tmp_path / "results.json").read_text())["sections"]
    assert sections["overlong"]["error"] == "SectionTimeout: stopped at its time cap of 0.3 s"
    assert sections["overlong"]["finished_part"] == 1.5 and sections["overlong"]["seconds"] < 5
    assert sections["failing"]["error"] == "ValueError: no such kernel"
    assert sections["next"]["value"] == 2.0 and "error" not in sections["next"]
    markdown = (tmp_path / "results.md").read_text()
    assert "**error**: SectionTimeout" in markdown and "- value: 2" in markdown


def test_a_batch_that_does_not_fit_runs_in_micro_batches_with_a_note(bench, monkeypatch):
    tried = []

    def fits_16(config, batch, micro_batch, *args):
        tried.append(micro_batch)
        if micro_batch == 0 or micro_batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"images_per_s": 1.0, "micro_batch": micro_batch}

    monkeypatch.setattr(bench, "timed_train_steps", fits_16)
    row = bench.train_throughput(get_preset("tiny"), 64, True, True, None, bench.SMOKE, torch.device("cpu"))
    assert tried == [0, 32, 16]
    assert row == {"images_per_s": 1.0, "micro_batch": 16, "note": "batch 64 did not fit: micro-batches of 16"}
