"""One writer per run directory: an advisory lock (``fcntl.flock``) on ``OUT/train.lock``.

``seqzoo train`` (also with ``--overwrite`` or ``--resume``) holds it for the whole run; a
second writer is refused with the first one's pid instead of interleaving metrics or
deleting a live run. The kernel drops the lock when its holder exits, even on SIGKILL, so a
stale lock file never blocks anyone. ``eval`` and ``generate`` only read and never take it.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from seqzoo.errors import SeqzooError

LOCK_FILE = "train.lock"


class RunInUse(SeqzooError):
    pass


class RunLock:
    """Context manager: ``with RunLock(out): ...`` writes ``out`` alone (creates ``out``)."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        self.path = self.out / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if self.out.exists() and not self.out.is_dir():
            raise SeqzooError(f"--out: {self.out} exists and is not a directory")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise SeqzooError(f"{err.filename or self.out}: cannot write the run directory ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder else "another process"
                raise RunInUse(f"{self.out}: in use by {who} (a `seqzoo train` writing this run); wait for it "
                               f"to finish, stop it, or choose another --out") from None
            raise SeqzooError(f"{self.path}: cannot lock the run directory ({err.strerror})") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is a courtesy for the error message; the lock itself is held
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, UnicodeDecodeError):
        return None
