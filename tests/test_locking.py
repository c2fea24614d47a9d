"""One writer per folder: a second process fails at once, naming the folder and the holder."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrolm.locking import LOCK_FILE, LockedError, exclusive_lock

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}

# Holds FOLDER's lock until killed; says so on stdout once it does.
HOLD = """
import sys, time
from retrolm.locking import exclusive_lock
with exclusive_lock(sys.argv[1], "run"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(folder: Path) -> subprocess.Popen:
    """A live process holding ``folder``'s lock (the caller kills it)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], env=ENV, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_fails_at_once_and_a_killed_holder_blocks_nobody(tmp_path):
    folder = tmp_path / "run"
    holder = hold(folder)
    try:
        assert (folder / LOCK_FILE).read_text().strip() == str(holder.pid)
        message = f"run {folder} is being written by another retrolm process (pid {holder.pid})"
        t0 = time.perf_counter()
        with pytest.raises(LockedError, match=re.escape(message)):
            with exclusive_lock(folder, "run"):
                pytest.fail("two writers held one folder")
        assert time.perf_counter() - t0 < 5  # at once: no waiting for the holder
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its flock; its pid stays behind
        holder.wait()
    assert (folder / LOCK_FILE).read_text().strip() == str(holder.pid)
    with exclusive_lock(folder, "run"):
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid())
    assert (folder / LOCK_FILE).read_text() == ""  # released: no pid names a holder


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    with exclusive_lock(tmp_path, "database"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            with exclusive_lock(tmp_path, "database"):
                pass
    with exclusive_lock(tmp_path, "database"):  # and free again after the block
        pass


def test_a_folder_made_only_for_the_lock_goes_away_again(tmp_path):
    new = tmp_path / "new" / "run"
    with exclusive_lock(new):
        assert new.is_dir()
    assert not new.exists()  # nothing was written: no empty folder left behind
    with exclusive_lock(new):
        (new / "metrics.csv").write_text("step\n")
    assert (new / "metrics.csv").is_file()  # written into: kept
    existing = tmp_path / "mine"
    existing.mkdir()
    with exclusive_lock(existing):
        pass
    assert existing.is_dir()  # the user's own folder is never removed


def test_a_holder_that_removed_its_lock_file_is_not_shared(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder removed it (and the
    folder) must not count the old, unlinked file's lock as its own."""
    import retrolm.locking as locking

    folder = tmp_path / "run"
    real_open, raced = os.open, []

    def open_then_holder_leaves(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not raced:  # the holder unlinks the file right after this process opened it
            raced.append(path)
            os.unlink(path)
        return fd

    monkeypatch.setattr(locking.os, "open", open_then_holder_leaves)
    with exclusive_lock(folder) as path:
        assert raced and path.is_file()  # the lock taken is that of the file now there
        monkeypatch.setattr(locking.os, "open", real_open)
        with pytest.raises(LockedError):
            with exclusive_lock(folder):
                pass
