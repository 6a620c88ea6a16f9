"""The state page (issue 12 item 4): ``hostvisor status --format markdown`` and the file
that ``[daemon] status_page`` makes the daemon keep true (supervisor/statuspage.py)."""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from supervisor import statuspage
from supervisor.config import check, load
from supervisor.service import Broadcast
from supervisor.statuspage import (
    COLUMNS,
    PageRefused,
    check_page_path,
    keep_page,
    render_markdown,
    write_page,
)
from tests.daemon_harness import daemon, py_cmd
from tests.support import tmpfs

HOSTILE = "a|b\nc\r\nd `code` \x1b[31mred\x1b[0m\x07 \u202eevil\u202c <b>*x*</b> [l](u) \\| e"
#: A Markdown pipe that separates cells (one not escaped by a backslash).
CELL_PIPE = re.compile(r"(?<!\\)\|")


def entry(name: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": name,
        "kind": "process",
        "state": "running",
        "health": "none",
        "pid": 42,
        "container_id": None,
        "restarts": 0,
        "uptime_seconds": 125.0,
        "last_exit": None,
        "message": "",
        "port": None,
        "description": "",
    }
    base.update(fields)
    return base


def doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {
        "daemon": {"pid": 1, "version": "9.8.7", "uptime_seconds": 1.0, "config": "/c.toml"},
        "services": list(entries),
    }


NOW = datetime(2026, 2, 9, 18, 0, 5, tzinfo=timezone(timedelta(hours=-5)))


def table_rows(page: str) -> dict[str, list[str]]:
    """Service name -> its cells, read back from the page's table."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in CELL_PIPE.split(line)[1:-1]]
            rows[cells[0].strip("`")] = cells
    return rows


class TestRender:
    def test_heading_names_the_host_the_time_and_the_version(self) -> None:
        """``# HOST · RFC 3339 time with its offset · hostvisor VERSION``, then a summary."""
        page = render_markdown(doc(entry("api")), host="web-01", now=NOW)
        lines = page.splitlines()
        assert lines[0] == "# web-01 · 2026-02-09T18:00:05-05:00 · hostvisor 9.8.7"
        assert lines[2] == "1 service: 1 running."
        assert page.endswith("\n")

    def test_one_row_per_service_under_the_documented_columns(self) -> None:
        """service, kind, port, state, health, uptime, restarts, last exit, description."""
        services = [
            entry("api", port=8000, health="healthy", description="Score API"),
            entry("db", kind="container", state="fatal", restarts=5, uptime_seconds=None,
                  last_exit={"code": 255, "signal": None}),
            entry("tts", state="backoff", last_exit={"code": None, "signal": 11}),
        ]  # fmt: skip
        page = render_markdown(doc(*services), host="h", now=NOW)
        header = "| " + " | ".join(COLUMNS) + " |"
        assert header in page.splitlines()
        assert COLUMNS == ("service", "kind", "port", "state", "health", "uptime",
                           "restarts", "last exit", "description")  # fmt: skip
        rows = table_rows(page)
        assert rows["api"] == ["`api`", "process", "8000", "running", "healthy", "2m05s", "0",
                               "-", "Score API"]  # fmt: skip
        assert rows["db"] == ["`db`", "container", "-", "**fatal**", "-", "-", "5", "code 255",
                              "-"]  # fmt: skip
        assert rows["tts"][3] == "**backoff**" and rows["tts"][7] == "SIGSEGV"
        assert "3 services: 1 running, 1 fatal, 1 backoff." in page

    def test_a_hostile_description_cannot_break_the_table_or_reach_a_terminal(self) -> None:
        """Pipes, line breaks, backticks, brackets, ``*`` and ``<`` are escaped; ESC, BEL
        and bidi overrides are dropped: one row of nine cells, no control character."""
        page = render_markdown(doc(entry("web", description=HOSTILE)), host="h\x1b]0;x", now=NOW)
        assert not any(ord(c) < 32 and c != "\n" for c in page)
        assert "\x1b" not in page and "\u202e" not in page and "\x7f" not in page
        row = next(line for line in page.splitlines() if line.startswith("| `web`"))
        assert len(CELL_PIPE.findall(row)) == len(COLUMNS) + 1
        described = table_rows(page)["web"][-1]
        assert "`" not in described.replace("\\`", "")
        assert "\\<b\\>" in described and "\\*x\\*" in described and "\\[l\\]" in described
        assert described.startswith("a\\|b c d \\`code\\` \\[31mred\\[0m evil ")
        assert described.endswith("\\\\\\| e")  # a backslash and a pipe, both escaped

    def test_a_name_outside_the_contract_is_escaped_not_quoted(self) -> None:
        """A name with a backtick (never a unit's) is escaped like any other cell."""
        page = render_markdown(doc(entry("a`b|c")), host="h", now=NOW)
        assert "| a\\`b\\|c |" in page


