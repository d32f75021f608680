"""How every job runs as a command: logging, its argument parser, and the one exit path for user errors.

A job module defines `add_arguments(parser)` and `run(args)`; `run` hands its body to `run_job`. A
`UserError` (ddpm_core/errors.py) ends the job with one log line and exit status 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from ddpm_core.errors import UserError
from pipelines.arguments import DefaultsFormatter

log = logging.getLogger("ddpm")


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_job(body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """`body(args)`'s exit status (None is 0); a UserError is logged as one line and gives 2."""
    configure_logging()
    try:
        return body(args) or 0
    except UserError as error:
        log.error("%s", error)
        return 2


def command_line(description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                 run: Callable[[argparse.Namespace], int], argv: list[str] | None = None) -> int:
    """Parse `argv` with the job's arguments and run it: the `main` of every `python pipelines/<job>.py`."""
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
