"""A scheduled unit's ``schedule`` / ``every`` as a Kubernetes CronJob ``schedule``.

Pure. Kubernetes reads ``spec.schedule`` with robfig/cron's standard parser
(https://kubernetes.io/docs/concepts/workloads/controllers/cron-jobs/#schedule-syntax):
5 fields, minute resolution, the macros ``@yearly @annually @monthly @weekly @daily
@midnight @hourly``, per field ``*``, ``?``, values, names (``jan``-``dec``,
``sun``-``sat``), ranges ``a-b``, lists ``a,b`` and steps ``/n``. What croniter (the
daemon's parser) accepts beyond that is an error here, never a silent change:

- a 6th field (seconds) - a CronJob fires at most once a minute;
- ``L``, ``W``, ``#`` (last day, nearest weekday, n-th weekday);
- ``7`` as Sunday (Kubernetes' day-of-week is 0-6).

``every`` (an interval anchored to the last run) becomes a cron *step* anchored to the
clock, when the interval is one: minutes dividing an hour (``10m`` -> ``*/10 * * * *``),
hours dividing a day (``2h`` -> ``0 */2 * * *``), ``1d`` (``0 0 * * *``) and ``7d``
(``0 0 * * 0``). Anything else (``7m``, ``90s``, ``5h``) is an error naming it.
"""

from __future__ import annotations

import re

from supervisor.spec import ScheduleSpec

__all__ = ["ScheduleNotMappable", "cron_schedule"]

#: Macros robfig/cron and the daemon both know (the daemon refuses ``@reboot``).
_MACROS = frozenset({"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight",
                     "@hourly"})  # fmt: skip
#: Per field: its name, the allowed numbers, the names it accepts.
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FIELDS: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day-of-month", 1, 31, ()),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 6, _DAYS),
)
_PART = re.compile(r"(?:\*|\?|(?P<low>[0-9a-z]+)(?:-(?P<high>[0-9a-z]+))?)(?:/(?P<step>\d+))?")


class ScheduleNotMappable(ValueError):
    """The schedule has no CronJob equivalent; the message says why and what to write."""


def cron_schedule(schedule: ScheduleSpec) -> str:
    """The CronJob ``schedule`` of a unit's :class:`~supervisor.spec.ScheduleSpec`.

    Returns:
        The cron expression as written (a 5-field expression or a macro), or the cron
        step of ``every``.

    Raises:
        ScheduleNotMappable: a seconds field, ``L``/``W``/``#``, day-of-week ``7``, or an
            ``every`` that is no whole cron step (module docstring).
    """
    if schedule.cron is None:
        return _every(schedule.every or 0.0, schedule.every_text or f"{schedule.every}s")
    text = schedule.cron.strip()
    if text.startswith("@"):
        if text.lower() not in _MACROS:
            raise ScheduleNotMappable(f"schedule {text!r}: Kubernetes knows no such macro")
        return text.lower()
    fields = text.split()
    if len(fields) == 6:
        raise ScheduleNotMappable(
            f"schedule {text!r} has a seconds field (the 6th): a CronJob fires at most once "
            "a minute, on the minute; write 5 fields (minute hour day-of-month month "
            "day-of-week)"
        )
    if len(fields) != 5:
        raise ScheduleNotMappable(f"schedule {text!r}: expected 5 fields")
    for value, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        _check_field(text, value.lower(), name, (low, high), names)
    return " ".join(fields)


def _check_field(
    text: str, value: str, name: str, bounds: tuple[int, int], names: tuple[str, ...]
) -> None:
    low, high = bounds
    for part in value.split(","):
        match = _PART.fullmatch(part)
        problem = "" if match else _why_not(part, name)
        if match:
            for bound in (match["low"], match["high"]):
                if bound is None or bound in names:
                    continue
                if not bound.isdigit():
                    problem = _why_not(bound, name)
                elif not low <= int(bound) <= high:
                    sunday = name == "day-of-week" and bound == "7"
                    problem = f"{bound} is outside {low}-{high}" + (
                        " (write Sunday as 0)" if sunday else ""
                    )
            if match["step"] is not None and int(match["step"]) == 0:
                problem = "a step of 0"
        if problem:
            raise ScheduleNotMappable(
                f"schedule {text!r}: the {name} field {value!r} cannot be read by "
                f"Kubernetes' cron: {problem}"
            )


def _why_not(part: str, name: str) -> str:
    if any(c in part for c in "lw#") and name in ("day-of-month", "day-of-week"):
        return "it has no L (last), W (weekday) or # (n-th weekday); write the days out"
    return f"{part!r} is not a {name} value, range or step"


def _every(seconds: float, text: str) -> str:
    whole = round(seconds)
    if abs(seconds - whole) > 1e-6 or whole % 60:
        raise ScheduleNotMappable(
            f"every {text} is not a whole number of minutes: a CronJob fires at most once a "
            "minute, on the minute; write a schedule (cron) instead"
        )
    minutes = whole // 60
    if minutes < 60 and 60 % minutes == 0:
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    hours, rest = divmod(minutes, 60)
    if not rest and hours < 24 and 24 % hours == 0:
        return "0 * * * *" if hours == 1 else f"0 */{hours} * * *"
    if minutes == 24 * 60:
        return "0 0 * * *"
    if minutes == 7 * 24 * 60:
        return "0 0 * * 0"
    raise ScheduleNotMappable(
        f"every {text} is no whole cron step (minutes must divide an hour, hours a day; "
        "or 1d, 7d): write a schedule (cron) instead"
    )
