"""Training throughput of the training job on CPU: images/s with 1 and 2 Ray Train workers.

    python bench/train_cpu.py [--preset cifar10] [--steps 4]

Runs the real job (Ray Train DDP over gloo, MLflow on SQLite) on a synthetic 32×32 dataset, at the
preset's global batch, and reads the images/s the job logged for each step after the first.
Both configurations run in this one command. Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlflow.tracking import MlflowClient  # noqa: E402

from ddpm_core.image_prep import Preprocess  # noqa: E402
from ddpm_core.sharding import ShardJob, build_shard  # noqa: E402
from ddpm_core.sources import CifarSource  # noqa: E402
from ddpm_core.storage import open_storage  # noqa: E402
from pipelines.ray_runtime import init_ray  # noqa: E402
from pipelines.train import main as train_main  # noqa: E402
from tests.datasets import make_cifar_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ddpm-bench-train-") as tmp:
        root = Path(tmp)
        make_cifar_batches(root / "cifar", per_batch=100)
        storage = open_storage(root / "data")
        job = ShardJob(CifarSource(root / "cifar"), Preprocess(32), storage, per_shard=50)
        todo, _ = job.pending()
        job.finalize([build_shard(job.source, job.preprocess, plan, "train", storage) for plan in todo])
        init_ray(num_cpus=2)
        tracking = f"sqlite:///{root / 'mlflow.db'}"
        rates = {}
        for workers in (1, 2):
            name = f"bench-{workers}"
            code = train_main(["--preset", args.preset, "--data", str(root / "data"), "--workers", str(workers),
                               "--loader-workers", "1", "--storage", str(root / "runs"), "--name", name,
                               "--tracking-uri", tracking, "--set", f"train.steps={args.steps}",
                               "--set", "train.log_every=1", "--set", f"train.sample_every={10**6}",
                               "--set", f"train.checkpoint_every={args.steps}"])
            assert code == 0
            client = MlflowClient(tracking)
            run = client.search_runs([client.get_experiment_by_name("data").experiment_id],
                                     filter_string=f"tags.`ddpm.run_name` = '{name}'")[0]
            history = sorted(client.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)
            rates[workers] = statistics.median(m.value for m in history[1:])
    print(f"\npreset {args.preset}, global batch as the preset, {args.steps} steps, CPU (2 cores), gloo DDP")
    print(f"{'workers':>8} {'images/s':>9} {'vs 1 worker':>12}")
    for workers, rate in rates.items():
        print(f"{workers:>8} {rate:9.2f} {rate / rates[1]:11.2f}x")


if __name__ == "__main__":
    main()
