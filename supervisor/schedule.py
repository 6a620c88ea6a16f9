"""The calendar of scheduled units: when a job's triggers fall and what a poll should do.

Pure: no anyio, no sleeping, no clock of its own. The caller (the job supervisor)
reads the wall clock, passes the reading in as an aware :class:`~datetime.datetime`
and gets back a :class:`Tick`: fire now or not, how many triggers were skipped, and
how long to sleep on the monotonic clock before the next poll. The only I/O is
reading the host's time zone (:func:`host_timezone`).

Rules (issue 9; the README's "Scheduled units" section repeats them):

- **Calendars.** ``schedule`` is a cron expression read by croniter in the unit's
  ``schedule_timezone``, else the host's zone: 5 fields (minute hour day-of-month
  month day-of-week), a 6th for seconds *last* (``* * * * * */15`` fires at :00
  :15 :30 :45), or one of ``@hourly @daily @midnight @weekly @monthly @yearly
  @annually`` (crontab(5)). ``@reboot`` is refused: a unit that runs once at start
  is a one-shot. ``every`` is a fixed interval anchored to the last trigger
  (persisted by the caller), else to the daemon's start: next = anchor + every,
  then on the same grid.
- **Polling.** The caller sleeps at most :data:`SLICE` seconds (cron itself wakes
  every minute): the monotonic clock neither advances during a suspend nor notices
  a wall-clock step, so the wall clock is re-read at least that often.
- **Due triggers.** At each poll, the triggers due (at or before now) since the last
  handled one are looked at together; a burst never follows. If the latest is at
  most :data:`GRACE` seconds late (a small NTP step, a slow poll) it fires once
  (reason ``schedule``) and the older ones are coalesced into ``missed``. If it is
  later (the machine slept, the daemon was down, a big forward step) it is a miss:
  ``catch_up = "once"`` fires once (reason ``catch_up``), ``"none"`` fires nothing
  and reports ``missed >= 1``. Either way the timetable then waits for the first
  trigger after now. A small forward step (< GRACE) so skips no run.
- **Restarts.** Built with ``last_trigger`` (from the state folder) and a trigger
  missed since, the first poll applies the same rule, so ``catch_up = "once"`` runs
  once at daemon start after downtime (systemd's ``Persistent=``). Without one (the
  job never ran) there is nothing to catch up, as with ``Persistent=``.
- **Wall clock stepping back.** A cron trigger already handled is never fired again:
  only triggers strictly after the last handled one count (a clock set back by an
  hour waits that hour out). For ``every`` the wait never grows past one interval:
  when the next trigger lies more than ``every`` ahead of now, it is re-anchored to
  now + every.
- **DST** (as ISC cron does it). Spring forward: a trigger in the skipped hour runs
  at the first instant after the gap (croniter gives 03:00 for ``30 2 * * *`` in
  Europe/Berlin), once. Fall back: croniter yields both passes of the repeated hour
  (02:30 at +02:00 and again at +01:00); a *fixed-time* expression (neither the
  minute nor the hour field starts with ``*``, ISC cron's ``MIN_STAR|HR_STAR``
  test, so ``30 2 * * *``, ``0,30 2 * * *``, ``@daily``) skips the second pass and
  runs once; a *wildcard* one (``*/15 * * * *``, ``@hourly``, ``*/5 2 * * *``)
  runs through both passes, as real time goes on.
- **missed** counts exactly up to :data:`COUNT_LIMIT` triggers; beyond, it is an
  estimate from the rate of the first ones (``Tick.estimated``), so a poll after a
  3-day gap on an every-second cron never walks 259,200 triggers.
- **sleep** = min(SLICE, seconds until the next trigger), at least
  :data:`MIN_SLEEP`, so a caller never spins.

All comparisons go through POSIX timestamps: two datetimes of one ZoneInfo compare
by their wall readings and ignore ``fold``, which is wrong in the repeated hour.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import zoneinfo
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Literal

from croniter import CroniterBadDateError, CroniterError, croniter

from supervisor.spec import CatchUp, ScheduleSpec

__all__ = [
    "COUNT_LIMIT",
    "GRACE",
    "MACROS",
    "MIN_SLEEP",
    "SLICE",
    "Calendar",
    "Reason",
    "ScheduleError",
    "Tick",
    "Timetable",
    "check_cron",
    "check_timezone",
    "host_timezone",
]

#: The longest the caller may sleep before polling again, seconds (cron wakes every minute).
SLICE: float = 60.0
#: A due trigger found at most this late (seconds) is on time; later is a miss.
GRACE: float = 60.0
#: The shortest sleep a tick asks for, seconds: a caller never spins.
MIN_SLEEP: float = 0.001
#: Seconds the wall clock may go back behind the last trigger before a cron schedule
#: starts afresh from the new time (ISC cron's rule: 3 hours); smaller steps never
#: fire a trigger twice.
BACK_STEP: float = 3 * 3600.0
#: Triggers counted one by one for ``missed``; beyond, the count is an estimate.
COUNT_LIMIT: int = 256

#: crontab(5)'s macros, as cron expands them. ``@reboot`` is not a schedule.
MACROS: Mapping[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31, L"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat, 0 and 7 = Sunday"),
    ("second", "0-59"),
)
_EXPECTED = (
    "expected 5 fields (minute hour day-of-month month day-of-week), a 6th for seconds "
    "last, or a macro (" + ", ".join(MACROS) + ")"
)
#: A fixed start for checking that an expression fires at all (keeps the check pure).
_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)
_TZ_EXAMPLE = 'an IANA name such as "Europe/Berlin" or "UTC"'

#: Why a tick fires (``schedule``, ``catch_up``) or not (``missed``, ``idle``).
Reason = Literal["schedule", "catch_up", "missed", "idle"]


class ScheduleError(ValueError):
    """A schedule, interval or time zone that cannot be used; the message says what is
    wrong and what is expected (config.py prefixes file and key)."""


def _stamp(when: datetime) -> float:
    """POSIX seconds of an aware datetime; naive ones are a programming error."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{when!r}: a schedule needs timezone-aware datetimes")
    return when.timestamp()


