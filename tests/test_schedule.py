"""The calendar of scheduled units, driven by an injected wall clock (datetimes passed in).

A simulated caller (:func:`drive`) does what the job supervisor does: poll, sleep
``tick.sleep`` seconds, poll again. A suspend or a clock step is the test moving
``now`` between two drives.
"""

from __future__ import annotations

import itertools
import os
import shutil
import zoneinfo
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from supervisor.schedule import (
    GRACE,
    MACROS,
    MIN_SLEEP,
    SLICE,
    Calendar,
    ScheduleError,
    Tick,
    Timetable,
    check_cron,
    check_timezone,
    host_timezone,
)
from supervisor.spec import CatchUp, ScheduleSpec

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
T0 = datetime(2024, 5, 6, 11, 59, 58, tzinfo=UTC)  # a Monday, 2 s before noon UTC


def cron(expr: str, tz: str = "UTC") -> Calendar:
    return Calendar(ScheduleSpec(cron=expr, timezone=tz))


def every(seconds: float) -> Calendar:
    return Calendar(ScheduleSpec(every=seconds, every_text=f"{seconds}s", timezone="UTC"))


def table(
    calendar: Calendar,
    now: datetime,
    *,
    catch_up: CatchUp = "none",
    last_trigger: datetime | None = None,
) -> Timetable:
    return Timetable(calendar, catch_up=catch_up, last_trigger=last_trigger, now=now)


def drive(tt: Timetable, now: datetime, until: datetime) -> tuple[list[Tick], datetime]:
    """Poll and sleep as the caller does until ``until``; the ticks that fired, and the end."""
    fired: list[Tick] = []
    while now < until:
        tick = tt.poll(now)
        assert MIN_SLEEP <= tick.sleep <= SLICE
        if tick.fire is not None:
            fired.append(tick)
        now = now + timedelta(seconds=tick.sleep)
    return fired, now


def utc(tick: Tick) -> datetime:
    assert tick.fire is not None
    return tick.fire.astimezone(UTC)


class TestCheckCron:
    def test_five_fields_come_back_stripped(self) -> None:
        """A valid 5-field expression is returned as written, without outer blanks."""
        assert check_cron("  */5 * * * *\n") == "*/5 * * * *"
        assert check_cron("0 9 * * mon-fri") == "0 9 * * mon-fri"

    def test_a_sixth_field_is_seconds_last(self) -> None:
        """``* * * * * */15`` fires at :00 :15 :30 :45 seconds (croniter's order)."""
        assert check_cron("* * * * * */15") == "* * * * * */15"
        cal = cron("* * * * * */15")
        start = datetime(2024, 1, 1, 10, 0, 0, tzinfo=UTC)
        times, when = [], start
        for _ in range(5):
            when = cal.next_after(when)
            times.append(when.second)
        assert times == [15, 30, 45, 0, 15]

    @pytest.mark.parametrize("macro", sorted(MACROS))
    def test_macros(self, macro: str) -> None:
        """crontab(5)'s macros are accepted and fire as their expansion does."""
        assert check_cron(macro) == macro
        start = datetime(2024, 1, 1, 0, 30, tzinfo=UTC)
        assert cron(macro).next_after(start) == cron(MACROS[macro]).next_after(start)

    def test_hourly_and_daily_fire_on_the_hour_and_at_midnight(self) -> None:
        start = datetime(2024, 1, 1, 10, 17, tzinfo=UTC)
        assert cron("@hourly").next_after(start) == datetime(2024, 1, 1, 11, tzinfo=UTC)
        assert cron("@daily").next_after(start) == datetime(2024, 1, 2, tzinfo=UTC)

    def test_reboot_is_refused_and_points_to_one_shots(self) -> None:
        """``@reboot`` is no schedule: the message names the one-shot instead."""
        with pytest.raises(ScheduleError, match=r"@reboot.*one-shot"):
            check_cron("@reboot")

    @pytest.mark.parametrize(
        ("text", "says"),
        [
            ("", r"empty cron expression.*expected 5 fields"),
            ("* * *", r"has 3 fields.*expected 5 fields"),
            ("* * * * * * 2030", r"7th field, the year, is not supported"),
            ("61 * * * *", r"the minute field '61'.*0-59"),
            ("0 25 * * *", r"the hour field '25'.*0-23"),
            ("0 0 * 13 *", r"the month field '13'"),
            ("0 0 * * funday", r"the day-of-week field 'funday'"),
            ("*/0 * * * *", r"the minute field '\*/0'"),
            ("* * * * * 60", r"the second field '60'"),
            ("H * * * *", r"hashed \(H\) or random \(R\)"),
            ("R 3 * * *", r"hashed \(H\) or random \(R\)"),
            ("@fortnightly", r"unknown cron macro '@fortnightly'.*@hourly"),
            ("0 0 30 2 *", r"never fires"),
        ],
    )
    def test_bad_expressions_say_what_is_wrong(self, text: str, says: str) -> None:
        """Each mistake gets a ScheduleError (a ValueError) naming the field and what fits."""
        with pytest.raises(ScheduleError, match=says) as info:
            check_cron(text)
        assert isinstance(info.value, ValueError)
        assert "Traceback" not in str(info.value)


