"""Shared fixtures: the private Docker engine is started once per test session."""

from tests.docker_engine import docker_engine

__all__ = ["docker_engine"]
