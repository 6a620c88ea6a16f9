"""Per-service CPU, memory and process counts (issue 10): one pass over /proc, real trees."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from supervisor import gpu, resources
from supervisor.control.client import ControlClient
from supervisor.errors import ControlError
from supervisor.resources import (
    ContainerCounter,
    Figures,
    Sampler,
    Tree,
    container_figures,
    read_processes,
)
from tests.daemon_harness import PROGRAMS, daemon, py_cmd

MIB = 1024**2
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


@contextmanager
def tree(*args: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """tests/programs/res_tree.py in its own session, killed (group) afterwards."""
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAMS / "res_tree.py"), *args],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def until(sampler: Sampler, trees: list[Tree], done: Callable[[dict[Any, Figures]], bool]) -> Any:
    """Sample until ``done(figures)`` holds (a deadline of 15 s); the last figures."""
    deadline = time.monotonic() + 15
    while True:
        found = sampler.sample(trees)
        if done(found):
            return found
        assert time.monotonic() < deadline, f"never held: {found}"
        time.sleep(0.1)  # the next sample's CPU delta needs wall time to pass


def service_tree(proc: subprocess.Popen[str], key: str = "k", service: str = "s") -> Tree:
    return Tree(key=key, service=service, run="", pgid=proc.pid)


class TestProcessPass:
    def test_the_pass_reads_every_process_with_its_parent_and_group(self) -> None:
        """One pass knows every process: our own entry has our parent, group and RSS."""
        procs = read_processes()
        me = procs[os.getpid()]
        assert me.ppid == os.getppid()
        assert me.pgrp == os.getpgrp()
        assert me.rss > MIB
        assert not me.zombie


class TestSampler:
    def test_a_tree_is_the_group_and_its_descendants(self) -> None:
        """A parent with two children: three processes, all of its group counted."""
        with tree("--children", "2") as proc:
            found = Sampler().sample([service_tree(proc)])["k"]
        assert found.processes == 3
        assert proc.pid in found.pids
        assert found.memory_bytes is not None and found.memory_bytes > 3 * MIB

    def test_a_busy_child_shows_as_cpu_percent(self) -> None:
        """A child spinning on a core: cpu_percent rises above 50 (100 = one core)."""
        sampler = Sampler()
        with tree("--busy") as proc:
            trees = [service_tree(proc)]
            sampler.sample(trees)
            until(sampler, trees, lambda f: (f["k"].cpu_percent or 0) > 50)
        user, _system = sampler.cpu_seconds["s"]
        assert user > 0

    def test_touched_memory_shows_as_memory_bytes(self) -> None:
        """A child that allocates and touches 100 MiB: memory_bytes passes it."""
        with tree("--alloc", "100") as proc:
            found = until(
                Sampler(), [service_tree(proc)], lambda f: f["k"].memory_bytes > 100 * MIB
            )
        assert found["k"].processes == 2

    def test_one_pass_tells_trees_apart(self) -> None:
        """Two services sampled in one pass each get only their own processes."""
        with tree("--children", "1") as one, tree("--children", "3") as two:
            found = Sampler().sample([service_tree(one, "a", "a"), service_tree(two, "b", "b")])
        assert (found["a"].processes, found["b"].processes) == (2, 4)
        assert not found["a"].pids & found["b"].pids

    def test_a_marked_child_of_the_daemon_belongs_to_its_service(self) -> None:
        """An escapee re-parented to the daemon (here: a child of ours in its own
        session) counts for the service its marker names, and for the run it names."""
        marked = {"HOSTVISOR_SERVICE": "s"}
        with (
            tree("--children", "1") as leader,
            tree(env=marked) as escapee,
            tree(env={**marked, "HOSTVISOR_RUN": "2"}) as other_run,
        ):
            trees = [
                service_tree(leader),
                Tree(key="run2", service="s", run="2", pgid=0),
                Tree(key="none", service="t", run="", pgid=2**22 + 9),
            ]
            sampler = Sampler()
            for _ in range(2):  # the second pass uses the cached marker
                found = sampler.sample(trees)
                assert found["k"].processes == 3
                assert escapee.pid in found["k"].pids
                assert found["run2"].pids == {other_run.pid}

    def test_a_child_born_between_full_passes_is_counted(self) -> None:
        """Passes between two full ones skip only processes known to be foreign: a child
        a service forks after a sample is counted by the next one."""
        proc = subprocess.Popen(
            ["/bin/sh", "-c", "read x; sleep 3600 & wait"],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            sampler = Sampler()
            trees = [service_tree(proc)]  # type: ignore[arg-type]
            assert sampler.sample(trees)["k"].processes == 1
            assert os.getpid() in sampler._foreign  # the test runner is none of ours
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            until(sampler, trees, lambda f: f["k"].processes == 2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def test_a_foreign_pid_is_read_again_at_the_next_full_pass(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A /proc of files: pid 50 is foreign at the first pass and not read again until
        the next full one (FULL_PASS_EVERY), which sees it in the service's group."""
        (tmp_path / "self").mkdir()
        (tmp_path / "self" / "stat").write_text("")

        def write(pid: int, ppid: int, pgrp: int) -> None:
            (tmp_path / str(pid)).mkdir(exist_ok=True)
            fields = ["S", str(ppid), str(pgrp), *["0"] * 16, "100", "0", "0", "25"]
            (tmp_path / str(pid) / "stat").write_text(f"{pid} (x y) " + " ".join(fields))

        write(40, 1, 40)
        write(50, 1, 50)
        sampler = Sampler(proc_root=str(tmp_path), daemon_pid=2)
        trees = [Tree(key="k", service="s", run="", pgid=40)]
        assert sampler.sample(trees)["k"].processes == 1
        write(50, 40, 40)  # what a reused pid would look like
        assert sampler.sample(trees)["k"].processes == 1  # skipped: known foreign
        monkeypatch.setattr(resources, "FULL_PASS_EVERY", 0.0)
        assert sampler.sample(trees)["k"].processes == 2

    def test_cpu_seconds_only_grow(self) -> None:
        """process.cpu.time's source: the per-service total never goes down, even after
        the processes are gone."""
        sampler = Sampler()
        with tree("--busy") as proc:
            trees = [service_tree(proc)]
            until(sampler, trees, lambda f: sampler.cpu_seconds["s"][0] > 0.2)
            before = sampler.cpu_seconds["s"]
        until(sampler, trees, lambda f: f["k"].processes == 0)
        assert sampler.cpu_seconds["s"] >= before

    def test_a_gone_group_counts_nothing(self) -> None:
        """No process left in the group: zero processes and bytes, no error."""
        found = Sampler().sample([Tree(key="k", service="s", run="", pgid=2**22 + 7)])
        assert (found["k"].processes, found["k"].memory_bytes) == (0, 0)

    def test_no_proc_is_an_empty_answer(self, tmp_path: Path) -> None:
        """A /proc that cannot be read: no figures, no exception (psutil's pass is the
        fallback only where no /proc exists)."""
        (tmp_path / "self").mkdir()
        (tmp_path / "self" / "stat").write_text("")
        (tmp_path / "12").mkdir()
        (tmp_path / "12" / "stat").write_text("12 (x) R garbage")
        assert Sampler(proc_root=str(tmp_path)).sample(
            [Tree(key="k", service="s", run="", pgid=12)]
        ) == {"k": Figures(cpu_percent=0.0, memory_bytes=0, processes=0)}

    def test_gpu_figures_are_summed_over_the_tree(self) -> None:
        """With GPU figures (NVML), a tree's processes' GPU bytes are summed."""
        with tree("--children", "1") as proc:
            found = Sampler(gpu=lambda: {proc.pid: 5 * MIB, 1: MIB}).sample([service_tree(proc)])
        assert found["k"].gpu_memory_bytes == 5 * MIB
        assert found["k"].as_json()["gpu_memory_bytes"] == 5 * MIB
        assert "gpu_memory_bytes" not in Figures(processes=1).as_json()


