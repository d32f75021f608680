"""Ray job: sample N images from a model with a pool of Ray Data actors, and score them (FID, IS).

    ray job submit --working-dir . -- python pipelines/sample_fid.py \\
        --model models:/ddpm-lsun_bedroom256@candidate --num 50000 --out s3://bucket/samples/v3 \\
        --ref s3://bucket/lsun-bedroom-256/fid_stats.npz --actors 8 --gpu

Rows of the Ray Data stage are sample tars (index ranges); each actor holds the model and the
Inception network, samples its tars (or re-reads finished ones), and returns exactly mergeable
float64 statistics. Results: fid.json (pipelines.evaluation.EvaluationResult), an MLflow run, and
tags on the model version.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys

import numpy as np
import torch

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.errors import ArgumentError, UserError
from ddpm_core.fid import (
    FEATURE_DIM,
    FeatureStats,
    ScoreStats,
    frechet_distance,
    image_statistics,
    load_reference,
    merge_statistics,
    statistics_row,
)
from ddpm_core.inception import feature_network
from ddpm_core.output_lock import OutputLock
from ddpm_core.pixels import image_grid, to_uint8
from ddpm_core.sampling import (
    LOCK,
    SPEC,
    SamplesError,
    SampleSpec,
    prepare_output,
    read_sample_tar,
    sample_images,
    write_sample_tar,
)
from ddpm_core.storage import Storage, open_storage, read_uri
from pipelines.evaluation import (
    EvaluationResult,
    add_sampler_arguments,
    clip_setting,
    sampler_settings,
    sampling_precision_is_bf16,
)
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.sample")


class SampleAndScore:
    """A Ray Data actor: holds the model and the Inception network; one input row is one sample tar."""

    def __init__(self, model: str, tracking_uri: str, spec: dict, out: str, features: str, weights: str | None,
                 batch_size: int, threads: int):
        from pipelines.mlflow_registry import load_model

        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, self.config = load_model(model, tracking_uri)
        self.model.to(self.device)
        self.diffusion = GaussianDiffusion.from_config(self.config.diffusion)
        self.spec, self.storage, self.batch_size = SampleSpec(**spec), open_storage(out), batch_size
        network, self.extractor = feature_network(features, weights)  # this node's file (ddpm_core/inception.py)
        self.inception = None if network is None else network.to(self.device)

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
        return statistics_row(*image_statistics(self.inception, images, np.asarray(indices), device=self.device),
                              self.extractor)


def add_arguments(parser: argparse.ArgumentParser, features_default: str = "inception") -> None:
    parser.add_argument("--model", required=True, help="models:/<name>@<alias>, models:/<name>/<version> or a "
                                                       "checkpoint directory")
    parser.add_argument("--out", required=True, help="where the sample tars go: local path or s3://")
    add_sampler_arguments(parser, features_default)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    return run_job(evaluate, args)


def evaluate(args: argparse.Namespace) -> int:
    """Sample (resuming what is there), score, and record: fid.json, an MLflow run, a version tag."""
    from pipelines.mlflow_registry import open_model
    from pipelines.mlflow_tracking import connect

    model = open_model(args.model, args.tracking_uri)
    client = model.client or connect(model.tracking_uri)  # the evaluation run is logged for any model
    config = model.load()[1]
    scoring = args.features != "none"
    if args.num < 1:
        raise ArgumentError(f"--num must be >= 1, got {args.num}")
    if scoring and args.num < FEATURE_DIM and not args.allow_small_n:
        raise SamplesError(f"N={args.num} is smaller than the feature dimension {FEATURE_DIM}: the covariance would be "
                           "singular and the FID meaningless; use --num 50000 (or >= 2048)")
    reference, reference_sha = None, None
    if args.ref and scoring:
        data = read_uri(args.ref)
        reference, reference_sha = load_reference(data, args.ref), hashlib.sha256(data).hexdigest()
    storage = open_storage(args.out)
    storage.check_writable()
    steps, spacing, eta = sampler_settings(args, config.diffusion.timesteps)
    spec = SampleSpec(model.resolved, args.sampler, steps, eta, args.seed, args.num, args.per_tar,
                      config.model.resolution, sampling_precision_is_bf16(args, scoring), spacing,
                      clip_setting(args, config.diffusion.clip_denoised))
    features, scores, extractor = sample(args, spec, storage, model.tracking_uri)
    result = EvaluationResult.of_samples(spec, args.features, model.weights_sha256, extractor, args.ref, reference_sha)
    if scoring:
        mu, sigma = features.mean_cov()
        result = result.scored(frechet_distance(mu, sigma, *reference) if reference is not None else None,
                               scores.inception_score())
    storage.write_bytes("fid.json", result.to_bytes())
    try:
        log_results(client, model, result, storage)
    except Exception:  # noqa: BLE001 - the batch's result is fid.json; MLflow only mirrors it
        log.warning("the scores are in %s; mirroring them to MLflow failed (the batch still succeeds):",
                    storage.url("fid.json"), exc_info=True)
    log.info("done: %s", result.scores() or "samples only")
    return 0


def sample(args: argparse.Namespace, spec: SampleSpec, storage: Storage,
           tracking_uri: str) -> tuple[FeatureStats, ScoreStats, str | None]:
    """The sample tars of `spec` (finished ones re-read) on a pool of actors, their merged statistics and the
    extractor that computed them (each actor resolves the Inception weights on its own node)."""
    from pipelines.ray_runtime import map_rows

    with OutputLock(storage, LOCK, "sampling job", SamplesError):
        fresh = not storage.exists(SPEC)
        finished = set(prepare_output(storage, spec))
        tars = spec.tars()
        log.info("%s: %d samples of %s in %d tars (%d already there), %s %d steps (%s), seed %d, %s, %s; %d "
                 "actor(s)", storage.uri, spec.num, spec.model, len(tars), len(finished), spec.sampler, spec.steps,
                 spec.spacing, spec.seed, "clip" if spec.clip else "no clip", "bf16" if spec.bf16 else "fp32",
                 args.actors)
        rows = [{"tar": k, "start": s, "count": c, "reuse": int(k in finished)} for k, s, c in tars]
        actor = {"model": spec.model, "tracking_uri": tracking_uri, "spec": spec.__dict__, "out": storage.uri,
                 "features": args.features, "weights": args.inception_weights, "batch_size": args.batch_size,
                 "threads": max(1, int(args.cpus_per_actor))}
        try:
            return merge_statistics(map_rows(SampleAndScore, actor, rows, args.actors, args.address,
                                             num_cpus=args.cpus_per_actor, gpu=args.gpu), spec.num, "samples")
        except UserError:
            if fresh and not storage.list("samples/"):
                storage.delete(SPEC)  # refused before any sample (e.g. no weights on a node): leave nothing
            raise


def log_results(client, model, result: EvaluationResult, storage: Storage) -> None:
    """An MLflow evaluation run (params, metrics, the first 64 samples, fid.json) and the score as a version tag."""
    from pipelines.mlflow_registry import tag_score
    from pipelines.mlflow_tracking import log_evaluation

    record = result.to_json()
    _, images = read_sample_tar(storage, 0)
    log_evaluation(client, model.tracking_uri, record, result.metrics(), model.training_run_id,
                   image_grid(images[:64], columns=8), model.version)
    if model.version is not None and result.label in record:
        tag_score(client, model.version, record, result.label)


def main(argv: list[str] | None = None) -> int:
    return command_line(__doc__.splitlines()[0], add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
