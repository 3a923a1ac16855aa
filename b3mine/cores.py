"""The CPU cores this process may run on: its affinity (a container's cpuset, ``taskset``),
not the machine's count, so thread pools never oversubscribe a limited container.

>>> usable_cores() >= 1
True
"""
from __future__ import annotations

import os

__all__ = ["usable_cores"]


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
