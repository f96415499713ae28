"""Read a small text file without trusting it: a regular file only (a FIFO or ``/dev/zero``
would block or never end), at most ``limit`` bytes, strict UTF-8. Errors name the path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from seqzoo.errors import SeqzooError


class UnreadableFile(SeqzooError):
    def __init__(self, path: str | Path, message: str) -> None:
        self.path, self.message = str(path), message
        super().__init__(f"{path}: {message}")


def read_text_bounded(path: str | Path, *, limit: int, what: str = "file") -> str:
    """The UTF-8 text of the regular file at ``path``, refused past ``limit`` bytes."""
    try:
        # O_NONBLOCK: opening a FIFO with no writer must not wait; fstat then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise UnreadableFile(path, f"no such {what}") from None
    except IsADirectoryError:
        raise UnreadableFile(path, f"is a directory; expected a {what}") from None
    except OSError as err:
        raise UnreadableFile(path, f"cannot be read: {err.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if stat.S_ISDIR(info.st_mode):
        problem = f"is a directory; expected a {what}"
    elif not stat.S_ISREG(info.st_mode):
        problem = f"is not a regular file (a device, FIFO or socket); expected a {what}"
    elif info.st_size > limit:
        problem = f"is {info.st_size:,} bytes; a {what} may hold at most {limit:,}"
    if problem is not None:
        os.close(fd)
        raise UnreadableFile(path, problem)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # the size may change between fstat and read
        except OSError as err:
            raise UnreadableFile(path, f"cannot be read: {err.strerror}") from None
    if len(data) > limit:
        raise UnreadableFile(path, f"grew past {limit:,} bytes while being read; a {what} may hold at most {limit:,}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnreadableFile(path, f"is not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                             f"save it as UTF-8") from None
