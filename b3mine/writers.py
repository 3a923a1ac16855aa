"""Who owns a half-written directory: a lock file beside it, held by the live writer.

A writer takes an exclusive ``flock`` on ``<dir>.lock`` before it creates ``<dir>`` and drops the
lock file only after ``<dir>`` is renamed or removed. The kernel releases a dead process's
locks, so a directory whose lock file is missing, or free to take, belongs to no live writer
and can be removed (``remove_orphans``): a killed ``write_plan`` leaves ``.tmp-<plan>-*``, a
killed Dask load leaves ``.work/<job>``.

>>> import tempfile, pathlib
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> (root / ".tmp-dead").mkdir()
>>> with writer_lock(root / ".tmp-live.lock"):
...     (root / ".tmp-live").mkdir()
...     sorted(p.name for p in remove_orphans(root, ".tmp-"))
['.tmp-dead']
"""
from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_SUFFIX = ".lock"


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created) for the block; the file is removed after."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # a cleaner may have unlinked the file between open and flock: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)


def _owned(lock: Path) -> bool:
    """True if a live process holds ``lock``."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return True
    try:  # ours now: the writer is gone
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return False


def remove_orphans(parent: Path, prefix: str,
                   keep: Callable[[Path], bool] = lambda _: False) -> list[Path]:
    """Remove the directories ``parent/<prefix>*`` that no live writer owns (and ``keep``
    does not protect); return them."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for d in entries:
        if not d.name.startswith(prefix) or d.name.endswith(LOCK_SUFFIX) or not d.is_dir() \
                or d.is_symlink():
            continue
        if _owned(d.with_name(d.name + LOCK_SUFFIX)) or keep(d):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed
