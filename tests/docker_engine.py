"""A private Docker engine for the tests (``/work/shared/recipes/docker-engine.md``).

Debian's ``dockerd`` runs on its own socket, data root, exec root and pidfile
under a short ``/tmp/hvd-*`` folder, so it never touches a system engine, and a
test image ``hostvisor-test/busybox:latest`` is imported from the static
busybox (no registry). The session fixture :func:`docker_engine` starts it once
and SKIPS, with the reason, where that is impossible (no dockerd, not root, no
static busybox, the engine does not answer within 30 s).

Import the fixture into ``tests/conftest.py``::

    from tests.docker_engine import docker_engine  # noqa: F401
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["IMAGE", "DockerEngine", "EngineUnavailable", "docker_engine", "start_engine"]

IMAGE = "hostvisor-test/busybox:latest"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "sleep", "echo", "nc", "httpd", "cat", "wget", "true", "false", "kill")
START_DEADLINE = 30.0


class EngineUnavailable(Exception):
    """No private engine can run here; the message is the skip reason."""


class DockerEngine:
    """One private dockerd, started by :func:`start_engine`.

    Attributes:
        root: the engine's folder (socket, data, exec root, pidfile, log).
        host: its ``DOCKER_HOST`` URL (``unix:///tmp/hvd-xxxx/d.sock``).
        image: the busybox test image.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "d.sock"
        self.host = f"unix://{self.socket}"
        self.pidfile = root / "d.pid"
        self.log = root / "dockerd.log"
        self.image = IMAGE
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<DockerEngine {self.host} {'up' if self.alive else 'down'}>"

    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` with ``DOCKER_HOST`` pointing at this engine."""
        return {**os.environ, "DOCKER_HOST": self.host}

    @property
    def alive(self) -> bool:
        """True while the dockerd process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """dockerd's pid while it runs."""
        return self._proc.pid if self.alive and self._proc else None

    def docker(
        self, *args: str, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this engine; raises CalledProcessError if ``check``."""
        return subprocess.run(
            ["docker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def start(self, *, deadline: float = START_DEADLINE) -> None:
        """Start dockerd and wait until ``docker version`` answers.

        Raises:
            EngineUnavailable: dockerd exited or did not answer within ``deadline`` s.
        """
        for stale in (self.pidfile, self.root / "exec" / "containerd" / "containerd.pid"):
            # A killed engine leaves these; dockerd refuses to start (or waits for a
            # zombie containerd) while they name a pid that still exists.
            stale.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    "dockerd",
                    f"--host={self.host}",
                    f"--data-root={self.root / 'data'}",
                    f"--exec-root={self.root / 'exec'}",
                    f"--pidfile={self.pidfile}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # Ctrl-C of pytest does not reach it
            )
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self._proc.poll() is not None:
                raise EngineUnavailable(
                    f"dockerd exited with {self._proc.returncode}: {self._tail()}"
                )
            if self.docker("version", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.1)  # polling a process we do not control: nothing to wait on
        self.stop()
        raise EngineUnavailable(f"dockerd did not answer within {deadline:g}s: {self._tail()}")

    def kill(self) -> None:
        """SIGKILL dockerd (and its containerd), as a crash would; containers keep running."""
        if self._proc is None:
            return
        containerd = self._containerd_pid()
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait(timeout=10)
        if containerd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(containerd, signal.SIGKILL)

    def ensure_running(self) -> None:
        """Start dockerd again if a test left it down."""
        if not self.alive:
            self.start()

    def restart_after_kill(self) -> None:
        """:meth:`kill`, then a fresh dockerd on the same roots (the seed incident)."""
        self.kill()
        self.start()

    def stop(self, *, timeout: float = 20.0) -> None:
        """SIGTERM dockerd by its pidfile, SIGKILL after ``timeout`` s; unmount leftovers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            pid = _read_pid(self.pidfile) or proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._unmount()

    def import_image(self) -> None:
        """Build :data:`IMAGE` from the static busybox (no registry) and check it runs.

        Raises:
            EngineUnavailable: busybox is missing or does not run in a container.
        """
        if not Path(BUSYBOX).is_file():
            raise EngineUnavailable(f"{BUSYBOX} is missing (apt-get install busybox-static)")
        tree = self.root / "image"
        (tree / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, tree / "bin" / "busybox")
        for applet in APPLETS:
            link = tree / "bin" / applet
            if not link.is_symlink():
                link.symlink_to("busybox")
        tar = subprocess.run(["tar", "-C", str(tree), "-c", "."], capture_output=True, check=True)
        subprocess.run(
            ["docker", "import", "-", self.image],
            input=tar.stdout,
            env=self.env,
            capture_output=True,
            check=True,
            timeout=60,
        )
        probe = self.docker("run", "--rm", "--network", "none", self.image, "true", check=False)
        if probe.returncode != 0:
            raise EngineUnavailable(
                f"the busybox image does not run (is {BUSYBOX} static?): {probe.stderr.strip()}"
            )

    def remove_all_containers(self) -> None:
        """``docker rm -f`` every container of this engine."""
        ids = self.docker("ps", "-aq", check=False).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False)

    def _containerd_pid(self) -> int | None:
        return _read_pid(self.root / "exec" / "containerd" / "containerd.pid")

    def _tail(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " / ".join(lines[-3:])

    def _unmount(self) -> None:
        """Unmount what a killed engine left under :attr:`root` (deepest first)."""
        prefix = str(self.root) + "/"
        with open("/proc/self/mounts") as mounts:
            points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def start_engine(*, deadline: float = START_DEADLINE) -> DockerEngine:
    """Start a private engine with the test image imported; the caller stops it.

    Raises:
        EngineUnavailable: the reason why no engine can run here.
    """
    missing = [
        tool for tool in ("dockerd", "docker", "containerd", "tar") if not shutil.which(tool)
    ]
    if missing:
        raise EngineUnavailable(
            f"{', '.join(missing)} not found (apt-get install docker.io busybox-static)"
        )
    if os.geteuid() != 0:
        raise EngineUnavailable("a private dockerd needs root")
    engine = DockerEngine(Path(tempfile.mkdtemp(prefix="hvd-", dir="/tmp")))
    try:
        engine.start(deadline=deadline)
        engine.import_image()
    except (EngineUnavailable, OSError, subprocess.SubprocessError) as exc:
        engine.stop()
        shutil.rmtree(engine.root, ignore_errors=True)
        if isinstance(exc, EngineUnavailable):
            raise
        raise EngineUnavailable(f"the private engine did not come up: {exc}") from exc
    return engine


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """A private Docker engine for the whole session; skips the test if none can run."""
    try:
        engine = start_engine()
    except EngineUnavailable as exc:
        pytest.skip(f"no Docker engine: {exc}")
    try:
        yield engine
    finally:
        if engine.alive:
            engine.remove_all_containers()
        engine.stop()
        shutil.rmtree(engine.root, ignore_errors=True)
