"""`hostvisor import`'s shared behaviour, whatever the kind (supervisor/cli_import.py):
where units go, names, never replacing without --force, --dry-run, checking with the
loader before writing, and the exit codes. Driven through the real CLI with Procfiles,
the simplest kind."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from supervisor.importers import ImportFailed, command_argv, unit_name


def hv(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOSTVISOR_")}
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A folder with config.toml (units in units/) and a Procfile of two entries."""
    (tmp_path / "config.toml").write_text('[daemon]\nunits_dir = "units"\n')
    (tmp_path / "Procfile").write_text("web: python3 -m http.server $PORT\nworker: sleep 1000\n")
    return tmp_path


def test_writes_units_into_the_configs_units_dir_and_check_passes(host: Path) -> None:
    (host / "config.toml").write_text('[daemon]\nunits_dir = "services"\n')
    done = hv(host, "import", "procfile", "Procfile", "-c", "config.toml")
    assert done.returncode == 0, done.stderr
    web, worker = host / "services" / "web.toml", host / "services" / "worker.toml"
    assert stat.S_IMODE(web.stat().st_mode) == 0o644
    assert 'command = [\n    "sleep",\n    "1000",\n]' in worker.read_text()
    assert "runs through /bin/sh -c" in web.read_text()  # the header says why
    assert f"wrote {web}" in done.stdout
    assert "Procfile: 2 units" in done.stdout
    check = hv(host, "check", "-c", "config.toml")
    assert check.returncode == 0, check.stderr
    assert "ok: 2 units" in check.stdout


def test_an_existing_unit_is_not_replaced_without_force(host: Path) -> None:
    (host / "units").mkdir()
    mine = host / "units" / "web.toml"
    mine.write_text('command = ["my-own-web"]\n')
    done = hv(host, "import", "procfile", "Procfile", "-c", "config.toml")
    assert done.returncode == 1
    assert f"{mine}: exists; not replaced (pass --force to replace it)" in done.stderr
    assert mine.read_text() == 'command = ["my-own-web"]\n'
    assert (host / "units" / "worker.toml").is_file()  # the other unit is written
    forced = hv(host, "import", "procfile", "Procfile", "-c", "config.toml", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "http.server" in mine.read_text()


def test_two_sources_with_one_name_get_distinct_units(host: Path) -> None:
    (host / "other").mkdir()
    (host / "other" / "Procfile").write_text("web: sleep 5\n")
    done = hv(host, "import", "procfile", "Procfile", "other/Procfile", "-o", "out")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (host / "out").iterdir()) == [
        "web-2.toml",
        "web.toml",
        "worker.toml",
    ]
    assert "web-2 (from web)" in done.stdout
    assert "sleep" in (host / "out" / "web-2.toml").read_text()


def test_dry_run_writes_nothing_and_prints_each_unit(host: Path) -> None:
    done = hv(host, "import", "procfile", "Procfile", "-c", "config.toml", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert not (host / "units").exists()
    assert f"would write {host / 'units' / 'worker.toml'}" in done.stdout
    assert 'restart = "always"' in done.stdout


def test_a_unit_the_loader_rejects_is_not_written(host: Path) -> None:
    """The check runs with the config's [defaults]: here every unit depends on a "db" this
    host has no unit for, an issue reported once on config.toml: each new unit is checked
    alone to find that both bring it, and neither is written."""
    (host / "config.toml").write_text(
        '[daemon]\nunits_dir = "units"\n[defaults]\ndepends_on = ["db"]\n'
    )
    done = hv(host, "import", "procfile", "Procfile", "-c", "config.toml")
    assert done.returncode == 1
    assert "web.toml: not written: " in done.stderr
    assert 'defaults.depends_on: unknown service "db"' in done.stderr
    assert not (host / "units" / "web.toml").exists()
    assert not (host / "units" / "worker.toml").exists()
    assert "web: not written" in done.stdout


def test_a_unit_clashing_with_an_existing_one_is_not_written(host: Path) -> None:
    """The check sees the units already there: a second unit on their port is refused."""
    (host / "units").mkdir()
    (host / "units" / "api.toml").write_text('command = ["sleep", "9"]\nport = 8080\n')
    (host / "Procfile").write_text("web: sleep 5\n")
    (host / "config.toml").write_text('[daemon]\nunits_dir = "units"\n[defaults]\nport = 8080\n')
    done = hv(host, "import", "procfile", "Procfile", "-c", "config.toml")
    assert done.returncode == 1
    assert "web.toml: not written: " in done.stderr and "8080" in done.stderr
    assert not (host / "units" / "web.toml").exists()


def test_unreadable_files_fail_and_the_others_are_imported(host: Path) -> None:
    os.mkfifo(host / "fifo")  # would block a plain open()
    (host / "latin1").write_bytes(b"web: echo caf\xe9\n")
    done = hv(host, "import", "procfile", "missing", "fifo", "latin1", "Procfile", "-o", "out")
    assert done.returncode == 1
    assert "missing: cannot read: No such file or directory" in done.stderr
    assert "fifo: is not a regular file" in done.stderr
    assert "latin1: line 1: not UTF-8 text" in done.stderr
    assert (host / "out" / "worker.toml").is_file()


def test_a_file_with_nothing_to_import_fails(host: Path) -> None:
    (host / "empty").write_text("# nothing here\n\n")
    done = hv(host, "import", "procfile", "empty", "-o", "out")
    assert done.returncode == 1
    assert "empty: no `name: command` entry found" in done.stderr


def test_standard_input(host: Path) -> None:
    done = hv(host, "import", "procfile", "-", "-o", "out", stdin="job: sleep 9\n")
    assert done.returncode == 0, done.stderr
    assert "<stdin>: 1 unit" in done.stdout
    text = (host / "out" / "job.toml").read_text()
    assert "workdir" not in text  # no folder to run in: the config's default applies


def test_the_writing_is_atomic_under_concurrent_imports(host: Path) -> None:
    """Two imports with --force at once: each file is whole, never a mix or a temp file."""
    results: list[int] = []

    def run() -> None:
        results.append(
            hv(host, "import", "procfile", "Procfile", "-o", "out", "--force").returncode
        )

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0, 0]
    assert sorted(p.name for p in (host / "out").iterdir()) == ["web.toml", "worker.toml"]


