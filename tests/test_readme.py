"""The README is a quick start whose every command runs and whose every link stays in the repository."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from pipelines import cli

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
# `ray job submit … -- python pipelines/<entry point>` takes the flags of a `ddpm` subcommand (docs/cluster.md).
ENTRY_POINTS = {
    "pipelines/shard_lsun.py": ["shard", "--source", "lsun"],
    "pipelines/shard_celebahq.py": ["shard", "--source", "celebahq"],
    "pipelines/shard.py": ["shard"],
    "pipelines/train.py": ["train"],
    "pipelines/train_lsun.py": ["train"],
    "pipelines/train_celebahq.py": ["train"],
    "pipelines/sample_fid.py": ["fid"],
    "pipelines/fid_reference.py": ["fid-ref"],
}
LINK = re.compile(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"")


def shell_lines(markdown: str) -> list[str]:
    """The commands of the fenced bash blocks, continuation lines joined and comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words:
                lines.append(words)
    return lines


def ddpm_commands(markdown: str) -> list[list[str]]:
    """Every `ddpm …` line, and every `ray job submit … -- python pipelines/…` line as its `ddpm` twin."""
    commands = []
    for words in shell_lines(markdown):
        if words[0] == "ddpm":
            commands.append(words[1:])
        elif words[:3] == ["ray", "job", "submit"] and "python" in words:
            script, *flags = words[words.index("python") + 1:]
            commands.append(ENTRY_POINTS[script] + flags)
    return commands


def test_the_readme_is_a_quick_start_with_the_two_commands_first():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_block = shell_lines(text)[:2]
    assert first_block == [["make", "demo"], ["make", "test"]]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)


@pytest.mark.parametrize("argv", ddpm_commands(README.read_text()), ids=lambda argv: " ".join(argv[:3]))
def test_every_readme_command_parses_and_its_help_runs(argv):
    args = cli.build_parser().parse_args(argv)  # every flag and choice of the line is the command's
    assert args.command == argv[0]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        cli.main(argv + ["--help"])
    assert exit_.value.code == 0
    assert f"ddpm {argv[0]}" in out.getvalue()


def test_the_readme_runs_at_least_every_core_verb():
    verbs = {argv[0] for argv in ddpm_commands(README.read_text())}
    assert {"shard", "train", "fid-ref", "fid", "sample", "schedule", "presets", "fetch-weights"} <= verbs


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda page: page.name)
def test_no_link_leaves_the_repository(page):
    targets = [a or b for a, b in LINK.findall(page.read_text())]
    for target in targets:
        path = target.split("#")[0]
        assert not re.match(r"[a-z]+:", path), f"{page.name} links outside the repository: {target}"
        if path:
            resolved = (page.parent / path).resolve()
            assert resolved.is_relative_to(REPO), f"{page.name}: {target} leaves the repository"
            assert resolved.exists(), f"{page.name}: {target} does not exist"


def test_the_presets_table_in_the_docs_is_what_ddpm_presets_prints():
    table = re.search(r"```\n(preset .*?)\n```", (REPO / "docs" / "core.md").read_text(), flags=re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["presets"]) == 0
    assert table == out.getvalue().split("\n\nGFLOPs")[0]
