"""Five-field cron expressions (minute hour day-of-month month day-of-week), evaluated in UTC.

Supports `*`, numbers, ranges `a-b`, steps `*/n` and `a-b/n`, and lists `a,b`; day-of-week 0 or 7 is
Sunday. As in Vixie cron, when both day fields are restricted a day matches if either does. `Cron.serve`
runs a tick at every match (the scheduler's --cron).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ddpm_core.errors import UserError

log = logging.getLogger("ddpm.schedule")

FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 7))


class CronError(UserError):
    """A cron expression that cannot be parsed, naming the field."""


def _parse_field(text: str, name: str, low: int, high: int) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        span, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if span == "*":
                start, end = low, high
            elif "-" in span:
                start, end = (int(x) for x in span.split("-", 1))
            else:
                start = int(span)
                end = high if step_text else start
        except ValueError:
            raise CronError(f"cron {name} field {text!r}: {part!r} is not a number, range or step") from None
        if step < 1 or not low <= start <= end <= high:
            raise CronError(f"cron {name} field {text!r}: {part!r} is outside {low}-{high} or has a step < 1")
        values.update(range(start, end + 1, step))
    return frozenset(values)


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool
    any_weekday: bool

    @classmethod
    def parse(cls, expression: str) -> Cron:
        fields = expression.split()
        if len(fields) != len(FIELDS):
            raise CronError(f"cron expression {expression!r} has {len(fields)} fields; expected 5: "
                            "minute hour day-of-month month day-of-week (e.g. '0 * * * *' hourly)")
        parsed = [_parse_field(text, *spec) for text, spec in zip(fields, FIELDS)]
        weekdays = frozenset(d % 7 for d in parsed[4])
        return cls(*parsed[:4], weekdays, fields[2] == "*", fields[4] == "*")

    def matches(self, moment: datetime) -> bool:
        day = moment.day in self.days
        weekday = (moment.weekday() + 1) % 7 in self.weekdays
        if self.any_day or self.any_weekday:
            day_ok = day and weekday
        else:
            day_ok = day or weekday
        return moment.minute in self.minutes and moment.hour in self.hours and moment.month in self.months and day_ok

    def next_after(self, moment: datetime) -> datetime:
        """The first matching minute strictly after `moment`."""
        candidate = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
        for _ in range(366 * 24 * 60 * 5):  # every minute of five years covers Feb 29 schedules
            if self.matches(candidate):
                return candidate
            candidate += timedelta(minutes=1)
        raise CronError("cron expression never matches (e.g. February 31)")

    def serve(self, tick: Callable[[], None], ticks: int | None = None, sleep=time.sleep) -> None:
        """`tick()` at every match, forever (or `ticks` times). A tick that fails with a UserError (an outage
        that outlasted the retries) is logged and the next one starts over: its state is elsewhere."""
        done = 0
        while ticks is None or done < ticks:
            now = datetime.now(timezone.utc)
            next_tick = self.next_after(now)
            log.info("next tick at %s UTC", next_tick.strftime("%Y-%m-%d %H:%M"))
            sleep((next_tick - now).total_seconds())
            try:
                tick()
            except UserError as error:
                log.error("this tick failed, the next one retries: %s", error)
            done += 1