class TestPagePath:
    def test_an_absent_page_in_an_existing_folder_is_fine(self, tmp_path: Path) -> None:
        """The page need not exist yet; a regular file is fine too."""
        assert check_page_path(tmp_path / "page.md") is None
        (tmp_path / "page.md").write_text("old\n")
        assert check_page_path(tmp_path / "page.md") is None

    def test_a_missing_folder_a_link_or_a_folder_is_refused(self, tmp_path: Path) -> None:
        """Each problem says what is wrong and what to change."""
        assert "does not exist (create it" in str(check_page_path(tmp_path / "no" / "page.md"))
        (tmp_path / "file").write_text("")
        assert "is not a folder" in str(check_page_path(tmp_path / "file" / "page.md"))
        (tmp_path / "link.md").symlink_to(tmp_path / "target.md")
        why = str(check_page_path(tmp_path / "link.md"))
        assert "symbolic link" in why and "remove it" in why
        (tmp_path / "dir.md").mkdir()
        assert "not a regular file" in str(check_page_path(tmp_path / "dir.md"))


class TestConfig:
    def project(self, root: Path, page: str) -> Path:
        (root / "units").mkdir(exist_ok=True)
        config = root / "config.toml"
        config.write_text(f'[daemon]\nstatus_page = "{page}"\n')
        return config

    def test_the_path_is_expanded_and_made_absolute(self, tmp_path: Path) -> None:
        """Relative to the config's folder; ``~`` and ``$VARS`` expanded; "" is none."""
        (tmp_path / "home").mkdir()
        loaded = load(self.project(tmp_path, "state.md"))
        assert loaded.daemon.status_page == tmp_path / "state.md"
        loaded = load(self.project(tmp_path, "~/p.md"), environ={"HOME": str(tmp_path / "home")})
        assert loaded.daemon.status_page == tmp_path / "home" / "p.md"
        assert load(self.project(tmp_path, "")).daemon.status_page is None

    def test_a_link_or_a_missing_folder_is_a_config_error(self, tmp_path: Path) -> None:
        """`hostvisor check` names the key and what to change."""
        (tmp_path / "page.md").symlink_to("/etc/passwd")
        issues = check(self.project(tmp_path, "page.md"))
        assert [i.key for i in issues] == ["daemon.status_page"]
        assert "symbolic link" in issues[0].message
        issues = check(self.project(tmp_path, "gone/page.md"))
        assert [i.key for i in issues] == ["daemon.status_page"]
        assert "does not exist" in issues[0].message


class TestWritePage:
    def test_replaces_the_page_with_mode_0600_and_leaves_no_temporary_file(
        self, tmp_path: Path
    ) -> None:
        """Atomic: a new inode renamed over the old page; 0600 whatever the old mode."""
        page = tmp_path / "page.md"
        page.write_text("old\n")
        page.chmod(0o644)
        before = page.stat().st_ino
        write_page(page, b"new\n")
        assert page.read_text() == "new\n"
        assert stat.S_IMODE(page.stat().st_mode) == 0o600
        assert page.stat().st_ino != before
        assert os.listdir(tmp_path) == ["page.md"]

    def test_refuses_a_link_and_leaves_its_target_alone(self, tmp_path: Path) -> None:
        """PageRefused; the file the link points to is untouched."""
        target = tmp_path / "target.md"
        target.write_text("mine\n")
        (tmp_path / "page.md").symlink_to(target)
        with pytest.raises(PageRefused, match="symbolic link"):
            write_page(tmp_path / "page.md", b"page\n")
        assert target.read_text() == "mine\n"
        assert sorted(os.listdir(tmp_path)) == ["page.md", "target.md"]

    def test_a_full_disk_keeps_the_old_page_and_no_temporary_file(self, tmp_path: Path) -> None:
        """ENOSPC: OSError; the old page stays whole and the temporary file is removed."""
        with tmpfs(tmp_path / "small", "64k") as folder:
            page = folder / "page.md"
            write_page(page, b"old\n")
            with pytest.raises(OSError, match="No space"):
                write_page(page, b"x" * (1 << 20))
            assert page.read_bytes() == b"old\n"
            assert os.listdir(folder) == ["page.md"]


