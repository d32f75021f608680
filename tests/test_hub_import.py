"""`ddpm convert import --hub` through huggingface_hub, against a hub-shaped server on 127.0.0.1 (HF_ENDPOINT).

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so each run is a fresh
process with its own environment, as a user's would be.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpm_core.checkpoint import verify_model_folder
from ddpm_core.diffusers_bridge import import_folder
from tests.hub_server import HubServer
from tests.test_diffusers_bridge import legacy_folder, random_diffusers_unet, released_repo

pytest.importorskip("huggingface_hub")
ROOT = Path(__file__).resolve().parents[1]
CLI = """
import json, sys
from pipelines.cli import main
sys.exit(max([main(["convert", "import", *args]) for args in json.loads(sys.argv[1])]))
"""
OFFLINE = """
import json, sys
from ddpm_core.diffusers_bridge import BridgeError, download_hub
print(json.dumps([str(download_hub("google/ddpm-tiny-16", sys.argv[1])), str(download_hub("google/ddpm-tiny-16"))]))
try:
    download_hub("google/ddpm-never-fetched")
except BridgeError as error:
    print(error)
"""


def run(args, tmp_path, hub, **env):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
                               "HF_HUB_DISABLE_TELEMETRY": "1", **env})


def test_hub_import_pins_the_revision_prefers_safetensors_and_then_works_offline_from_the_cache(tmp_path):
    theirs, old = random_diffusers_unet("tiny", seed=21), random_diffusers_unet("tiny", seed=22)
    # Flat repos, as released: one holding both weight files (other weights in the .bin, so that the file read
    # shows), one only the .bin of the first uploads.
    modern = released_repo(theirs, tmp_path / "repos" / "tiny", safetensors_too=True)
    (modern / "diffusion_pytorch_model.bin").write_bytes(
        (legacy_folder(old, tmp_path / "old") / "diffusion_pytorch_model.bin").read_bytes())
    legacy = released_repo(old, tmp_path / "repos" / "legacy")
    with HubServer({"google/ddpm-tiny-16": modern, "google/ddpm-legacy-16": legacy}) as hub:
        imports = [["--hub", "google/ddpm-tiny-16", "--revision", "main", "--out", str(tmp_path / "tiny")],
                   ["--hub", "google/ddpm-legacy-16", "--out", str(tmp_path / "legacy")],
                   ["--hub", "google/ddpm-tiny-16", "--revision", "v9"]]
        done = run(["-c", CLI, json.dumps(imports)], tmp_path, hub)
        assert done.returncode == 2, done.stderr
        assert "cannot download google/ddpm-tiny-16@v9 from the Hub" in done.stderr
        fetched = {r.split()[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r}
        configs = ("config.json", "model_index.json", "scheduler_config.json")
        assert fetched == {f"/google/ddpm-tiny-16/resolve/{hub.commit}/{name}"
                           for name in (*configs, "diffusion_pytorch_model.safetensors")} | {
                           f"/google/ddpm-legacy-16/resolve/{hub.commit}/{name}"
                           for name in (*configs, "diffusion_pytorch_model.bin")}
        for folder, unet in ((tmp_path / "tiny", theirs), (tmp_path / "legacy", old)):
            verify_model_folder(folder)
            ours, config = import_folder(tmp_path / "repos" / folder.name)  # the same files, read locally
            assert json.loads((folder / "config.json").read_text())["preset"] == config.preset == "tiny"
            x, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5])
            with torch.no_grad():
                assert (ours(x, t) - unet(x, t).sample).abs().max().item() <= 1e-5
        before = len(hub.requests)
        offline = run(["-c", OFFLINE, hub.commit], tmp_path, hub, HF_HUB_OFFLINE="1")
        assert offline.returncode == 0, offline.stderr
        assert len(hub.requests) == before  # nothing asked of the server
    pinned, main = json.loads(offline.stdout.splitlines()[0])
    assert pinned == main and Path(pinned).name == hub.commit
    assert (Path(pinned) / "diffusion_pytorch_model.safetensors").is_file()
    assert (Path(pinned) / "scheduler_config.json").is_file()
    assert "cannot download google/ddpm-never-fetched@main from the Hub" in offline.stdout
