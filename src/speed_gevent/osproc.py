"""Small Linux process helpers: parent-death signal, process titles, memory samples."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterable

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_ppid: int) -> bool:
    """Ask the kernel to SIGKILL us when our parent dies; False if it is already gone.

    The `getppid()` check closes the race where the parent died before `prctl` ran
    (gunicorn's `notify()` does the same check).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    return os.getppid() == expected_ppid


def set_title(title: str) -> None:
    """Set the process title if setproctitle is installed. Never pass a secret here."""
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover
        return
    setproctitle(title)


def release_free_memory() -> None:
    """Give the C heap's free pages back to the kernel (glibc keeps what start-up freed:
    about 2 MB in the master, read once by imports and gevent's plugin scan)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def sample_memory(pids: Iterable[int]) -> dict[int, int]:
    """Unique memory (USS) per pid, falling back to RSS; vanished pids are left out."""
    import psutil

    sizes: dict[int, int] = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            try:
                sizes[pid] = process.memory_full_info().uss
            except (psutil.AccessDenied, AttributeError):
                sizes[pid] = process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return sizes
