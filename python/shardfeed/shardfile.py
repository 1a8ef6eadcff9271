"""One shard being written: its record file, its heap file (variable-length rows) and its
per-record checksums, each a new file written in pieces, checksummed as it is written (from two
pieces on, on a second thread) and handed to the kernel's writeback early, so that the fsync that
commits the shard waits for the tail only. The :class:`shardfeed.Writer` decides what goes where."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import zlib
from typing import Any

import numpy as np

from .format import (
    CHECKSUMS_SUFFIX, FILE_KIND_CHECKSUMS, FILE_KIND_HEAP, FILE_KIND_RECORDS, HEAP_SUFFIX, RECORDS_SUFFIX, Schema,
    format_checksum, pack_header, shard_stem,
)
from .manifest import ShardEntry
from .fileio import create_new

# Data is written in pieces of this size, and from two pieces on checksummed on a second thread at
# the same time: both then read bytes still in the CPU cache (checksum, then write, 512 MiB from a
# memory map on a 2-vCPU VM: in 8 MiB pieces 630 MB/s, in 1 MiB pieces 1500 MB/s, with the checksum
# on a second thread 2000 MB/s when the machine is otherwise idle).
_WRITE_PIECE = 1 << 20
# After this many bytes written to a file, the kernel is asked to start writing them to disk (see
# _start_writeback), so that the fsync committing the shard waits only for the last ones.
_WRITEBACK_BYTES = 8 << 20
_writeback: Any = None  # sync_file_range from libc, resolved on first use; False where there is none

@contextlib.contextmanager
def _naming(path: str):
    """Gives an OSError without a file name (a failed write or flush) the name of the file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, path) from exc
        raise


class ShardFile:
    """The shard being written: its record file and (for variable-length or compressed fields) its
    heap file."""

    def __init__(self, directory: str, number: int, schema: Schema, taken: "set[str]"):
        """Creates the files of a new shard under the first free name from ``shard-<number>`` on:
        a name in ``taken`` (the manifest's) or of any existing file, link included, is skipped,
        never reused (O_EXCL), so no committed file can be truncated (a manifest whose names are
        not shard-000000 ... N-1, a merged dataset whose shards are links to its parts'). Besides
        the records: the heap file (variable-length fields) and the per-record checksums
        (docs/format.md), written in step with the records."""
        suffixes = (RECORDS_SUFFIX, HEAP_SUFFIX, CHECKSUMS_SUFFIX)
        while True:
            stem = shard_stem(number)
            number += 1
            if any(stem + suffix in taken for suffix in suffixes):
                continue
            try:
                self.records = _OutputFile(os.path.join(directory, stem + RECORDS_SUFFIX),
                                           pack_header(FILE_KIND_RECORDS, schema))
            except FileExistsError:
                continue
            self.heap = self.checksums = None
            try:
                if schema.heap_fields:
                    self.heap = _OutputFile(os.path.join(directory, stem + HEAP_SUFFIX),
                                            pack_header(FILE_KIND_HEAP, schema))
                self.checksums = _OutputFile(os.path.join(directory, stem + CHECKSUMS_SUFFIX),
                                             pack_header(FILE_KIND_CHECKSUMS, schema))
            except FileExistsError:
                self.discard()
                continue
            except BaseException:
                self.discard()
                raise
            break
        self.number = number - 1
        self.num_samples = 0

    def finish(self) -> ShardEntry:
        entry = ShardEntry(
            file=os.path.basename(self.records.path), num_samples=self.num_samples,
            size=self.records.size, checksum=self.records.finish(),
        )
        if self.heap is not None:
            heap_size = self.heap.size
            entry = ShardEntry(**{**entry.__dict__, "heap_file": os.path.basename(self.heap.path),
                                  "heap_size": heap_size, "heap_checksum": self.heap.finish()})
        checksums_size = self.checksums.size
        return ShardEntry(**{**entry.__dict__, "checksums_file": os.path.basename(self.checksums.path),
                             "checksums_size": checksums_size, "checksums_checksum": self.checksums.finish()})

    def discard(self) -> None:
        for out in (self.records, self.heap, self.checksums):
            if out is not None:
                out.discard()

    def close(self) -> None:
        for out in (self.records, self.heap, self.checksums):
            if out is not None:
                out.close()


class _OutputFile:
    def __init__(self, path: str, header: bytes):
        """Creates ``path``, which must not exist (FileExistsError)."""
        self.path = path
        fd = create_new(path)
        try:
            self.file = os.fdopen(fd, "wb", buffering=1 << 20)
        except BaseException:
            # An exception raised inside fdopen (SIGTERM's SystemExit, from a handler that runs
            # between any two bytecodes) can come after its file object was made, which closed fd
            # as it went: closing fd again then fails with EBADF, which must not replace it.
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        self.size = 0
        self.crc = 0
        self.written_back = 0  # bytes before this offset were handed to _start_writeback
        try:
            self.write(np.frombuffer(header, dtype=np.uint8))
        except BaseException:
            self.discard()
            raise

    def write(self, data: np.ndarray) -> int:
        """Appends the bytes of a contiguous array; returns the byte offset they start at."""
        start = self.size
        raw = data.reshape(-1).view(np.uint8)
        if raw.size < 2 * _WRITE_PIECE:
            crc = zlib.crc32(raw, self.crc)
            with _naming(self.path):
                self.file.write(raw)
        else:
            crc = self._write_with_checksum_aside(raw)
        self.crc = crc
        self.size = start + raw.size
        self._write_back()
        return start

    def _write_with_checksum_aside(self, raw: np.ndarray) -> int:
        """Writes ``raw`` piece by piece while a second thread computes the CRC-32 of the same
        pieces (zlib and write() both release the GIL); returns the CRC after them."""
        result = [self.crc]

        def checksum() -> None:
            crc = result[0]
            for at in range(0, raw.size, _WRITE_PIECE):
                crc = zlib.crc32(raw[at:at + _WRITE_PIECE], crc)
            result[0] = crc

        thread = threading.Thread(target=checksum, name="shardfeed-crc", daemon=True)
        thread.start()
        try:
            with _naming(self.path):
                for at in range(0, raw.size, _WRITE_PIECE):
                    self.file.write(raw[at:at + _WRITE_PIECE])
        finally:
            thread.join()  # before the caller reuses or releases the bytes
        return result[0]

    def _write_back(self) -> None:
        if self.size - self.written_back >= _WRITEBACK_BYTES:
            _start_writeback(self.file.fileno(), self.written_back, self.size - self.written_back)
            self.written_back = self.size

    def finish(self) -> str:
        with _naming(self.path):
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        return format_checksum(self.crc)

    def close(self) -> None:
        try:
            self.file.close()  # flushes the buffer, which fails again after a failed write
        except OSError:
            pass

    def discard(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Asks the kernel to start writing a file's range to disk now, without waiting for it (Linux:
    sync_file_range(SYNC_FILE_RANGE_WRITE)); elsewhere nothing. The disk then works while more
    data is written, instead of all at once in the fsync that commits the shard (on a 2-vCPU VM,
    checksumming and writing 512 MiB with an fsync per 256 MiB: 860 -> 1220 MB/s). A hint only:
    errors are ignored, and durability still comes from that fsync."""
    global _writeback
    if _writeback is None:
        _writeback = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes
                function = ctypes.CDLL(None, use_errno=True).sync_file_range
                function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                function.restype = ctypes.c_int
                _writeback = function
            except (OSError, AttributeError):
                pass
    if _writeback:
        _writeback(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE
