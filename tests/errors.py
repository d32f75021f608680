"""The shared check for bad inputs: a job returns 2 and logs exactly one error containing the message."""

import logging


def expect_one_error(caplog, main, args: list[str], message: str) -> None:
    caplog.clear()
    assert main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], errors
