"""The read path of :meth:`shardfeed.Dataset.read`: from a read's arguments to its arrays.

A :class:`BatchReader` belongs to one open dataset (``dataset.py`` opens the files, checks the
manifest and owns the handle; this module only reads). A read checks its indices and fields,
plans each field (output dtype and native conversion from ``read_options``, the output array,
scale/offset), makes one native call for the fixed-size parts of every field
(``ShardSet.read_records``), converts with numpy what the kernels do not, and then reads each
variable-length field's rows from the heap files (``ShardSet.read_heap``), checking them first
against their CRC32C where the dataset was opened with ``verify=True``.
"""

from __future__ import annotations

import math
from collections import abc
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .errors import CodecUnavailableError, OutputSizeError, ShardFormatError
from .format import HEADER_BYTES, Field, Schema
from .read_options import (
    CAST_COPY, INTEGER_DTYPES, STORED_KINDS, affine_layout, cast_values, conversion, exact, inexact_error, option_for,
    output_dtype, per_field, side,
)

_MAX_OUTPUT_BYTES = 1 << 62  # more than numpy's sizes (intp) and BatchMemory can describe
_INT64 = np.dtype(np.int64)
# A new output array of at least this many bytes is made in reusable memory (see _empty).
BATCH_MEMORY_MIN_BYTES = 1 << 20


def check_threads(threads: Any) -> Optional[int]:
    """An explicit thread count, or None for the automatic choice ("auto" or None)."""
    if threads is None or (isinstance(threads, str) and threads == "auto"):
        return None
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 1 <= threads <= _core.BUILD_INFO["max_threads"]:
        raise ValueError(f"threads must be 'auto' or an int in [1, {_core.BUILD_INFO['max_threads']}], got {threads!r}")
    return int(threads)


def as_name_list(fields: Union[None, str, Sequence[str]], schema_fields: Mapping[str, Field]) -> List[str]:
    """The names of the fields a read asks for (all of them for None), each known and listed once."""
    if fields is None:
        return list(schema_fields)
    names = [fields] if isinstance(fields, str) else list(fields)
    for name in names:
        if name not in schema_fields:
            raise KeyError(f"no field {name!r}; the dataset has {list(schema_fields)}")
    if len(set(names)) != len(names):
        raise ValueError(f"fields listed twice in {names}")
    return names


