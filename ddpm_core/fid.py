"""FID and Inception Score from streamed, exactly mergeable statistics.

Features are accumulated as raw moments (n, Σx, ΣxxT) in float64, so statistics computed on many
actors merge by plain addition into exactly what one pass would give. The Fréchet distance
‖μ₁-μ₂‖² + tr Σ₁ + tr Σ₂ - 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½ is computed with symmetric eigen-decompositions,
which stay real and stable where scipy's general `sqrtm` can return complex noise. The Inception
Score exp(E_x KL(p(y|x) || p(y))) is streamed per split as (n, Σ p(y|x), Σ Σ_y p log p).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import UserError, first_line
from .progress import track

FEATURE_DIM = 2048


class StatsError(UserError):
    """Statistics or a reference file that cannot be used, with the reason."""


@dataclass
class FeatureStats:
    """Raw moments of a set of feature vectors, in float64."""

    n: int
    total: np.ndarray  # Σx, (d,)
    outer: np.ndarray  # ΣxxT, (d, d)

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureStats:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureStats:
        x = np.asarray(features, dtype=np.float64)
        return cls(len(x), x.sum(axis=0), x.T @ x)

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(self.n + other.n, self.total + other.total, self.outer + other.outer)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """μ and the unbiased Σ (÷ n-1), as pytorch-fid, clean-fid and ADM compute them."""
        if self.n < 2:
            raise StatsError(f"need at least 2 feature vectors for a covariance, have {self.n}")
        mu = self.total / self.n
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return mu, sigma


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise StatsError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


@dataclass
class ScoreStats:
    """Per-split sums for the Inception Score; split k holds the images with index % splits == k."""

    n: np.ndarray  # (splits,)
    prob_sum: np.ndarray  # (splits, classes): Σ p(y|x)
    plogp_sum: np.ndarray  # (splits,): Σ_x Σ_y p log p

    @classmethod
    def empty(cls, classes: int, splits: int = 10) -> ScoreStats:
        return cls(np.zeros(splits, np.int64), np.zeros((splits, classes)), np.zeros(splits))

    @classmethod
    def of(cls, logits: np.ndarray, indices: np.ndarray, splits: int = 10) -> ScoreStats:
        logits = np.asarray(logits, np.float64)
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        plogp = (p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
        stats = cls.empty(p.shape[1], splits)
        split = np.asarray(indices) % splits
        np.add.at(stats.n, split, 1)
        np.add.at(stats.prob_sum, split, p)
        np.add.at(stats.plogp_sum, split, plogp)
        return stats

    def __add__(self, other: ScoreStats) -> ScoreStats:
        return ScoreStats(self.n + other.n, self.prob_sum + other.prob_sum, self.plogp_sum + other.plogp_sum)

    def inception_score(self) -> tuple[float, float]:
        """Mean and standard deviation of exp(E KL) over the splits (10 splits, as the original code)."""
        if (self.n == 0).any():
            raise StatsError(f"every Inception Score split needs images; split sizes are {self.n.tolist()}")
        marginal = self.prob_sum / self.n[:, None]
        entropy_marginal = (marginal * np.log(np.clip(marginal, 1e-300, None))).sum(axis=1)
        scores = np.exp(self.plogp_sum / self.n - entropy_marginal)
        return float(scores.mean()), float(scores.std())


def save_reference(mu: np.ndarray, sigma: np.ndarray, **provenance) -> bytes:
    """An .npz with `mu` and `sigma` (read by pytorch-fid, clean-fid, ADM) plus provenance strings."""
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, **{k: np.asarray(str(v)) for k, v in provenance.items()})
    return buffer.getvalue()


def load_reference(data: bytes, name: str, dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """`mu` and `sigma` of a reference .npz (ours, pytorch-fid's, clean-fid's or ADM's); never unpickles."""
    if not data.startswith(b"PK"):  # an .npz is a zip; np.load would otherwise talk of pickles
        raise StatsError(f"reference file {name} is not an .npz (a zip of arrays); it starts with {data[:8]!r}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            mu, sigma = npz["mu"], npz["sigma"]
    except KeyError:
        raise StatsError(f"reference file {name} has no 'mu' and 'sigma' arrays") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise StatsError(f"reference file {name} is not a readable .npz: {first_line(error)}") from None
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise StatsError(f"reference file {name} has mu {mu.shape} and sigma {sigma.shape}; expected ({dim},) and "
                         f"({dim}, {dim})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise StatsError(f"reference file {name} holds non-finite values")
    return mu.astype(np.float64), sigma.astype(np.float64)


def image_statistics(network, images: np.ndarray, indices: np.ndarray, batch_size: int = 50,
                     device: str = "cpu") -> tuple[FeatureStats, ScoreStats | None]:
    """Feature moments (pool3, or pixel features) and Inception Score sums of uint8 images (N, H, W, 3) with their
    global indices; no score sums from a network without logits (ddpm_core/pixel_features.py)."""
    import torch

    features, scores = FeatureStats.empty(network.dim), None
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
        pool, logits = network(batch.to(device))
        features = features + FeatureStats.of(pool.double().cpu().numpy())
        if logits is not None:
            found = ScoreStats.of(logits.double().cpu().numpy(), indices[start:start + batch_size])
            scores = found if scores is None else scores + found
    return features, scores


def statistics_row(features: FeatureStats, scores: ScoreStats | None, extractor: str) -> dict[str, np.ndarray]:
    """Statistics as one row of a Ray Data stage (or of its in-process stand-in), exactly mergeable, with the
    extractor that computed them (the weights' sha256, `random-init(seed=0)` or `pixels(8x8)`)."""
    row = {"n": np.array([features.n]), "total": features.total[None], "outer": features.outer[None],
           "extractor": np.array([extractor])}
    if scores is not None:
        row.update(is_n=scores.n[None], is_prob=scores.prob_sum[None], is_plogp=scores.plogp_sum[None])
    return row


def merge_statistics(rows: Iterable[dict], total: int,
                     what: str) -> tuple[FeatureStats | None, ScoreStats | None, str | None]:
    """The sum of `statistics_row` rows (a row with only `n` counts images without statistics) and their one
    extractor (None, None, None without statistics; no ScoreStats from a network without logits), showing
    progress as `what done/total` (progress.py). Rows computed by different networks (nodes holding different
    weights files) are refused: their sum would be no one's statistics."""
    features = scores = None
    extractors: set[str] = set()
    for row in track(rows, total, what, count=lambda row: int(row["n"])):
        if "total" in row:
            found = FeatureStats(int(row["n"]), row["total"], row["outer"])
            features = found if features is None else features + found
            if "is_n" in row:
                found_scores = ScoreStats(row["is_n"], row["is_prob"], row["is_plogp"])
                scores = found_scores if scores is None else scores + found_scores
            extractors.add(str(row["extractor"]))
    if len(extractors) > 1:
        raise StatsError(f"the {what} were scored by different feature networks ({', '.join(sorted(extractors))}): "
                         "give every node the same Inception weights file")
    return features, scores, next(iter(extractors), None)
