"""A container unit's resource figures come from the engine's one-shot stats (issue 10)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker_engine import DockerEngine
from tests.test_containers import Containers, open_daemon, unit

pytestmark = pytest.mark.docker


@pytest.fixture
def boxes(engine: DockerEngine) -> Iterator[Containers]:
    """As test_containers' ``containers``: this test's containers, removed afterwards."""
    made = Containers(engine)
    yield made
    engine.ensure_running()
    made.remove_all()


class TestContainerResources:
    def test_stats_fill_the_figures(
        self, tmp_path: Path, engine: DockerEngine, boxes: Containers
    ) -> None:
        """A running container: processes is the engine's pids count (sh and sleep),
        memory_bytes is set, and cpu_percent is a number from the second sample on."""
        name = boxes.name("stats")
        boxes.run(name)
        with open_daemon(tmp_path, engine, {"box": unit(name)}) as d:
            d.wait_state("box", "running")
            found: dict[str, object] = {}

            def sampled() -> bool:
                found.update(d.call("resources", services=["box"], max_age=0.2)["services"]["box"])
                return found["processes"] == 2 and isinstance(found["cpu_percent"], float)

            d.wait_for(sampled, what="container stats")
            assert isinstance(found["memory_bytes"], int) and found["memory_bytes"] > 0
            assert d.status("box")["processes"] == 2
