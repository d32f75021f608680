import io

import numpy as np
import pytest
from PIL import Image

from ddpm_core.image_prep import ImageRejected, Preprocess, decode_rgb, sniff_format, to_rgb
from tests.datasets import encode, photo_like


def test_sniffing_reads_magic_bytes_not_names():
    image = photo_like(np.random.default_rng(0), 20, 10)
    assert sniff_format(encode(image, "JPEG")) == "jpeg"
    assert sniff_format(encode(image, "WEBP")) == "webp"
    assert sniff_format(encode(image, "PNG")) == "png"
    assert sniff_format(b"GIF89a......") is None


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_every_mode_becomes_rgb(mode):
    image = photo_like(np.random.default_rng(1), 30, 20).convert(mode if mode != "I;16" else "L")
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image).astype(np.uint16) * 257))
    assert to_rgb(image).mode == "RGB"
    assert to_rgb(image).size == (30, 20)


def test_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(rgba)).min() == 255


def test_corrupt_and_unknown_bytes_are_rejected_with_a_reason():
    good = encode(photo_like(np.random.default_rng(2), 64, 64), "JPEG")
    with pytest.raises(ImageRejected, match="jpeg decode failed"):
        decode_rgb(good[: len(good) // 3])
    with pytest.raises(ImageRejected, match="not a JPEG, PNG or WebP image"):
        decode_rgb(b"hello world!")


def test_centre_crop_then_resize_records_the_box_and_is_deterministic():
    image = photo_like(np.random.default_rng(3), 341, 256)
    prep = Preprocess(resolution=128, filter="lanczos")
    data, meta = prep.apply(image)
    again, _ = prep.apply(image)
    assert data == again
    assert meta == {"original_size": [341, 256], "crop_box": [42, 0, 298, 256], "filter": "lanczos"}
    out = Image.open(io.BytesIO(data))
    expected = image.crop((42, 0, 298, 256)).resize((128, 128), Image.Resampling.LANCZOS)
    assert out.size == (128, 128) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_box_filter_is_the_progan_4x4_average():
    image = photo_like(np.random.default_rng(4), 64, 64)
    data, _ = Preprocess(resolution=16, filter="box").apply(image)
    out = np.asarray(Image.open(io.BytesIO(data))).astype(np.float64)
    averaged = np.asarray(image, dtype=np.float64).reshape(16, 4, 16, 4, 3).mean(axis=(1, 3))
    assert np.abs(out - averaged).max() <= 1.0  # one rounding of the 4x4 mean


def test_lossless_webp_round_trips_exactly():
    image = photo_like(np.random.default_rng(5), 32, 32)
    data, _ = Preprocess(resolution=32, encoding="webp").apply(image)
    assert sniff_format(data) == "webp"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(image))


@pytest.mark.parametrize("kwargs, message", [
    ({"filter": "nearest"}, "resize filter 'nearest' is unknown"),
    ({"encoding": "jpeg"}, "image encoding 'jpeg' is unknown"),
    ({"resolution": 4}, "resolution must be >= 8"),
])
def test_bad_options_get_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Preprocess(**kwargs)
