"""Faults an independent review found in the log files (issue 9, items 7 and 8)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import supervisor.logfile as logfile
from supervisor.logfile import RotatingLog
from tests.support import tmpfs


class TestTruncatedOnAFullDisk:
    def test_copytruncate_on_a_full_disk_leaves_no_nul_bytes_or_torn_line(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The disk is full, someone truncates the log (copytruncate), writes go on: the
        torn tail is cut from the file's real size. Before: ftruncate to the size known
        a second earlier grew the file with ~500 KB of NULs after a torn line."""
        monkeypatch.setattr(logfile, "CHECK_EVERY", 3600.0)  # the truncation goes unseen
        with tmpfs(tmp_path / "fs", "64k") as fs:
            log = RotatingLog(fs / "a.log", max_size=1 << 30, backups=0)
            line = b"y" * 99 + b"\n"
            for _ in range(2000):
                if log.append(line * 7).dropped_bytes:
                    break
            else:
                pytest.fail("the 64 KiB tmpfs never filled")
            os.truncate(fs / "a.log", 0)
            refilled = False
            for _ in range(2000):  # fill it again: the next short write is cut
                if log.append(line * 7).dropped_bytes:
                    refilled = True
                    break
            assert refilled
            log.close()
            data = (fs / "a.log").read_bytes()
        assert b"\0" not in data
        for chunk in data.split(b"\n")[:-1]:
            assert chunk == b"y" * 99 or chunk.startswith(b"[hostvisor:")


class TestFolderReplacedByAFile:
    def test_no_write_goes_to_the_unlinked_file_and_one_episode_is_reported(
        self, tmp_path: Path
    ) -> None:
        """`rm -rf logs; touch logs`: the log cannot be reopened. Writes are dropped (the
        old, unlinked file gets nothing), and once the folder is back writing resumes.
        Before: the old fd kept taking lines between checks, and every check reported a
        new drop and a false "resumed"."""
        folder = tmp_path / "logs"
        folder.mkdir()
        log = RotatingLog(folder / "a.log", max_size=1 << 30, backups=0)
        assert not log.append(b"first\n").dropped_bytes
        old = os.open(folder / "a.log", os.O_RDONLY)
        try:
            shutil.rmtree(folder)
            folder.write_text("")  # a file where the folder was
            deadline = time.monotonic() + 5
            outcome = log.append(b"lost\n")
            while not outcome.dropped_bytes and time.monotonic() < deadline:
                outcome = log.append(b"lost\n")  # until the once-a-second check sees it
            assert outcome.dropped_bytes
            for _ in range(50):
                assert log.append(b"still lost\n").dropped_bytes  # no false resume
            seen = os.pread(old, 1 << 20, 0)
            assert b"still lost" not in seen
            assert "a file is in the way" in log.append(b"x\n").message
            folder.unlink()
            assert not log.append(b"back\n").dropped_bytes
            assert (folder / "a.log").read_bytes().endswith(b"back\n")
        finally:
            os.close(old)
            log.close()
