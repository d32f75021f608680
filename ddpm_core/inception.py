"""The FID network: TF's 2015-12-05 Inception-v3, with its reference resize, built from torch-fidelity.

The layers and the TF1-exact bilinear resize to 299 are torch-fidelity's (a well-kept PyTorch
port of the TF graph). What is ours: the weights are only ever loaded from a local file whose
sha256 is on the accepted list, with `torch.load(weights_only=True)` (torch-fidelity's own loader
unpickles), and a seeded random-init variant for development ("pseudo-FID"). On first use the
file is fetched from pytorch-fid's release into the cache and verified before it is kept, as
pytorch-fid and torch-fidelity do (they do not check the hash); DDPM_INCEPTION_DOWNLOAD=0 turns
that off for air-gapped clusters, and `ddpm fetch-weights` pre-seeds an image.

Every process that computes features resolves the weights itself (`feature_network`), from its own
environment and the accepted sha256s: a path found on a job's driver means nothing on a GPU node.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import (
    BasicConv2d,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from . import pixel_features
from .errors import UserError
from .fid import FEATURE_DIM
from .storage import sha256_file

# The pytorch-fid / torch-fidelity state_dict of the TF 2015-12-05 graph (95,628,359 bytes).
ACCEPTED_WEIGHTS = {
    "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2":
        "inception-2015-12-05 state_dict (pt_inception-2015-12-05-6726825d.pth, "
        "weights-inception-2015-12-05-6726825d.pth)",
}
WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
# sha256s of further state_dicts an operator vouches for (e.g. their own conversion of the TF graph,
# checked against published statistics); comma-separated. Every score records the sha it used.
TRUSTED_ENV = "DDPM_INCEPTION_TRUSTED_SHA256"
FILE_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
# Where the file is published (shared/reference/data_and_fid.md); DDPM_INCEPTION_URL names a mirror.
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FILE_NAMES[0]}"
URL_ENV = "DDPM_INCEPTION_URL"
DOWNLOAD_ENV = "DDPM_INCEPTION_DOWNLOAD"  # "0": never download (air-gapped clusters)
RANDOM_INIT_SEED = 0  # the pseudo-FID network's seed: its statistics compare only with this seed's
# The FID network, its random-init variant (pseudo-FID), pixel features (pixel FD, ddpm_core/pixel_features.py), none
FEATURES = ("inception", "random-init", "pixels", "none")

log = logging.getLogger(__name__)


class InceptionWeightsError(UserError):
    """No verified FID weights: says where to put the file."""


def accepted_weights() -> set[str]:
    """The sha256s that make a score an FID: the TF 2015-12-05 graph's, and any the operator vouches for."""
    trusted = {d.strip().lower() for d in os.environ.get(TRUSTED_ENV, "").split(",") if d.strip()}
    return set(ACCEPTED_WEIGHTS) | trusted


