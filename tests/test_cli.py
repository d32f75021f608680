import argparse
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_core.presets import PRESETS, get_preset
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


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(path, parser) of every command and nested subcommand (`convert import`, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommands(sub, (*prefix, name))


def test_every_flag_of_every_subcommand_has_help_and_shows_its_default(capsys):
    found = list(subcommands(build_parser()))
    assert {"demo", "train", "fid", "convert import"} <= {" ".join(path) for path, _ in found}
    missing = []
    for path, parser in found:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        page = capsys.readouterr().out
        assert page.startswith(f"usage: ddpm {' '.join(path)}")
        formatter = parser._get_formatter()
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or action.dest in ("help", "version"):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if not text or ("default" not in text.lower() and not text.endswith("(required)")):
                missing.append(f"ddpm {' '.join(path)} {action.option_strings[0]}: {text!r}")
    assert not missing, "\n".join(missing)


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"ddpm {importlib.metadata.version('ddpm-ray')}"


def test_print_config_is_the_preset_with_the_overrides_and_needs_no_data(capsys):
    assert main(["train", "--preset", "cifar10", "--set", "train.lr=1e-5", "--set", "model.dropout=0.2",
                 "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = get_preset("cifar10").with_overrides(["train.lr=1e-5", "model.dropout=0.2"])
    assert printed == json.loads(json.dumps(expected.to_dict()))  # JSON has lists where the config has tuples
    assert printed["train"]["lr"] == 1e-5 and printed["model"]["dropout"] == 0.2
    assert printed["train"]["batch_size"] == get_preset("cifar10").train.batch_size == 128


def test_one_shape_per_concept_across_commands():
    parser = build_parser()
    commands = dict(subcommands(parser))
    for name in ("train", "sample", "fid", "fid-ref", "schedule", "calibrate"):
        options = {option for action in commands[(name,)]._actions for option in action.option_strings}
        assert "--cpus-per-worker" in options, name
        assert name in ("fid-ref", "calibrate") or {"--bf16", "--no-bf16"} <= options, name
    train = commands[("train",)]
    assert train.parse_args(["--preset", "tiny"]).bf16 is True
    assert train.parse_args(["--preset", "tiny", "--no-bf16"]).bf16 is False
    fid = commands[("fid",)]
    assert fid.parse_args(["--model", "m", "--out", "o"]).cpus_per_worker == 1.0
    # The sampling jobs' former flag name still works, with a warning.
    assert fid.parse_args(["--model", "m", "--out", "o", "--cpus-per-actor", "0.5"]).cpus_per_worker == 0.5
