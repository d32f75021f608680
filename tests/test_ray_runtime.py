"""The Ray owner's rules that need no job: token files, what counts as a token refusal, bounded actor retries."""

import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.ray_runtime import ACTOR_RETRIES, is_auth_failure, map_rows, use_local_token


@pytest.fixture
def no_user_token(monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)


def test_a_token_file_is_reused_only_when_private_and_never_through_a_link(tmp_path, no_user_token):
    state = tmp_path / "state"

    def token_of_a_new_process():
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)  # each call is a new process's: no token set yet
        return use_local_token(state)

    first = token_of_a_new_process()
    token = first.read_text()
    assert token_of_a_new_process() == first and first.read_text() == token  # reused as it is
    first.chmod(0o644)  # readable by others: someone may have it
    assert token_of_a_new_process().read_text() != token and first.stat().st_mode & 0o777 == 0o600
    planted = tmp_path / "planted"
    planted.write_text("f" * 64)
    planted.chmod(0o600)
    first.unlink()
    first.symlink_to(planted)  # a link to a token someone else chose
    assert token_of_a_new_process() == first and not first.is_symlink()
    assert first.read_text() != "f" * 64 and planted.read_text() == "f" * 64


@pytest.mark.parametrize("text, refused", [
    ("Unauthenticated: invalid token", True),
    ("HTTP 401 Unauthorized", True),
    ("status code 401", True),
    ("failed to connect to 127.0.0.1:40155", False),
    ("cannot reach http://127.0.0.1:4011/api/jobs/", False),
    ("job raysubmit_401abc failed", False),
    ("actor died (pid=401)", False),
])
def test_a_token_refusal_is_told_from_digits_that_happen_to_be_401(text, refused):
    assert is_auth_failure(RuntimeError(text)) is refused


class CrashesEveryTime:
    """An actor whose process dies on every item (as an OOM kill would), counting its attempts in a file."""

    def __init__(self, attempts: str, threads: int):
        self.attempts = Path(attempts)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with open(self.attempts, "a") as out:
            out.write("attempt\n")
        os._exit(1)


def test_a_crashing_actor_is_retried_a_bounded_number_of_times_then_the_job_fails(tmp_path, ray_local):
    attempts = tmp_path / "attempts"
    with pytest.raises(Exception, match="(?i)actor|died|exit"):
        list(map_rows(CrashesEveryTime, {"attempts": str(attempts), "threads": 1}, [{"item": 0}], 1, None,
                      num_cpus=0.5))
    assert 1 <= len(attempts.read_text().splitlines()) <= 1 + ACTOR_RETRIES
