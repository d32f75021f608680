"""The one base class of every error a user can fix (a bad flag, path, file, credential or cluster).

Its message names the input and what is wrong, in one line. `pipelines.job_runner.run_job` is the one
place that turns it into one log line and exit status 2; any other exception is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """An input, file or service the user can fix, with a one-line message naming it."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type when it has none): what a one-line report quotes."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class ArgumentError(UserError):
    """A command-line value out of its range, naming the flag."""
