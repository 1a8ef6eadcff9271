"""The writer lock: one writer per dataset directory (docs/format.md, "Writing and committing")."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import weakref
from typing import Optional, Tuple

from .errors import ShardFormatError, WriterLockedError
from .fileio import describe_file_type, open_regular
from .format import LOCK_NAME, format_lock, parse_lock


class WriterLock:
    """``writer.lock`` in the dataset directory, flock()ed while a writer is open; it holds the
    writer's pid and host. The kernel drops the lock when its holder dies, so a lock file that can
    be locked is a leftover of a writer that was killed (its pid is reported, never trusted).

    The lock file a writer writes into is always one it created (O_EXCL, no link followed): a
    leftover is read (for its pid), removed and replaced, never truncated or written, so a lock
    file that is a link or a hard link to another file cannot make the writer write there."""

    def __init__(self, directory: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.stale: Optional[Tuple[int, str]] = None  # (pid, host) of a writer that did not finish
        while True:
            opened = self._open()
            if opened is None:  # removed between two calls: look again
                continue
            fd, created = opened
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                pid = holder[0] if holder else None
                who = f"pid {pid} on host {holder[1]}" if holder else "a process that has not written its pid yet"
                raise WriterLockedError(errno.EAGAIN, f"another writer ({who}) has this dataset open; "
                                        "shardfeed allows one writer per dataset at a time", self.path,
                                        pid=pid) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                # The previous holder may have removed the file between our open() and flock():
                # then we locked a file nobody else will look at, and must start again.
                try:
                    same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
                except FileNotFoundError:
                    same = False
                if same and not created:  # a leftover nobody holds: note its writer, replace it
                    self.stale = _holder(fd) or self.stale
                    os.unlink(self.path)
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            os.pwrite(fd, format_lock(os.getpid(), socket.gethostname()), 0)
        except BaseException:
            self.release()
            raise
        self._finalizer = weakref.finalize(self, os.close, fd)

    def _open(self) -> Optional[Tuple[int, bool]]:
        """(descriptor, created): a new lock file, or the existing one opened for reading (never
        through a link, never a FIFO or device). None when it vanished in between."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                           | getattr(os, "O_CLOEXEC", 0), 0o644), True
        except FileExistsError:
            pass
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(mode):
            raise ShardFormatError(f"{self.path}: is {describe_file_type(mode)}, not a lock file shardfeed "
                                   "writes; remove it if no writer is running")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
                         | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between lstat and open
            os.close(fd)
            return None
        return fd, False


    def release(self) -> Optional[OSError]:
        """Removes the lock file (a clean finish), then drops the lock. Returns the error of a
        removal that failed: the lock is dropped all the same, and the file emptied so that it
        names no writer (the next one then takes it over without reporting an unfinished writer)."""
        if self.fd < 0:
            return None
        failure = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            failure = exc
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
        finally:
            finalizer = getattr(self, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            os.close(self.fd)
            self.fd = -1
        return failure


def _holder(fd: int) -> Optional[Tuple[int, str]]:
    """(pid, host) from an open lock file, or None when it is empty or unreadable."""
    return parse_lock(os.pread(fd, 4096, 0))


def lock_holder(lock_path: str) -> Optional[Tuple[int, str]]:
    """(pid, host) of the writer named in the lock file at ``lock_path``, read without taking the
    lock (and never through a link); None when there is none or it names no writer."""
    try:
        fd = open_regular(lock_path)
    except (OSError, ShardFormatError):
        return None
    try:
        return _holder(fd)
    except OSError:
        return None
    finally:
        os.close(fd)
