"""Converters: data in the shapes people already have -> a shardfeed dataset, in bounded memory.

Every converter reads its source a chunk at a time (``chunk_bytes`` of source data, default 8 MiB),
writes through :class:`shardfeed.Writer` and returns a :class:`ConversionReport`:

* :func:`from_arrays` -- numpy arrays (or anything sliceable with a ``dtype``: ``np.memmap``,
  h5py and zarr arrays);
* :func:`from_npy`, :func:`from_npz` -- ``.npy`` files memory-mapped, ``.npz`` members
  memory-mapped when stored, streamed when compressed; several files are concatenated;
* :func:`from_files` -- a directory of per-sample ``.npy`` files or images (PNG, JPEG, ... with
  Pillow, the ``images`` extra), labels from sub-folder names or a CSV/JSON listing; the list of
  files (one name per line) is the index, so train/val/test lists become separate datasets or
  splits of one;
* :func:`from_csv` -- one or many CSV files, chosen columns -> fields, a dtype per field, bad rows
  refused (naming file and line) or skipped and counted;
* :func:`from_hdf5` -- HDF5 datasets (h5py, the ``hdf5`` extra), chunk by chunk;
* :func:`from_iterable` -- any iterable of samples (dicts or tuples).

Precision: storing floats in a narrower dtype (float64 -> float32 / float16 / bfloat16) is measured:
the report gives the largest absolute and relative error per field. A value that overflows the
stored dtype is refused (``ValueRangeError`` naming the field and the source file and row) unless
``overflow="saturate"``, which stores the largest finite value of the right sign and counts them.

Parallel conversion: the file-based converters take ``part=(k, n)`` (convert only the k-th of n
contiguous slices of the source into a dataset of its own) and ``workers=n`` (n processes each
write a part, then :func:`shardfeed.merge` joins them without copying shard data). A conversion that
fails leaves no dataset behind (``mode="a"``: the dataset as it was).
"""

from __future__ import annotations

import csv
import glob as _glob
import importlib
import itertools
import json
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field as _dataclass_field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ._convert import bfloat16_bits_to_float32, float_to_bfloat16_bits
from .errors import SchemaError, SourceError, ValueRangeError
from .format import MANIFEST_NAME, STORED_DTYPES, Schema, read_manifest, write_manifest
from .writer import DEFAULT_SHARD_SIZE, Writer

__all__ = [
    "ConversionReport", "FieldReport", "from_arrays", "from_csv", "from_files", "from_hdf5", "from_iterable",
    "from_npy", "from_npz",
]

DEFAULT_CHUNK_BYTES = 8 << 20
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_MAX_EXAMPLES = 20  # skipped rows/files listed in a report
_FLOAT_TARGETS = ("float16", "bfloat16", "float32", "float64")
_BFLOAT16_MAX = float(bfloat16_bits_to_float32(np.array([0x7F7F], np.uint16))[0])

PathLike = Union[str, "os.PathLike[str]"]
Progress = Union[bool, Callable[[int], None]]


# ---- the report --------------------------------------------------------------------------------


@dataclass
class FieldReport:
    """What converting did to one field. ``max_abs_error``/``max_rel_error`` are measured over the
    finite values when the stored dtype is a float narrower than the source (``measured``);
    ``saturated`` counts values clipped by ``overflow="saturate"``."""

    name: str
    source_dtype: str
    dtype: str
    shape: Tuple[Optional[int], ...]
    measured: bool = False
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    saturated: int = 0


