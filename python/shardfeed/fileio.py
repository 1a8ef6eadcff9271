"""Opening and replacing files in a dataset directory, safely: only regular files are read, never
through a symbolic link (a FIFO would block, a device never ends, a link could lead out of the
directory: docs/format.md, "Files"); every file the library creates is new (O_EXCL: no existing
file, no link, is ever reused or truncated); a file is replaced atomically (temporary file, fsync,
rename, fsync of the directory); a file is read whole in requests its size bounds, up to a limit."""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, Optional

from .errors import ShardFormatError, ShardReadError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def describe_file_type(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a regular file")


def file_system_path(path: Any, error: type) -> str:
    """``path`` (str, bytes or path-like) as a str, bytes decoded as the file system does; a name
    no file system name decodes to (a lone surrogate, ``"x\\ud800"``) raises ``error`` (an OSError
    kind of ShardfeedError) naming it, instead of a UnicodeEncodeError from the first system call."""
    path = os.fsdecode(os.fspath(path))
    if not encodable(path):
        raise error(errno.EINVAL, "not a usable file name (a lone surrogate no file system name decodes to)", path)
    return path


def open_regular(path: str, what: str = "") -> int:
    """Opens ``path`` for reading without following a symbolic link and without blocking (a FIFO),
    and returns the descriptor of a regular file. ShardFormatError names a file of another kind;
    ShardReadError (an OSError) any other failure (``what``: e.g. " shard", for its message)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise ShardFormatError(f"{path}: is a symbolic link; shardfeed reads only regular files in "
                                   "the dataset directory, never through a link") from None
        hint = " (too many open files: raise `ulimit -n` or write larger shards)" if exc.errno == errno.EMFILE else ""
        raise ShardReadError(exc.errno, f"cannot open{what}: {exc.strerror}{hint}", path) from None
    except (UnicodeEncodeError, ValueError) as exc:  # a lone surrogate, a NUL
        raise ShardFormatError(f"{path!r}: not a usable file name ({exc})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ShardFormatError(f"{path}: is {describe_file_type(mode)}, not a regular file; shardfeed "
                                   "reads only regular files")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


# What read_bounded asks for once it has the bytes fstat promised: enough to see the end (or that
# the file grew), and below glibc's initial mmap threshold (128 KiB).
_READ_PIECE_BYTES = 1 << 16


def read_bounded(fd: int, size: int, limit: int) -> Optional[bytes]:
    """The bytes of the open file ``fd`` from its offset to its end (``size``: its size as fstat
    gave it), or None when it holds more than ``limit`` bytes (a file that grows while it is
    read is bounded too).

    It never asks for much more than the file holds: ``os.read(fd, n)`` allocates ``n`` bytes
    before reading, and frees the whole block when it reads nothing (at the end of the file).
    Freeing a block of up to 32 MiB that glibc had mapped raises its mmap threshold to that size
    (and its trim threshold to twice that) for the rest of the process: every later buffer below
    it comes from the heap, and up to twice that size of freed heap stays resident. A 16 MiB read
    at every manifest read did that, making RssAnon grow by megabytes over open/close cycles
    (tests/test_leaks.py)."""
    chunks = []
    got = 0
    while got <= limit:
        chunk = os.read(fd, min(limit + 1 - got, max(size + 1 - got, _READ_PIECE_BYTES)))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
    return None


def create_new(path: str, mode: int = 0o644) -> int:
    """Creates ``path`` for writing; it must not exist (not even as a dangling link): returns the
    descriptor, raises FileExistsError otherwise."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, mode)


def encodable(name: str) -> bool:
    """Whether a file system name can hold ``name`` (not a lone surrogate)."""
    try:
        os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate that no file system name decodes to
        return False
    return True


def replace_atomically(path: str, name: str, temporary_name: str, data: bytes) -> None:
    """Writes ``data`` to ``path``/``name``: a new temporary file (never one that exists: a leftover
    or a link of that name is removed, not written through), fsync, rename, fsync of the directory."""
    final = os.path.join(path, name)
    temporary = os.path.join(path, temporary_name)
    try:
        fd = create_new(temporary)
    except FileExistsError:  # left by a killed process of our pid, or planted: never reused
        os.unlink(temporary)
        fd = create_new(temporary)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as exc:
            if exc.filename is None:  # os.write and os.fsync do not name the file
                raise OSError(exc.errno, exc.strerror, temporary) from exc
            raise
        finally:
            os.close(fd)
        os.replace(temporary, final)
    except BaseException:  # disk full, file-size limit: the old manifest stays, no litter
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    fsync_directory(path)


def fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
