"""Whether a reference .npz was made as our features are: the TF1 bilinear resize to 299 and the same network.

A Fréchet distance compares two sets of features only if one network saw both through one resize; clean-fid's
"clean" statistics (PIL bicubic resize) or its legacy_pytorch ones score the same images several points apart
from the TF1 resize every published FID used. Our files record how they were made (`ddpm fid-ref`: resize,
features, extractor_sha256); other tools' files do not, and clean-fid's say their mode in the file name.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import PurePosixPath

import numpy as np

from . import pixel_features

RESIZE = "tf1_bilinear_299"  # ddpm_core/inception.py's resize, recorded in every Inception reference we write
# What `ddpm fid-ref --data` names its file, by feature mode; training's quality probe looks for them in this order.
REFERENCE_NAMES = {"inception": "fid_stats.npz", "random-init": "fid_stats_pseudo.npz",
                   "pixels": "fid_stats_pixels.npz"}
# clean-fid's file names: <dataset>_<mode>_<split>_<resolution>.npz, mode clean / legacy_pytorch / legacy_tensorflow
CLEANFID_MODE = re.compile(r"_(clean|legacy_pytorch|legacy_tensorflow)_")


def recorded(data: bytes) -> dict[str, str]:
    """The provenance strings a reference .npz holds (none for pytorch-fid's, clean-fid's or ADM's files)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: str(npz[key]) for key in ("resize", "features", "extractor_sha256") if key in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return {}  # load_reference says what is wrong with the file


def resize_of(features: str) -> str:
    """How a feature mode resizes an image before its network: what its references record."""
    return pixel_features.RESIZE if features == "pixels" else RESIZE


def recorded_features(data: bytes) -> str:
    """The feature mode a reference .npz was made with, by the extractor it records (our files do; pytorch-fid,
    clean-fid and ADM files are the FID network's)."""
    extractor = recorded(data).get("extractor_sha256", "")
    if extractor == pixel_features.EXTRACTOR:
        return "pixels"
    return "random-init" if extractor.startswith("random-init") else "inception"


def provenance_warning(data: bytes, name: str, features: str) -> str | None:
    """Why the reference `name` may not compare with `features` (inception, random-init or pixels) computed here,
    or None."""
    found, resize = recorded(data), resize_of(features)
    if found.get("resize", resize) != resize:
        return f"the reference {name} was made with the {found['resize']} resize, these features with {resize}"
    if found.get("features", features) != features:
        return f"the reference {name} holds {found['features']} features, these are {features}"
    mode = CLEANFID_MODE.search(PurePosixPath(name).name)
    if not found and mode and mode.group(1) != "legacy_tensorflow":
        return (f"the reference {name} looks like clean-fid's {mode.group(1)!r} statistics (its file name): another "
                f"resize than {RESIZE}, so the score is not comparable with published FIDs; use clean-fid's "
                "legacy_tensorflow statistics or `ddpm fid-ref`")
    return None
