"""Ray job: sample N images from a model with a pool of Ray Data actors, and score them (FID, IS).

    ray job submit --working-dir . -- python pipelines/sample_fid.py \\
        --model models:/ddpm-lsun_bedroom256@candidate --num 50000 --out s3://bucket/samples/v3 \\
        --ref s3://bucket/lsun-bedroom-256/fid_stats.npz --actors 8 --gpu

Rows of the Ray Data stage are sample tars (index ranges); each actor holds the model and the
Inception network, samples its tars (or re-reads finished ones), and returns exactly mergeable
float64 statistics. Results: fid.json, an MLflow run, and tags on the model version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpm_core.checkpoint import CheckpointError
from ddpm_core.diffusion import SPACINGS, GaussianDiffusion
from ddpm_core.fid import (
    FEATURE_DIM,
    FeatureStats,
    ScoreStats,
    StatsError,
    frechet_distance,
    image_statistics,
    load_reference,
)
from ddpm_core.inception import FIDInception, InceptionWeightsError, find_weights
from ddpm_core.pixels import image_grid, to_uint8
from ddpm_core.sampling import (
    SAMPLERS,
    SamplesError,
    SampleSpec,
    bf16_is_fast,
    prepare_output,
    read_sample_tar,
    sample_images,
    write_sample_tar,
)
from ddpm_core.storage import StorageError, open_storage, read_uri, sha256_file

log = logging.getLogger("ddpm.sample")
FEATURES = ("inception", "random-init", "none")
RANDOM_INIT_SEED = 0
ACTOR_RETRIES = 2  # restarts of a sampling actor, and retries of its tar, before the job fails


def statistics_row(features: FeatureStats, scores: ScoreStats) -> dict[str, np.ndarray]:
    """One Ray Data output row carrying exactly mergeable statistics."""
    return {"n": np.array([features.n]), "total": features.total[None], "outer": features.outer[None],
            "is_n": scores.n[None], "is_prob": scores.prob_sum[None], "is_plogp": scores.plogp_sum[None]}


def merge_statistics(rows, total: int, what: str) -> tuple[FeatureStats, ScoreStats]:
    """Sum the rows of a statistics stage, logging progress."""
    features, scores = FeatureStats.empty(), ScoreStats.empty(classes=1008)
    done, started = 0, time.monotonic()
    for row in rows:
        done += int(row["n"])
        if "total" in row:
            features = features + FeatureStats(int(row["n"]), row["total"], row["outer"])
            scores = scores + ScoreStats(row["is_n"], row["is_prob"], row["is_plogp"])
        log.info("%s %d/%d, %.2f/s", what, done, total, done / (time.monotonic() - started))
    return features, scores


class SampleAndScore:
    """A Ray Data actor: holds the model and the Inception network; one input row is one sample tar."""

    def __init__(self, model: str, tracking_uri: str, spec: dict, out: str, features: str, weights: str | None,
                 batch_size: int, threads: int):
        from pipelines.registry import load_model

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.config = load_model(model, tracking_uri)
        self.model.to(self.device)
        self.diffusion = GaussianDiffusion.from_config(self.config.diffusion)
        self.spec, self.storage, self.batch_size = SampleSpec(**spec), open_storage(out), batch_size
        self.inception = None
        if features == "inception":
            self.inception = FIDInception.from_weights(weights)[0].to(self.device)
        elif features == "random-init":
            self.inception = FIDInception.random_init(RANDOM_INIT_SEED).to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k, start, count, reuse = (int(batch[key][0]) for key in ("tar", "start", "count", "reuse"))
        if reuse:
            indices, images = read_sample_tar(self.storage, k)
        else:
            indices = list(range(start, start + count))
            images = np.concatenate([
                to_uint8(sample_images(self.model, self.diffusion, self.config, indices[i:i + self.batch_size],
                                       self.spec.seed, self.spec.sampler, self.spec.steps, self.spec.eta,
                                       self.device, self.spec.bf16, self.spec.spacing, self.spec.clip))
                for i in range(0, count, self.batch_size)])
            write_sample_tar(self.storage, k, indices, images)
        if self.inception is None:
            return {"n": np.array([len(indices)])}
        return statistics_row(*image_statistics(self.inception, images, np.asarray(indices), device=self.device))


def add_arguments(parser: argparse.ArgumentParser, features_default: str = "inception") -> None:
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a "
                                                       "checkpoint directory")
    parser.add_argument("--num", type=int, required=True, help="number of samples N (50000 for published FIDs)")
    parser.add_argument("--out", required=True, help="where the sample tars go: local path or s3://")
    parser.add_argument("--ref", default=None, help="reference statistics .npz (ours, pytorch-fid, clean-fid, ADM)")
    add_sampler_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="base seed: image i uses (seed, i)")
    parser.add_argument("--actors", type=int, default=1, help="sampling actors (one GPU each with --gpu); 0: in "
                                                              "this process, without Ray (small sample sets)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass on an actor")
    parser.add_argument("--per-tar", type=int, default=1000, help="images per output tar")
    parser.add_argument("--gpu", action="store_true", help="one GPU per actor")
    parser.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                        help="clip x̂0 to [-1, 1] at every step (default: the model's clip_denoised, on for every "
                             "preset, as the paper). Recorded in samples.json")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="the network under bf16 autocast, the diffusion arithmetic in fp32. Default: fp32 "
                             "when scoring (paper parity; bench/sampler_table.py shows what bf16 moves); samples "
                             "only: on with --gpu and on CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16). "
                             "Recorded in samples.json")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--features", choices=FEATURES, default=features_default,
                        help="inception: the FID network (verified weights); random-init: development only, "
                             "reported as pseudo-FID; none: sample only")
    parser.add_argument("--inception-weights", default=None, help="FID Inception weights file (else "
                                                                  "DDPM_INCEPTION_WEIGHTS, else the cache)")
    parser.add_argument("--allow-small-n", action="store_true",
                        help=f"allow N < {FEATURE_DIM} (the covariance is then singular; tests and smoke runs only)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """--sampler, --steps, --spacing, --eta: what `ddpm sample`, `ddpm fid` and `ddpm schedule` sample with."""
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                        help="ddpm: Algorithm 2, all T steps; ddim; dpmpp_2m: DPM-Solver++(2M); unipc: UniPC-2 "
                             "(README: the quality-vs-cost table)")
    parser.add_argument("--steps", type=int, default=50, help="network evaluations of ddim, dpmpp_2m and unipc "
                                                              "(ddpm always uses all T)")
    parser.add_argument("--spacing", choices=SPACINGS, default="linspace",
                        help="where those steps lie in 0..T-1 (ddpm: every step). linspace: both ends, DDIM's "
                             "timesteps here so far; leading: diffusers' default; trailing: starts at T-1; "
                             "quadratic: DDIM's CIFAR-10 choice")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (the solvers are deterministic)")


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


def run(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import RayConnectionError, configure_logging
    from pipelines.tracking import TrackingError

    configure_logging()
    try:
        return _run(args)
    except (SamplesError, StatsError, InceptionWeightsError, StorageError, TrackingError, CheckpointError,
            RayConnectionError, ValueError) as error:
        log.error("%s", error)
        return 2


def _run(args: argparse.Namespace) -> int:
    from pipelines.ray_runtime import map_rows
    from pipelines.registry import load_model, resolve_model, weights_sha256
    from pipelines.tracking import connect, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    client = connect(tracking_uri)
    resolved, version = resolve_model(args.model, client)
    config = load_model(resolved, tracking_uri)[1]
    scoring = args.features != "none"
    if args.num < 1:
        raise SamplesError(f"--num must be >= 1, got {args.num}")
    if scoring and args.num < FEATURE_DIM and not args.allow_small_n:
        raise SamplesError(f"N={args.num} is smaller than the feature dimension {FEATURE_DIM}: the covariance would be "
                           "singular and the FID meaningless; use --num 50000 (or >= 2048)")
    weights, weights_sha = None, None
    if args.features == "inception":
        weights = str(find_weights(args.inception_weights))
        weights_sha = sha256_file(Path(weights))
    elif args.features == "random-init":
        weights_sha = f"random-init(seed={RANDOM_INIT_SEED})"
    reference, reference_sha = None, None
    if args.ref and scoring:
        data = read_uri(args.ref)
        reference, reference_sha = load_reference(data, args.ref), hashlib.sha256(data).hexdigest()

    storage = open_storage(args.out)
    storage.check_writable()
    steps, spacing, eta = sampler_settings(args, config.diffusion.timesteps)
    bf16 = sampling_precision_is_bf16(args, scoring)
    clip = config.diffusion.clip_denoised if args.clip is None else args.clip
    spec = SampleSpec(resolved, args.sampler, steps, eta, args.seed, args.num, args.per_tar, config.model.resolution,
                      bf16, spacing, clip)
    finished = set(prepare_output(storage, spec))
    tars = spec.tars()
    log.info("%s: %d samples of %s in %d tars (%d already there), %s %d steps (%s), seed %d, %s, %s; %d actor(s)",
             storage.uri, spec.num, resolved, len(tars), len(finished), spec.sampler, spec.steps, spec.spacing,
             spec.seed, "clip" if spec.clip else "no clip", "bf16" if spec.bf16 else "fp32", args.actors)

    rows = [{"tar": k, "start": s, "count": c, "reuse": int(k in finished)} for k, s, c in tars]
    # Bounded retries (Ray Data's default is forever): a batch that keeps failing ends as a failed job.
    stage = map_rows(SampleAndScore, {"model": resolved, "tracking_uri": tracking_uri, "spec": spec.__dict__,
                                      "out": storage.uri, "features": args.features, "weights": weights,
                                      "batch_size": args.batch_size, "threads": max(1, int(args.cpus_per_actor))},
                     rows, args.actors, args.address, num_cpus=args.cpus_per_actor, gpu=args.gpu,
                     max_restarts=ACTOR_RETRIES, max_task_retries=ACTOR_RETRIES)
    features, scores = merge_statistics(stage, spec.num, "samples")

    result = {"model": resolved, "model_weights_sha256": weights_sha256(resolved, version),
              "sampler": spec.sampler, "steps": spec.steps, "spacing": spec.spacing, "eta": spec.eta,
              "clip": spec.clip, "seed": spec.seed, "num": spec.num, "bf16": spec.bf16, "features": args.features,
              "inception_weights_sha256": weights_sha,
              "reference": args.ref, "reference_sha256": reference_sha}
    label = "fid" if args.features == "inception" else "pseudo_fid"
    if scoring:
        mu, sigma = features.mean_cov()
        if reference is not None:
            result[label] = frechet_distance(mu, sigma, *reference)
        is_label = "inception_score" if args.features == "inception" else "pseudo_inception_score"
        result[is_label], result[f"{is_label}_std"] = scores.inception_score()
    storage.write_bytes("fid.json", json.dumps(result, indent=2, sort_keys=True).encode())
    log_results(client, tracking_uri, result, version, storage, label)
    log.info("done: %s", {k: result[k] for k in result if "fid" in k or "inception_score" in k} or "samples only")
    return 0


def log_results(client, tracking_uri: str, result: dict, version, storage, label: str) -> None:
    """An MLflow evaluation run (params, metrics, the first 64 samples) and tags on the model version."""
    import mlflow

    from pipelines.tracking import experiment_id

    experiment = client.get_run(version.run_id).info.experiment_id if version and version.run_id else None
    if experiment is None:
        experiment = experiment_id(client, "ddpm-evaluations", tracking_uri)
    metrics = {k: v for k, v in result.items() if isinstance(v, float) and k not in ("eta",)}
    params = {k: v for k, v in result.items() if k not in metrics}
    with mlflow.start_run(experiment_id=experiment, run_name=f"eval-{result['sampler']}-{result['num']}",
                          tags={"ddpm.kind": "evaluation"}):
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        _, images = read_sample_tar(storage, 0)
        mlflow.log_image(image_grid(images[:64], columns=8), "samples_first_64.png")
        mlflow.log_dict(result, "fid.json")
    if version is not None and label in result:
        # For people reading the registry, one tag per kind of sample set, so that sets never overwrite each
        # other (the scheduler keeps its own records). A pseudo-FID is never written under the name FID.
        # Settings at the values the first tags were written with add nothing, so those tags keep their names.
        options = "".join([f"-{result['spacing']}" if result["spacing"] != "linspace" else "",
                           f"-eta{result['eta']:g}" if result["eta"] else "", "" if result["clip"] else "-noclip"])
        kind = (f"{result['sampler']}-{result['steps']}{options}/n{result['num']}/seed{result['seed']}/"
                f"{'bf16' if result['bf16'] else 'fp32'}")
        client.set_model_version_tag(version.name, version.version, f"{label}/{kind}", f"{result[label]:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
