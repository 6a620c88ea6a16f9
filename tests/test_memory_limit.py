"""``max_memory`` and ``memory_grace`` (issue 10): a tree over its limit for the grace
period is restarted through the backoff path, with a ``memory_exceeded`` event."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import check, load
from supervisor.daemon_resources import memory_interval
from tests.daemon_harness import daemon, py_cmd

MIB = 1024**2

HOG = (
    f"command = {py_cmd('res_tree', '--alloc', '80')}\n"
    'max_memory = "40MiB"\nmemory_grace = "1s"\nstop_timeout = "2s"\n'
    '[backoff]\ninitial = "0.2s"\n'
)
CALM = (
    f"command = {py_cmd('res_tree', '--children', '1')}\n"
    'max_memory = "500MiB"\nmemory_grace = "0.5s"\n'
)


class TestMemoryLimit:
    def test_a_tree_over_the_limit_is_restarted_and_one_under_it_is_left_alone(
        self, tmp_path: Path
    ) -> None:
        """The child allocating 80 MiB under max_memory = 40MiB: a memory_exceeded event
        with the figure, the limit and the grace, then backoff (the message says why)
        and a new pid; the service under its limit keeps its pid and gets no event."""
        with daemon(tmp_path, units={"hog": HOG, "calm": CALM}) as d:
            first = d.wait_state("hog", "running")["pid"]
            calm = d.wait_state("calm", "running")["pid"]
            exceeded = d.wait_event("hostvisor.service.memory_exceeded", "hog")
            attrs = exceeded["attributes"]
            assert attrs["hostvisor.memory.bytes"] > 80 * MIB
            assert attrs["hostvisor.memory.limit_bytes"] == 40 * MIB
            assert attrs["hostvisor.memory.grace_s"] == 1.0
            assert attrs["process.pid"] == first
            assert "over max_memory 40.0 MiB" in exceeded["message"]
            backoff = d.wait_event("hostvisor.service.backoff", "hog", after=exceeded["seq"])
            assert backoff["message"].startswith("restarted: memory ")
            d.wait_event("hostvisor.service.running", "hog", after=backoff["seq"])
            entry = d.status("hog")
            assert entry["pid"] != first
            assert entry["restarts"] >= 1
            assert not [
                e
                for e in d.events
                if e["event"] == "hostvisor.service.memory_exceeded" and e["service"] == "calm"
            ]
            assert d.status("calm")["pid"] == calm

    def test_a_jobs_run_is_held_to_the_limit_too(self, tmp_path: Path) -> None:
        """A one-shot job's run over its max_memory is restarted as well (runs are
        supervised like services)."""
        job = 'restart = "no"\n' + HOG
        with daemon(tmp_path, units={"once": job}) as d:
            exceeded = d.wait_event("hostvisor.service.memory_exceeded", "once")
            assert exceeded["attributes"]["hostvisor.memory.bytes"] > 80 * MIB
            d.wait_event("hostvisor.job.failed", "once", after=exceeded["seq"])


class TestSamplingInterval:
    def test_the_interval_follows_the_grace(self) -> None:
        """min(1 s, grace / 2), never below 0.25 s."""
        assert [memory_interval(g) for g in (0.0, 1.0, 5.0)] == [0.25, 0.5, 1.0]


class TestConfig:
    def write(self, tmp_path: Path, unit: str, defaults: str = "") -> Path:
        (tmp_path / "units").mkdir(exist_ok=True)
        config = tmp_path / "config.toml"
        config.write_text(f"[daemon]\n[defaults]\n{defaults}")
        (tmp_path / "units" / "web.toml").write_text('command = ["sleep", "1"]\n' + unit)
        return config

    def test_sizes_and_durations_are_parsed(self, tmp_path: Path) -> None:
        """max_memory is a size, memory_grace a duration (default 5 s, no limit by default)."""
        spec = load(self.write(tmp_path, 'max_memory = "2GiB"\nmemory_grace = "10s"\n'))
        assert (spec.services["web"].max_memory, spec.services["web"].memory_grace) == (
            2 * 1024**3,
            10.0,
        )
        plain = load(self.write(tmp_path, "")).services["web"]
        assert (plain.max_memory, plain.memory_grace) == (None, 5.0)

    def test_defaults_apply(self, tmp_path: Path) -> None:
        """[defaults] max_memory applies to a unit that does not set it."""
        spec = load(self.write(tmp_path, "", defaults='max_memory = "1GiB"\n'))
        assert spec.services["web"].max_memory == 1024**3

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ('max_memory = "lots"', "max_memory: "),
            ('max_memory = "10KiB"', "max_memory: must be at least 1MiB"),
            ("max_memory = -1", "max_memory: "),
            ('max_memory = "2TiB"', "max_memory: "),
            ('memory_grace = "soon"', "memory_grace: "),
            ('memory_grace = "2d"', "memory_grace: must be at most 1d"),
        ],
    )
    def test_bad_values_name_the_file_and_key(
        self, tmp_path: Path, line: str, message: str
    ) -> None:
        """A bad size or grace is one issue naming units/web.toml and the key."""
        issues = [str(i) for i in check(self.write(tmp_path, line + "\n"))]
        assert len(issues) == 1, issues
        assert issues[0].startswith(str(tmp_path / "units" / "web.toml") + ": " + message)
