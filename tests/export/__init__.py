"""Fixtures of ``tests/test_export_k8s.py``: ``units/`` (one unit per mapping), the env
files they read, and helpers that run the real CLI and read its YAML."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

__all__ = [
    "FIXTURES",
    "K8S_VERSION",
    "export",
    "find",
    "main_container",
    "parse",
    "pod_of",
    "project",
    "validate",
    "warnings_of",
    "write",
]

FIXTURES = Path(__file__).parent
#: The newest Kubernetes the installed kubernetes-validate has schemas for.
K8S_VERSION: str = kubernetes_validate.latest_version()


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def project(root: Path, units: dict[str, str] | None = None) -> Path:
    """A config folder in ``root``: ``units`` (name -> text), or without them the fixture
    units and their env files (mode 0600); returns config.toml."""
    config = write(root / "config.toml", f'[daemon]\nstate_dir = "{root / "state"}"\n')
    if units is None:
        (root / "units").mkdir(exist_ok=True)
        for source in sorted((FIXTURES / "units").glob("*.toml")):
            shutil.copyfile(source, root / "units" / source.name)
            (root / "units" / source.name).chmod(0o644)
        for env in ("web.env", "pin.env"):
            write(root / env, (FIXTURES / env).read_text(), 0o600)
    for name, text in (units or {}).items():
        write(root / "units" / f"{name}.toml", text)
    return config


def export(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``hostvisor export k8s ARGS -c CONFIG`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor", "export", "k8s", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=config.parent,
    )


def parse(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def validate(docs: list[dict[str, Any]]) -> None:
    """Every object valid for :data:`K8S_VERSION`, strict (unknown fields are errors)."""
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    return found[0]


def pod_of(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod: dict[str, Any] = spec["template"]["spec"]
    return pod


def main_container(obj: dict[str, Any]) -> dict[str, Any]:
    containers = pod_of(obj)["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]