def test_a_renamed_unit_keeps_the_references_of_its_own_file(host: Path) -> None:
    """Two stacks both name a container "db": the second becomes db-2, and the api of that
    stack depends on db-2, not on the other stack's db."""
    for stack in ("one", "two"):
        (host / stack).mkdir()
        (host / stack / "compose.yaml").write_text(
            "services:\n"
            f"  db:\n    image: busybox\n    container_name: db\n"
            f"  api:\n    image: busybox\n    container_name: api-{stack}\n"
            "    depends_on: [db]\n"
        )
    done = hv(
        host, "import", "compose", "one/compose.yaml", "two/compose.yaml", "-o", "out",
        "--dry-run",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "db-2 (from db)" in done.stdout
    two = done.stdout.split("api-two")[-1]
    assert 'depends_on = [\n        "db-2",' in two


def test_unknown_kind_is_a_usage_error(host: Path) -> None:
    done = hv(host, "import", "upstart", "Procfile")
    assert done.returncode == 2
    assert "invalid choice: 'upstart'" in done.stderr


@pytest.mark.parametrize(
    ("original", "expected"),
    [
        ("llama-server@coder", "llama-server-coder"),
        ("com.joel.gateway", "com.joel.gateway"),
        ("My App (prod)", "my-app-prod"),
        ("--x--", "x"),
        ("hostvisor", "hostvisor-unit"),
        ("@@@", "unit"),
        ("a" * 80, "a" * 63),
    ],
)
def test_unit_name_is_always_valid(original: str, expected: str) -> None:
    assert unit_name(original) == expected


@pytest.mark.parametrize(
    ("text", "argv", "shell"),
    [
        (
            "/usr/bin/python scripts/claim-task.py",
            ["/usr/bin/python", "scripts/claim-task.py"],
            None,
        ),
        ("x --a='b c' \"d e\"", ["x", "--a=b c", "d e"], None),
        ("echo '$HOME'", ["echo", "$HOME"], None),
        ("echo \\$HOME", ["echo", "$HOME"], None),
        ("a#b", ["a#b"], None),
        ("a | b", None, "a pipe"),
        ('echo "$HOME"', None, "an expansion"),
        ("run >> out.log 2>&1", None, "a redirection"),
        ("FOO=1 run", None, "variable assignment"),
        ("run # comment", None, "a comment"),
        ("ls *.py", None, "a glob"),
        ("a || b", None, "'||'"),
        ("a && b", None, "'&&'"),
        ("x ~/y", None, "a home"),
        ("x a~b --p=c~d", ["x", "a~b", "--p=c~d"], None),
    ],
)
def test_command_argv_uses_a_shell_only_when_the_line_needs_one(
    text: str, argv: list[str] | None, shell: str | None
) -> None:
    got, why = command_argv(text)
    if shell is None:
        assert (got, why) == (argv, None)
    else:
        assert got == ["/bin/sh", "-c", text]
        assert why is not None and shell in why


def test_command_argv_rejects_unbalanced_quotes() -> None:
    with pytest.raises(ImportFailed, match="cannot split"):
        command_argv("run 'unterminated")


def compose_chain(folder: Path, length: int, *, first: str = "", reverse: bool = False) -> Path:
    """A Compose file of services s0 <- s1 <- ... (each depends on the one before; with
    ``reverse``, listed dependents first)."""
    lines = ["services:"]
    for i in reversed(range(length)) if reverse else range(length):
        lines += [f"  s{i}:", "    image: busybox", f"    container_name: s{i}"]
        lines += [f"    depends_on: [s{i - 1}]"] if i else ([first] if first else [])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "compose.yaml").write_text("\n".join(lines) + "\n")
    return folder / "compose.yaml"


