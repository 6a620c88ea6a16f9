"""The daemon log: stderr nobody reads, records from other threads, rate limits, secrets."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

import anyio

from supervisor.daemonlog import DaemonLog, LibraryLogHandler
from supervisor.events import Redactor
from supervisor.logfiles import RotatingLog, WriteOutcome

PROGRAMS = Path(__file__).parent.parent / "programs"


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def devnull() -> object:
    return open(os.devnull, "w")


class TestStderrNotRead:
    def test_a_stalled_stderr_never_blocks_and_drops_are_reported(self) -> None:
        """`hostvisor run | less` with less stopped: 20,000 lines (2 MB) into a 64 KiB
        pipe nobody reads return at once; when the reader comes back it reads the kept
        lines, one line saying how many were dropped, then the newer lines."""
        child = subprocess.Popen(
            [sys.executable, str(PROGRAMS / "logs_stderr_flood.py"), "20000"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout is not None
        try:
            # On 0.1 the child blocks in print() and never gets here.
            ready, _, _ = select.select([child.stdout], [], [], 30)
            assert ready, "the DaemonLog blocked on a stderr nobody reads"
            wrote, dropped = child.stdout.readline().split()
            assert wrote == b"wrote" and int(dropped) > 10_000
            _, err = child.communicate(b"go\n", timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == 0, err[-2000:]
        lines = err.decode().splitlines()
        notices = [n for n, line in enumerate(lines) if "log lines dropped" in line]
        # The writer thread may get a few lines through a pipe that still had room, so
        # the drops can come as more than one episode; each is reported where it happened.
        assert notices and all(
            lines[n].endswith(" log lines dropped: stderr was not being read") for n in notices
        )
        assert sum(int(lines[n].split()[0]) for n in notices) == int(dropped)
        kept = [int(line.split()[3]) for n, line in enumerate(lines[:-1]) if n not in notices]
        assert kept == sorted(kept) and kept[0] == 0  # oldest first, in order, none torn
        assert lines[notices[-1] + 1 :] == [lines[-1]]
        assert lines[-1].endswith("after the reader came back")


class TestOneWriterThread:
    async def test_records_from_other_threads_are_written_on_the_loop(self, tmp_path: Path) -> None:
        """An OpenTelemetry export thread logs: the record reaches hostvisor.log, written
        by the event loop's thread, not by the thread that logged."""
        writers: set[int] = set()

        class Watched(RotatingLog):
            def append(self, data: bytes, marker: bytes = b"") -> WriteOutcome:
                writers.add(threading.get_ident())
                return super().append(data, marker)

        path = tmp_path / "hostvisor.log"
        log = DaemonLog(Watched(path, max_size=1 << 20, backups=1), stream=devnull())  # type: ignore[arg-type]
        handler = LibraryLogHandler(log)
        logger = logging.getLogger("opentelemetry.test.export")
        logger.addHandler(handler)
        logger.propagate = False
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(log.run)
                thread = threading.Thread(
                    target=lambda: logger.warning("Failed to export logs to %s", "collector")
                )
                thread.start()
                thread.join()
                with anyio.fail_after(10):
                    while not path.exists() or "Failed to export" not in path.read_text():
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
        finally:
            logger.removeHandler(handler)
        log.close()
        assert writers == {threading.get_ident()}

    def test_rate_limit_keys_on_the_message_template(self, tmp_path: Path) -> None:
        """An SDK that logs `retrying in 1.2s`, `retrying in 2.5s`...: one line per
        template a minute, however the arguments vary."""
        path = tmp_path / "hostvisor.log"
        log = DaemonLog(RotatingLog(path, max_size=1 << 20, backups=1), stream=devnull())  # type: ignore[arg-type]
        handler = LibraryLogHandler(log)
        for n in range(50):
            handler.handle(
                logging.LogRecord(
                    "opentelemetry.exporter",
                    logging.WARNING,
                    "x",
                    1,
                    "Transient error, retrying in %.1fs.",
                    (n * 1.1,),
                    None,
                )
            )
        handler.handle(
            logging.LogRecord("opentelemetry.exporter", logging.WARNING, "x", 1, "other", (), None)
        )
        log.close()
        assert [r["message"] for r in records(path)] == [
            "opentelemetry.exporter: Transient error, retrying in 0.0s.",
            "opentelemetry.exporter: other",
        ]


class TestSecrets:
    def test_tracebacks_and_library_records_are_redacted(self, tmp_path: Path) -> None:
        """A secret in an exception's text, its traceback, and a library record's
        message and traceback: none of it reaches hostvisor.log or stderr."""
        secret = "signkey-very-secret-123"
        redactor = Redactor([secret, "4821"])
        path = tmp_path / "hostvisor.log"
        err = tmp_path / "stderr"
        with err.open("w") as stream:
            log = DaemonLog(
                RotatingLog(path, max_size=1 << 20, backups=1), stream=stream, redactor=redactor
            )
            try:
                raise RuntimeError(f"bad token {secret} pin 4821")
            except RuntimeError as exc:
                log.write_exception("supervisor api crashed", exc)
                caught = exc
            handler = LibraryLogHandler(log)
            handler.handle(
                logging.LogRecord(
                    "opentelemetry.sdk",
                    logging.ERROR,
                    "x",
                    1,
                    "header %s refused",
                    (secret,),
                    (RuntimeError, caught, caught.__traceback__),
                )
            )
            log.close()
        text = path.read_text() + err.read_text()
        assert secret not in text and "4821" not in text
        crash, library = records(path)
        assert crash["exception.type"] == "RuntimeError"
        assert "Traceback" in str(crash["exception.stacktrace"]) and "***" in str(crash["message"])
        assert library["message"] == "opentelemetry.sdk: header *** refused"
        assert "***" in str(library["exception.stacktrace"])

    def test_short_secrets_are_redacted_as_whole_tokens(self) -> None:
        """PIN=4821 from a secret env file: `pin 4821` is hidden, pid 14821 is not;
        one- and two-character values are never redacted (exit code 1 stays)."""
        redact = Redactor(["4821", "hunter2", "1", "ab", "signkey-very-secret-123"])
        assert redact("pin 4821, pid 14821, x4821, (4821)") == "pin ***, pid 14821, x4821, (***)"
        assert redact("MYSQL_PWD=hunter2 hunter22") == "MYSQL_PWD=*** hunter22"
        assert redact("exit code 1 ab") == "exit code 1 ab"
        assert redact("key=signkey-very-secret-123x") == "key=***x"
