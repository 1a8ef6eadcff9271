"""This process and others, as the library meets them: the CPUs this process may run on, and
whether the process that wrote a lock file, made a temporary directory or runs a DataLoader worker
is still alive."""

from __future__ import annotations

import os


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's process counts: it cannot be
    signalled, but it is there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity; the CPU count where there is none: macOS)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
