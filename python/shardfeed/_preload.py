"""Bringing a dataset's files into the page cache with sequential reads: how much memory the page
cache may use, whether a dataset fits in it, the blocking pass of :meth:`Dataset.preload` and the
background pass that :func:`shardfeed.open` starts by default (its ``preload`` option).

Why: a dataset that fits in memory but is not cached (the first epoch after a reboot, on a fresh
node, or after another job pushed the files out) is read at the disk's *request* rate by random
reads (the reader's files have ``POSIX_FADV_RANDOM``: one small read per record), where one
sequential pass runs at the disk's *bandwidth*: 1 GiB of 128-byte records in 0.8-2 s instead of
75-90 s (benchmarks/RESULTS.md). numpy.memmap gets the same effect by accident: the kernel reads
ahead around each page fault. The background pass reads the files front to back while the first
batches are served by random reads of what is not cached yet; every read of the dataset is
correct whichever of the two brings a record in (the page cache is one copy of the file).

The pass reads the files through descriptors of its own (the reader's have ``POSIX_FADV_RANDOM``,
which turns the kernel's readahead, and its large folios, off) with ``POSIX_FADV_SEQUENTIAL``, in
8 MiB ``preadv`` calls (the best of the ways measured on the VM of benchmarks/RESULTS.md: 8 or
32 MiB reads, ``POSIX_FADV_WILLNEED`` alone or ahead of the reads). A chunk that is already
cached (``mincore`` on a map of it that is never touched) is skipped, so a page-cached dataset
costs one scan of its page tables' worth of ``mincore``, not a copy of its bytes.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import sys
import threading
import weakref
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .errors import ShardReadError
from .fileio import open_regular

# The name of a background pass's thread (tests wait for these threads).
PRELOAD_THREAD_NAME = "shardfeed-preload"

# Each preadv of the passes reads this much (and a stop request waits for at most one of them).
CHUNK_BYTES = 8 << 20
# preload="auto" starts the background pass when the dataset's files take at most this share of
# the memory the page cache may use (memory_available): the rest is left for the training
# process's own growth (model, batches), which would otherwise evict what the pass read.
AUTO_MAX_SHARE = 0.8

# direct_io="auto" reads records with O_DIRECT, past the page cache, when the dataset's files are
# at least DIRECT_MIN_RATIO times the memory the page cache may use, and its records at least
# DIRECT_MIN_RECORD_BYTES. A random epoch over a dataset twice the cache finds little there: in
# steady-state epochs in a memory cgroup of half the dataset, 2-3% of 8 KiB and 12-13% of 147 KiB
# buffered reads hit the cache, and they read at the rate of direct ones (8 KiB: 43-46 k/s
# either way; 147 KiB: 3.9-4.1 k/s buffered, 4.1-4.2 k/s direct) for 2.5x and 1.8x the CPU time
# per sample (29 and 290 us against 11 and 155). At 1.5x the cache, buffered reads hit 10% of
# the time and read 1.1-1.4x faster: keep them there. (benchmarks/RESULTS.md, ninth session;
# the seventh session's comparison at 4x: direct reads at 0.41-0.60x the CPU time per 8 KiB
# sample and 0.72-0.78x per 147 KiB sample, 0.84-1.28x the rate.) Of 128-byte records (one 4 KiB
# block read either way) direct reads delivered 0.81-0.98x the rate, so smaller records keep
# the page cache.
DIRECT_MIN_RATIO = 2
DIRECT_MIN_RECORD_BYTES = 4096

AUTO_OPTIONS = ("auto", True, False)


def check_option(value: Any, name: str = "preload") -> Any:
    """``open``'s ``preload`` or ``direct_io`` option, checked: ``"auto"``, True or False."""
    if not any(value is option or (isinstance(value, str) and value == option) for option in AUTO_OPTIONS):
        raise ValueError(f"{name} must be 'auto', True or False, got {value!r}")
    return value


