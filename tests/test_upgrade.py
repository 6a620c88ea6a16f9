"""Noticing that hostvisor was upgraded under a running daemon (issue 10, item 1).

Every change is made to a copy of the ``supervisor`` package in a temporary folder, the way
pip and ``git checkout`` make it: a file replaced by a new one (``os.replace``), a file
rewritten in place, a module added or removed, the whole folder replaced.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

import pytest

import supervisor
from supervisor.errors import DriverError
from supervisor.upgrade import (
    DISTRIBUTION,
    Installed,
    guard_lazy_import,
    installed_version,
    package_root,
)

SAME = "hostvisor 0.2.0 runs, but the installed files changed: run `hostvisor reexec` to switch to them"


class Versions:
    """A stand-in for the installed version: what ``pip show hostvisor`` would say now."""

    def __init__(self, now: str) -> None:
        self.now = now

    def __call__(self) -> str:
        return self.now


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """A copy of the running package, with its ``__pycache__`` folders."""
    root = tmp_path / "site" / "supervisor"
    shutil.copytree(package_root(), root, symlinks=True)
    return root


def replace(path: Path, text: str) -> None:
    """Write a new file and rename it over ``path``, as pip does: a new inode."""
    new = path.with_name(f".{path.name}.new")
    new.write_text(text)
    os.replace(new, path)


def write_metadata(site: Path, version: str) -> Path:
    """An installed distribution's metadata folder, as pip writes it."""
    folder = site / f"{DISTRIBUTION}-{version}.dist-info"
    folder.mkdir(parents=True)
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {version}\n\nVersion: not-me\n"
    )
    return folder


class TestSnapshot:
    def test_records_every_python_file_of_the_running_package(self) -> None:
        """Relative paths of all ``*.py`` files, subpackages included, ``__pycache__`` left out;
        each with its (st_dev, st_ino, st_mtime_ns, st_size)."""
        installed = Installed.snapshot()
        root = Path(supervisor.__file__).parent
        expected = {p.relative_to(root).as_posix() for p in root.rglob("*.py")}
        assert set(installed.files) == expected
        assert {"__init__.py", "upgrade.py", "drivers/docker.py"} <= set(installed.files)
        st = (root / "drivers" / "docker.py").stat()
        assert installed.files["drivers/docker.py"] == (
            st.st_dev,
            st.st_ino,
            st.st_mtime_ns,
            st.st_size,
        )
        assert installed.root == root

    def test_the_version_is_the_installed_distributions(self) -> None:
        """The version of the ``hostvisor`` distribution, as importlib.metadata reads it."""
        assert Installed.snapshot().version == importlib.metadata.version(DISTRIBUTION)

    def test_nothing_changed_is_none(self, copy: Path) -> None:
        """A fresh snapshot of untouched files reports nothing, however often it is asked."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        assert installed.changed() is None
        assert installed.changed() is None

    def test_repr_says_what_runs(self, copy: Path) -> None:
        """For people: the version, how many files, where."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        assert (
            repr(installed)
            == f"<Installed hostvisor 0.2.0: {len(installed.files)} files in {copy}>"
        )