class StandIn:
    """What the keeper reads of a daemon: its config, ``status``, ``changed`` and
    ``log_line`` (the same attributes the real Daemon has)."""

    class _Loaded:
        def __init__(self, page: Path | None) -> None:
            self.daemon = type("DaemonSpec", (), {"status_page": page})()

    def __init__(self, page: Path | None) -> None:
        self.loaded = self._Loaded(page)
        self.changed = Broadcast()
        self.lines: list[tuple[str, str]] = []
        self.reexecuting = False
        self.state = "running"

    def status(self, names: Any) -> dict[str, Any]:
        return doc(entry("web", state=self.state))

    def log_line(self, level: str, message: str) -> None:
        self.lines.append((level, message))

    def warnings(self) -> list[str]:
        return [m for level, m in self.lines if level == "warning"]


class TestKeeper:
    async def test_a_failure_episode_is_one_warning_then_written_again(
        self, tmp_path: Path
    ) -> None:
        """A link at the path: each write is refused, one warning for the episode; the
        link removed, the next write lands and says so."""
        page, target = tmp_path / "page.md", tmp_path / "target.md"
        target.write_text("mine\n")
        page.symlink_to(target)
        stand_in = StandIn(page)
        keeper = statuspage._Keeper(stand_in)  # type: ignore[arg-type]
        for _ in range(3):
            await keeper.write(note="")
        assert len(stand_in.warnings()) == 1
        assert "symbolic link" in stand_in.warnings()[0]
        assert target.read_text() == "mine\n"
        page.unlink()
        await keeper.write(note="")
        assert "| `web` | process |" in page.read_text()
        assert stand_in.lines[-1] == ("info", f"status page {page} written again")

    async def test_a_hung_disk_never_holds_the_daemon(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A write that does not return is abandoned after WRITE_TIMEOUT; while it hangs
        no other write starts; once it returns, writing resumes."""
        release = threading.Event()
        real = statuspage.write_page

        def hung(path: Path, data: bytes) -> None:
            release.wait(30)
            real(path, data)

        monkeypatch.setattr(statuspage, "write_page", hung)
        monkeypatch.setattr(statuspage, "WRITE_TIMEOUT", 0.2)
        stand_in = StandIn(tmp_path / "page.md")
        keeper = statuspage._Keeper(stand_in)  # type: ignore[arg-type]
        with anyio.fail_after(10):
            await keeper.write(note="")
            await keeper.write(note="")
        assert stand_in.warnings() == [
            f"cannot write {tmp_path / 'page.md'}: no answer within 0.2s; retrying"
        ]
        release.set()
        monkeypatch.setattr(statuspage, "write_page", real)
        with anyio.fail_after(10):
            while keeper.busy.locked():  # the abandoned thread finishes its write
                await anyio.sleep(0.01)
            await keeper.write(note="")
        assert stand_in.lines[-1][0] == "info"

    async def test_writes_at_start_on_change_and_at_shutdown(self, tmp_path: Path) -> None:
        """Once at start, after a change, and a last time (saying so) when cancelled."""
        page = tmp_path / "page.md"
        stand_in = StandIn(page)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(keep_page, stand_in)
                while not page.exists():
                    await anyio.sleep(0.01)
                stand_in.state = "backoff"
                while "**backoff**" not in page.read_text():
                    stand_in.changed.fire()
                    await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        assert "The daemon stopped at" in page.read_text()
        assert os.listdir(tmp_path) == ["page.md"]


def page_row(page: Path, name: str) -> list[str] | None:
    try:
        text = page.read_text()
    except FileNotFoundError:
        return None
    return table_rows(text).get(name)


SLEEPER = f'description = "The web | front"\ncommand = {py_cmd("svc_sleep")}\nport = 8080\n'
SLEEPER += 'start_seconds = "0.2s"\n'


class TestDaemonKeepsThePage:
    def test_a_state_change_reaches_the_page(self, tmp_path: Path) -> None:
        """Written at start (mode 0600, no temporary file), rewritten after a stop, and
        marked as no longer kept when the daemon stops."""
        page = tmp_path / "page.md"
        with daemon(tmp_path, config='status_page = "page.md"', units={"web": SLEEPER}) as d:
            d.wait_state("web", "running")
            d.wait_for(lambda: (page_row(page, "web") or [""] * 4)[3] == "running", 10, "page")
            row = page_row(page, "web")
            assert row is not None and row[1:3] == ["process", "8080"]
            assert row[-1] == "The web \\| front"
            assert stat.S_IMODE(page.stat().st_mode) == 0o600
            assert d.cli("stop", "web").returncode == 0
            d.wait_for(lambda: (page_row(page, "web") or [""] * 4)[3] == "stopped", 10, "page")
            assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
            assert d.stop() == 0
        assert "The daemon stopped at" in page.read_text()
        assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]

    def test_a_link_planted_at_the_path_is_refused_at_write_time(self, tmp_path: Path) -> None:
        """One warning in the daemon log; the link's target is never written; the daemon
        runs on."""
        page, target = tmp_path / "page.md", tmp_path / "target.md"
        target.write_text("mine\n")
        with daemon(tmp_path, config='status_page = "page.md"', units={"web": SLEEPER}) as d:
            d.wait_state("web", "running")
            # Once the page shows web running, no write is due until the next change.
            d.wait_for(lambda: (page_row(page, "web") or [""] * 4)[3] == "running", 10, "page")
            page.unlink()
            page.symlink_to(target)
            assert d.cli("stop", "web").returncode == 0
            d.wait_stderr("refusing to write the status page")
            assert d.cli("start", "web").returncode == 0
            assert target.read_text() == "mine\n"
            assert page.is_symlink()
            assert d.proc is not None and d.proc.poll() is None

    def test_a_reload_moves_the_page(self, tmp_path: Path) -> None:
        """A new status_page applies at the reload (no state change needed)."""
        (tmp_path / "pages").mkdir()
        with daemon(tmp_path, config='status_page = "page.md"', units={"web": SLEEPER}) as d:
            d.wait_for((tmp_path / "page.md").exists, 10, "the first page")
            d.write_config('status_page = "pages/new.md"')
            assert d.cli("reload").returncode == 0
            d.wait_for((tmp_path / "pages" / "new.md").exists, 10, "the moved page")

    def test_a_flood_of_changes_is_at_most_one_rewrite_a_second(self, tmp_path: Path) -> None:
        """A unit that fails at once, over and over: many state changes a second, yet the
        page (a new inode at every rewrite) changes at most once a second."""
        flap = 'command = ["false"]\n[backoff]\ninitial = "0.01s"\nmax = "0.02s"\njitter = 0\n'
        page = tmp_path / "page.md"
        window = 3.0
        with daemon(tmp_path, config='status_page = "page.md"', units={"flap": flap}) as d:
            d.wait_for(page.exists, 10, "the first page")
            seq = d.last_seq()
            last, rewrites = page.stat().st_ino, 0
            end = time.monotonic() + window
            while time.monotonic() < end:  # observe: sample the page's inode
                try:
                    inode = page.stat().st_ino
                except FileNotFoundError:
                    continue
                if inode != last:
                    rewrites, last = rewrites + 1, inode
                time.sleep(0.005)
            with d._cond:
                changes = [e for e in d.events if e["seq"] > seq and e["service"] == "flap"]
        assert len(changes) >= 3 * window, "the flood did not happen"
        assert 1 <= rewrites <= window + 1


class TestCli:
    def test_status_format_markdown_and_json(self, tmp_path: Path) -> None:
        """``--format markdown`` prints the page; ``--format json`` is ``--json``; the two
        contradicting each other is a usage error (exit 2)."""
        with daemon(tmp_path, units={"web": SLEEPER}) as d:
            d.wait_state("web", "running")
            done = d.cli("status", "--format", "markdown")
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith("# ") and "· hostvisor " in done.stdout.splitlines()[0]
            assert table_rows(done.stdout)["web"][3] == "running"
            assert "\x1b" not in done.stdout
            import json

            as_json = json.loads(d.cli("status", "--format", "json").stdout)
            same = json.loads(d.cli("status", "--json", "--format", "json").stdout)
            assert as_json["services"][0]["description"] == "The web | front"
            assert same["services"][0]["name"] == "web"
            bad = d.cli("status", "--json", "--format", "markdown")
            assert bad.returncode == 2 and "--json means --format json" in bad.stderr