def memory_available(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes the page cache of this process could grow to without evicting itself: the kernel's
    MemAvailable, or the memory limit of the process's cgroup (v1 ``memory.limit_in_bytes`` or v2
    ``memory.max``) where that is lower; None where neither can be read (not Linux). ``proc`` and
    ``cgroups``: where those file systems are mounted."""
    found: List[int] = []
    try:
        with io.open(os.path.join(proc, "meminfo")) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError):
        pass
    try:
        with io.open(os.path.join(proc, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            limit_file = os.path.join(cgroups, group.lstrip("/"), "memory.max")  # v2
        elif "memory" in controllers.split(","):
            limit_file = os.path.join(cgroups, "memory", group.lstrip("/"), "memory.limit_in_bytes")  # v1
        else:
            continue
        try:
            with io.open(limit_file) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():  # "max" (v2) is no limit; v1 writes a huge number instead
            found.append(int(value))
    return min(found) if found else None


def background_wanted(preload: Any, dataset_bytes: int, available: Optional[int]) -> bool:
    """Whether ``open`` starts the background pass: always with ``preload=True``, never with
    False; with ``"auto"`` when the files fit in the memory available (at most
    :data:`AUTO_MAX_SHARE` of it). ``available`` None (not known: not Linux) is no pass."""
    if preload is True or preload is False:
        return preload
    return available is not None and dataset_bytes <= available * AUTO_MAX_SHARE


def direct_wanted(direct_io: Any, dataset_bytes: int, record_bytes: int, available: Optional[int]) -> bool:
    """Whether ``open`` reads records with O_DIRECT, past the page cache: always with
    ``direct_io=True``, never with False; with ``"auto"`` when the files are at least
    :data:`DIRECT_MIN_RATIO` times the memory available (None: not known, no) and a record is at
    least :data:`DIRECT_MIN_RECORD_BYTES`."""
    if direct_io is True or direct_io is False:
        return direct_io
    return (available is not None and dataset_bytes >= available * DIRECT_MIN_RATIO
            and record_bytes >= DIRECT_MIN_RECORD_BYTES)


# ---- which chunks are cached: mincore on an untouched map (Linux) ------------------------------

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_libc: Optional[Any] = None
_MAP_FAILED = (1 << (8 * np.dtype(np.intp).itemsize)) - 1  # (void *)-1 as ctypes returns it


def _load_libc() -> Optional[Any]:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        import ctypes  # (here: `import shardfeed` stays light)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_long]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _cached(fd: int, offset: int, length: int, vector: bytearray) -> bool:
    """Whether every page of ``length`` bytes at ``offset`` (page-aligned) is in the page cache;
    False where that cannot be told. The map is never read, so a file truncated meanwhile cannot
    fault (SIGBUS)."""
    libc = _load_libc()
    if libc is None or length <= 0:
        return False
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address is None or address == _MAP_FAILED:
        return False
    try:
        pages = (length + _PAGE_BYTES - 1) // _PAGE_BYTES
        import ctypes
        if libc.mincore(address, length, (ctypes.c_char * len(vector)).from_buffer(vector)) != 0:
            return False
        return bool((np.frombuffer(vector, np.uint8, pages) & 1).all())
    finally:
        libc.munmap(address, length)


# ---- the passes ---------------------------------------------------------------------------------


def _buffer() -> mmap.mmap:
    """The passes' read buffer: an anonymous map, returned to the system when closed (a
    bytearray of 8 MiB would stay in the malloc arena of the thread that freed it: 25 MiB of
    RssAnon after 1,500 open/close cycles in tests/test_leaks.py)."""
    return mmap.mmap(-1, CHUNK_BYTES)


def _read_file(fd: int, size: int, buffer: mmap.mmap, stop: Optional[threading.Event]) -> int:
    """Reads the first ``size`` bytes of ``fd`` front to back, skipping chunks already cached;
    returns the bytes read from disk (or copied from a partly cached chunk). Stops at the end of
    the file (truncated meanwhile) or when ``stop`` is set."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    vector = bytearray(len(buffer) // _PAGE_BYTES + 1)  # mincore's page flags
    offset = read = 0
    with memoryview(buffer) as view:  # released even on an error, so the buffer can be closed
        while offset < size and not (stop is not None and stop.is_set()):
            length = min(len(buffer), size - offset)
            if not _cached(fd, offset, length, vector):
                got = (os.preadv(fd, [view[:length]], offset) if hasattr(os, "preadv")
                       else len(os.pread(fd, length, offset)))
                if got == 0:
                    break
                read += got
                length = got
            offset += length
    return read


