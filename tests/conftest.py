"""Shared fixtures: the private Docker engine is started once per test session; ``d``, a
``hostvisor run`` in the test's folder (not started), always cleaned up."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import DaemonProcess
from tests.docker_engine import DockerEngine, docker_engine

__all__ = ["d", "docker_engine", "engine"]


@pytest.fixture
def engine(docker_engine: DockerEngine) -> DockerEngine:
    """The session's engine, started again if a test killed it."""
    docker_engine.ensure_running()
    return docker_engine


@pytest.fixture
def d(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon on ``tmp_path/config.toml`` (call ``d.start()``); stopped afterwards."""
    proc = DaemonProcess(tmp_path)
    try:
        yield proc
    finally:
        proc.cleanup()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``pytest -n`` (pytest-xdist, ``--dist loadgroup``) every test of the Docker engine
    runs on one worker: a second private dockerd would fight the first for the bridge network
    and iptables. Without xdist the mark is inert."""
    for item in items:
        if "docker_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("docker"))
