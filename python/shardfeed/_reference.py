"""A slow, obviously correct reader: the test oracle for :meth:`shardfeed.Dataset.read`.

Pure Python and numpy, independent of the compiled core: the manifest is parsed (and validated) by
:func:`shardfeed.manifest.read_manifest`, each record is fetched with one ``os.pread``, and values are
converted with ``numpy.astype`` and the float32 formula ``x * float32(scale) + float32(offset)``.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import os

import numpy as np

from .format import HEADER_BYTES
from .manifest import read_manifest


def _sanitizer_runtime_loaded() -> bool:
    """Whether AddressSanitizer's or ThreadSanitizer's runtime is in this process (they refuse
    RTLD_DEEPBIND: a sanitizer build's test run preloads them)."""
    try:
        with open("/proc/self/maps") as maps:
            return any("libasan" in line or "libtsan" in line for line in maps)
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def _zstd_dlopen_mode() -> int:
    """As the core loads zstd (ext/codec.c): its own symbols first, not another zstd's that
    TensorFlow put in the process's global scope."""
    deep = getattr(os, "RTLD_DEEPBIND", 0)
    return os.RTLD_LOCAL | (deep if deep and not _sanitizer_runtime_loaded() else 0)


def _decompress(codec, frame, raw_bytes, dictionary=None):
    """One frame decoded by zstd's one-shot functions through ctypes (not the core's loader), with
    ``dictionary`` (its bytes) where given."""
    assert codec == "zstd", codec
    lib = ctypes.CDLL(os.environ.get("SHARDFEED_ZSTD_LIBRARY") or "libzstd.so.1", mode=_zstd_dlopen_mode())
    lib.ZSTD_decompress.restype = ctypes.c_size_t
    lib.ZSTD_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
    out = ctypes.create_string_buffer(max(raw_bytes, 1))
    data = bytes(frame)
    if dictionary is None:
        got = lib.ZSTD_decompress(out, raw_bytes, data, len(data))
    else:
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_decompress_usingDict.restype = ctypes.c_size_t
        lib.ZSTD_decompress_usingDict.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                                  ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        dctx = lib.ZSTD_createDCtx()
        try:
            got = lib.ZSTD_decompress_usingDict(dctx, out, raw_bytes, data, len(data), dictionary, len(dictionary))
        finally:
            lib.ZSTD_freeDCtx(dctx)
    if lib.ZSTD_isError(got) or got != raw_bytes:
        raise ValueError(f"a {codec} frame does not decode to {raw_bytes} bytes")
    return out.raw[:raw_bytes]


def _pread(path, size, offset):
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise OSError(f"{path}: short read of {len(data)} of {size} bytes at {offset}")
    return data


def _option(option, name):
    return option.get(name) if isinstance(option, dict) else option


_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _dtype(want):
    if isinstance(want, str) and want == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(want)


def _convert(field, raw, want, scale, offset):
    """Stored values -> the dtype a read returns, with the optional affine transform: numpy's
    astype of the stored values (bfloat16 ones as float32), or of the float32 result of the
    transform; bfloat16 outputs by ml_dtypes. (Values are converted as with lossy=True.)"""
    affine = scale is not None or offset is not None
    if isinstance(want, str) and want == "auto":  # floats as float32, integers and bool as stored
        want = np.float32 if field.dtype in _FLOATS else None
    if field.dtype == "bfloat16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    natural = raw.astype(field.natural_dtype)
    want = None if want is None else _dtype(want)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf, inf * 0, like the C core
        if not affine:
            return natural if want is None else natural.astype(want)
        x = raw.astype(np.float32)
        s = np.asarray(1.0 if scale is None else scale, dtype=np.float32)
        o = np.asarray(0.0 if offset is None else offset, dtype=np.float32)
        x = (x * s + o).astype(np.float32)
        return x if want is None else x.astype(want)


def reference_read(path, indices, fields=None, dtype=None, scale=None, offset=None, maxlen=None,
                   pad_value=0, padding="post", truncating="post"):
    """Returns ``(values, lengths)``: dicts of field name -> batch array and, for variable-length
    fields, -> int64 row counts, with the semantics of ``Dataset.read``."""
    manifest = read_manifest(os.fspath(path))
    schema = manifest.schema
    names = list(schema.fields) if fields is None else [fields] if isinstance(fields, str) else list(fields)
    starts = [0]
    for shard in manifest.shards:
        starts.append(starts[-1] + shard.num_samples)
    total = starts[-1]
    samples = []  # (shard entry, record bytes) per requested index
    for i in np.asarray(indices, dtype=np.int64).reshape(-1).tolist():
        j = i + total if i < 0 else i
        if not 0 <= j < total:
            raise IndexError(f"index {i} is out of range for a dataset of {total} samples")
        s = bisect.bisect_right(starts, j) - 1
        shard = manifest.shards[s]
        record = _pread(os.path.join(path, shard.file), schema.record_bytes,
                        HEADER_BYTES + (j - starts[s]) * schema.record_bytes)
        samples.append((shard, record))

    values, lengths = {}, {}
    for name in names:
        field = schema.fields[name]
        args = (_option(dtype, name), _option(scale, name), _option(offset, name))
        stored = field.stored_dtype
        rows = []
        for shard, record in samples:
            if field.variable:
                at, count = np.frombuffer(record, "<u8", 2, field.offset).tolist()
                data = _pread(os.path.join(path, shard.heap_file), count * field.count * stored.itemsize, at)
                raw = np.frombuffer(data, stored).reshape((count,) + field.row_shape)
            elif field.compressed:
                at, length = np.frombuffer(record, "<u8", 2, field.offset).tolist()
                frame = np.frombuffer(_pread(os.path.join(path, shard.heap_file), length, at), np.uint8)
                file = shard.dictionary(name)
                dictionary = None if file is None else _pread(os.path.join(path, file), manifest.dictionaries[file].size, 0)
                raw = np.frombuffer(_decompress(field.codec, frame, field.raw_bytes, dictionary),
                                    stored).reshape(field.row_shape)
            else:
                raw = np.frombuffer(record, stored, field.count, field.offset).reshape(field.row_shape)
            rows.append(_convert(field, raw, *args))
        out_dtype = _convert(field, np.zeros(field.row_shape, stored), *args).dtype
        if not field.variable:
            values[name] = np.stack(rows) if rows else np.empty((0,) + field.row_shape, out_dtype)
            continue
        limit = _option(maxlen, name)
        longest = max((len(r) for r in rows), default=0) if limit is None else limit
        pad = pad_value.get(name, 0) if isinstance(pad_value, dict) else pad_value
        padded = np.full((len(rows), longest) + field.row_shape, pad, dtype=out_dtype)
        for k, r in enumerate(rows):
            kept = r[:longest] if _option(truncating, name) == "post" else r[max(0, len(r) - longest):]
            if _option(padding, name) == "post":
                padded[k, :len(kept)] = kept
            else:
                padded[k, longest - len(kept):] = kept
        values[name] = padded
        lengths[name] = np.array([min(len(r), longest) for r in rows], dtype=np.int64)
    return values, lengths
