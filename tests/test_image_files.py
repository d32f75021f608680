"""Images on disk for `ddpm fid --images` (ddpm_core/image_files.py) and what a reference .npz says it was made
with (ddpm_core/reference_provenance.py)."""

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from ddpm_core.fid import save_reference
from ddpm_core.image_files import ImageSetError, image_chunks, read_chunk
from ddpm_core.reference_provenance import RESIZE, provenance_warning


def png(side: int, value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_folders_and_tars_become_chunks_in_order_with_global_indices(tmp_path):
    (tmp_path / "a" / "deeper").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "a" / f"{i}.png").write_bytes(png(8, i))
    (tmp_path / "a" / "deeper" / "3.PNG").write_bytes(png(16, 3))  # another size, one level down
    (tmp_path / "a" / "notes.txt").write_text("skipped")
    with tarfile.open(tmp_path / "a" / "s.tar", "w") as tar:
        for name, value in (("1.png", 11), ("0.png", 10), ("meta.json", 0)):
            data = png(8, value) if name.endswith(".png") else b"{}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    chunks = image_chunks([str(tmp_path / "a")])
    assert [(bool(c["tar"]), c["first"], c["count"]) for c in chunks] == [(True, 0, 2), (False, 2, 4)]
    (positions, images), = read_chunk(chunks[0]["tar"], chunks[0]["files"])
    assert positions.tolist() == [0, 1] and images[:, 0, 0, 0].tolist() == [10, 11]  # members in name order
    by_size = read_chunk(chunks[1]["tar"], chunks[1]["files"])  # one group per size: a batch has one
    assert [(p.tolist(), i.shape[1:3], i[:, 0, 0, 0].tolist()) for p, i in by_size] == [
        ([0, 1, 2], (8, 8), [0, 1, 2]), ([3], (16, 16), [3])]


def test_a_file_that_is_not_an_image_is_named(tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"nope")
    (chunk,) = image_chunks([str(tmp_path)])
    with pytest.raises(ImageSetError, match="fake.jpg: not a JPEG, PNG or WebP image"):
        read_chunk(chunk["tar"], chunk["files"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageSetError, match="no PNG or JPEG images"):
        image_chunks([str(tmp_path / "empty")])


@pytest.mark.parametrize("name, provenance, features, warned", [
    ("fid_stats.npz", {"resize": RESIZE, "features": "inception"}, "inception", None),
    ("fid_stats.npz", {"resize": "pil_bicubic_299", "features": "inception"}, "inception", "pil_bicubic_299 resize"),
    ("fid_stats_pseudo.npz", {"resize": RESIZE, "features": "random-init"}, "inception", "holds random-init"),
    ("fid_stats_pixels.npz", {"resize": "area_8x8", "features": "pixels"}, "pixels", None),
    ("fid_stats_pixels.npz", {"resize": "area_8x8", "features": "pixels"}, "random-init", "area_8x8 resize"),
    ("fid_stats.npz", {"resize": RESIZE, "features": "inception"}, "pixels", "these features with area_8x8"),
    ("lsun_bedroom_clean_trainfull_256.npz", {}, "inception", "clean-fid's 'clean' statistics"),
    ("cifar10_legacy_pytorch_train_32.npz", {}, "inception", "'legacy_pytorch'"),
    ("cifar10_legacy_tensorflow_train_32.npz", {}, "inception", None),
    ("fid_stats_lsun_train.npz", {}, "inception", None),  # pytorch-fid's: made as ours, records nothing
])
def test_a_reference_of_another_resize_or_network_is_warned_of(name, provenance, features, warned):
    data = save_reference(np.zeros(4), np.eye(4), **provenance)
    found = provenance_warning(data, f"s3://bucket/{name}", features)
    assert found is None if warned is None else warned in found