def _expand(text: str) -> list[str]:
    """The fields of a stripped expression, a macro expanded (crontab(5))."""
    if text.startswith("@"):
        if text == "@reboot":
            raise ScheduleError(
                '"@reboot" is not a schedule: a unit that runs once when started is a '
                'one-shot (restart = "no" and no schedule or every)'
            )
        if text not in MACROS:
            raise ScheduleError(f"unknown cron macro {text!r}: {_EXPECTED}")
        return MACROS[text].split()
    return text.split()


def check_cron(text: str) -> str:
    """Validate a cron expression.

    Args:
        text: 5 fields, a 6th (last) for seconds, or an ``@hourly``-style macro.

    Returns:
        The expression, stripped.

    Raises:
        ScheduleError: the wrong number of fields, a field out of range (naming it),
            ``@reboot``, an unknown macro, a hashed ``H`` field, or a calendar that
            never fires (``0 0 30 2 *``).
    """
    stripped = text.strip()
    if not stripped:
        raise ScheduleError(f"empty cron expression: {_EXPECTED}")
    fields = _expand(stripped)
    if len(fields) not in (5, 6):
        extra = " (a 7th field, the year, is not supported)" if len(fields) == 7 else ""
        raise ScheduleError(
            f"cron expression {stripped!r} has {len(fields)} fields{extra}: {_EXPECTED}"
        )
    for index, value in enumerate(fields):
        if any(part.strip()[:1].lower() in ("h", "r") for part in value.split(",")):
            # Jenkins' hashed H and croniter's random R: croniter would want a hash_id,
            # or pick a new random value at every evaluation.
            raise ScheduleError(
                f"cron expression {stripped!r}: the {_FIELDS[index][0]} field {value!r} "
                "is hashed (H) or random (R), which is not supported; write the value out"
            )
    try:
        croniter(" ".join(fields), _REFERENCE).get_next(datetime)
    except CroniterBadDateError:
        raise ScheduleError(
            f"cron expression {stripped!r} never fires (no such date within 50 years)"
        ) from None
    except (CroniterError, ValueError, TypeError, KeyError, IndexError) as exc:
        _name_bad_field(stripped, fields)  # the field to blame, when one alone is wrong
        raise ScheduleError(
            f"cron expression {stripped!r} is not valid ({exc}): {_EXPECTED}"
        ) from None
    return stripped


def _name_bad_field(stripped: str, fields: list[str]) -> None:
    """Raise ScheduleError naming the first field that is invalid on its own (each
    probed with ``*`` elsewhere); return if none is."""
    for index, value in enumerate(fields):
        probe = ["*"] * len(fields)
        probe[index] = value
        try:
            croniter(" ".join(probe), _REFERENCE)
        except (CroniterError, ValueError, TypeError, KeyError, IndexError) as exc:
            name, allowed = _FIELDS[index]
            raise ScheduleError(
                f"cron expression {stripped!r}: the {name} field {value!r} is not valid "
                f"({exc}); expected values {allowed}, lists (1,5), ranges (1-5) and steps (*/5)"
            ) from None


