"""The unit keys of jobs (issue 11): ``schedule``/``every``, ``schedule_timezone``,
``concurrency``, ``catch_up``, ``random_delay``, ``run_timeout``, ``[on_failure]``, and
the rules that tie them to the rest of a unit.

A *job* is a process unit whose instances are runs that end: a scheduled unit
(``schedule`` or ``every``), or a one-shot (``restart = "no"`` without a schedule).

Rules (each broken one is a ``check`` error naming the key):

- ``schedule`` and ``every`` exclude each other; both need a process unit (``command``).
- On a scheduled unit ``restart`` defaults to ``"no"``; ``"always"`` is an error, as are
  ``[health]``, ``port`` and ``[post_start]``: a run is not up, it ends. Any of these that
  comes from ``[defaults]`` is ignored on a scheduled unit (defaults are written for
  services), not reported.
- ``schedule_timezone``, ``concurrency``, ``catch_up`` and ``random_delay`` need a
  schedule; ``run_timeout`` needs a job. Set in ``[defaults]``, they apply only to the
  units they fit.
- ``depends_on = { x = "completed" }`` needs ``x`` to be a job.
- ``[on_failure]`` fits every unit (a job's failed run, a service gone FATAL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from supervisor import config_values as values
from supervisor.config_values import IssueSink, TableReader, parse_duration
from supervisor.spec import CatchUp, Concurrency, OnFailureSpec, ScheduleSpec, ServiceSpec
from supervisor.states import DependencyCondition, Restart

__all__ = ["JOB_KEYS", "ON_FAILURE_KEYS", "check_completed", "command_table", "parse_job_keys"]

#: The unit keys this module reads.
JOB_KEYS = (
    "schedule", "every", "schedule_timezone", "concurrency", "catch_up", "random_delay",
    "run_timeout", "on_failure",
)  # fmt: skip
ON_FAILURE_KEYS = ("command", "timeout")
#: Keys that need a schedule.
_SCHEDULE_ONLY = ("schedule_timezone", "concurrency", "catch_up", "random_delay")
#: Keys a scheduled unit cannot have: a run is not up, it ends.
_NOT_ON_JOBS = ("health", "port", "post_start")
#: The shortest ``every``: the calendar's resolution is a second.
MIN_EVERY = 1.0


def _cron(value: object) -> str:
    from supervisor.schedule import check_cron

    return check_cron(values.nonempty(value))


def _timezone(value: object) -> str:
    from supervisor.schedule import check_timezone

    return check_timezone(values.nonempty(value))


def _every(value: object) -> tuple[float, str]:
    seconds = parse_duration(value)
    if seconds < MIN_EVERY:
        raise ValueError(f"must be at least {MIN_EVERY:g}s, got {values.describe_value(value)}")
    text = value.strip() if isinstance(value, str) else f"{seconds:g}s"
    return seconds, text


def _own(unit: TableReader, key: str) -> bool:
    """Whether ``key`` is set by the unit file itself (not inherited from ``[defaults]``)."""
    return key in unit.data and (key,) not in unit.sink.inherited


def parse_job_keys(unit: TableReader, fields: dict[str, Any], *, partial: bool) -> None:
    """Read the job keys of ``unit`` into ``fields`` (the :class:`ServiceSpec` keyword
    arguments :func:`supervisor.config._parse_unit` built) and apply the module's rules.

    ``partial``: the ``[defaults]`` table, whose values are checked but not the rules.
    """
    cron = unit.get("schedule", _cron, None)
    every = unit.get("every", _every, None)
    zone = unit.get("schedule_timezone", _timezone, "")
    concurrency = unit.get("concurrency", values.choice("forbid", "allow", "replace"), "forbid")
    catch_up = unit.get("catch_up", values.choice("none", "once"), "none")
    random_delay = unit.get("random_delay", parse_duration, 0.0)
    run_timeout = unit.get("run_timeout", values.positive_duration, None)
    fields["on_failure"] = _parse_on_failure(unit, partial=partial)
    if partial:
        return
    container = "container" in unit.data
    by_cron, by_interval = _own(unit, "schedule"), _own(unit, "every")
    scheduled = by_cron or by_interval
    if by_cron and by_interval:
        unit.fail("every", "set either schedule (cron) or every (an interval), not both")
    if scheduled and container:
        unit.fail("schedule" if by_cron else "every",
                  "only process units can be scheduled (set command, not container)")  # fmt: skip
    if not scheduled:
        for key in _SCHEDULE_ONLY:
            if _own(unit, key):
                unit.fail(key, "only for scheduled units (set schedule or every)")
        if run_timeout is not None and fields["restart"] is not Restart.NO:
            if _own(unit, "run_timeout"):
                unit.fail("run_timeout", 'only for jobs: scheduled units, or one-shots '
                          '(restart = "no")')  # fmt: skip
            run_timeout = None
        if container:
            run_timeout = None
        fields["run_timeout"] = run_timeout
        return
    if not _own(unit, "restart"):
        fields["restart"] = Restart.NO
    elif fields["restart"] is Restart.ALWAYS:
        unit.fail("restart", 'a scheduled unit cannot restart "always": use "on-failure" '
                  '(retry within a run) or "no"')  # fmt: skip
    for key in _NOT_ON_JOBS:
        if _own(unit, key):
            unit.fail(key, f"a scheduled unit has no {key}: its runs end, they are not kept up")
        fields[key] = None
    fields["schedule"] = ScheduleSpec(
        cron=cron if by_cron else None,
        every=every[0] if every is not None and not by_cron else None,
        every_text=every[1] if every is not None and not by_cron else "",
        timezone=zone,
        concurrency=cast(Concurrency, concurrency),
        catch_up=cast(CatchUp, catch_up),
        random_delay=random_delay,
    )
    fields["run_timeout"] = run_timeout


def command_table(
    unit: TableReader, key: str, keys: tuple[str, ...], *, partial: bool
) -> tuple[tuple[str, ...], float] | None:
    """The ``command`` and ``timeout`` (default 30 s) of the table ``key`` (``[preflight]``,
    ``[on_failure]``), or ``None`` when absent or invalid (an issue is added; a table
    without a command is one, except in ``[defaults]``)."""
    table = unit.sub(key, keys)
    if table is None:
        return None
    command = table.get("command", values.argv, None)
    timeout = table.get("timeout", values.positive_duration, 30.0)
    if command is None:
        if not partial and "command" not in table.data:
            table.fail("", "needs a command")
        return None
    return command, timeout


def _parse_on_failure(unit: TableReader, *, partial: bool) -> OnFailureSpec | None:
    found = command_table(unit, "on_failure", ON_FAILURE_KEYS, partial=partial)
    return OnFailureSpec(command=found[0], timeout=found[1]) if found is not None else None


def check_completed(services: Mapping[str, ServiceSpec], sinks: Mapping[str, IssueSink]) -> None:
    """``depends_on = { x = "completed" }`` where ``x`` is not a job: it never completes."""
    for name, spec in services.items():
        for dep, condition in spec.depends_on.items():
            other = services.get(dep)
            if (
                condition is DependencyCondition.COMPLETED
                and other is not None
                and not other.is_job
            ):
                sinks[name].add(
                    ("depends_on",),
                    f'"{dep}" never completes: "completed" waits for a job (a one-shot with '
                    'restart = "no", or a scheduled unit); use "started" or "healthy"',
                )
