"""User-facing errors: each names the file, the key and what was expected.

The CLI prints them as one line and exits with code 2; no traceback from deep inside.
"""

from __future__ import annotations


class SeqzooError(Exception):
    """Base of every error seqzoo reports to a user as one clear line."""


class ConfigError(SeqzooError, ValueError):
    """A hyper-parameter that cannot work. ``key`` is the dotted path of the culprit."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class RecipeError(SeqzooError):
    def __init__(self, path: str, key: str, message: str) -> None:
        self.path, self.key, self.message = path, key, message
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{key}: {message}" if key else f"{where}{message}")


class CheckpointError(SeqzooError):
    def __init__(self, path: str, message: str, key: str = "") -> None:
        self.path, self.key, self.message = path, key, message
        super().__init__(f"{path}: {key + ': ' if key else ''}{message}")
