"""Shared fixtures: the private Docker engine is started once per test session."""

import pytest

from tests.docker_engine import DockerEngine, docker_engine

__all__ = ["docker_engine", "engine"]


@pytest.fixture
def engine(docker_engine: DockerEngine) -> DockerEngine:
    """The session's engine, started again if a test killed it."""
    docker_engine.ensure_running()
    return docker_engine
