"""Fuzzing ``config.load`` (issue 9, item 1): random TOML documents built from hypothesis
strategies, the same documents with random bytes spliced in, and random bytes, as config.toml
and as unit files. ``load`` returns a ``Loaded`` or raises ``ConfigError`` whose issues never
come from the loader's last line of defence, nothing else; and what it accepts can run (finite
bounded numbers, no NUL in any string)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from supervisor.config import INTERNAL_ERROR, load
from supervisor.config_values import MAX_DURATION, MAX_SIZE
from supervisor.errors import ConfigError
from supervisor.spec import Loaded

FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

UNIT_KEYS = [
    "description",
    "command",
    "container",
    "recreate_command",
    "workdir",
    "env",
    "env_files",
    "secret_env_files",
    "autostart",
    "restart",
    "depends_on",
    "port",
    "reclaim_port",
    "stop_signal",
    "stop_timeout",
    "start_seconds",
    "give_up_after",
]
TABLES = {
    "preflight": ["command", "timeout"],
    "health": ["http", "tcp", "exec", "docker", "expect_status", "interval", "timeout",
               "start_period", "failure_threshold", "success_threshold"],
    "backoff": ["initial", "max", "multiplier", "jitter", "reset_after"],
    "post_start": ["http", "method", "command", "timeout"],
    "logs": ["max_size", "backups"],
    "daemon": ["units_dir", "socket", "state_dir", "shutdown_timeout", "log_level", "allow_uids"],
    "telemetry": ["enabled", "endpoint", "protocol", "export_timeout"],
}  # fmt: skip
PLAUSIBLE = ["1s", "0s", "250ms", "-1s", "1m30s", "365d", "366d", "1e308", "10MiB", "1TiB",
             "2TiB", "SIGTERM", "KILL", "http://127.0.0.1:1/", "http://a:99999/", "http://[::1/",
             "a:1", "a:0", "always", "on-failure", "no", "own", "any", "healthy", "started",
             "x.env", "-x.env", "-missing.env", "secret.env", "~", "~/x", "$HOME/x", "${HOME}",
             "units", ".", "..", "/", "", " ", "\0", "a\0b", "x" * 300, "1" * 40]  # fmt: skip


common = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.text(max_size=12),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
rare = st.one_of(
    st.sampled_from([10**30, 2**63, 10**4299]),
    st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
    st.dates(),
)
# one_of picks a branch uniformly: repeating `common` makes the odd leaves rarer, so that a fair
# share of documents gets into validation and some load. What stops the parser itself (huge
# integers, deep nesting, NUL, bad UTF-8) is spliced into the text by `spliced`.
scalars = st.one_of(*[common] * 10, rare)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["A", "PASSWORD", "db", "B C", ""]), inner, max_size=3),
    ),
    max_leaves=6,
)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _string(key)


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(
            value) else repr(value)  # fmt: skip
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def dumps(document: Mapping[str, Any]) -> str:
    """A TOML document: one ``key = value`` line per key, tables as inline tables."""
    return "".join(f"{_key(k)} = {_value(v)}\n" for k, v in document.items())


def table(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    names = st.one_of(*[st.sampled_from(keys)] * 10, st.text(max_size=8))
    return st.dictionaries(names, values, max_size=3)


def entries(keys: list[str], tables: list[str]) -> st.SearchStrategy[list[tuple[str, Any]]]:
    """A few ``key = value`` pairs: known keys (mostly), tables of known keys, unknown keys."""
    plain = st.tuples(st.one_of(*[st.sampled_from(keys)] * 10, st.text(max_size=8)), values)
    tabled = st.sampled_from(tables).flatmap(lambda t: st.tuples(st.just(t), table(TABLES[t])))
    return st.lists(st.one_of(plain, tabled), max_size=4)


UNIT_TABLES = ["preflight", "health", "backoff", "post_start", "logs"]
units = st.builds(
    lambda head, rest: {**head, **dict(rest)},
    st.fixed_dictionaries({"command": st.one_of(st.just(["true"]), st.just("sleep 1"), values)}),
    entries(UNIT_KEYS, UNIT_TABLES),
)
configs = st.fixed_dictionaries(
    {},
    optional={
        "daemon": st.one_of(*[table(TABLES["daemon"])] * 5, values),
        "telemetry": table(TABLES["telemetry"]),
        "defaults": units,
    },
)


HOSTILE = st.sampled_from([
    b"1" * 5000, b"x = " + b"1" * 5000 + b"\n", b"[" * 1000, b"x = " + b"[" * 1200 + b"]" * 1200,
    b"x = " + b"{a=" * 900 + b"1" + b"}" * 900, b'"\\u0000"', b"\x00", b"\xff\xfe", b"\r", b"\n[",
    b'\ncommand = ["x", "\\u0000"]\n', b"\ninterval = 1e308\n", b"\nport = 80\n",
])  # fmt: skip


@st.composite
def spliced(draw: st.DrawFn, documents: st.SearchStrategy[dict[str, Any]]) -> bytes:
    """A document's UTF-8 with random or hostile bytes inserted at a random place."""
    data = dumps(draw(documents)).encode()
    at = draw(st.integers(0, len(data)))
    return data[:at] + draw(st.one_of(st.binary(max_size=12), HOSTILE)) + data[at:]


