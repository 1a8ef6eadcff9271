"""Column sources -- numpy arrays (and anything sliceable with a dtype), ``.npy`` files memory-mapped,
``.npz`` members mapped or streamed -- and the loop that converts columns a chunk at a time."""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import SchemaError, SourceError
from ._npy import read_npy_header
from ._options import PathLike, Progress, check_dtypes_cover, dtype_for, part_range, source_dtype_name
from ._report import ConversionReport
from ._sink import Sink


class Piece:
    """Rows of one source file or array, read by slices."""

    name = "<array>"
    dtype: np.dtype
    shape: Tuple[int, ...]  # per row

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def release(self, stop: int) -> None:
        """Rows before ``stop`` will not be read again."""

    def close(self) -> None:
        pass


class ArrayPiece(Piece):
    def __init__(self, array: Any, name: str = "<array>"):
        if not hasattr(array, "dtype") or not hasattr(array, "shape"):
            array = np.asarray(array)
        if len(array.shape) == 0:
            raise SchemaError(f"{name}: a scalar, not an array of samples")
        self.array, self.name = array, name
        self.dtype, self.shape = np.dtype(array.dtype), tuple(array.shape[1:])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])


class MappedPiece(Piece):
    """A C- or Fortran-ordered array at ``offset`` of a file, memory-mapped read-only. Pages are
    released from the process (``MADV_DONTNEED``; they stay in the page cache) as rows are done,
    so the resident memory of a conversion stays bounded whatever the file size."""

    def __init__(self, path: str, offset: int, dtype: np.dtype, shape: Tuple[int, ...], fortran: bool,
                 name: Optional[str] = None):
        self.name = name or path
        self.dtype, self.shape = dtype, tuple(shape[1:])
        self.rows = shape[0] if shape else 1
        self.fortran = fortran and len(shape) > 1
        self.offset = offset
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        size = self.row_bytes * self.rows
        self._map: Optional[mmap.mmap] = None
        self.array: Optional[np.ndarray] = None
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < offset + size:
                raise SourceError(f"{self.name}: file is shorter than its header says ({offset + size} bytes)")
            if size:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map is not None:
            if hasattr(mmap, "MADV_SEQUENTIAL") and not self.fortran:
                self._map.madvise(mmap.MADV_SEQUENTIAL)
            self.array = np.ndarray(shape if shape else (1,), dtype=dtype, buffer=self._map, offset=offset,
                                    order="F" if self.fortran else "C")

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.array is None:
            return np.empty((stop - start,) + self.shape, self.dtype)
        return self.array[start:stop]

    def release(self, stop: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        end = len(self._map) if self.fortran else self.offset + stop * self.row_bytes
        end -= end % mmap.PAGESIZE
        if end > 0:
            self._map.madvise(mmap.MADV_DONTNEED, 0, end)

    def close(self) -> None:
        self.array = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view of it is still alive; the map goes when that does
                pass
            self._map = None


class _StreamPiece(Piece):
    """An array read sequentially from a compressed ``.npz`` member."""

    def __init__(self, archive: str, member: zipfile.ZipInfo, name: str):
        self.name = name
        self._archive, self._member = archive, member
        self._zip: Optional[zipfile.ZipFile] = None
        self._stream = self._open()
        self.dtype, shape, fortran, _ = read_npy_header(self._stream, name)
        if fortran and len(shape) > 1:
            raise SourceError(f"{name}: a compressed Fortran-ordered array cannot be streamed by rows; "
                              "save it in C order (np.ascontiguousarray) or uncompressed")
        self.rows, self.shape = (shape[0] if shape else 1), tuple(shape[1:])
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        self.position = 0

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> np.ndarray:
        if start < self.position:  # only when a conversion restarts: reopen
            self.close()
            self._stream = self._open()
            read_npy_header(self._stream, self.name)
            self.position = 0
        while self.position < start:  # skip to the part's first row
            skip = min(start - self.position, max(1, (8 << 20) // max(1, self.row_bytes)))
            self._read_rows(skip)
        return self._read_rows(stop - start)

    def _read_rows(self, count: int) -> np.ndarray:
        out = np.empty((count,) + self.shape, self.dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        while view:
            got = self._stream.readinto(view)
            if not got:
                raise SourceError(f"{self.name}: data ends before the {self.rows} rows its header announces")
            view = view[got:]
        self.position += count
        return out

    def _open(self) -> Any:
        self._zip = zipfile.ZipFile(self._archive)
        return self._zip.open(self._member)

    def close(self) -> None:
        self._stream.close()
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def npy_piece(path: str) -> Piece:
    with open(path, "rb") as f:
        dtype, shape, fortran, offset = read_npy_header(f, path)
    return MappedPiece(path, offset, dtype, shape, fortran, name=path)


def npz_pieces(path: str) -> Dict[str, Piece]:
    """Members of an .npz: stored ones memory-mapped in place, compressed ones streamed."""
    pieces: Dict[str, Piece] = {}
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{path}: not an .npz archive ({exc})") from None
    with archive, open(path, "rb") as raw:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            member = info.filename[:-4]
            name = f"{path}[{member}]"
            if info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise SourceError(f"{name}: bad zip local header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                start = info.header_offset + 30 + name_len + extra_len
                raw.seek(start)
                dtype, shape, fortran, offset = read_npy_header(raw, name)
                pieces[member] = MappedPiece(path, offset, dtype, shape, fortran, name=name)
            else:
                pieces[member] = _StreamPiece(path, info, name)
    return pieces


class Member(Piece):
    """One member of a structured array's rows."""

    def __init__(self, piece: Piece, member: str):
        self.piece, self.member = piece, member
        sub = piece.dtype.fields[member][0]
        self.name = f"{piece.name}[{member}]"
        self.dtype, self.shape = sub.base, tuple(piece.shape) + tuple(sub.shape)
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.piece)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.piece.read(start, stop)[self.member]

    def release(self, stop: int) -> None:
        self.piece.release(stop)

    def close(self) -> None:
        self.piece.close()


class Column:
    """One field's rows: pieces (files, members, arrays) concatenated."""

    def __init__(self, field: str, pieces: List[Piece]):
        self.field, self.pieces = field, pieces
        first = pieces[0]
        for piece in pieces[1:]:
            if piece.shape != first.shape or piece.dtype.kind != first.dtype.kind or piece.dtype.itemsize != first.dtype.itemsize:
                raise SourceError(f"field {field!r}: {piece.name} holds {piece.dtype}{list(piece.shape)} rows, "
                                  f"{first.name} holds {first.dtype}{list(first.shape)}")
        self.dtype, self.shape = first.dtype, first.shape
        self.starts = np.cumsum([0] + [len(p) for p in pieces]).tolist()
        self.row_bytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.starts[-1]

    def read(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for k, piece in enumerate(self.pieces):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                parts.append(piece.read(lo - self.starts[k], hi - self.starts[k]))
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty((0,) + self.shape, self.dtype)

    def release(self, stop: int) -> None:
        for k, piece in enumerate(self.pieces):
            if self.starts[k] < stop:
                piece.release(min(stop, self.starts[k + 1]) - self.starts[k])

    def where(self, row: int) -> str:
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        k = min(k, len(self.pieces) - 1)
        return f"{self.pieces[k].name}, row {row - self.starts[k]}"

    def close(self) -> None:
        for piece in self.pieces:
            piece.close()


def convert_columns(path: PathLike, columns: Dict[str, Column], *, dtypes: Any, part: Optional[Tuple[int, int]],
                    chunk_bytes: int, shard_size: int, metadata: Optional[Mapping[str, Any]], mode: str,
                    overflow: str, progress: Progress, compression: Any = None, align: int = 1) -> ConversionReport:
    try:
        if not columns:
            raise SchemaError("no fields to convert")
        check_dtypes_cover(dtypes, columns)
        lengths = {name: len(c) for name, c in columns.items()}
        if len(set(lengths.values())) > 1:
            raise SourceError(f"fields have different numbers of rows: {lengths}")
        total = next(iter(lengths.values()))
        start, stop = part_range(total, part)
        source_dtypes = {name: source_dtype_name(c.dtype) for name, c in columns.items()}
        spec = {name: (dtype_for(name, dtypes, source_dtypes[name]), c.shape) for name, c in columns.items()}
        row_bytes = sum(c.row_bytes for c in columns.values())
        rows = max(1, chunk_bytes // max(1, row_bytes))
        if align > 1 and rows > align:
            rows -= rows % align
        # Chunks end at the source files' boundaries too: a chunk is then a view of one file, not a copy.
        some = next(iter(columns.values()))
        cuts = sorted(set(range(start, stop, rows)) | {s for c in columns.values() for s in c.starts if start < s < stop})
        with Sink(path, spec, source_dtypes, shard_size=shard_size, metadata=metadata, mode=mode,
                  overflow=overflow, progress=progress, total=(stop - start) * row_bytes, compression=compression) as sink:
            for a, b in zip(cuts, cuts[1:] + [stop]):
                batch = {name: c.read(a, b) for name, c in columns.items()}
                sink.put(batch, (b - a) * row_bytes, locate=lambda row, a=a: some.where(a + row))
                del batch
                for c in columns.values():
                    c.release(b)
        return sink.report
    finally:
        for c in columns.values():
            c.close()