class TestChanged:
    def test_a_file_replaced_by_an_upgrade_names_both_versions(self, copy: Path) -> None:
        """pip writes new files (new inodes) and a new version: the line says which one and what
        to run."""
        versions = Versions("0.2.0")
        installed = Installed.snapshot(root=copy, version=versions)
        replace(copy / "drivers" / "docker.py", (copy / "drivers" / "docker.py").read_text())
        versions.now = "0.3.0"
        assert installed.changed() == (
            "hostvisor 0.2.0 runs, but the installed files changed (now 0.3.0): "
            "run `hostvisor reexec` to switch to them"
        )

    def test_a_file_touched_in_place_with_the_same_version(self, copy: Path) -> None:
        """An editable install after ``git checkout``: same inode, new mtime, same version."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        target = copy / "service.py"
        st = target.stat()
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        assert installed.changed() == SAME

    def test_a_file_rewritten_to_another_size(self, copy: Path) -> None:
        """Same inode, a different size, the mtime put back: still seen."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        target = copy / "states.py"
        st = target.stat()
        with target.open("a") as file:
            file.write("# one more line\n")
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert installed.changed() == SAME

    def test_a_module_added_or_removed(self, copy: Path) -> None:
        """A module the new version adds, or one it drops, is a change."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        (copy / "drivers" / "systemd.py").write_text('"""new in 0.3"""\n')
        assert installed.changed() == SAME
        (copy / "drivers" / "systemd.py").unlink()
        assert installed.changed() is None
        (copy / "ports.py").unlink()
        assert installed.changed() == SAME

    def test_the_whole_folder_replaced(self, copy: Path) -> None:
        """An uninstall then install: the same names, all new files."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        stash = copy.with_name("stash")
        copy.rename(stash)
        shutil.copytree(stash, copy, symlinks=True)
        assert installed.changed() == SAME

    def test_compiled_files_do_not_count(self, copy: Path) -> None:
        """Python writing a ``.pyc`` or anything that is not ``*.py`` is no upgrade."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        (copy / "__pycache__").mkdir(exist_ok=True)
        (copy / "__pycache__" / "new.cpython-311.pyc").write_bytes(b"\0")
        (copy / "py.typed").write_text("partial\n")
        assert installed.changed() is None


class TestInstalledVersion:
    def test_a_reinstall_is_seen_at_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No cache between calls: 0.3.0 replacing 0.2.0 is read at once, however soon after."""
        site = tmp_path / "site"
        monkeypatch.syspath_prepend(str(site))
        old = write_metadata(site, "0.2.0")
        assert installed_version() == "0.2.0"
        assert importlib.metadata.version(DISTRIBUTION) == "0.2.0"  # the same search order
        shutil.rmtree(old)
        write_metadata(site, "0.3.0")
        assert installed_version() == "0.3.0"

    def test_not_installed_reads_the_version_on_disk(
        self, copy: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A source checkout on PYTHONPATH: ``__version__`` of ``__init__.py`` as it is now."""
        monkeypatch.setattr(sys, "path", [str(copy.parent)])
        assert installed_version(copy) == supervisor.__version__
        installed = Installed.snapshot(root=copy)
        init = copy / "__init__.py"
        replace(init, init.read_text().replace(supervisor.__version__, "9.9.9"))
        assert installed_version(copy) == "9.9.9"
        assert installed.changed() == (
            f"hostvisor {supervisor.__version__} runs, but the installed files changed "
            "(now 9.9.9): run `hostvisor reexec` to switch to them"
        )

    def test_nothing_readable_is_unknown(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """No metadata and no ``__init__.py``: ``"unknown"``, never an exception."""
        monkeypatch.setattr(sys, "path", [str(tmp_path / "missing")])
        assert installed_version(tmp_path) == "unknown"


class TestGuardLazyImport:
    def test_refuses_a_first_import_from_changed_files(
        self, copy: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The Docker driver, not imported yet, after an upgrade: DriverError with the line, and
        nothing imported."""
        monkeypatch.delitem(sys.modules, "supervisor.drivers.docker", raising=False)
        versions = Versions("0.2.0")
        installed = Installed.snapshot(root=copy, version=versions)
        replace(copy / "drivers" / "docker.py", "raise ImportError('0.3.0')\n")
        versions.now = "0.3.0"
        with pytest.raises(DriverError) as caught:
            guard_lazy_import(installed, "supervisor.drivers.docker")
        assert str(caught.value) == (
            "hostvisor 0.2.0 runs, but the installed files changed (now 0.3.0): "
            "run `hostvisor reexec` to switch to them; "
            "not loading supervisor.drivers.docker from the new files into this daemon"
        )
        assert "supervisor.drivers.docker" not in sys.modules

    def test_a_module_already_imported_is_never_refused(self, copy: Path) -> None:
        """Importing it again loads nothing new."""
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        replace(copy / "errors.py", "")
        assert installed.changed() is not None
        guard_lazy_import(installed, "supervisor.errors")

    def test_unchanged_files_let_the_import_go(
        self, copy: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Nothing changed: the lazy import may load the module."""
        monkeypatch.delitem(sys.modules, "supervisor.drivers.docker", raising=False)
        installed = Installed.snapshot(root=copy, version=Versions("0.2.0"))
        guard_lazy_import(installed, "supervisor.drivers.docker")

    def test_no_snapshot_never_refuses(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """``None`` (a daemon built without one, as in tests) lets every import go."""
        monkeypatch.delitem(sys.modules, "supervisor.drivers.docker", raising=False)
        guard_lazy_import(None, "supervisor.drivers.docker")


class TestReloadOfTheFirstJob:
    """A reload that brings the daemon's first job after an upgrade would import the job
    modules (and croniter) from the new files into the old daemon: refused, as the Docker
    driver is, with the way out (``hostvisor reexec``)."""

    def _daemon(self, tmp_path: Path, units: dict[str, str]) -> tuple[object, object]:
        from supervisor.config import load
        from supervisor.daemon import Daemon

        (tmp_path / "units").mkdir(exist_ok=True)
        for name, text in units.items():
            (tmp_path / "units" / f"{name}.toml").write_text(text)
        config = tmp_path / "config.toml"
        config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n')
        loaded = load(config)
        return Daemon(loaded, state_dir=tmp_path / "state", socket_path=tmp_path / "s"), loaded

    def test_refused_after_an_upgrade(
        self, tmp_path: Path, copy: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from supervisor.errors import ConfigRejected

        daemon, _ = self._daemon(tmp_path, {"web": 'command = ["sleep", "60"]\n'})
        versions = Versions("0.2.0")
        daemon.installed = Installed.snapshot(root=copy, version=versions)  # type: ignore[attr-defined]
        _, new = self._daemon(tmp_path, {"tick": 'command = ["true"]\nevery = "1m"\n'})
        for module in ("supervisor.job", "supervisor.schedule"):
            monkeypatch.delitem(sys.modules, module, raising=False)
        daemon._refuse_new_code(new)  # type: ignore[attr-defined]  # nothing changed yet
        replace(copy / "job.py", "raise ImportError('0.3.0')\n")
        versions.now = "0.3.0"
        with pytest.raises(ConfigRejected) as caught:
            daemon._refuse_new_code(new)  # type: ignore[attr-defined]
        assert "not loading supervisor.job from the new files" in str(caught.value)
        assert "hostvisor reexec" in str(caught.value)
