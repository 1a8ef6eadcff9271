"""The converters' sink: chunks of columns -> the Writer, under one overflow policy (that of
:mod:`shardfeed._casting`), with the precision loss measured, progress shown, and the dataset
rolled back when the conversion fails."""

from __future__ import annotations

import errno
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np

from .._casting import FLOAT_DTYPES, OVERFLOW_POLICIES, bfloat16_bits_to_float32, cast_to_stored
from ..errors import SchemaError, ValueRangeError
from ..format import LOCK_NAME, MANIFEST_NAME, Field, Schema, is_data_file_name
from ..manifest import read_manifest, write_manifest
from ..writer import Writer
from . import _precision
from ._options import PathLike, Progress, choice
from ._progress import progress_bar
from ._report import MAX_EXAMPLES, ConversionReport, FieldReport


class Sink:
    """Receives chunks of columns, measures precision loss, applies the overflow policy and writes
    them. On an exception the dataset is rolled back: a new one removed, an appended one restored."""

    def __init__(self, path: PathLike, fields: Mapping[str, Tuple[str, Tuple[Optional[int], ...]]],
                 source_dtypes: Mapping[str, str], *, shard_size: int, metadata: Optional[Mapping[str, Any]],
                 mode: str, overflow: str, progress: Progress, total: Optional[int], desc: str = "converting",
                 unit: str = "B", compression: Any = None):
        self.path = os.fspath(path)
        self.overflow = choice("overflow", overflow, OVERFLOW_POLICIES)
        choice("mode", mode, ("w", "a"))
        if mode == "w":
            refuse_foreign_directory(self.path)
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
        self.writer = Writer(self.path, fields=spec, shard_size=shard_size, metadata=metadata, mode=mode,
                             compression=compression)
        self.fields = dict(self.writer.schema.fields)
        self.first = len(self.writer)
        self.report = ConversionReport(
            path=self.path, num_samples=0, dataset_samples=0, num_shards=0, source_bytes=0, dataset_bytes=0,
            seconds=0.0, fields={name: FieldReport(name, source_dtypes.get(name, f.dtype), f.dtype, f.shape)
                                 for name, f in self.fields.items()})
        self.bar = progress_bar(progress, total, desc, unit)

    def __enter__(self) -> "Sink":
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
        if len(self.report.skipped_examples) < MAX_EXAMPLES:
            self.report.skipped_examples.append(what)

    def put(self, batch: Mapping[str, Any], nbytes: int, locate: Optional[Callable[[int], str]] = None,
            advance: Optional[int] = None) -> None:
        """Writes a chunk: ``batch`` maps every field to its values (a batch array, or a list of
        arrays for a variable-length field); ``locate(row)`` names the source of a row of it;
        ``advance``: what the progress bar advances by (default ``nbytes``)."""
        first = len(self.writer)
        try:
            ready: Dict[str, Any] = {}
            for name, values in batch.items():
                field = self.fields[name]
                ready[name] = values if field.variable else self._prepare(field, np.asarray(values))
            self.writer.extend(ready)
        except ValueRangeError as exc:
            if locate is not None and exc.sample is not None and exc.sample >= first:
                raise _located(ValueRangeError, f"{locate(exc.sample - first)}: {exc}", exc) from None
            raise
        self.report.source_bytes += nbytes
        self.bar.update(nbytes if advance is None else advance)

    def _prepare(self, field: Field, values: np.ndarray) -> np.ndarray:
        """A fixed field's chunk cast under the conversion's overflow policy (:mod:`shardfeed._casting`,
        the writer's policy), the error of a narrower float measured; returns values the writer
        stores exactly (for bfloat16, float32 values that are bfloat16 values)."""
        source, target = values.dtype, field.dtype
        if source.kind == "b" or target == "bool" or (source == field.stored_dtype and target != "bfloat16"):
            return values  # stored as they are (bool: the writer's check)
        stats = self.report.fields[field.name]
        measure = target in FLOAT_DTYPES and (target == "bfloat16" or not np.can_cast(source, field.stored_dtype, "safe"))
        watch = (lambda block, stored: _precision.measure(block, stored, target, stats)) if measure else None
        stored, saturated = cast_to_stored(values, field, len(self.writer), overflow=self.overflow, suggest=True,
                                           watch=watch)
        stats.saturated += saturated
        stats.measured |= measure
        return bfloat16_bits_to_float32(stored) if target == "bfloat16" else stored

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
            if name not in self._before and is_data_file_name(name):
                _remove(os.path.join(self.path, name))
        if self._created_dir:
            try:
                os.rmdir(self.path)
            except OSError:
                pass


def refuse_foreign_directory(path: str) -> None:
    """A new dataset goes into a new or empty directory, or over the leftovers of a writer that
    was killed (shard files, a lock, a temporary manifest) -- never among other files, such as
    the images being converted: raises ``FileExistsError`` naming the directory."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, "the output is a file, not a directory", path)
        return
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return  # the Writer says that a dataset exists there, and how to append
    foreign = sorted(name for name in os.listdir(path)  # a killed writer's leftovers are not foreign
                     if not (name.startswith((".", MANIFEST_NAME)) or name == LOCK_NAME
                             or is_data_file_name(name)))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(errno.EEXIST, f"the output directory is not empty ({shown}) and holds no "
                              "dataset: give a new or empty directory", path)


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


# ---- column sources: arrays, .npy, .npz, HDF5 ----------------------------------------------------