class TestContainerFigures:
    def stats(self, total: int, usage: int = 100 * MIB, **memory: int) -> dict[str, Any]:
        return {
            "cpu_stats": {
                "cpu_usage": {
                    "total_usage": total,
                    "usage_in_usermode": total // 2,
                    "usage_in_kernelmode": total // 4,
                }
            },
            "memory_stats": {"usage": usage, "stats": memory},
            "pids_stats": {"current": 7},
        }

    def test_cpu_is_our_own_delta(self) -> None:
        """The first answer counts the average since the start; the next the delta."""
        counter = ContainerCounter()
        first, used = container_figures(
            self.stats(2 * 10**9),
            container_id="c",
            counter=counter,
            started_ns=10 * 10**9,
            now=14.0,
        )
        assert first.cpu_percent == pytest.approx(50.0)
        assert used == (1.0, 0.5)
        second, used = container_figures(
            self.stats(3 * 10**9), container_id="c", counter=counter, now=16.0
        )
        assert second.cpu_percent == pytest.approx(50.0)
        assert used == (0.5, 0.25)
        assert second.processes == 7

    def test_memory_as_the_docker_cli_counts_it(self) -> None:
        """usage minus total_inactive_file (cgroup v1) or inactive_file (v2), else cache."""
        counter = ContainerCounter()

        def memory(**stats: int) -> int | None:
            return container_figures(self.stats(0, **stats), container_id="c", counter=counter)[
                0
            ].memory_bytes

        assert memory(inactive_file=10 * MIB) == 90 * MIB
        assert memory(total_inactive_file=20 * MIB, inactive_file=1) == 80 * MIB
        assert memory(cache=30 * MIB) == 70 * MIB
        assert memory() == 100 * MIB

    def test_a_malformed_answer_is_missing_figures(self) -> None:
        """Fields that are absent or of the wrong type are None, never an exception."""
        found, used = container_figures(
            {"cpu_stats": "no", "memory_stats": {"usage": "x"}},
            container_id="c",
            counter=ContainerCounter(),
        )
        assert found == Figures()
        assert used == (0.0, 0.0)