def check_timezone(name: str) -> str:
    """Validate a time zone name.

    Args:
        name: an IANA name (``"Europe/Berlin"``, ``"UTC"``) that :mod:`zoneinfo` knows.

    Returns:
        The name, stripped.

    Raises:
        ScheduleError: naming it, with a close match when there is one.
    """
    stripped = name.strip()
    try:
        if not stripped or stripped.startswith("/"):
            raise ValueError(stripped)
        zoneinfo.ZoneInfo(stripped)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        close = difflib.get_close_matches(stripped, zoneinfo.available_timezones(), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ScheduleError(
            f"unknown time zone {stripped!r}{hint}: expected {_TZ_EXAMPLE}"
        ) from None
    return stripped


def _zone_from_path(path: Path) -> tzinfo | None:
    """The zone a TZif file or a symlink into a zoneinfo folder names, or None."""
    try:
        target = os.path.realpath(path)
        marker = "/zoneinfo/"
        if marker in target:
            key = target.split(marker, 1)[1].removeprefix("posix/")
            try:
                return zoneinfo.ZoneInfo(key)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                pass
        with open(path, "rb") as file:
            return zoneinfo.ZoneInfo.from_file(file, key=str(path))
    except (OSError, ValueError):
        return None


def host_timezone(
    *, environ: Mapping[str, str] | None = None, localtime: Path | str = "/etc/localtime"
) -> tzinfo:
    """The host's time zone, DST-aware (a :class:`zoneinfo.ZoneInfo`).

    Resolution, as the C library does it (tzset(3)): ``$TZ`` if it names a zone
    (``Europe/Berlin``, ``:Europe/Berlin``, or an absolute path to a TZif file; set
    but empty means UTC); else ``/etc/localtime``, by the zone key its symlink points
    at (``/usr/share/zoneinfo/Europe/Berlin``; macOS ``/var/db/timezone/zoneinfo/...``),
    else read as a TZif file; else UTC. A POSIX rule string in ``$TZ``
    (``CET-1CEST,M3.5.0,M10.5.0/3``) is not read: zoneinfo cannot, so it falls through.

    Args:
        environ: the environment to read ``TZ`` from; ``os.environ`` if omitted.
        localtime: the localtime file; for tests.
    """
    env = os.environ if environ is None else environ
    value = env.get("TZ")
    if value is not None:
        value = value.removeprefix(":").strip()
        if not value:
            return _utc()
        if value.startswith("/"):
            zone = _zone_from_path(Path(value))
            if zone is not None:
                return zone
        else:
            try:
                return zoneinfo.ZoneInfo(value)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                pass
    zone = _zone_from_path(Path(localtime))
    return zone if zone is not None else _utc()


def _utc() -> tzinfo:
    try:
        return zoneinfo.ZoneInfo("UTC")
    except zoneinfo.ZoneInfoNotFoundError:  # no tz database at all
        return UTC


class Calendar:
    """The trigger times of one schedule, in its time zone.

    Args:
        spec: the unit's :class:`~supervisor.spec.ScheduleSpec` (exactly one of
            ``cron`` and ``every``; ``timezone`` ``""`` = :func:`host_timezone`).

    Raises:
        ScheduleError: a bad expression or zone, both or neither of cron and every,
            an interval that is not a positive finite number of seconds.

    A cron calendar is a fixed set of instants. An ``every`` calendar has no fixed
    grid (the :class:`Timetable` anchors it): :meth:`next_after` is ``when + every``
    and :meth:`latest_at_or_before` is None.
    """

    def __init__(self, spec: ScheduleSpec) -> None:
        if (spec.cron is None) == (spec.every is None):
            raise ScheduleError("a schedule needs exactly one of schedule (cron) and every")
        self.tz: tzinfo = (
            zoneinfo.ZoneInfo(check_timezone(spec.timezone)) if spec.timezone else host_timezone()
        )
        self.cron: str | None = None
        self.every: float | None = None
        self._fields = ""
        self._fixed_time = False
        if spec.cron is not None:
            self.cron = check_cron(spec.cron)
            fields = _expand(self.cron)
            self._fields = " ".join(fields)
            # Parsed once: each lookup copies it (croniter's own state is its position).
            self._cursor = croniter(self._fields, _REFERENCE)
            # ISC cron's MIN_STAR|HR_STAR: a field *starting* with "*" makes a wildcard job.
            self._fixed_time = not (fields[0].startswith("*") or fields[1].startswith("*"))
        else:
            every = spec.every
            if every is None or not math.isfinite(every) or every <= 0:
                raise ScheduleError(
                    f'every = {every!r}: expected a positive duration such as "10m"'
                )
            self.every = every
        self.describe = spec.describe()

    def __repr__(self) -> str:
        return f"<Calendar {self.describe!r} in {self.tz}>"

    def local(self, when: datetime) -> datetime:
        """``when`` (aware) in the calendar's zone, ``fold`` set right (via UTC).

        Raises:
            ValueError: ``when`` is naive.
        """
        _stamp(when)
        return when.astimezone(UTC).astimezone(self.tz)

    def _at(self, start: datetime) -> croniter:
        """A croniter positioned at ``start``, without parsing the expression again."""
        cursor = copy.copy(self._cursor)
        cursor.set_current(start, force=True)
        return cursor

    def _counts(self, trigger: datetime) -> bool:
        """False for a fixed-time trigger in the second pass of a repeated hour (ISC cron)."""
        return not (self._fixed_time and trigger.fold == 1)

    def iter_after(self, when: datetime) -> Iterator[datetime]:
        """Triggers strictly after ``when``, ascending, aware, in :attr:`tz` (cron only).

        Raises:
            TypeError: on an ``every`` calendar (it has no fixed grid).
        """
        if self.cron is None:
            raise TypeError(f"{self!r}: an every calendar has no fixed triggers")
        cursor = self._at(self.local(when))
        while True:
            try:
                raw = cursor.get_next(datetime)
            except CroniterBadDateError:
                return
            trigger = self.local(raw)
            if self._counts(trigger):
                yield trigger

    def next_after(self, when: datetime) -> datetime:
        """The first trigger strictly after ``when`` (aware, in :attr:`tz`).

        For an ``every`` calendar: ``when + every``. Raises ScheduleError for a cron
        calendar with no trigger left within croniter's 50-year search.
        """
        if self.every is not None:
            return self.local(when.astimezone(UTC) + timedelta(seconds=self.every))
        for trigger in self.iter_after(when):
            return trigger
        raise ScheduleError(f"{self.describe!r} fires no more after {when.isoformat()}")

    def latest_at_or_before(self, when: datetime) -> datetime | None:
        """The last trigger at or before ``when``, found backwards in O(1) croniter steps
        (``get_prev``), or None (an ``every`` calendar, or none within 50 years)."""
        if self.cron is None:
            return None
        # get_prev is strictly before its start: start 1 us later to include ``when``.
        start = self.local(when.astimezone(UTC) + timedelta(microseconds=1))
        cursor = self._at(start)
        while True:
            try:
                trigger = self.local(cursor.get_prev(datetime))
            except CroniterBadDateError:
                return None
            if self._counts(trigger):
                return trigger

    def count(
        self, after: datetime, until: datetime, *, limit: int = COUNT_LIMIT
    ) -> tuple[int, bool]:
        """How many triggers fall in ``(after, until]``: ``(count, exact)``.

        Up to ``limit`` triggers are counted one by one; past that the count is
        extrapolated from their rate (``exact`` False): after a 3-day gap an
        every-second cron costs ``limit`` croniter steps, not 259,200.
        """
        end = _stamp(until)
        start = _stamp(after)
        if end <= start:
            return 0, True
        if self.every is not None:
            return math.floor((end - start) / self.every), True
        seen = 0
        for trigger in self.iter_after(after):
            if _stamp(trigger) > end:
                return seen, True
            seen += 1
            if seen >= limit:
                covered = _stamp(trigger) - start
                if covered <= 0:
                    return seen, False
                return max(seen, round(seen * (end - start) / covered)), False
        return seen, True


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """What one :meth:`Timetable.poll` says to do.

    Attributes:
        fire: run now, for this scheduled trigger time; None: nothing to run.
        reason: ``schedule`` (on time, at most GRACE late), ``catch_up`` (late, run
            once under catch_up = "once"), ``missed`` (late, not run under "none"),
            ``idle`` (nothing was due).
        missed: triggers skipped at this poll: older due ones coalesced into the run,
            or all due ones when nothing runs; 0 normally.
        estimated: ``missed`` is extrapolated (more than :data:`COUNT_LIMIT` triggers).
        due: the latest due trigger handled at this poll (fired or missed), or None.
        late: seconds ``due`` was late (0.0 when idle).
        sleep: seconds until the next poll, in ``[MIN_SLEEP, SLICE]``.
    """

    fire: datetime | None
    reason: Reason
    missed: int
    sleep: float
    estimated: bool = False
    due: datetime | None = None
    late: float = 0.0


class Timetable:
    """The running state of one job's schedule: the next trigger and the last handled.

    Args:
        calendar: the trigger times.
        catch_up: ``"none"`` or ``"once"``: what a trigger found more than GRACE late does.
        last_trigger: the last trigger handled in a former life (the state folder), or
            None if the job never ran; the caller persists :attr:`last_trigger` after
            each poll that changes it.
        now: the wall clock at construction (aware).

    Attributes:
        next_run: the next trigger time (the status field ``next_run``), aware, in tz.
        last_trigger: the last trigger handled, fired or missed; never fired again.
    """

    def __init__(
        self,
        calendar: Calendar,
        *,
        catch_up: CatchUp,
        last_trigger: datetime | None,
        now: datetime,
    ) -> None:
        if catch_up not in ("none", "once"):
            raise ScheduleError(f'catch_up = {catch_up!r}: expected "none" or "once"')
        self.calendar = calendar
        self.catch_up: CatchUp = catch_up
        self.last_trigger: datetime | None = (
            None if last_trigger is None else calendar.local(last_trigger)
        )
        anchor = now if self.last_trigger is None else self.last_trigger
        self.next_run: datetime = calendar.next_after(anchor)
        self._reanchor(_stamp(now), now)

    def __repr__(self) -> str:
        last = "never" if self.last_trigger is None else self.last_trigger.isoformat()
        return (
            f"<Timetable {self.calendar.describe!r}: next {self.next_run.isoformat()}, last {last}>"
        )

    def _reanchor(self, now_ts: float, now: datetime) -> None:
        """``every``: a wall clock stepped back never makes the wait longer than one
        interval; the grid moves to now + every. Cron: a clock now more than
        :data:`BACK_STEP` before the last trigger handled (set back by hand, an RTC-less
        board booting in the past, a stamp from a clock that ran ahead) starts afresh
        from now, as ISC cron does, instead of waiting that time out."""
        every = self.calendar.every
        if every is not None and _stamp(self.next_run) - now_ts > every:
            self.next_run = self.calendar.next_after(now)
        last = self.last_trigger
        if every is None and last is not None and now_ts < _stamp(last) - BACK_STEP:
            self.last_trigger = None
            self.next_run = self.calendar.next_after(now)

    def _sleep(self, now_ts: float) -> float:
        return max(MIN_SLEEP, min(SLICE, _stamp(self.next_run) - now_ts))

    def _latest_due(self, now: datetime, now_ts: float) -> tuple[datetime, int, bool]:
        """The latest due trigger and how many were due (>= 1), with exactness."""
        first = self.next_run
        every = self.calendar.every
        if every is not None:
            steps = math.floor((now_ts - _stamp(first)) / every)
            latest = self.calendar.local(first.astimezone(UTC) + timedelta(seconds=steps * every))
            return latest, steps + 1, True
        found = self.calendar.latest_at_or_before(now)
        # found >= first always (next_run is itself a due trigger); guard all the same.
        last = first if found is None or _stamp(found) < _stamp(first) else found
        between, exact = self.calendar.count(first, last)
        return last, between + 1, exact

    def poll(self, now: datetime) -> Tick:
        """Look at the wall clock once.

        Args:
            now: the wall clock, aware.

        Returns:
            The :class:`Tick` (see the module's rules). Afterwards :attr:`next_run` is
            the first trigger after ``now`` and :attr:`last_trigger` the one handled.
        """
        now_ts = _stamp(now)
        self._reanchor(now_ts, now)
        if _stamp(self.next_run) > now_ts:
            return Tick(fire=None, reason="idle", missed=0, sleep=self._sleep(now_ts))
        latest, due, exact = self._latest_due(now, now_ts)
        late = now_ts - _stamp(latest)
        reason: Reason
        if late <= GRACE:
            reason = "schedule"
        elif self.catch_up == "once":
            reason = "catch_up"
        else:
            reason = "missed"
        fire = None if reason == "missed" else latest
        self.last_trigger = latest
        if self.calendar.every is not None:
            self.next_run = self.calendar.next_after(latest)
        else:
            self.next_run = self.calendar.next_after(now)
        return Tick(
            fire=fire,
            reason=reason,
            missed=due - (0 if fire is None else 1),
            sleep=self._sleep(now_ts),
            estimated=not exact,
            due=latest,
            late=late,
        )
