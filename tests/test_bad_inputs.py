"""Every command, given a bad input as a new user would: exit status 2, one log line naming the input and what
is wrong, no traceback, and nothing written or changed. Data inputs (corrupt images) are not here: they land in
rejects.parquet and the job goes on (tests/test_sharding.py, tests/test_data_plane.py)."""

import logging
from pathlib import Path

import numpy as np
import pytest

from ddpm_core.fid import save_reference
from pipelines.cli import main as ddpm
from tests.datasets import encode, make_image_folder, photo_like
from tests.models import tiny_checkpoint
from tests.test_loader import make_dataset


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good inputs (a dataset, a checkpoint, images, a reference) and bad ones, in one folder."""
    root = tmp_path_factory.mktemp("inputs")
    make_dataset(root, str(root / "data"), n=13, per_shard=6, resolution=16)
    tiny_checkpoint(root / "checkpoint")
    make_image_folder(root / "images")
    (root / "empty").mkdir()
    (root / "note.txt").write_text("not an image")
    (root / "fake.png").write_text("not an image either")
    (root / "picture.png").write_bytes(encode(photo_like(np.random.default_rng(0), 24, 20), "PNG"))
    (root / "small.npz").write_bytes(save_reference(np.zeros(64), np.eye(64)))
    (root / "ref.npz").write_bytes(save_reference(np.zeros(2048), np.eye(2048)))
    (root / "cut.npz").write_bytes((root / "ref.npz").read_bytes()[:4096])
    return root


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


R = "{root}"  # the inputs folder
SQL = ["--tracking-uri", "sqlite:///{root}-mlflow.db"]  # beside the inputs: the store may change
SAMPLE = ["--num", "16", "--allow-small-n", "--actors", "0", "--per-tar", "8", *SQL]
CASES = {
    # shard
    "shard: input folder missing": (["shard", "--source", "folder", "--input", R + "/nowhere", "--out", R + "/o"],
                                    "nowhere"),
    "shard: lsun input not an LMDB": (["shard", "--source", "lsun", "--input", R + "/empty", "--out", R + "/o"],
                                      "empty"),
    "shard: cifar10 folder without batches": (["shard", "--source", "cifar10", "--input", R + "/empty", "--out",
                                               R + "/o"], "empty"),
    "shard: resolution 0": (["shard", "--source", "folder", "--input", R + "/images", "--out", R + "/o",
                             "--resolution", "0"], "resolution"),
    "shard: per-shard 0": (["shard", "--source", "folder", "--input", R + "/images", "--out", R + "/o",
                            "--per-shard", "0"], "per-shard"),
    "shard: limit -1": (["shard", "--source", "folder", "--input", R + "/images", "--out", R + "/o",
                         "--limit", "-1"], "limit"),
    "shard: split with a slash": (["shard", "--source", "folder", "--input", R + "/images", "--out", R + "/o",
                                   "--split", "a/b"], "split"),
    "shard: output of another dataset": (["shard", "--source", "folder", "--input", R + "/images", "--out",
                                          R + "/data"], "already holds a different dataset"),
    "shard: s3 uri without bucket": (["shard", "--source", "folder", "--input", R + "/images", "--out", "s3:///x"],
                                     "has no bucket"),
    "shard: unsupported uri": (["shard", "--source", "folder", "--input", R + "/images", "--out", "gs://b/x"],
                               "unsupported storage URI 'gs://b/x'"),
    # train
    "train: dataset missing": (["train", "--preset", "tiny", "--data", R + "/nowhere", *SQL], "does not exist"),
    "train: dataset incomplete": (["train", "--preset", "tiny", "--data", R + "/empty", *SQL],
                                  "is not a complete dataset"),
    "train: resolution mismatch": (["train", "--preset", "cifar10", "--data", R + "/data", *SQL], "16×16"),
    "train: unknown --set key": (["train", "--preset", "tiny", "--data", R + "/data", "--set", "model.nope=1",
                                  *SQL], "nope"),
    "train: --set without =": (["train", "--preset", "tiny", "--data", R + "/data", "--set", "train.lr", *SQL],
                               "train.lr"),
    "train: lr nan": (["train", "--preset", "tiny", "--data", R + "/data", "--set", "train.lr=nan", *SQL],
                      "train.lr must be positive"),
    "train: workers 0": (["train", "--preset", "tiny", "--data", R + "/data", "--workers", "0", *SQL], "workers"),
    "train: unreachable MLflow": (["train", "--preset", "tiny", "--data", R + "/data", "--tracking-uri",
                                   "http://127.0.0.1:9"], "cannot reach the MLflow tracking store"),
    # sample / fid
    "sample: model missing": (["sample", "--model", R + "/nowhere", "--out", R + "/o", *SAMPLE], "nowhere"),
    "sample: model folder incomplete": (["sample", "--model", R + "/empty", "--out", R + "/o", *SAMPLE],
                                        "empty"),
    "sample: registered model missing": (["sample", "--model", "models:/ddpm-nope@candidate", "--out", R + "/o",
                                          *SAMPLE], "models:/ddpm-nope@candidate does not exist"),
    "sample: num 0": (["sample", "--model", R + "/checkpoint", "--out", R + "/o", *SAMPLE, "--num", "0"], "--num"),
    "sample: progressive num too large": (["sample", "--progressive", "--model", R + "/checkpoint", "--out",
                                           R + "/fig.png"], "--num 50000"),
    "sample: progressive out folder missing": (["sample", "--progressive", "--model", R + "/checkpoint", "--num",
                                                "2", "--out", R + "/no/fig.png"], "--out"),
    "fid: N below the feature dimension": (["fid", "--model", R + "/checkpoint", "--out", R + "/o", "--num", "16",
                                            "--ref", R + "/small.npz", *SQL], "N=16 is smaller than"),
    "fid: png as --ref": (["fid", "--model", R + "/checkpoint", "--out", R + "/o", "--ref", R + "/picture.png",
                           "--features", "random-init", *SAMPLE], "is not an .npz"),
    "fid: truncated --ref": (["fid", "--model", R + "/checkpoint", "--out", R + "/o", "--ref", R + "/cut.npz",
                              "--features", "random-init", *SAMPLE], "cut.npz is not a readable .npz"),
    "fid: --ref of the wrong shape": (["fid", "--model", R + "/checkpoint", "--out", R + "/o", "--ref",
                                       R + "/small.npz", "--features", "random-init", *SAMPLE], "has mu (64,)"),
    "fid: --ref missing": (["fid", "--model", R + "/checkpoint", "--out", R + "/o", "--ref", R + "/none.npz",
                            "--features", "random-init", *SAMPLE], "none.npz does not exist"),
    "fid: weights file not the FID network": (["fid", "--model", R + "/checkpoint", "--out", R + "/o",
                                               "--inception-weights", R + "/note.txt", *SAMPLE],
                                              "which is not the FID network"),
    "fid: steps 0": (["fid", "--model", R + "/checkpoint", "--out", R + "/o", "--sampler", "ddim", "--steps", "0",
                      "--features", "none", *SAMPLE], "steps"),
    "fid: output of other samples": (["fid", "--model", R + "/checkpoint", "--out", R + "/data", "--features",
                                      "none", *SAMPLE], "already holds other files"),
    "fid: neither --model nor --images": (["fid", "--out", R + "/o", *SAMPLE], "--model and --out are required"),
    "fid: --images and --model": (["fid", "--images", R + "/images", "--model", R + "/checkpoint", "--ref",
                                   R + "/ref.npz"], "give one of them"),
    "fid: --images without --ref": (["fid", "--images", R + "/images", "--features", "random-init", "--actors", "0"],
                                    "--images needs --ref"),
    "fid: --images folder without images": (["fid", "--images", R + "/empty", "--ref", R + "/small.npz",
                                             "--features", "random-init", "--actors", "0"], "no PNG or JPEG images"),
    "fid: --images not an image": (["fid", "--images", R + "/note.txt", "--ref", R + "/small.npz", "--features",
                                    "random-init", "--actors", "0"], "note.txt is not a folder, a PNG/JPEG file"),
    "fid: --images missing": (["fid", "--images", R + "/nowhere", "--ref", R + "/small.npz", "--features",
                               "random-init", "--actors", "0"], "nowhere does not exist"),
    "fid: --images of a PNG that is not one": (["fid", "--images", R + "/fake.png", "--ref", R + "/ref.npz",
                                                "--features", "random-init", "--actors", "0", "--allow-small-n"],
                                               "fake.png: not a JPEG, PNG or WebP image"),
    # fid-ref
    "fid-ref: dataset missing": (["fid-ref", "--data", R + "/nowhere", "--features", "random-init"],
                                 "does not exist"),
    "fid-ref: shards 0": (["fid-ref", "--data", R + "/data", "--features", "random-init", "--shards", "0"],
                          "--shards must be >= 1"),
    "fid-ref: actors -1": (["fid-ref", "--data", R + "/data", "--features", "random-init", "--actors", "-1"],
                           "--actors must be >= 0"),
    # interpolate
    "interpolate: image missing": (["interpolate", "--model", R + "/checkpoint", "--images", R + "/nowhere.png",
                                    R + "/picture.png", "--out", R + "/mix.png"], "nowhere.png"),
    "interpolate: not an image": (["interpolate", "--model", R + "/checkpoint", "--images", R + "/note.txt",
                                   R + "/picture.png", "--out", R + "/mix.png"], "note.txt"),
    "interpolate: t out of range": (["interpolate", "--model", R + "/checkpoint", "--images", R + "/picture.png",
                                     R + "/picture.png", "--t", "5000", "--out", R + "/mix.png"], "--t must be in"),
    # convert
    "convert import: folder missing": (["convert", "import", "--folder", R + "/nowhere", "--out", R + "/m"],
                                       "nowhere"),
    "convert import: not a diffusers folder": (["convert", "import", "--folder", R + "/empty", "--out", R + "/m"],
                                               "is not a diffusers folder"),
    "convert export: model missing": (["convert", "export", "--model", R + "/nowhere", "--out", R + "/hf"],
                                      "nowhere"),
    "convert register: unreachable MLflow": (["convert", "register", "--model", R + "/checkpoint",
                                              "--tracking-uri", "http://127.0.0.1:9"], "cannot reach"),
    # calibrate
    "calibrate: one model twice": (["calibrate", "--models", R + "/checkpoint", R + "/checkpoint", R + "/empty",
                                    "--out", R + "/cal", "--ref", R + "/small.npz"], "at least 3 different models"),
    "calibrate: no --ref": (["calibrate", "--models", "a", "b", "c", "--out", R + "/cal"], "give --ref"),
    # schedule
    "schedule: bad cron": (["schedule", "--model-name", "ddpm-tiny", "--cron", "61 * * * *", "--out-root",
                            R + "/eval", *SQL], "minute field"),
    "schedule: unreachable MLflow": (["schedule", "--model-name", "ddpm-tiny", "--once", "--out-root", R + "/eval",
                                      "--tracking-uri", "http://127.0.0.1:9"], "cannot reach"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_one_line_naming_it_and_changes_nothing(case, inputs, caplog, monkeypatch):
    argv, message = CASES[case]
    argv = [a.replace(R, str(inputs)) for a in argv]
    monkeypatch.setenv("DDPM_INCEPTION_DOWNLOAD", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    before = tree(inputs)
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert ddpm(argv) == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    line = errors[0].getMessage()
    assert message in line and "\n" not in line and errors[0].exc_info is None, line
    assert tree(inputs) == {k: v for k, v in tree(inputs).items() if k in before} == before, "wrote or changed"


def test_the_table_is_at_least_forty_inputs_across_every_command():
    from pipelines.cli import COMMANDS

    covered = {argv[0] for argv, _ in CASES.values()}
    # presets and fetch-weights take no data input; the demo makes its own.
    assert len(CASES) >= 40 and covered >= {name for name, *_ in COMMANDS} - {"presets", "fetch-weights", "demo"}
