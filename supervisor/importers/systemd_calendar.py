"""systemd.time(7) for ``hostvisor import systemd``: time spans and ``OnCalendar=``.

- :func:`parse_span`: a time span (``"5min 20s"``, ``"1h30m"``, ``"90"`` = seconds,
  ``"infinity"``) to seconds; :func:`span_text` writes seconds as a hostvisor duration.
- :func:`calendar_to_cron`: one or more ``OnCalendar=`` expressions to one cron expression
  (5 fields, or 6 with the seconds *last*, as :mod:`supervisor.schedule` reads them) and
  the time zone the expression names (``""`` if none), or :class:`ValueError` saying why
  cron cannot say the same thing.

The calendar grammar follows systemd's ``calendarspec.c``: ``[WEEKDAYS] [DATE] [TIME]
[ZONE]``, weekdays ``Mon..Fri`` / ``Sat,Sun`` (full names too, any case), a date
``[YEAR-]MONTH-DAY`` (``~`` counts days from the end of the month), a time
``HOUR:MINUTE[:SECOND]`` (seconds default to 0, a missing time is 00:00:00), each
component ``*``, ``5``, lists ``1,3``, ranges ``1..5`` and repetitions ``0/15`` (0, 15,
30, 45) or ``1..10/2``; the shorthands ``minutely`` ... ``semiannually``; a trailing
``UTC`` or IANA zone.

What cron cannot say is refused, naming the reason: a year, a fraction of a second, ``~``
other than the last day (``~01``: cron's ``L``), an epoch ``@TIMESTAMP``, and a weekday
*together with* a day of the month (systemd requires both, cron runs on either).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor.importers import Converted, ImportFailed

if TYPE_CHECKING:
    from supervisor.importers.systemd_syntax import Specifiers, UnitFile

__all__ = ["Box", "calendar_to_cron", "cron_expression", "map_timer", "parse_span", "span_text"]

#: systemd.time(7) units, in seconds (``M`` is a month, ``m`` a minute).
_SPAN_UNITS = {
    "usec": 1e-6, "us": 1e-6, "µs": 1e-6, "μs": 1e-6,
    "msec": 1e-3, "ms": 1e-3,
    "seconds": 1.0, "second": 1.0, "sec": 1.0, "s": 1.0, "": 1.0,
    "minutes": 60.0, "minute": 60.0, "min": 60.0, "m": 60.0,
    "hours": 3600.0, "hour": 3600.0, "hr": 3600.0, "h": 3600.0,
    "days": 86400.0, "day": 86400.0, "d": 86400.0,
    "weeks": 604800.0, "week": 604800.0, "w": 604800.0,
    "months": 2629800.0, "month": 2629800.0, "M": 2629800.0,
    "years": 31557600.0, "year": 31557600.0, "y": 31557600.0,
}  # fmt: skip
_SPAN_PART = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Zµμ]*)")


def parse_span(text: str) -> float:
    """A systemd time span (systemd.time(7)) in seconds.

    Args:
        text: ``"5min 20s"``, ``"1h30m"``, ``"250ms"``, a bare number (seconds), or
            ``"infinity"``.

    Returns:
        Seconds (``math.inf`` for ``infinity``).

    Raises:
        ValueError: not a time span.
    """
    stripped = text.strip()
    if stripped == "infinity":
        return math.inf
    position, total = 0, 0.0
    while position < len(stripped):
        match = _SPAN_PART.match(stripped, position)
        if match is None or match.end() == position or match[2] not in _SPAN_UNITS:
            raise ValueError(f'{text!r} is not a time span (systemd.time(7): "5min 20s")')
        total += float(match[1]) * _SPAN_UNITS[match[2]]
        position = match.end()
    if not stripped:
        raise ValueError("empty time span")
    return total


def span_text(seconds: float) -> str:
    """Seconds as a hostvisor duration: ``5400`` -> ``"1h30m"``, ``0.1`` -> ``"100ms"``
    (rounded to the millisecond)."""
    left = round(seconds * 1000)
    if left == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    if left:
        parts.append(f"{left}ms")
    return "".join(parts)


# ------------------------------------------------------------------------- calendar

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_SHORTHANDS = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "weekly": "Mon *-*-* 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
    "anually": "*-01-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
    "semi-annually": "*-01,07-01 00:00:00",
    "biannually": "*-01,07-01 00:00:00",
    "bi-annually": "*-01,07-01 00:00:00",
}
_COMPONENT = re.compile(r"(\d+(?:\.\d+)?)(?:\.\.(\d+(?:\.\d+)?))?(?:/(\d+(?:\.\d+)?))?")
#: cron's fields in order, with their ranges; the seconds (6th) come last.
_RANGES = {
    "minute": (0, 59),
    "hour": (0, 23),
    "day": (1, 31),
    "month": (1, 12),
    "weekday": (0, 6),
    "second": (0, 59),
}
_ORDER = ("minute", "hour", "day", "month", "weekday", "second")


@dataclass(frozen=True, slots=True)
class _Fields:
    """One calendar as sets of cron values (weekday 0 = Sunday); ``day`` may be
    ``{"L"}`` (the last day of the month)."""

    values: tuple[frozenset[int | str], ...]
    zone: str


def _weekdays(text: str) -> tuple[set[int], str]:
    """The weekday part (systemd numbering, 0 = Monday) and the rest of ``text``."""
    lowered = text.lower()
    found: set[int] = set()
    start: int | None = None
    position = 0
    while True:
        for number, name in enumerate(_DAYS):  # noqa: B007 (number is used after the loop)
            word = next((w for w in (name, name[:3]) if lowered.startswith(w, position)), "")
            if word:
                break
        else:
            if position == 0:
                return set(), text
            raise ValueError("expected a weekday after ',' or '..'")
        position += len(word)
        if lowered[position : position + 1] not in ("", "-", ".", ",", " "):
            raise ValueError(f"unknown weekday near {text[position - len(word) :]!r}")
        if start is not None:
            if start > number:
                raise ValueError("a weekday range must go forward (Mon..Fri)")
            found.update(range(start, number + 1))
            start = None
        found.add(number)
        nxt = lowered[position : position + 2]
        if nxt.startswith(".."):
            start, position = number, position + 2
        elif nxt.startswith("-"):
            start, position = number, position + 1
        elif nxt.startswith(","):
            position += 1
        if lowered[position : position + 1] in ("", " "):
            if start is not None:
                raise ValueError("an open weekday range")
            return found, text[position:].strip()


def _chain(text: str, field: str, *, seconds: bool = False) -> set[int] | None:
    """A component chain as a set of values, ``None`` for ``*``."""
    if text == "*":
        return None if not seconds else set(range(60))
    low, high = _RANGES.get(field, (1970, 2199))
    values: set[int] = set()
    for part in text.split(","):
        match = _COMPONENT.fullmatch(part)
        if match is None:
            raise ValueError(f"the {field} {part!r} is not a value, range or repetition")
        numbers = [float(g) for g in match.groups() if g is not None]
        if any(not n.is_integer() for n in numbers):
            raise ValueError(f"the {field} {part!r} has a fraction of a second, which cron has not")
        first = int(numbers[0])
        last = int(float(match[2])) if match[2] else None
        step = int(float(match[3])) if match[3] else 0
        if field == "year" and first < 100:
            first += 2000 if first < 70 else 1900
        if step == 0 and match[3]:
            raise ValueError(f"the {field} {part!r} repeats every 0")
        if last is None:
            span = range(first, high + 1, step) if step else range(first, first + 1)
        else:
            span = range(first, last + 1, step or 1)
        if first < low or first > high or (last is not None and not low <= last <= high):
            raise ValueError(f"the {field} {part!r} is outside {low}..{high}")
        values.update(span)
    return values


def _parse(text: str) -> _Fields:
    stripped = " ".join(text.split())
    zone = ""
    if stripped.lower().endswith(" utc"):
        zone, stripped = "UTC", stripped[:-4].rstrip()
    elif " " in stripped:
        head, last = stripped.rsplit(" ", 1)
        if _is_zone(last):
            zone, stripped = last, head
    stripped = _SHORTHANDS.get(stripped.lower(), stripped)
    if not stripped:
        raise ValueError("empty calendar expression")
    if stripped.startswith("@"):
        raise ValueError("an @TIMESTAMP is one moment, not a schedule")
    days, rest = _weekdays(stripped)
    words = rest.split()
    if len(words) > 2:
        raise ValueError(f"unexpected {' '.join(words[2:])!r}")
    date, time = "*-*-*", "00:00:00"
    if len(words) == 2:
        date, time = words
    elif len(words) == 1:
        if ":" in words[0]:
            time = words[0]
        else:
            date = words[0]
    return _Fields(_fields(days, date, time), zone)


def _fields(days: set[int], date: str, time: str) -> tuple[frozenset[int | str], ...]:
    last_day = "~" in date
    head, _, day_text = date.rpartition("~" if last_day else "-")
    parts = [*head.split("-"), day_text]
    if len(parts) == 2:
        parts.insert(0, "*")
    if len(parts) != 3 or "~" in head:
        raise ValueError(f"the date {date!r} is not [YEAR-]MONTH-DAY")
    year_text, month_text, day_text = parts
    if _chain(year_text, "year") is not None:
        raise ValueError(f"the year {year_text!r}: cron has no year field")
    clock = time.split(":")
    if len(clock) == 2:
        clock.append("00")
    if len(clock) != 3:
        raise ValueError(f"the time {time!r} is not HOUR:MINUTE[:SECOND]")
    found: dict[str, set[int] | None] = {
        "minute": _chain(clock[1], "minute"),
        "hour": _chain(clock[0], "hour"),
        "day": _chain(day_text, "day"),
        "month": _chain(month_text, "month"),
        "second": _chain(clock[2], "second", seconds=True),
    }
    result: list[frozenset[int | str]] = []
    for field in _ORDER:
        low, high = _RANGES[field]
        if field == "weekday":
            chosen: set[int | str] = {(d + 1) % 7 for d in days} if days else set()
        else:
            chosen = set(found[field] or ())
        if field == "day" and last_day and chosen:
            if chosen != {1}:
                raise ValueError(
                    f"the day {day_text!r} from the end of the month: cron "
                    "knows only the last day (~01, cron's L)"
                )
            chosen = {"L"}
        full = set(range(low, high + 1))
        result.append(frozenset() if chosen >= full or not chosen else frozenset(chosen))
    if result[2] and result[4]:
        raise ValueError(
            "it names both weekdays and days of the month: systemd runs on days "
            "matching both, cron on days matching either"
        )
    return tuple(result)


def _is_zone(name: str) -> bool:
    import zoneinfo

    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_+\-/]*", name) or name.lower() in _SHORTHANDS:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _field_text(values: frozenset[int | str], field: str) -> str:
    if not values:
        return "*"
    if "L" in values:
        if len(values) > 1:
            raise ValueError("cron cannot list the last day of the month with other days")
        return "L"
    low, high = _RANGES[field]
    ordered = sorted(int(v) for v in values)
    steps = {b - a for a, b in itertools.pairwise(ordered)}
    step = steps.pop() if len(steps) == 1 else 0
    if len(ordered) > 2 and step > 1 and ordered[-1] + step > high:
        return f"*/{step}" if ordered[0] == low else f"{ordered[0]}-{high}/{step}"
    runs: list[str] = []
    begin = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        runs.append(str(begin) if begin == previous else f"{begin}-{previous}")
        if value is not None:
            begin = previous = value
    return ",".join(runs)


def _merge(calendars: list[_Fields]) -> _Fields:
    """Calendars that differ in one field at most, merged into one (their union)."""
    boxes = [c.values for c in calendars]
    merged = True
    while len(boxes) > 1 and merged:
        merged = False
        for i, first in enumerate(boxes):
            for j in range(i + 1, len(boxes)):
                other = boxes[j]
                differ = [k for k in range(len(first)) if first[k] != other[k]]
                if len(differ) > 1:
                    continue
                box = list(first)
                if differ:
                    k = differ[0]
                    low, high = _RANGES[_ORDER[k]]
                    union = first[k] | other[k]
                    whole = not first[k] or not other[k] or union >= set(range(low, high + 1))
                    box[k] = frozenset() if whole else union
                boxes[i], merged = tuple(box), True
                del boxes[j]
                break
            if merged:
                break
    if len(boxes) > 1:
        raise ValueError(
            f"these {len(calendars)} calendars differ in more than one field: "
            "no single cron expression runs at exactly their times"
        )
    return _Fields(boxes[0], calendars[0].zone)


def calendar_to_cron(expressions: list[str]) -> tuple[str, str]:
    """One cron expression for ``OnCalendar=`` values (several: their union).

    Args:
        expressions: the values, specifiers already resolved.

    Returns:
        ``(cron, zone)``: 5 fields (6 when a second other than :00 fires, seconds
        last), and the IANA zone the expressions name (``""`` for the host's).

    Raises:
        ValueError: an expression systemd would refuse, or one cron cannot express
            (module docstring); the message says which part.
    """
    calendars = [_parse(text) for text in expressions]
    if len({c.zone for c in calendars}) > 1:
        raise ValueError("the calendars name different time zones")
    return cron_expression([c.values for c in calendars]), calendars[0].zone


#: One calendar as cron sets: (minute, hour, day, month, weekday (0 = Sunday), second);
#: an empty set is "any", ``{"L"}`` in the day the last day of the month.
Box = tuple[frozenset[int | str], ...]


def cron_expression(boxes: list[Box]) -> str:
    """The cron expression whose times are the union of ``boxes`` (launchd's
    StartCalendarInterval dicts use it too): 5 fields, 6 when a second other than :00.

    Raises:
        ValueError: the union is no single cron expression (the boxes differ in more
            than one field), or it lists the last day with other days.
    """
    fields = _merge([_Fields(box, "") for box in boxes])
    texts = [
        _field_text(values, field) for values, field in zip(fields.values, _ORDER, strict=True)
    ]
    if texts[5] == "0":
        texts.pop()
    return " ".join(texts)


# ------------------------------------------------------------------------- timers

_EVERY_KEYS = ("OnUnitActiveSec", "OnUnitInactiveSec")
_ONCE_KEYS = ("OnBootSec", "OnStartupSec", "OnActiveSec")
_BOOLEANS = {
    "1": True,
    "yes": True,
    "y": True,
    "true": True,
    "t": True,
    "on": True,
    "0": False,
    "no": False,
    "n": False,
    "false": False,
    "f": False,
    "off": False,
}


def map_timer(timer: UnitFile, spec: Specifiers, unit: Converted) -> set[str]:
    """Map the ``[Timer]`` section (systemd.timer(5)) onto ``unit``, the job built from
    the timer's service: ``OnCalendar=`` -> ``schedule`` (+ ``schedule_timezone``),
    ``OnUnitActiveSec=``/``OnUnitInactiveSec=`` -> ``every``, ``Persistent=`` ->
    ``catch_up``, ``RandomizedDelaySec=`` -> ``random_delay``; a timer with only
    ``OnBootSec=``/``OnStartupSec=``/``OnActiveSec=`` fires once: a one-shot.

    Returns:
        The ``[Timer]`` keys handled (the caller reports the others).

    Raises:
        ImportFailed: no trigger at all, or an ``OnCalendar=`` that is the only trigger
            and no cron expression can say (naming it and why).
    """
    done: set[str] = set()

    def values(key: str) -> list[tuple[str, str]]:
        done.add(key)
        found = []
        for raw in timer.all("Timer", key):
            try:
                found.append((raw, spec.expand(raw)))
            except ValueError as exc:
                unit.skip(f"{key}={raw}", str(exc))
        return found

    def spans(keys: tuple[str, ...]) -> list[tuple[str, str, float | None]]:
        found: list[tuple[str, str, float | None]] = []
        for key in keys:
            for raw, text in values(key):
                try:
                    found.append((key, raw, parse_span(text)))
                except ValueError as exc:
                    unit.skip(f"{key}={raw}", str(exc))
        return found

    every = spans(_EVERY_KEYS)
    trigger = _calendar(values("OnCalendar"), unit, fallback=bool(every))
    for key, raw, seconds in every:
        if trigger or seconds is None or not 1 <= seconds <= 365 * 86400:
            why = "hostvisor has one trigger per unit" if trigger else "every is 1s to 365d"
            unit.skip(f"{key}={raw}", why)
            continue
        unit.table["every"], trigger = span_text(seconds), "every"
        unit.map(f"{key}={raw}", "every")
        if key == "OnUnitInactiveSec":
            unit.notes.append(
                "OnUnitInactiveSec= counts from the end of the last run; "
                "hostvisor's every counts from the last trigger"
            )
    _once(spans(_ONCE_KEYS), unit, trigger)
    _tuning(values, unit, trigger)
    return done


def _calendar(found: list[tuple[str, str]], unit: Converted, *, fallback: bool) -> str:
    """``OnCalendar=`` -> ``schedule``; returns ``"schedule"``, or ``""`` if not mapped."""
    if not found:
        return ""
    shown = "OnCalendar=" + " / ".join(raw for raw, _ in found)
    try:
        from supervisor.schedule import check_cron

        cron, zone = calendar_to_cron([text for _, text in found])
        check_cron(cron)
    except ValueError as exc:
        if not fallback:
            raise ImportFailed(f"{shown}: no cron expression says the same: {exc}") from None
        unit.skip(shown, f"no cron expression says the same: {exc}")
        return ""
    unit.table["schedule"] = cron
    unit.map(shown, "schedule")
    if zone:
        unit.table["schedule_timezone"] = zone
        unit.map(f"{shown} (its zone)", "schedule_timezone")
    if len(found) > 1:
        unit.notes.append(f"the {len(found)} OnCalendar= expressions make one cron expression")
    return "schedule"


def _once(found: list[tuple[str, str, float | None]], unit: Converted, trigger: str) -> None:
    for key, raw, _ in found:
        if trigger:
            unit.skip(
                f"{key}={raw}",
                "a delay before the first run: hostvisor's first run "
                "comes at the first trigger (every: one interval after the daemon "
                "starts)",
            )
    if trigger:
        return
    if not found:
        raise ImportFailed(
            "the timer has no OnCalendar=, OnUnitActiveSec=, OnBootSec=... "
            "that import can read: it never fires"
        )
    key, raw, _ = found[0]
    unit.table.setdefault("restart", "no")
    unit.map(f"{key}={raw}", 'restart = "no" (a one-shot)')
    unit.notes.append(
        f"{key}= fires once: a one-shot, run when the daemon starts (not {raw} after it)"
    )


def _tuning(read: Callable[[str], list[tuple[str, str]]], unit: Converted, trigger: str) -> None:
    for raw, text in read("Persistent"):
        on = _BOOLEANS.get(text.lower())
        if on is None or trigger != "schedule":
            why = "not a boolean" if on is None else "systemd applies it to OnCalendar= only"
            unit.skip(f"Persistent={raw}", why)
            continue
        unit.table["catch_up"] = "once" if on else "none"
        unit.map(f"Persistent={raw}", "catch_up")
    for raw, text in read("RandomizedDelaySec"):
        try:
            seconds = parse_span(text)
        except ValueError as exc:
            unit.skip(f"RandomizedDelaySec={raw}", str(exc))
            continue
        if not trigger or seconds > 365 * 86400:
            unit.skip(
                f"RandomizedDelaySec={raw}", "random_delay is for scheduled units, up to 365d"
            )
            continue
        unit.table["random_delay"] = span_text(seconds)
        unit.map(f"RandomizedDelaySec={raw}", "random_delay")
    read("Unit")
