"""Ray job: sample N images from a model with a pool of Ray Data actors, and score them (FID, IS).

    ray job submit --working-dir . -- python pipelines/sample_fid.py \\
        --model models:/ddpm-lsun_bedroom256@candidate --num 50000 --out s3://bucket/samples/v3 \\
        --ref s3://bucket/lsun-bedroom-256/fid_stats.npz --actors 8 --gpu

Rows of the Ray Data stage are sample tars (index ranges); each actor holds the model and the
Inception network, samples its tars (or re-reads finished ones), and returns exactly mergeable
float64 statistics. Results: fid.json (pipelines.evaluation.EvaluationResult), an MLflow run, and
tags on the model version.

    ddpm fid --images /data/generated --ref s3://bucket/lsun-bedroom-256/fid_stats.npz

scores images made elsewhere (PNG/JPEG folders, tars) through the same network and statistics, and prints the
scores as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys

import numpy as np
import torch

from ddpm_core.diffusion import GaussianDiffusion
from ddpm_core.errors import ArgumentError, UserError
from ddpm_core.fid import (
    FeatureStats,
    ScoreStats,
    frechet_distance,
    image_statistics,
    load_reference,
    merge_statistics,
    statistics_row,
)
from ddpm_core.image_files import image_chunks, read_chunk
from ddpm_core.inception import accepted_weights, feature_dim, feature_network
from ddpm_core.output_lock import OutputLock
from ddpm_core.pixels import image_grid, to_uint8
from ddpm_core.reference_provenance import provenance_warning
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
    PUBLISHED_N,
    EvaluationResult,
    add_sampler_arguments,
    clip_setting,
    fd_label,
    sampler_settings,
    sampling_precision_is_bf16,
    score_prefix,
)
from pipelines.job_runner import command_line, run_job

log = logging.getLogger("ddpm.sample")


class SampleAndScore:
    """A Ray Data actor: holds the model and the feature network; one input row is one sample tar."""

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
        self.network = None if network is None else network.to(self.device)

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
        if self.network is None:
            return {"n": np.array([len(indices)])}
        return statistics_row(*image_statistics(self.network, images, np.asarray(indices), device=self.device),
                              self.extractor)


class ImageStatistics:
    """A Ray Data actor: the statistics of one chunk of images on disk (`ddpm fid --images`), through the network
    and code path of `SampleAndScore`."""

    def __init__(self, features: str, weights: str | None, threads: int):
        torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        network, self.extractor = feature_network(features, weights)  # this node's file (ddpm_core/inception.py)
        self.network = network.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = int(batch["first"][0])
        features, scores = FeatureStats.empty(self.network.dim), None
        for positions, images in read_chunk(str(batch["tar"][0]), str(batch["files"][0])):
            found, found_scores = image_statistics(self.network, images, first + positions, device=self.device)
            features, scores = features + found, found_scores if scores is None else scores + found_scores
        return statistics_row(features, scores, self.extractor)


def add_arguments(parser: argparse.ArgumentParser, features_default: str = "inception") -> None:
    scores = features_default != "none"  # `ddpm fid` and this job; `ddpm sample` (features none) only samples
    unless = " (required unless --images)" if scores else ""
    parser.add_argument("--model", required=not scores, help="models:/<name>@<alias>, models:/<name>/<version> or a "
                                                             f"checkpoint directory{unless}")
    progressive = "" if scores else "; with --progressive, the PNG to write"
    parser.add_argument("--out", required=not scores, help="folder (local or s3://) of the sample tars, samples.json "
                                                           f"and fid.json{progressive}{unless}")
    if scores:
        parser.add_argument("--images", nargs="+", metavar="DIR_OR_TAR",
                            help="score these images against --ref instead of sampling: folders of PNG/JPEG files "
                                 "and tars (at any depth), e.g. a sampling job's --out; prints the scores as JSON. "
                                 "The sampler flags, --num and --seed do not apply")
    add_sampler_arguments(parser, features_default)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument("--address", default=None, help="Ray address (default RAY_ADDRESS, else a local Ray)")


def run(args: argparse.Namespace) -> int:
    return run_job(score_images if getattr(args, "images", None) else evaluate, args)


def evaluate(args: argparse.Namespace) -> int:
    """Sample (resuming what is there), score, and record: fid.json, an MLflow run, a version tag."""
    from pipelines.mlflow_registry import open_model
    from pipelines.mlflow_tracking import connect

    if args.model is None or args.out is None:
        raise ArgumentError("--model and --out are required (or --images, to score images on disk)")
    model = open_model(args.model, args.tracking_uri)
    client = model.client or connect(model.tracking_uri)  # the evaluation run is logged for any model
    config = model.load()[1]
    scoring = args.features != "none"
    if args.num < 1:
        raise ArgumentError(f"--num must be >= 1, got {args.num}")
    if scoring:
        check_small_n(args, args.num)
    reference, reference_sha = read_reference(args) if args.ref and scoring else (None, None)
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
                               scores.inception_score() if scores is not None else None)
    storage.write_bytes("fid.json", result.to_bytes())
    try:
        log_results(client, model, result, storage)
    except Exception:  # noqa: BLE001 - the batch's result is fid.json; MLflow only mirrors it
        log.warning("the scores are in %s; mirroring them to MLflow failed (the batch still succeeds):",
                    storage.url("fid.json"), exc_info=True)
    log.info("done: %s", result.scores() or "samples only")
    return 0


def read_reference(args: argparse.Namespace) -> tuple[tuple[np.ndarray, np.ndarray], str]:
    """--ref's (mu, sigma) and sha256; a warning if it was made with another resize or network than --features."""
    data = read_uri(args.ref)
    reference = load_reference(data, args.ref, feature_dim(args.features))
    if (warning := provenance_warning(data, args.ref, args.features)) is not None:
        log.warning("%s: the Fréchet distance will not mean what it says", warning)
    return reference, hashlib.sha256(data).hexdigest()


