"""``supervisor.socketcache``: the client's memory of ``[daemon] socket`` (issue 14).

Each check runs in a fresh interpreter, as ``hostvisor status`` does, so that whether
tomllib was imported says whether the config was parsed or the cache answered.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import socketcache

PROBE = """
import json, sys
import supervisor.socketcache as c
print(json.dumps([c.configured_socket(sys.argv[1]), "tomllib" in sys.modules]))
"""


def lookup(config: Path, cache: Path) -> tuple[str | None, bool]:
    """(the socket found, whether tomllib was imported), from a new interpreter."""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    argv = [sys.executable, "-c", PROBE, str(config)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    found, parsed = json.loads(out.stdout)
    return found, parsed


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nsocket = "a.sock"\n')
    return path


def entries_of(cache: Path) -> dict[str, dict[str, object]]:
    loaded: dict[str, dict[str, object]] = json.loads(
        (cache / "hostvisor" / "sockets.json").read_text()
    )
    return loaded


def test_the_second_lookup_reads_no_toml_and_answers_alike(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), True)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), False)
    entry = entries_of(cache)[str(config)]
    assert entry["socket"] == "a.sock"  # the raw value: ~ and $VARS are expanded per run
    assert entry["config"] == config.read_text()  # the bytes it is the answer for
    mode = (cache / "hostvisor" / "sockets.json").stat().st_mode
    assert mode & 0o777 == 0o600 and (cache / "hostvisor").stat().st_mode & 0o777 == 0o700


def test_any_change_of_the_bytes_is_parsed_again(config: Path, tmp_path: Path) -> None:
    """Same size, same instant (same timestamps, on a coarse clock): the bytes decide."""
    cache = tmp_path / "cache"
    lookup(config, cache)
    config.write_text('[daemon]\nsocket = "b.sock"\n')
    assert lookup(config, cache) == (str(tmp_path / "b.sock"), True)
    (tmp_path / "other.toml").write_text("[daemon]\n")
    os.rename(tmp_path / "other.toml", config)  # renamed over: another inode
    assert lookup(config, cache) == (None, True)
    assert lookup(config, cache) == (None, False)


def test_a_big_config_is_parsed_every_time(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    big = tmp_path / "big.toml"
    big.write_text('[daemon]\nsocket = "s.sock"\n' + "# padding\n" * socketcache.MAX_CONFIG)
    for _ in range(2):
        assert lookup(big, cache) == (str(tmp_path / "s.sock"), True)
    assert not (cache / "hostvisor" / "sockets.json").exists()


@pytest.mark.parametrize(
    "damage",
    [
        b"not json",
        b"[1, 2]",
        b'{"x": "y"}',
        b"[" * 100_000,  # deeper than the decoder's recursion limit
        b"{" + b" " * (socketcache.MAX_BYTES + 10) + b"}",
        b"\xff\xfe",
    ],
)
def test_a_damaged_cache_file_is_replaced(config: Path, tmp_path: Path, damage: bytes) -> None:
    cache = tmp_path / "cache"
    (cache / "hostvisor").mkdir(parents=True, mode=0o700)
    (cache / "hostvisor" / "sockets.json").write_bytes(damage)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), True)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), False)


def test_a_cache_that_is_a_fifo_or_a_link_never_blocks(config: Path, tmp_path: Path) -> None:
    for name, make in [
        ("fifo", os.mkfifo),
        ("link", lambda p: os.symlink("/dev/zero", p)),
    ]:
        cache = tmp_path / name
        (cache / "hostvisor").mkdir(parents=True, mode=0o700)
        make(cache / "hostvisor" / "sockets.json")
        assert lookup(config, cache) == (str(tmp_path / "a.sock"), True), name


def test_a_wrong_entry_is_not_believed(config: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "hostvisor").mkdir(parents=True, mode=0o700)
    wrong = {str(config): {"config": "[daemon]\n", "socket": "/elsewhere.sock"}}
    (cache / "hostvisor" / "sockets.json").write_text(json.dumps(wrong))
    os.chmod(cache / "hostvisor" / "sockets.json", 0o600)
    assert lookup(config, cache) == (str(tmp_path / "a.sock"), True)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_others_own_or_may_write_is_neither_read_nor_written(
    config: Path, tmp_path: Path
) -> None:
    """Another user's planted entry (the right bytes, their socket) never steers the client."""
    planted = {str(config): {"config": config.read_text(), "socket": "/tmp/evil.sock"}}
    for case in ("theirs", "writable"):
        cache = tmp_path / case
        folder = cache / "hostvisor"
        folder.mkdir(parents=True)
        (folder / "sockets.json").write_text(json.dumps(planted))
        if case == "theirs":
            os.chown(folder, 65534, 65534)
            os.chown(folder / "sockets.json", 65534, 65534)
        else:
            os.chmod(folder, 0o777)
        for _ in range(2):
            assert lookup(config, cache) == (str(tmp_path / "a.sock"), True), case
        assert json.loads((folder / "sockets.json").read_text()) == planted  # not written


def test_an_unwritable_cache_changes_nothing(config: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the folder should be")
    assert lookup(config, blocker) == (str(tmp_path / "a.sock"), True)
    assert lookup(config, blocker) == (str(tmp_path / "a.sock"), True)


def test_what_is_not_a_socket_setting_is_none(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cases: dict[str, str | bytes | None] = {
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
        if text is not None:
            assert lookup(tmp_path / name, cache) == (None, False), name  # remembered too
    os.mkfifo(tmp_path / "fifo.toml")  # would block a read for ever
    assert lookup(tmp_path / "fifo.toml", cache) == (None, False)
    assert lookup(tmp_path, cache) == (None, False)  # a folder


def test_entries_are_bounded(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for i in range(socketcache.MAX_ENTRIES + 5):
        path = tmp_path / f"c{i}.toml"
        path.write_text(f'[daemon]\nsocket = "s{i}.sock"\n')
        lookup(path, cache)
    entries = entries_of(cache)
    assert len(entries) == socketcache.MAX_ENTRIES
    assert str(tmp_path / "c0.toml") not in entries  # the oldest went first
    last = socketcache.MAX_ENTRIES + 4
    assert entries[str(tmp_path / f"c{last}.toml")]["socket"] == f"s{last}.sock"


def test_status_finds_the_socket_through_the_cache(config: Path, tmp_path: Path) -> None:
    """End to end: ``hostvisor status -c CONFIG`` twice: both name the configured socket;
    the second imports no tomllib."""
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
