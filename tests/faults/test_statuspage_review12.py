"""Review of issue 12 (the state page): a page the daemon stopped keeping must say so."""

from __future__ import annotations

from pathlib import Path

from tests.daemon_harness import daemon, py_cmd

SLEEPER = f'command = {py_cmd("svc_sleep")}\nstart_seconds = "0.2s"\n'
KEPT = "Kept by the hostvisor daemon"


def test_a_moved_or_removed_page_says_it_is_no_longer_kept(tmp_path: Path) -> None:
    """After a reload moves ``status_page``, the old file no longer claims to be kept (it
    would go stale while saying "kept by the daemon", the seed-000 page's failure); the
    same when a reload removes ``status_page``."""
    old, new = tmp_path / "page.md", tmp_path / "new.md"
    with daemon(tmp_path, config='status_page = "page.md"', units={"web": SLEEPER}) as d:
        d.wait_for(lambda: old.exists() and KEPT in old.read_text(), 10, "the first page")
        d.write_config('status_page = "new.md"')
        assert d.cli("reload").returncode == 0
        d.wait_for(lambda: new.exists() and KEPT in new.read_text(), 10, "the moved page")
        d.wait_for(lambda: KEPT not in old.read_text(), 10, "the old page disowned")
        assert "no longer kept" in old.read_text()
        d.write_config("")
        assert d.cli("reload").returncode == 0
        d.wait_for(lambda: KEPT not in new.read_text(), 10, "the removed page disowned")
        assert "no longer kept" in new.read_text()
        assert d.proc is not None and d.proc.poll() is None
