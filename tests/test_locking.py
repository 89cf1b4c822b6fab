"""Writer locks on their own: exclusion, the owner's record, takeover after a death."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tl import locking
from tl.errors import TLError

ROOT = Path(__file__).resolve().parents[1]


def _die_holding_lock(target: Path) -> int:
    """Take the lock of `target` in a child process that is then SIGKILLed; its pid."""
    script = textwrap.dedent(
        f"""
        import os, signal
        from tl.locking import acquire
        acquire({str(target)!r}, "extraction")
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    assert child.wait(timeout=60) == -signal.SIGKILL
    return child.pid


def test_second_writer_is_refused_naming_the_owner(tmp_path):
    target = tmp_path / "codes.h5"
    with locking.acquire(target, "extraction") as lock:
        record = json.loads(locking.lock_path(target).read_text())
        assert record["pid"] == os.getpid()
        assert record["host"] == socket.gethostname()
        with pytest.raises(TLError) as refused:
            locking.acquire(target, "merge")
        message = str(refused.value)
        assert f"another extraction (pid {os.getpid()} on " in message
        assert record["since"] in message and "another --output" in message
        assert "--overwrite" not in message and "\n" not in message
        assert locking.current_owner(target) == lock.owner
    assert not locking.lock_path(target).exists()
    assert locking.current_owner(target) is None
    locking.acquire(target).release()  # free again


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    target = tmp_path / "codes.h5"
    dead = _die_holding_lock(target)
    assert json.loads(locking.lock_path(target).read_text())["pid"] == dead
    assert locking.current_owner(target) is None  # the kernel released its flock
    with locking.acquire(target) as lock:
        assert lock.owner.pid == os.getpid()
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_without_flock_exclusive_creation_and_a_liveness_check(tmp_path, monkeypatch):
    def unsupported(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    target = tmp_path / "codes.h5"
    dead = _die_holding_lock(target)  # with flock, before it is taken away
    monkeypatch.setattr(fcntl, "flock", unsupported)
    assert locking.current_owner(target) is None  # recorded pid no longer runs
    with locking.acquire(target) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid() != dead
        assert locking.current_owner(target) == lock.owner
        with pytest.raises(TLError, match=f"pid {os.getpid()} on"):
            locking.acquire(target)
    assert not locking.lock_path(target).exists()
