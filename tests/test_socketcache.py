"""``supervisor.socketcache``: the client's memory of ``[daemon] socket`` (issue 14).

Each check runs in a fresh interpreter, as ``hostvisor status`` does, so that whether
tomllib was imported says whether the config was parsed or the cache answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from supervisor import socketcache

PROBE = """
import json, sys
import supervisor.socketcache as c
if sys.argv[2] == "eager":
    c.RACY_NS = 0  # remember even a config written this instant
print(json.dumps([c.configured_socket(sys.argv[1]), "tomllib" in sys.modules]))
"""


def lookup(config: Path, cache: Path, *, eager: bool = True) -> tuple[str | None, bool]:
    """(the socket found, whether tomllib was imported), from a new interpreter."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    argv = [sys.executable, "-c", PROBE, str(config), "eager" if eager else "patient"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    found, parsed = json.loads(out.stdout)
    return found, parsed


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nsocket = "a.sock"\n')
    return path


def test_the_second_lookup_reads_no_toml_and_answers_alike(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), True)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), False)
    entries = json.loads((cache / "hostvisor" / "sockets.json").read_text())
    assert entries[str(config)]["socket"] == "a.sock"  # the raw value: ~ and $VARS per run


def test_a_changed_config_is_parsed_again(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lookup(config, cache)
    config.write_text('[daemon]\nsocket = "longer.sock"\n')  # another size: a new tuple at once
    assert lookup(config, cache) == (str(tmp_path / "longer.sock"), True)
    config.unlink()
    (tmp_path / "other.toml").write_text("[daemon]\n")
    os.rename(tmp_path / "other.toml", config)  # renamed over: another inode
    assert lookup(config, cache) == (None, True)


def test_a_config_written_just_now_is_not_remembered(config: Path, tmp_path: Path) -> None:
    """The racy rule: a same-size rewrite in the same timestamp tick cannot be told apart
    by stat, so a config younger than RACY_NS is parsed every time."""
    cache = tmp_path / "cache"
    assert time.time_ns() - config.stat().st_ctime_ns < socketcache.RACY_NS
    assert lookup(config, cache, eager=False) == (str(tmp_path / "a.sock"), True)
    assert not (cache / "hostvisor" / "sockets.json").exists()
    config.write_text('[daemon]\nsocket = "b.sock"\n')  # same size, likely the same tick
    assert lookup(config, cache, eager=False) == (str(tmp_path / "b.sock"), True)


@pytest.mark.parametrize(
    "damage",
    [b"not json", b"[1, 2]", b'{"x": "y"}', b"{" + b" " * (socketcache.MAX_BYTES + 10) + b"}"],
)
def test_a_damaged_cache_file_is_replaced(config: Path, tmp_path: Path, damage: bytes) -> None:
    cache = tmp_path / "cache"
    (cache / "hostvisor").mkdir(parents=True)
    (cache / "hostvisor" / "sockets.json").write_bytes(damage)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), True)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), False)


def test_a_stale_entry_with_the_wrong_stat_is_not_believed(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "hostvisor").mkdir(parents=True)
    wrong = {str(config): {"stat": [0, 0, 0, 0, 0], "socket": "/elsewhere.sock"}}
    (cache / "hostvisor" / "sockets.json").write_text(json.dumps(wrong))
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), True)


def test_an_unwritable_cache_changes_nothing(config: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    assert lookup(config, blocker) == (str(tmp_path / "a.sock"), True)
    assert lookup(config, blocker) == (str(tmp_path / "a.sock"), True)


def test_what_is_not_a_socket_setting_is_none(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cases = {
        "missing.toml": None,
        "invalid.toml": "[daemon\n",
        "number.toml": "[daemon]\nsocket = 5\n",
        "flat.toml": 'daemon = "x"\n',
        "empty.toml": '[daemon]\nsocket = ""\n',
        "latin1.toml": b'[daemon]\nsocket = "\xe9.sock"\n',
    }
    for name, text in cases.items():
        if isinstance(text, bytes):
            (tmp_path / name).write_bytes(text)
        elif text is not None:
            (tmp_path / name).write_text(text)
        assert lookup(tmp_path / name, cache) == (None, text is not None), name
    os.mkfifo(tmp_path / "fifo.toml")  # would block a read for ever
    assert lookup(tmp_path / "fifo.toml", cache) == (None, False)
    assert lookup(tmp_path, cache) == (None, False)  # a folder


def test_entries_are_bounded(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for i in range(socketcache.MAX_ENTRIES + 5):
        path = tmp_path / f"c{i}.toml"
        path.write_text(f'[daemon]\nsocket = "s{i}.sock"\n')
        lookup(path, cache)
    entries = json.loads((cache / "hostvisor" / "sockets.json").read_text())
    assert len(entries) == socketcache.MAX_ENTRIES
    assert str(tmp_path / "c0.toml") not in entries  # the oldest went first
    last = socketcache.MAX_ENTRIES + 4
    assert entries[str(tmp_path / f"c{last}.toml")]["socket"] == f"s{last}.sock"


def test_status_finds_the_socket_through_the_cache(config: Path, tmp_path: Path) -> None:
    """End to end: ``hostvisor status -c CONFIG`` once the config has settled (RACY_NS),
    twice: both name the configured socket; the second imports no tomllib."""
    deadline = time.monotonic() + 10
    while time.time_ns() - config.stat().st_ctime_ns <= socketcache.RACY_NS:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HOSTVISOR_")},
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }
    argv = [sys.executable, "-X", "importtime", "-m", "supervisor", "status", "-c", str(config)]
    runs = [subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60) for _ in "ab"]
    for run in runs:
        assert run.returncode == 4
        assert f"no daemon at {tmp_path / 'a.sock'}" in run.stderr
    assert "| tomllib\n" in runs[0].stderr and "tomllib" not in runs[1].stderr