def cache_dir() -> Path:
    """This process's cache of the weights: $DDPM_CACHE/inception, else ~/.cache/ddpm-ray/inception."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm-ray") / "inception"


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """--inception-weights, else $DDPM_INCEPTION_WEIGHTS, else the cache folder (fetched into it on
    first use unless DDPM_INCEPTION_DOWNLOAD=0); verified by sha256."""
    candidates = [Path(path)] if path else []
    if not candidates and os.environ.get(WEIGHTS_ENV):
        candidates = [Path(os.environ[WEIGHTS_ENV])]
    named = bool(candidates)
    if not candidates:
        candidates = [cache_dir() / name for name in FILE_NAMES]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and not named and os.environ.get(DOWNLOAD_ENV, "1") != "0":
        return fetch_weights()
    if found is None:
        raise InceptionWeightsError(
            f"no Inception weights for FID: looked at {', '.join(str(c) for c in candidates)}. Put the FID "
            f"Inception state_dict ({FILE_NAMES[0]}, sha256 {next(iter(ACCEPTED_WEIGHTS))}) there, or pass "
            f"--inception-weights PATH / set {WEIGHTS_ENV}"
            f"{'' if named else f'; downloading is off ({DOWNLOAD_ENV}=0), `ddpm fetch-weights` fetches it'}. "
            "For development only, --features random-init gives a pseudo-FID.")
    digest = sha256_file(found)
    if digest not in accepted_weights():
        raise InceptionWeightsError(f"Inception weights {found} have sha256 {digest}, which is not the FID network "
                                    f"(accepted: {', '.join(sorted(accepted_weights()))}; see {TRUSTED_ENV})")
    return found


def fetch_weights(url: str | None = None) -> Path:
    """Download the FID weights (from `url`, else $DDPM_INCEPTION_URL, else WEIGHTS_URL) into the cache.

    The bytes are hashed as they arrive; a file whose sha256 is not accepted is deleted and refused, so
    nothing unverified is ever left where `find_weights` looks.
    """
    url, cache = url or os.environ.get(URL_ENV) or WEIGHTS_URL, cache_dir()
    final = cache / FILE_NAMES[0]
    cache.mkdir(parents=True, exist_ok=True)
    log.info("fetching the FID Inception weights from %s into %s", url, cache)
    digest = hashlib.sha256()
    # A name of its own: actors of one node may fetch at once, and each renames only its complete file.
    descriptor, partial_name = tempfile.mkstemp(dir=cache, prefix=f".{final.name}.", suffix=".partial")
    partial = Path(partial_name)
    try:
        with os.fdopen(descriptor, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        raise InceptionWeightsError(
            f"no Inception weights for FID: downloading {url} failed ({error}). Put {FILE_NAMES[0]} "
            f"(sha256 {next(iter(ACCEPTED_WEIGHTS))}) in {cache}, or pass --inception-weights PATH / set "
            f"{WEIGHTS_ENV}; {DOWNLOAD_ENV}=0 turns downloading off") from None
    if digest.hexdigest() not in accepted_weights():
        partial.unlink()
        raise InceptionWeightsError(f"the file downloaded from {url} has sha256 {digest.hexdigest()}, which is not "
                                    f"the FID network (accepted: {', '.join(sorted(accepted_weights()))}); "
                                    "deleted it, refusing to use it")
    os.chmod(partial, 0o644)
    os.replace(partial, final)
    return final


class FIDInception(nn.Module):
    """uint8 images (N, 3, H, W) → pool3 features (N, 2048) and unbiased logits (N, 1008), float32."""

    dim = FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_weights(cls, path: str | os.PathLike | None = None) -> tuple[FIDInception, str]:
        """The real FID network from a verified local file; returns it and the file's sha256."""
        found = find_weights(path)
        model = cls()
        state = torch.load(found, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise InceptionWeightsError(f"{found} does not fit the FID Inception network: "
                                        f"{str(error).splitlines()[0]}") from None
        return model, sha256_file(found)

    @classmethod
    def random_init(cls, seed: int = 0) -> FIDInception:
        """The same network with seeded random weights: development only, its numbers are pseudo-FID."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls()
            # He init keeps activations at scale through the ~40 ReLU layers (PyTorch's default shrinks
            # them to ~1e-8 by pool3, which would leave every covariance nearly singular).
            for module in model.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        return model

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FID Inception takes uint8 images (N, 3, H, W); got {images.dtype} {tuple(images.shape)}")
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(INPUT_SIZE, INPUT_SIZE),
                                                      align_corners=False)
        x = (x - 128) / 128
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3, self.MaxPool_1,
                      self.Conv2d_3b_1x1, self.Conv2d_4a_3x3, self.MaxPool_2, self.Mixed_5b, self.Mixed_5c,
                      self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e,
                      self.Mixed_7a, self.Mixed_7b, self.Mixed_7c, self.AvgPool):
            x = layer(x)
        pool = torch.flatten(x, 1)
        # The original Inception Score code takes logits without the bias, as torch-fidelity does.
        return pool, pool @ self.fc.weight.T


def feature_network(features: str, weights: str | os.PathLike | None = None) -> tuple[nn.Module | None, str | None]:
    """The network of a feature mode and the extractor its scores record, resolved in this process:
    `inception` loads `find_weights(weights)` (this process's --inception-weights, $DDPM_INCEPTION_WEIGHTS or
    cache, fetched if allowed) and records its sha256; `random-init` (pseudo-FID) records
    `random-init(seed=0)`; `pixels` (pixel FD) records `pixels(8x8)`; `none` gives (None, None)."""
    if features == "inception":
        return FIDInception.from_weights(weights)
    if features == "random-init":
        return FIDInception.random_init(RANDOM_INIT_SEED), f"random-init(seed={RANDOM_INIT_SEED})"
    if features == "pixels":
        return pixel_features.PixelFeatures(), pixel_features.EXTRACTOR
    return None, None


def feature_dim(features: str) -> int:
    """The length of a feature mode's vectors (the size of its statistics)."""
    return pixel_features.PixelFeatures.dim if features == "pixels" else FIDInception.dim