def test_a_rejected_unit_takes_every_unit_depending_on_it(host: Path) -> None:
    """s0 clashes with an existing unit's port: it is not written, nor are the 25 units
    that depend on it, directly or not; the folder still passes check."""
    (host / "units").mkdir()
    (host / "units" / "api.toml").write_text('command = ["sleep", "9"]\nport = 8080\n')
    source = compose_chain(host / "stack", 26, first='    ports: ["8080:80"]')
    done = hv(host, "import", "compose", str(source), "-c", "config.toml")
    assert done.returncode == 1
    assert sorted(p.name for p in (host / "units").iterdir()) == ["api.toml"]
    assert "s25.toml: not written: it depends on s24, which is not" in done.stderr
    assert hv(host, "check", "-c", "config.toml").returncode == 0


def test_a_full_disk_leaves_no_unit_without_its_dependency(host: Path) -> None:
    """Every unit is written to a temporary file first: on a full disk nothing half done
    is published, and check still passes on the folder."""
    from tests.support import tmpfs

    source = compose_chain(host / "stack", 40, reverse=True)
    with tmpfs(host / "small", "12k") as small:
        done = hv(host, "import", "compose", str(source), "-o", str(small / "units"))
        assert done.returncode == 1
        assert "No space left on device" in done.stderr
        written = {p.stem for p in (small / "units").glob("*.toml")}
        assert not list((small / "units").glob(".*"))  # no temporary file left
        for name in written:  # a written unit's dependency is written too
            i = int(name[1:])
            assert i == 0 or f"s{i - 1}" in written
        (host / "small.toml").write_text(f'[daemon]\nunits_dir = "{small / "units"}"\n')
        assert hv(host, "check", "-c", "small.toml").returncode == 0


def test_under_a_group_writable_umask(host: Path) -> None:
    """umask 002 (user-private groups): units are still written 0644 and checked."""
    done = subprocess.run(
        ["sh", "-c", f'umask 002 && exec "{sys.executable}" -m supervisor import procfile '
         "Procfile -o out"],
        cwd=host, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((host / "out" / "web.toml").stat().st_mode) == 0o644


def test_concurrent_imports_never_replace_each_other_without_force(host: Path) -> None:
    (host / "a").mkdir()
    (host / "b").mkdir()
    (host / "a" / "Procfile").write_text("web: sleep 1\n")
    (host / "b" / "Procfile").write_text("web: sleep 2\n")
    results: dict[str, int] = {}

    def run(which: str) -> None:
        results[which] = hv(host, "import", "procfile", f"{which}/Procfile", "-o", "out").returncode

    threads = [threading.Thread(target=run, args=(w,)) for w in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [0, 1]
    winner = next(w for w, code in results.items() if code == 0)
    assert (
        f'sleep",\n    "{"1" if winner == "a" else "2"}"' in (host / "out" / "web.toml").read_text()
    )


def test_two_units_of_one_file_with_one_name(host: Path) -> None:
    """Services "web" and "Web" both name p-web-1: the second is p-web-1-2, and api's
    depends_on [web] still means the first."""
    (host / "p").mkdir()
    (host / "p" / "compose.yaml").write_text(
        "services:\n  web:\n    image: busybox\n  Web:\n    image: busybox\n"
        "  api:\n    image: busybox\n    depends_on: [web]\n"
    )
    env = {"HOSTVISOR_COMPOSE": "v2"}
    done = subprocess.run(
        [sys.executable, "-m", "supervisor", "import", "compose", "p/compose.yaml", "-o", "out"],
        cwd=host, capture_output=True, text=True, timeout=60, env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (host / "out" / "p-web-1-2.toml").is_file()
    assert '"p-web-1",' in (host / "out" / "p-api-1.toml").read_text()


def test_odd_sources_and_arguments(host: Path) -> None:
    """A control character in a file name stays inside the header comment; stdin given
    twice; files after an option; a command longer than Linux lets one argument be."""
    odd = host / "Proc\rfile"
    odd.write_text("odd: sleep 3\n")
    done = hv(host, "import", "procfile", str(odd), "-o", "out")
    assert done.returncode == 0, done.stderr
    assert "Proc\\x0dfile" in (host / "out" / "odd.toml").read_text()
    twice = hv(host, "import", "procfile", "-", "-", "-o", "out2", stdin="job: sleep 9\n")
    assert twice.returncode == 1
    assert "<stdin>: standard input (-) is given more than once" in twice.stderr
    (host / "other").mkdir()
    (host / "other" / "Procfile").write_text("late: sleep 4\n")
    mixed = hv(host, "import", "procfile", "Procfile", "--dry-run", "other/Procfile", "-o", "x")
    assert mixed.returncode == 0, mixed.stderr
    assert "late: would write" in mixed.stdout
    (host / "long").write_text("big: /bin/echo " + "a" * 200_000 + "\n")
    long = hv(host, "import", "procfile", "long", "-o", "out3")
    assert long.returncode == 1
    assert "a command of 200,010 characters; at most 131,072" in long.stderr


def test_a_free_name_stays_a_valid_name() -> None:
    from supervisor.cli_import import _free_name

    taken = {"a" * 63} | {f"{'a' * (62 - len(str(n)))}-{n}" for n in range(2, 1000)}
    name = _free_name("a" * 63, taken)
    assert len(name) <= 63 and name.endswith("-1000") and name not in taken