@dataclass
class ConversionReport:
    """Returned by every converter; ``str(report)`` is a readable summary."""

    path: str
    num_samples: int  # samples this conversion wrote
    dataset_samples: int  # samples in the dataset afterwards (more when appending)
    num_shards: int
    source_bytes: int
    dataset_bytes: int
    seconds: float
    fields: Dict[str, FieldReport]
    skipped: int = 0
    skipped_examples: List[str] = _dataclass_field(default_factory=list)
    parts: int = 1

    @property
    def mb_per_s(self) -> float:
        """Source megabytes (1e6 bytes) converted per second."""
        return self.source_bytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")

    def to_json(self) -> Dict[str, Any]:
        doc = asdict(self)
        doc["fields"] = [asdict(f) for f in self.fields.values()]
        doc["mb_per_s"] = self.mb_per_s
        return doc

    def __str__(self) -> str:
        lines = [f"{self.path}: wrote {self.num_samples} samples ({_human(self.source_bytes)} of source data) in "
                 f"{self.seconds:.2f} s, {self.mb_per_s:.1f} MB/s"
                 + (f", {self.parts} parts merged" if self.parts > 1 else "")]
        if self.dataset_samples != self.num_samples:
            lines.append(f"dataset now holds {self.dataset_samples} samples")
        lines.append(f"{self.num_shards} shard(s), {_human(self.dataset_bytes)}")
        for f in self.fields.values():
            shape = ", ".join("*" if d is None else str(d) for d in f.shape)
            line = f"  {f.name}: {f.source_dtype} -> {f.dtype}[{shape}]"
            if f.measured:
                line += f", max abs error {f.max_abs_error:.3g}, max rel error {f.max_rel_error:.3g}"
            if f.saturated:
                line += f", {f.saturated} values saturated"
            lines.append(line)
        if self.skipped:
            lines.append(f"skipped {self.skipped} bad rows/files, e.g.:")
            lines += [f"  {example}" for example in self.skipped_examples[:5]]
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ---- options -----------------------------------------------------------------------------------


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _part_range(total: int, part: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The contiguous slice [start, stop) of ``total`` items that part (k, n) converts."""
    if part is None:
        return 0, total
    k, n = _check_part(part)
    return total * k // n, total * (k + 1) // n


def _check_part(part: Any) -> Tuple[int, int]:
    try:
        k, n = part
    except (TypeError, ValueError):
        raise ValueError(f"part must be a pair (k, n) with 0 <= k < n, got {part!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, n)) or not 0 <= k < n:
        raise ValueError(f"part must be a pair (k, n) with 0 <= k < n, got {part!r}")
    return k, n


def _natural_key(text: str) -> List[Any]:
    return [(0, int(token), "") if token.isdigit() else (1, 0, token) for token in re.split(r"(\d+)", text)]


def _expand(sources: Any, suffixes: Tuple[str, ...], what: str) -> List[str]:
    """Paths, directories (their files with these suffixes) and glob patterns -> a list of files.
    Directory contents and glob matches are sorted naturally (2.csv before 10.csv); the order of
    explicitly listed paths is kept."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: List[str] = []
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            matches = [os.path.join(source, name) for name in os.listdir(source)
                       if name.lower().endswith(suffixes) and os.path.isfile(os.path.join(source, name))]
        elif any(c in source for c in "*?["):
            matches = [m for m in _glob.glob(source) if os.path.isfile(m)]
        else:
            files.append(source)
            continue
        if not matches:
            raise SourceError(f"no {what} files in {source!r}")
        files += sorted(matches, key=_natural_key)
    if not files:
        raise SourceError(f"no {what} files given")
    return files


def _dtype_for(name: str, dtypes: Any, default: str) -> str:
    """The stored dtype of a field: ``dtypes`` is None, one dtype for every float field, or a dict."""
    if isinstance(dtypes, Mapping):
        wanted = dtypes.get(name)
    elif dtypes is not None and default in _FLOAT_TARGETS:
        wanted = dtypes
    else:
        wanted = None
    if wanted is None:
        return default
    return wanted if isinstance(wanted, str) and wanted in STORED_DTYPES else np.dtype(wanted).name


def _check_dtypes_cover(dtypes: Any, names: Iterable[str]) -> None:
    if isinstance(dtypes, Mapping):
        unknown = sorted(set(dtypes) - set(names))
        if unknown:
            raise SchemaError(f"dtypes given for unknown fields {unknown}; the fields are {sorted(names)}")


def _source_dtype_name(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise SchemaError(f"cannot store {dtype} data: shardfeed stores bool, integers and floats")
    return dtype.newbyteorder("=").name if dtype.byteorder not in "=|" else dtype.name


# ---- progress ----------------------------------------------------------------------------------


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_total(self, total: Optional[int]) -> None:
        pass

    def close(self) -> None:
        pass


class _CallbackBar(_NoBar):
    def __init__(self, callback: Callable[[int], None]):
        self.callback = callback

    def update(self, n: int) -> None:
        self.callback(n)


class _TqdmBar(_NoBar):
    """A tqdm bar on stderr, shown only when stderr is a terminal (tqdm's ``disable=None``)."""

    def __init__(self, bar: Any):
        self.bar = bar

    def update(self, n: int) -> None:
        self.bar.update(n)

    def set_total(self, total: Optional[int]) -> None:
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _progress_bar(progress: Progress, total: Optional[int], desc: str, unit: str = "B") -> _NoBar:
    if callable(progress):
        return _CallbackBar(progress)
    if not progress:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a trimmed install converts without a bar
        return _NoBar()
    scaled = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return _TqdmBar(tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, dynamic_ncols=True,
                         leave=False, **scaled))


# ---- the sink: casts, precision, overflow, writer, rollback ------------------------------------


class _Sink:
    """Receives chunks of columns, measures precision loss, applies the overflow policy and writes
    them. On an exception the dataset is rolled back: a new one removed, an appended one restored."""

    def __init__(self, path: PathLike, fields: Mapping[str, Tuple[str, Tuple[Optional[int], ...]]],
                 source_dtypes: Mapping[str, str], *, shard_size: int, metadata: Optional[Mapping[str, Any]],
                 mode: str, overflow: str, progress: Progress, total: Optional[int], desc: str = "converting",
                 unit: str = "B"):
        self.path = os.fspath(path)
        self.overflow = _choice("overflow", overflow, ("error", "saturate"))
        _choice("mode", mode, ("w", "a"))
        self.started = time.perf_counter()
        self._created_dir = not os.path.exists(self.path)
        self._before = set(os.listdir(self.path)) if not self._created_dir else set()
        self._old_manifest = read_manifest(self.path) if mode == "a" else None
        spec: Optional[Dict[str, Any]] = dict(fields)
        if self._old_manifest is not None:  # appending: the dataset's dtypes; names and shapes must match
            existing = self._old_manifest.schema
            wanted = Schema.from_spec(spec)
            if [(f.name, f.shape) for f in wanted.fields.values()] != [(f.name, f.shape) for f in existing.fields.values()]:
                raise SchemaError(f"{self.path}: the source's fields {wanted!r} do not match the dataset's {existing!r}")
            spec = None
        self.writer = Writer(self.path, fields=spec, shard_size=shard_size, metadata=metadata, mode=mode)
        self.fields = dict(self.writer.schema.fields)
        self.first = len(self.writer)
        self.report = ConversionReport(
            path=self.path, num_samples=0, dataset_samples=0, num_shards=0, source_bytes=0, dataset_bytes=0,
            seconds=0.0, fields={name: FieldReport(name, source_dtypes.get(name, f.dtype), f.dtype, f.shape)
                                 for name, f in self.fields.items()})
        self.bar = _progress_bar(progress, total, desc, unit)

    def __enter__(self) -> "_Sink":
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None:
            try:
                self.writer.close()
            except BaseException:
                self._rollback()
                raise
            finally:
                self.bar.close()
            manifest = read_manifest(self.path)
            report = self.report
            report.dataset_samples = manifest.num_samples
            report.num_samples = manifest.num_samples - self.first
            report.num_shards = len(manifest.shards)
            report.dataset_bytes = sum(s.size + s.heap_size for s in manifest.shards)
            report.seconds = time.perf_counter() - self.started
        else:
            self.bar.close()
            self._rollback()

    def skip(self, what: str) -> None:
        self.report.skipped += 1
        if len(self.report.skipped_examples) < _MAX_EXAMPLES:
            self.report.skipped_examples.append(what)

    def put(self, batch: Mapping[str, Any], nbytes: int, locate: Optional[Callable[[int], str]] = None,
            advance: Optional[int] = None) -> None:
        """Writes a chunk: ``batch`` maps every field to its values (a batch array, or a list of
        arrays for a variable-length field); ``locate(row)`` names the source of a row of it;
        ``advance``: what the progress bar advances by (default ``nbytes``)."""
        ready: Dict[str, Any] = {}
        for name, values in batch.items():
            field = self.fields[name]
            ready[name] = values if field.variable else self._prepare(field, np.asarray(values), locate)
        first = len(self.writer)
        try:
            self.writer.extend(ready)
        except ValueRangeError as exc:
            if locate is not None and exc.sample is not None and exc.sample >= first:
                raise _located(ValueRangeError, f"{locate(exc.sample - first)}: {exc}", exc) from None
            raise
        self.report.source_bytes += nbytes
        self.bar.update(nbytes if advance is None else advance)

    def _prepare(self, field: Any, values: np.ndarray, locate: Optional[Callable[[int], str]]) -> np.ndarray:
        """Casts a fixed field's chunk to what the writer stores, measuring the error a narrower float
        introduces and applying the overflow policy; returns values the writer stores exactly."""
        source = values.dtype
        if source.kind not in "biuf":
            raise SchemaError(f"field {field.name!r}: cannot store {source} values as {field.dtype}")
        target = field.dtype
        stats = self.report.fields[field.name]
        if source.kind == "b" or target == "bool" or (source == field.stored_dtype and target != "bfloat16"):
            return values
        if target in _FLOAT_TARGETS:
            return self._to_float(field, values, locate, stats)
        # integer targets: out-of-range values refused (or clipped); the writer refuses non-integers
        info = np.iinfo(field.stored_dtype)
        if source.kind in "iu":
            if not values.size or (info.min <= int(values.min()) and int(values.max()) <= info.max):
                return values
            high, low = values > info.max, values < info.min
        else:
            hi_float = float(info.max) if int(float(info.max)) <= info.max else float(np.nextafter(float(info.max), 0))
            with np.errstate(invalid="ignore"):
                high, low = values > hi_float, values < float(info.min)
            if not (high.any() or low.any()):
                return values
        if self.overflow == "error":
            raise self._overflow_error(field, values, high | low, locate,
                                       f"is out of the range [{info.min}, {info.max}] of {target}; pass "
                                       "overflow='saturate' to clip it to the range")
        stats.saturated += int(high.sum() + low.sum())
        if source.kind in "iu":
            out = values.astype(field.stored_dtype)
            out[high], out[low] = info.max, info.min
            return out
        out = values.copy()
        out[high], out[low] = hi_float, float(info.min)
        return out

    def _to_float(self, field: Any, values: np.ndarray, locate: Optional[Callable[[int], str]],
                  stats: FieldReport) -> np.ndarray:
        """Rounds to a float dtype a block of rows at a time (bounded temporaries): overflow refused or
        saturated, the error measured when the target is narrower. Returns what the writer stores
        exactly (for bfloat16, float32 values that are bfloat16 values)."""
        target = field.dtype
        source = values.dtype
        bfloat16 = target == "bfloat16"
        measure = bfloat16 or not np.can_cast(source, field.stored_dtype, "safe")
        largest = _BFLOAT16_MAX if bfloat16 else float(np.finfo(field.stored_dtype).max)
        decoded = np.empty(values.shape, np.float32 if bfloat16 else field.stored_dtype)
        per_row = max(1, int(np.prod(values.shape[1:], dtype=np.int64)))
        step = max(1, (1 << 18) // per_row)
        for a in range(0, len(values), step):
            block = values[a:a + step]
            with np.errstate(over="ignore", invalid="ignore"):
                if bfloat16:
                    bits = float_to_bfloat16_bits(block)
                    over = (bits & 0x7FFF) == 0x7F80
                else:
                    out = decoded[a:a + step]
                    np.copyto(out, block, casting="unsafe")
                    over = np.isinf(out)
                if source.kind == "f":
                    over &= np.isfinite(block)
            if over.any():
                if self.overflow == "error":
                    raise self._overflow_error(field, block, over, locate, f"overflows {target} (largest finite "
                                               f"value {largest:.6g}); pass overflow='saturate' to store "
                                               f"±{largest:.6g} instead", first_row=a)
                stats.saturated += int(over.sum())
                negative = np.signbit(block[over])
                if bfloat16:
                    bits[over] = np.where(negative, 0xFF7F, 0x7F7F).astype(np.uint16)
                else:
                    out[over] = np.where(negative, -largest, largest)
            if bfloat16:
                decoded[a:a + step] = bfloat16_bits_to_float32(bits)
            if measure:
                abs_error, rel_error = _errors(block, decoded[a:a + step])
                stats.max_abs_error = max(stats.max_abs_error, abs_error)
                stats.max_rel_error = max(stats.max_rel_error, rel_error)
        stats.measured |= measure
        return decoded

    def _overflow_error(self, field: Any, values: np.ndarray, bad: np.ndarray,
                        locate: Optional[Callable[[int], str]], why: str, first_row: int = 0) -> ValueRangeError:
        flat = int(np.flatnonzero(bad.reshape(-1))[0])
        row = first_row + flat // max(1, bad.size // max(1, bad.shape[0]))
        sample = len(self.writer) + row
        where = f"{locate(row)}: " if locate is not None else ""
        error = ValueRangeError(f"{where}field {field.name!r}, sample {sample}: value "
                                f"{values.reshape(-1)[flat].item()!r} {why}")  # values: the block at first_row
        error.field, error.sample = field.name, sample
        return error

    def _rollback(self) -> None:
        """Undoes the conversion: the writer stopped, the manifest restored (or removed when this
        conversion created the dataset), the shard files it added removed."""
        try:
            self.writer.close()
        except BaseException:
            pass
        if self._old_manifest is not None:
            write_manifest(self.path, self._old_manifest)
        else:
            _remove(os.path.join(self.path, MANIFEST_NAME))
        for name in os.listdir(self.path):
            if name not in self._before and re.fullmatch(r"shard-\d+\.(rec|var|crc)", name):
                _remove(os.path.join(self.path, name))
        if self._created_dir:
            try:
                os.rmdir(self.path)
            except OSError:
                pass


def _located(cls: type, message: str, original: Optional[BaseException] = None) -> BaseException:
    error = cls(message)
    if original is not None:
        error.field = getattr(original, "field", None)  # type: ignore[attr-defined]
        error.sample = getattr(original, "sample", None)  # type: ignore[attr-defined]
    return error


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _errors(values: np.ndarray, stored: np.ndarray, block: int = 1 << 16) -> Tuple[float, float]:
    """Largest absolute and relative difference over the values finite on both sides (in blocks, so
    that the float64 temporaries stay small)."""
    source_all, result_all = values.reshape(-1), stored.reshape(-1)
    largest = largest_relative = 0.0
    for start in range(0, source_all.size, block):
        source = source_all[start:start + block].astype(np.float64)
        result = result_all[start:start + block].astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            diff = np.abs(result - source)
        finite = np.isfinite(diff)
        if not finite.all():
            diff, source = diff[finite], source[finite]
        if not diff.size or not diff.max() > 0:
            continue
        largest = max(largest, float(diff.max()))
        magnitude = np.abs(source)
        nonzero = magnitude > 0
        if nonzero.any():
            largest_relative = max(largest_relative, float((diff[nonzero] / magnitude[nonzero]).max()))
    return largest, largest_relative


# ---- column sources: arrays, .npy, .npz, HDF5 ----------------------------------------------------


class _Piece:
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


class _ArrayPiece(_Piece):
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


class _MappedPiece(_Piece):
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


class _StreamPiece(_Piece):
    """An array read sequentially from a compressed ``.npz`` member."""

    def __init__(self, archive: str, member: zipfile.ZipInfo, name: str):
        self.name = name
        self._archive, self._member = archive, member
        self._zip: Optional[zipfile.ZipFile] = None
        self._stream = self._open()
        self.dtype, shape, fortran, _ = _read_npy_header(self._stream, name)
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
            _read_npy_header(self._stream, self.name)
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


def _read_npy_header(f: Any, name: str) -> Tuple[np.dtype, Tuple[int, ...], bool, int]:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise SourceError(f"{name}: not a .npy array ({exc})") from None
    if dtype.hasobject:
        raise SourceError(f"{name}: holds Python objects (pickled); shardfeed converts numeric arrays only")
    return dtype, tuple(shape), bool(fortran), f.tell() if hasattr(f, "tell") else 0


def _npy_piece(path: str) -> _Piece:
    with open(path, "rb") as f:
        dtype, shape, fortran, offset = _read_npy_header(f, path)
    return _MappedPiece(path, offset, dtype, shape, fortran, name=path)


def _npz_pieces(path: str) -> Dict[str, _Piece]:
    """Members of an .npz: stored ones memory-mapped in place, compressed ones streamed."""
    pieces: Dict[str, _Piece] = {}
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
                dtype, shape, fortran, offset = _read_npy_header(raw, name)
                pieces[member] = _MappedPiece(path, offset, dtype, shape, fortran, name=name)
            else:
                pieces[member] = _StreamPiece(path, info, name)
    return pieces


class _Column:
    """One field's rows: pieces (files, members, arrays) concatenated."""

    def __init__(self, field: str, pieces: List[_Piece]):
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


def _convert_columns(path: PathLike, columns: Dict[str, _Column], *, dtypes: Any, part: Optional[Tuple[int, int]],
                     chunk_bytes: int, shard_size: int, metadata: Optional[Mapping[str, Any]], mode: str,
                     overflow: str, progress: Progress, align: int = 1) -> ConversionReport:
    try:
        if not columns:
            raise SchemaError("no fields to convert")
        _check_dtypes_cover(dtypes, columns)
        lengths = {name: len(c) for name, c in columns.items()}
        if len(set(lengths.values())) > 1:
            raise SourceError(f"fields have different numbers of rows: {lengths}")
        total = next(iter(lengths.values()))
        start, stop = _part_range(total, part)
        source_dtypes = {name: _source_dtype_name(c.dtype) for name, c in columns.items()}
        spec = {name: (_dtype_for(name, dtypes, source_dtypes[name]), c.shape) for name, c in columns.items()}
        row_bytes = sum(c.row_bytes for c in columns.values())
        rows = max(1, chunk_bytes // max(1, row_bytes))
        if align > 1 and rows > align:
            rows -= rows % align
        # Chunks end at the source files' boundaries too: a chunk is then a view of one file, not a copy.
        some = next(iter(columns.values()))
        cuts = sorted(set(range(start, stop, rows)) | {s for c in columns.values() for s in c.starts if start < s < stop})
        with _Sink(path, spec, source_dtypes, shard_size=shard_size, metadata=metadata, mode=mode,
                   overflow=overflow, progress=progress, total=(stop - start) * row_bytes) as sink:
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


def _common(shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None, mode: str = "w",
            overflow: str = "error", progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Dict[str, Any]:
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return dict(shard_size=shard_size, metadata=metadata, mode=mode, overflow=overflow, progress=progress,
                chunk_bytes=chunk_bytes)


def from_arrays(path: PathLike, arrays: Any, *, dtypes: Any = None, part: Optional[Tuple[int, int]] = None,
                shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None, mode: str = "w",
                overflow: str = "error", progress: Progress = False,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Writes arrays with a leading sample dimension: ``{"x": x, "y": y}``, a tuple ``(x, y)`` (fields
    ``x`` and ``y``) or one array (field ``x``). Anything with ``dtype``, ``shape`` and slicing works
    (``np.memmap``, h5py, zarr); it is read ``chunk_bytes`` at a time.

    ``dtypes``: the stored dtype per field (``{"x": "float16"}``), or one dtype for every float field;
    by default each field keeps its source dtype. ``overflow``: ``"error"`` (refuse values that do not
    fit) or ``"saturate"``. ``part=(k, n)``: only the k-th of n contiguous slices of the rows.
    ``shard_size``, ``metadata``, ``mode``: as for :class:`shardfeed.Writer`. ``progress``: True for a
    progress bar on a terminal, or a callable receiving byte counts."""
    if isinstance(arrays, Mapping):
        named = dict(arrays)
    elif isinstance(arrays, tuple):
        named = dict(zip(("x", "y") if len(arrays) == 2 else [f"x{i}" for i in range(len(arrays))], arrays))
    else:
        named = {"x": arrays}
    columns = {name: _Column(name, [_ArrayPiece(a, f"field {name!r}")]) for name, a in named.items()}
    return _convert_columns(path, columns, dtypes=dtypes, part=part,
                            **_common(shard_size, metadata, mode, overflow, progress, chunk_bytes))


def _field_files(sources: Any, default: str) -> Dict[str, List[str]]:
    if isinstance(sources, Mapping):
        return {name: _expand(files, (".npy",), ".npy") for name, files in sources.items()}
    return {default: _expand(sources, (".npy",), ".npy")}


def from_npy(path: PathLike, sources: Any, *, dtypes: Any = None, part: Optional[Tuple[int, int]] = None,
             workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None,
             mode: str = "w", overflow: str = "error", progress: Progress = False,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Converts ``.npy`` files, memory-mapped and read in chunks (resident memory stays bounded).

    ``sources``: one file, a list of files or a glob pattern (concatenated along the first axis
    into field ``x``; a structured array gives one field per member), or ``{"image": "img.npy",
    "label": ["l0.npy", "l1.npy"]}``. Other options: see :func:`from_arrays`; ``workers=n`` converts
    with n processes (see the module documentation)."""
    if workers != 1:
        return _parallel(from_npy, path, (sources,), dict(dtypes=dtypes, shard_size=shard_size, metadata=metadata,
                         mode=mode, overflow=overflow, chunk_bytes=chunk_bytes), workers, progress)
    files = _field_files(sources, "x")
    columns: Dict[str, _Column] = {}
    try:
        for name, paths in files.items():
            pieces = [_npy_piece(p) for p in paths]
            names = pieces[0].dtype.names
            if names and not isinstance(sources, Mapping):
                for member in names:
                    columns[member] = _Column(member, [_Member(p, member) for p in pieces])
            else:
                columns[name] = _Column(name, pieces)
    except BaseException:
        for c in columns.values():
            c.close()
        raise
    return _convert_columns(path, columns, dtypes=dtypes, part=part,
                            **_common(shard_size, metadata, mode, overflow, progress, chunk_bytes))


class _Member(_Piece):
    """One member of a structured array's rows."""

    def __init__(self, piece: _Piece, member: str):
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


def from_npz(path: PathLike, sources: Any, *, fields: Any = None, dtypes: Any = None,
             part: Optional[Tuple[int, int]] = None, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
             metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
             progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Converts ``.npz`` archives (several are concatenated member by member). Members stored
    uncompressed (``np.savez``) are memory-mapped in place; compressed ones (``np.savez_compressed``)
    are decompressed as a stream. ``fields``: which members (default: all), as a list of member
    names or ``{"field": "member"}``. Other options: see :func:`from_npy`."""
    if workers != 1:
        return _parallel(from_npz, path, (sources,), dict(fields=fields, dtypes=dtypes, shard_size=shard_size,
                         metadata=metadata, mode=mode, overflow=overflow, chunk_bytes=chunk_bytes), workers, progress)
    archives = _expand(sources, (".npz",), ".npz")
    opened: List[Dict[str, _Piece]] = []
    try:
        for archive in archives:
            opened.append(_npz_pieces(archive))
        members = list(opened[0])
        if fields is None:
            chosen = {m: m for m in members}
        elif isinstance(fields, Mapping):
            chosen = dict(fields)
        else:
            chosen = {m: m for m in ([fields] if isinstance(fields, str) else fields)}
        for archive, pieces in zip(archives, opened):
            missing = [m for m in chosen.values() if m not in pieces]
            if missing:
                raise SourceError(f"{archive}: no member(s) {missing}; it has {sorted(pieces)}")
        columns = {name: _Column(name, [pieces[member] for pieces in opened]) for name, member in chosen.items()}
    except BaseException:
        for pieces in opened:
            for piece in pieces.values():
                piece.close()
        raise
    for pieces in opened:  # members not converted
        for member, piece in pieces.items():
            if member not in chosen.values():
                piece.close()
    return _convert_columns(path, columns, dtypes=dtypes, part=part,
                            **_common(shard_size, metadata, mode, overflow, progress, chunk_bytes))


def from_hdf5(path: PathLike, sources: Any, *, datasets: Any = None, dtypes: Any = None,
              part: Optional[Tuple[int, int]] = None, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
              metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
              progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Converts HDF5 datasets (needs h5py: ``pip install shardfeed[hdf5]``), reading a chunk of rows
    at a time (aligned to the datasets' HDF5 chunks). ``sources``: one or several files (their
    datasets are concatenated). ``datasets``: default every dataset at the top of the file; a list
    of dataset paths (fields named after their last component) or ``{"field": "/group/dataset"}``.
    Other options: see :func:`from_npy`."""
    if workers != 1:
        return _parallel(from_hdf5, path, (sources,), dict(datasets=datasets, dtypes=dtypes, shard_size=shard_size,
                         metadata=metadata, mode=mode, overflow=overflow, chunk_bytes=chunk_bytes), workers, progress)
    try:
        import h5py
    except ImportError:
        raise ImportError("converting HDF5 files needs h5py: pip install 'shardfeed[hdf5]'") from None
    files = _expand(sources, (".h5", ".hdf5", ".he5", ".hdf"), "HDF5")
    handles = []
    try:
        for name in files:
            try:
                handles.append(h5py.File(name, "r"))
            except OSError as exc:
                raise SourceError(f"{name}: cannot open as HDF5 ({exc})") from None
        if datasets is None:
            chosen = {key: key for key, item in handles[0].items() if isinstance(item, h5py.Dataset) and item.ndim}
            if not chosen:
                raise SourceError(f"{files[0]}: no datasets at the top of the file; name them with datasets=")
        elif isinstance(datasets, Mapping):
            chosen = dict(datasets)
        else:
            chosen = {d.rstrip("/").rsplit("/", 1)[-1]: d for d in ([datasets] if isinstance(datasets, str) else datasets)}
        columns = {}
        align = 1
        for field_name, key in chosen.items():
            pieces = []
            for name, handle in zip(files, handles):
                item = handle.get(key)
                if not isinstance(item, h5py.Dataset):
                    raise SourceError(f"{name}: no dataset {key!r}")
                pieces.append(_ArrayPiece(item, f"{name}[{key}]"))
                if item.chunks:
                    align = max(align, item.chunks[0])
            columns[field_name] = _Column(field_name, pieces)
        return _convert_columns(path, columns, dtypes=dtypes, part=part, align=align,
                                **_common(shard_size, metadata, mode, overflow, progress, chunk_bytes))
    finally:
        for handle in handles:
            handle.close()


# ---- any iterable of samples ---------------------------------------------------------------------


def from_iterable(path: PathLike, samples: Iterable[Any], *, fields: Optional[Mapping[str, Any]] = None,
                  dtypes: Any = None, total: Optional[int] = None, shard_size: int = DEFAULT_SHARD_SIZE,
                  metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
                  progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Writes samples from any iterable (a generator, a list, a torch/tf dataset iterated in Python):
    dicts ``{"x": ..., "y": ...}`` or tuples (fields in order: ``fields`` names them; without it,
    a pair is ``x, y`` and longer tuples ``x0, x1, ...``).

    ``fields``: the schema as for :class:`shardfeed.Writer` (needed for variable-length fields and
    for an empty iterable); by default inferred from the first sample (dtype and shape per value,
    Python ints as int64 and floats as float64, then ``dtypes`` applied). ``total``: the number of
    samples, for the progress bar. Samples are gathered into chunks of about ``chunk_bytes``."""
    iterator = iter(samples)
    first = next(iterator, None)
    names: List[str]
    if fields is not None:
        declared = Schema.from_spec(fields)
        names = list(declared.fields)
        _check_dtypes_cover(dtypes, names)
        spec = {n: (_dtype_for(n, dtypes, f.dtype), f.shape) for n, f in declared.fields.items()}
        source_dtypes: Dict[str, str] = {}
    elif first is None:
        raise SchemaError("the iterable is empty and no fields were given: cannot infer the schema")
    else:
        names = _sample_names(first)
        values = _sample_values(first, names, 0)
        _check_dtypes_cover(dtypes, names)
        source_dtypes = {n: _source_dtype_name(np.asarray(v).dtype) for n, v in values.items()}
        spec = {n: (_dtype_for(n, dtypes, source_dtypes[n]), np.shape(values[n])) for n, v in values.items()}
    schema = Schema.from_spec(spec)
    fixed_bytes = schema.record_bytes
    common = _common(shard_size, metadata, mode, overflow, progress, chunk_bytes)
    with _Sink(path, spec, source_dtypes, shard_size=common["shard_size"], metadata=metadata, mode=mode,
               overflow=overflow, progress=progress, total=total, unit="samples") as sink:
        pending: Dict[str, List[Any]] = {n: [] for n in names}
        pending_bytes = 0
        number = 0
        flush_at = max(1, chunk_bytes)

        def flush() -> None:
            nonlocal pending_bytes
            if not pending[names[0]]:
                return
            count = len(pending[names[0]])
            batch = {}
            for n in names:
                f = schema.fields[n]
                if f.variable:
                    batch[n] = pending[n]
                else:
                    try:
                        batch[n] = np.stack([np.asarray(v) for v in pending[n]])
                    except ValueError:
                        shapes = {np.shape(v) for v in pending[n]}
                        raise SchemaError(f"field {n!r}: samples {number - count}..{number - 1} have different "
                                          f"shapes {sorted(shapes)}; declare a variable-length field with "
                                          "fields=") from None
            first_number = number - count
            sink.put(batch, pending_bytes, locate=lambda row: f"sample {first_number + row} of the iterable",
                     advance=count)
            for n in names:
                pending[n].clear()
            pending_bytes = 0

        for sample in itertools.chain([] if first is None else [first], iterator):
            values = _sample_values(sample, names, number)
            for n in names:
                pending[n].append(values[n])
            number += 1
            pending_bytes += fixed_bytes + sum(np.asarray(values[f.name]).nbytes for f in schema.variable_fields)
            if pending_bytes >= flush_at:
                flush()
        flush()
    return sink.report


def _sample_names(sample: Any) -> List[str]:
    if isinstance(sample, Mapping):
        return list(sample)
    if isinstance(sample, (tuple, list)):
        return ["x", "y"] if len(sample) == 2 else [f"x{i}" for i in range(len(sample))]
    return ["x"]


def _sample_values(sample: Any, names: List[str], number: int) -> Dict[str, Any]:
    if isinstance(sample, Mapping):
        if set(sample) != set(names):
            raise SchemaError(f"sample {number} has fields {sorted(sample)}, expected {sorted(names)}")
        return {n: sample[n] for n in names}
    if isinstance(sample, (tuple, list)):
        if len(sample) != len(names):
            raise SchemaError(f"sample {number} has {len(sample)} values, expected {len(names)} ({names})")
        return dict(zip(names, sample))
    if len(names) != 1:
        raise SchemaError(f"sample {number} is a single value, expected {len(names)} ({names})")
    return {names[0]: sample}


# ---- a directory of per-sample files -------------------------------------------------------------


def _read_listing(listing: Any, what: str) -> List[str]:
    """A list of names, or a text file of them: one per line, blank lines and '#' comments skipped."""
    if isinstance(listing, (str, os.PathLike)):
        with open(listing, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    names = [os.fspath(n) for n in listing]
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be file names")
    return names


def _read_labels(labels: Any) -> Dict[str, Any]:
    """file -> label from a mapping, a CSV/TSV file (file,label; a first row naming the columns, e.g.
    'file,label', is skipped) or a JSON file ({"file": label} or [[file, label], ...] or
    [{"file": ..., "label": ...}, ...])."""
    if isinstance(labels, Mapping):
        return {os.fspath(k): v for k, v in labels.items()}
    name = os.fspath(labels)
    if name.lower().endswith(".json"):
        with open(name, encoding="utf-8") as f:
            doc = json.load(f)
        if isinstance(doc, dict):
            return dict(doc)
        if isinstance(doc, list):
            out = {}
            for item in doc:
                if isinstance(item, dict) and "file" in item and "label" in item:
                    out[item["file"]] = item["label"]
                elif isinstance(item, (list, tuple)) and len(item) == 2:
                    out[item[0]] = item[1]
                else:
                    raise SourceError(f"{name}: expected [file, label] pairs or {{'file', 'label'}} objects, got {item!r}")
            return out
        raise SourceError(f"{name}: expected a JSON object or list, got {type(doc).__name__}")
    delimiter = "\t" if name.lower().endswith(".tsv") else ","
    out = {}
    with open(name, newline="", encoding="utf-8-sig") as f:
        for number, row in enumerate(csv.reader(f, delimiter=delimiter), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise SourceError(f"{name}, line {number}: expected 2 columns (file, label), got {len(row)}")
            if number == 1 and row[0].strip().lower() in ("file", "filename", "file_name", "path", "name", "image"):
                continue
            out[row[0].strip()] = row[1].strip()
    return out


def _label_codes(values: List[Any], classes: Optional[Sequence[str]], where: str) -> Tuple[Dict[Any, int], Optional[List[str]]]:
    """Label values -> int64 codes: integers (or integer strings) as they are, names -> class index
    (``classes`` or the sorted names). Returns the code of each distinct value and the class names."""
    distinct = set(values)
    if classes is None:
        as_ints = {}
        for value in distinct:
            try:
                as_ints[value] = int(value) if not isinstance(value, float) or value.is_integer() else None
            except (TypeError, ValueError):
                as_ints = None
                break
            if as_ints[value] is None or isinstance(value, bool):
                as_ints = None
                break
        if as_ints is not None:
            return as_ints, None
        classes = sorted(str(v) for v in distinct)
    classes = [str(c) for c in classes]
    index = {name: i for i, name in enumerate(classes)}
    codes = {}
    for value in distinct:
        if str(value) not in index:
            raise SourceError(f"{where}: label {value!r} is not one of the classes {classes[:20]}")
        codes[value] = index[str(value)]
    return codes, classes


def _image_mode(first_mode: str) -> str:
    return {"P": "RGB", "PA": "RGBA", "1": "L", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}.get(
        first_mode, first_mode)


class _FileLoader:
    def __init__(self, kind: str, image_mode: Optional[str], size: Optional[Tuple[int, int]], layout: str):
        self.kind, self.image_mode, self.size, self.layout = kind, image_mode, size, layout

    def __call__(self, full: str) -> Any:
        """The sample array, or the exception that loading raised (returned, not raised)."""
        try:
            if self.kind == "npy":
                return np.load(full, allow_pickle=False)
            from PIL import Image
            with Image.open(full) as image:
                if self.image_mode is None:
                    self.image_mode = _image_mode(image.mode)
                if image.mode != self.image_mode:
                    image = image.convert(self.image_mode)
                if self.size is not None and image.size != self.size:
                    image = image.resize(self.size, Image.BILINEAR)
                array = np.asarray(image)
            if array.ndim == 2:
                array = array[:, :, None]
            return np.ascontiguousarray(np.moveaxis(array, -1, 0)) if self.layout == "chw" else array
        except Exception as exc:  # any decoder error is a bad file, reported with its name
            return exc


def from_files(path: PathLike, root: PathLike, *, files: Any = None, splits: Optional[Mapping[str, Any]] = None,
               labels: Any = None, classes: Optional[Sequence[str]] = None, field: Optional[str] = None,
               label_field: str = "label", image_mode: Optional[str] = None, size: Optional[Tuple[int, int]] = None,
               layout: str = "hwc", dtypes: Any = None, on_error: str = "raise", threads: Optional[int] = None,
               part: Optional[Tuple[int, int]] = None, workers: int = 1, shard_size: int = DEFAULT_SHARD_SIZE,
               metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
               progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Converts a directory holding one file per sample: ``.npy`` arrays, or images (PNG, JPEG, BMP,
    GIF, TIFF, WebP; needs Pillow: ``pip install shardfeed[images]``). Every sample must have the
    same shape (``size=(width, height)`` resizes images).

    The index -- which files, in which order -- is ``files``: a text file with one name per line
    (relative to ``root``; e.g. ``train.txt``), or a list; by default the names in a ``labels``
    listing, else every supported file under ``root`` (sorted naturally). ``splits={"train":
    "train.txt", "val": "val.txt"}`` writes several lists into one dataset, one after the other,
    and records each split's ``[start, stop)`` in ``metadata["splits"]``; converting each list
    with ``files=`` into its own dataset is the other way.

    ``labels``: ``"folders"`` (the first sub-folder of each file names its class; the classes are
    all sub-folders of ``root``, sorted, so every split agrees), a CSV file (``file,label`` rows) or
    JSON file (``{"file": label}``) or a dict. Integer labels are stored as they are; names become
    class indexes (``classes``, default sorted names) stored in ``metadata["classes"]``. The label
    field (``label_field``) is int64.

    Images: ``image_mode`` (a Pillow mode such as ``"RGB"`` or ``"L"``; default the first image's,
    palette images as RGB), ``layout`` ``"hwc"`` (height, width, channels) or ``"chw"``; the field
    (``field``, default ``"image"``, ``"x"`` for ``.npy``) stores the pixels' dtype (uint8). Files
    are decoded on ``threads`` threads (default: up to 8). ``on_error="skip"`` skips files that
    cannot be read, have another shape, or lack a label, and counts them in the report. Other
    options: see :func:`from_npy`."""
    _choice("on_error", on_error, ("raise", "skip"))
    _choice("layout", layout, ("hwc", "chw"))
    root = os.fspath(root)
    if size is not None:
        size = (int(size[0]), int(size[1]))
    label_map = None if labels in (None, "folders") else _read_labels(labels)
    if splits is not None:
        if files is not None:
            raise ValueError("pass files= or splits=, not both")
        groups = [(name, _read_listing(listing, f"split {name!r}")) for name, listing in splits.items()]
    elif files is not None:
        groups = [(None, _read_listing(files, "files"))]
    elif label_map is not None:
        groups = [(None, list(label_map))]
    else:
        found = []
        for directory, subdirs, names in os.walk(root):
            subdirs[:] = [d for d in subdirs if not d.startswith(".")]
            for name in names:
                if name.lower().endswith(IMAGE_SUFFIXES + (".npy",)):
                    found.append(os.path.relpath(os.path.join(directory, name), root))
        groups = [(None, sorted(found, key=_natural_key))]
    names = [name for _, group in groups for name in group]
    split_ranges = {}
    start = 0
    for split, group in groups:
        if split is not None:
            split_ranges[split] = [start, start + len(group)]
        start += len(group)
    if not names:
        raise SourceError(f"no files to convert under {root!r}")
    kinds = {"npy" if n.lower().endswith(".npy") else "image" if n.lower().endswith(IMAGE_SUFFIXES) else n
             for n in names}
    if len(kinds) > 1 or kinds - {"npy", "image"}:
        odd = sorted(kinds - {"npy", "image"})[:5]
        raise SourceError(f"{root}: files must all be .npy or all images ({', '.join(IMAGE_SUFFIXES)}); "
                          f"got {odd or 'both'}")
    kind = kinds.pop()
    if kind == "image":
        try:
            import PIL  # noqa: F401
        except ImportError:
            raise ImportError("converting images needs Pillow: pip install 'shardfeed[images]'") from None

    # labels: the same codes and classes whatever part of the index is converted
    label_codes: Optional[Dict[Any, int]] = None
    class_names: Optional[List[str]] = None
    if labels == "folders":
        if classes is None:
            classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
        class_names = [str(c) for c in classes]
        label_codes = {name: i for i, name in enumerate(class_names)}
    elif label_map is not None:
        label_codes, class_names = _label_codes(list(label_map.values()), classes, os.fspath(labels) if not isinstance(labels, Mapping) else "labels")

    def label_of(name: str) -> Any:
        if labels == "folders":
            parts = name.replace("\\", "/").split("/")
            if len(parts) < 2:
                raise SourceError(f"{os.path.join(root, name)}: not inside a class sub-folder of {root}")
            if parts[0] not in label_codes:
                raise SourceError(f"{os.path.join(root, name)}: folder {parts[0]!r} is not one of the classes {class_names[:20]}")
            return label_codes[parts[0]]
        if name not in label_map:
            raise SourceError(f"{os.path.join(root, name)}: no label for it in {labels if not isinstance(labels, Mapping) else 'labels'}")
        return label_codes[label_map[name]]

    if workers != 1:
        return _parallel(from_files, path, (root,), dict(
            files=names if splits is None else None, splits=splits, labels=labels, classes=classes, field=field,
            label_field=label_field, image_mode=image_mode, size=size, layout=layout, dtypes=dtypes, on_error=on_error,
            threads=threads, shard_size=shard_size, metadata=metadata, mode=mode, overflow=overflow,
            chunk_bytes=chunk_bytes), workers, progress, total=len(names), unit="files")

    # the schema, from the first readable file of the whole index (so that every part agrees)
    loader = _FileLoader(kind, image_mode, size, layout)
    probe = None
    for name in names:
        probe = loader(os.path.join(root, name))
        if not isinstance(probe, Exception):
            break
        if on_error == "raise":
            raise SourceError(f"{os.path.join(root, name)}: cannot read ({probe})") from probe
    if probe is None or isinstance(probe, Exception):
        raise SourceError(f"none of the {len(names)} files under {root!r} could be read")
    field = field or ("x" if kind == "npy" else "image")
    if labels is not None and label_field == field:
        raise SchemaError(f"the label field and the data field are both named {field!r}")
    source_dtype = _source_dtype_name(probe.dtype)
    spec: Dict[str, Any] = {field: (_dtype_for(field, dtypes, source_dtype), probe.shape)}
    source_dtypes = {field: source_dtype}
    if labels is not None:
        spec[label_field] = (_dtype_for(label_field, dtypes, "int64"), ())
        source_dtypes[label_field] = "int64"
    _check_dtypes_cover(dtypes, spec)
    meta = dict(metadata or {})
    if class_names is not None:
        meta.setdefault("classes", class_names)
    if split_ranges:
        meta.setdefault("splits", split_ranges)
    if kind == "image":
        meta.setdefault("image", {"mode": loader.image_mode, "layout": layout})

    lo, hi = _part_range(len(names), part)
    sample_bytes = probe.nbytes
    per_chunk = max(1, chunk_bytes // max(1, sample_bytes))
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="shardfeed-decode") as pool, \
            _Sink(path, spec, source_dtypes, shard_size=shard_size, metadata=meta, mode=mode, overflow=overflow,
                  progress=progress, total=hi - lo, unit="files") as sink:
        for a in range(lo, hi, per_chunk):
            chunk = names[a:min(hi, a + per_chunk)]
            fulls = [os.path.join(root, n) for n in chunk]
            arrays, kept, label_values, nbytes = [], [], [], 0
            for name, full, array in zip(chunk, fulls, pool.map(loader, fulls)):
                problem = None
                if isinstance(array, Exception):
                    problem = f"cannot read ({array})"
                elif array.shape != probe.shape:
                    hint = "; pass size=(width, height) to resize" if kind == "image" else ""
                    problem = f"has shape {array.shape}, the first sample {probe.shape}{hint}"
                label = None
                if problem is None and labels is not None:
                    try:
                        label = label_of(name)
                    except SourceError as exc:
                        if on_error == "raise":
                            raise
                        sink.skip(str(exc))
                        continue
                if problem is not None:
                    if on_error == "raise":
                        raise SourceError(f"{full}: {problem}")
                    sink.skip(f"{full}: {problem}")
                    continue
                arrays.append(array)
                kept.append(full)
                label_values.append(label)
                nbytes += os.path.getsize(full)
            if arrays:
                batch = {field: np.stack(arrays)}
                if labels is not None:
                    batch[label_field] = np.array(label_values, dtype=np.int64)
                sink.put(batch, nbytes, locate=lambda row, kept=kept: kept[row], advance=len(chunk))
            else:
                sink.bar.update(len(chunk))
    return sink.report


# ---- CSV -------------------------------------------------------------------------------------------

_CSV_SUFFIXES = (".csv", ".tsv", ".txt", ".csv.gz", ".tsv.gz", ".csv.bz2", ".csv.xz")
_OPENERS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # imported when used (bz2, lzma are optional in CPython)


def _compressed(name: str) -> Optional[Callable[..., Any]]:
    module = _OPENERS.get(os.path.splitext(name)[1].lower())
    return importlib.import_module(module).open if module else None


def _parse_kind(dtype: str) -> str:
    """How a column of a field of this dtype is parsed: as float64, int64 or uint64."""
    if dtype in _FLOAT_TARGETS:
        return "f8"
    return "u8" if dtype == "uint64" else "i8"


class _CsvLayout:
    """Columns of the CSV files and which of them go to which field."""

    def __init__(self, columns: List[str], fields: Any, label: Any, label_field: str, dtypes: Any,
                 string_labels: bool):
        self.columns = columns
        self.label_field = label_field if label is not None else None
        label_index = self.resolve(label, label_field)[0][0] if label is not None else None
        if fields is None:
            wanted = {"x": [c for i, c in enumerate(columns) if i != label_index]}
            if not wanted["x"]:
                raise SchemaError("no feature columns: the only column is the label")
        elif isinstance(fields, Mapping):
            wanted = dict(fields)
        else:
            raise TypeError(f"fields must be a dict of field -> column(s), got {type(fields).__name__}")
        self.fields: Dict[str, Tuple[List[int], bool]] = {name: self.resolve(spec, name) for name, spec in wanted.items()}
        if label is not None:
            if label_field in self.fields:
                raise SchemaError(f"field {label_field!r} is both a feature field and the label field")
            self.fields[label_field] = ([label_index], False)
        _check_dtypes_cover(dtypes, self.fields)
        self.dtypes = {name: _dtype_for(name, dtypes, "int64" if name == self.label_field else "float32")
                       for name in self.fields}
        self.string_label = label_index if string_labels else None
        self.numeric = sorted({i for name, (indices, _) in self.fields.items() for i in indices
                               if not (string_labels and name == self.label_field)})
        kinds = {}
        for name, (indices, _) in self.fields.items():
            if string_labels and name == self.label_field:
                continue
            for i in indices:
                kind = _parse_kind(self.dtypes[name])
                if kinds.setdefault(i, kind) != kind:
                    raise SchemaError(f"column {columns[i]!r} goes to fields of different kinds")
        self.kinds = [kinds[i] for i in self.numeric]
        self.position = {column: k for k, column in enumerate(self.numeric)}

    def resolve(self, spec: Any, name: str) -> Tuple[List[int], bool]:
        """A column name or index (scalar field), a list of them or a glob pattern (vector field)."""
        import fnmatch

        def one(item: Any) -> int:
            if isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < len(self.columns):
                    raise SchemaError(f"field {name!r}: column index {item} out of range (0..{len(self.columns) - 1})")
                return item
            if item in self.columns:
                return self.columns.index(item)
            raise SchemaError(f"field {name!r}: no column {item!r}; the columns are {self.columns[:50]}")

        if isinstance(spec, str) and any(c in spec for c in "*?[") and spec not in self.columns:
            matches = [i for i, c in enumerate(self.columns) if fnmatch.fnmatchcase(c, spec)]
            if not matches:
                raise SchemaError(f"field {name!r}: no column matches {spec!r}")
            return matches, True
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise SchemaError(f"field {name!r}: no columns")
            return [one(item) for item in spec], True
        return [one(spec)], False

    def spec(self) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
        return {name: (self.dtypes[name], (len(indices),) if vector else ())
                for name, (indices, vector) in self.fields.items()}


def _csv_header(name: str, delimiter: str, header: bool) -> Tuple[Optional[List[str]], int]:
    """The column names (or None for an empty file) and the byte offset where the data starts."""
    opener = _compressed(name)
    with (opener(name, "rb") if opener else open(name, "rb")) as f:
        first = f.readline()
        while first and not first.strip():
            first = f.readline()
        if not first:
            return None, 0
        offset = f.tell() if opener is None else 0
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{name}: the first line is not UTF-8 ({exc})") from None
    row = next(csv.reader([text], delimiter=delimiter))
    if header:
        return [c.strip() for c in row], offset
    return [str(i) for i in range(len(row))], 0


def _count_lines(name: str, stop: int) -> int:
    count = 0
    with open(name, "rb") as f:
        left = stop
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


class _CsvChunks:
    """Reads the lines of one file's byte range [start, stop): lines starting in it belong to it."""

    def __init__(self, name: str, start: int, stop: Optional[int], data_start: int, header_lines: int):
        self.name, self.stop = name, stop
        opener = _compressed(name)
        self.file = opener(name, "rb") if opener else open(name, "rb")
        self.position = 0
        self.line = 1
        if opener is not None or start <= data_start:
            if header_lines:
                skipped = 0
                while skipped < header_lines:  # the header line (blank lines before it too)
                    raw = self.file.readline()
                    if not raw:
                        break
                    self.line += 1
                    self.position += len(raw)
                    skipped += bool(raw.strip())
        else:
            self.file.seek(start - 1)
            self.position = start - 1
            if self.file.read(1) != b"\n":
                self.position += 1 + len(self.file.readline())  # the rest of a line that began before
            else:
                self.position += 1
            self.line = 1 + _count_lines(name, self.position)
            self.file.seek(self.position)

    def next(self, hint: int) -> Tuple[List[bytes], int]:
        """The next lines (about ``hint`` bytes) and the line number of the first."""
        if self.stop is not None and self.position >= self.stop:
            return [], self.line
        lines = self.file.readlines(hint)
        if self.stop is not None:
            end = self.position + sum(map(len, lines))
            if end > self.stop:
                kept, at = 0, self.position
                for raw in lines:
                    if at >= self.stop:
                        break
                    at += len(raw)
                    kept += 1
                lines = lines[:kept]
        first = self.line
        self.line += len(lines)
        self.position += sum(map(len, lines))
        return lines, first

    def close(self) -> None:
        self.file.close()


def from_csv(path: PathLike, sources: Any, *, fields: Optional[Mapping[str, Any]] = None, label: Any = None,
             label_field: str = "label", classes: Any = None, dtypes: Any = None, delimiter: Optional[str] = None,
             header: bool = True, on_error: str = "raise", part: Optional[Tuple[int, int]] = None, workers: int = 1,
             shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None, mode: str = "w",
             overflow: str = "error", progress: Progress = False,
             chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> ConversionReport:
    """Converts one or many CSV files (``data/*.csv``, a directory, a list; ``.gz``/``.bz2``/``.xz``
    are decompressed), parsing about ``chunk_bytes`` of text at a time with numpy's C parser.

    Every file starts with the same header row (``header=False``: none, columns are then numbered
    from 0). ``fields`` maps each field to its columns: a column name (a scalar field), a list of
    names or a glob pattern such as ``"pixel*"`` (a vector field, columns in file order). By default
    every column but the label goes into one vector field ``x``. ``label``: a column stored as the
    int64 field ``label_field``; its values must be integers unless ``classes`` is given -- a list of
    class names (a name's index is stored) or ``"auto"`` (the sorted names found in a first pass
    over the files); the names go to ``metadata["classes"]``. ``dtypes``: stored dtype per field
    (default float32 for features, int64 for the label), or one dtype for every float field.
    ``delimiter``: default tab for ``.tsv`` files, else comma.

    A row with a value that does not parse as its field's type, or with another number of columns
    than the header, raises :class:`SourceError` naming the file and line; ``on_error="skip"``
    skips such rows and counts them in the report. Blank lines are ignored. Other options: see
    :func:`from_npy`; ``part`` and ``workers`` split the files' bytes into contiguous line ranges."""
    _choice("on_error", on_error, ("raise", "skip"))
    files = _expand(sources, _CSV_SUFFIXES, "CSV")
    if delimiter is None:
        delimiter = "\t" if files[0].lower().endswith((".tsv", ".tsv.gz")) else ","
    if len(delimiter) != 1 or delimiter in "\"\r\n":
        raise ValueError(f"delimiter must be one character (not a quote or newline), got {delimiter!r}")
    headers = []
    columns: Optional[List[str]] = None
    first_file = None
    for name in files:
        found, offset = _csv_header(name, delimiter, header)
        headers.append((found, offset))
        if found is not None:
            if columns is None:
                columns, first_file = found, name
            elif header and found != columns:
                raise SourceError(f"{name}: header {found[:20]} differs from the header of {first_file} {columns[:20]}")
            elif not header and len(found) != len(columns):
                raise SourceError(f"{name}, line 1: {len(found)} columns, {first_file} has {len(columns)}")
    if columns is None:
        if fields is None or any(isinstance(s, str) and any(c in s for c in "*?[") for s in fields.values()):
            raise SourceError("every CSV file is empty: name the fields' columns (a list per field) to write an "
                              "empty dataset")
        columns = sorted({str(c) for s in fields.values() for c in (s if isinstance(s, (list, tuple)) else [s])}
                         | ({str(label)} if label is not None else set()))
    string_labels = label is not None and classes is not None
    layout = _CsvLayout(columns, fields, label, label_field, dtypes, string_labels)
    if isinstance(classes, str):
        if classes != "auto":
            raise ValueError(f"classes must be a list of names or 'auto', got {classes!r}")
        classes = _scan_labels(files, layout.string_label, delimiter, header, headers)
    class_index = {str(c): i for i, c in enumerate(classes)} if string_labels else None
    meta = dict(metadata or {})
    if string_labels:
        meta.setdefault("classes", [str(c) for c in classes])

    sizes = [os.path.getsize(name) for name in files]
    if workers != 1:
        return _parallel(from_csv, path, (files,), dict(
            fields=fields, label=label, label_field=label_field, classes=classes, dtypes=dtypes, delimiter=delimiter,
            header=header, on_error=on_error, shard_size=shard_size, metadata=metadata, mode=mode, overflow=overflow,
            chunk_bytes=chunk_bytes), workers, progress, total=sum(sizes))

    # the byte ranges of this part: files' data regions laid end to end
    regions = [(name, (offset if found is not None else size), size) for name, (found, offset), size
               in zip(files, headers, sizes)]
    total = sum(size - start for _, start, size in regions)
    lo, hi = _part_range(total, part) if part is not None else (0, total)
    pieces = []
    at = 0
    for name, start, size in regions:
        length = size - start
        if _compressed(name):
            if lo <= at < hi or (part is None and length):
                pieces.append((name, start, None))
        else:
            a, b = max(lo, at), min(hi, at + length)
            if a < b:
                pieces.append((name, start + a - at, start + b - at))
        at += length
    data_starts = {name: (offset if found is not None else 0) for name, (found, offset) in zip(files, headers)}

    parser = _CsvParser(layout, delimiter, class_index, on_error)
    with _Sink(path, layout.spec(), {n: ("str" if string_labels and n == layout.label_field else
                                         {"f8": "float64", "i8": "int64", "u8": "uint64"}[_parse_kind(layout.dtypes[n])])
                                     for n in layout.fields},
               shard_size=shard_size, metadata=meta, mode=mode, overflow=overflow, progress=progress,
               total=sum((b if b is not None else os.path.getsize(n)) - a for n, a, b in pieces)) as sink:
        for name, start, stop in pieces:
            found = headers[files.index(name)][0]
            reader = _CsvChunks(name, start, stop, data_starts[name], 1 if header and found is not None else 0)
            try:
                while True:
                    raw, first_line = reader.next(chunk_bytes)
                    if not raw:
                        break
                    nbytes = sum(map(len, raw))
                    batch, lines = parser.parse(name, raw, first_line, sink)
                    if batch is not None:
                        sink.put(batch, nbytes, locate=lambda row, lines=lines, name=name: f"{name}, line {lines[row]}")
                    else:
                        sink.bar.update(nbytes)
                        sink.report.source_bytes += nbytes
            finally:
                reader.close()
    return sink.report


def _scan_labels(files: List[str], index: int, delimiter: str, header: bool, headers: List[Any]) -> List[str]:
    names = set()
    for name, (found, _) in zip(files, headers):
        if found is None:
            continue
        opener = _compressed(name)
        with (opener(name, "rt", encoding="utf-8-sig", newline="") if opener else
              open(name, encoding="utf-8-sig", newline="")) as f:
            rows = csv.reader(f, delimiter=delimiter)
            if header:
                next(rows, None)
            for row in rows:
                if len(row) > index:
                    names.add(row[index].strip())
    names.discard("")
    return sorted(names)


_BLANK_INNER_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class _CsvParser:
    """Lines -> arrays per field: numpy's loadtxt for clean chunks, a row-by-row parse that finds
    (and raises or skips) the bad rows otherwise."""

    def __init__(self, layout: _CsvLayout, delimiter: str, class_index: Optional[Dict[str, int]], on_error: str):
        self.layout, self.delimiter, self.class_index, self.on_error = layout, delimiter, class_index, on_error
        self.expected = len(layout.columns) - 1  # delimiters per line
        kinds = set(layout.kinds)
        self.dtype = (np.dtype(kinds.pop()) if len(kinds) == 1 else
                      np.dtype([(f"c{i}", kind) for i, kind in zip(layout.numeric, layout.kinds)]))
        # Every column parsed: loadtxt itself then refuses rows with another number of columns.
        self.every_column = layout.numeric == list(range(len(layout.columns)))

    def parse(self, name: str, raw: List[bytes], first_line: int, sink: _Sink) -> Tuple[Optional[Dict[str, np.ndarray]], Sequence[int]]:
        """A chunk of lines -> (the fields' arrays or None, the line number of each row)."""
        try:
            joined = b"".join(raw).decode("utf-8")
        except UnicodeDecodeError:
            pieces = []
            for k, line in enumerate(raw):
                try:
                    pieces.append(line.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    self._bad(sink, f"{name}, line {first_line + k}: not UTF-8 ({exc.reason})")
                    pieces.append("\n")  # skipped like a blank line
            joined = "".join(pieces)
        if first_line == 1 and joined.startswith("\ufeff"):
            joined = joined[1:]
        body = joined[:-1] if joined.endswith("\n") else joined
        text = body.split("\n")  # the lines as readlines() cut them
        numbers: Sequence[int] = range(first_line, first_line + len(text))
        if not text[0].strip() or not text[-1].strip() or _BLANK_INNER_LINE.search(body):
            keep = [k for k, line in enumerate(text) if line.strip()]
            text, numbers = [text[k] for k in keep], [numbers[k] for k in keep]
        if not text:
            return None, []
        batch = self._fast(text) if '"' not in body else None
        if batch is None:
            batch, numbers = self._slow(name, text, numbers, sink)
        return batch, numbers

    def _assemble(self, table: np.ndarray, labels: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        batch = {}
        structured = self.dtype.names is not None
        for field, (indices, vector) in self.layout.fields.items():
            if labels is not None and field == self.layout.label_field:
                batch[field] = labels
                continue
            if structured:
                columns = [table[f"c{i}"] for i in indices]
                batch[field] = np.stack(columns, axis=1) if vector else columns[0]
            else:
                positions = [self.layout.position[i] for i in indices]
                batch[field] = table[:, positions] if vector else table[:, positions[0]]
        return batch

    def _fast(self, text: List[str]) -> Optional[Dict[str, np.ndarray]]:
        labels = None
        if self.layout.string_label is not None:
            index = self.layout.string_label
            try:
                labels = np.fromiter((self.class_index[line.split(self.delimiter)[index].strip()] for line in text),
                                     np.int64, len(text))
            except KeyError:
                return None
        if not self.every_column and not all(line.count(self.delimiter) == self.expected for line in text):
            return None
        if not self.layout.numeric:
            return self._assemble(np.empty((len(text), 0)), labels)
        try:
            table = np.loadtxt(text, delimiter=self.delimiter, usecols=None if self.every_column else self.layout.numeric,
                               dtype=self.dtype, ndmin=1 if self.dtype.names else 2, comments=None, encoding=None)
        except ValueError:
            return None
        if not self.dtype.names and table.shape[1] != len(self.layout.numeric):
            return None  # every row has another number of columns than the header
        return self._assemble(table, labels)

    def _slow(self, name: str, text: List[str], numbers: Sequence[int], sink: _Sink) -> Tuple[Optional[Dict[str, np.ndarray]], List[int]]:
        parsers = {"f8": float, "i8": int, "u8": int}
        columns = self.layout.columns
        rows, labels, kept = [], [], []
        for line_number, row in zip(numbers, csv.reader(text, delimiter=self.delimiter)):
            problem = None
            if len(row) != len(columns):
                problem = f"{len(row)} columns, the header has {len(columns)}"
            else:
                values = []
                for i, kind in zip(self.layout.numeric, self.layout.kinds):
                    cell = row[i]
                    try:
                        value = parsers[kind](cell)
                        if kind != "f8" and not (-(1 << 63) <= value < (1 << 64 if kind == "u8" else 1 << 63)) \
                                or (kind == "u8" and value < 0):
                            raise ValueError
                    except ValueError:
                        what = {"f8": "a number", "i8": "an integer", "u8": "an unsigned integer"}[kind]
                        problem = f"column {columns[i]!r}: {cell!r} is not {what}"
                        break
                    values.append(value)
                if problem is None and self.layout.string_label is not None:
                    cell = row[self.layout.string_label].strip()
                    if cell not in self.class_index:
                        problem = (f"column {columns[self.layout.string_label]!r}: label {cell!r} is not one of "
                                   f"the classes {list(self.class_index)[:20]}")
                    else:
                        labels.append(self.class_index[cell])
            if problem is not None:
                self._bad(sink, f"{name}, line {line_number}: {problem}")
                continue
            rows.append(tuple(values))
            kept.append(line_number)
        if not rows:
            return None, []
        if self.dtype.names:
            table = np.array(rows, dtype=self.dtype)
        else:
            table = np.array(rows, dtype=self.dtype).reshape(len(rows), len(self.layout.numeric))
        return self._assemble(table, np.array(labels, np.int64) if self.layout.string_label is not None else None), kept

    def _bad(self, sink: _Sink, problem: str) -> None:
        if self.on_error == "raise":
            raise SourceError(problem + " (on_error='skip' skips such rows)")
        sink.skip(problem)


# ---- parallel conversion: parts in processes, then a merge -------------------------------------

_progress_queue: Any = None


def _worker_init(queue: Any) -> None:
    global _progress_queue
    _progress_queue = queue


class _QueueProgress:
    """Sends a worker's progress to the parent, at most every 0.2 s."""

    def __init__(self) -> None:
        self.pending, self.last = 0, time.monotonic()

    def __call__(self, n: int) -> None:
        self.pending += n
        now = time.monotonic()
        if now - self.last >= 0.2:
            self.flush()
            self.last = now

    def flush(self) -> None:
        if self.pending and _progress_queue is not None:
            _progress_queue.put(self.pending)
        self.pending = 0


def _worker_convert(name: str, path: str, args: tuple, kwargs: Dict[str, Any]) -> ConversionReport:
    progress = _QueueProgress()
    try:
        return globals()[name](path, *args, progress=progress, **kwargs)
    finally:
        progress.flush()


def _parallel(func: Callable[..., ConversionReport], path: PathLike, args: tuple, kwargs: Dict[str, Any],
              workers: Any, progress: Progress, total: Optional[int] = None, unit: str = "B") -> ConversionReport:
    """Runs ``func`` in ``workers`` processes, part k of n each into a part directory next to
    ``path``, then merges the parts into ``path`` (moving their shard files: nothing is copied)."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    from .merge import merge

    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if kwargs.get("mode", "w") != "w":
        raise ValueError("workers > 1 writes a new dataset: mode must be 'w' (merge parts into a new dataset instead)")
    target = os.fspath(path)
    if os.path.exists(os.path.join(target, MANIFEST_NAME)):
        raise FileExistsError(f"a dataset already exists at {target}")
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix=".shardfeed-parts-", dir=parent)
    started = time.perf_counter()
    bar = _progress_bar(progress, total, "converting", unit)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    parts = [os.path.join(root, f"part-{k:05d}") for k in range(workers)]

    def drain() -> None:
        while True:
            try:
                bar.update(queue.get_nowait())
            except Exception:  # queue.Empty
                return

    try:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=(queue,)) as pool:
            futures = [pool.submit(_worker_convert, func.__name__, parts[k], args, dict(kwargs, part=(k, workers)))
                       for k in range(workers)]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                drain()
                failed = [f for f in done if f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    raise failed[0].exception()
            drain()
        reports = [f.result() for f in futures]
        result = merge(parts, target, move=True)
    finally:
        bar.close()
        queue.close()
        queue.join_thread()
        shutil.rmtree(root, ignore_errors=True)
    fields = {}
    for name, first in reports[0].fields.items():
        stats = [r.fields[name] for r in reports]
        fields[name] = FieldReport(name, first.source_dtype, first.dtype, first.shape,
                                   measured=any(s.measured for s in stats),
                                   max_abs_error=max(s.max_abs_error for s in stats),
                                   max_rel_error=max(s.max_rel_error for s in stats),
                                   saturated=sum(s.saturated for s in stats))
    manifest = read_manifest(target)
    return ConversionReport(
        path=target, num_samples=result.num_samples, dataset_samples=result.num_samples, num_shards=result.num_shards,
        source_bytes=sum(r.source_bytes for r in reports),
        dataset_bytes=sum(s.size + s.heap_size for s in manifest.shards), seconds=time.perf_counter() - started,
        fields=fields, skipped=sum(r.skipped for r in reports),
        skipped_examples=[e for r in reports for e in r.skipped_examples][:_MAX_EXAMPLES], parts=workers)
