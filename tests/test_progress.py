"""ddpm_core/progress.py: the time left as one reads it, and the log lines of a job without a terminal."""

import logging
import re
import time

import pytest

from ddpm_core.progress import Progress, follow, format_duration, track


@pytest.mark.parametrize("seconds, shown", [(0, "0 s"), (89, "89 s"), (600, "10 min"), (5399, "90 min"),
                                            (5400, "1.5 h"), (35 * 3600, "35.0 h"), (3 * 86400, "3.0 d"),
                                            (float("inf"), "?")])
def test_time_left_is_in_hours_and_days_when_long(seconds, shown):
    assert format_duration(seconds) == shown


def test_without_a_terminal_the_figures_are_logged_first_then_every_interval_and_at_the_end(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 100.0, 110.0, 200.0])  # the start, then one reading per update
    monkeypatch.setattr("ddpm_core.progress.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="ddpm.progress")
    rows = list(track([3, 3, 3, 3, 3], 15, "images", count=lambda n: n, terminal=False, interval=60))
    assert rows == [3, 3, 3, 3, 3]
    assert [r.getMessage() for r in caplog.records] == [
        "images 3/15 (20%), 0.30/s, 40 s left",  # the first update
        "images 9/15 (60%), 0.09/s, 67 s left",  # the first update 60 s or more after the first line
        "images 15/15 (100%), 0.07/s, 0 s left",  # the end
    ]


def test_work_found_done_counts_but_is_not_in_the_rate(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 10.0])
    monkeypatch.setattr("ddpm_core.progress.time.monotonic", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="ddpm.progress")
    with Progress(100, "samples", done=50, terminal=False) as progress:
        progress.update(10)
    assert [r.getMessage() for r in caplog.records] == ["samples 60/100 (60%), 1.00/s, 40 s left"]


def test_following_work_done_elsewhere_draws_its_position_on_a_terminal(capsys):
    positions = iter([40, 40, 70, 100])  # the position at the start, then one per reading

    with follow(lambda: next(positions, 100), 100, "steps", every=0.01, terminal=True):
        time.sleep(0.3)
    bar = capsys.readouterr().err
    assert re.search(r"steps: +40%\|[^|]*\| 40/100 \[", bar) and re.search(r"steps: +100%\|[^|]*\| 100/100 \[", bar)
    with follow(lambda: 1 / 0, 100, "steps", terminal=False):  # not a terminal: never read, nothing drawn
        pass
    assert capsys.readouterr().err == ""
