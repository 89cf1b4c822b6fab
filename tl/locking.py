"""Writer locks: at most one process writes a given output file at a time.

A writer holds `<output>.lock` for its whole run. The lock is an exclusive `flock` on
that file, which records who holds it (pid, host, start time, what it is doing). The
kernel releases a flock when its holder dies, however it dies, so a lock left by a
killed writer is simply taken over by the next one, without trusting a pid that may
have been reused. The holder deletes the file when it releases the lock; a taker
checks, once it holds the lock, that the path still names the file it locked (it may
have locked a file its previous holder has just deleted) and tries again otherwise.

Where the file system does not support flock, the lock falls back to creating the
file exclusively (O_EXCL); a file whose recorded process is no longer running on this
host is then taken over. Two processes taking over the same dead lock at the same
instant can race there; flock has no such window.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from tl.errors import TLError

log = logging.getLogger("tl")

# flock refusals that mean "not supported here", not "held by someone else"
_UNSUPPORTED = {
    errno.ENOLCK,
    errno.EOPNOTSUPP,
    errno.ENOTSUP,
    errno.ENOSYS,
    errno.EINVAL,
}
# a reader's probe holds the lock for microseconds, and a new holder writes its record
# right after locking: look again a few times before calling the lock held
_ATTEMPTS, _PAUSE_S = 10, 0.05


@dataclasses.dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: recorded in the lock file by its holder."""

    pid: int
    host: str
    since: str
    purpose: str = "extraction"

    def __str__(self) -> str:
        if not self.pid:
            return "a process that left no record"
        return f"pid {self.pid} on {self.host} since {self.since}"

    def is_running(self) -> bool:
        """False only when the process is known to be gone (same host, no such pid)."""
        if self.host != socket.gethostname():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def lock_path(target: str | Path) -> Path:
    """The lock file of `target`: `<target>.lock` beside it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


class WriterLock:
    """A held lock on an output; `release()` it, or use it as a context manager."""

    def __init__(self, path: Path, descriptor: int, owner: LockOwner):
        self.path = path
        self.owner = owner
        self._descriptor: int | None = descriptor

    def release(self) -> None:
        """Delete the lock file, then let go of it (in that order: see the module)."""
        if self._descriptor is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._descriptor)
        self._descriptor = None

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def acquire(target: str | Path, purpose: str = "extraction") -> WriterLock:
    """Take the writer lock of `target`, or refuse in one line naming its holder.

    Args:
        target: the output file to be written (it need not exist yet; its folder must).
        purpose: what the holder does, shown to whoever finds the lock taken.
    """
    path = lock_path(target)
    me = LockOwner(
        os.getpid(),
        socket.gethostname(),
        datetime.now().astimezone().isoformat(timespec="seconds"),
        purpose,
    )
    for _attempt in range(_ATTEMPTS):
        descriptor = _open(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            time.sleep(_PAUSE_S)
            continue
        except OSError as error:
            os.close(descriptor)
            if error.errno not in _UNSUPPORTED:
                raise
            return _acquire_by_creation(path, me, target)
        if _names_same_file(path, descriptor):
            previous = _read_owner(path)
            if previous is not None:
                log.info("taking over the lock of %s: %s has ended", target, previous)
            return _hold(path, descriptor, me)
        os.close(descriptor)
    raise _held(target, path)


def current_owner(target: str | Path) -> LockOwner | None:
    """The process writing `target` now, or None (no lock, or one left by a process
    that has ended). Never blocks."""
    path = lock_path(target)
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _patient_owner(path) or LockOwner(0, "", "")
    except OSError as error:
        if error.errno not in _UNSUPPORTED:
            raise
        owner = _patient_owner(path)
        return owner if owner is not None and owner.is_running() else None
    finally:
        os.close(descriptor)
    return None


def _acquire_by_creation(path: Path, me: LockOwner, target) -> WriterLock:
    for _attempt in range(_ATTEMPTS):
        try:
            descriptor = _open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            owner = _patient_owner(path)
            if owner is not None and owner.is_running():
                raise _held(target, path) from None
            log.info("taking over the lock of %s: %s has ended", target, owner)
            path.unlink(missing_ok=True)
            continue
        return _hold(path, descriptor, me)
    raise _held(target, path)


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags, 0o644)
    except FileExistsError:
        raise
    except OSError as error:
        raise TLError(
            f"Cannot create the lock file {str(path)!r}: {error.strerror}. Write to "
            f"a folder where you may create files (another --output)."
        ) from None


def _hold(path: Path, descriptor: int, me: LockOwner) -> WriterLock:
    record = json.dumps(dataclasses.asdict(me)).encode()
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, record, 0)
    os.fsync(descriptor)
    return WriterLock(path, descriptor, me)


def _names_same_file(path: Path, descriptor: int) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_owner(path: Path) -> LockOwner | None:
    try:
        return LockOwner(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # gone, or not yet (or never) written


def _patient_owner(path: Path) -> LockOwner | None:
    """The recorded owner, waiting briefly for a holder that has just locked."""
    for _attempt in range(_ATTEMPTS):
        owner = _read_owner(path)
        if owner is not None:
            return owner
        time.sleep(_PAUSE_S)
    return None


def _held(target, path: Path) -> TLError:
    owner = _patient_owner(path)
    who = f"{owner.purpose} ({owner})" if owner else f"process (see {path})"
    return TLError(
        f"{str(target)!r} is being written by another {who}; wait for it to finish "
        f"or write to another --output."
    )