def check_small_n(args: argparse.Namespace, num: int, advice: str = "use --num 50000 (or >= 2048)") -> None:
    if num < (dim := feature_dim(args.features)) and not args.allow_small_n:
        raise SamplesError(f"N={num} is smaller than the feature dimension {dim}: the covariance would be "
                           f"singular and the FID meaningless; {advice}")


def score_images(args: argparse.Namespace) -> int:
    """`ddpm fid --images`: the Fréchet distance and Inception Score of images on disk against --ref, printed as
    JSON; the sampling job's weight checks, network and statistics (`ImageStatistics`)."""
    from pipelines.ray_runtime import map_rows

    if args.model:
        raise ArgumentError("--images scores images on disk, --model samples a model's: give one of them")
    if not args.ref:
        raise ArgumentError("--images needs --ref: the reference statistics .npz to score against")
    if args.features == "none":
        raise ArgumentError("--images scores images: --features inception, random-init or pixels")
    chunks = image_chunks(args.images)
    total = sum(chunk["count"] for chunk in chunks)
    check_small_n(args, total, "score at least 2048 images (published FIDs: 50,000)")
    reference, reference_sha = read_reference(args)
    actor = {"features": args.features, "weights": args.inception_weights, "threads": max(1, int(args.cpus_per_worker))}
    rows = map_rows(ImageStatistics, actor, chunks, args.actors, args.address, num_cpus=args.cpus_per_worker,
                    gpu=args.gpu)
    features, scores, extractor = merge_statistics(rows, total, "images")
    verified = args.features == "inception" and extractor in accepted_weights()
    prefix = score_prefix(args.features, paper_protocol=verified and total >= PUBLISHED_N)
    result = {"images": total, fd_label(prefix): frechet_distance(*features.mean_cov(), *reference)}
    if scores is not None:
        inception_score = scores.inception_score()
        result |= {f"{prefix}inception_score": inception_score[0], f"{prefix}inception_score_std": inception_score[1]}
    result |= {"features": args.features, "inception_weights_sha256": extractor, "reference": args.ref,
               "reference_sha256": reference_sha}
    print(json.dumps(result, indent=2))
    log.info("done: %s of %d images", {k: v for k, v in result.items() if k.endswith(("fid", "score"))}, total)
    return 0


def sample(args: argparse.Namespace, spec: SampleSpec, storage: Storage,
           tracking_uri: str) -> tuple[FeatureStats | None, ScoreStats | None, str | None]:
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
                 "threads": max(1, int(args.cpus_per_worker))}
        try:
            return merge_statistics(map_rows(SampleAndScore, actor, rows, args.actors, args.address,
                                             num_cpus=args.cpus_per_worker, gpu=args.gpu), spec.num, "samples")
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
