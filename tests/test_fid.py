import hashlib
import http.server
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpm_core.fid import (
    FeatureStats,
    ScoreStats,
    StatsError,
    frechet_distance,
    image_statistics,
    load_reference,
    merge_statistics,
    save_reference,
    statistics_row,
)
from ddpm_core.inception import (
    DOWNLOAD_ENV,
    TRUSTED_ENV,
    URL_ENV,
    FIDInception,
    InceptionWeightsError,
    feature_dim,
    feature_network,
    find_weights,
)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_is_zero_for_identical_statistics():
    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=64), random_spd(rng, 64)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=32), rng.normal(size=32)
    a, b = rng.uniform(0.1, 2, 32), rng.uniform(0.1, 2, 32)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_frechet_distance_agrees_with_scipy_sqrtm(seed):
    rng = np.random.default_rng(seed)
    d = 128
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), random_spd(rng, d), random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-6)


def test_merged_shard_statistics_equal_one_pass():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(1000, 16)).astype(np.float32) + 3
    merged = FeatureStats.empty(16)
    for part in np.array_split(features, 7):
        merged = merged + FeatureStats.of(part)
    whole = FeatureStats.of(features)
    assert merged.n == whole.n == 1000
    np.testing.assert_allclose(merged.total, whole.total, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-12)
    mu, sigma = merged.mean_cov()
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-8, atol=1e-10)


def test_inception_score_streams_by_split_and_has_its_known_extremes():
    n, classes = 1000, 10
    uniform = ScoreStats.of(np.zeros((n, classes)), np.arange(n))
    assert uniform.inception_score()[0] == pytest.approx(1.0)
    confident = np.full((n, classes), -50.0)
    confident[np.arange(n), np.arange(n) % 7] = 50.0  # sure of one class each, 7 classes used evenly
    score, _ = ScoreStats.of(confident, np.arange(n)).inception_score()
    assert score == pytest.approx(7.0, rel=1e-3)
    rng = np.random.default_rng(6)
    logits, idx = rng.normal(size=(n, classes)) * 3, np.arange(n)
    parts = ScoreStats.of(logits[:400], idx[:400], 10) + ScoreStats.of(logits[400:], idx[400:], 10)
    assert parts.inception_score() == pytest.approx(ScoreStats.of(logits, idx, 10).inception_score())


def test_reference_files_round_trip_and_bad_ones_are_refused():
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=2048), random_spd(rng, 8)
    with pytest.raises(StatsError, match=r"ref.npz has mu \(2048,\) and sigma \(8, 8\); expected"):
        load_reference(save_reference(mu, sigma), "ref.npz")
    good = save_reference(mu, np.eye(2048), source="test")
    loaded_mu, loaded_sigma = load_reference(good, "good.npz")
    assert np.array_equal(loaded_mu, mu) and np.array_equal(loaded_sigma, np.eye(2048))
    buffer = io.BytesIO()
    np.savez(buffer, mean=mu)
    with pytest.raises(StatsError, match="has no 'mu' and 'sigma'"):
        load_reference(buffer.getvalue(), "other.npz")
    buffer = io.BytesIO()
    np.savez(buffer, mu=np.array([object()], dtype=object), sigma=np.eye(2))
    with pytest.raises(StatsError, match="is not a readable .npz"):
        load_reference(buffer.getvalue(), "pickled.npz")


def test_inception_network_has_the_fid_networks_layers_and_parameter_count(monkeypatch):
    import pytorch_fid.inception as pytorch_fid

    ours = FIDInception.random_init(0)
    # pytorch-fid builds the same network independently; strict loading of our state_dict into it
    # proves every tensor name and shape agree (its download is replaced by our tensors).
    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *a, **k: ours.state_dict())
    theirs = pytorch_fid.fid_inception_v3()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 23_850_960
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    pool, logits = ours(torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8))
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)


