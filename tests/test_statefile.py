"""The state file (``<state>/state.json``) and the adoption plan, as pure logic (issue 10).

End-to-end behaviour (re-exec, kill -9 and adoption) is tests/test_takeover.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

from supervisor.adoption import Candidate, plan
from supervisor.statefile import (
    FORMAT,
    InstanceRecord,
    ReexecRecord,
    ServiceRecord,
    StateFile,
    StateFileError,
    read_state,
    write_state,
)

ME = psutil.Process(os.getpid())


def record(**instance: object) -> ServiceRecord:
    rec = ServiceRecord(kind="process", digest="d", state="running", health="none")
    if instance:
        rec.instance = InstanceRecord(
            pid=int(instance.get("pid", 10)),  # type: ignore[call-overload]
            pgid=int(instance.get("pid", 10)),  # type: ignore[call-overload]
            create_time=instance.get("create_time", 100.0),  # type: ignore[arg-type]
            started_wall=1.0,
        )
    return rec


class TestStateFile:
    def test_round_trip_keeps_every_field(self, tmp_path: Path) -> None:
        """What is written is what is read: counters, instance, re-exec record."""
        rec = record(pid=42, create_time=123.25)
        rec.restarts, rec.backoff_attempt, rec.retry_in = 3, 2, 1.5
        assert rec.instance is not None
        rec.instance.fds, rec.instance.pending = [17, 18], ["n 00", ""]
        state = StateFile(
            pid=7,
            services={"api": rec},
            reexec=ReexecRecord(lock_fd=3, listener_fd=4, reply_fd=5, reply_id=9),
        )
        path = tmp_path / "state.json"
        write_state(path, state)
        assert path.stat().st_mode & 0o777 == 0o600
        back = read_state(path)
        assert back is not None and back.pid == 7
        assert back.services["api"] == rec
        assert back.reexec == state.reexec

    def test_the_encoding_cache_writes_the_same_bytes(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With a cache, each write is byte for byte the uncached one: records equal to
        the cached ones reuse their text, a changed or new one is encoded afresh, and a
        service gone leaves the cache."""
        monkeypatch.setattr("supervisor.statefile.time.time", lambda: 1700000000.5)
        services = {"api": record(pid=42), 'odd "name" é': record(), "web": record(pid=9)}
        cache: dict[str, tuple[ServiceRecord, str]] = {}

        def both(state: StateFile) -> tuple[bytes, bytes]:
            write_state(tmp_path / "plain.json", state)
            write_state(tmp_path / "cached.json", state, cache)
            return (tmp_path / "plain.json").read_bytes(), (tmp_path / "cached.json").read_bytes()

        plain, cached = both(StateFile(pid=7, services=services))
        assert plain == cached
        changed = {**services, "api": record(pid=43), "new": record()}
        del changed["web"]
        plain, cached = both(
            StateFile(pid=7, services=changed, reexec=ReexecRecord(lock_fd=3, listener_fd=4))
        )
        assert plain == cached and b'"pid":43' in cached
        assert sorted(cache) == sorted(changed)
        plain, cached = both(StateFile(pid=7, services={}))
        assert plain == cached and json.loads(cached)["services"] == {} and cache == {}

    def test_missing_is_none(self, tmp_path: Path) -> None:
        """No file: nothing to take over (the first start, or after a clean stop)."""
        assert read_state(tmp_path / "state.json") is None

    @pytest.mark.parametrize(
        ("content", "says"),
        [
            (b'{"format": 1, "pid": 3, "servi', "corrupt or truncated"),
            (b"", "corrupt or truncated"),
            (b"[]", "expected a JSON object"),
            (b'{"pid": 3}', "no format version"),
            (b'{"format": 99, "hostvisor": "9.0", "pid": 3}', "reads format 1 at most"),
            (b'{"format": 1, "pid": -1}', "malformed"),
            (b'{"format": 1, "pid": 1, "services": {"a": {"kind": 1}}}', "malformed"),
            (b'{"format": 1, "pid": 1, "written": NaN}', "corrupt or truncated"),
            (
                b'{"format": 1, "pid": 1, "services": {"a": {"kind": "process", "digest": "",'
                b' "state": "running", "health": "none", "instance": {"pid": "x"}}}}',
                "malformed",
            ),
        ],
    )
    def test_bad_files_are_refused_with_the_path_and_the_reason(
        self, tmp_path: Path, content: bytes, says: str
    ) -> None:
        """Corrupt, truncated, newer or wrongly shaped: StateFileError naming the file."""
        path = tmp_path / "state.json"
        path.write_bytes(content)
        with pytest.raises(StateFileError) as caught:
            read_state(path)
        assert str(path) in str(caught.value) and says in str(caught.value)

    def test_a_folder_or_a_symlink_is_refused(self, tmp_path: Path) -> None:
        """Not a regular file (a folder, a symbolic link): refused, never followed."""
        (tmp_path / "state.json").mkdir()
        with pytest.raises(StateFileError):
            read_state(tmp_path / "state.json")
        (tmp_path / "real.json").write_text(json.dumps({"format": FORMAT, "pid": 1}))
        (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
        with pytest.raises(StateFileError):
            read_state(tmp_path / "link.json")

    def test_unknown_keys_of_the_same_format_are_ignored(self, tmp_path: Path) -> None:
        """A later 0.x of format 1 may add keys: an older reader skips them."""
        doc = {"format": 1, "pid": 2, "extra": 1, "services": {"a": {
            "kind": "process", "digest": "", "state": "stopped", "health": "none", "new": 1,
        }}}  # fmt: skip
        path = tmp_path / "state.json"
        path.write_text(json.dumps(doc))
        state = read_state(path)
        assert state is not None and state.services["a"].state == "stopped"


def cand(service: str, pid: int, created: float) -> Candidate:
    return Candidate(service, pid, created, ME)


class TestPlan:
    UNITS = {"api": "process", "box": "container"}

    def test_the_recorded_instance_is_adopted_and_extras_stopped(self) -> None:
        """The state file's (pid, start time) wins over an older candidate; others stop."""
        state = StateFile(pid=1, services={"api": record(pid=20, create_time=50.0)})
        older, named = cand("api", 10, 1.0), cand("api", 20, 50.0)
        decided = plan([older, named], state=state, units=self.UNITS, policy="adopt")
        assert decided.adopt == {"api": named}
        assert decided.stop == [older]

    def test_a_start_time_that_does_not_match_is_not_the_recorded_instance(self) -> None:
        """Same pid, another start time: a reused pid; with "stop" nothing is adopted."""
        state = StateFile(pid=1, services={"api": record(pid=20, create_time=50.0)})
        reused = cand("api", 20, 60.0)
        assert plan([reused], state=state, units=self.UNITS, policy="stop").adopt == {}
        assert plan([reused], state=state, units=self.UNITS, policy="stop").stop == [reused]

    def test_without_a_state_file_adopt_keeps_the_oldest(self) -> None:
        """``orphans = "adopt"``: one instance is kept (the oldest), the rest stopped."""
        a, b = cand("api", 30, 5.0), cand("api", 31, 6.0)
        decided = plan([b, a], state=None, units=self.UNITS, policy="adopt")
        assert decided.adopt == {"api": a} and decided.stop == [b]

    def test_without_a_state_file_stop_stops_them_all(self) -> None:
        """``orphans = "stop"``: every candidate the state file does not name is stopped."""
        a = cand("api", 30, 5.0)
        decided = plan([a], state=None, units=self.UNITS, policy="stop")
        assert decided.adopt == {} and decided.stop == [a]

    def test_gone_units_and_containers_are_stopped(self) -> None:
        """A marked process of a unit that no longer exists, or that is a container now."""
        gone, box = cand("old", 40, 1.0), cand("box", 41, 1.0)
        decided = plan([gone, box], state=None, units=self.UNITS, policy="adopt")
        assert decided.adopt == {} and decided.stop == [box, gone]