def preload_files(files: Sequence[Tuple[str, int]]) -> None:
    """Reads ``(path, size)`` files into the page cache, front to back (:meth:`Dataset.preload`);
    raises :class:`ShardReadError` naming the file that cannot be read."""
    with _buffer() as buffer:
        for path, size in files:
            fd = open_regular(path, " shard")  # (a name may have been replaced since the open)
            try:
                _read_file(fd, size, buffer, None)
            except OSError as exc:
                raise ShardReadError(exc.errno, f"cannot preload: {exc.strerror}", path) from None
            finally:
                os.close(fd)


_running: "weakref.WeakSet[BackgroundPreload]" = weakref.WeakSet()


class BackgroundPreload:
    """The background pass over a dataset's files (``ds.preloading``): one daemon thread,
    ``PRELOAD_THREAD_NAME``, that reads them front to back into the page cache, then exits. It
    holds no reference to the dataset: :meth:`stop` is called by ``ds.close()`` and when the
    dataset is garbage collected, and the thread stops after the read in progress (at most 8 MiB).
    The thread holds the GIL only between its system calls.

    Advice, as ``ds.readahead``: a file that cannot be read (deleted, truncated, an I/O error)
    ends the pass, recorded in :attr:`error`; the dataset's reads report their own errors."""

    def __init__(self, files: Sequence[Tuple[str, int]]):
        self.files = list(files)
        self.bytes_read = 0  # bytes read from disk so far (chunks found cached are skipped)
        self.error: Optional[Exception] = None  # why the pass ended early, naming the file
        self._stop = threading.Event()
        self._fd = -1  # the file being read; closed in a forked child (_after_fork)
        self._thread = threading.Thread(target=self._run, name=PRELOAD_THREAD_NAME, daemon=True)
        _running.add(self)
        self._thread.start()

    @property
    def done(self) -> bool:
        """Whether the pass has ended (every file read, stopped, or failed)."""
        return not self._thread.is_alive()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits for the pass to end (at most ``timeout`` seconds); returns :attr:`done`."""
        self._thread.join(timeout)
        return self.done

    def stop(self, wait: bool = True) -> None:
        """Asks the pass to stop after the read in progress, and waits for it unless ``wait`` is
        False."""
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        buffer = None
        try:
            buffer = _buffer()
            for path, size in self.files:
                if self._stop.is_set():
                    return
                self._fd = open_regular(path, " shard")
                try:
                    self.bytes_read += _read_file(self._fd, size, buffer, self._stop)
                except OSError as exc:
                    raise ShardReadError(exc.errno, f"cannot preload: {exc.strerror}", path) from None
                finally:
                    fd, self._fd = self._fd, -1
                    os.close(fd)
        except (OSError, ValueError) as exc:  # ShardReadError, ShardFormatError (a file replaced)
            self.error = exc
        finally:
            if buffer is not None:
                buffer.close()
            _running.discard(self)

    def _after_fork(self) -> None:
        """In a forked child: the thread is gone; close the descriptor it had open."""
        self._stop.set()
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
            self._fd = -1


def _close_in_child() -> None:
    for preload in list(_running):
        preload._after_fork()
    _running.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def start_background(owner: Any, files: Sequence[Tuple[str, int]]) -> BackgroundPreload:
    """Starts the pass over ``files`` and stops it when ``owner`` (the dataset) is garbage
    collected."""
    preload = BackgroundPreload(files)
    weakref.finalize(owner, preload.stop, False)
    return preload
