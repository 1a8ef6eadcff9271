"""Other processes, as the library meets them: whether the process that wrote a lock file, made a
temporary directory or runs a DataLoader worker is still alive."""

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
