import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_core.presets import PRESETS
from pipelines.cli import build_parser, main

FIELDS = {"name", "resolution", "parameters", "gflops_per_image", "lr", "batch_size", "dropout", "variance",
          "random_flip", "steps", "notes"}


def test_presets_json_lists_every_preset_with_its_numbers(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(PRESETS)
    assert all(set(row) == FIELDS for row in rows.values())
    assert rows["cifar10"]["parameters"] == 35_746_307
    assert rows["lsun_church256"]["parameters"] == 113_673_219
    assert rows["cifar10"]["variance"] == "fixedlarge" and rows["celebahq256"]["variance"] == "fixedsmall"
    assert rows["cifar10"]["dropout"] == 0.1 and rows["lsun_cat256"]["lr"] == 2e-5
    assert 11 < rows["cifar10"]["gflops_per_image"] < 14
    ratio = rows["lsun_bedroom256"]["gflops_per_image"] / rows["cifar10"]["gflops_per_image"]
    assert ratio == pytest.approx(40, rel=0.1)


def test_presets_table_through_the_installed_command():
    ddpm = Path(sys.executable).parent / "ddpm"  # the console script installed beside this interpreter
    out = subprocess.run([ddpm, "presets"], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["preset", "res", "params", "GFLOPs/img"]
    cifar = next(line for line in lines if line.startswith("cifar10 "))
    assert cifar.split()[:3] == ["cifar10", "32", "35,746,307"]
    assert sum(line.split()[0] in PRESETS for line in lines[2:] if line.strip()) == len(PRESETS)


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert "presets" in commands
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"usage: ddpm {name}" in capsys.readouterr().out