files = st.one_of(units.map(lambda d: dumps(d).encode()), spliced(units), st.binary(max_size=300))
env_files = st.one_of(
    st.binary(max_size=80),
    st.lists(st.tuples(st.sampled_from(["A", "PASSWORD", "export B", "1x", ""]),
                       st.text(max_size=10)), max_size=4).map(
        lambda pairs: "\n".join(f"{k}={v}" for k, v in pairs).encode("utf-8", "surrogatepass")
    ),
)  # fmt: skip


def assert_runnable(loaded: Loaded) -> None:
    """Every number of every spec is finite and bounded; no string or path holds a NUL."""

    def walk(value: Any) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                walk(getattr(value, f.name))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, tuple | list | set | frozenset):
            for v in value:
                walk(v)
        elif isinstance(value, float):
            assert math.isfinite(value) and abs(value) <= MAX_DURATION, value
        elif isinstance(value, int) and not isinstance(value, bool):
            assert abs(value) <= MAX_SIZE, value
        elif isinstance(value, str | Path):
            assert "\0" not in str(value), value

    walk(loaded.daemon)
    for spec in loaded.services.values():
        walk(spec)
    json.dumps(sorted(str(v) for s in loaded.services.values() for v in s.secret_values()))


def load_tree(config: bytes, unit_files: list[bytes], env: list[bytes]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "units").mkdir()
        written = [(root / "config.toml", config)]
        written += [(root / "units" / f"u{i}.toml", data) for i, data in enumerate(unit_files)]
        written += [
            (root / name, data) for name, data in zip(["x.env", "secret.env"], env, strict=False)
        ]
        for path, data in written:
            path.write_bytes(data)
            path.chmod(0o644)
        try:
            loaded = load(root / "config.toml", environ={"HOME": str(root)})
        except ConfigError as exc:
            assert exc.issues
            assert not [str(i) for i in exc.issues if INTERNAL_ERROR in i.message]
            assert all("\n" not in str(i) for i in exc.issues)
        else:
            assert_runnable(loaded)


class TestFuzzLoad:
    @FUZZ
    @given(config=configs, unit_files=st.lists(units, max_size=3),
           env=st.lists(env_files, max_size=2))  # fmt: skip
    def test_random_toml_documents(
        self, config: dict[str, Any], unit_files: list[dict[str, Any]], env: list[bytes]
    ) -> None:
        """Documents of known and unknown keys with values of every TOML type and then some."""
        load_tree(dumps(config).encode(), [dumps(u).encode() for u in unit_files], env)

    @FUZZ
    @given(config=st.one_of(spliced(configs), st.binary(max_size=300)),
           unit_files=st.lists(files, max_size=3))  # fmt: skip
    def test_random_bytes_as_config_and_units(self, config: bytes, unit_files: list[bytes]) -> None:
        """Bytes of no shape, and documents with bytes spliced in."""
        load_tree(config, unit_files, [])