class TestTimezones:
    def test_an_iana_name_is_accepted(self) -> None:
        assert check_timezone("Europe/Berlin") == "Europe/Berlin"
        assert check_timezone(" UTC ") == "UTC"

    @pytest.mark.parametrize("name", ["Europe/Berln", "Mars/Olympus", "", "/etc/passwd"])
    def test_an_unknown_name_is_named(self, name: str) -> None:
        """The error names the zone and shows the expected form."""
        with pytest.raises(ScheduleError, match=r"unknown time zone.*IANA name"):
            check_timezone(name)

    def test_a_typo_gets_a_suggestion(self) -> None:
        with pytest.raises(ScheduleError, match=r'did you mean "Europe/Berlin"'):
            check_timezone("Europe/Berln")

    def test_tz_variable_wins(self) -> None:
        """``$TZ`` names the zone, with or without tzset(3)'s leading colon."""
        assert str(host_timezone(environ={"TZ": "Europe/Berlin"})) == "Europe/Berlin"
        assert str(host_timezone(environ={"TZ": ":Asia/Tokyo"})) == "Asia/Tokyo"

    def test_empty_tz_is_utc(self, tmp_path: Path) -> None:
        """glibc reads ``TZ=`` (set, empty) as UTC."""
        zone = host_timezone(environ={"TZ": ""}, localtime=tmp_path / "none")
        assert datetime(2024, 7, 1, tzinfo=zone).utcoffset() == timedelta(0)

    def test_localtime_symlink_gives_the_zone_key(self, tmp_path: Path) -> None:
        """A bad ``$TZ`` falls through to /etc/localtime, whose link names the zone."""
        link = tmp_path / "localtime"
        link.symlink_to(_zone_file("Europe/Berlin"))
        zone = host_timezone(environ={"TZ": "Not/AZone"}, localtime=link)
        assert str(zone) == "Europe/Berlin"

    def test_localtime_file_is_read_dst_aware(self, tmp_path: Path) -> None:
        """A copied TZif file (no link to name it) is read as it is, DST and all."""
        copy = tmp_path / "localtime"
        shutil.copyfile(_zone_file("Europe/Berlin"), copy)
        zone = host_timezone(environ={}, localtime=copy)
        assert datetime(2024, 1, 15, 12, tzinfo=zone).utcoffset() == timedelta(hours=1)
        assert datetime(2024, 7, 15, 12, tzinfo=zone).utcoffset() == timedelta(hours=2)

    def test_nothing_known_is_utc(self, tmp_path: Path) -> None:
        zone = host_timezone(environ={}, localtime=tmp_path / "missing")
        assert datetime(2024, 7, 1, tzinfo=zone).utcoffset() == timedelta(0)

    def test_calendar_defaults_to_the_host_zone(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``schedule_timezone = ""`` reads cron fields in the host's zone."""
        monkeypatch.setenv("TZ", "Asia/Tokyo")
        cal = Calendar(ScheduleSpec(cron="0 9 * * *"))
        assert str(cal.tz) == "Asia/Tokyo"
        nxt = cal.next_after(datetime(2023, 12, 31, 12, tzinfo=UTC))
        assert nxt.astimezone(UTC) == datetime(2024, 1, 1, 0, tzinfo=UTC)  # 09:00 JST


def _zone_file(key: str) -> Path:
    """A TZif file of the system's tz database, else of the tzdata package."""
    for root in zoneinfo.TZPATH:
        path = Path(root) / key
        if path.is_file():
            return path
    import tzdata  # type: ignore[import-untyped, unused-ignore]

    return Path(os.path.dirname(tzdata.__file__)) / "zoneinfo" / key


class TestCalendar:
    def test_spec_needs_exactly_one_of_cron_and_every(self) -> None:
        with pytest.raises(ScheduleError, match="exactly one"):
            Calendar(ScheduleSpec())
        with pytest.raises(ScheduleError, match="exactly one"):
            Calendar(ScheduleSpec(cron="* * * * *", every=10.0))

    @pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
    def test_every_must_be_positive_and_finite(self, bad: float) -> None:
        with pytest.raises(ScheduleError, match="positive duration"):
            every(bad)

    def test_bad_timezone_in_spec(self) -> None:
        with pytest.raises(ScheduleError, match="Europe/Nowhere"):
            cron("* * * * *", tz="Europe/Nowhere")

    def test_next_is_strictly_after_and_latest_is_at_or_before(self) -> None:
        cal = cron("*/5 * * * *")
        noon = datetime(2024, 1, 1, 12, tzinfo=UTC)
        assert cal.next_after(noon) == datetime(2024, 1, 1, 12, 5, tzinfo=UTC)
        assert cal.latest_at_or_before(noon) == noon
        assert cal.latest_at_or_before(noon - timedelta(microseconds=1)) == noon - timedelta(
            minutes=5
        )

    def test_results_are_in_the_calendar_zone(self) -> None:
        cal = cron("0 9 * * *", tz="Europe/Berlin")
        nxt = cal.next_after(datetime(2024, 1, 1, tzinfo=UTC))
        assert nxt.tzinfo is BERLIN
        assert (nxt.hour, nxt.utcoffset()) == (9, timedelta(hours=1))

    def test_naive_datetimes_are_refused(self) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            cron("* * * * *").next_after(datetime(2024, 1, 1))

    def test_count_is_exact_when_small_and_an_estimate_when_huge(self) -> None:
        cal = cron("* * * * * *")
        start = datetime(2024, 1, 1, tzinfo=UTC)
        assert cal.count(start, start + timedelta(seconds=10)) == (10, True)
        count, exact = cal.count(start, start + timedelta(days=3))
        assert not exact
        assert abs(count - 259_200) <= 259  # 0.1 %

    def test_repr_is_for_people(self) -> None:
        assert repr(cron("*/5 * * * *", tz="Europe/Berlin")) == (
            "<Calendar '*/5 * * * *' in Europe/Berlin>"
        )


class TestOnTime:
    def test_every_10s_fires_every_10s_anchored_at_start(self) -> None:
        """``every = "10s"`` with no last run: first at start + 10 s, then on that grid."""
        tt = table(every(10), T0)
        assert tt.next_run == T0 + timedelta(seconds=10)
        fired, _ = drive(tt, T0, T0 + timedelta(seconds=61))
        assert [utc(t) for t in fired] == [T0 + timedelta(seconds=10 * k) for k in range(1, 7)]
        assert {(t.reason, t.missed) for t in fired} == {("schedule", 0)}

    def test_every_anchors_to_the_last_trigger(self) -> None:
        last = T0 - timedelta(seconds=4)
        tt = table(every(10), T0, last_trigger=last)
        assert tt.next_run == last + timedelta(seconds=10)

    def test_five_field_cron_through_an_hour(self) -> None:
        """``*/5 * * * *`` fires 12 times an hour, at the minute, never sleeping past SLICE."""
        tt = table(cron("*/5 * * * *"), T0)
        fired, _ = drive(tt, T0, T0 + timedelta(hours=1))
        assert len(fired) == 12
        assert all(utc(t).minute % 5 == 0 and utc(t).second == 0 for t in fired)
        assert {(t.reason, t.missed) for t in fired} == {("schedule", 0)}

    def test_six_field_cron_fires_every_15_seconds(self) -> None:
        tt = table(cron("* * * * * */15"), T0)
        fired, _ = drive(tt, T0, T0 + timedelta(seconds=63))
        assert [utc(t).second for t in fired] == [0, 15, 30, 45, 0]

    def test_sleep_is_capped_by_slice(self) -> None:
        """A daily job still has the caller poll at least every SLICE seconds."""
        tt = table(cron("@daily"), T0)
        tick = tt.poll(T0)
        assert tick.fire is None and tick.reason == "idle"
        assert tick.sleep == SLICE
        assert tt.poll(tt.next_run - timedelta(seconds=0.25)).sleep == pytest.approx(0.25)

    def test_sleep_has_a_floor(self) -> None:
        tt = table(cron("* * * * *"), T0)
        assert tt.poll(tt.next_run - timedelta(microseconds=1)).sleep == MIN_SLEEP

    def test_a_slow_poll_coalesces_instead_of_bursting(self) -> None:
        """Polled 3.5 s after an every-second cron's first trigger: 3 were due, one run
        for the latest, 2 coalesced."""
        tt = table(cron("* * * * * *"), T0)
        tick = tt.poll(T0 + timedelta(seconds=3.5))
        assert utc(tick) == T0 + timedelta(seconds=3)
        assert (tick.reason, tick.missed, tick.estimated) == ("schedule", 2, False)
        assert tt.poll(T0 + timedelta(seconds=3.6)).fire is None


class TestSuspendAndRestart:
    @pytest.mark.parametrize("catch_up", ["none", "once"])
    def test_suspend_for_three_hours(self, catch_up: CatchUp) -> None:
        """Asleep 3 h across 37 triggers of ``*/5``, the latest 2 min late: "none" runs
        nothing and reports the miss, "once" runs exactly once; then the job is back on
        its schedule."""
        tt = table(cron("*/5 * * * *"), T0, catch_up=catch_up)
        assert tt.poll(T0).fire is None
        woke = T0 + timedelta(hours=3, minutes=2)  # the monotonic sleep ended 3 h late
        tick = tt.poll(woke)
        assert tick.missed >= 1
        if catch_up == "none":
            assert (tick.fire, tick.reason, tick.missed) == (None, "missed", 37)
        else:
            assert (tick.reason, tick.missed) == ("catch_up", 36)
            assert utc(tick) == datetime(2024, 5, 6, 15, 0, tzinfo=UTC)
        assert tick.late > GRACE
        assert tt.next_run.astimezone(UTC) == datetime(2024, 5, 6, 15, 5, tzinfo=UTC)
        fired, _ = drive(tt, woke, woke + timedelta(minutes=30))
        assert len(fired) == 6
        assert {(t.reason, t.missed) for t in fired} == {("schedule", 0)}

    def test_every_10s_after_a_suspend_runs_once_on_time(self) -> None:
        """``every = "10s"``: its latest trigger is always < 10 s old, so after a 3 h
        suspend one run is on time (reason schedule) and the rest are coalesced."""
        tt = table(every(10), T0, catch_up="none")
        woke = T0 + timedelta(hours=3, seconds=4)
        tick = tt.poll(woke)
        assert (utc(tick), tick.reason, tick.missed) == (
            T0 + timedelta(hours=3),
            "schedule",
            1079,
        )
        fired, _ = drive(tt, woke, woke + timedelta(seconds=30))
        assert [t.reason for t in fired] == ["schedule"] * 3

    @pytest.mark.parametrize(("catch_up", "reason"), [("none", "missed"), ("once", "catch_up")])
    def test_every_hour_after_a_suspend(self, catch_up: CatchUp, reason: str) -> None:
        tt = table(every(3600), T0, catch_up=catch_up)
        tick = tt.poll(T0 + timedelta(hours=3, minutes=10))
        assert tick.reason == reason
        assert tick.missed == (3 if catch_up == "none" else 2)
        assert tt.next_run == T0 + timedelta(hours=4)

    def test_restart_after_two_hours_down_catches_up_once(self) -> None:
        """The daemon comes back 2 h after the last run of an hourly job: one run at the
        first poll (systemd's Persistent=), then none until the next hour."""
        now = datetime(2024, 5, 6, 12, 20, tzinfo=UTC)
        last = datetime(2024, 5, 6, 10, 0, tzinfo=UTC)
        tt = table(cron("@hourly"), now, catch_up="once", last_trigger=last)
        tick = tt.poll(now)
        assert (tick.reason, tick.missed) == ("catch_up", 1)
        assert utc(tick) == datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
        assert tt.last_trigger == datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
        fired, _ = drive(tt, now, datetime(2024, 5, 6, 13, 0, 30, tzinfo=UTC))
        assert [(utc(t).hour, t.reason) for t in fired] == [(13, "schedule")]

    def test_restart_with_catch_up_none_reports_the_miss(self) -> None:
        now = datetime(2024, 5, 6, 12, 20, tzinfo=UTC)
        last = datetime(2024, 5, 6, 10, 0, tzinfo=UTC)
        tt = table(cron("@hourly"), now, last_trigger=last)
        tick = tt.poll(now)
        assert (tick.fire, tick.reason, tick.missed) == (None, "missed", 2)
        # The handled trigger is kept, so a second restart reports nothing new.
        again = table(cron("@hourly"), now, last_trigger=tt.last_trigger)
        assert again.poll(now).reason == "idle"

    def test_restart_within_grace_is_just_on_time(self) -> None:
        """Down for 5 s across a trigger of every 10 s: it fires as scheduled."""
        last = T0 - timedelta(seconds=15)
        tt = table(every(10), T0, last_trigger=last)
        tick = tt.poll(T0)
        assert (utc(tick), tick.reason) == (last + timedelta(seconds=10), "schedule")

    def test_never_ran_means_nothing_to_catch_up(self) -> None:
        """No last_trigger: triggers before the daemon started are not due."""
        now = datetime(2024, 5, 6, 12, 20, tzinfo=UTC)
        tt = table(cron("@hourly"), now, catch_up="once")
        assert tt.last_trigger is None
        assert tt.next_run == datetime(2024, 5, 6, 13, tzinfo=UTC)
        assert tt.poll(now).reason == "idle"

    @pytest.mark.parametrize("catch_up", ["none", "once"])
    def test_three_day_gap_on_an_every_second_cron_is_not_walked(self, catch_up: CatchUp) -> None:
        """259,200 missed triggers are estimated (latest_at_or_before + a counted sample),
        never iterated one by one; "once" still runs exactly once."""
        now = datetime(2024, 5, 9, 12, 0, 0, 300000, tzinfo=UTC)
        tt = table(
            cron("* * * * * *"), now, catch_up=catch_up, last_trigger=now - timedelta(days=3)
        )
        tick = tt.poll(now)
        assert tick.estimated
        assert tick.due == datetime(2024, 5, 9, 12, tzinfo=UTC)
        assert tick.late == pytest.approx(0.3)
        # The latest trigger is on time, so the run is a scheduled one either way.
        assert tick.reason == "schedule"
        assert abs(tick.missed - 259_199) <= 260
        follow = tt.poll(now + timedelta(seconds=1))
        assert (follow.reason, follow.missed) == ("schedule", 0)

    def test_three_day_gap_late_latest(self) -> None:
        """With the latest trigger itself late (hourly job, machine asleep 3 days)."""
        now = datetime(2024, 5, 9, 12, 30, tzinfo=UTC)
        tt = table(cron("@hourly"), now, catch_up="none", last_trigger=now - timedelta(days=3))
        tick = tt.poll(now)
        assert (tick.fire, tick.missed, tick.estimated) == (None, 72, False)


class TestClockSteps:
    def test_small_forward_step_skips_no_run(self) -> None:
        """The clock jumps 5 s forward across noon while the caller sleeps: noon still runs."""
        tt = table(cron("* * * * *"), T0)
        tick = tt.poll(T0)
        assert tick.sleep == pytest.approx(2.0)
        stepped = T0 + timedelta(seconds=tick.sleep + 5)
        tick = tt.poll(stepped)
        assert (utc(tick), tick.reason, tick.missed) == (
            datetime(2024, 5, 6, 12, tzinfo=UTC),
            "schedule",
            0,
        )

    def test_small_forward_step_on_every(self) -> None:
        tt = table(every(10), T0)
        tick = tt.poll(T0 + timedelta(seconds=15))
        assert (tick.reason, tick.missed) == ("schedule", 0)

    def test_backward_step_never_fires_a_trigger_twice(self) -> None:
        """Noon ran; the clock steps back 30 s: noon is not run again, 12:01 is."""
        tt = table(cron("* * * * *"), T0)
        fired, now = drive(tt, T0, T0 + timedelta(seconds=3))
        assert [utc(t) for t in fired] == [datetime(2024, 5, 6, 12, tzinfo=UTC)]
        fired, _ = drive(tt, now - timedelta(seconds=30), now + timedelta(seconds=60))
        assert [utc(t) for t in fired] == [datetime(2024, 5, 6, 12, 1, tzinfo=UTC)]

    def test_cron_with_a_day_back_starts_afresh_from_the_new_time(self) -> None:
        """The clock set back a day (more than BACK_STEP): the next minute runs, not the
        minute after the last trigger a day later (ISC cron's rule)."""
        tt = table(cron("* * * * *"), T0)
        fired, now = drive(tt, T0, T0 + timedelta(seconds=3))
        assert len(fired) == 1
        back = now - timedelta(days=1)
        tick = tt.poll(back)
        assert tick.fire is None and tick.sleep <= 60
        fired, _ = drive(tt, back, back + timedelta(seconds=61))
        minute = back.replace(second=0, microsecond=0) + timedelta(minutes=1)
        assert [utc(t) for t in fired] == [minute]

    def test_a_last_trigger_from_a_clock_that_ran_ahead_is_not_waited_for(self) -> None:
        """A stamp a year ahead (written while the clock was wrong) does not silence the
        job for a year: the schedule starts from now."""
        ahead = T0 + timedelta(days=365)
        tt = Timetable(cron("* * * * *"), catch_up="once", last_trigger=ahead, now=T0)
        assert tt.next_run == datetime(2024, 5, 6, 12, 0, tzinfo=UTC)
        assert tt.last_trigger is None

    def test_every_with_an_hour_back_waits_at_most_one_interval(self) -> None:
        """``every = "10s"``: the clock set back 1 h re-anchors the grid to now."""
        tt = table(every(10), T0)
        fired, now = drive(tt, T0, T0 + timedelta(seconds=11))
        assert len(fired) == 1
        back = now - timedelta(hours=1)
        tick = tt.poll(back)
        assert tick.fire is None and tick.sleep <= 10
        assert tt.next_run == back + timedelta(seconds=10)
        fired, _ = drive(tt, back, back + timedelta(seconds=30.5))
        assert len(fired) == 3
        assert {(t.reason, t.missed) for t in fired} == {("schedule", 0)}

    def test_every_sleep_never_exceeds_the_interval_after_a_step_back(self) -> None:
        tt = table(every(2), T0)
        assert tt.poll(T0 - timedelta(days=1)).sleep <= 2


class TestDaylightSaving:
    """Europe/Berlin: 2024-03-31 02:00 -> 03:00 (+01 -> +02); 2024-10-27 03:00 -> 02:00."""

    def test_spring_forward_runs_a_job_of_the_missing_hour_once_at_3(self) -> None:
        tt = table(cron("30 2 * * *", tz="Europe/Berlin"), datetime(2024, 3, 30, 12, tzinfo=UTC))
        fired, _ = drive(
            tt, datetime(2024, 3, 30, 12, tzinfo=UTC), datetime(2024, 4, 1, 12, tzinfo=UTC)
        )
        local = [t.fire.astimezone(BERLIN) for t in fired if t.fire is not None]
        assert [d.isoformat() for d in local] == [
            "2024-03-31T03:00:00+02:00",
            "2024-04-01T02:30:00+02:00",
        ]

    def test_spring_forward_wildcard_job_skips_the_missing_hour(self) -> None:
        start = datetime(2024, 3, 31, 0, 40, tzinfo=UTC)  # 01:40 +01
        tt = table(cron("*/15 * * * *", tz="Europe/Berlin"), start)
        fired, _ = drive(tt, start, start + timedelta(minutes=40))
        local = [t.fire.astimezone(BERLIN).strftime("%H:%M%z") for t in fired if t.fire]
        assert local == ["01:45+0100", "03:00+0200", "03:15+0200"]

    def test_fall_back_runs_a_fixed_time_job_once(self) -> None:
        """croniter yields 02:30 +02 and 02:30 +01: the second pass is skipped (ISC cron)."""
        start = datetime(2024, 10, 26, 12, tzinfo=UTC)
        tt = table(cron("30 2 * * *", tz="Europe/Berlin"), start)
        fired, _ = drive(tt, start, datetime(2024, 10, 28, 12, tzinfo=UTC))
        assert [t.fire.isoformat() for t in fired if t.fire] == [
            "2024-10-27T02:30:00+02:00",
            "2024-10-28T02:30:00+01:00",
        ]

    def test_fall_back_fixed_time_list_runs_each_time_once(self) -> None:
        start = datetime(2024, 10, 26, 12, tzinfo=UTC)
        tt = table(cron("0,30 2 * * *", tz="Europe/Berlin"), start)
        fired, _ = drive(tt, start, datetime(2024, 10, 27, 12, tzinfo=UTC))
        assert [t.fire.strftime("%H:%M%z") for t in fired if t.fire] == [
            "02:00+0200",
            "02:30+0200",
        ]

    def test_fall_back_wildcard_job_runs_through_both_passes(self) -> None:
        """``*/15 * * * *`` runs at 02:00..02:45 +02 and again at 02:00..02:45 +01, every
        15 real minutes (ISC cron runs wildcard jobs in the repeated hour)."""
        start = datetime(2024, 10, 26, 23, 50, tzinfo=UTC)  # 01:50 +02
        tt = table(cron("*/15 * * * *", tz="Europe/Berlin"), start)
        fired, _ = drive(tt, start, datetime(2024, 10, 27, 2, 5, tzinfo=UTC))  # 03:05 +01
        local = [t.fire.strftime("%H:%M%z") for t in fired if t.fire]
        assert local == [
            "02:00+0200", "02:15+0200", "02:30+0200", "02:45+0200",
            "02:00+0100", "02:15+0100", "02:30+0100", "02:45+0100",
            "03:00+0100",
        ]  # fmt: skip
        stamps = [utc(t).timestamp() for t in fired]
        assert {b - a for a, b in itertools.pairwise(stamps)} == {900.0}

    def test_fall_back_hourly_runs_twice_at_two(self) -> None:
        """``@hourly`` is ``0 * * * *``: a wildcard hour, so both 02:00s run."""
        start = datetime(2024, 10, 26, 23, 30, tzinfo=UTC)
        tt = table(cron("@hourly", tz="Europe/Berlin"), start)
        fired, _ = drive(tt, start, datetime(2024, 10, 27, 2, 30, tzinfo=UTC))
        assert [t.fire.strftime("%H:%M%z") for t in fired if t.fire] == [
            "02:00+0200",
            "02:00+0100",
            "03:00+0100",
        ]

    def test_local_readings_in_the_repeated_hour_are_compared_by_instant(self) -> None:
        """A caller passing Berlin-local datetimes (fold set) gets the same answers: 02:45
        +02 is before 02:15 +01, though a plain comparison of the two says otherwise."""
        cal = cron("*/15 * * * *", tz="Europe/Berlin")
        first = datetime(2024, 10, 27, 0, 45, tzinfo=UTC).astimezone(BERLIN)  # 02:45 +02
        tt = table(cal, first - timedelta(seconds=1), last_trigger=None)
        tick = tt.poll(first)
        assert tick.fire is not None and tick.fire.strftime("%H:%M%z") == "02:45+0200"
        second = datetime(2024, 10, 27, 1, 0, 0, 200000, tzinfo=UTC).astimezone(BERLIN)
        assert second.fold == 1
        tick = tt.poll(second)
        assert tick.fire is not None and tick.fire.strftime("%H:%M%z") == "02:00+0100"
        assert tick.missed == 0

    def test_restart_in_the_repeated_hour_does_not_rerun_a_fixed_job(self) -> None:
        """The 02:30 +02 run was recorded; the daemon restarts at 02:40 +01."""
        cal = cron("30 2 * * *", tz="Europe/Berlin")
        last = datetime(2024, 10, 27, 0, 30, tzinfo=UTC)  # 02:30 +02
        now = datetime(2024, 10, 27, 1, 40, tzinfo=UTC)  # 02:40 +01
        tt = table(cal, now, catch_up="once", last_trigger=last)
        assert tt.poll(now).reason == "idle"
        assert tt.next_run.isoformat() == "2024-10-28T02:30:00+01:00"


class TestTimetableMisc:
    def test_catch_up_must_be_known(self) -> None:
        with pytest.raises(ScheduleError, match='"none" or "once"'):
            Timetable(cron("* * * * *"), catch_up="twice", last_trigger=None, now=T0)  # type: ignore[arg-type]

    def test_repr_is_for_people(self) -> None:
        tt = table(cron("@hourly"), T0)
        assert repr(tt) == ("<Timetable '@hourly': next 2024-05-06T12:00:00+00:00, last never>")
