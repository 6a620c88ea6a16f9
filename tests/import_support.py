"""What the `hostvisor import` tests share: the real CLI against a test daemon's folders."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.daemon_harness import DaemonProcess


def run_import(
    d: DaemonProcess, kind: str, *files: str | Path, out: Path | None = None,
    stdin: str | None = None, env: Mapping[str, str] | None = None, cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``hostvisor import KIND FILE... -o OUT -c CONFIG`` (OUT: the daemon's units folder;
    env: the daemon's, or ``env`` whole)."""
    argv = [sys.executable, "-m", "supervisor", "import", kind, *map(str, files)]
    argv += ["-o", str(out or d.units), "-c", str(d.config_path)]
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=60,
        env=dict(env) if env is not None else d.env(), cwd=cwd or d.root,
    )  # fmt: skip


def read_unit(folder: Path, name: str) -> dict[str, Any]:
    """``folder/<name>.toml``, parsed."""
    return tomllib.loads((folder / f"{name}.toml").read_text())
