"""The machine said no: a full disk, a read-only directory, a file where a directory should
be, memory exhausted. Each becomes one line naming the path (or what to shrink); anything
else is a bug and keeps its traceback."""

from __future__ import annotations

_ALLOCATOR = ("can't allocate memory", "out of memory", "not enough memory", "cannot allocate memory")


def environment_error_line(err: BaseException) -> str | None:
    """One line for an error of the environment, or None when ``err`` is not one."""
    if isinstance(err, MemoryError):
        return "out of memory; reduce the model, the batch size or the sequence length"
    if isinstance(err, OSError):
        where = err.filename if err.filename is not None else "seqzoo"
        return f"{where}: {err.strerror or err}"
    if isinstance(err, RuntimeError) and any(s in str(err).lower() for s in _ALLOCATOR):
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"out of memory ({first[:160]}); reduce the model, the batch size or the sequence length"
    return None
