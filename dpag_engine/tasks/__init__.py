"""Task plug-ins (see base.py): what serving, recording and training ask of a task by name."""
from __future__ import annotations

from .base import OwnTask, Task, Trace
from .reach import Reach

TASKS = {"ur5_reach": lambda: Reach("joint"), "ur5_reach_tcp": lambda: Reach("tcp"),
         "ur5_reach_image": lambda: Reach("image")}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"task {name!r}: not one of {', '.join(TASKS)} (a policy for a task of your own needs no "
                       f"plug-in: serve it with --task own)")
    return TASKS[name]()


__all__ = ["TASKS", "get_task", "OwnTask", "Reach", "Task", "Trace"]
