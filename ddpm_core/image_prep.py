"""Turn one source image into one training image: decode, orient, convert to RGB, centre-crop, resize, encode.

LSUN follows StyleGAN2's `create_lsun` as DDPM did (centre square crop, then LANCZOS to 256);
CelebA-HQ 1024→256 uses BOX, which equals the ProGAN pyramid's two 2×2 averages with one rounding.
Encodings are lossless (PNG by default, or lossless WebP) and deterministic. An image over MAX_PIXELS
is rejected from its header, before it is decoded.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, features

from .errors import UserError

FILTERS = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}
ENCODINGS = ("png", "webp")
# An 8K square: above any camera's photo, and 200 MB once decoded to RGB. PIL itself only warns below
# twice its own limit (179 Mpx), and a few-KB PNG can declare 150 Mpx.
MAX_PIXELS = 8192 * 8192


class PreprocessError(UserError, ValueError):
    """Preprocessing settings that cannot be used (a resolution, filter or encoding), naming the setting."""


class ImageRejected(ValueError):
    """An input that cannot become a training image; the reason goes to rejects.parquet."""


def sniff_format(data: bytes) -> str | None:
    """The container format from the magic bytes (LSUN values are JPEG or WebP whatever the docs say)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def decode_rgb(data: bytes) -> tuple[Image.Image, str]:
    """Decode JPEG/PNG/WebP bytes to an upright RGB image (EXIF orientation applied); transparent pixels
    are composited onto white."""
    kind = sniff_format(data)
    if kind is None:
        raise ImageRejected(f"not a JPEG, PNG or WebP image (first bytes {data[:12].hex()})")
    try:
        image = Image.open(io.BytesIO(data))  # the header only: nothing is decoded yet
        if image.width * image.height > MAX_PIXELS:
            raise ImageRejected(f"{image.width}×{image.height} pixels is over the {MAX_PIXELS:,}-pixel limit: "
                                "not decoded")
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except ImageRejected:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure is a rejected input
        raise ImageRejected(f"{kind} decode failed: {error}") from None
    return to_rgb(image), kind


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the top 8 bits rather than clipping at 255.
        array = np.asarray(image, dtype=np.uint32) >> 8
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


@dataclass(frozen=True)
class Preprocess:
    """Centre square crop, resize to `resolution` with `filter`, encode as `encoding`."""

    resolution: int = 256
    filter: str = "lanczos"
    encoding: str = "png"

    def __post_init__(self) -> None:
        if self.resolution < 8:
            raise PreprocessError(f"resolution must be >= 8, got {self.resolution}")
        if self.filter not in FILTERS:
            raise PreprocessError(f"resize filter {self.filter!r} is unknown; choose one of {', '.join(FILTERS)}")
        if self.encoding not in ENCODINGS:
            raise PreprocessError(f"image encoding {self.encoding!r} is unknown; choose png or webp")
        if self.encoding == "webp" and not features.check("webp"):
            raise PreprocessError("this Pillow build has no WebP support; use --encoding png")

    def describe(self) -> dict:
        return {**asdict(self), "crop": "centre square", "pillow": Image.__version__}

    def apply(self, image: Image.Image) -> tuple[bytes, dict]:
        """The encoded training image and its record (original size, crop box, filter)."""
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        box = (left, top, left + side, top + side)
        square = image.crop(box)
        if side != self.resolution:
            square = square.resize((self.resolution, self.resolution), FILTERS[self.filter])
        buffer = io.BytesIO()
        if self.encoding == "png":
            square.save(buffer, format="PNG", compress_level=6)
        else:
            square.save(buffer, format="WEBP", lossless=True, quality=100, method=4, exact=True)
        meta = {"original_size": [width, height], "crop_box": list(box), "filter": self.filter}
        return buffer.getvalue(), meta