def test_pixel_features_are_area_means_on_an_8x8_grid_and_their_statistics_have_no_inception_score():
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 16, 3), dtype=np.uint8)
    network, extractor = feature_network("pixels")
    assert extractor == "pixels(8x8)" and feature_dim("pixels") == network.dim == 192
    features, scores = image_statistics(network, images, np.arange(5), batch_size=2)
    # Each feature: the mean of a 4x2 block of one channel, in [0, 1], channels first (C, 8, 8).
    expected = images.reshape(5, 8, 4, 8, 2, 3).mean(axis=(2, 4)).transpose(0, 3, 1, 2).reshape(5, 192) / 255
    assert scores is None and features.n == 5
    np.testing.assert_allclose(features.total, expected.sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(features.outer, expected.T @ expected, rtol=1e-5)
    row = {key: batch[0] for key, batch in statistics_row(features, scores, extractor).items()}  # a Ray Data row
    assert set(row) == {"n", "total", "outer", "extractor"}
    merged, no_scores, found = merge_statistics([row, row], 10, "images")
    assert (merged.n, no_scores, found) == (10, None, "pixels(8x8)")


def test_random_init_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b = FIDInception.random_init(3), FIDInception.random_init(3)
    assert torch.equal(torch.rand(1), expected_next)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_or_wrong_weights_get_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv(DOWNLOAD_ENV, "0")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    with pytest.raises(InceptionWeightsError, match=r"no Inception weights for FID: looked at .*inception.*Put the "
                                                    r"FID.*downloading is off \(DDPM_INCEPTION_DOWNLOAD=0\)"):
        find_weights()
    fake = tmp_path / "inception.pth"
    torch.save(FIDInception.random_init(0).state_dict(), fake)
    with pytest.raises(InceptionWeightsError, match=r"have sha256 [0-9a-f]{64}, which is not the FID network"):
        FIDInception.from_weights(fake)


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A local HTTP server publishing one file; returns (url, the bytes it serves, the paths requested)."""
    body, requested = os.urandom(4096), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv(DOWNLOAD_ENV, raising=False)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path))
    monkeypatch.setenv(URL_ENV, f"http://127.0.0.1:{server.server_port}/fid_weights/pt_inception.pth")
    yield os.environ[URL_ENV], body, requested
    server.shutdown()
    server.server_close()


def test_weights_are_fetched_on_first_use_verified_and_then_read_from_the_cache(weights_server, tmp_path,
                                                                                 monkeypatch):
    url, body, requested = weights_server
    monkeypatch.setenv(TRUSTED_ENV, hashlib.sha256(body).hexdigest())  # the served file stands in for the real one
    found = find_weights()
    assert found == tmp_path / "inception" / "pt_inception-2015-12-05-6726825d.pth" and found.read_bytes() == body
    assert find_weights() == found and requested == ["/fid_weights/pt_inception.pth"]  # once only


def test_a_download_with_the_wrong_sha256_is_deleted_and_refused(weights_server, tmp_path):
    url, body, requested = weights_server
    with pytest.raises(InceptionWeightsError, match=rf"downloaded from {url} has sha256 "
                                                    rf"{hashlib.sha256(body).hexdigest()}, which is not the FID "
                                                    r"network .*deleted it, refusing to use it"):
        find_weights()
    assert requested and list((tmp_path / "inception").iterdir()) == []


def test_opting_out_downloads_nothing_and_fetch_weights_preseeds_the_cache(weights_server, tmp_path, monkeypatch,
                                                                           capsys):
    from pipelines.cli import main as ddpm

    url, body, requested = weights_server
    monkeypatch.setenv(DOWNLOAD_ENV, "0")
    with pytest.raises(InceptionWeightsError, match="downloading is off"):
        find_weights()
    assert requested == []
    monkeypatch.setenv(TRUSTED_ENV, hashlib.sha256(body).hexdigest())
    monkeypatch.delenv(URL_ENV)
    assert ddpm(["fetch-weights", "--url", url]) == 0
    cached = tmp_path / "inception" / "pt_inception-2015-12-05-6726825d.pth"
    assert cached.read_bytes() == body and str(cached) in capsys.readouterr().out
    assert find_weights() == cached and len(requested) == 1


WEIGHTS = os.environ.get("DDPM_INCEPTION_WEIGHTS")


@pytest.mark.skipif(not WEIGHTS or not Path(WEIGHTS).is_file(),
                    reason="the FID Inception weights are not on this machine (set DDPM_INCEPTION_WEIGHTS)")
def test_real_weights_reproduce_torch_fidelitys_features():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ours, _ = FIDInception.from_weights(WEIGHTS)
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=WEIGHTS)
    images = torch.randint(0, 256, (4, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for a, b in zip(ours(images), reference(images)):
        assert torch.allclose(a, b, atol=1e-5)
