"""The conventions every command's flags share: each shows its default, and one name per concept.

`ddpm <command> --help` and `python pipelines/<job>.py --help` both format with `DefaultsFormatter`;
`add_cpus_argument` is the one CPU-per-process flag of the jobs that place Ray workers or actors.
"""

from __future__ import annotations

import argparse
import re
import sys

# A help text that already says its default (in words, e.g. "default: MLFLOW_TRACKING_URI") is left as written.
STATES_DEFAULT = re.compile(r"\(default|default:", re.IGNORECASE)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where the help text already says the default; a required flag,
    which has none, says `(required)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        return text if STATES_DEFAULT.search(text) else super()._get_help_string(action)


class DeprecatedAlias(argparse.Action):
    """An old flag name, hidden from --help: stores into the new flag's destination, with a warning."""

    def __init__(self, option_strings, dest, new_name: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.new_name = new_name

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new_name}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_tracking_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")


def add_cpus_argument(parser: argparse.ArgumentParser, process: str) -> None:
    """--cpus-per-worker: the CPUs Ray reserves for each `process` (a DDP worker, a sampling or scoring actor), and
    its threads. --cpus-per-actor, the sampling jobs' former name for it, still works (with a warning)."""
    parser.add_argument("--cpus-per-worker", type=float, default=1.0,
                        help=f"CPUs Ray reserves per {process}; also its torch threads")
    parser.add_argument("--cpus-per-actor", type=float, dest="cpus_per_worker", action=DeprecatedAlias,
                        new_name="--cpus-per-worker")
