"""Hostile config files (issue 9, item 1): ``config.load`` returns or raises ConfigError naming
the file and the key, never anything else, and what it accepts can run.

Each case failed on 0.1.0 with a plain ValueError / RecursionError / OverflowError, a hang, or
a spec that later broke the daemon (a NUL in an argv, ``interval = 1e308``)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.config import INTERNAL_ERROR, check, load
from supervisor.config_values import MAX_COUNT, MAX_DURATION, MAX_SIZE
from supervisor.errors import ConfigError, ConfigIssue
from tests.daemon_harness import daemon, py_cmd


@dataclass
class Tree:
    """config.toml and units/ in a folder; files written with mode 0644."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def units(self) -> Path:
        return self.root / "units"

    def write(self, relative: str, data: bytes | str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        path.chmod(0o644)
        return path

    def unit(self, text: bytes | str, name: str = "svc") -> Path:
        return self.write(f"units/{name}.toml", text)

    def issues(self) -> list[ConfigIssue]:
        """The issues of a load that must fail, checked to be ConfigError and nothing else."""
        with pytest.raises(ConfigError) as caught:
            load(self.config, environ={"HOME": str(self.root)})
        issues = list(caught.value.issues)
        assert issues, "a ConfigError without issues"
        assert not any(INTERNAL_ERROR in i.message for i in issues), issues
        assert check(self.config, environ={"HOME": str(self.root)}) == issues
        return issues


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = Tree(tmp_path / "proj")
    t.write("config.toml", "")
    t.units.mkdir()
    return t


def one(issues: list[ConfigIssue], file: Path, key: str) -> ConfigIssue:
    found = [i for i in issues if i.file == str(file) and i.key == key]
    assert found, f"no issue for {file}: {key} in {[str(i) for i in issues]}"
    return found[0]


DIGITS = "1" * 5000


class TestParserLimits:
    def test_an_integer_of_5000_digits_names_file_key_and_line(self, tree: Tree) -> None:
        """tomllib's plain ValueError (int max str digits) becomes `file: port: ...`."""
        unit = tree.unit(f'command = "x"\nport = {DIGITS}\n')
        issue = one(tree.issues(), unit, "port")
        assert "5000 digits (line 2)" in issue.message and "1-65535" in issue.message
        assert len(str(issue)) < 400  # the number itself is not echoed

    def test_a_huge_integer_in_a_table_gets_the_dotted_key(self, tree: Tree) -> None:
        unit = tree.unit(f'command = "x"\n[health]\ntcp = "a:1"\ninterval = {DIGITS}\n')
        one(tree.issues(), unit, "health.interval")

    def test_a_huge_integer_in_config_toml(self, tree: Tree) -> None:
        tree.write("config.toml", f"[daemon]\nshutdown_timeout = {DIGITS}\n")
        one(tree.issues(), tree.config, "daemon.shutdown_timeout")

    def test_a_huge_integer_inside_an_array_is_keyed_by_line(self, tree: Tree) -> None:
        unit = tree.unit(f'command = "x"\nenv_files = [\n  {DIGITS},\n]\n')
        one(tree.issues(), unit, "line 3")

    @pytest.mark.parametrize(
        "value", ["[" * 1000 + "]" * 1000, "{a=" * 1000 + "1" + "}" * 1000],
        ids=["arrays", "inline-tables"],
    )  # fmt: skip
    def test_nesting_1000_deep_is_an_issue_not_a_recursion_error(
        self, tree: Tree, value: str
    ) -> None:
        unit = tree.unit(f'command = "x"\nenv_files = {value}\n')
        issue = one(tree.issues(), unit, "line 2")
        assert "nested too deeply" in issue.message

    def test_deep_nesting_in_config_toml(self, tree: Tree) -> None:
        tree.write("config.toml", "x = " + "[" * 3000 + "]" * 3000)
        assert "nested too deeply" in one(tree.issues(), tree.config, "line 1").message

    def test_invalid_utf8(self, tree: Tree) -> None:
        unit = tree.unit(b'command = "\xff\xfe"\n')
        assert "not UTF-8" in one(tree.issues(), unit, "").message

    def test_a_file_over_1_mib_is_refused_unread(self, tree: Tree) -> None:
        unit = tree.unit(b'command = "x"\n' + b"#" * (1024**2 + 1))
        assert "larger than 1048576 bytes" in one(tree.issues(), unit, "").message


NUL = "\\u0000"  # a TOML escape: the parsed string holds a real NUL


class TestNulCharacters:
    @pytest.mark.parametrize(
        ("text", "key"),
        [(f'command = ["x", "a{NUL}b"]', "command"),
         (f'command = "x a{NUL}b"', "command"),
         (f'command = "x"\nworkdir = "/tmp/a{NUL}"', "workdir"),
         (f'command = "x"\nenv = {{ A = "a{NUL}b" }}', "env"),
         (f'command = "x"\nenv = {{ "A{NUL}" = "b" }}', "env"),
         (f'command = "x"\nenv_files = ["a{NUL}.env"]', "env_files"),
         (f'command = "x"\nenv_files = ["-a{NUL}.env"]', "env_files"),
         (f'command = "x"\nsecret_env_files = ["-a{NUL}.env"]', "secret_env_files"),
         (f'container = "db{NUL}"', "container"),
         (f'container = "db"\nrecreate_command = ["up{NUL}"]', "recreate_command"),
         (f'command = "x"\n[health]\nexec = ["probe", "{NUL}"]', "health.exec"),
         (f'command = "x"\n[health]\nhttp = "http://a/{NUL}"', "health.http"),
         (f'command = "x"\n[preflight]\ncommand = ["p{NUL}"]', "preflight.command"),
         (f'command = "x"\n[post_start]\ncommand = ["p{NUL}"]', "post_start.command"),
         (f'command = "x"\ndepends_on = ["d{NUL}"]', "depends_on")],
    )  # fmt: skip
    def test_a_nul_in_a_unit_value_is_refused_at_load(
        self, tree: Tree, text: str, key: str
    ) -> None:
        """0.1.0 accepted these; os.stat / Popen then raised ValueError in the daemon."""
        unit = tree.unit(text)
        issue = one(tree.issues(), unit, key)
        assert "NUL" in issue.message
        assert "\0" not in str(issue)

    @pytest.mark.parametrize("key", ["units_dir", "state_dir", "socket"])
    def test_a_nul_in_a_daemon_path_is_refused(self, tree: Tree, key: str) -> None:
        tree.write("config.toml", f'[daemon]\n{key} = "/tmp/x{NUL}"\n')
        assert "NUL" in one(tree.issues(), tree.config, f"daemon.{key}").message

    def test_a_nul_byte_in_an_env_file_line_is_refused_without_echoing_it(self, tree: Tree) -> None:
        env = tree.write("app.env", b"OK=1\nPASSWORD=hunt\x00er2\n")
        tree.unit('command = "x"\nenv_files = ["app.env"]')
        issue = one(tree.issues(), env, "line 2")
        assert "NUL" in issue.message and "hunt" not in str(issue)

    def test_control_characters_in_keys_and_file_names_stay_on_one_line(self, tree: Tree) -> None:
        """A quoted key or a unit file name with a newline prints as one escaped line."""
        tree.unit('command = "x"\n"evil\\nkey\\u001b[31m" = 1\n')
        tree.write("units/bad\nname.toml", 'command = "x"')
        lines = [str(i) for i in tree.issues()]
        assert len(lines) == 2 and all("\n" not in line and "\x1b" not in line for line in lines)
        assert any("evil\\nkey\\x1b[31m: unknown key" in line for line in lines)


class TestFilesThatAreNotFiles:
    def test_units_dir_that_is_a_file(self, tree: Tree) -> None:
        tree.units.rmdir()
        tree.write("units", "not a folder")
        issue = one(tree.issues(), tree.config, "daemon.units_dir")
        assert issue.message.endswith("is not a folder (or a link to one)")

    def test_a_loop_of_symlinks_as_unit_and_as_config(self, tree: Tree) -> None:
        (tree.units / "a.toml").symlink_to(tree.units / "b.toml")
        (tree.units / "b.toml").symlink_to(tree.units / "a.toml")
        issues = tree.issues()
        assert "Too many levels of symbolic links" in one(issues, tree.units / "a.toml", "").message
        tree.config.unlink()
        tree.config.symlink_to(tree.config)
        assert "Too many levels" in one(tree.issues(), tree.config, "").message

    @pytest.mark.timeout(20)
    @pytest.mark.parametrize("where", ["config.toml", "units/svc.toml", "app.env", "-app.env"])
    def test_a_fifo_never_hangs_the_loader(self, tree: Tree, where: str) -> None:
        """0.1.0 blocked forever in read() on a FIFO (a reload thread hung for good)."""
        if where != "units/svc.toml":
            tree.unit(f'command = "x"\nenv_files = ["{where.removeprefix("units/")}"]')
        path = tree.root / where.removeprefix("-")
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        issues = tree.issues()
        assert any("not a regular file (a FIFO, socket or device)" in i.message for i in issues)

    def test_a_folder_as_a_unit_file(self, tree: Tree) -> None:
        (tree.units / "svc.toml").mkdir()
        assert (
            "not a regular file (a folder)"
            in one(tree.issues(), tree.units / "svc.toml", "").message
        )

    @pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
    def test_unreadable_unit_env_file_and_units_folder(self, tree: Tree) -> None:
        unit = tree.unit('command = "x"\nenv_files = ["-app.env"]')
        env = tree.write("app.env", "A=1\n")
        env.chmod(0)
        assert "cannot read env file" in one(tree.issues(), unit, "env_files").message
        unit.chmod(0)
        assert "Permission denied" in one(tree.issues(), unit, "").message
        tree.units.chmod(0)
        try:
            assert "cannot list" in one(tree.issues(), tree.units, "").message
        finally:
            tree.units.chmod(0o755)


class TestBounds:
    """Every duration, size and count has an upper bound; inf and NaN are refused."""

    @pytest.mark.parametrize(
        ("text", "key", "message"),
        [('[health]\ntcp = "a:1"\ninterval = 1e308', "health.interval", "at most 365d"),
         ('[health]\ntcp = "a:1"\ntimeout = "366d"', "health.timeout", "at most 365d"),
         ('[health]\ntcp = "a:1"\nstart_period = inf', "health.start_period", "expected a duration"),
         ('stop_timeout = "99999999999999999999d"', "stop_timeout", "at most 365d"),
         (f"start_seconds = {'9' * 400}", "start_seconds", "at most 365d"),
         ('[backoff]\nmax = nan', "backoff.max", "expected a duration"),
         ("[backoff]\nmultiplier = inf", "backoff.multiplier", "finite"),
         ("[backoff]\nmultiplier = nan", "backoff.multiplier", "finite"),
         ("[backoff]\nmultiplier = 1e9", "backoff.multiplier", "between 1 and 100"),
         ("[backoff]\njitter = nan", "backoff.jitter", "finite"),
         ('[preflight]\ncommand = "p"\ntimeout = "400d"', "preflight.timeout", "at most 365d"),
         ('[post_start]\ncommand = "p"\ntimeout = 1e20', "post_start.timeout", "at most 365d"),
         (f"[logs]\nmax_size = '{'9' * 400}TiB'", "logs.max_size", "at most 1 TiB"),
         ("[logs]\nmax_size = '2TiB'", "logs.max_size", "at most 1 TiB"),
         (f"[logs]\nmax_size = {MAX_SIZE + 1}", "logs.max_size", "at most 1 TiB"),
         ("[logs]\nbackups = 1001", "logs.backups", "between 0 and 1000"),
         (f"give_up_after = {MAX_COUNT + 1}", "give_up_after", "between 0 and 1000000"),
         (f'[health]\ntcp = "a:1"\nfailure_threshold = {10**30}', "health.failure_threshold",
          "between 1 and 1000000"),
         ('[health]\ntcp = "a:1111111111"', "health.tcp", "port 1-65535"),
         ('[health]\nhttp = "http://a:99999/"', "health.http", "Port out of range"),
         ('[health]\nhttp = "http://[::1/"', "health.http", "Invalid IPv6 URL"),
         (f"stop_signal = {10**30}", "stop_signal", "unknown signal number"),
         ("env = { A = inf }", "env", "finite number")],
    )  # fmt: skip
    def test_out_of_bounds_unit_values(self, tree: Tree, text: str, key: str, message: str) -> None:
        unit = tree.unit(f'command = "x"\n{text}\n')
        assert message in one(tree.issues(), unit, key).message

    @pytest.mark.parametrize(
        ("text", "key"),
        [('shutdown_timeout = "366d"', "daemon.shutdown_timeout"),
         ("allow_uids = [4294967295]", "daemon.allow_uids")],
    )  # fmt: skip
    def test_out_of_bounds_daemon_values(self, tree: Tree, text: str, key: str) -> None:
        tree.write("config.toml", f"[daemon]\n{text}\n")
        one(tree.issues(), tree.config, key)

    def test_the_bounds_themselves_are_accepted(self, tree: Tree) -> None:
        tree.unit(
            f'command = "x"\nstop_timeout = "365d"\ngive_up_after = {MAX_COUNT}\n'
            f'[health]\ntcp = "a:65535"\ninterval = {MAX_DURATION}\n'
            f"failure_threshold = {MAX_COUNT}\n[backoff]\nmultiplier = 100\nmax = '365d'\n"
            f"[logs]\nmax_size = '1TiB'\nbackups = 1000\n"
        )
        spec = load(tree.config).services["svc"]
        assert spec.health is not None and spec.health.interval == MAX_DURATION
        assert spec.logs.max_size == MAX_SIZE


class TestReloadSurvivesHostileUnits:
    @pytest.mark.slow
    def test_sighup_with_hostile_units_keeps_the_daemon_and_its_service(
        self, tmp_path: Path
    ) -> None:
        """The issue's reproduction: a 5,000-digit port and SIGHUP killed the daemon."""
        sleep = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\n'
        with daemon(tmp_path, units={"a": sleep}) as d:
            pid = d.wait_state("a", "running")["pid"]
            hostile: list[Callable[[], object]] = [
                lambda: d.write_unit("b", f'command = "x"\nport = {DIGITS}\n'),
                lambda: d.write_unit("b", 'command = "x"\nenv = ' + "[" * 1000 + "]" * 1000),
                lambda: d.write_unit("b", 'command = ["x", "\\u0000"]\n'),
                lambda: d.write_unit("b", 'command = "x"\n[health]\ntcp = "a:1"\ninterval = 1e308'),
            ]
            for write in hostile:
                seq = d.last_seq()
                write()
                d.signal(signal.SIGHUP)
                rejected = d.wait_event("hostvisor.config.rejected", after=seq)
                assert "b.toml: " in rejected["message"]
                assert INTERNAL_ERROR not in rejected["message"]
            assert d.proc is not None and d.proc.poll() is None
            assert d.status("a")["pid"] == pid and d.status("a")["state"] == "running"


class TestIssueFlood:
    def test_a_flood_of_bad_keys_is_cut_at_100_issues(self, tree: Tree) -> None:
        """A 1 MiB unit of unknown keys gave ~100,000 issues on 0.1.0: one reload answer of
        megabytes (over the control protocol's 1 MiB line) and seconds of did-you-mean."""
        tree.unit('command = "x"\n' + "".join(f"k{i} = 1\n" for i in range(20_000)))
        for i in range(150):
            tree.unit("restart = 1", name=f"bad{i:03}")
        issues = tree.issues()
        assert len(issues) == 101
        assert issues[-1].message == "more issues not shown (the first 100 are)"
