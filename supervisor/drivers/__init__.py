"""Drivers run one instance of a service: a local process or a Docker container."""

from supervisor.drivers.base import Driver, Handle

__all__ = ["Driver", "Handle"]