ESCAPING = (
    f'command = {py_cmd("res_tree", "--children", "1", "--escape", "30")}\nstop_timeout = "2s"\n'
)


class TestDaemon:
    def test_status_and_resources_carry_the_figures(self, tmp_path: Path) -> None:
        """status --json entries carry cpu_percent, memory_bytes and processes (the
        group, its child and a setsid escapee re-parented to the daemon); a stopped
        service has nulls; the resources method answers the same."""
        units = {"tree": ESCAPING, "idle": ESCAPING + "autostart = false\n"}
        with daemon(tmp_path, units=units) as d:
            d.wait_state("tree", "running")

            def counted() -> bool:
                doc = d.call("resources", services=["tree"], max_age=0.2)
                figures = doc["services"]["tree"]
                return figures["processes"] == 3 and figures["memory_bytes"] > 30 * MIB

            d.wait_for(counted, what="the escapee counted")
            result = d.cli("status", "--json")
            entries = {e["name"]: e for e in json.loads(result.stdout)["services"]}
            assert isinstance(entries["tree"]["cpu_percent"], float)
            assert entries["tree"]["processes"] == 3
            assert entries["tree"]["memory_bytes"] > 30 * MIB
            assert {entries["idle"][k] for k in ("cpu_percent", "memory_bytes", "processes")} == {
                None
            }
            doc = d.call("resources")
            assert set(doc["services"]) == {"idle", "tree"}
            assert doc["time"].endswith("Z")
            with pytest.raises(ControlError) as raised:
                ControlClient(d.socket).call("resources", {"services": ["nope"]})
            assert raised.value.code == -32001
            with pytest.raises(ValueError, match="max_age"):  # the shared validator (-32602)
                ControlClient(d.socket).call("resources", {"max_age": "soon"})

            # An instance started since the last sample is sampled for the next status,
            # though that sample is younger than status's 2 s: never null while it runs.
            d.call("resources")
            d.call("start", services=["idle"], wait=False)
            seen: list[dict[str, Any]] = []

            def spawned() -> bool:
                seen[:] = d.call("status", services=["idle"])["services"]
                return seen[0]["pid"] is not None

            d.wait_for(spawned, what="idle spawned")
            assert seen[0]["processes"] is not None and seen[0]["processes"] >= 1


class FakeNvml(types.ModuleType):
    """Satisfies the pynvml functions supervisor.gpu calls (no GPU on CI machines)."""

    def __init__(self, devices: list[list[tuple[int, int | None]]], *, fail_init: bool = False):
        super().__init__("pynvml")
        self.devices = devices
        self.fail_init = fail_init
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.devices[handle]]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[Any]:
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.devices[handle][:1]]


class TestGpu:
    @pytest.fixture(autouse=True)
    def _fresh(self) -> Iterator[None]:
        gpu.reset()
        yield
        gpu.reset()

    def test_bytes_are_summed_by_pid_over_devices(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Two GPUs: a pid's memory is summed over them; a process listed as compute and
        graphics counts once per device; an unknown figure (None) counts 0."""
        fake = FakeNvml([[(10, 4 * MIB), (11, None)], [(10, MIB)]])
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        assert gpu.gpu_memory_by_pid() == {10: 5 * MIB, 11: 0}

    def test_a_failing_nvml_is_tried_once(
        self, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        """NVML failing to initialise: None, nothing logged as an error, not tried again."""
        fake = FakeNvml([], fail_init=True)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        assert gpu.gpu_memory_by_pid() is None
        assert gpu.gpu_memory_by_pid() is None
        assert fake.inits == 1
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_no_gpu_is_none(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """NVML works but finds no device: None (no figure), as without NVML."""
        monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([]))
        assert gpu.gpu_memory_by_pid() is None

    def test_without_the_package_nothing_changes(self) -> None:
        """nvidia-ml-py not installed (the test environment): None."""
        if importlib.util.find_spec("pynvml") is not None:
            pytest.skip("pynvml is installed here")
        assert gpu.gpu_memory_by_pid() is None
