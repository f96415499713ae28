"""Tasks, generated or read locally (no network at run time). Importing this package
registers every task module in it."""

import importlib as _importlib
import pkgutil as _pkgutil

from seqzoo.tasks.base import IGNORE, Task, TaskConfig, available_tasks, build_task, register_task

for _info in sorted(_pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if _info.name != "base" and not _info.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["IGNORE", "Task", "TaskConfig", "available_tasks", "build_task", "register_task"]
