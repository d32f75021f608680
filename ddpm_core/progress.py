"""How far a job's work has got: a bar on a terminal, periodic log lines elsewhere.

On a terminal (stderr is a TTY) a tqdm bar shows the count, the rate and the time left. In a cluster job or
CI, where a bar would be thousands of carriage returns in a log file, the same figures go to the log, at the
first step, every `interval` seconds and at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

log = logging.getLogger("ddpm.progress")
LOG_INTERVAL = 30.0  # seconds between log lines: a 50k-sample job of hours logs a few hundred
Item = TypeVar("Item")


def format_duration(seconds: float) -> str:
    """A time left as one reads it: 45 s, 12 min, 3.5 h, 2.1 d."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


class Progress:
    """`done` of `total` `what` (e.g. 120/1000 samples), reported as it moves; a context manager.

    `done`: already there when the job starts (a resumed job's finished tars), counted but not in the rate.
    `terminal`: show a bar (default: whether stderr is a TTY).
    """

    def __init__(self, total: int, what: str, *, done: int = 0, terminal: bool | None = None,
                 interval: float = LOG_INTERVAL, logger: logging.Logger = log):
        self.total, self.what, self.done, self.interval, self.log = total, what, done, interval, logger
        self.started, self.first, self.last_line = time.monotonic(), done, -math.inf
        self.bar = None
        if sys.stderr.isatty() if terminal is None else terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=what, unit=" " + what, unit_scale=False,
                            dynamic_ncols=True, file=sys.stderr)

    def rate(self, now: float) -> float:
        """Per second, from the start to `now` (the work found done excluded)."""
        elapsed = now - self.started
        return (self.done - self.first) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        """e.g. `samples 120/1000 (12%), 3.40/s, 4 min left`."""
        rate = self.rate(now)
        left = (self.total - self.done) / rate if rate > 0 else math.inf
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.what} {self.done}/{self.total}{share}, {rate:.2f}/s, {format_duration(left)} left"

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last_line >= self.interval or self.done >= self.total:
            self.log.info("%s", self.line(now))
            self.last_line = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[Item], total: int, what: str, count: Callable[[Item], int] = lambda item: 1,
          **options) -> Iterator[Item]:
    """`items` as they come, each counted as `count(item)` of `total` `what` (`Progress` options apply)."""
    with Progress(total, what, **options) as progress:
        for item in items:
            progress.update(count(item))
            yield item


@contextlib.contextmanager
def follow(position: Callable[[], int], total: int, what: str, *, every: float = 5.0,
           terminal: bool | None = None) -> Iterator[None]:
    """While the block runs, a bar of `position()` (read every `every` seconds) out of `total`: the progress of
    work this process waits on but does not do (training on Ray workers, whose output is not a terminal).

    Not on a terminal it does nothing: the work's own log lines carry the same figures.
    """
    if not (sys.stderr.isatty() if terminal is None else terminal):
        yield
        return
    stop = threading.Event()

    def read() -> int | None:
        try:
            return position()
        except Exception:  # noqa: BLE001 - a failed read shows as no movement, never as a failed job
            return None

    def watch(progress: Progress) -> None:
        while not stop.wait(every):
            if (now := read()) is not None:
                progress.update(max(0, now - progress.done))

    with Progress(total, what, done=read() or 0, terminal=True) as progress:
        watcher = threading.Thread(target=watch, args=(progress,), name=f"progress-{what}", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()
