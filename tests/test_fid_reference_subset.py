"""`ddpm fid-ref --subset N --subset-seed S`: a seeded random subset of the reals (50k, as the paper's LSUN FIDs)."""

import hashlib

import numpy as np

from ddpm_core.fid import image_statistics
from ddpm_core.inception import feature_network
from pipelines.fid_reference import main as reference_main
from tests.errors import expect_one_error
from tests.test_loader import all_images, make_dataset


def test_a_subset_reference_is_the_seeds_images_recorded_in_its_provenance(tmp_path, caplog):
    data = str(tmp_path / "data")
    storage = make_dataset(tmp_path, data, n=19, per_shard=6)  # 18 usable images (one is corrupt) in 3 shards
    images = np.stack(list(all_images(storage).values()))  # in dataset order: manifest, then tar
    assert len(images) == 18

    def reference(out, *subset):
        assert reference_main(["--data", data, "--features", "random-init", "--actors", "0", "--out", out,
                               *subset]) == 0
        with np.load(tmp_path / "data" / out) as npz:
            return {key: npz[key] for key in npz.files}

    first, again, other = (reference(out, "--subset", "5", "--subset-seed", seed)
                           for out, seed in (("a.npz", "3"), ("b.npz", "3"), ("c.npz", "4")))
    chosen = np.sort(np.random.default_rng(3).choice(18, 5, replace=False))
    assert (int(first["n"]), int(first["subset_of"]), int(first["subset_seed"])) == (5, 18, 3)
    assert str(first["subset_sha256"]) == hashlib.sha256(chosen.astype("<i8").tobytes()).hexdigest()
    assert np.array_equal(first["mu"], again["mu"]) and np.array_equal(first["sigma"], again["sigma"])
    assert str(other["subset_sha256"]) != str(first["subset_sha256"]) and not np.allclose(other["mu"], first["mu"])
    # The statistics are those of exactly the seed's images.
    network, _ = feature_network("random-init", None)
    features, _ = image_statistics(network, images[chosen], chosen)
    mu, sigma = features.mean_cov()
    assert np.allclose(first["mu"], mu, rtol=1e-5, atol=1e-7) and np.allclose(first["sigma"], sigma, atol=1e-7)
    every = reference("all.npz")
    assert int(every["n"]) == 18 and "subset_seed" not in every and "subset_of" not in every

    for args, message in ((["--subset", "19"], "--subset must be between 1 and the 18 images used, got 19"),
                          (["--subset", "0"], "--subset must be between 1 and the 18 images used, got 0"),
                          (["--subset-seed", "3"], "--subset-seed goes with --subset N")):
        expect_one_error(caplog, reference_main, ["--data", data, "--features", "random-init", "--actors", "0",
                                                  *args], message)