def check_out(name: str, array: Any, shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A caller's ``out`` array for field ``name``, refused unless it is exactly what the read makes."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"out[{name!r}] must be a numpy array, got {type(array).__name__}")
    problems = []
    if array.dtype != dtype:
        problems.append(f"dtype {array.dtype} (expected {dtype})")
    if array.shape != shape:
        problems.append(f"shape {array.shape} (expected {shape})")
    if not array.flags.c_contiguous:
        problems.append("not C-contiguous")
    if not array.flags.writeable:
        problems.append("not writable")
    if not array.flags.aligned:
        problems.append("not aligned")
    if problems:
        raise ValueError(f"out[{name!r}]: {', '.join(problems)}")
    return array


def _check_disjoint(out: Mapping[str, np.ndarray]) -> None:
    arrays = list(out.items())
    for i, (a_name, a) in enumerate(arrays):
        for b_name, b in arrays[i + 1:]:
            if np.may_share_memory(a, b):
                raise ValueError(f"out[{a_name!r}] and out[{b_name!r}] share memory")


def _empty(shape: Tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A new output array; one of at least ``BATCH_MEMORY_MIN_BYTES`` views a
    :class:`_core.BatchMemory` block, mapped once and reused after numpy frees the array."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < BATCH_MEMORY_MIN_BYTES:
        return np.empty(shape, dtype)
    return np.frombuffer(_core.BatchMemory(nbytes), dtype, nbytes // dtype.itemsize).reshape(shape)


class _VariableRead(NamedTuple):
    """A variable-length field: its descriptors (read with the records), then its rows."""
    field: Field
    descriptors: np.ndarray
    out_dtype: np.dtype
    cast: Optional[int]
    params: Optional["_core.Affine"]
    affine: bool


class _CompressedRead(NamedTuple):
    """A compressed field: its descriptors (read with the records), then its frames, decoded and
    converted by ``cast`` into ``target``."""
    field: Field
    descriptors: np.ndarray
    cast: int
    target: np.ndarray
    params: Optional["_core.Affine"]
    out_dtype: np.dtype
    affine: bool


class BatchReader:
    """Reads batches of samples from one open dataset's :class:`_core.ShardSet`. ``starts``: the
    first sample of each shard (and the total last); ``heap_sizes``/``heap_paths``: each shard's
    heap file; ``row_checksums``: with ``verify=True`` and variable-length fields, each sample's
    CRC32C of its rows, checked before they are read; ``dictionaries``: each compressed field with
    trained dictionaries, its ``_core.FieldDictionaries`` (or why the library cannot use them)."""

    def __init__(self, shards: "_core.ShardSet", schema: Schema, starts: np.ndarray, heap_sizes: np.ndarray,
                 heap_paths: List[str], use_map: bool, row_checksums: Optional[np.ndarray],
                 dictionaries: Optional[Mapping[str, Any]] = None):
        self._shards = shards
        self._schema = schema
        self._fields: Dict[str, Field] = dict(schema.fields)
        self._starts = starts
        self._count = int(starts[-1])
        self._heap_sizes = heap_sizes
        self._heap_paths = heap_paths
        self._use_map = use_map
        self._row_checksums = row_checksums
        self._dictionaries = dict(dictionaries or {})
        # Per field, what read() needs on every call: (natural dtype, cast kernel, variable,
        # row shape, elements per row, offset and bytes in the record), so that a read does not
        # recompute Field properties.
        self._layout = {name: (f.natural_dtype, STORED_KINDS[f.dtype], f.variable, f.row_shape, f.count, f.offset,
                               f.record_bytes) for name, f in self._fields.items()}
        # (field, dtype option, affine) -> (output dtype, conversion id or None): see _conversion.
        self._conversions: Dict[Tuple[str, Any, bool], Tuple[np.dtype, Optional[int]]] = {}

    def indices(self, indices: Any) -> np.ndarray:
        """``indices`` as a C-contiguous int64 array, negative ones counted from the end (those
        still out of range keep their value, for the native IndexError's message)."""
        count = self._count
        if type(indices) is np.ndarray and indices.dtype == _INT64 and indices.ndim == 1:
            # The common case, checked with less Python work: int64 indices need no conversion
            # and only negative ones need wrapping (out-of-range ones are refused natively).
            array = indices if indices.flags.c_contiguous else np.ascontiguousarray(indices)
            if _core.any_negative(array):
                array = np.where(array < 0, array + count, array)
                array[array < 0] -= count
            return array
        array = np.asarray(indices)
        if array.ndim != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {array.shape}")
        if array.dtype.kind not in "iu" and not (array.size == 0 and array.dtype.kind == "f"):
            raise TypeError(f"indices must be integers, got {array.dtype}")
        if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
            raise IndexError(f"index {int(array.max())} is out of range for a dataset of {count} samples")
        array = np.ascontiguousarray(array, dtype=np.int64)
        if array.size and array.min() < 0:
            array = np.where(array < 0, array + count, array)
            array[array < 0] -= count  # keep the original value in the IndexError message
        return array

    def read(self, indices: Any, fields: Union[None, str, Sequence[str]], dtype: Any,
             out: Optional[Mapping[str, np.ndarray]], scale: Any, offset: Any, maxlen: Union[None, int, Mapping[str, int]],
             pad_value: Any, padding: Union[str, Mapping[str, str]], truncating: Union[str, Mapping[str, str]],
             lossy: Union[bool, Mapping[str, bool]], threads: Union[None, str, int],
             default_threads: int) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray], int]:
        """:meth:`shardfeed.Dataset.read`, whose docstring says what each option does, with the
        thread count that ``threads=None`` means; positional, as it is on every read's path (small
        batches take microseconds). Returns the arrays by field name in the order asked for, each
        variable-length field's row counts, and how many records were not in the page cache."""
        names = as_name_list(fields, self._fields)
        index_array = self.indices(indices)
        out = {} if out is None else out
        unknown = [k for k in out if k not in names]
        if unknown:
            raise KeyError(f"out has arrays for fields not being read: {unknown}")
        chosen = check_threads(threads)
        thread_count = default_threads if chosen is None else chosen
        record_reads, variable, compressed, converted_later, results, checked = self._plan(
            names, len(index_array), dtype, out, scale, offset)
        if variable or compressed:  # the heap reads use the indices again: a private copy, like the native reads'
            index_array = index_array.copy()

        # The fixed-size part of every field in one native call, then what numpy converts.
        inexact = [False] * len(record_reads) if checked else None
        uncached = self._shards.read_records(index_array, [read[0] for read in record_reads], self._use_map,
                                             thread_count, inexact)
        if checked and any(inexact):
            for (_, name, out_dtype, affine), flagged in zip(record_reads, inexact):
                if flagged and not option_for(lossy, name):
                    raise self._inexact(self._fields[name], index_array, out_dtype, affine, thread_count)
        # Then the heap: checked first with verify=True; the compressed fields decoded natively.
        if variable or compressed:
            heap_descriptors = {name: read.out for read, name, out_dtype, _ in record_reads if out_dtype is None}
            if self._row_checksums is not None:
                self._check_rows(index_array, heap_descriptors, thread_count)
        for one in compressed:
            if self._read_compressed(one, index_array, thread_count) and not option_for(lossy, one.field.name):
                raise self._inexact(one.field, index_array, one.out_dtype, one.affine, thread_count)
        for name, (values, out_dtype, target) in converted_later.items():
            converted = cast_values(self._fields[name], values, out_dtype, index_array, bool(option_for(lossy, name)))
            if target is None:
                target = converted
            else:
                target[...] = converted
            results[name] = target

        # Then each variable-length field's rows.
        lengths: Dict[str, np.ndarray] = {}
        if variable:
            for one in variable:
                name = one.field.name
                results[name], lengths[name] = self._read_variable(
                    one, index_array, out.get(name), option_for(maxlen, name),
                    pad_value.get(name, 0) if isinstance(pad_value, abc.Mapping) else pad_value, thread_count,
                    side(padding, name, "padding"), side(truncating, name, "truncating"),
                    bool(option_for(lossy, name)))
        return {name: results[name] for name in names}, lengths, uncached

    def _conversion(self, field: Field, dtype: Any, affine: bool) -> Tuple[np.dtype, Optional[int]]:
        """The output dtype and the conversion id (None: numpy converts a copy) of a field read with
        this dtype option, cached per dataset (computed once per option, not on every read)."""
        key = (field.name, dtype, affine)
        try:
            return self._conversions[key]
        except KeyError:
            pass
        except TypeError:  # an unhashable option: not cached
            key = None
        out_dtype = output_dtype(field, dtype, affine)
        found = out_dtype, conversion(field, out_dtype, affine)
        if key is not None:
            self._conversions[key] = found
        return found

    def _plan(self, names: List[str], n: int, dtype: Any, out: Mapping[str, np.ndarray], scale: Any,
              offset: Any) -> Tuple[List[Tuple["_core.FieldRead", str, Optional[np.dtype], bool]], List[_VariableRead],
                                    List[_CompressedRead], Dict[str, Tuple[np.ndarray, np.dtype, Optional[np.ndarray]]],
                                    Dict[str, np.ndarray], bool]:
        """What a read does, field by field, before the native call (the caller's ``out`` arrays
        checked): (1) each field's part of the record read: (FieldRead, field name, output dtype, or
        None for the descriptors of a variable-length or compressed field, affine), sorted by offset
        in the record; (2) the variable-length fields; (3) the compressed fields; (4) the fields
        numpy converts: name -> (the stored values' array, output dtype, out array or None); (5) the
        output arrays of the fixed-size fields the kernels fill; (6) whether a kernel may flag an
        inexact integer (integer sources only). Plain tuples and lists: a read makes them on every
        call."""
        record_reads: List[Tuple["_core.FieldRead", str, Optional[np.dtype], bool]] = []
        variable: List[_VariableRead] = []
        compressed: List[_CompressedRead] = []
        converted_later: Dict[str, Tuple[np.ndarray, np.dtype, Optional[np.ndarray]]] = {}
        results: Dict[str, np.ndarray] = {}
        checked = False
        several = len(names) > 1
        dtype_per_field = isinstance(dtype, abc.Mapping)
        for name in names:
            field = self._fields[name]
            field_scale = per_field(scale, name, several, "scale") if scale is not None else None
            field_offset = per_field(offset, name, several, "offset") if offset is not None else None
            affine = field_scale is not None or field_offset is not None
            natural, stored_cast, variable_field, row_shape, count, at, nbytes = self._layout[name]
            out_dtype, cast = self._conversion(field, dtype.get(name) if dtype_per_field else dtype, affine)
            params = affine_layout(field, field_scale, field_offset) if affine else None
            if variable_field:
                descriptors = np.empty((n, 2), dtype=np.uint64)
                record_reads.append((_core.FieldRead(CAST_COPY, at, nbytes, 2, descriptors), name, None, False))
                variable.append(_VariableRead(field, descriptors, out_dtype, cast, params, affine))
                continue
            shape = (n,) + row_shape
            target = check_out(name, out[name], shape, out_dtype) if name in out else None
            if cast is None:  # numpy converts the values read as they are stored
                converted_later[name] = (_empty(shape, natural), out_dtype, target)
                cast, target = conversion(field, natural, False), converted_later[name][0]  # bfloat16: to float32
            elif target is None:
                target = _empty(shape, out_dtype)
            results[name] = target
            if field.codec is not None:  # the record holds a descriptor of the sample's frame
                descriptors = np.empty((n, 2), dtype=np.uint64)
                record_reads.append((_core.FieldRead(CAST_COPY, at, nbytes, 2, descriptors), name, None, False))
                compressed.append(_CompressedRead(field, descriptors, cast, target, params, out_dtype, affine))
                continue
            record_reads.append((_core.FieldRead(cast, at, nbytes, count, target, params), name, out_dtype, affine))
            checked = checked or (cast != CAST_COPY and field.dtype in INTEGER_DTYPES)
        if len(out) > 1:
            _check_disjoint(out)
        if (variable or compressed) and self._row_checksums is not None:  # the heap check needs every heap field's
            asked = {one.field.name for one in variable} | {one.field.name for one in compressed}
            for field in self._schema.heap_fields:
                if field.name not in asked:
                    at, nbytes = self._layout[field.name][5:]
                    descriptors = np.empty((n, 2), dtype=np.uint64)
                    record_reads.append((_core.FieldRead(CAST_COPY, at, nbytes, 2, descriptors), field.name, None,
                                         False))
        if len(record_reads) > 1:
            record_reads.sort(key=lambda read: (read[0].src_offset, read[0].src_bytes))  # a zero-size field first
        return record_reads, variable, compressed, converted_later, results, checked

    def _inexact(self, field: Field, indices: np.ndarray, out_dtype: np.dtype, affine: bool, threads: int,
                 maxlen: Optional[int] = None, truncating: str = "post") -> Exception:
        """The error for a native conversion that flagged an inexact integer: the field is read
        again as stored to find the first such sample (error path only)."""
        check = np.dtype(np.float32) if affine else out_dtype
        values = self.read(indices, field.name, None, None, None, None, maxlen, 0, "post", truncating, False, threads,
                           threads)[0][field.name]
        bad = ~exact(values, check)
        if not bad.any():  # cannot happen while the kernels and exact() agree
            return ValueError(f"field {field.name!r}: a value did not convert exactly to {out_dtype}")
        return inexact_error(field, values, bad, indices, out_dtype, check)

    def _heap_rows(self, field: Field, indices: np.ndarray, shard: np.ndarray,
                   descriptors: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """The (offset, rows) of each sample's rows of a variable field, or (offset, bytes) of its
        frame of a compressed one, from its record descriptors; ShardFormatError where they leave
        the heap file."""
        offsets = descriptors[:, 0]
        rows = descriptors[:, 1]
        row_bytes = field.heap_unit_bytes
        heap_end = self._heap_sizes[shard].astype(np.uint64)
        with np.errstate(over="ignore"):
            bad = (offsets < HEADER_BYTES) | (offsets > heap_end) | (rows > (heap_end - offsets) // max(row_bytes, 1))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ShardFormatError(f"{self._heap_paths[shard[r]]}: sample {indices[r]} of field {field.name!r} "
                                   f"points at {rows[r]} {'bytes' if field.compressed else 'rows'} at byte {offsets[r]}, outside the "
                                   f"{heap_end[r]}-byte heap file (corrupt record)")
        return offsets, rows

    def _check_rows(self, indices: np.ndarray, descriptors: Mapping[str, np.ndarray], threads: int) -> None:
        """verify=True: checks the heap bytes of every sample read (the rows of all variable fields
        and the frames of all compressed ones, as the checksum covers them together) against their
        stored CRC32C."""
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        fields = self._schema.heap_fields
        spans = np.empty((len(indices), len(fields), 2), dtype=np.int64)
        for j, field in enumerate(fields):
            offsets, rows = self._heap_rows(field, indices, shard, descriptors[field.name])
            spans[:, j, 0] = offsets
            spans[:, j, 1] = rows * np.uint64(field.heap_unit_bytes)
        self._shards.check_heap(indices, shard.astype(np.int64), spans, self._row_checksums[indices], threads)

    def _read_compressed(self, one: _CompressedRead, indices: np.ndarray, threads: int) -> bool:
        """Decodes a compressed field's frames into its output on the native threads; returns
        whether an integer value did not convert exactly."""
        field = one.field
        dictionaries = self._dictionaries.get(field.name)
        if isinstance(dictionaries, str):
            raise CodecUnavailableError(f"field {field.name!r} is compressed with {field.codec} and trained "
                                        f"dictionaries, but {dictionaries}")
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        offsets, lengths = self._heap_rows(field, indices, shard, one.descriptors)
        return self._shards.read_compressed(field.name, field.codec, indices, shard.astype(np.int64),
                                            offsets.astype(np.int64), lengths.astype(np.int64), one.cast,
                                            field.count, field.raw_bytes, one.target, one.params, threads,
                                            dictionaries)

    def _read_variable(self, variable: _VariableRead, indices: np.ndarray, out_array: Optional[np.ndarray],
                       maxlen: Optional[int], pad_value: Any, threads: int, padding: str, truncating: str,
                       lossy: bool) -> Tuple[np.ndarray, np.ndarray]:
        """One variable-length field's rows, padded or truncated to the batch's row count, and each
        sample's rows in the output."""
        field, descriptors, out_dtype, cast = variable.field, variable.descriptors, variable.out_dtype, variable.cast
        n = len(indices)
        shard = np.searchsorted(self._starts, indices, side="right") - 1
        offsets, rows = self._heap_rows(field, indices, shard, descriptors)
        row_bytes = field.count * field.stored_dtype.itemsize
        if out_array is not None:
            if out_array.ndim < 2:
                raise ValueError(f"out[{field.name!r}] must have shape (batch, maxlen, ...)")
            maxlen = out_array.shape[1] if maxlen is None else maxlen
        max_rows = _max_rows(field, rows, maxlen)
        shape = (n, max_rows) + field.row_shape
        nbytes = math.prod(shape) * out_dtype.itemsize
        if nbytes >= _MAX_OUTPUT_BYTES:
            raise OutputSizeError(f"field {field.name!r}: a batch of {n} samples padded to maxlen={max_rows} rows "
                                  f"of {field.row_shape} would take {nbytes} bytes, more than the {_MAX_OUTPUT_BYTES} "
                                  "bytes an output array may take", field=field.name, nbytes=nbytes,
                                  limit=_MAX_OUTPUT_BYTES)
        target = check_out(field.name, out_array, shape, out_dtype) if out_array is not None else None
        pad = _pad_scalar(field, pad_value, out_dtype)
        clipped = np.minimum(rows, np.uint64(max_rows)).astype(np.int64)
        starts = offsets.astype(np.int64)
        if truncating == "pre":  # keep the last rows: skip the first ones
            starts += (rows.astype(np.int64) - clipped) * row_bytes
        read_as = out_dtype if cast is not None else field.natural_dtype
        read_cast = cast if cast is not None else conversion(field, read_as, False)  # bfloat16: to float32
        landing = target if cast is not None and target is not None else _empty(shape, read_as)
        pad_bytes = pad.tobytes() if cast is not None else np.zeros((), read_as).tobytes()
        inexact = self._shards.read_heap(indices, shard.astype(np.int64), starts, clipped, read_cast,
                                         field.count, row_bytes, landing, max_rows, pad_bytes, variable.params,
                                         threads, padding == "pre")
        if inexact and not lossy:
            raise self._inexact(field, indices, out_dtype, variable.affine, threads, maxlen=max_rows,
                                truncating=truncating)
        if cast is not None:
            return landing, clipped
        converted = cast_values(field, landing, out_dtype, indices, lossy)  # padding: zeros, exact in any dtype
        rows_at = np.arange(max_rows)
        in_pad = rows_at >= clipped[:, None] if padding == "post" else rows_at < (max_rows - clipped)[:, None]
        converted[in_pad] = pad
        if target is None:
            return converted, clipped
        target[...] = converted
        return target, clipped


def _max_rows(field: Field, rows: np.ndarray, maxlen: Any) -> int:
    """The rows of a variable field's output: ``maxlen``, or the longest sample's when None."""
    if maxlen is None:
        return int(rows.max()) if len(rows) else 0
    if isinstance(maxlen, bool) or not isinstance(maxlen, (int, np.integer)) or maxlen < 0:
        raise ValueError(f"maxlen for field {field.name!r} must be an int >= 0, got {maxlen!r}")
    return int(maxlen)


def _pad_scalar(field: Field, pad_value: Any, out_dtype: np.dtype) -> np.ndarray:
    """``pad_value`` as a scalar of the output dtype, refused where it does not fit."""
    try:
        pad = np.array(pad_value, dtype=out_dtype)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ValueError(f"pad_value {pad_value!r} does not fit field {field.name!r} read as {out_dtype}: {exc}") from None
    if pad.ndim:
        raise ValueError(f"pad_value for field {field.name!r} must be a scalar")
    return pad
